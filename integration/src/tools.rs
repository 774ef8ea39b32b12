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

/// The Python of the venv `scripts/test` installs the OAuth client library into
/// (`target/oauth-venv`: Authlib and requests), if present. When `BROKER_PY_TOOLS_REQUIRED` is
/// set (it is by `scripts/test`, which promised to install it) a missing venv fails the test
/// that needs it instead of skipping.
pub fn oauth_python() -> Option<PathBuf> {
    let py = repo_root().join("target/oauth-venv/bin/python");
    if py.exists() {
        return Some(py);
    }
    assert!(
        std::env::var_os("BROKER_PY_TOOLS_REQUIRED").is_none(),
        "target/oauth-venv is missing although scripts/test installs it (pip install failed?)"
    );
    None
}
