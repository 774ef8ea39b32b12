//! Prometheus metrics, served as OpenMetrics text on `GET /metrics`.
//!
//! One process-wide registry so that recording is a one-line call wherever the event happens
//! (the exchange path, the reaper, the JWKS fetcher, policy reloads) without threading a handle
//! through every constructor. Store-derived gauges (active grants, reaper lag) are refreshed on
//! scrape with one cheap indexed query each, so every replica reports the same cluster-wide
//! value: aggregate them with `max`, not `sum`.
//!
//! Invariant: label values are closed sets chosen here or stable reason codes, never anything
//! from a token or a request (no repository names, no subjects): cardinality stays bounded and
//! no personal data reaches a scrape.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// Content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A timed step of an exchange (or of the bookkeeping around one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Job token verification (may include a JWKS fetch).
    Verify,
    /// CEL policy evaluation.
    Policy,
    /// Grant intent committed to the store.
    Intent,
    /// Every provider's mint, concurrently.
    Mint,
    /// Grant activation and its allow audit event (one transaction).
    Activate,
    /// An audit write for a refusal.
    Audit,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Verify => "verify",
            Stage::Policy => "policy",
            Stage::Intent => "intent",
            Stage::Mint => "mint",
            Stage::Activate => "activate",
            Stage::Audit => "audit",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExchangeLabels {
    outcome: String,
    reason: String,
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevocationLabels {
    cause: String,
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    action: String,
    reason: String,
    audit: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WhereLabels {
    endpoint: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LeakLabels {
    source: String,
    label: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    kind: String,
    op: String,
    result: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DigestLabels {
    digest: String,
}

type HistogramFamily = Family<StageLabels, Histogram, fn() -> Histogram>;
type ProviderHistogramFamily = Family<ProviderLabels, Histogram, fn() -> Histogram>;

fn stage_histogram() -> Histogram {
    // 0.25 ms .. ~4 s: policy evaluation sits at the bottom, a slow provider at the top.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 15))
}

/// Every metric the broker exports.
struct Metrics {
    registry: Registry,
    exchanges: Family<ExchangeLabels, Counter>,
    stage_seconds: HistogramFamily,
    active_grants: Family<KindLabels, Gauge>,
    reaper_lag_seconds: Gauge<f64, AtomicU64>,
    revocations: Family<RevocationLabels, Counter>,
    revocation_retries: Counter,
    jwks_fetches: Family<ResultLabels, Counter>,
    policy_reloads: Family<ResultLabels, Counter>,
    policy_bundle: Family<DigestLabels, Gauge>,
    store_gauge_errors: Counter,
    refusals: Family<RefusalLabels, Counter>,
    malformed_secrets: Family<WhereLabels, Counter>,
    leak_tokens: Family<LeakLabels, Counter>,
    revocation_verifications: Family<ResultLabels, Counter>,
    provider_seconds: ProviderHistogramFamily,
    audit_write_failures: Counter,
    freeze_active: Gauge,
    audit_checkpoints: Family<ResultLabels, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("broker");
        let m = Metrics {
            registry: Registry::default(),
            exchanges: Family::default(),
            stage_seconds: Family::new_with_constructor(stage_histogram),
            active_grants: Family::default(),
            reaper_lag_seconds: Gauge::default(),
            revocations: Family::default(),
            revocation_retries: Counter::default(),
            jwks_fetches: Family::default(),
            policy_reloads: Family::default(),
            policy_bundle: Family::default(),
            store_gauge_errors: Counter::default(),
            refusals: Family::default(),
            malformed_secrets: Family::default(),
            leak_tokens: Family::default(),
            revocation_verifications: Family::default(),
            provider_seconds: Family::new_with_constructor(stage_histogram),
            audit_write_failures: Counter::default(),
            freeze_active: Gauge::default(),
            audit_checkpoints: Family::default(),
        };
        registry.register(
            "exchanges",
            "Exchanges by outcome (allow, deny, error), reason code and credential kind (mixed: several kinds; none: no credential resolved)",
            m.exchanges.clone(),
        );
        registry.register_with_unit(
            "exchange_stage",
            "Time spent in each stage of an exchange",
            prometheus_client::registry::Unit::Seconds,
            m.stage_seconds.clone(),
        );
        registry.register(
            "active_grants",
            "Active grants holding a credential of this kind (cluster-wide, from the store)",
            m.active_grants.clone(),
        );
        registry.register_with_unit(
            "reaper_lag",
            "Age of the oldest grant past its expiry and not yet revoked (cluster-wide; 0 = none)",
            prometheus_client::registry::Unit::Seconds,
            m.reaper_lag_seconds.clone(),
        );
        registry.register(
            "revocations",
            "Revocation attempts by cause (requested, expired, recovery) and result (success, failure)",
            m.revocations.clone(),
        );
        registry.register(
            "revocation_retries",
            "Revocation attempts that retried an earlier failure",
            m.revocation_retries.clone(),
        );
        registry.register(
            "jwks_fetches",
            "Issuer key set fetches by result (ok or the fetch failure code)",
            m.jwks_fetches.clone(),
        );
        registry.register(
            "policy_reloads",
            "Policy reloads by result (ok, rejected)",
            m.policy_reloads.clone(),
        );
        registry.register(
            "policy_bundle",
            "The policy bundle in force (value 1, its digest as a label)",
            m.policy_bundle.clone(),
        );
        registry.register(
            "store_gauge_errors",
            "Scrapes whose store-derived gauges could not be refreshed (old values kept)",
            m.store_gauge_errors.clone(),
        );
        registry.register(
            "refusals",
            "Refusals of unauthenticated requests by action, reason code and how they were audited (row: one row each; aggregated: counted in an aggregate event; limited: over the client's failure limit, answered 429, counted in an aggregate event)",
            m.refusals.clone(),
        );
        registry.register(
            "malformed_secrets",
            "Presented broker secrets refused offline (wrong prefix, length or checksum), by endpoint",
            m.malformed_secrets.clone(),
        );
        registry.register(
            "leak_tokens",
            "Tokens in leak reports by source (github, operator) and label (true_positive, false_positive, inactive)",
            m.leak_tokens.clone(),
        );
        registry.register(
            "revocation_verifications",
            "Checks after a revocation that the old access no longer works, by result (verified, unverified: alert on it)",
            m.revocation_verifications.clone(),
        );
        registry.register_with_unit(
            "provider_operation",
            "Time a credential provider took to mint or revoke, by kind, operation (mint, revoke) and result (success, failure)",
            prometheus_client::registry::Unit::Seconds,
            m.provider_seconds.clone(),
        );
        registry.register(
            "audit_write_failures",
            "Store writes carrying audit events that failed (the request they belonged to failed closed)",
            m.audit_write_failures.clone(),
        );
        registry.register(
            "freeze_active",
            "1 while an operator freeze is in force (cluster-wide, from the store), else 0",
            m.freeze_active.clone(),
        );
        registry.register(
            "audit_checkpoints",
            "Scheduled signed audit checkpoints by result (ok, export_failed: taken but a destination did not get it, failed)",
            m.audit_checkpoints.clone(),
        );
        Metrics { registry, ..m }
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

fn s(v: &str) -> String {
    v.to_owned()
}

/// Count one unauthenticated refusal (`refusals.rs`); `audit` is `row`, `aggregated` or
/// `limited`.
pub fn refusal(action: &str, reason: &str, audit: &str) {
    METRICS
        .refusals
        .get_or_create(&RefusalLabels {
            action: s(action),
            reason: s(reason),
            audit: s(audit),
        })
        .inc();
}

/// Count one exchange.
pub fn exchange(outcome: &str, reason: &str, kind: &str) {
    METRICS
        .exchanges
        .get_or_create(&ExchangeLabels {
            outcome: s(outcome),
            reason: s(reason),
            kind: s(kind),
        })
        .inc();
}

/// Record how long a stage took.
pub fn observe(stage: Stage, started: Instant) {
    METRICS
        .stage_seconds
        .get_or_create(&StageLabels {
            stage: s(stage.as_str()),
        })
        .observe(started.elapsed().as_secs_f64());
}

/// Await `fut`, recording its duration under `stage`.
pub async fn timed<F: std::future::Future>(stage: Stage, fut: F) -> F::Output {
    let started = Instant::now();
    let out = fut.await;
    observe(stage, started);
    out
}

/// Run `f`, recording its duration under `stage`.
pub fn timed_sync<T>(stage: Stage, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let out = f();
    observe(stage, started);
    out
}

/// Count one revocation attempt. `retry`: an earlier attempt on this grant had failed.
pub fn revocation(cause: &str, ok: bool, retry: bool) {
    METRICS
        .revocations
        .get_or_create(&RevocationLabels {
            cause: s(cause),
            result: s(if ok { "success" } else { "failure" }),
        })
        .inc();
    if retry {
        METRICS.revocation_retries.inc();
    }
}

/// Count one broker secret refused offline at `endpoint` (revoke, introspect, admin, leak).
pub fn malformed_secret(endpoint: &str) {
    METRICS
        .malformed_secrets
        .get_or_create(&WhereLabels {
            endpoint: s(endpoint),
        })
        .inc();
}

/// Count one token of a leak report by its source and the label it was answered with.
pub fn leak_token(source: &str, label: &str) {
    METRICS
        .leak_tokens
        .get_or_create(&LeakLabels {
            source: s(source),
            label: s(label),
        })
        .inc();
}

/// Count one revocation's verification: `verified` or `unverified`.
pub fn revocation_verification(result: &str) {
    METRICS
        .revocation_verifications
        .get_or_create(&ResultLabels { result: s(result) })
        .inc();
}

/// Count one JWKS fetch: `Ok(())` or the fetch failure code.
pub fn jwks_fetch(result: Result<(), &str>) {
    METRICS
        .jwks_fetches
        .get_or_create(&ResultLabels {
            result: s(result.err().unwrap_or("ok")),
        })
        .inc();
}

/// A policy bundle is in force (at start or after a reload): the info metric names only it.
pub fn policy_loaded(digest: &str) {
    METRICS.policy_bundle.clear();
    METRICS
        .policy_bundle
        .get_or_create(&DigestLabels { digest: s(digest) })
        .set(1);
}

/// Count one policy reload.
pub fn policy_reload(ok: bool) {
    METRICS
        .policy_reloads
        .get_or_create(&ResultLabels {
            result: s(if ok { "ok" } else { "rejected" }),
        })
        .inc();
}

/// Replace the store-derived gauges. Kinds absent from `g` drop to 0 rather than vanish, so a
/// dashboard sees the fall.
/// `kinds` are every credential kind the build knows (the caller names them, so this module
/// imports nothing of the broker).
pub fn set_store_gauges(
    kinds: &[&'static str],
    active_by_kind: &[(String, i64)],
    reaper_lag_seconds: f64,
) {
    for kind in kinds {
        let n = active_by_kind
            .iter()
            .find(|(k, _)| k == kind)
            .map_or(0, |(_, n)| *n);
        METRICS
            .active_grants
            .get_or_create(&KindLabels { kind: s(kind) })
            .set(n);
    }
    METRICS.reaper_lag_seconds.set(reaper_lag_seconds);
}

/// The store could not be asked; the gauges keep their last values.
pub fn store_gauges_failed() {
    METRICS.store_gauge_errors.inc();
}

/// Record one provider call: `op` is `mint` or `revoke`.
pub fn provider_op(kind: &str, op: &str, ok: bool, started: Instant) {
    METRICS
        .provider_seconds
        .get_or_create(&ProviderLabels {
            kind: s(kind),
            op: s(op),
            result: s(if ok { "success" } else { "failure" }),
        })
        .observe(started.elapsed().as_secs_f64());
}

/// A store write carrying audit events failed.
pub fn audit_write_failed() {
    METRICS.audit_write_failures.inc();
}

/// Whether an operator freeze is in force (read from the store on scrape).
pub fn set_freeze_active(active: bool) {
    METRICS.freeze_active.set(i64::from(active));
}

/// Count one scheduled audit checkpoint by result.
pub fn audit_checkpoint(result: &str) {
    METRICS
        .audit_checkpoints
        .get_or_create(&ResultLabels { result: s(result) })
        .inc();
}

/// Every metric in OpenMetrics text.
pub fn render() -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoding error would be a bug in a label type.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &METRICS.registry) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    out
}

#[cfg(test)]
mod tests {
    //! The registry is process-wide and tests run in parallel: each test uses label values no
    //! other test records, and reads its own series back from the rendered text.
    use super::*;

    fn series(text: &str, prefix: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn exchanges_are_counted_by_label() {
        exchange("deny", "test_only_reason", "api_token");
        exchange("deny", "test_only_reason", "api_token");
        let text = render();
        assert_eq!(
            series(
                &text,
                r#"broker_exchanges_total{outcome="deny",reason="test_only_reason",kind="api_token"}"#
            ),
            Some(2.0),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "OpenMetrics terminator");
    }

    #[test]
    fn stages_land_in_histograms() {
        let v = timed_sync(Stage::Policy, || 41 + 1);
        assert_eq!(v, 42);
        let text = render();
        let count = series(
            &text,
            r#"broker_exchange_stage_seconds_count{stage="policy"}"#,
        )
        .unwrap_or(0.0);
        assert!(count >= 1.0, "{text}");
        assert!(text.contains("# TYPE broker_exchange_stage_seconds histogram"));
    }

    #[test]
    fn bundle_info_names_only_the_bundle_in_force() {
        policy_loaded("sha256:first-test-digest");
        policy_loaded("sha256:second-test-digest");
        let text = render();
        assert!(text.contains(r#"broker_policy_bundle{digest="sha256:second-test-digest"} 1"#));
        assert!(!text.contains("first-test-digest"), "{text}");
    }

    #[test]
    fn store_gauges_zero_missing_kinds() {
        set_store_gauges(
            &["api_token", "postgres", "aws_sts"],
            &[("api_token".into(), 7)],
            2.5,
        );
        let text = render();
        assert_eq!(
            series(&text, r#"broker_active_grants{kind="api_token"}"#),
            Some(7.0)
        );
        assert_eq!(
            series(&text, r#"broker_active_grants{kind="postgres"}"#),
            Some(0.0),
            "{text}"
        );
        assert_eq!(series(&text, "broker_reaper_lag_seconds "), Some(2.5));
    }

    #[test]
    fn revocations_and_retries() {
        revocation("test_cause", false, false);
        revocation("test_cause", true, true);
        let text = render();
        assert_eq!(
            series(
                &text,
                r#"broker_revocations_total{cause="test_cause",result="failure"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            series(
                &text,
                r#"broker_revocations_total{cause="test_cause",result="success"}"#
            ),
            Some(1.0)
        );
        assert!(series(&text, "broker_revocation_retries_total").unwrap_or(0.0) >= 1.0);
    }

    /// The alerting rules and the dashboard in `deploy/` name only metrics the broker exports
    /// (a renamed metric would leave an alert that can never fire).
    #[test]
    fn deploy_rules_and_dashboard_name_exported_metrics() {
        // A registry of its own with one series in every family (an empty family is not
        // rendered), so other tests' series do not matter.
        let m = Metrics::new();
        let l = || s("x");
        m.exchanges
            .get_or_create(&ExchangeLabels {
                outcome: l(),
                reason: l(),
                kind: l(),
            })
            .inc();
        m.stage_seconds
            .get_or_create(&StageLabels { stage: l() })
            .observe(1.0);
        m.active_grants
            .get_or_create(&KindLabels { kind: l() })
            .set(1);
        m.revocations
            .get_or_create(&RevocationLabels {
                cause: l(),
                result: l(),
            })
            .inc();
        m.jwks_fetches
            .get_or_create(&ResultLabels { result: l() })
            .inc();
        m.policy_reloads
            .get_or_create(&ResultLabels { result: l() })
            .inc();
        m.audit_checkpoints
            .get_or_create(&ResultLabels { result: l() })
            .inc();
        m.policy_bundle
            .get_or_create(&DigestLabels { digest: l() })
            .set(1);
        m.refusals
            .get_or_create(&RefusalLabels {
                action: l(),
                reason: l(),
                audit: l(),
            })
            .inc();
        m.provider_seconds
            .get_or_create(&ProviderLabels {
                kind: l(),
                op: l(),
                result: l(),
            })
            .observe(1.0);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry).unwrap();
        let families: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        let deploy = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/");
        let mut named = 0;
        for file in [
            "prometheus/broker-rules.yaml",
            "prometheus/broker-rules.test.yaml",
            "grafana/broker-dashboard.json",
        ] {
            let body = std::fs::read_to_string(format!("{deploy}{file}")).unwrap();
            let mut rest = body.as_str();
            while let Some(i) = rest.find("broker_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                // `broker_rules`-style words in prose are not metric names.
                if !rest.starts_with(['{', ')', '[', ' ', '\'', '"']) || name == "broker_audit" {
                    continue;
                }
                let family = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                assert!(
                    families.contains(&family),
                    "{file} names {name}, which the broker does not export"
                );
                named += 1;
            }
        }
        assert!(named > 20, "only {named} metric names found in deploy/");
    }
}
