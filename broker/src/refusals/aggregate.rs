//! Collapsing floods of similar refusals into one audit event per window.
//!
//! Per key (client, action, reason), the first `rows_per_window` refusals of a window are
//! audited one by one; the rest are only counted, and when the window ends one aggregate
//! event reports how many there were, the first and the last time. So one client writes at
//! most `rows_per_window + 1` rows per key per window however fast it sends, and every refusal
//! is still in the log, singly or in a count. The clock is an input (`now`); the caller writes
//! what [`Aggregator::due`] returns (every second, and everything on shutdown).

use super::limiter::OVERFLOW_CLIENT;
use crate::audit::Action;
use std::collections::HashMap;
use time::{Duration, OffsetDateTime};

/// What identifies "similar" refusals.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The client key (an IPv4 address, an IPv6 /64, `-` when unknown, `*` for overflow).
    pub client: String,
    pub action: Action,
    pub reason: String,
}

#[derive(Debug, Clone)]
struct Window {
    start: OffsetDateTime,
    recorded: u64,
    collapsed: u64,
    first: Option<OffsetDateTime>,
    last: Option<OffsetDateTime>,
    actor: Option<String>,
}

/// One window's refusals that were counted, not audited one by one.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub key: Key,
    /// Refusals collapsed into this event (never 0).
    pub collapsed: u64,
    /// Refusals of the same window that were audited one by one.
    pub recorded: u64,
    pub first_seen: OffsetDateTime,
    pub last_seen: OffsetDateTime,
    pub window_start: OffsetDateTime,
    pub window: Duration,
    /// `actor` of the collapsed events (e.g. `webhook:github`).
    pub actor: Option<String>,
}

/// Open windows per key, and closed ones waiting to be written.
#[derive(Debug)]
pub struct Aggregator {
    rows_per_window: u64,
    window: Duration,
    max_keys: usize,
    open: HashMap<Key, Window>,
    closed: Vec<Aggregate>,
}

impl Aggregator {
    /// `rows_per_window == 0` turns collapsing off (every refusal gets its row).
    pub fn new(rows_per_window: u32, window: Duration, max_keys: usize) -> Self {
        Self {
            rows_per_window: u64::from(rows_per_window),
            window: window.max(Duration::SECOND),
            max_keys: max_keys.max(1),
            open: HashMap::new(),
            closed: Vec::new(),
        }
    }

    fn close(&mut self, key: Key, w: Window) {
        if let (true, Some(first_seen), Some(last_seen)) = (w.collapsed > 0, w.first, w.last) {
            self.closed.push(Aggregate {
                key,
                collapsed: w.collapsed,
                recorded: w.recorded,
                first_seen,
                last_seen,
                window_start: w.start,
                window: self.window,
                actor: w.actor,
            });
        }
    }

    fn close_ended(&mut self, now: OffsetDateTime) {
        let window = self.window;
        let ended: Vec<Key> = self
            .open
            .iter()
            .filter(|(_, w)| now >= w.start + window)
            .map(|(k, _)| k.clone())
            .collect();
        for k in ended {
            if let Some(w) = self.open.remove(&k) {
                self.close(k, w);
            }
        }
    }

    /// One refusal at `now`. `true`: audit it on its own; `false`: it is counted in the
    /// window's aggregate. `always_collapse` (a client over its failure limit) never gets a
    /// row of its own.
    pub fn admit(
        &mut self,
        mut key: Key,
        now: OffsetDateTime,
        always_collapse: bool,
        actor: Option<&str>,
    ) -> bool {
        if self.rows_per_window == 0 && !always_collapse {
            return true;
        }
        let window = self.window;
        let ended = self.open.get(&key).is_some_and(|w| now >= w.start + window);
        if ended && let Some(w) = self.open.remove(&key) {
            self.close(key.clone(), w);
        }
        if !self.open.contains_key(&key) && self.open.len() >= self.max_keys {
            self.close_ended(now);
            if self.open.len() >= self.max_keys {
                key.client = OVERFLOW_CLIENT.to_owned();
            }
        }
        let w = self.open.entry(key).or_insert_with(|| Window {
            start: now,
            recorded: 0,
            collapsed: 0,
            first: None,
            last: None,
            actor: actor.map(str::to_owned),
        });
        if !always_collapse && w.recorded < self.rows_per_window {
            w.recorded += 1;
            return true;
        }
        w.collapsed += 1;
        w.first.get_or_insert(now);
        w.last = Some(now);
        false
    }

    /// Aggregates of the windows ended by `now`, to be written.
    pub fn due(&mut self, now: OffsetDateTime) -> Vec<Aggregate> {
        self.close_ended(now);
        std::mem::take(&mut self.closed)
    }

    /// Every pending aggregate, ended or not (shutdown).
    pub fn drain(&mut self) -> Vec<Aggregate> {
        let open: Vec<(Key, Window)> = self.open.drain().collect();
        for (k, w) in open {
            self.close(k, w);
        }
        std::mem::take(&mut self.closed)
    }

    /// Put back aggregates whose write failed (written on the next round).
    pub fn requeue(&mut self, mut failed: Vec<Aggregate>) {
        self.closed.append(&mut failed);
    }

    /// Keys with an open window.
    pub fn tracked(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + Duration::milliseconds(ms)
    }

    fn key(client: &str, reason: &str) -> Key {
        Key {
            client: client.into(),
            action: Action::Exchange,
            reason: reason.into(),
        }
    }

    #[test]
    fn past_the_row_budget_refusals_are_counted_and_reported_at_window_end() {
        let mut a = Aggregator::new(3, Duration::seconds(10), 100);
        let k = key("10.0.0.1", "malformed_token");
        let rows = (0..1000)
            .filter(|i| a.admit(k.clone(), t(i * 5), false, None))
            .count();
        assert_eq!(rows, 3);
        assert!(a.due(t(9_999)).is_empty(), "window still open");
        let due = a.due(t(10_000));
        assert_eq!(due.len(), 1);
        let g = &due[0];
        assert_eq!((g.collapsed, g.recorded), (997, 3));
        assert_eq!((g.first_seen, g.last_seen), (t(15), t(4_995)));
        assert_eq!(g.window_start, t(0));
        assert!(a.due(t(20_000)).is_empty(), "reported once");
        assert_eq!(a.tracked(), 0);
    }

    #[test]
    fn keys_are_independent_and_a_quiet_window_writes_no_aggregate() {
        let mut a = Aggregator::new(2, Duration::seconds(1), 100);
        for _ in 0..2 {
            assert!(a.admit(key("a", "x"), t(0), false, None));
            assert!(a.admit(key("a", "y"), t(0), false, None));
            assert!(a.admit(key("b", "x"), t(0), false, None));
        }
        assert!(!a.admit(key("a", "x"), t(1), false, None));
        let due = a.due(t(1_000));
        assert_eq!(due.len(), 1, "only a/x overflowed: {due:?}");
        assert_eq!(due[0].key, key("a", "x"));
    }

    #[test]
    fn a_refusal_after_the_window_closes_it_and_opens_a_new_one() {
        let mut a = Aggregator::new(1, Duration::seconds(1), 100);
        assert!(a.admit(key("a", "x"), t(0), false, None));
        assert!(!a.admit(key("a", "x"), t(10), false, None));
        assert!(a.admit(key("a", "x"), t(1_500), false, None), "new window");
        let due = a.due(t(1_500));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].collapsed, 1);
    }

    #[test]
    fn limited_clients_are_always_collapsed_and_drain_reports_open_windows() {
        let mut a = Aggregator::new(5, Duration::seconds(10), 100);
        let k = key("a", "too_many_failures");
        for i in 0..7 {
            assert!(!a.admit(k.clone(), t(i), true, Some("webhook:github")));
        }
        let all = a.drain();
        assert_eq!(all.len(), 1);
        assert_eq!((all[0].collapsed, all[0].recorded), (7, 0));
        assert_eq!(all[0].actor.as_deref(), Some("webhook:github"));
        assert_eq!(a.tracked(), 0);
    }

    #[test]
    fn keys_are_bounded_and_overflow_is_still_counted() {
        let mut a = Aggregator::new(1, Duration::seconds(10), 2);
        for c in ["a", "b", "c", "d", "e"] {
            a.admit(key(c, "x"), t(0), false, None);
            a.admit(key(c, "x"), t(0), false, None);
        }
        assert_eq!(a.tracked(), 3, "a, b and the overflow key");
        let all = a.drain();
        let total: u64 = all.iter().map(|g| g.collapsed + g.recorded).sum();
        assert_eq!(total, 10, "every refusal counted: {all:?}");
        assert!(all.iter().any(|g| g.key.client == OVERFLOW_CLIENT));
    }

    #[test]
    fn zero_rows_per_window_records_everything() {
        let mut a = Aggregator::new(0, Duration::seconds(10), 2);
        assert!((0..100).all(|_| a.admit(key("a", "x"), t(0), false, None)));
        assert!(a.drain().is_empty());
    }

    #[test]
    fn requeued_aggregates_come_back() {
        let mut a = Aggregator::new(0, Duration::seconds(1), 2);
        assert!(!a.admit(key("a", "x"), t(0), true, None));
        let due = a.due(t(1_000));
        assert_eq!(due.len(), 1);
        a.requeue(due);
        assert_eq!(a.due(t(1_000)).len(), 1);
    }
}
