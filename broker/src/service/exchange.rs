//! The life of one exchange (ARCHITECTURE.md, "The life of one exchange"): check the
//! request, verify the job token, decide, cap the TTL, commit the intent, mint, activate.
//! About 600 lines on purpose: the phases of one exchange read top to bottom in one file.

use super::ServiceError;
use super::exchange_record::{ExchangeOutcome, ExchangeRecord, PlannedGrant};
use super::ttl::effective_ttl;
use super::{Broker, RequestCtx};
use crate::audit::JobAttribution;
use crate::metrics::{self, Stage};
use crate::oidc::Platform;
use crate::oidc::VerifiedClaims;
use crate::policy::{Bundle, Decision, PolicyInput};
use crate::providers::{
    CredentialDef, CredentialKind, Field, IssuedCredential, MintRequest, Minted, ProviderError,
};
use crate::reason::ReasonCode;
use crate::secret::{Sensitive, sha256_hex};
use crate::secret_format::SecretKind;
use crate::store::{JtiRecord, NewGrant, StoreError};
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

/// `POST /v1/exchange` input.
#[derive(Debug)]
pub struct ExchangeRequest {
    pub token: Sensitive,
    pub credentials: Vec<String>,
    /// As written by the caller (`15m`).
    pub ttl: Option<String>,
    /// Per-credential parameters (`parameters.<name>` of the body: an SSH public key...), each
    /// checked by its credential's provider before anything is recorded.
    pub parameters: std::collections::BTreeMap<String, serde_json::Value>,
}

/// One minted credential in a response.
#[derive(Debug)]
pub struct IssuedOutput {
    pub name: String,
    pub kind: CredentialKind,
    pub fields: Vec<(String, Field)>,
}

/// `POST /v1/exchange` output.
#[derive(Debug)]
pub struct ExchangeResponse {
    pub grant_id: Uuid,
    pub expires_at: OffsetDateTime,
    pub revocation_token: Sensitive,
    pub credentials: Vec<IssuedOutput>,
}

const MAX_NAME: usize = 64;
pub(super) fn valid_credential_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A grant decided and not yet committed (step 4).
struct Plan<'b> {
    grant_id: Uuid,
    revocation_token: Sensitive,
    defs: Vec<&'b CredentialDef>,
    issued: Vec<IssuedCredential>,
    jti: Option<JtiRecord>,
    new_grant: NewGrant,
}

impl Broker {
    /// The life of one exchange. See ARCHITECTURE.md for the sequence.
    pub async fn exchange(
        &self,
        req: ExchangeRequest,
        ctx: &RequestCtx,
    ) -> Result<ExchangeResponse, ServiceError> {
        let now = self.clock.now();
        let bundle = self.policies.load_full();
        let mut rec = ExchangeRecord {
            at: now,
            bundle_digest: bundle.digest().to_owned(),
            // As the caller wrote them, escaped; the event's writers cap each one
            // (`refusals::fields`), so a refused name is kept escaped and cut short.
            requested: req
                .credentials
                .iter()
                .take(self.max_credentials)
                .map(|n| crate::store::text::escape(n).into_owned())
                .collect(),
            job: JobAttribution::default(),
            rules_matched: Vec::new(),
            ttl: None,
            planned: None,
        };

        let (claims, expires_at) = self.decide(&req, ctx, &bundle, &mut rec).await?;
        let plan = self
            .plan(&req, ctx, &bundle, &claims, &mut rec, expires_at)
            .await?;
        // Credentials that exist only in this process until the response (signed tokens) need
        // no intent: mint, then one transaction (jti + active grant + audit). A failure before
        // that commit leaves nothing anywhere: the tokens never left the process.
        let in_memory = plan.defs.iter().all(|d| {
            self.provider(d.spec.kind())
                .is_ok_and(|p| p.mints_in_memory())
        });
        if in_memory {
            self.issue_in_memory(&req, ctx, &rec, plan, &claims).await
        } else {
            self.issue_with_intent(&req, ctx, &rec, plan, &claims).await
        }
    }

    /// Steps 1 to 3 and the TTL: the request, the job token, the rate limit and freeze, the
    /// policy. The verified claims and the planned expiry, or the refusal (audited).
    async fn decide(
        &self,
        req: &ExchangeRequest,
        ctx: &RequestCtx,
        bundle: &Bundle,
        rec: &mut ExchangeRecord,
    ) -> Result<(VerifiedClaims, OffsetDateTime), ServiceError> {
        let now = rec.at;
        // 1. The request itself.
        let requested_ttl = match self.check_request(req) {
            Ok(t) => t,
            Err(e) => return Err(self.refuse_exchange(ctx, rec, e, None).await),
        };

        // 2. The job token: configured issuer, pinned algorithm, signature, audience, times.
        let claims =
            match metrics::timed(Stage::Verify, self.verifier.verify(req.token.expose())).await {
                Ok(c) => c,
                Err(e) => {
                    let err = ServiceError::Token(e);
                    return Err(self.refuse_exchange(ctx, rec, err, None).await);
                }
            };
        rec.job = JobAttribution::from_claims(&claims);
        if let Err(e) = self.check_rate(&claims.issuer, &rec.job) {
            return Err(self.refuse_exchange(ctx, rec, e, None).await);
        }
        if let Err(e) = self
            .check_freeze(
                &claims.issuer,
                rec.job.repository.as_deref(),
                rec.job.repository_id.as_deref(),
                &req.credentials,
            )
            .await
        {
            return Err(self.refuse_exchange(ctx, rec, e, None).await);
        }

        // 3. Policy: every requested credential must be allowed; deny wins; default deny.
        let input = PolicyInput {
            issuer: &claims.issuer,
            platform: claims.platform,
            claims: &claims.claims,
        };
        let eval = metrics::timed_sync(Stage::Policy, || bundle.evaluate(&input, &req.credentials));
        rec.rules_matched = eval.rules_matched.clone();
        let mut caps = Vec::with_capacity(eval.decisions.len());
        for d in &eval.decisions {
            match &d.outcome {
                Decision::Allow { .. } => caps.extend(d.max_ttl),
                other => {
                    let detail = format!("credential {:?}: {}", d.credential, other.reason_code());
                    let err = ServiceError::Denied {
                        credential: d.credential.clone(),
                        reason: other.reason(),
                    };
                    return Err(self.refuse_exchange(ctx, rec, err, Some(detail)).await);
                }
            }
        }
        // GitLab binds `exp` to the job's timeout: never outlive the job.
        let job_left = (claims.platform == Platform::Gitlab).then(|| claims.exp - now);
        let ttl = effective_ttl(
            requested_ttl,
            self.grants.default_ttl,
            self.grants.max_ttl,
            &caps,
            job_left,
        );
        if ttl < Duration::SECOND {
            let err = ServiceError::TokenExhausted;
            return Err(self.refuse_exchange(ctx, rec, err, None).await);
        }
        rec.ttl = Some(ttl);
        Ok((claims, now + ttl))
    }

    /// Step 4, before anything is committed: the grant id, each credential's resource id and
    /// intent details, the revocation token, the replay record.
    async fn plan<'b>(
        &self,
        req: &ExchangeRequest,
        ctx: &RequestCtx,
        bundle: &'b Bundle,
        claims: &VerifiedClaims,
        rec: &mut ExchangeRecord,
        expires_at: OffsetDateTime,
    ) -> Result<Plan<'b>, ServiceError> {
        let now = rec.at;
        // 4. Intent: grant + resource ids + jti, committed before anything is minted.
        let grant_id = Uuid::now_v7();
        let revocation_token = crate::secret_format::generate(SecretKind::Revocation);
        let mut defs = Vec::with_capacity(req.credentials.len());
        let mut issued = Vec::with_capacity(req.credentials.len());
        for name in &req.credentials {
            let Some(def) = bundle.credential(name) else {
                let err = ServiceError::Denied {
                    credential: name.clone(),
                    reason: ReasonCode::UnknownCredential,
                };
                return Err(self.refuse_exchange(ctx, rec, err, None).await);
            };
            let provider = match self.provider(def.spec.kind()) {
                Ok(p) => p,
                Err(error) => {
                    let err = ServiceError::Provider {
                        credential: name.clone(),
                        error,
                    };
                    return Err(self.refuse_exchange(ctx, rec, err, None).await);
                }
            };
            let params = req.parameters.get(name).unwrap_or(&serde_json::Value::Null);
            if let Err(e) = provider.check_parameters(def, params) {
                let code = match e {
                    ProviderError::ExceedsPolicy(_) => ReasonCode::ParametersExceedPolicy,
                    _ => ReasonCode::InvalidParameters,
                };
                let err = ServiceError::BadRequest {
                    code,
                    message: format!("parameters.{name}: {}", parameter_message(&e)),
                };
                return Err(self.refuse_exchange(ctx, rec, err, None).await);
            }
            issued.push(IssuedCredential {
                name: name.clone(),
                kind: def.spec.kind(),
                resource_id: provider.resource_id(grant_id, def),
                details: provider.intent_details(def),
            });
            defs.push(def);
        }
        rec.planned = Some(PlannedGrant {
            id: grant_id,
            resource_ids: issued.iter().map(|c| c.resource_id.clone()).collect(),
            expires_at,
        });
        let jti = match (&claims.jti, claims.single_use) {
            (Some(j), true) => Some(JtiRecord {
                iss: claims.iss.clone(),
                jti: j.clone(),
                expires_at: claims.replay_until,
            }),
            _ => None,
        };
        let new_grant = NewGrant {
            id: grant_id,
            revocation_hash: sha256_hex(revocation_token.expose().as_bytes()),
            issuer: claims.issuer.clone(),
            subject: claims.sub.clone(),
            repository: rec.job.repository.clone(),
            repository_id: rec.job.repository_id.clone(),
            job: rec.job.job_key(),
            bundle_digest: bundle.digest().to_owned(),
            created_at: now,
            expires_at,
            credentials: issued.clone(),
        };
        Ok(Plan {
            grant_id,
            revocation_token,
            defs,
            issued,
            jti,
            new_grant,
        })
    }

    /// Steps 5 and 6 for credentials that exist only in this process until the response:
    /// mint, then one transaction (jti + active grant + audit).
    async fn issue_in_memory(
        &self,
        req: &ExchangeRequest,
        ctx: &RequestCtx,
        rec: &ExchangeRecord,
        plan: Plan<'_>,
        claims: &VerifiedClaims,
    ) -> Result<ExchangeResponse, ServiceError> {
        let Plan {
            grant_id,
            revocation_token,
            defs,
            issued,
            jti,
            new_grant,
        } = plan;
        let (now, expires_at) = (rec.at, new_grant.expires_at);
        let minted = match self
            .mint_every(
                &defs,
                &issued,
                grant_id,
                claims,
                now,
                expires_at,
                &req.parameters,
            )
            .await
        {
            Ok(m) => m,
            Err((credential, error)) => {
                let detail = format!("{credential}: {}", error.reason_code());
                let err = ServiceError::Provider { credential, error };
                return Err(self.refuse_exchange(ctx, rec, err, Some(detail)).await);
            }
        };
        let real_expiry = latest_expiry(&minted, expires_at);
        let mut grant = new_grant;
        let notes = audit_notes(&issued, &minted);
        grant.expires_at = real_expiry;
        for (c, m) in grant.credentials.iter_mut().zip(&minted) {
            c.details = m.details.clone();
        }
        let mut allow = self.exchange_event(
            ctx,
            rec,
            ExchangeOutcome::Issued {
                granted: &req.credentials,
                expires_at: real_expiry,
            },
        );
        allow.detail = notes;
        let issue = self.store.issue_grant(&grant, jti.as_ref(), &allow);
        return match metrics::timed(Stage::Activate, issue).await {
            Ok(()) => Ok(respond(
                grant_id,
                real_expiry,
                revocation_token,
                minted,
                issued,
            )),
            Err(StoreError::Replayed) => Err(self
                .refuse_exchange(ctx, rec, ServiceError::Replayed, None)
                .await),
            // The store refused this item's data (it failed alone, see `group_commit.rs`):
            // record the refusal as far as the store still takes it.
            Err(e @ StoreError::Rejected(_)) => Err(self
                .refuse_exchange(ctx, rec, ServiceError::Store(e), None)
                .await),
            Err(e) => {
                tracing::error!(error = %e, "store unavailable at grant issue");
                Err(ServiceError::Store(e))
            }
        };
    }

    /// Steps 4 to 6 for credentials with effects elsewhere: commit the intent, mint, activate.
    async fn issue_with_intent(
        &self,
        req: &ExchangeRequest,
        ctx: &RequestCtx,
        rec: &ExchangeRecord,
        plan: Plan<'_>,
        claims: &VerifiedClaims,
    ) -> Result<ExchangeResponse, ServiceError> {
        let Plan {
            grant_id,
            revocation_token,
            defs,
            issued,
            jti,
            new_grant,
        } = plan;
        let (now, expires_at) = (rec.at, new_grant.expires_at);

        match metrics::timed(
            Stage::Intent,
            self.store.begin_grant(&new_grant, jti.as_ref()),
        )
        .await
        {
            Ok(()) => {}
            Err(StoreError::Replayed) => {
                return Err(self
                    .refuse_exchange(ctx, rec, ServiceError::Replayed, None)
                    .await);
            }
            Err(e @ StoreError::Rejected(_)) => {
                let err = ServiceError::Store(e);
                return Err(self.refuse_exchange(ctx, rec, err, None).await);
            }
            Err(e) => {
                tracing::error!(error = %e, "store unavailable at grant intent");
                return Err(ServiceError::Store(e));
            }
        }
        crate::fault::point("after_intent");

        // 5. Mint every credential concurrently; all or nothing.
        let minted = match self
            .mint_every(
                &defs,
                &issued,
                grant_id,
                claims,
                now,
                expires_at,
                &req.parameters,
            )
            .await
        {
            Ok(m) => m,
            Err((credential, error)) => {
                return Err(self
                    .abort_grant(ctx, rec, jti.as_ref(), &issued, credential, error)
                    .await);
            }
        };

        // 6. Finalise: grant active + the allow audit event, one transaction.
        let real_expiry = latest_expiry(&minted, expires_at);
        let details: Vec<serde_json::Value> = minted.iter().map(|m| m.details.clone()).collect();
        let mut allow = self.exchange_event(
            ctx,
            rec,
            ExchangeOutcome::Issued {
                granted: &req.credentials,
                expires_at: real_expiry,
            },
        );
        allow.detail = audit_notes(&issued, &minted);
        if let Err(e) = metrics::timed(
            Stage::Activate,
            self.store
                .activate_grant(grant_id, real_expiry, &details, &allow),
        )
        .await
        {
            tracing::error!(error = %e, grant_id = %grant_id, "could not finalise grant; revoking what was minted");
            // Best effort now; if this fails too the grant stays `issuing` and the reaper
            // revokes it once it is stale.
            if self.revoke_credentials(&issued).await.is_ok() {
                let ev = self.exchange_event(
                    ctx,
                    rec,
                    ExchangeOutcome::Undone {
                        expires_at: real_expiry,
                    },
                );
                let _ = self.store.fail_grant(grant_id, jti.as_ref(), &ev).await;
            }
            return Err(ServiceError::Store(e));
        }
        crate::fault::point("after_activate");
        Ok(respond(
            grant_id,
            real_expiry,
            revocation_token,
            minted,
            issued,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    /// Mint every credential concurrently: all of them (in request order), or the first
    /// failure's credential name and error (the others may have been minted: the caller undoes).
    async fn mint_every(
        &self,
        defs: &[&crate::providers::CredentialDef],
        issued: &[IssuedCredential],
        grant_id: Uuid,
        claims: &crate::oidc::VerifiedClaims,
        now: OffsetDateTime,
        expires_at: OffsetDateTime,
        parameters: &std::collections::BTreeMap<String, serde_json::Value>,
    ) -> Result<Vec<Minted>, (String, ProviderError)> {
        let mints = defs.iter().zip(issued).map(|(def, ic)| async move {
            let kind = def.spec.kind();
            let provider = self.provider(kind)?;
            let params = parameters.get(&ic.name).unwrap_or(&serde_json::Value::Null);
            let started = std::time::Instant::now();
            let minted = provider
                .mint_with(
                    MintRequest {
                        grant_id,
                        credential: def,
                        resource_id: &ic.resource_id,
                        claims,
                        now,
                        expires_at,
                    },
                    params,
                )
                .await;
            metrics::provider_op(kind.as_str(), "mint", minted.is_ok(), started);
            minted
        });
        let results = metrics::timed(Stage::Mint, futures::future::join_all(mints)).await;
        crate::fault::point("after_mint");
        collect_minted(results, issued)
    }

    /// One bucket per (issuer, repository id): a runaway pipeline cannot starve the others.
    pub(super) fn check_rate(
        &self,
        issuer: &str,
        job: &JobAttribution,
    ) -> Result<(), ServiceError> {
        let Some(limiter) = &self.rate_limit else {
            return Ok(());
        };
        let key = format!("{issuer}/{}", job.repository_id.as_deref().unwrap_or("-"));
        limiter.check_key(&key).map_err(|not_until| {
            use governor::clock::{Clock as _, DefaultClock};
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            ServiceError::RateLimited {
                retry_after_secs: wait.as_secs().max(1),
            }
        })
    }

    pub(super) fn check_request(
        &self,
        req: &ExchangeRequest,
    ) -> Result<Option<Duration>, ServiceError> {
        let bad = |message: String| ServiceError::BadRequest {
            code: ReasonCode::BadRequest,
            message,
        };
        if req.credentials.is_empty() {
            return Err(bad("credentials: name at least one credential".into()));
        }
        if req.credentials.len() > self.max_credentials {
            return Err(bad(format!(
                "credentials: at most {} per exchange",
                self.max_credentials
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for n in &req.credentials {
            crate::store::text::check("credentials: a name", n)?;
            if !valid_credential_name(n) {
                return Err(bad(
                    "credentials: names are [a-z0-9_-], at most 64 characters".into(),
                ));
            }
            if !seen.insert(n) {
                return Err(bad(format!("credentials: {n:?} named twice")));
            }
        }
        if let Some(n) = req.parameters.keys().find(|n| !seen.contains(n)) {
            return Err(bad(format!(
                "parameters: {n:?} is not a requested credential"
            )));
        }
        match &req.ttl {
            None => Ok(None),
            Some(t) => match crate::time::parse_duration(t) {
                Ok(d) if d >= Duration::SECOND => Ok(Some(d)),
                Ok(_) => Err(bad("ttl: must be at least 1s".into())),
                Err(_) => Err(bad("ttl: expected a duration such as 15m".into())),
            },
        }
    }

    /// A mint failed: revoke what was minted, release the token, audit, and report the failure.
    async fn abort_grant(
        &self,
        ctx: &RequestCtx,
        rec: &ExchangeRecord,
        jti: Option<&JtiRecord>,
        issued: &[IssuedCredential],
        credential: String,
        error: ProviderError,
    ) -> ServiceError {
        let grant_id = rec.planned.as_ref().map(|g| g.id).unwrap_or_default();
        tracing::warn!(grant_id = %grant_id, credential = %credential, reason = error.reason_code(), error = %error, "mint failed; undoing the grant");
        let detail = format!("credential {credential:?}: {}", error.reason_code());
        let err = ServiceError::Provider { credential, error };
        let ev = self.exchange_event(
            ctx,
            rec,
            ExchangeOutcome::Refused {
                error: &err,
                detail: Some(detail),
            },
        );
        // Revoke every credential of the grant (revoke is idempotent: ones never minted are
        // "already gone").
        match self.revoke_credentials(issued).await {
            Ok(()) => {
                if let Err(e) = self.store.fail_grant(grant_id, jti, &ev).await {
                    tracing::error!(error = %e, grant_id = %grant_id, "could not record failed grant; reaper will recover it");
                    return ServiceError::Store(e);
                }
            }
            Err(e) => {
                // Leave the grant `issuing`: the reaper recovers it once stale.
                tracing::error!(grant_id = %grant_id, error = %e, "undo after failed mint failed; reaper will retry");
                let _ = self.store.append_audit(&ev).await;
            }
        }
        err
    }
}

/// What providers ask the exchange's audit event to say of what they minted (the `audit` string
/// of their details, never a secret: a GitHub token's SHA-256), one `name: note` per credential.
fn audit_notes(issued: &[IssuedCredential], minted: &[Minted]) -> Option<String> {
    let notes: Vec<String> = issued
        .iter()
        .zip(minted)
        .filter_map(|(ic, m)| {
            let note = m.details.get("audit")?.as_str()?;
            Some(format!("{}: {note}", ic.name))
        })
        .collect();
    (!notes.is_empty()).then(|| notes.join("; "))
}

/// A provider's refusal of parameters as the caller sees it (its text names parameters, never
/// their values).
fn parameter_message(e: &ProviderError) -> String {
    match e {
        ProviderError::InvalidParameters(m) | ProviderError::ExceedsPolicy(m) => m.clone(),
        other => other.reason_code().to_owned(),
    }
}

/// All minted credentials, or the first failure's credential name and error.
pub(super) fn collect_minted(
    results: Vec<Result<Minted, ProviderError>>,
    issued: &[IssuedCredential],
) -> Result<Vec<Minted>, (String, ProviderError)> {
    let mut minted = Vec::with_capacity(results.len());
    for (r, ic) in results.into_iter().zip(issued) {
        match r {
            Ok(m) => minted.push(m),
            Err(e) => return Err((ic.name.clone(), e)),
        }
    }
    Ok(minted)
}

/// The grant lives as long as its longest-lived credential (providers may shorten a TTL).
pub(super) fn latest_expiry(minted: &[Minted], planned: OffsetDateTime) -> OffsetDateTime {
    minted.iter().map(|m| m.expires_at).max().unwrap_or(planned)
}

pub(super) fn respond(
    grant_id: Uuid,
    expires_at: OffsetDateTime,
    revocation_token: Sensitive,
    minted: Vec<Minted>,
    issued: Vec<IssuedCredential>,
) -> ExchangeResponse {
    let credentials = minted
        .into_iter()
        .zip(issued)
        .map(|(m, ic)| IssuedOutput {
            name: ic.name,
            kind: ic.kind,
            fields: m.fields,
        })
        .collect();
    ExchangeResponse {
        grant_id,
        expires_at,
        revocation_token,
        credentials,
    }
}
