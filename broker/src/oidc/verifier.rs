//! The verifier: turns a bearer string into [`VerifiedClaims`] or a [`VerifyError`].
//!
//! Order of checks (each step only runs if the previous passed):
//! 1. size limit (before any decoding);
//! 2. untrusted split/decode of header and payload ([`super::unverified`]);
//! 3. `iss` must equal a configured issuer URL byte for byte, else `unknown_issuer`, and this
//!    happens before any network activity, so `iss` cannot steer requests (no SSRF);
//! 4. `alg` must be pinned for that issuer (`none`/HS* can never be pinned);
//! 5. key by `kid` from that issuer's cached key set; header `jku`/`x5u`/`jwk`/`x5c` are never
//!    read; an unknown `kid` causes at most one refetch per cooldown window per issuer;
//! 6. signature (jsonwebtoken, with exact `iss` and our audience as defence in depth);
//! 7. audience (string or list) contains ours;
//! 8. `exp`/`nbf`/`iat` against the injected clock with the issuer's leeway (jsonwebtoken's own
//!    time checks are off: they read the system clock); `iat` no older than `max_token_age`;
//! 9. required claims `sub`, `exp`, `iat`, and `jti` for single-use issuers.
//!
//! Key cache: per issuer, one fetch at a time (single flight through an async mutex). After any
//! fetch attempt no further fetch happens until that attempt's window has passed: this one
//! per-issuer timestamp is the negative cache, so a flood of random `kid`s (or of any tokens
//! while the issuer is down) costs at most one request per window and holds no per-`kid`
//! memory. The window after a successful fetch is the unknown-`kid` cooldown (60 s); after a
//! failed one it is a capped exponential backoff (1 s, 2 s, 4 s, then every 4 s), so an issuer
//! that was unreachable is used again within seconds of its return instead of a minute later.
//! The owner calls [`Verifier::refresh_all`] every [`Verifier::refresh_tick`] (1 s), which
//! retries a failed issuer as soon as its window allows even when no token arrives. If the
//! issuer is down, cached keys keep verifying for up to `max_stale`; after that the issuer's
//! tokens fail with `issuer_unavailable` (the keys may have been revoked meanwhile).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use jsonwebtoken::{Algorithm, Validation};
use serde::Serialize;
use serde_json::{Map, Value};
use time::{Duration, OffsetDateTime};

use super::config::{DEFAULT_MAX_TOKEN_BYTES, IssuerConfig, parse_allowed_algorithm};
use super::fetch::Fetcher;
use super::jwks::{KeySet, VerifyKey};
use super::{Platform, VerifiedClaims, VerifyConfigError, VerifyError, unverified};
use crate::time::SharedClock;

/// Tuning of the key cache and of HTTP. `Default` gives the documented defaults.
#[derive(Debug, Clone)]
pub struct VerifierOptions {
    /// How old a key set may get before [`Verifier::refresh_all`] fetches it again. Default 10m.
    pub refresh_interval: Duration,
    /// Minimum time between fetches triggered by unknown `kid`s after a successful fetch.
    /// Default 60s. Trade-off: a token signed with a brand-new key that arrives within
    /// this window after any fetch is refused as `unknown_key`; GitHub and GitLab publish new
    /// keys well before signing with them, so in practice the periodic refresh has them.
    pub unknown_kid_cooldown: Duration,
    /// Connect and total timeout of each HTTP request. Default 5s.
    pub http_timeout: Duration,
    /// Largest discovery or JWKS body accepted. Default 256 KiB.
    pub max_response_bytes: usize,
    /// How long cached keys keep verifying while the issuer cannot be reached. Default 24h.
    pub max_stale: Duration,
    /// Wait after the first failed fetch before the next attempt; it doubles with each further
    /// failure up to [`Self::retry_backoff_max`]. Default 1s.
    pub retry_backoff_initial: Duration,
    /// Longest wait between attempts while fetches keep failing. Default 4s: at most one
    /// request per issuer every 4 s per replica while it is down, and service resumes within
    /// about that long (plus one refresh tick) after it returns.
    pub retry_backoff_max: Duration,
}

impl Default for VerifierOptions {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::minutes(10),
            unknown_kid_cooldown: Duration::seconds(60),
            http_timeout: Duration::seconds(5),
            max_response_bytes: 256 * 1024,
            max_stale: Duration::hours(24),
            retry_backoff_initial: Duration::seconds(1),
            retry_backoff_max: Duration::seconds(4),
        }
    }
}

/// Key-cache state of one issuer, for `/healthz` and metrics. Contains nothing secret.
#[derive(Debug, Clone, Serialize)]
pub struct IssuerHealth {
    pub name: String,
    pub issuer: String,
    /// Keys currently usable for verification (0 if never fetched or too stale).
    pub keys_loaded: usize,
    /// Keys come from a file or from code and are never fetched.
    pub static_keys: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_refresh: Option<OffsetDateTime>,
    /// Short reason code of the last failed fetch, cleared by a successful one.
    pub last_error: Option<String>,
}

enum KeySource {
    /// From `static_jwks_file` or inline JWKS: loaded once, never fetched, never stale.
    Fixed,
    /// Fetched; `jwks_url` set means discovery is skipped.
    Remote { jwks_url: Option<String> },
}

#[derive(Default)]
struct KeyState {
    keys: Option<Arc<KeySet>>,
    fetched_at: Option<OffsetDateTime>,
    last_attempt: Option<OffsetDateTime>,
    last_error: Option<&'static str>,
    /// Fetches failed in a row since the last success; 0 = the last attempt succeeded (or none
    /// was made). Decides the retry window (see [`VerifierOptions::retry_backoff_initial`]).
    failures: u32,
}

struct Issuer {
    name: String,
    iss: String,
    platform: Platform,
    audience: String,
    algorithms: Vec<Algorithm>,
    single_use: bool,
    leeway: Duration,
    max_age: Duration,
    max_bytes: usize,
    allow_http: bool,
    source: KeySource,
    state: RwLock<KeyState>,
    fetch_lock: tokio::sync::Mutex<()>,
    fetches: AtomicU64,
}

/// Verifies CI job tokens against the configured issuers. `Send + Sync`; share it in an `Arc`.
pub struct Verifier {
    issuers: Vec<Issuer>,
    by_iss: HashMap<String, usize>,
    /// Largest per-issuer limit: the pre-decode cap, since the issuer is not known yet.
    max_token_bytes: usize,
    clock: SharedClock,
    opts: VerifierOptions,
    fetcher: Fetcher,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("issuers", &self.issuer_names())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Validate every issuer entry and load static keys. Performs no network I/O (see
    /// [`Self::warm_up`]).
    pub fn new(
        audience: String,
        issuers: Vec<IssuerConfig>,
        clock: SharedClock,
        opts: VerifierOptions,
    ) -> Result<Verifier, VerifyConfigError> {
        if audience.trim().is_empty() {
            return Err(VerifyConfigError::EmptyAudience);
        }
        let timeout = std::time::Duration::try_from(opts.http_timeout)
            .map_err(|_| VerifyConfigError::HttpClient("http_timeout out of range".into()))?;
        let fetcher = Fetcher::new(timeout, opts.max_response_bytes)
            .map_err(|e| VerifyConfigError::HttpClient(e.to_string()))?;
        let now = clock.now();
        let mut names = HashSet::new();
        let mut by_iss = HashMap::new();
        let mut built = Vec::with_capacity(issuers.len());
        for cfg in issuers {
            let problems = cfg.validate();
            let (Some(iss), Some(algorithms), true) = (
                cfg.issuer_url(),
                cfg.pinned_algorithms(),
                problems.is_empty(),
            ) else {
                return Err(VerifyConfigError::InvalidIssuer {
                    issuer: cfg.name.clone(),
                    problems,
                });
            };
            if !names.insert(cfg.name.clone()) {
                return Err(VerifyConfigError::DuplicateName(cfg.name));
            }
            if by_iss.insert(iss.clone(), built.len()).is_some() {
                return Err(VerifyConfigError::DuplicateUrl(iss));
            }
            let fixed = match (&cfg.static_jwks_file, &cfg.inline_jwks) {
                (Some(path), _) => {
                    let bytes = std::fs::read(path).map_err(|e| VerifyConfigError::StaticJwks {
                        issuer: cfg.name.clone(),
                        reason: format!("cannot read {}: {e}", path.display()),
                    })?;
                    Some(bytes)
                }
                (None, Some(inline)) => Some(inline.as_bytes().to_vec()),
                (None, None) => None,
            };
            let (source, state) = match fixed {
                Some(bytes) => {
                    let set =
                        KeySet::parse(&bytes).map_err(|reason| VerifyConfigError::StaticJwks {
                            issuer: cfg.name.clone(),
                            reason: reason.to_owned(),
                        })?;
                    let state = KeyState {
                        keys: Some(Arc::new(set)),
                        fetched_at: Some(now),
                        last_attempt: None,
                        last_error: None,
                        failures: 0,
                    };
                    (KeySource::Fixed, state)
                }
                None => (
                    KeySource::Remote {
                        jwks_url: cfg.effective_jwks_url(),
                    },
                    KeyState::default(),
                ),
            };
            built.push(Issuer {
                iss,
                platform: cfg.platform,
                audience: cfg.audience.clone().unwrap_or_else(|| audience.clone()),
                algorithms,
                single_use: cfg.single_use,
                leeway: cfg.leeway,
                max_age: cfg.effective_max_token_age(),
                max_bytes: cfg.max_token_bytes,
                allow_http: cfg.danger_allow_insecure_http,
                source,
                state: RwLock::new(state),
                fetch_lock: tokio::sync::Mutex::new(()),
                fetches: AtomicU64::new(0),
                name: cfg.name,
            });
        }
        // With no issuers every token is `unknown_issuer`; keep a sane pre-decode cap anyway.
        let max_token_bytes = built
            .iter()
            .map(|i| i.max_bytes)
            .max()
            .unwrap_or(DEFAULT_MAX_TOKEN_BYTES);
        Ok(Verifier {
            issuers: built,
            by_iss,
            max_token_bytes,
            clock,
            opts,
            fetcher,
        })
    }

    /// Verify a job token. The token itself never appears in the error.
    pub async fn verify(&self, token: &str) -> Result<VerifiedClaims, VerifyError> {
        if token.len() > self.max_token_bytes {
            return Err(VerifyError::TokenTooLarge);
        }
        let peek = unverified::peek(token)?;
        // Exact match against configuration before anything else: no normalisation, no
        // network. A look-alike or trailing-slash `iss` simply is not in the map.
        let is = peek
            .iss
            .as_deref()
            .and_then(|iss| self.by_iss.get(iss))
            .and_then(|i| self.issuers.get(*i))
            .ok_or(VerifyError::UnknownIssuer)?;
        if token.len() > is.max_bytes {
            return Err(VerifyError::TokenTooLarge);
        }
        let alg = parse_allowed_algorithm(&peek.alg)
            .filter(|a| is.algorithms.contains(a))
            .ok_or(VerifyError::UnsupportedAlgorithm)?;
        let key = self.key_for(is, peek.kid.as_deref()).await?;
        if !key.accepts(alg) {
            return Err(VerifyError::UnsupportedAlgorithm);
        }

        let mut v = Validation::new(alg);
        v.validate_exp = false; // reads the system clock; we check times below with ours
        v.validate_nbf = false;
        v.leeway = 0;
        v.required_spec_claims = HashSet::new();
        v.set_issuer(&[is.iss.as_str()]);
        v.set_audience(&[is.audience.as_str()]);
        v.validate_aud = true;
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &v)
            .map_err(map_jwt_error)?;
        let claims = data.claims;

        // From here on the payload is authentic; check its meaning.
        if claims.get("iss").and_then(Value::as_str) != Some(is.iss.as_str()) {
            return Err(VerifyError::UnknownIssuer);
        }
        check_audience(&claims, &is.audience)?;

        let now = self.clock.now().unix_timestamp();
        let leeway = is.leeway.whole_seconds();
        let exp = unix_claim(&claims, "exp")?.ok_or(VerifyError::MissingClaim("exp"))?;
        let iat = unix_claim(&claims, "iat")?.ok_or(VerifyError::MissingClaim("iat"))?;
        let nbf = unix_claim(&claims, "nbf")?;
        if now > exp.saturating_add(leeway) {
            return Err(VerifyError::TokenExpired);
        }
        if nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
            return Err(VerifyError::TokenNotYetValid);
        }
        if iat > now.saturating_add(leeway) {
            return Err(VerifyError::TokenNotYetValid);
        }
        if now.saturating_sub(iat) > is.max_age.whole_seconds().saturating_add(leeway) {
            return Err(VerifyError::TokenTooOld);
        }

        let sub = match claims.get("sub") {
            None => return Err(VerifyError::MissingClaim("sub")),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(_) => return Err(VerifyError::InvalidClaim("sub")),
        };
        let jti = match claims.get("jti") {
            None => None,
            Some(Value::String(s)) if !s.is_empty() && s.len() <= 256 => Some(s.clone()),
            Some(_) => return Err(VerifyError::InvalidClaim("jti")),
        };
        if is.single_use && jti.is_none() {
            return Err(VerifyError::MissingClaim("jti"));
        }
        let ts = |secs: i64, name: &'static str| {
            OffsetDateTime::from_unix_timestamp(secs).map_err(|_| VerifyError::InvalidClaim(name))
        };
        Ok(VerifiedClaims {
            issuer: is.name.clone(),
            platform: is.platform,
            iss: is.iss.clone(),
            sub,
            jti,
            exp: ts(exp, "exp")?,
            iat: Some(ts(iat, "iat")?),
            single_use: is.single_use,
            replay_until: ts(exp.saturating_add(leeway), "exp")?,
            claims,
        })
    }

    /// Refresh every fetched issuer whose keys are older than the refresh interval (or missing),
    /// skipping issuers inside the retry cooldown. Meant for a periodic task; cheap to call often.
    pub async fn refresh_all(&self) {
        // Issuers are refreshed concurrently so one slow issuer cannot delay the others.
        let due = self
            .issuers
            .iter()
            .filter(|is| matches!(is.source, KeySource::Remote { .. }))
            .map(|is| async move {
                let _g = is.fetch_lock.lock().await;
                let now = self.clock.now();
                let due = read(&is.state)
                    .fetched_at
                    .is_none_or(|t| now - t >= self.opts.refresh_interval);
                if due && !self.in_cooldown(is, now) {
                    self.refresh_locked(is).await;
                }
            });
        futures::future::join_all(due).await;
    }

    /// Best-effort initial fetch of every issuer's keys; failures are recorded in
    /// [`Self::health`] and retried on demand.
    pub async fn warm_up(&self) {
        self.refresh_all().await;
    }

    /// How often the owner should call [`Self::refresh_all`].
    pub fn refresh_interval(&self) -> Duration {
        self.opts.refresh_interval
    }

    /// How often the owner should tick [`Self::refresh_all`] so a failed issuer is retried as
    /// soon as its backoff window ends: the shorter of the first backoff step and the refresh
    /// interval, at least 100 ms. Each tick costs nothing for an issuer that is not due.
    pub fn refresh_tick(&self) -> Duration {
        self.opts
            .retry_backoff_initial
            .min(self.opts.refresh_interval)
            .max(Duration::milliseconds(100))
    }

    pub fn health(&self) -> Vec<IssuerHealth> {
        let now = self.clock.now();
        self.issuers
            .iter()
            .map(|is| {
                let st = read(&is.state);
                IssuerHealth {
                    name: is.name.clone(),
                    issuer: is.iss.clone(),
                    keys_loaded: self.usable(is, &st, now).map_or(0, |k| k.len()),
                    static_keys: matches!(is.source, KeySource::Fixed),
                    last_refresh: st.fetched_at,
                    last_error: st.last_error.map(str::to_owned),
                }
            })
            .collect()
    }

    pub fn issuer_names(&self) -> Vec<String> {
        self.issuers.iter().map(|i| i.name.clone()).collect()
    }

    /// Network key fetches (discovery + JWKS rounds) attempted for an issuer; 0 if unknown.
    pub fn jwks_fetch_count(&self, issuer: &str) -> u64 {
        self.issuers
            .iter()
            .find(|i| i.name == issuer)
            .map_or(0, |i| i.fetches.load(Ordering::Relaxed))
    }

    fn usable(&self, is: &Issuer, st: &KeyState, now: OffsetDateTime) -> Option<Arc<KeySet>> {
        let keys = st.keys.as_ref()?;
        match is.source {
            KeySource::Fixed => Some(keys.clone()),
            KeySource::Remote { .. } => st
                .fetched_at
                .filter(|t| now - *t <= self.opts.max_stale)
                .map(|_| keys.clone()),
        }
    }

    fn cached_key(&self, is: &Issuer, kid: Option<&str>, now: OffsetDateTime) -> Option<VerifyKey> {
        let st = read(&is.state);
        self.usable(is, &st, now)?.find(kid).cloned()
    }

    fn in_cooldown(&self, is: &Issuer, now: OffsetDateTime) -> bool {
        let st = read(&is.state);
        let window = retry_window(&self.opts, st.failures);
        st.last_attempt.is_some_and(|t| now - t < window)
    }

    /// The error for a key we could not find: unknown key if we hold usable keys, else the
    /// issuer is unavailable (never fetched successfully, or everything is too stale).
    fn miss(&self, is: &Issuer, now: OffsetDateTime) -> VerifyError {
        let st = read(&is.state);
        if self.usable(is, &st, now).is_some() {
            VerifyError::UnknownKey
        } else {
            VerifyError::IssuerUnavailable
        }
    }

    async fn key_for(&self, is: &Issuer, kid: Option<&str>) -> Result<VerifyKey, VerifyError> {
        let now = self.clock.now();
        if let Some(k) = self.cached_key(is, kid, now) {
            return Ok(k);
        }
        if matches!(is.source, KeySource::Fixed) {
            return Err(VerifyError::UnknownKey);
        }
        // Fast path for floods: inside the cooldown, answer without queueing on the lock.
        if self.in_cooldown(is, now) {
            return Err(self.miss(is, now));
        }
        let _flight = is.fetch_lock.lock().await;
        // Whoever held the lock before us may have fetched what we need, or used up the window.
        let now = self.clock.now();
        if let Some(k) = self.cached_key(is, kid, now) {
            return Ok(k);
        }
        if self.in_cooldown(is, now) {
            return Err(self.miss(is, now));
        }
        self.refresh_locked(is).await;
        let now = self.clock.now();
        self.cached_key(is, kid, now)
            .ok_or_else(|| self.miss(is, now))
    }

    /// Fetch keys; caller holds `is.fetch_lock`. On failure the previous keys stay.
    async fn refresh_locked(&self, is: &Issuer) {
        let KeySource::Remote { jwks_url } = &is.source else {
            return;
        };
        is.fetches.fetch_add(1, Ordering::Relaxed);
        let result = async {
            let url = match jwks_url {
                Some(u) => u.clone(),
                None => self.fetcher.discover(&is.iss, is.allow_http).await?,
            };
            self.fetcher.jwks(&url).await
        }
        .await;
        let now = self.clock.now();
        let mut st = is.state.write().unwrap_or_else(|e| e.into_inner());
        st.last_attempt = Some(now);
        match result {
            Ok(set) => {
                if st.failures > 0 {
                    tracing::info!(issuer = %is.name, keys = set.len(), failed_attempts = st.failures, "issuer reachable again; keys refreshed");
                } else {
                    tracing::debug!(issuer = %is.name, keys = set.len(), "issuer keys refreshed");
                }
                st.keys = Some(Arc::new(set));
                st.fetched_at = Some(now);
                st.last_error = None;
                st.failures = 0;
            }
            Err(e) => {
                st.failures = st.failures.saturating_add(1);
                let retry_in = retry_window(&self.opts, st.failures).whole_milliseconds();
                tracing::warn!(issuer = %is.name, reason = e.code, failed_attempts = st.failures, retry_in_ms = retry_in as u64, "issuer key fetch failed; keeping cached keys");
                st.last_error = Some(e.code);
            }
        }
    }
}

/// How long after an attempt the next one may start: the unknown-`kid` cooldown after a
/// success, else `initial · 2^(failures-1)` capped at the maximum (1 s, 2 s, 4 s, 4 s, ...).
fn retry_window(opts: &VerifierOptions, failures: u32) -> Duration {
    if failures == 0 {
        return opts.unknown_kid_cooldown;
    }
    let factor = 1i32 << failures.saturating_sub(1).min(16);
    opts.retry_backoff_initial
        .saturating_mul(factor)
        .min(opts.retry_backoff_max)
}

fn read(l: &RwLock<KeyState>) -> std::sync::RwLockReadGuard<'_, KeyState> {
    // A poisoned lock only means a panic elsewhere mid-update of plain data; the state is
    // still a valid (old or new) snapshot.
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn check_audience(claims: &Map<String, Value>, ours: &str) -> Result<(), VerifyError> {
    let ok = match claims.get("aud") {
        Some(Value::String(a)) => a == ours,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(ours)),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(VerifyError::BadAudience)
    }
}

/// A NumericDate claim as whole seconds. Non-integers are refused (GitHub and GitLab send
/// integers; accepting floats would only add rounding questions).
fn unix_claim(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, VerifyError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n.as_i64().map(Some).ok_or(VerifyError::InvalidClaim(name)),
        Some(_) => Err(VerifyError::InvalidClaim(name)),
    }
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> VerifyError {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::InvalidSignature | K::InvalidRsaKey(_) | K::InvalidEcdsaKey | K::InvalidKeyFormat => {
            VerifyError::BadSignature
        }
        K::InvalidAudience => VerifyError::BadAudience,
        K::InvalidIssuer => VerifyError::UnknownIssuer,
        K::InvalidAlgorithm | K::UnsupportedAlgorithm | K::MissingAlgorithm => {
            VerifyError::UnsupportedAlgorithm
        }
        K::InvalidClaimFormat(_) => VerifyError::InvalidClaim("registered claim"),
        K::ExpiredSignature => VerifyError::TokenExpired,
        K::ImmatureSignature => VerifyError::TokenNotYetValid,
        _ => VerifyError::MalformedToken("undecodable token"),
    }
}

#[cfg(test)]
mod tests;
