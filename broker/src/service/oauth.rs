//! The standard OAuth shapes over the native calls (issue 25). No HTTP here: `http/oauth.rs`
//! parses the forms and writes the RFCs' bodies.
//!
//! - RFC 8693 token exchange ([`Broker::token_exchange`]): `resource`, `audience` and `scope`
//!   select ONE API-token credential of the bundle in force, then the exchange is
//!   [`Broker::exchange`] itself, so policy, audit, replay, rate limit, freeze and revocation
//!   are those of `POST /v1/exchange` by construction.
//! - RFC 7009 revocation ([`Broker::revoke_presented`]): a revocation handle, or an API token
//!   minted here (which revokes its whole grant: holding the token proves as much as holding
//!   the handle).
//!
//! Invariant: a target that selects nothing (or several credentials, or no credential offering
//! the scope) is refused only after the job token verified, as the native path refuses an
//! unknown credential name, so a caller without a valid token learns nothing about the policies.

use super::exchange::ExchangeRequest;
use super::exchange_record::ExchangeRecord;
use super::{Broker, REVOCATION_PREFIX, RequestCtx, ServiceError};
use crate::audit::{Action, JobAttribution};
use crate::policy::Bundle;
use crate::providers::{CredentialSpec, Field};
use crate::reason::ReasonCode;
use crate::secret::Sensitive;
use crate::store::GrantStatus;
use time::OffsetDateTime;
use uuid::Uuid;

/// `grant_type` of RFC 8693.
pub const GRANT_TYPE_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// Token type URIs (RFC 8693 section 3).
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// An RFC 8693 request, parsed (the HTTP layer checked the grant and token types).
#[derive(Debug)]
pub struct TokenExchangeRequest {
    /// The job's OIDC token.
    pub subject_token: Sensitive,
    /// `resource` values: each must be the selected credential's `api_token.audience`, or its
    /// name.
    pub resources: Vec<String>,
    /// `audience` values: likewise.
    pub audiences: Vec<String>,
    /// `scope`, split on spaces: each must be one the credential's scope templates can render.
    pub scopes: Vec<String>,
}

/// The issued API token and what RFC 8693 answers about it.
#[derive(Debug)]
pub struct TokenExchangeResponse {
    /// The credential the target selected.
    pub credential: String,
    pub access_token: Sensitive,
    /// The scope of the issued token (space-separated), as rendered for this job.
    pub scope: String,
    pub expires_at: OffsetDateTime,
    pub grant_id: Uuid,
    /// The revocation handle of the grant (`brk_rvk_…`), as `/v1/exchange` returns it.
    pub revocation_token: Sensitive,
}

/// The API-token credentials the target fits, in file order: each `resource` and `audience`
/// names it (or its `api_token.audience`), and its scope templates can render each requested
/// scope. None: the audit reason ([`ReasonCode::UnknownCredential`], answered
/// `invalid_target`; [`ReasonCode::ScopeNotOffered`], answered `invalid_scope`).
fn candidates(bundle: &Bundle, req: &TokenExchangeRequest) -> Result<Vec<String>, ReasonCode> {
    let targets: Vec<&str> = req
        .resources
        .iter()
        .chain(&req.audiences)
        .map(String::as_str)
        .collect();
    let by_target: Vec<_> = bundle
        .credentials()
        .iter()
        .filter_map(|d| match &d.spec {
            CredentialSpec::ApiToken(spec) => Some((d, spec)),
            _ => None,
        })
        .filter(|(d, spec)| targets.iter().all(|t| *t == d.name || *t == spec.audience))
        .collect();
    if by_target.is_empty() {
        return Err(ReasonCode::UnknownCredential);
    }
    let offered: Vec<String> = by_target
        .into_iter()
        .filter(|(_, spec)| {
            req.scopes
                .iter()
                .all(|s| spec.scopes.iter().any(|t| t.could_render(s)))
        })
        .map(|(d, _)| d.name.clone())
        .collect();
    if offered.is_empty() {
        return Err(ReasonCode::ScopeNotOffered);
    }
    Ok(offered)
}

/// What the caller named as the target, for the audit record.
fn target_text(req: &TokenExchangeRequest) -> String {
    req.audiences
        .iter()
        .chain(&req.resources)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Broker {
    /// RFC 8693: select the credential, then the native exchange of that one credential.
    pub async fn token_exchange(
        &self,
        req: TokenExchangeRequest,
        ctx: &RequestCtx,
    ) -> Result<TokenExchangeResponse, ServiceError> {
        let bundle = self.policies.load_full();
        let name = match candidates(&bundle, &req) {
            Ok(mut names) if names.len() == 1 => names.remove(0),
            Ok(names) => self.select_allowed(&req, ctx, &bundle, names).await?,
            Err(reason) => return Err(self.refuse_target(&req, ctx, &bundle, reason).await),
        };
        let resp = self
            .exchange(
                ExchangeRequest {
                    token: req.subject_token,
                    credentials: vec![name.clone()],
                    ttl: None,
                    parameters: Default::default(),
                },
                ctx,
            )
            .await?;
        let mut token = None;
        let mut scope = String::new();
        for c in resp.credentials {
            for (k, f) in c.fields {
                match (k.as_str(), f) {
                    ("token", Field::Secret(s)) => token = Some(s),
                    ("scope", Field::Public(v)) => scope = v.as_str().unwrap_or_default().into(),
                    _ => {}
                }
            }
        }
        // An API-token credential always has its token; anything else is a bug, refused
        // closed. The grant stays and expires (or is revoked) as any other.
        let access_token = token.ok_or_else(|| ServiceError::Provider {
            credential: name.clone(),
            error: crate::providers::ProviderError::Internal("no token field".into()),
        })?;
        Ok(TokenExchangeResponse {
            credential: name,
            access_token,
            scope,
            expires_at: resp.expires_at,
            grant_id: resp.grant_id,
            revocation_token: resp.revocation_token,
        })
    }

    /// Several credentials fit the target (say one per CI platform, same audience and scope):
    /// the one the policy allows this job is the one. Decided on verified claims only; the
    /// exchange then verifies the token again and decides again, as for any exchange. None
    /// allowed, or more than one: refused (audited) as a policy denial.
    async fn select_allowed(
        &self,
        req: &TokenExchangeRequest,
        ctx: &RequestCtx,
        bundle: &Bundle,
        names: Vec<String>,
    ) -> Result<String, ServiceError> {
        let claims = match self.verifier.verify(req.subject_token.expose()).await {
            Ok(c) => c,
            Err(e) => {
                let rec = self.target_record(req, bundle);
                return Err(self
                    .refuse_exchange(ctx, &rec, ServiceError::Token(e), None)
                    .await);
            }
        };
        let input = crate::policy::PolicyInput {
            issuer: &claims.issuer,
            platform: claims.platform,
            claims: &claims.claims,
        };
        let eval = bundle.evaluate(&input, &names);
        let mut allowed: Vec<String> = eval
            .decisions
            .iter()
            .filter(|d| matches!(d.outcome, crate::policy::Decision::Allow { .. }))
            .map(|d| d.credential.clone())
            .collect();
        match allowed.len() {
            1 => Ok(allowed.remove(0)),
            0 => {
                let reason = eval
                    .decisions
                    .first()
                    .map_or(ReasonCode::NoMatchingRule, |d| d.outcome.reason());
                Err(self
                    .refuse_verified(req, ctx, bundle, &claims, reason)
                    .await)
            }
            _ => {
                let reason = ReasonCode::AmbiguousTarget;
                Err(self
                    .refuse_verified(req, ctx, bundle, &claims, reason)
                    .await)
            }
        }
    }

    /// The exchange record of a refused target: what the caller asked for, escaped.
    fn target_record(&self, req: &TokenExchangeRequest, bundle: &Bundle) -> ExchangeRecord {
        ExchangeRecord {
            at: self.clock.now(),
            bundle_digest: bundle.digest().to_owned(),
            requested: vec![crate::store::text::escape(&target_text(req)).into_owned()],
            job: JobAttribution::default(),
            rules_matched: Vec::new(),
            ttl: None,
            planned: None,
        }
    }

    /// A target that fits no credential: verify the job token first (a failure is refused and
    /// audited as on the native path), then refuse as a policy denial, audited with the job's
    /// attribution. Nothing is issued and the token is not consumed.
    async fn refuse_target(
        &self,
        req: &TokenExchangeRequest,
        ctx: &RequestCtx,
        bundle: &Bundle,
        reason: ReasonCode,
    ) -> ServiceError {
        match self.verifier.verify(req.subject_token.expose()).await {
            Err(e) => {
                let rec = self.target_record(req, bundle);
                self.refuse_exchange(ctx, &rec, ServiceError::Token(e), None)
                    .await
            }
            Ok(claims) => {
                self.refuse_verified(req, ctx, bundle, &claims, reason)
                    .await
            }
        }
    }

    /// Refuse a verified job's target as a policy denial with `reason`, audited.
    async fn refuse_verified(
        &self,
        req: &TokenExchangeRequest,
        ctx: &RequestCtx,
        bundle: &Bundle,
        claims: &crate::oidc::VerifiedClaims,
        reason: ReasonCode,
    ) -> ServiceError {
        let mut rec = self.target_record(req, bundle);
        rec.job = JobAttribution::from_claims(claims);
        let target = target_text(req);
        let detail = format!(
            "token exchange target {:?} scope {:?}: {}",
            crate::store::text::escape(&target),
            crate::store::text::escape(&req.scopes.join(" ")),
            reason.as_str()
        );
        let err = ServiceError::Denied {
            credential: target,
            reason,
        };
        self.refuse_exchange(ctx, &rec, err, Some(detail)).await
    }

    /// RFC 7009: revoke the grant of a revocation handle (`brk_rvk_…`) or of an API token
    /// minted here. `Ok(None)`: not a live token of ours (audited as a refusal like a bad
    /// revocation token on `/v1/revoke`, answered 200 as the RFC asks); an API token already
    /// expired needs nothing (its grant is expired or being reaped).
    pub async fn revoke_presented(
        &self,
        token: &Sensitive,
        ctx: &RequestCtx,
    ) -> Result<Option<(Uuid, GrantStatus)>, ServiceError> {
        let t = token.expose();
        if t.starts_with(REVOCATION_PREFIX) {
            return match self.revoke_by_token(token, ctx).await {
                Ok(r) => Ok(Some(r)),
                Err(ServiceError::BadRevocationToken) => Ok(None),
                Err(e) => Err(e),
            };
        }
        let now = self.clock.now();
        let grant = match self.api_tokens.check(t, now) {
            Ok(c) => c.gid.parse::<Uuid>().ok().map(|gid| (gid, c.jti)),
            Err(crate::providers::api_token::TokenCheckError::Expired) => return Ok(None),
            Err(crate::providers::api_token::TokenCheckError::NotOurs) => None,
        };
        let status = match &grant {
            Some((gid, jti)) => self
                .store
                .credential_status(crate::providers::CredentialKind::ApiToken, jti)
                .await?
                .filter(|s| s.grant_id == *gid),
            None => None,
        };
        let Some(status) = status else {
            return match self
                .reject(Action::Revoke, ctx, ServiceError::BadRevocationToken)
                .await
            {
                ServiceError::BadRevocationToken => Ok(None),
                e => Err(e),
            };
        };
        if status.grant_status.is_final() {
            return Ok(Some((status.grant_id, status.grant_status)));
        }
        self.revoke_job_grant(status.grant_id, ctx).await.map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(yaml: &str) -> Bundle {
        Bundle::load_files(
            &[("p.yaml".into(), yaml.into())],
            &crate::policy::LoadOptions::default(),
        )
        .unwrap()
    }

    const CREDS: &str = "credentials:
  - name: deploy
    max_ttl: 15m
    api_token: {audience: https://deploy.example, scopes: ['deploy:${repository}', read]}
  - name: release
    max_ttl: 15m
    api_token: {audience: https://release.example, scopes: ['release:${repository}']}
  - name: release-ro
    max_ttl: 15m
    api_token: {audience: https://release.example, scopes: [read]}
rules: []
";

    fn req(resources: &[&str], audiences: &[&str], scopes: &[&str]) -> TokenExchangeRequest {
        let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect();
        TokenExchangeRequest {
            subject_token: Sensitive::new(String::new()),
            resources: v(resources),
            audiences: v(audiences),
            scopes: v(scopes),
        }
    }

    #[test]
    fn the_target_selects_api_token_credentials() {
        let b = bundle(CREDS);
        let pick = |r: &[&str], a: &[&str], s: &[&str]| candidates(&b, &req(r, a, s));
        let one = |n: &str| Ok(vec![n.to_owned()]);
        assert_eq!(pick(&["https://deploy.example"], &[], &[]), one("deploy"));
        assert_eq!(pick(&[], &["deploy"], &[]), one("deploy"));
        assert_eq!(
            pick(
                &["https://deploy.example"],
                &["deploy"],
                &["read", "deploy:acme/api"]
            ),
            one("deploy")
        );
        // Two credentials share an audience: the scope or the name tells them apart (else
        // the policy does, after verification).
        assert_eq!(
            pick(&["https://release.example"], &[], &[]),
            Ok(vec!["release".to_owned(), "release-ro".to_owned()])
        );
        assert_eq!(
            pick(&["https://release.example"], &[], &["release:acme/api"]),
            one("release")
        );
        assert_eq!(pick(&[], &["release-ro"], &[]), one("release-ro"));
        // Every target must name the same credential.
        assert_eq!(
            pick(&["https://deploy.example"], &["release"], &[]),
            Err(ReasonCode::UnknownCredential)
        );
        assert_eq!(
            pick(&[], &["https://nope.example"], &[]),
            Err(ReasonCode::UnknownCredential)
        );
        assert_eq!(
            pick(&[], &["deploy"], &["admin"]),
            Err(ReasonCode::ScopeNotOffered)
        );
        // No target at all: the scope alone may select.
        assert_eq!(pick(&[], &[], &["release:x/y"]), one("release"));
        assert_eq!(pick(&[], &[], &[]).map(|v| v.len()), Ok(3));
    }
}
