//! Outside tools some tests drive. A test whose tool is missing prints `SKIPPED: …` and passes
//! (`scripts/test` installs them when it can).

use crate::issuer::repo_root;
use std::path::PathBuf;

/// The directory holding `gitlab-ci-local` and the Node it needs (`npm ci` in `action/tools`),
/// if both are installed.
pub fn gitlab_tools() -> Option<PathBuf> {
    let bin = repo_root().join("action/tools/node_modules/.bin");
    (bin.join("gitlab-ci-local").exists() && bin.join("node").exists()).then_some(bin)
}
