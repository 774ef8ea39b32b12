//! Which grants an emergency action applies to: revoke-all selects active grants with it, a
//! freeze refuses exchanges with it. Every field is optional; an empty filter matches all.

use crate::providers::CredentialKind;
use crate::store::Grant;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantFilter {
    /// Configured issuer name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Repository (GitHub) or project path (GitLab), exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Repository / project id, exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository_id: Option<String>,
    /// Credential definition name: grants (or requests) holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// Credential kind (`api_token`, ...): grants (or requests) holding one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Grants created at or after this time (revoke-all only).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub issued_after: Option<OffsetDateTime>,
    /// Grants created before this time (revoke-all only).
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub issued_before: Option<OffsetDateTime>,
}

fn eq_opt(want: &Option<String>, have: Option<&str>) -> bool {
    want.as_deref().is_none_or(|w| have == Some(w))
}

/// A filter that cannot be used as asked (a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error(
        "filter: issued_after/issued_before select existing grants; a freeze applies to new \
         exchanges"
    )]
    TimeBoundsOnFreeze,
}

impl GrantFilter {
    /// A problem with the filter, for a 400.
    pub fn check(&self, for_freeze: bool) -> Result<(), FilterError> {
        // Unknown names (issuer, credential, kind) are refused by `unknown_value`, which lists
        // what exists.
        if for_freeze && (self.issued_after.is_some() || self.issued_before.is_some()) {
            return Err(FilterError::TimeBoundsOnFreeze);
        }
        Ok(())
    }

    /// A value naming something this broker does not have: an issuer that is not configured, a
    /// credential no policy defines, a kind that does not exist. Such a filter would select
    /// nothing (a revoke-all that revokes nothing, a freeze that freezes nothing, both answering
    /// success), so it is refused, naming what exists. `kinds` are the kinds this build knows.
    pub fn unknown_value(
        &self,
        issuers: &[String],
        credentials: &[String],
    ) -> Option<(&'static str, String, Vec<String>)> {
        let known_kinds: Vec<String> = CredentialKind::ALL
            .iter()
            .map(|k| k.as_str().to_owned())
            .collect();
        let checks: [(&'static str, &Option<String>, Vec<String>); 3] = [
            ("issuer", &self.issuer, issuers.to_vec()),
            ("credential", &self.credential, credentials.to_vec()),
            ("kind", &self.kind, known_kinds),
        ];
        for (field, want, mut known) in checks {
            if let Some(v) = want
                && !known.iter().any(|k| k == v)
            {
                known.sort();
                known.dedup();
                return Some((field, v.clone(), known));
            }
        }
        None
    }

    /// The store's form of this filter (revoke-all), applied in SQL.
    pub fn to_select(&self) -> crate::store::GrantSelect {
        crate::store::GrantSelect {
            issuer: self.issuer.clone(),
            repository: self.repository.clone(),
            repository_id: self.repository_id.clone(),
            credential: self.credential.clone(),
            kind: self.kind.clone(),
            issued_after: self.issued_after,
            issued_before: self.issued_before,
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == GrantFilter::default()
    }

    pub fn matches_grant(&self, g: &Grant) -> bool {
        eq_opt(&self.issuer, Some(&g.issuer))
            && eq_opt(&self.repository, g.repository.as_deref())
            && eq_opt(&self.repository_id, g.repository_id.as_deref())
            && self
                .credential
                .as_ref()
                .is_none_or(|c| g.credentials.iter().any(|x| &x.name == c))
            && self
                .kind
                .as_ref()
                .is_none_or(|k| g.credentials.iter().any(|x| x.kind.as_str() == k))
            && self.issued_after.is_none_or(|t| g.created_at >= t)
            && self.issued_before.is_none_or(|t| g.created_at < t)
    }

    /// Whether an exchange by this job for these credentials (name, kind) is covered.
    pub fn matches_exchange(
        &self,
        issuer: &str,
        repository: Option<&str>,
        repository_id: Option<&str>,
        credentials: &[(String, Option<CredentialKind>)],
    ) -> bool {
        eq_opt(&self.issuer, Some(issuer))
            && eq_opt(&self.repository, repository)
            && eq_opt(&self.repository_id, repository_id)
            && self
                .credential
                .as_ref()
                .is_none_or(|c| credentials.iter().any(|(n, _)| n == c))
            && self.kind.as_ref().is_none_or(|k| {
                credentials
                    .iter()
                    .any(|(_, kind)| kind.is_some_and(|x| x.as_str() == k))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::IssuedCredential;
    use crate::store::GrantStatus;

    fn grant(repo: &str, created: i64) -> Grant {
        Grant {
            id: uuid::Uuid::now_v7(),
            status: GrantStatus::Active,
            issuer: "github".into(),
            subject: "s".into(),
            repository: Some(repo.into()),
            repository_id: Some("1".into()),
            job: serde_json::Value::Null,
            bundle_digest: "d".into(),
            created_at: OffsetDateTime::from_unix_timestamp(created).unwrap(),
            expires_at: OffsetDateTime::from_unix_timestamp(created + 600).unwrap(),
            revoked_at: None,
            revoke_attempts: 0,
            last_error: None,
            credentials: vec![IssuedCredential {
                name: "deploy".into(),
                kind: CredentialKind::ApiToken,
                resource_id: "r".into(),
                details: serde_json::Value::Null,
            }],
        }
    }

    #[test]
    fn a_freeze_takes_no_time_bounds() {
        let f = GrantFilter {
            issued_after: Some(OffsetDateTime::UNIX_EPOCH),
            ..GrantFilter::default()
        };
        assert!(f.check(false).is_ok());
        assert_eq!(
            f.check(true).unwrap_err().to_string(),
            "filter: issued_after/issued_before select existing grants; a freeze applies to new \
             exchanges"
        );
    }

    #[test]
    fn filters_select_grants() {
        let g = grant("acme/app", 1000);
        assert!(GrantFilter::default().matches_grant(&g));
        let f = |json: serde_json::Value| serde_json::from_value::<GrantFilter>(json).unwrap();
        assert!(
            f(serde_json::json!({"repository": "acme/app", "kind": "api_token"})).matches_grant(&g)
        );
        assert!(!f(serde_json::json!({"repository": "acme/other"})).matches_grant(&g));
        assert!(!f(serde_json::json!({"issuer": "gitlab"})).matches_grant(&g));
        assert!(!f(serde_json::json!({"credential": "read"})).matches_grant(&g));
        let t = |s: i64| OffsetDateTime::from_unix_timestamp(s).unwrap();
        let after = GrantFilter {
            issued_after: Some(t(1000)),
            ..GrantFilter::default()
        };
        assert!(after.matches_grant(&g));
        let before = GrantFilter {
            issued_before: Some(t(1000)),
            ..GrantFilter::default()
        };
        assert!(!before.matches_grant(&g));
        assert!(serde_json::from_value::<GrantFilter>(serde_json::json!({"repo": "x"})).is_err());
    }

    #[test]
    fn unknown_names_are_refused_with_what_exists() {
        let issuers = vec!["github".to_owned(), "gitlab".to_owned()];
        let creds = vec!["deploy".to_owned()];
        let f = |json: serde_json::Value| serde_json::from_value::<GrantFilter>(json).unwrap();
        let ok =
            f(serde_json::json!({"issuer": "gitlab", "credential": "deploy", "kind": "postgres"}));
        assert_eq!(ok.unknown_value(&issuers, &creds), None);
        assert_eq!(GrantFilter::default().unknown_value(&[], &[]), None);
        let (field, value, known) = f(serde_json::json!({"issuer": "GitHub"}))
            .unknown_value(&issuers, &creds)
            .unwrap();
        assert_eq!((field, value.as_str()), ("issuer", "GitHub"));
        assert_eq!(known, issuers);
        let (field, _, known) = f(serde_json::json!({"credential": "deploy-api"}))
            .unknown_value(&issuers, &creds)
            .unwrap();
        assert_eq!((field, known), ("credential", creds.clone()));
        let (field, _, known) = f(serde_json::json!({"kind": "nuclear"}))
            .unknown_value(&issuers, &creds)
            .unwrap();
        assert_eq!(field, "kind");
        // Every kind this build knows, sorted (the list grows with each kind).
        let mut kinds: Vec<&str> = crate::providers::CredentialKind::ALL
            .iter()
            .map(|k| k.as_str())
            .collect();
        kinds.sort_unstable();
        assert_eq!(known, kinds);
        assert!(known.contains(&"api_token".to_owned()) && known.contains(&"ssh_cert".to_owned()));
        // Repositories are not a closed set: any value is a valid (possibly empty) selection.
        assert_eq!(
            f(serde_json::json!({"repository": "nobody/nothing"})).unknown_value(&issuers, &creds),
            None
        );
    }

    #[test]
    fn check_rejects_time_bounds_on_freeze() {
        let t = GrantFilter {
            issued_after: Some(OffsetDateTime::UNIX_EPOCH),
            ..GrantFilter::default()
        };
        assert!(t.check(false).is_ok());
        assert!(t.check(true).is_err());
    }

    #[test]
    fn exchange_matching() {
        let creds = vec![("deploy".to_owned(), Some(CredentialKind::ApiToken))];
        let f = GrantFilter {
            repository_id: Some("7".into()),
            ..GrantFilter::default()
        };
        assert!(f.matches_exchange("github", Some("a/b"), Some("7"), &creds));
        assert!(!f.matches_exchange("github", Some("a/b"), Some("8"), &creds));
        assert!(!f.matches_exchange("github", None, None, &creds));
        let c = GrantFilter {
            credential: Some("other".into()),
            ..GrantFilter::default()
        };
        assert!(!c.matches_exchange("github", None, None, &creds));
        assert!(GrantFilter::default().matches_exchange("x", None, None, &[]));
    }
}
