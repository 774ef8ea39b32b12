//! Pieces shared by both backends: error mapping, text encodings of enums, limits.
//!
//! Invariant: no error produced here carries a connection URL, a bound value or a driver message
//! verbatim; only fixed text, SQLSTATE codes and constraint names (schema, not data).

use super::{GrantStatus, RevokeCause, StoreError};
use crate::providers::CredentialKind;
use serde::Serialize;
use time::{Duration, OffsetDateTime};

/// How long a caller waits for a pooled connection before the store reports `Unavailable`.
pub(super) const ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Largest page `audit_events` returns.
pub(super) const MAX_AUDIT_PAGE: u32 = 1000;

/// Longest `last_error` kept (bytes); provider errors can be long and the column is for humans.
const MAX_ERROR_LEN: usize = 1024;

/// Postgres `query_canceled`: what `statement_timeout` raises.
const PG_QUERY_CANCELED: &str = "57014";
/// Postgres `lock_not_available`: what `lock_timeout` raises.
const PG_LOCK_NOT_AVAILABLE: &str = "55P03";
/// Postgres SQLSTATE classes that refuse an item's data, not the database: 22 data exception
/// (22021 a NUL in text, 22P05 `\u0000` in jsonb), 23 integrity (unique and foreign-key
/// violations are matched before, as conflicts), 54 program limit (an index row too large).
const PG_DATA_CLASSES: [&str; 3] = ["22", "23", "54"];
/// SQLite primary result codes that refuse an item's data: TOOBIG, CONSTRAINT (unique and
/// foreign key matched before), MISMATCH.
const SQLITE_DATA_CODES: [u32; 3] = [18, 19, 20];

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        db_err(e)
    }
}

/// Map a driver error to a store error with short, non-secret text.
pub(super) fn db_err(e: sqlx::Error) -> StoreError {
    let unavailable = |s: &str| StoreError::Unavailable(s.to_owned());
    match e {
        sqlx::Error::PoolTimedOut => unavailable("timed out waiting for a database connection"),
        sqlx::Error::PoolClosed => unavailable("database pool is closed"),
        sqlx::Error::Io(_) => unavailable("database connection failed"),
        sqlx::Error::Tls(_) => unavailable("database tls handshake failed"),
        sqlx::Error::Protocol(_) => unavailable("database protocol error"),
        sqlx::Error::WorkerCrashed => unavailable("database worker crashed"),
        sqlx::Error::BeginFailed => unavailable("could not begin a transaction"),
        sqlx::Error::Configuration(_) => unavailable("database configuration rejected"),
        sqlx::Error::Database(d) => {
            if d.is_unique_violation() {
                StoreError::Conflict(format!(
                    "duplicate key ({})",
                    d.constraint().unwrap_or("unique")
                ))
            } else if d.is_foreign_key_violation() {
                StoreError::Conflict("unknown grant".to_owned())
            } else {
                let postgres = d
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some();
                match d.code().as_deref() {
                    Some(PG_QUERY_CANCELED) => unavailable("database statement timed out"),
                    Some(PG_LOCK_NOT_AVAILABLE) => unavailable("database lock timed out"),
                    // SQLite SQLITE_BUSY (5) and its extended codes: busy_timeout ran out. An
                    // outage, never a data error (checked first: a busy store is retried).
                    Some(c)
                        if !postgres
                            && (c == "5" || c.parse::<u32>().is_ok_and(|n| n & 0xff == 5)) =>
                    {
                        unavailable("database busy")
                    }
                    Some(c) if postgres && PG_DATA_CLASSES.iter().any(|p| c.starts_with(p)) => {
                        StoreError::Rejected(format!("code {c}"))
                    }
                    Some(c)
                        if !postgres
                            && c.parse::<u32>()
                                .is_ok_and(|n| SQLITE_DATA_CODES.contains(&(n & 0xff))) =>
                    {
                        StoreError::Rejected(format!("code {c}"))
                    }
                    Some(c) => StoreError::Unavailable(format!("database error (code {c})")),
                    None => unavailable("database error"),
                }
            }
        }
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => unavailable("unreadable row in store"),
        _ => unavailable("database error"),
    }
}

/// A migration failure, without the driver's message.
pub(super) fn migrate_err(e: sqlx::migrate::MigrateError) -> StoreError {
    use sqlx::migrate::MigrateError as M;
    match e {
        M::Execute(inner) | M::ExecuteMigration(inner, _) => match db_err(inner) {
            StoreError::Unavailable(s) => StoreError::Unavailable(format!("migration failed: {s}")),
            other => StoreError::Unavailable(format!("migration failed: {other}")),
        },
        M::VersionMissing(v) => {
            StoreError::Unavailable(format!("applied migration {v} is missing from this build"))
        }
        M::VersionMismatch(v) => {
            StoreError::Unavailable(format!("applied migration {v} was modified"))
        }
        M::VersionTooOld(v, latest) | M::VersionTooNew(v, latest) => StoreError::Unavailable(
            format!("database schema version {v} does not match this build ({latest})"),
        ),
        M::Dirty(v) => StoreError::Unavailable(format!("migration {v} is partially applied")),
        _ => StoreError::Unavailable("migration failed".to_owned()),
    }
}

/// A row whose content this build cannot read: fail closed rather than guess.
pub(super) fn corrupt(what: &str) -> StoreError {
    StoreError::Unavailable(format!("unreadable {what} in store"))
}

pub(super) fn parse_status(s: &str) -> Result<GrantStatus, StoreError> {
    GrantStatus::parse(s).ok_or_else(|| corrupt("grant status"))
}

pub(super) fn parse_cause(s: &str) -> Result<RevokeCause, StoreError> {
    match s {
        "requested" => Ok(RevokeCause::Requested),
        "expired" => Ok(RevokeCause::Expired),
        "recovery" => Ok(RevokeCause::Recovery),
        _ => Err(corrupt("revoke cause")),
    }
}

pub(super) fn parse_kind(s: &str) -> Result<CredentialKind, StoreError> {
    CredentialKind::parse(s).ok_or_else(|| corrupt("credential kind"))
}

/// The serde (snake_case) name of a unit enum variant such as `Action::RevokeFailed`, which is
/// what the audit columns hold so they match the JSON in `event`.
pub(super) fn enum_text<T: Serialize>(v: &T) -> Result<String, StoreError> {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => Ok(s),
        _ => Err(StoreError::Unavailable(
            "audit event field not encodable".to_owned(),
        )),
    }
}

/// `now + lease`, refusing a lease that overflows the calendar instead of panicking.
pub(super) fn lease_end(
    now: OffsetDateTime,
    lease: Duration,
) -> Result<OffsetDateTime, StoreError> {
    if lease.is_negative() {
        return Err(StoreError::Conflict("negative lease".to_owned()));
    }
    now.checked_add(lease)
        .ok_or_else(|| StoreError::Conflict("lease out of range".to_owned()))
}

/// Cut an error text to [`MAX_ERROR_LEN`] bytes on a character boundary.
pub(super) fn clip_error(s: &str) -> String {
    if s.len() <= MAX_ERROR_LEN {
        return s.to_owned();
    }
    s[..s.floor_char_boundary(MAX_ERROR_LEN)].to_owned()
}

/// Page size for `audit_events`: 0 (the `Default`) means the largest page, not an empty one.
pub(super) fn audit_limit(limit: u32) -> i64 {
    i64::from(if limit == 0 {
        MAX_AUDIT_PAGE
    } else {
        limit.min(MAX_AUDIT_PAGE)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enum_text_is_the_serde_name() {
        use crate::audit::{Action, Outcome};
        assert_eq!(enum_text(&Action::RevokeFailed).unwrap(), "revoke_failed");
        assert_eq!(enum_text(&Outcome::Allow).unwrap(), "allow");
    }

    #[test]
    fn causes_round_trip() {
        for c in [
            RevokeCause::Requested,
            RevokeCause::Expired,
            RevokeCause::Recovery,
        ] {
            assert_eq!(parse_cause(c.as_str()).unwrap(), c);
        }
        assert!(parse_cause("bogus").is_err());
    }

    #[test]
    fn clip_error_respects_char_boundaries() {
        let long = "é".repeat(MAX_ERROR_LEN);
        let clipped = clip_error(&long);
        assert!(clipped.len() <= MAX_ERROR_LEN);
        assert!(clipped.chars().all(|c| c == 'é'));
        assert_eq!(clip_error("short"), "short");
    }

    #[test]
    fn audit_limit_caps_and_defaults() {
        assert_eq!(audit_limit(0), 1000);
        assert_eq!(audit_limit(5), 5);
        assert_eq!(audit_limit(50_000), 1000);
    }

    #[test]
    fn lease_end_refuses_overflow_and_negative() {
        let now = OffsetDateTime::UNIX_EPOCH;
        assert_eq!(
            lease_end(now, Duration::seconds(30))
                .unwrap()
                .unix_timestamp(),
            30
        );
        assert!(lease_end(now, Duration::seconds(-1)).is_err());
        assert!(lease_end(now, Duration::MAX).is_err());
    }

    #[test]
    fn pool_errors_are_unavailable_without_detail() {
        let e = db_err(sqlx::Error::PoolTimedOut);
        assert_eq!(e.reason_code(), "store_unavailable");
        let e = db_err(sqlx::Error::Protocol(
            "password=hunter2 in a weird message".to_owned(),
        ));
        assert!(!e.to_string().contains("hunter2"));
    }
}
