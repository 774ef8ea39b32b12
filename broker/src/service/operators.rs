//! Operator actions: authorize a call, revoke-all, freeze, unfreeze, and the freeze check on
//! the exchange path. The request shapes and reports are `admin/`'s; the rules run here.

use super::{Broker, RequestCtx, ServiceError};
use crate::admin::{
    AdminError, FREEZE_REFRESH, Freeze, GrantFilter, Operator, REVOKE_ALL_CALL_BUDGET,
    REVOKE_ALL_PAGE, REVOKE_ALL_PARALLELISM, RevokeAllReport, RevokeFailure, Role, clean_reason,
};
use crate::audit::{Action, AuditEvent, Outcome};
use crate::providers::CredentialKind;
use crate::reason::ReasonCode;
use crate::secret::Sensitive;
use crate::store::{FreezeRecord, GrantCursor};
use time::OffsetDateTime;
use uuid::Uuid;

impl Broker {
    /// An operator call's audit event, with `reason` (the outcome is set by the caller).
    pub(super) fn admin_event(&self, ctx: &RequestCtx, reason: ReasonCode) -> AuditEvent {
        ctx.event(self.clock.now(), Action::Admin, reason.as_str())
    }

    pub(super) async fn admin_audit(&self, ev: &AuditEvent) -> Result<(), AdminError> {
        self.store.append_audit(ev).await.map_err(|e| {
            tracing::error!(error = %e, reason = ev.reason, "audit write failed; refusing with 503");
            AdminError::Store(e)
        })
    }

    /// Audit and return a 400 for an authenticated operator's malformed request.
    pub async fn admin_bad_request(
        &self,
        op: &Operator,
        what: &str,
        msg: String,
        ctx: &RequestCtx,
    ) -> AdminError {
        let mut ev = self.admin_event(ctx, ReasonCode::BadRequest);
        ev.actor = Some(op.actor());
        ev.detail = Some(format!("{what}: {msg}"));
        match self.admin_audit(&ev).await {
            Ok(()) => AdminError::BadRequest(msg),
            Err(e) => e,
        }
    }

    /// Audit and return a 400 `invalid_text` for an authenticated operator's request text the
    /// store cannot hold; the event shows the value escaped and cut short, never raw.
    pub async fn admin_invalid_text(
        &self,
        op: &Operator,
        what: &str,
        error: crate::store::text::TextError,
        ctx: &RequestCtx,
    ) -> AdminError {
        let mut ev = self.admin_event(ctx, ReasonCode::InvalidText);
        ev.actor = Some(op.actor());
        ev.detail = Some(format!("{what}: {}", error.detail()));
        match self.admin_audit(&ev).await {
            Ok(()) => AdminError::InvalidText(error),
            Err(e) => e,
        }
    }

    /// Authenticate an operator call needing `needed` for operation `what`. Refusals are
    /// audited (and a failed audit write turns into 503).
    pub async fn authorize(
        &self,
        token: Option<Sensitive>,
        needed: Role,
        what: &str,
        ctx: &RequestCtx,
    ) -> Result<Operator, AdminError> {
        let result = match token {
            None => Err(AdminError::MissingToken),
            // A token in the operator shape is checked offline first (prefix, length,
            // checksum; the legacy shape has none and is compared by hash as before).
            Some(t) if malformed_operator_token(&t).is_some() => Err(AdminError::MalformedToken(
                malformed_operator_token(&t)
                    .unwrap_or(crate::secret_format::FormatError::Malformed),
            )),
            Some(t) => match self.admin.operators.authenticate_any(&t).await {
                None => Err(AdminError::Unauthorized),
                Some((op, _)) if !op.role.allows(needed) => Err(AdminError::Forbidden {
                    name: op.name.clone(),
                    needed: needed.as_str(),
                }),
                Some((op, None)) => Ok(op),
                // A single-use job token acts once (shared with exchanges: `used_jti`).
                Some((op, Some(jti))) => {
                    match self.store.record_jti(&jti, self.clock.now()).await {
                        Ok(()) => Ok(op),
                        Err(crate::store::StoreError::Replayed) => {
                            Err(AdminError::Replayed { name: op.name })
                        }
                        Err(e) => Err(AdminError::Store(e)),
                    }
                }
            },
        };
        match result {
            Ok(op) => Ok(op),
            Err(e) => {
                let mut ev = self.admin_event(ctx, e.reason());
                if let AdminError::Forbidden { name, .. } | AdminError::Replayed { name } = &e {
                    ev.actor = Some(format!("operator:{name}"));
                }
                ev.detail = Some(format!("{what}: {e}"));
                match self.screen_refusal(&mut ev) {
                    None | Some(crate::refusals::Disposition::Record) => {
                        self.admin_audit(&ev).await?;
                        Err(e)
                    }
                    Some(crate::refusals::Disposition::Collapse) => Err(e),
                    Some(crate::refusals::Disposition::Limited { retry_after_secs }) => {
                        Err(AdminError::TooManyFailures { retry_after_secs })
                    }
                }
            }
        }
    }

    /// Refuse (400 `unknown_filter_value`, audited) a filter naming an issuer, credential or
    /// kind this broker does not have: it would select nothing and still answer success.
    pub(super) async fn check_filter_names(
        &self,
        op: &Operator,
        what: &str,
        filter: &GrantFilter,
        ctx: &RequestCtx,
    ) -> Result<(), AdminError> {
        let bundle = self.policies();
        let credentials: Vec<String> = bundle
            .credentials()
            .iter()
            .map(|d| d.name.clone())
            .collect();
        let Some((field, value, known)) = filter.unknown_value(&self.issuer_names(), &credentials)
        else {
            return Ok(());
        };
        let e = AdminError::UnknownFilterValue {
            field,
            value: value.chars().take(100).collect(),
            known,
        };
        let mut ev = self.admin_event(ctx, e.reason());
        ev.actor = Some(op.actor());
        ev.detail = Some(format!("{what}: {e}"));
        self.admin_audit(&ev).await?;
        Err(e)
    }

    /// Revoke every active grant matching `filter`: selected in SQL a page at a time (oldest
    /// first, keyset-paged); grants revoked in the store alone (API tokens) are revoked a page
    /// per transaction with one audit event each; the others are claimed and revoked one by one,
    /// [`REVOKE_ALL_PARALLELISM`] at a time. Pages of in-store grants grow to what the store
    /// prefers ([`crate::store::Store::in_store_revoke_page`]), and there the next page is read
    /// while the current one is written. Stops taking pages after
    /// [`REVOKE_ALL_CALL_BUDGET`] (`complete: false`); calling again continues, since nothing
    /// revoked is selected again. A broker killed mid-call leaves every page either revoked
    /// and audited (one transaction) or untouched; per-grant revocations it had claimed are
    /// finished by the reaper when their lease runs out.
    pub async fn revoke_all(
        &self,
        op: &Operator,
        reason: &str,
        filter: &GrantFilter,
        ctx: &RequestCtx,
    ) -> Result<RevokeAllReport, AdminError> {
        let started = std::time::Instant::now();
        let reason = clean_reason(reason);
        let checked = if reason.is_empty() {
            Err("reason: required".to_owned())
        } else {
            filter.check(false).map_err(|e| e.to_string())
        };
        if let Err(msg) = checked {
            let mut ev = self.admin_event(ctx, ReasonCode::BadRequest);
            ev.actor = Some(op.actor());
            ev.detail = Some(format!("revoke_all: {msg}"));
            self.admin_audit(&ev).await?;
            return Err(AdminError::BadRequest(msg));
        }
        self.check_filter_names(op, "revoke_all", filter, ctx)
            .await?;
        let select = filter.to_select();
        let actor = op.actor();
        let mut report = RevokeAllReport::default();
        let actor_ref = actor.as_str();
        let mut cursor: Option<GrantCursor> = None;
        let mut size = REVOKE_ALL_PAGE;
        let read_ahead = self.store.in_store_revoke_page().is_some();
        // The page read while the one before it was written.
        let mut prefetched: Option<Vec<crate::store::Grant>> = None;
        loop {
            if started.elapsed() >= REVOKE_ALL_CALL_BUDGET {
                break;
            }
            let page = match prefetched.take() {
                Some(page) => page,
                None => self.store.active_grants_page(&select, cursor, size).await?,
            };
            report.pages += 1;
            let Some(last) = page.last() else {
                report.complete = true;
                break;
            };
            cursor = Some(GrantCursor {
                created_at: last.created_at,
                id: last.id,
            });
            let full = page.len() >= size as usize;
            report.matched += page.len();
            let (in_store, outside): (Vec<_>, Vec<_>) =
                page.into_iter().partition(|g| self.revoked_in_store(g));
            // A page revoked in the store alone is one transaction whatever its length, so
            // while pages keep being that kind they grow to what the store prefers; a page with
            // other grants (revoked one by one) sends the next back to the small size.
            size = match self.store.in_store_revoke_page() {
                Some(n) if outside.is_empty() => n,
                _ => REVOKE_ALL_PAGE,
            };
            // The next page is read on another pool connection while this one is written: it
            // starts strictly after this page's last grant, so the two never overlap, and a
            // grant it reads that changes meanwhile is re-checked when revoked (`status =
            // 'active'` in the store, the claim for the others).
            let next = async {
                if full && read_ahead {
                    Some(self.store.active_grants_page(&select, cursor, size).await)
                } else {
                    None
                }
            };
            let write = self.revoke_page(in_store, outside, actor_ref, ctx, &mut report);
            let (next, written) = futures::join!(next, write);
            written?;
            if !full {
                report.complete = true;
                break;
            }
            // `None` without the read-ahead: the next turn reads the page itself.
            prefetched = next.transpose()?;
        }
        report.truncated = !report.complete;
        // A filter narrower than a kind (one repository, one issuer...) must not kill other
        // jobs' sessions, so provider-wide switches apply only to "everything" or "one kind".
        let kind_only = GrantFilter {
            kind: None,
            ..filter.clone()
        }
        .is_empty();
        if kind_only {
            let kind = filter.kind.as_deref().and_then(CredentialKind::parse);
            for (k, r) in self.revoke_all_providers(kind).await {
                let v = match r {
                    Ok(rep) if rep.revoked == 0 && rep.failed == 0 && rep.details.is_empty() => {
                        continue;
                    }
                    Ok(rep) => {
                        if rep.failed > 0 {
                            report.tally.failures.push(RevokeFailure {
                                grant_id: uuid::Uuid::nil(),
                                reason: format!(
                                    "{k}: provider-wide revoke failed for {} target(s)",
                                    rep.failed
                                ),
                            });
                        }
                        serde_json::to_value(&rep).unwrap_or_default()
                    }
                    Err(code) => {
                        report.tally.failures.push(RevokeFailure {
                            grant_id: uuid::Uuid::nil(),
                            reason: format!("{k}: {code}"),
                        });
                        serde_json::json!({"error": code})
                    }
                };
                report.provider_wide.insert(k, v);
            }
        }
        report.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut ev = self.admin_event(ctx, ReasonCode::RevokeAll);
        ev.actor = Some(actor);
        ev.outcome = if report.tally.failures.is_empty() {
            Outcome::Success
        } else {
            Outcome::Failure
        };
        ev.detail = Some(
            format!(
                "reason: {reason}; filter: {}; matched {}, revoked {}, in progress {}, failed {}{}",
                serde_json::to_string(filter).unwrap_or_default(),
                report.matched,
                report.tally.revoked_grants,
                report.tally.already_in_progress,
                report.tally.failures.len(),
                if report.complete {
                    ""
                } else {
                    ", incomplete (call again to continue)"
                }
            ) + &report
                .provider_wide
                .iter()
                .map(|(k, v)| format!("; {k} provider-wide: {v}"))
                .collect::<String>(),
        );
        self.admin_audit(&ev).await?;
        Ok(report)
    }

    /// Revoke one revoke-all page: the grants revoked in the store alone in one transaction
    /// with one audit event each, the others one by one ([`REVOKE_ALL_PARALLELISM`] at a time).
    async fn revoke_page(
        &self,
        in_store: Vec<crate::store::Grant>,
        outside: Vec<crate::store::Grant>,
        actor: &str,
        ctx: &RequestCtx,
        report: &mut RevokeAllReport,
    ) -> Result<(), AdminError> {
        if !in_store.is_empty() {
            let now = self.clock.now();
            let events: Vec<_> = in_store
                .iter()
                .map(|g| self.revoked_event(g, now, actor, ctx))
                .collect();
            let moved = self.store.revoke_in_store(now, &events).await?;
            let moved: std::collections::HashSet<Uuid> = moved.into_iter().collect();
            for g in &in_store {
                if moved.contains(&g.id) {
                    report.tally.revoked(g.credentials.iter().map(|c| c.kind));
                    report.revoked_in_store += 1;
                    crate::metrics::revocation("requested", true, false);
                } else {
                    report.tally.already_in_progress += 1;
                }
            }
        }
        let outside = self
            .revoke_grants(
                outside.iter().map(|g| g.id).collect(),
                REVOKE_ALL_PARALLELISM,
                actor,
                ctx,
            )
            .await;
        report.tally.merge(outside);
        Ok(())
    }

    /// Freeze new exchanges matching `filter` on every replica (replaces any freeze in force).
    pub async fn freeze(
        &self,
        op: &Operator,
        reason: &str,
        filter: &GrantFilter,
        ctx: &RequestCtx,
    ) -> Result<Freeze, AdminError> {
        let reason = clean_reason(reason);
        let checked = if reason.is_empty() {
            Err("reason: required".to_owned())
        } else {
            filter.check(true).map_err(|e| e.to_string())
        };
        let mut ev = self.admin_event(ctx, ReasonCode::Freeze);
        ev.actor = Some(op.actor());
        if let Err(msg) = checked {
            ev.reason = ReasonCode::BadRequest.as_str().to_owned();
            ev.detail = Some(format!("freeze: {msg}"));
            self.admin_audit(&ev).await?;
            return Err(AdminError::BadRequest(msg));
        }
        self.check_filter_names(op, "freeze", filter, ctx).await?;
        let freeze = Freeze {
            filter: filter.clone(),
            reason: reason.clone(),
            actor: op.actor(),
            since: ev.time,
        };
        let record = FreezeRecord {
            filter: serde_json::to_value(filter)
                .map_err(|_| AdminError::BadRequest("filter: not encodable".into()))?,
            reason: reason.clone(),
            actor: op.actor(),
            since: ev.time,
        };
        ev.outcome = Outcome::Success;
        ev.detail = Some(format!(
            "reason: {reason}; filter: {}",
            serde_json::to_string(filter).unwrap_or_default()
        ));
        self.store.set_freeze(Some(&record), &ev).await?;
        self.cache_freeze(ev.time, Some(freeze.clone()));
        Ok(freeze)
    }

    /// Lift the freeze. Returns whether one was in force.
    pub async fn unfreeze(
        &self,
        op: &Operator,
        reason: &str,
        ctx: &RequestCtx,
    ) -> Result<bool, AdminError> {
        let mut ev = self.admin_event(ctx, ReasonCode::Unfreeze);
        ev.actor = Some(op.actor());
        ev.outcome = Outcome::Success;
        let reason = clean_reason(reason);
        if !reason.is_empty() {
            ev.detail = Some(format!("reason: {reason}"));
        }
        let was = self.store.set_freeze(None, &ev).await?;
        self.cache_freeze(ev.time, None);
        Ok(was)
    }

    /// The freeze in force as the store has it now (for operators; audited).
    pub async fn freeze_status(
        &self,
        op: &Operator,
        ctx: &RequestCtx,
    ) -> Result<Option<Freeze>, AdminError> {
        let state = self.store.freeze_state().await?.map(Freeze::from_record);
        let mut ev = self.admin_event(ctx, ReasonCode::FreezeStatus);
        ev.actor = Some(op.actor());
        ev.outcome = Outcome::Success;
        self.admin_audit(&ev).await?;
        Ok(state)
    }

    pub(super) fn cache_freeze(&self, at: OffsetDateTime, f: Option<Freeze>) {
        let mut g = self.admin.freeze.lock().unwrap_or_else(|e| e.into_inner());
        *g = Some((at, f));
    }

    /// The freeze in force, from this replica's cache if it is at most [`FREEZE_REFRESH`] old.
    pub(crate) async fn current_freeze(&self) -> Result<Option<Freeze>, ServiceError> {
        let now = self.clock.now();
        {
            let g = self.admin.freeze.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((at, f)) = &*g
                && *at <= now
                && now - *at < FREEZE_REFRESH
            {
                return Ok(f.clone());
            }
        }
        let f = self.store.freeze_state().await?.map(Freeze::from_record);
        self.cache_freeze(now, f.clone());
        Ok(f)
    }

    /// Refuse an exchange a freeze covers.
    pub(crate) async fn check_freeze(
        &self,
        issuer: &str,
        repository: Option<&str>,
        repository_id: Option<&str>,
        credentials: &[String],
    ) -> Result<(), ServiceError> {
        let Some(f) = self.current_freeze().await? else {
            return Ok(());
        };
        let bundle = self.policies();
        let creds: Vec<(String, Option<CredentialKind>)> = credentials
            .iter()
            .map(|n| {
                let kind = bundle
                    .credentials()
                    .iter()
                    .find(|d| &d.name == n)
                    .map(|d| d.spec.kind());
                (n.clone(), kind)
            })
            .collect();
        if f.filter
            .matches_exchange(issuer, repository, repository_id, &creds)
        {
            Err(ServiceError::Frozen)
        } else {
            Ok(())
        }
    }
}

/// Why a bearer token in the operator shape (`brk_op_…`) is malformed, if it is; `None` for a
/// well-formed one and for anything else (a job token for an OIDC operator rule).
fn malformed_operator_token(
    t: &crate::secret::Sensitive,
) -> Option<crate::secret_format::FormatError> {
    let t = t.expose();
    if !t.starts_with(crate::admin::OPERATOR_PREFIX) {
        return None;
    }
    crate::secret_format::check(t, crate::secret_format::SecretKind::Operator).err()
}
