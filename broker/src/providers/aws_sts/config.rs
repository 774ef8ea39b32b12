//! `targets.aws.<name>` in the broker config: one AWS endpoint/account setting roles are assumed
//! through, its defaults and its validation. The provider owns this section; `config` only
//! gathers the targets by name (`config` imports `providers`, never the reverse).

use crate::time::serde_duration;
use serde::Deserialize;
use time::Duration;

fn default_role_max_session() -> Duration {
    Duration::hours(1)
}

/// Whether `r` looks like an AWS region name (`eu-west-1`, `us-gov-west-1`, `cn-north-1`).
pub fn valid_aws_region(r: &str) -> bool {
    (4..=32).contains(&r.len())
        && r.contains('-')
        && r.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !r.starts_with('-')
        && !r.ends_with('-')
}

/// One AWS endpoint/account setting the broker assumes roles through (`targets.aws.<name>`).
/// The broker's own AWS identity comes from the standard credential chain (env, profile, web
/// identity / IRSA, instance metadata), never from this file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsTargetConfig {
    /// Region of the STS endpoint, and the default `region` handed to jobs.
    pub region: String,
    /// Endpoint override for STS and IAM (private endpoints; a local test server).
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// The brokered roles' `MaxSessionDuration` (AWS: 1h to 12h; default 1h). Grants longer than
    /// this get sessions this long; it also bounds how long a revoke-all deny is kept.
    #[serde(default = "default_role_max_session", with = "serde_duration")]
    pub role_max_session: Duration,
}

impl AwsTargetConfig {
    /// Every problem of this target, each naming its key under `key` (`targets.aws.<name>`).
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut p = Vec::new();
        if !valid_aws_region(&self.region) {
            p.push(format!("{key}.region: not an AWS region name"));
        }
        if let Some(u) = &self.endpoint_url
            && !matches!(url::Url::parse(u), Ok(p) if matches!(p.scheme(), "https" | "http") && p.host().is_some())
        {
            p.push(format!("{key}.endpoint_url: must be an http(s) URL"));
        }
        if self.role_max_session < Duration::hours(1) || self.role_max_session > Duration::hours(12)
        {
            p.push(format!(
                "{key}.role_max_session: must be 1h to 12h (AWS's range)"
            ));
        }
        p
    }

    /// The summary line's tail: region and endpoint.
    pub fn describe(&self) -> String {
        format!(
            "region {}, endpoint {}",
            self.region,
            self.endpoint_url.as_deref().unwrap_or("default")
        )
    }
}
