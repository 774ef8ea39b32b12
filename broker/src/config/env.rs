//! Environment overrides of the config file: each replaces one key, and a value that cannot be
//! used is refused with the variable's name.

use super::{Config, ConfigError, LogFormat, SecretRef};

impl Config {
    /// Environment overrides (`BROKER_LISTEN`, `BROKER_PUBLIC_URL`, `BROKER_AUDIENCE`,
    /// `BROKER_STORE_URL_FILE`, `BROKER_STORE_URL_ENV`, `BROKER_POLICIES_DIR`,
    /// `BROKER_POLICIES_WATCH_INTERVAL`,
    /// `BROKER_LOG_FORMAT`, `BROKER_LOG_LEVEL`).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let bad = |key: &'static str, message: String| ConfigError::Env { key, message };
        if let Some(v) = get("BROKER_LISTEN") {
            self.listen = v
                .parse()
                .map_err(|_| bad("BROKER_LISTEN", format!("not an address: {v:?}")))?;
        }
        if let Some(v) = get("BROKER_PUBLIC_URL") {
            self.public_url = v;
        }
        if let Some(v) = get("BROKER_AUDIENCE") {
            self.audience = v;
        }
        if let Some(v) = get("BROKER_STORE_URL_FILE") {
            self.store.url = SecretRef {
                file: Some(v.into()),
                ..SecretRef::default()
            };
        }
        if let Some(v) = get("BROKER_STORE_URL_ENV") {
            self.store.url = SecretRef {
                env: Some(v),
                ..SecretRef::default()
            };
        }
        if let Some(v) = get("BROKER_POLICIES_DIR") {
            self.policies.dir = v.into();
        }
        if let Some(v) = get("BROKER_POLICIES_WATCH_INTERVAL") {
            self.policies.watch_interval = Some(crate::time::parse_duration(&v).map_err(|_| {
                bad(
                    "BROKER_POLICIES_WATCH_INTERVAL",
                    format!("not a duration: {v:?}"),
                )
            })?);
        }
        if let Some(v) = get("BROKER_LOG_FORMAT") {
            self.log.format = match v.as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                _ => {
                    return Err(bad(
                        "BROKER_LOG_FORMAT",
                        format!("expected text or json, got {v:?}"),
                    ));
                }
            };
        }
        if let Some(v) = get("BROKER_LOG_LEVEL") {
            self.log.level = v;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::base;

    #[test]
    fn env_overrides_apply() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = Config::parse(&base(d.path()), "t").unwrap();
        cfg.apply_env(|k| (k == "BROKER_LISTEN").then(|| "127.0.0.1:9999".to_owned()))
            .unwrap();
        assert_eq!(cfg.listen.port(), 9999);
        assert_eq!(
            cfg.apply_env(|k| (k == "BROKER_LOG_FORMAT").then(|| "xml".to_owned()))
                .unwrap_err()
                .to_string(),
            "BROKER_LOG_FORMAT: expected text or json, got \"xml\""
        );
    }
}
