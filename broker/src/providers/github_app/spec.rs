//! `github_app:` parameters of a credential definition (from a policy file), checked at load
//! against GitHub's permission names and levels.

use super::permissions::{Level, check_permission};
use crate::providers::template::Template;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;

/// `github_app:` parameters of a credential definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubAppSpec {
    /// An App under `targets.github_app` in the broker config.
    pub app: String,
    /// The account (organization or user) whose installation mints the token, templated over
    /// claims (`${repository_owner}`).
    pub owner: Template,
    /// Repository names (within `owner`) the token is limited to, templated; at most 500.
    /// Empty: every repository the installation can reach.
    #[serde(default, deserialize_with = "repositories")]
    pub repositories: Vec<Template>,
    /// Permissions and levels, checked against GitHub's documented list. At least one.
    #[serde(deserialize_with = "permissions")]
    pub permissions: BTreeMap<String, Level>,
}

fn repositories<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Template>, D::Error> {
    let v = Vec::<Template>::deserialize(d)?;
    if v.len() > 500 {
        return Err(serde::de::Error::custom(
            "repositories: at most 500 (GitHub's limit)",
        ));
    }
    Ok(v)
}

fn permissions<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Level>, D::Error> {
    let m = BTreeMap::<String, Level>::deserialize(d)?;
    if m.is_empty() {
        return Err(serde::de::Error::custom(
            "permissions: name at least one (GitHub would otherwise grant all the App has)",
        ));
    }
    for (name, level) in &m {
        check_permission(name, *level)
            .map_err(|e| serde::de::Error::custom(format!("permissions: {e}")))?;
    }
    Ok(m)
}

/// A repository or account name as GitHub allows it: `[A-Za-z0-9._-]`, 1 to 100 characters.
pub(super) fn valid_github_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && s != "."
        && s != ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(y: &str) -> Result<GithubAppSpec, String> {
        serde_saphyr::from_str(y).map_err(|e| e.to_string())
    }

    #[test]
    fn spec_parses_and_checks_permissions_at_load() {
        let s = parse(
            "app: main\nowner: '${repository_owner}'\nrepositories: [api]\npermissions: {contents: write, pull_requests: read}\n",
        )
        .unwrap();
        assert_eq!(s.permissions["contents"], Level::Write);
        for bad in [
            "app: main\nowner: acme\npermissions: {}\n",
            "app: main\nowner: acme\npermissions: {contents: admin}\n",
            "app: main\nowner: acme\npermissions: {everything: read}\n",
            "app: main\nowner: acme\npermissions: {contents: owner}\n",
            "app: main\nowner: acme\npermissions: {contents: read}\ninstallation_id: 1\n",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
        assert!(valid_github_name("my-repo.js_2"));
        assert!(!valid_github_name("a/b") && !valid_github_name("..") && !valid_github_name(""));
    }
}
