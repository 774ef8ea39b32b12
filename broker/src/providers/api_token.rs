//! API-token provider: the broker signs a short-lived JWT for a downstream service.

use super::template::Template;
use serde::{Deserialize, Serialize};

/// `api_token:` parameters of a credential definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenSpec {
    /// `aud` of the minted token: the service that will accept it.
    pub audience: String,
    /// `scope` entries, templated over claims (`deploy:${repository}`).
    #[serde(default)]
    pub scopes: Vec<Template>,
    /// `sub` of the minted token; defaults to the job token's `sub`.
    #[serde(default)]
    pub subject: Option<Template>,
}
