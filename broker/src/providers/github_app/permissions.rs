//! GitHub App permission names and the levels each takes, as GitHub's REST documentation lists
//! them for "Create an installation access token for an app" (`permissions` of
//! `POST /app/installations/{installation_id}/access_tokens`, API version 2022-11-28).
//! A policy naming anything else, or a level a permission does not take, fails at load.

use serde::{Deserialize, Serialize};

/// A permission level; `admin` only where GitHub documents it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Read,
    Write,
    Admin,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Read => "read",
            Level::Write => "write",
            Level::Admin => "admin",
        }
    }
}

const RW: &[Level] = &[Level::Read, Level::Write];
const R: &[Level] = &[Level::Read];
const W: &[Level] = &[Level::Write];
const RWA: &[Level] = &[Level::Read, Level::Write, Level::Admin];

/// (name, levels it takes).
const PERMISSIONS: &[(&str, &[Level])] = &[
    // Repository permissions.
    ("actions", RW),
    ("administration", RW),
    ("attestations", RW),
    ("checks", RW),
    ("codespaces", RW),
    ("contents", RW),
    ("dependabot_secrets", RW),
    ("deployments", RW),
    ("environments", RW),
    ("issues", RW),
    ("metadata", RW),
    ("packages", RW),
    ("pages", RW),
    ("pull_requests", RW),
    ("repository_custom_properties", RW),
    ("repository_hooks", RW),
    ("repository_projects", RWA),
    ("secret_scanning_alerts", RW),
    ("secrets", RW),
    ("security_events", RW),
    ("single_file", RW),
    ("statuses", RW),
    ("vulnerability_alerts", RW),
    ("workflows", W),
    // Organization permissions.
    ("members", RW),
    ("organization_administration", RW),
    ("organization_announcement_banners", RW),
    ("organization_copilot_seat_management", W),
    ("organization_custom_org_roles", RW),
    ("organization_custom_properties", RWA),
    ("organization_custom_roles", RW),
    ("organization_events", R),
    ("organization_hooks", RW),
    ("organization_packages", RW),
    ("organization_personal_access_token_requests", RW),
    ("organization_personal_access_tokens", RW),
    ("organization_plan", R),
    ("organization_projects", RWA),
    ("organization_secrets", RW),
    ("organization_self_hosted_runners", RW),
    ("organization_user_blocking", RW),
    ("team_discussions", RW),
    // User permissions.
    ("email_addresses", RW),
    ("followers", RW),
    ("git_ssh_keys", RW),
    ("gpg_keys", RW),
    ("interaction_limits", RW),
    ("profile", W),
    ("starring", RW),
];

/// `Ok` if GitHub documents `name` with `level`; otherwise what is wrong, in words.
pub fn check_permission(name: &str, level: Level) -> Result<(), String> {
    match PERMISSIONS.iter().find(|(n, _)| *n == name) {
        None => Err(format!("{name:?} is not a GitHub App permission")),
        Some((_, levels)) if levels.contains(&level) => Ok(()),
        Some((_, levels)) => Err(format!(
            "permission {name:?} takes {}, not {}",
            levels
                .iter()
                .map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join(" or "),
            level.as_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_levels_are_checked() {
        assert!(check_permission("contents", Level::Write).is_ok());
        assert!(check_permission("repository_projects", Level::Admin).is_ok());
        assert!(check_permission("contents", Level::Admin).is_err());
        assert!(check_permission("workflows", Level::Read).is_err());
        assert!(check_permission("organization_plan", Level::Write).is_err());
        assert!(check_permission("everything", Level::Read).is_err());
        assert!(Level::Read < Level::Write && Level::Write < Level::Admin);
        let mut names: Vec<&str> = PERMISSIONS.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PERMISSIONS.len(), "each name once");
    }
}
