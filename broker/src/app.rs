//! Process wiring: build a [`Broker`] from config, serve HTTP, run the reaper and the issuer key
//! refresher, reload policies on SIGHUP, shut down gracefully. `anyhow` lives here (startup and
//! background tasks) and nowhere on a request path.

use crate::config::{Config, LogFormat};
use crate::http::{self, HttpLimits};
use crate::oidc::{Verifier, VerifierOptions};
use crate::policy::LoadOptions;
use crate::providers::api_token::{ApiTokenProvider, SigningKeys};
use crate::service::{Broker, BrokerParts};
use crate::store::Store;
use crate::time::{SharedClock, SystemClock};
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;

/// Install the tracing subscriber (text or JSON), without trace export (see
/// [`crate::telemetry::init`] for that).
pub fn init_logging(format: LogFormat, level: &str) {
    let off = crate::config::TelemetryConfig::default();
    // Without an endpoint there is no exporter to build, so this cannot fail.
    let _ = crate::telemetry::init(format, level, &off);
}

/// Build the broker from a validated config.
pub async fn build(cfg: &Config, clock: SharedClock) -> anyhow::Result<Arc<Broker>> {
    let url = cfg
        .store
        .url
        .resolve()
        .map_err(|e| anyhow::anyhow!("store.url: {e}"))?;
    let store = Store::connect(url.expose())
        .await
        .context("connecting to the store")?;
    store.migrate().await.context("applying store migrations")?;
    // The configured keys (active and retired), or an ephemeral one when none is configured.
    let keys = match cfg.api_tokens.signing_keys()? {
        Some(keys) => keys,
        None => {
            tracing::warn!(
                "api_tokens.signing_key not set: using an ephemeral key (tokens stop verifying on restart; do not run replicas like this)"
            );
            SigningKeys::ephemeral().context("generating an ephemeral signing key")?
        }
    };
    let api_tokens = Arc::new(ApiTokenProvider::new(
        Arc::new(keys),
        cfg.public_url.clone(),
    ));
    let verifier = Verifier::new(
        cfg.audience.clone(),
        cfg.issuers.clone(),
        clock.clone(),
        VerifierOptions::default(),
    )
    .map_err(|e| anyhow::anyhow!("issuers: {e}"))?;
    let verifier = Arc::new(verifier);
    verifier.warm_up().await;
    let policy_opts = LoadOptions {
        known_issuers: Some(cfg.issuers.iter().map(|i| i.name.clone()).collect()),
    };
    let mut extra_providers: Vec<Arc<dyn crate::providers::Provider>> = Vec::new();
    if !cfg.targets.postgres.is_empty() {
        let p = Arc::new(
            crate::providers::postgres::PostgresProvider::new(&cfg.targets.postgres)
                .map_err(|e| anyhow::anyhow!(e))?,
        );
        extra_providers.push(p);
    }
    if !cfg.targets.aws.is_empty() {
        let p = Arc::new(
            crate::providers::aws_sts::AwsStsProvider::new(&cfg.targets.aws, clock.clone())
                .await
                .with_replica_lock(Arc::new(crate::service::StoreLock(store.clone()))),
        );
        extra_providers.push(p);
    }
    let ssh_cas = if cfg.targets.ssh_ca.is_empty() {
        None
    } else {
        let p = Arc::new(
            crate::providers::ssh_cert::SshCertProvider::new(&cfg.targets.ssh_ca)
                .map_err(|e| anyhow::anyhow!(e))?,
        );
        extra_providers.push(p.clone());
        Some(p)
    };
    if !cfg.targets.github_app.is_empty() {
        let p = Arc::new(
            crate::providers::github_app::GithubAppProvider::new(&cfg.targets.github_app)
                .map_err(|e| anyhow::anyhow!(e))?,
        );
        extra_providers.push(p);
    }
    let mut broker = Broker::new(BrokerParts {
        verifier,
        store,
        clock: clock.clone(),
        api_tokens,
        extra_providers,
        policy_dir: cfg.policies.dir.clone(),
        policy_opts,
        grants: cfg.grants.clone(),
        reaper: cfg.reaper.clone(),
        max_credentials: cfg.limits.max_credentials_per_exchange,
        rate_per_minute: cfg.limits.exchanges_per_minute_per_repository,
    })
    .map_err(|e| anyhow::anyhow!(e))?;
    broker.set_operators(crate::admin::Operators::from_config_with_oidc(
        &cfg.operators,
        &cfg.issuers,
        &cfg.audience,
        clock,
    )?);
    broker.set_webhooks(crate::webhooks::Webhooks::from_config(
        &cfg.webhooks,
        &cfg.issuers,
    )?);
    broker.set_refusal_limits(&cfg.refusals);
    broker.set_leaks(crate::leaks::Leaks::from_config(&cfg.leaks)?);
    broker.set_ssh_cas(ssh_cas);
    Ok(Arc::new(broker))
}

/// Serve until SIGINT/SIGTERM. `on_ready` runs once the listener is bound (dev quickstart).
pub async fn serve(cfg: Config, on_ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let clock: SharedClock = Arc::new(SystemClock);
    let broker = build(&cfg, clock).await?;
    tracing::info!(digest = %broker.policy_status().digest, "policies loaded");
    let limits = HttpLimits {
        max_body_bytes: cfg.limits.max_body_bytes,
        request_timeout: std::time::Duration::try_from(cfg.limits.request_timeout)
            .unwrap_or(std::time::Duration::from_secs(15)),
        max_concurrency: cfg.limits.max_concurrency,
    };
    let metrics_token = match &cfg.metrics.token {
        Some(t) => Some(
            t.resolve()
                .map_err(|e| anyhow::anyhow!("metrics.token: {e}"))?,
        ),
        None => None,
    };
    let public_diagnostics = cfg.metrics.danger_public_diagnostics;
    let (app, admin_app) = http::routers(
        broker.clone(),
        &limits,
        cfg.admin_listen.is_some(),
        public_diagnostics,
    );
    // `/metrics` goes with the operator API on its own listener (reachable only from the
    // internal network); on the public listener only when explicitly opted in.
    let metrics = http::metrics_router(broker.clone(), metrics_token);
    let (app, admin_app) = match admin_app {
        Some(admin) if public_diagnostics => {
            (app.merge(metrics.clone()), Some(admin.merge(metrics)))
        }
        Some(admin) => (app, Some(admin.merge(metrics))),
        None if public_diagnostics => (app.merge(metrics), None),
        None => {
            tracing::warn!(
                "/metrics is not served: set admin_listen (or metrics.danger_public_diagnostics)"
            );
            (app, None)
        }
    };
    let secs = |d: time::Duration, dflt: u64| {
        std::time::Duration::try_from(d).unwrap_or(std::time::Duration::from_secs(dflt))
    };
    let conn_limits = http::ConnLimits {
        header_read_timeout: secs(cfg.limits.header_read_timeout, 10),
        idle_timeout: secs(cfg.limits.idle_timeout, 65),
        max_header_bytes: cfg.limits.max_header_bytes,
        max_connections: cfg
            .limits
            .max_connections
            .unwrap_or_else(http::default_max_connections),
    };
    tracing::info!(
        max_connections = conn_limits.max_connections,
        header_read_timeout_ms = conn_limits.header_read_timeout.as_millis() as u64,
        idle_timeout_ms = conn_limits.idle_timeout.as_millis() as u64,
        max_header_bytes = conn_limits.max_header_bytes,
        "connection limits"
    );
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("binding {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The operator API on its own address, stopped with everything else.
    let admin_server = match (cfg.admin_listen, admin_app) {
        (Some(a), Some(admin_app)) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding admin_listen {a}"))?;
            tracing::info!(addr = %l.local_addr()?, "operator API listening");
            let mut stop = stop_rx.clone();
            let limits = conn_limits.clone();
            Some(tokio::spawn(async move {
                http::serve(l, admin_app, limits, async move {
                    let _ = stop.changed().await;
                })
                .await
            }))
        }
        _ => None,
    };
    let reaper = tokio::spawn(broker.clone().run_reaper(stop_rx.clone()));
    // A checkpoint signed with an ephemeral key could never be checked after a restart.
    let mut schedule = cfg.audit.checkpoints.clone();
    if cfg.api_tokens.signing_key.is_none() && schedule.enabled() {
        tracing::warn!(
            "audit.checkpoints: no persistent api_tokens.signing_key, so no scheduled checkpoints"
        );
        schedule.every = time::Duration::ZERO;
    }
    let checkpoints = tokio::spawn(broker.clone().run_checkpoints(schedule, stop_rx.clone()));
    let refresher = tokio::spawn(refresh_keys(broker.clone(), stop_rx.clone()));
    let aggregates = tokio::spawn(flush_refusal_aggregates(broker.clone(), stop_rx.clone()));
    let reloader = tokio::spawn(reload_on_sighup(broker.clone(), stop_rx.clone()));
    let watcher = tokio::spawn(watch_policies(
        broker.clone(),
        cfg.policies.dir.clone(),
        cfg.policies.watch_interval,
        stop_rx.clone(),
    ));
    on_ready(addr);

    http::serve(listener, app, conn_limits, shutdown_signal()).await;
    let _ = stop_tx.send(true);
    let _ = tokio::join!(
        reaper,
        refresher,
        reloader,
        watcher,
        aggregates,
        checkpoints
    );
    if let Some(s) = admin_server {
        let _ = s.await;
    }
    // No listener is left, so no refusal can arrive after this: every pending aggregate
    // (open windows included) is written now.
    let n = broker.flush_refusal_aggregates(true).await;
    tracing::info!(written = n, "refusal aggregates written at shutdown");
    tracing::info!("stopped");
    Ok(())
}

/// Write the aggregate audit events of ended refusal windows every second (`serve` writes the
/// rest once every listener has stopped).
async fn flush_refusal_aggregates(b: Arc<Broker>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => { b.flush_refusal_aggregates(false).await; }
            _ = stop.changed() => break,
        }
    }
}

/// Ticks the key cache every `Verifier::refresh_tick` (1 s): an issuer whose keys are due, or
/// whose last fetch failed and whose backoff window has ended, is fetched; any other tick costs
/// a lock and a timestamp comparison per issuer.
async fn refresh_keys(b: Arc<Broker>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = std::time::Duration::try_from(b.verifier.refresh_tick())
        .unwrap_or(std::time::Duration::from_secs(1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => b.verifier.refresh_all().await,
            _ = stop.changed() => break,
        }
    }
}

/// Reload policies when the files under `dir` change (`policies.watch_interval`). A cheap
/// digest of what the loader would read is compared each round, so nothing is compiled until
/// something changed; a rejected bundle is not retried until the files change again (the
/// previous bundle stays in force, and `/readyz` shows the error).
async fn watch_policies(
    b: Arc<Broker>,
    dir: std::path::PathBuf,
    every: Option<time::Duration>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Some(every) = every.and_then(|d| std::time::Duration::try_from(d).ok()) else {
        let _ = stop.changed().await;
        return;
    };
    let fingerprint = |dir: std::path::PathBuf| async move {
        tokio::task::spawn_blocking(move || crate::policy::Bundle::dir_fingerprint(&dir))
            .await
            .unwrap_or_default()
    };
    let mut last = fingerprint(dir.clone()).await;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = fingerprint(dir.clone()).await;
                if now != last {
                    last = now;
                    tracing::info!(dir = %dir.display(), "policy files changed; reloading");
                    let _ = b.reload_policies();
                }
            }
            _ = stop.changed() => break,
        }
    }
}

#[cfg(unix)]
async fn reload_on_sighup(b: Arc<Broker>, mut stop: tokio::sync::watch::Receiver<bool>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot install SIGHUP handler; policy reload needs a restart");
        return;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => { let _ = b.reload_policies(); }
            _ = stop.changed() => break,
        }
    }
}

#[cfg(not(unix))]
async fn reload_on_sighup(_b: Arc<Broker>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.changed().await;
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down");
}
