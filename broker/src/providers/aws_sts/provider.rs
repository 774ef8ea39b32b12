// Long on purpose (~735 lines): the SDK clients, mint and the deny-policy revoke (with its retries on concurrent edits) are one unit; the pure parts are in naming.rs, session_policy.rs and deny.rs, tests in provider/tests.rs.
//! The AWS STS provider: `AssumeRole` per credential; revoke by denying the session on the role.
//!
//! The broker's own identity comes from the SDK's standard credential chain (env, profile, web
//! identity / IRSA, instance metadata). Every call has bounded time (connect and per-attempt
//! timeouts) and the SDK's standard retry (3 attempts, exponential backoff with jitter, on
//! throttling, 5xx and network errors); what still fails is `target_unavailable`.
//!
//! Mint: render the session policy and tags (a bad claim fails here, before any call), then
//! `AssumeRole` with `RoleSessionName` = `SourceIdentity` = `<job>.<resource id>`, session tags,
//! `DurationSeconds` = the grant's TTL clamped to [900 s, the role's maximum]. The expiry
//! reported is the one AWS returned, never an earlier one.
//!
//! Revoke: STS sessions cannot be deleted, so the session is denied on its role: the deny policy
//! (`deny.rs`) is read, pruned, extended and written back with `PutRolePolicy`, then read back
//! to check the deny is there (a concurrent writer may have overwritten it: then it is written
//! again). Writes to one role are serialised within this process.

use super::config::AwsTargetConfig;
use super::deny::{DENY_POLICY_NAME, DenyDocument, DenyError};
use super::naming;
use crate::oidc::JobAttribution;
use crate::providers::{
    CredentialDef, CredentialKind, CredentialSpec, DefinitionError, Field, IssuedCredential,
    MintRequest, Minted, Provider, ProviderError, ReplicaLock, RevokeAllReport,
};
use crate::secret::Sensitive;
use crate::time::SharedClock;
use async_trait::async_trait;
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

/// AWS's shortest session.
pub const MIN_SESSION_SECONDS: i64 = 900;
/// Attempts per AWS call (the first plus retries).
const MAX_ATTEMPTS: u32 = 3;
/// How often revoke re-writes the deny when a concurrent writer overwrote it.
const WRITE_ROUNDS: usize = 3;
/// How long the provider remembers that a mint failed before STS issued anything.
const NEVER_ISSUED_TTL: std::time::Duration = std::time::Duration::from_secs(600);

/// Errors building the provider from config (startup).
#[derive(Debug, thiserror::Error)]
pub enum AwsConfigError {
    #[error("credential {credential:?} names aws target {target:?}, which is not configured")]
    UnknownTarget { credential: String, target: String },
}

impl AwsConfigError {
    pub fn reason_code(&self) -> &'static str {
        match self {
            AwsConfigError::UnknownTarget { .. } => "unknown_target",
        }
    }
}

struct Target {
    name: String,
    region: String,
    endpoint: Option<String>,
    max_session: Duration,
    sts: aws_sdk_sts::Client,
    iam: aws_sdk_iam::Client,
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// The AWS STS credential provider.
pub struct AwsStsProvider {
    targets: BTreeMap<String, Arc<Target>>,
    clock: SharedClock,
    /// (target, role ARN) of every brokered role known to this process: from the policies at
    /// startup and from every mint since. Revoke-all covers these.
    roles: Mutex<BTreeSet<(String, String)>>,
    /// One lock per role ARN: read-modify-write of its deny policy is serialised here.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Resource ids whose AssumeRole was refused or never reached AWS: the undo that follows
    /// in this process has nothing to deny.
    never_issued: moka::future::Cache<String, ()>,
    /// The lock that serialises deny-policy writes across replicas (none: this process only).
    replica_lock: Option<Arc<dyn ReplicaLock>>,
}

impl fmt::Debug for AwsStsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsStsProvider")
            .field("targets", &self.targets.values().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Whether an error chain contains a refused connection (the request never reached AWS).
fn connection_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Error codes AWS uses for "try again later".
fn transient_code(code: &str) -> bool {
    matches!(
        code,
        "Throttling"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "TooManyRequestsException"
            | "ServiceUnavailable"
            | "ServiceFailure"
            | "InternalFailure"
            | "InternalError"
            | "RequestTimeout"
            | "IDPCommunicationError"
    )
}

/// Classify an SDK error without echoing request contents. Returns the error and whether the
/// request certainly issued nothing.
fn classify<E, R>(what: &str, e: &SdkError<E, R>) -> (ProviderError, bool)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug + 'static,
{
    match e {
        SdkError::ServiceError(ctx) => {
            let code = ctx.err().code().unwrap_or("unknown").to_owned();
            let err = if transient_code(&code) {
                ProviderError::TargetUnavailable(format!("{what}: AWS answered {code}"))
            } else if code == "PackedPolicyTooLarge" {
                ProviderError::Misconfigured(format!(
                    "{what}: AWS answered {code} (session policy and tags too large once packed)"
                ))
            } else {
                ProviderError::Misconfigured(format!("{what}: AWS answered {code}"))
            };
            (err, true)
        }
        SdkError::TimeoutError(_) => (
            ProviderError::TargetUnavailable(format!("{what}: timed out")),
            false,
        ),
        SdkError::DispatchFailure(d) => {
            let refused = connection_refused(e);
            let detail = if refused {
                "connection refused"
            } else if d.is_timeout() {
                "connection timed out"
            } else if d.is_io() {
                "network error"
            } else {
                "request not sent"
            };
            (
                ProviderError::TargetUnavailable(format!("{what}: {detail}")),
                refused,
            )
        }
        SdkError::ResponseError(_) => (
            ProviderError::TargetUnavailable(format!("{what}: unreadable response")),
            false,
        ),
        SdkError::ConstructionFailure(_) => (
            ProviderError::Misconfigured(format!(
                "{what}: request could not be built (are the broker's AWS credentials set?)"
            )),
            true,
        ),
        _ => (ProviderError::Internal(format!("{what}: SDK error")), false),
    }
}

fn is_no_such_entity<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    matches!(e, SdkError::ServiceError(ctx) if ctx.err().code() == Some("NoSuchEntity"))
}

/// `DurationSeconds` for a grant of `ttl`: AWS's 900 s floor, the role's maximum as ceiling.
pub fn session_seconds(ttl: Duration, max_session: Duration) -> i32 {
    let secs = ttl.whole_seconds().clamp(
        MIN_SESSION_SECONDS,
        max_session.whole_seconds().max(MIN_SESSION_SECONDS),
    );
    i32::try_from(secs).unwrap_or(i32::MAX)
}

fn rfc3339(t: OffsetDateTime) -> Result<String, ProviderError> {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .map_err(|_| ProviderError::Internal("cannot format a time".into()))
}

fn detail_str<'a>(c: &'a IssuedCredential, key: &str) -> Result<&'a str, ProviderError> {
    c.details.get(key).and_then(Value::as_str).ok_or_else(|| {
        ProviderError::Internal(format!(
            "credential {:?} has no {key} in its details",
            c.name
        ))
    })
}

fn role_name(arn: &str) -> Result<String, ProviderError> {
    super::spec::RoleArn::parse(arn)
        .map(|r| r.role_name().to_owned())
        .map_err(|_| ProviderError::Internal("recorded role ARN is not a role ARN".into()))
}

impl AwsStsProvider {
    /// Build from config. Credentials are resolved lazily by the SDK at the first call (a
    /// missing identity fails exchanges and shows in their audit, not the start).
    pub async fn new(targets: &BTreeMap<String, AwsTargetConfig>, clock: SharedClock) -> Self {
        Self::build(targets, clock, None).await
    }

    /// As [`AwsStsProvider::new`], with fixed credentials instead of the chain (tests).
    pub async fn with_static_credentials(
        targets: &BTreeMap<String, AwsTargetConfig>,
        clock: SharedClock,
        access_key_id: &str,
        secret_access_key: &Sensitive,
    ) -> Self {
        let creds = aws_sdk_sts::config::Credentials::new(
            access_key_id,
            secret_access_key.expose(),
            None,
            None,
            "broker-static",
        );
        Self::build(targets, clock, Some(creds)).await
    }

    async fn build(
        targets: &BTreeMap<String, AwsTargetConfig>,
        clock: SharedClock,
        creds: Option<aws_sdk_sts::config::Credentials>,
    ) -> Self {
        let mut out = BTreeMap::new();
        for (name, t) in targets {
            let retry = aws_config::retry::RetryConfig::standard()
                .with_max_attempts(MAX_ATTEMPTS)
                .with_initial_backoff(std::time::Duration::from_millis(200))
                .with_max_backoff(std::time::Duration::from_secs(5));
            let timeouts = aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(std::time::Duration::from_secs(3))
                .operation_attempt_timeout(std::time::Duration::from_secs(10))
                .operation_timeout(std::time::Duration::from_secs(30))
                .build();
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .region(aws_config::Region::new(t.region.clone()))
                .retry_config(retry)
                .timeout_config(timeouts);
            if let Some(u) = &t.endpoint_url {
                loader = loader.endpoint_url(u.clone());
            }
            if let Some(c) = &creds {
                loader = loader.credentials_provider(c.clone());
            }
            let sdk = loader.load().await;
            out.insert(
                name.clone(),
                Arc::new(Target {
                    name: name.clone(),
                    region: t.region.clone(),
                    endpoint: t.endpoint_url.clone(),
                    max_session: t.role_max_session,
                    sts: aws_sdk_sts::Client::new(&sdk),
                    iam: aws_sdk_iam::Client::new(&sdk),
                }),
            );
        }
        Self {
            targets: out,
            clock,
            roles: Mutex::new(BTreeSet::new()),
            locks: Mutex::new(HashMap::new()),
            never_issued: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(NEVER_ISSUED_TTL)
                .build(),
            replica_lock: None,
        }
    }

    /// Serialise deny-policy writes across every replica through `lock`.
    pub fn with_replica_lock(mut self, lock: Arc<dyn ReplicaLock>) -> Self {
        self.replica_lock = Some(lock);
        self
    }

    /// Every `aws_sts` definition names a configured target (a typo fails the start, not a
    /// job); their roles are remembered for revoke-all.
    pub fn check_definitions(&self, defs: &[CredentialDef]) -> Result<(), AwsConfigError> {
        for d in defs {
            if let CredentialSpec::AwsSts(s) = &d.spec {
                if !self.targets.contains_key(&s.target) {
                    return Err(AwsConfigError::UnknownTarget {
                        credential: d.name.clone(),
                        target: s.target.clone(),
                    });
                }
                self.remember_role(&s.target, s.role_arn.as_str());
            }
        }
        Ok(())
    }

    fn remember_role(&self, target: &str, arn: &str) {
        self.roles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((target.to_owned(), arn.to_owned()));
    }

    /// Roles revoke-all covers, as (target, role ARN).
    pub fn known_roles(&self) -> Vec<(String, String)> {
        self.roles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    fn target(&self, name: &str) -> Result<&Arc<Target>, ProviderError> {
        self.targets.get(name).ok_or_else(|| {
            ProviderError::Misconfigured(format!("aws target {name:?} is not configured"))
        })
    }

    fn role_lock(&self, arn: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(arn.to_owned())
            .or_default()
            .clone()
    }

    /// The role's deny policy as stored (`None`: the role has none yet, or no longer exists).
    async fn read_deny(
        &self,
        t: &Target,
        role: &str,
    ) -> Result<Option<DenyDocument>, ProviderError> {
        match t
            .iam
            .get_role_policy()
            .role_name(role)
            .policy_name(DENY_POLICY_NAME)
            .send()
            .await
        {
            Ok(out) => DenyDocument::parse(out.policy_document())
                .map(Some)
                .map_err(deny_error),
            Err(e) if is_no_such_entity(&e) => Ok(None),
            Err(e) => Err(classify("reading the deny policy", &e).0),
        }
    }

    /// Read, change, write and check the deny policy of one role. `change` returns whether it
    /// changed the document; `check` whether the stored document has what this call needs.
    /// Returns what was written (`None`: nothing needed writing).
    async fn update_deny(
        &self,
        t: &Target,
        arn: &str,
        change: impl Fn(&mut DenyDocument) -> bool + Send + Sync,
        check: impl Fn(&DenyDocument) -> bool + Send + Sync,
    ) -> Result<Option<String>, ProviderError> {
        let role = role_name(arn)?;
        let lock = self.role_lock(arn);
        let _held = lock.lock().await;
        // Other replicas write the same policy: serialise through the replica lock.
        let Some(replica_lock) = &self.replica_lock else {
            return self.write_deny(t, &role, change, check).await;
        };
        let mut written = None;
        replica_lock
            .run_locked(
                &format!("aws-deny:{arn}"),
                Box::pin(async {
                    written = Some(self.write_deny(t, &role, change, check).await);
                }),
            )
            .await
            .map_err(|e| ProviderError::TargetUnavailable(format!("deny-policy lock: {e}")))?;
        written.unwrap_or_else(|| {
            Err(ProviderError::TargetUnavailable(
                "deny-policy lock: the write did not run".into(),
            ))
        })
    }

    /// The read-modify-write of a role's deny policy (the caller holds the locks).
    async fn write_deny(
        &self,
        t: &Target,
        role: &str,
        change: impl Fn(&mut DenyDocument) -> bool + Send + Sync,
        check: impl Fn(&DenyDocument) -> bool + Send + Sync,
    ) -> Result<Option<String>, ProviderError> {
        let role = role.to_owned();
        for _ in 0..WRITE_ROUNDS {
            let mut doc = self.read_deny(t, &role).await?.unwrap_or_default();
            let now = self.clock.now();
            let pruned = doc.prune(now, t.max_session);
            let changed = change(&mut doc);
            if !changed && !pruned {
                return Ok(None); // already denied
            }
            let text = doc.render().map_err(deny_error)?;
            match t
                .iam
                .put_role_policy()
                .role_name(&role)
                .policy_name(DENY_POLICY_NAME)
                .policy_document(&text)
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) if is_no_such_entity(&e) => {
                    // A deleted role has no session left that could act.
                    tracing::warn!(role = %role, "brokered role no longer exists; nothing to deny");
                    return Ok(None);
                }
                Err(e) => return Err(classify("writing the deny policy", &e).0),
            }
            match self.read_deny(t, &role).await? {
                Some(stored) if check(&stored) => return Ok(Some(text)),
                _ => {
                    tracing::warn!(role = %role, "deny policy was overwritten concurrently; writing again")
                }
            }
        }
        Err(ProviderError::TargetUnavailable(
            "the deny policy kept being overwritten concurrently".into(),
        ))
    }

    /// Deny every session of every known role issued before now. Each role is one write.
    pub async fn revoke_all_roles(&self) -> RevokeAllReport {
        let mut report = RevokeAllReport::default();
        for (target, arn) in self.known_roles() {
            // Whole seconds: that is what the document stores, and what the check compares.
            let now = self.clock.now();
            let before = now.replace_nanosecond(0).unwrap_or(now);
            let res = match self.target(&target) {
                Ok(t) => {
                    let t = t.clone();
                    self.update_deny(
                        &t,
                        &arn,
                        |d| d.revoke_all(before),
                        |d| d.revoke_all_before.is_some_and(|b| b >= before),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            let at = rfc3339(before).unwrap_or_default();
            match res {
                Ok(_) => {
                    report.revoked += 1;
                    report.details.push(format!(
                        "{arn}: {DENY_POLICY_NAME} denies sessions with aws:TokenIssueTime before {at}"
                    ));
                    tracing::info!(role = %arn, before = %at, policy = DENY_POLICY_NAME, "revoke-all written");
                }
                Err(e) => {
                    report.failed += 1;
                    report
                        .details
                        .push(format!("{arn}: failed ({})", e.reason_code()));
                    tracing::warn!(role = %arn, error = %e, "revoke-all failed");
                }
            }
        }
        report
    }
}

fn deny_error(e: DenyError) -> ProviderError {
    match e {
        // Full: retry later, when expired sessions have been pruned.
        DenyError::TooLarge(_) => ProviderError::TargetUnavailable(e.to_string()),
        DenyError::Unreadable => ProviderError::Misconfigured(e.to_string()),
    }
}

#[async_trait]
impl Provider for AwsStsProvider {
    fn check_definitions(&self, defs: &[CredentialDef]) -> Result<(), DefinitionError> {
        Ok(AwsStsProvider::check_definitions(self, defs)?)
    }

    fn kind(&self) -> CredentialKind {
        CredentialKind::AwsSts
    }

    fn resource_id(&self, grant_id: Uuid, credential: &CredentialDef) -> String {
        naming::resource_id(grant_id, &credential.name)
    }

    fn intent_details(&self, credential: &CredentialDef) -> Value {
        match &credential.spec {
            CredentialSpec::AwsSts(s) => json!({
                "target": s.target,
                "role_arn": s.role_arn.as_str(),
            }),
            _ => Value::Null,
        }
    }

    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, ProviderError> {
        let CredentialSpec::AwsSts(spec) = &req.credential.spec else {
            return Err(ProviderError::Misconfigured(
                "not an aws_sts credential".into(),
            ));
        };
        let target = self.target(&spec.target)?.clone();
        let rid = req.resource_id;
        if !naming::is_resource_id(rid) {
            return Err(ProviderError::Internal(
                "resource id is not an AWS session id".into(),
            ));
        }
        // Everything derived from claims is checked here, before any call.
        let job = JobAttribution::from_claims(req.claims);
        let session = naming::session_name(&job, rid);
        let policy = spec
            .session_policy
            .as_ref()
            .map(|p| p.render(req.claims))
            .transpose()
            .map_err(|e| match e.reason_code() {
                "invalid_claim_value" | "claim_missing" => {
                    ProviderError::InvalidClaim(e.to_string())
                }
                _ => ProviderError::Misconfigured(e.to_string()),
            })?;
        let tags = naming::session_tags(&job)
            .into_iter()
            .map(|(k, v)| {
                aws_sdk_sts::types::Tag::builder()
                    .key(k)
                    .value(v)
                    .build()
                    .map_err(|_| ProviderError::Internal("building a session tag".into()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let duration = session_seconds(req.expires_at - req.now, target.max_session);
        self.remember_role(&spec.target, spec.role_arn.as_str());

        let mut call = target
            .sts
            .assume_role()
            .role_arn(spec.role_arn.as_str())
            .role_session_name(&session)
            .source_identity(&session)
            .duration_seconds(duration)
            .set_tags(Some(tags));
        if let Some(p) = &policy {
            call = call.policy(p);
        }
        for arn in &spec.managed_policy_arns {
            call = call.policy_arns(
                aws_sdk_sts::types::PolicyDescriptorType::builder()
                    .arn(arn.as_str())
                    .build(),
            );
        }
        let out = match call.send().await {
            Ok(o) => o,
            Err(e) => {
                let (err, nothing_issued) = classify("AssumeRole", &e);
                if nothing_issued {
                    self.never_issued.insert(rid.to_owned(), ()).await;
                }
                return Err(err);
            }
        };
        let Some(creds) = out.credentials() else {
            // Nothing usable came back; the undo denies the session name anyway.
            return Err(ProviderError::TargetUnavailable(
                "AssumeRole: no credentials in the response".into(),
            ));
        };
        // The expiry AWS enforces (at least 900 s), never an earlier one.
        let fallback = req.now + Duration::seconds(i64::from(duration));
        let expires_at =
            OffsetDateTime::from_unix_timestamp(creds.expiration().secs()).unwrap_or(fallback);
        let expiration = rfc3339(expires_at)?;
        let region = spec.region.clone().unwrap_or_else(|| target.region.clone());
        let assumed = out
            .assumed_role_user()
            .map(|u| u.arn().to_owned())
            .unwrap_or_default();
        tracing::debug!(session = %session, role = %spec.role_arn.as_str(), duration, "aws session issued");
        Ok(Minted {
            fields: vec![
                (
                    "access_key_id".into(),
                    Field::Public(json!(creds.access_key_id())),
                ),
                (
                    "secret_access_key".into(),
                    Field::Secret(Sensitive::new(creds.secret_access_key())),
                ),
                (
                    "session_token".into(),
                    Field::Secret(Sensitive::new(creds.session_token())),
                ),
                ("expiration".into(), Field::Public(json!(expiration))),
                ("region".into(), Field::Public(json!(region))),
                // Not secret (it is in every ARN); tools and the clients' AWS_ACCOUNT_ID use it.
                (
                    "account_id".into(),
                    Field::Public(json!(spec.role_arn.account_id())),
                ),
            ],
            expires_at,
            details: json!({
                "target": spec.target,
                "role_arn": spec.role_arn.as_str(),
                "session_name": session,
                "source_identity": session,
                "assumed_role_arn": assumed,
                "duration_seconds": duration,
                "expires_at": expiration,
            }),
        })
    }

    fn revoke_description(&self, credential: &IssuedCredential) -> Option<String> {
        let arn = credential.details.get("role_arn").and_then(Value::as_str)?;
        Some(format!(
            "deny all actions for sessions whose aws:userid or sts:SourceIdentity ends in {} \
             (inline policy {DENY_POLICY_NAME} on {arn})",
            credential.resource_id
        ))
    }

    /// Read the role's deny policy back and check that it denies this session.
    async fn verify_revoked(
        &self,
        credential: &IssuedCredential,
    ) -> crate::providers::Verification {
        use crate::providers::Verification;
        let rid = credential.resource_id.as_str();
        let target = match detail_str(credential, "target").and_then(|t| self.target(t)) {
            Ok(t) => t.clone(),
            Err(_) => return Verification::Unverified("no configured target".into()),
        };
        let Ok(role) = detail_str(credential, "role_arn").and_then(role_name) else {
            return Verification::Unverified("no role ARN in the credential".into());
        };
        // The deny must hold until the session's expiry; a session never issued has nothing to
        // deny (the mint recorded no expiry and the revoke wrote nothing).
        let Some(until) = credential
            .details
            .get("expires_at")
            .and_then(Value::as_str)
            .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
        else {
            return Verification::NotApplicable;
        };
        match self.read_deny(&target, &role).await {
            Ok(Some(doc)) if doc.denies(rid, until) => Verification::Verified,
            Ok(_) => Verification::Unverified(
                "the deny policy read back does not cover the session".into(),
            ),
            Err(e) => {
                Verification::Unverified(format!("reading the deny policy: {}", e.reason_code()))
            }
        }
    }

    async fn revoke(&self, credential: &IssuedCredential) -> Result<(), ProviderError> {
        let rid = credential.resource_id.as_str();
        if self.never_issued.remove(rid).await.is_some() {
            return Ok(());
        }
        if !naming::is_resource_id(rid) {
            return Err(ProviderError::Internal(
                "resource id is not an AWS session id".into(),
            ));
        }
        let target = self.target(detail_str(credential, "target")?)?.clone();
        let arn = detail_str(credential, "role_arn")?.to_owned();
        // Until when the deny must hold: the session's real expiry when the mint finished;
        // otherwise (a crash between mint and finalise) the longest session the role allows.
        let until = credential
            .details
            .get("expires_at")
            .and_then(Value::as_str)
            .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
            .unwrap_or_else(|| self.clock.now() + target.max_session);
        let written = self
            .update_deny(
                &target,
                &arn,
                |d| d.deny_session(rid, until),
                |d| d.denies(rid, until),
            )
            .await?;
        match written {
            Some(doc) => tracing::info!(
                role = %arn,
                policy = DENY_POLICY_NAME,
                resource_id = %rid,
                until = %rfc3339(until).unwrap_or_default(),
                policy_chars = doc.len(),
                "aws session denied"
            ),
            None => tracing::debug!(role = %arn, resource_id = %rid, "aws session already denied"),
        }
        Ok(())
    }

    async fn revoke_all(&self) -> Result<RevokeAllReport, ProviderError> {
        Ok(self.revoke_all_roles().await)
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod session_duration_properties {
    use super::{MIN_SESSION_SECONDS, session_seconds};
    use proptest::prelude::*;
    use time::Duration;

    proptest! {
        /// `DurationSeconds` never exceeds the role's maximum session, never goes under AWS's
        /// floor, and equals the grant TTL whenever AWS can express it. (A grant shorter than
        /// the floor gets a 900 s session; its revocation is the deny policy, written at expiry.)
        #[test]
        fn session_never_exceeds_the_role_maximum(
            ttl in -10_000i64..200_000,
            max in MIN_SESSION_SECONDS..=43_200i64,
        ) {
            let s = i64::from(session_seconds(Duration::seconds(ttl), Duration::seconds(max)));
            prop_assert!(s <= max);
            prop_assert!(s >= MIN_SESSION_SECONDS);
            if (MIN_SESSION_SECONDS..=max).contains(&ttl) {
                prop_assert_eq!(s, ttl);
            }
        }
    }
}
