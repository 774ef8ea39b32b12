//! Refusals of unauthenticated requests: bounded in cost, every one still counted.
//!
//! Garbage tokens, bad revocation tokens and forged webhook deliveries cost the sender nothing,
//! and each used to write a full audit row. Every such refusal now passes through here before
//! it is audited:
//!
//! 1. [`fields`] caps each request-controlled field (truncated values flagged in the event).
//! 2. A per-client token bucket ([`limiter`]) charges each failure. Over it, the caller gets
//!    429 `too_many_failures` with `Retry-After` and no row of its own. Only failures are
//!    charged: a request whose token verifies never touches it, so honest CI traffic (even
//!    behind the attacker's NAT) is never limited by it.
//! 3. An [`aggregate`] per (client, action, reason) lets the first refusals of a window through
//!    as rows and counts the rest into one aggregate event written at window end (by the task
//!    in `app.rs`, every second, and on shutdown).
//! 4. `metrics::refusal` counts every refusal, row or not.
//!
//! So the rows one client can cause per window are bounded by the configuration, not by its
//! request rate, and "every refusal is audited" still holds as "singly or in a count".
//!
//! Clients are keyed by peer address (the broker has no trusted-proxy setting): an IPv4 address
//! as is, an IPv6 address by its /64 (one host usually holds a whole /64).

pub mod aggregate;
pub mod fields;
pub mod limiter;

use crate::audit::{Action, AuditEvent, Outcome, RefusalAggregate};
use crate::reason::ReasonCode;
use crate::time::serde_duration;
use aggregate::{Aggregate, Aggregator, Key};
use limiter::FailureLimiter;
use serde::Deserialize;
use std::net::IpAddr;
use std::sync::Mutex;
use time::{Duration, OffsetDateTime};

/// `refusals:` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefusalConfig {
    /// Failed verifications one client may cause per minute (after its burst), per replica;
    /// past it → 429 `too_many_failures`. 0 turns the limit off.
    pub failures_per_minute_per_client: u32,
    /// Failures one client may cause at once before the per-minute rate applies.
    pub failure_burst_per_client: u32,
    /// Refusals audited one by one per (client, action, reason) and window; the rest of the
    /// window is one aggregate event. 0 = every refusal gets its own row.
    pub audit_rows_per_window: u32,
    /// The aggregation window.
    #[serde(with = "serde_duration")]
    pub audit_window: Duration,
    /// Clients (and aggregation keys) tracked at once; past it new ones share one overflow
    /// bucket and key (`*`).
    pub max_tracked_clients: usize,
}

impl Default for RefusalConfig {
    fn default() -> Self {
        Self {
            failures_per_minute_per_client: 600,
            failure_burst_per_client: 120,
            audit_rows_per_window: 20,
            audit_window: Duration::seconds(10),
            max_tracked_clients: 100_000,
        }
    }
}

/// Every problem with `refusals:`, each naming its key.
pub fn validate(cfg: &RefusalConfig) -> Vec<String> {
    let mut p = Vec::new();
    if cfg.failures_per_minute_per_client > 0 && cfg.failure_burst_per_client == 0 {
        p.push("refusals.failure_burst_per_client: at least 1 when the limit is on".into());
    }
    if !(Duration::SECOND..=Duration::hours(1)).contains(&cfg.audit_window) {
        p.push("refusals.audit_window: 1s to 1h".into());
    }
    if !(1..=10_000_000).contains(&cfg.max_tracked_clients) {
        p.push("refusals.max_tracked_clients: 1 to 10000000".into());
    }
    p
}

/// What to do with one unauthenticated refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Audit it now, as before.
    Record,
    /// Counted in its window's aggregate; answer as usual, write nothing now.
    Collapse,
    /// The client is over its failure limit: answer 429 `too_many_failures`, write nothing now
    /// (counted in the aggregate under that reason).
    Limited { retry_after_secs: u64 },
}

impl Disposition {
    /// The `audit` label of `broker_refusals_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::Record => "row",
            Disposition::Collapse => "aggregated",
            Disposition::Limited { .. } => "limited",
        }
    }
}

/// The limiter and aggregator of one broker process.
#[derive(Debug)]
pub struct Refusals {
    limiter: Mutex<FailureLimiter>,
    aggregator: Mutex<Aggregator>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self::new(&RefusalConfig::default())
    }
}

/// The key a peer address is limited and aggregated under.
pub fn client_key(addr: Option<&str>) -> String {
    match addr.and_then(|a| a.parse::<IpAddr>().ok()) {
        Some(IpAddr::V4(v4)) => v4.to_string(),
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{net}/64")
            }
        },
        None => "-".to_owned(),
    }
}

impl Refusals {
    pub fn new(cfg: &RefusalConfig) -> Self {
        Self {
            limiter: Mutex::new(FailureLimiter::new(
                cfg.failures_per_minute_per_client,
                cfg.failure_burst_per_client,
                cfg.max_tracked_clients,
            )),
            aggregator: Mutex::new(Aggregator::new(
                cfg.audit_rows_per_window,
                cfg.audit_window,
                cfg.max_tracked_clients,
            )),
        }
    }

    /// Decide the fate of one unauthenticated refusal (`ev` already carries its action,
    /// reason, client and actor) at `now`. Counts it in the metrics.
    pub fn admit(&self, ev: &AuditEvent, now: OffsetDateTime) -> Disposition {
        let client = client_key(ev.client_addr.as_deref());
        let charged = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .charge(&client, now);
        let (reason, limited) = match charged {
            Ok(()) => (ev.reason.clone(), None),
            Err(secs) => (ReasonCode::TooManyFailures.as_str().to_owned(), Some(secs)),
        };
        let key = Key {
            client,
            action: ev.action,
            reason,
        };
        let row = self
            .aggregator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(key, now, limited.is_some(), ev.actor.as_deref());
        let d = match (limited, row) {
            (Some(retry_after_secs), _) => Disposition::Limited { retry_after_secs },
            (None, true) => Disposition::Record,
            (None, false) => Disposition::Collapse,
        };
        crate::metrics::refusal(ev.action.as_str(), &ev.reason, d.as_str());
        d
    }

    /// The aggregate events of windows ended by `now` (`drain_all`: every pending one).
    pub fn due(&self, now: OffsetDateTime, drain_all: bool) -> Vec<AuditEvent> {
        let mut agg = self.aggregator.lock().unwrap_or_else(|e| e.into_inner());
        let due = if drain_all { agg.drain() } else { agg.due(now) };
        drop(agg);
        if !drain_all {
            self.limiter
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .prune(now);
        }
        due.into_iter().map(to_event).collect()
    }

    /// Put back aggregate events whose write failed.
    pub fn requeue(&self, failed: Vec<AuditEvent>) {
        let back: Vec<Aggregate> = failed.into_iter().filter_map(from_event).collect();
        self.aggregator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .requeue(back);
    }
}

fn to_event(g: Aggregate) -> AuditEvent {
    let mut ev = AuditEvent::new(g.last_seen, g.key.action, Outcome::Deny, &g.key.reason);
    ev.client_addr = Some(g.key.client.clone());
    ev.actor = g.actor;
    ev.detail = Some(format!(
        "{} similar refusals from {} in a {}s window, counted here instead of one row each",
        g.collapsed,
        g.key.client,
        g.window.whole_seconds()
    ));
    ev.aggregate = Some(RefusalAggregate {
        count: g.collapsed,
        recorded: g.recorded,
        first_seen: g.first_seen,
        last_seen: g.last_seen,
        window_start: g.window_start,
        window_seconds: g.window.whole_seconds(),
    });
    ev
}

fn from_event(ev: AuditEvent) -> Option<Aggregate> {
    let a = ev.aggregate?;
    Some(Aggregate {
        key: Key {
            client: ev.client_addr.unwrap_or_default(),
            action: ev.action,
            reason: ev.reason,
        },
        collapsed: a.count,
        recorded: a.recorded,
        first_seen: a.first_seen,
        last_seen: a.last_seen,
        window_start: a.window_start,
        window: Duration::seconds(a.window_seconds),
        actor: ev.actor,
    })
}

/// Whether a refusal of this action and reason comes from a caller who proved nothing (no
/// verified token, revocation token or webhook signature); only those are limited and
/// aggregated. Policy denials, replays and rate limits follow a verified token and keep their
/// own row.
pub fn unauthenticated(action: Action, reason: &str) -> bool {
    use ReasonCode as R;
    let Some(reason) = ReasonCode::parse(reason) else {
        return false;
    };
    match action {
        Action::Exchange | Action::Revoke => matches!(
            reason,
            R::BadRequest
                | R::BodyNotObject
                | R::InvalidText
                | R::PayloadTooLarge
                | R::MissingToken
                | R::InvalidRevocationToken
                | R::MalformedSecret
                | R::MalformedToken
                | R::TokenTooLarge
                | R::UnknownIssuer
                | R::UnsupportedAlgorithm
                | R::UnknownKey
                | R::BadSignature
                | R::BadAudience
                | R::TokenExpired
                | R::TokenNotYetValid
                | R::TokenTooOld
                | R::MissingClaim
                | R::InvalidClaim
        ),
        Action::Webhook | Action::LeakReported => reason == R::BadSignature,
        Action::Admin => matches!(
            reason,
            R::MissingToken | R::OperatorUnauthorized | R::MalformedSecret
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + Duration::milliseconds(ms)
    }

    fn refusal(addr: &str, reason: &str) -> AuditEvent {
        let mut ev = AuditEvent::new(t(0), Action::Exchange, Outcome::Deny, reason);
        ev.client_addr = Some(addr.into());
        ev
    }

    #[test]
    fn client_keys() {
        assert_eq!(client_key(Some("10.1.2.3")), "10.1.2.3");
        assert_eq!(client_key(Some("::ffff:10.1.2.3")), "10.1.2.3");
        assert_eq!(
            client_key(Some("2001:db8:1:2:aaaa::1")),
            client_key(Some("2001:db8:1:2:bbbb::9"))
        );
        assert_eq!(client_key(Some("2001:db8:1:2::1")), "2001:db8:1:2::/64");
        assert_eq!(client_key(None), "-");
        assert_eq!(client_key(Some("not an address")), "-");
    }

    #[test]
    fn a_flood_is_limited_and_collapsed_and_every_refusal_is_accounted_for() {
        let cfg = RefusalConfig {
            failures_per_minute_per_client: 60,
            failure_burst_per_client: 10,
            audit_rows_per_window: 4,
            audit_window: Duration::seconds(10),
            max_tracked_clients: 100,
        };
        let r = Refusals::new(&cfg);
        let mut rows = 0;
        let mut limited = 0;
        // 1,000 garbage tokens in one second from one address.
        for i in 0..1000 {
            match r.admit(&refusal("10.0.0.66", "malformed_token"), t(i)) {
                Disposition::Record => rows += 1,
                Disposition::Collapse => {}
                Disposition::Limited { retry_after_secs } => {
                    assert!(retry_after_secs >= 1);
                    limited += 1;
                }
            }
        }
        // Another client is untouched.
        assert_eq!(
            r.admit(&refusal("10.0.0.7", "malformed_token"), t(500)),
            Disposition::Record
        );
        assert_eq!(rows, 4, "rows per window");
        assert_eq!(
            limited,
            1000 - 10,
            "burst 10; under one token refilled in the second"
        );
        let events = r.due(t(11_000), false);
        let counted: u64 = events
            .iter()
            .map(|e| e.aggregate.as_ref().unwrap().count)
            .sum();
        assert_eq!(counted + rows, 1000);
        let limited_ev = events
            .iter()
            .find(|e| e.reason == ReasonCode::TooManyFailures.as_str())
            .unwrap();
        assert_eq!(limited_ev.aggregate.as_ref().unwrap().count, limited);
        assert_eq!(limited_ev.client_addr.as_deref(), Some("10.0.0.66"));
        assert!(limited_ev.detail.as_ref().unwrap().contains("990 similar"));
        // A failed write is retried.
        r.requeue(events.clone());
        assert_eq!(r.due(t(11_000), false).len(), events.len());
        assert!(r.due(t(20_000), true).is_empty());
    }

    #[test]
    fn who_is_unauthenticated() {
        assert!(unauthenticated(Action::Exchange, "malformed_token"));
        assert!(unauthenticated(Action::Revoke, "invalid_revocation_token"));
        assert!(unauthenticated(Action::Webhook, "bad_signature"));
        assert!(!unauthenticated(Action::Webhook, "replayed_delivery"));
        assert!(!unauthenticated(Action::Exchange, "no_matching_rule"));
        assert!(!unauthenticated(Action::Exchange, "rate_limited"));
        assert!(!unauthenticated(Action::Exchange, "issuer_unavailable"));
        assert!(!unauthenticated(Action::Exchange, "token_replayed"));
    }

    #[test]
    fn config_defaults_and_validation() {
        let d: RefusalConfig = serde_saphyr::from_str("{}").unwrap();
        assert_eq!(d.failures_per_minute_per_client, 600);
        assert!(validate(&d).is_empty());
        let bad: RefusalConfig = serde_saphyr::from_str(
            "failure_burst_per_client: 0\naudit_window: 0s\nmax_tracked_clients: 0\n",
        )
        .unwrap();
        let p = validate(&bad).join("\n");
        assert!(p.contains("refusals.failure_burst_per_client"), "{p}");
        assert!(p.contains("refusals.audit_window"), "{p}");
        assert!(p.contains("refusals.max_tracked_clients"), "{p}");
        assert!(serde_saphyr::from_str::<RefusalConfig>("nope: 1").is_err());
    }
}
