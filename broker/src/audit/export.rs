//! Signed audit checkpoints on a schedule, copied off the box.
//!
//! The hash chain proves the log was not edited, but whoever can rewrite the whole table can
//! also recompute every hash; a signed checkpoint kept elsewhere closes that gap (see
//! `docs/operations.md`, "Signed checkpoints"). So the broker takes one itself, every
//! `audit.checkpoints.every` (default one hour; one replica at a time, and at most one per
//! period across replicas), and hands the signed JWT to every configured destination:
//!
//! - the log (on by default): one `audit checkpoint` line at info level carrying the JWT, so
//!   the log pipeline that already ships the broker's logs off the host keeps a copy without
//!   any further setup;
//! - `export_dir`: a file `checkpoint-<seq>.jwt` per checkpoint (written to a temporary name and
//!   renamed, so a reader never sees half of one), e.g. a mounted volume a backup job collects;
//! - `export_url`: an HTTP `POST` of the JWT (`Content-Type: application/jwt`), retried.
//!
//! A checkpoint is a signed statement about public chain data: it holds no secret.

use crate::time::serde_duration;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use time::Duration;

/// `audit:` in the config.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub checkpoints: CheckpointSchedule,
}

/// `audit.checkpoints:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSchedule {
    /// How often a checkpoint is taken; `0s` turns the schedule off.
    #[serde(with = "serde_duration")]
    pub every: Duration,
    /// Write each signed checkpoint into the log (info level).
    pub log: bool,
    /// Write each signed checkpoint as a file into this directory.
    pub export_dir: Option<PathBuf>,
    /// `POST` each signed checkpoint to this URL.
    pub export_url: Option<String>,
}

impl Default for CheckpointSchedule {
    fn default() -> Self {
        Self {
            every: Duration::hours(1),
            log: true,
            export_dir: None,
            export_url: None,
        }
    }
}

impl CheckpointSchedule {
    pub fn enabled(&self) -> bool {
        self.every > Duration::ZERO
    }
}

/// Problems with `audit:`.
pub fn validate(cfg: &AuditConfig) -> Vec<String> {
    let mut p = Vec::new();
    let c = &cfg.checkpoints;
    if c.enabled() && c.every < Duration::minutes(1) {
        p.push("audit.checkpoints.every: at least 1m (or 0s: off)".to_owned());
    }
    if let Some(u) = &c.export_url {
        match url::Url::parse(u) {
            Ok(u) if matches!(u.scheme(), "https" | "http") => {}
            _ => p.push("audit.checkpoints.export_url: an http(s) URL".to_owned()),
        }
    }
    p
}

/// Why an export failed. Names the destination, never the checkpoint's content.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("writing {}: {kind}", path.display())]
    File {
        path: PathBuf,
        kind: std::io::ErrorKind,
    },
    #[error("posting to the export URL: {0}")]
    Post(String),
}

/// Write `jwt` as `dir/checkpoint-<seq>.jwt`, atomically.
pub fn write_file(dir: &Path, seq: i64, jwt: &str) -> Result<PathBuf, ExportError> {
    let path = dir.join(format!("checkpoint-{seq:012}.jwt"));
    let tmp = dir.join(format!(".checkpoint-{seq:012}.jwt.tmp"));
    let err = |kind| ExportError::File {
        path: path.clone(),
        kind,
    };
    std::fs::write(&tmp, format!("{jwt}\n")).map_err(|e| err(e.kind()))?;
    std::fs::rename(&tmp, &path).map_err(|e| err(e.kind()))?;
    Ok(path)
}

/// `POST` `jwt` to `url`, up to three attempts (1 s, then 2 s apart).
pub async fn post(client: &reqwest::Client, url: &str, jwt: &str) -> Result<(), ExportError> {
    let mut last = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_secs(u64::from(attempt))).await;
        }
        match client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/jwt")
            .body(jwt.to_owned())
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("answered {}", r.status().as_u16()),
            Err(e) => last = e.without_url().to_string(),
        }
    }
    Err(ExportError::Post(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_takes_one_an_hour_into_the_log() {
        let c = AuditConfig::default().checkpoints;
        assert!(c.enabled() && c.log);
        assert_eq!(c.every, Duration::hours(1));
        assert!(validate(&AuditConfig::default()).is_empty());
    }

    #[test]
    fn bad_schedules_are_refused() {
        let cfg: AuditConfig =
            serde_saphyr::from_str("checkpoints: {every: 10s, export_url: ftp://x}").unwrap();
        let p = validate(&cfg);
        assert_eq!(p.len(), 2, "{p:?}");
        let off: AuditConfig = serde_saphyr::from_str("checkpoints: {every: 0s}").unwrap();
        assert!(!off.checkpoints.enabled());
        assert!(validate(&off).is_empty());
    }

    #[test]
    fn files_are_written_whole_and_named_by_seq() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_file(dir.path(), 42, "a.b.c").unwrap();
        assert_eq!(p.file_name().unwrap(), "checkpoint-000000000042.jwt");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "a.b.c\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let e = write_file(&dir.path().join("missing"), 1, "x").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
