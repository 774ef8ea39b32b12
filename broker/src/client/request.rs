//! What a job asks for: `NAME` or `NAME=VAR` per credential, and the variable stem of a name.

/// One requested credential: its name and, optionally, the environment variable that should
/// hold its main secret (`deploy-api=API_TOKEN`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRequest {
    pub name: String,
    pub env_name: Option<String>,
}

/// A `--credential` value that cannot be a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRequest {
    #[error("empty credential name")]
    EmptyName,
    #[error("{0:?} is not a valid environment variable name")]
    BadVariable(String),
}

impl std::str::FromStr for CredentialRequest {
    type Err = InvalidRequest;
    fn from_str(s: &str) -> Result<Self, InvalidRequest> {
        let (name, env_name) = match s.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().to_owned())),
            None => (s.trim(), None),
        };
        if name.is_empty() {
            return Err(InvalidRequest::EmptyName);
        }
        if let Some(v) = &env_name
            && !valid_env_name(v)
        {
            return Err(InvalidRequest::BadVariable(v.clone()));
        }
        Ok(Self {
            name: name.to_owned(),
            env_name,
        })
    }
}

fn valid_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `deploy-api` → `DEPLOY_API`.
pub fn env_stem(name: &str) -> String {
    let mut s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    if s.starts_with(|c: char| c.is_ascii_digit()) {
        s.insert(0, '_');
    }
    s
}
