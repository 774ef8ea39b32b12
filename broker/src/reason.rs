//! Every reason code the broker answers with or audits, in one table: its wire string, the HTTP
//! status it is answered with (none for codes that only appear in the audit log), the fixed
//! message clients get, and what the caller should do. `http/error.rs` builds every error body
//! from it, the audit `reason` of refusals is its wire string, and `docs/reason-codes.md` is
//! rendered from it (a test fails when the committed file differs).
//!
//! Invariants:
//! - Wire strings never change: clients, the pipeline integrations and audit queries switch on
//!   them.
//! - Messages are fixed text: never a token, a claim, a secret or a provider's error text. A few
//!   answers add the name the caller itself sent (a credential name), or the request field that
//!   was malformed; the table's message is what every other answer says.
//! - This module knows no HTTP types (the status is a number), so token verification and policy
//!   evaluation may name their codes without depending on the HTTP layer.

macro_rules! reason_codes {
    ($( $(#[$doc:meta])* $variant:ident = $wire:literal, $status:expr, $message:expr, $fix:expr; )*) => {
        /// A stable reason code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ReasonCode {
            $( $(#[$doc])* $variant, )*
        }

        impl ReasonCode {
            /// Every code, in table order.
            pub const ALL: &'static [ReasonCode] = &[$(ReasonCode::$variant),*];

            /// The wire string (the `error` of a response body, the audit `reason`).
            pub fn as_str(self) -> &'static str {
                match self { $(ReasonCode::$variant => $wire,)* }
            }

            /// The code with this wire string.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($wire => Some(ReasonCode::$variant),)* _ => None }
            }

            /// The HTTP status it is answered with; `None`: audited only, never answered.
            pub fn status(self) -> Option<u16> {
                match self { $(ReasonCode::$variant => $status,)* }
            }

            /// The fixed message (for audit-only codes: what it records).
            pub fn message(self) -> &'static str {
                match self { $(ReasonCode::$variant => $message,)* }
            }

            /// What the caller (or operator) should do about it.
            pub fn fix(self) -> &'static str {
                match self { $(ReasonCode::$variant => $fix,)* }
            }
        }
    };
}

const FRESH_TOKEN: &str =
    "request a fresh token for the broker's audience (GitHub: `permissions: id-token: write`)";

reason_codes! {
    // 400: the request itself.
    BadRequest = "bad_request", Some(400), "the request is malformed",
        "fix the request: the message names the field";
    BodyNotObject = "body_not_object", Some(400), "the request body must be a JSON object",
        "send a JSON object";
    InvalidText = "invalid_text", Some(400), "request text the broker cannot accept",
        "a credential name, body key or value, or audit query parameter holds a control character (a NUL...) or is over 1,024 bytes: remove it";
    InvalidParameters = "invalid_parameters", Some(400), "a credential's parameters are malformed or not accepted",
        "fix `parameters.<credential>` in the request: the message names the credential and the parameter";
    UnsupportedGrantType = "unsupported_grant_type", Some(400), "the grant_type is not supported",
        "`POST /oauth2/token` takes `grant_type=urn:ietf:params:oauth:grant-type:token-exchange` (RFC 8693)";
    UnsupportedTokenType = "unsupported_token_type", Some(400), "the token type is not supported",
        "send the job's OIDC token with `subject_token_type` `urn:ietf:params:oauth:token-type:id_token` or `...:jwt`; ask for `requested_token_type` `...:access_token` or `...:jwt` (or leave it out)";
    UnknownFilterValue = "unknown_filter_value", Some(400), "the filter names an issuer, credential or kind this broker does not have",
        "use one of the known values the message lists";
    // 401: the caller's token.
    MissingToken = "missing_token", Some(401), "send the token as `Authorization: Bearer <token>`",
        "send a bearer token (GitHub: `permissions: id-token: write`; fork pull requests never get one)";
    MalformedToken = "malformed_token", Some(401), "the bearer token is not a well-formed JWT",
        FRESH_TOKEN;
    UnknownIssuer = "unknown_issuer", Some(401), "the token's issuer is not configured on this broker",
        "the broker's `issuers:` lacks this platform, or is misconfigured";
    UnsupportedAlgorithm = "unsupported_algorithm", Some(401), "the token's signing algorithm is not allowed for its issuer",
        "the broker's `issuers:` lacks this platform, or is misconfigured";
    UnknownKey = "unknown_key", Some(401), "the token was signed with a key its issuer does not publish",
        "the broker's `issuers:` lacks this platform, or is misconfigured";
    BadSignature = "bad_signature", Some(401), "the token's signature does not verify",
        "job tokens: request a fresh one; webhooks: the delivery is not signed by a configured secret";
    BadAudience = "bad_audience", Some(401), "the token's audience does not include this broker's audience",
        "request the token for the broker's `audience`";
    TokenExpired = "token_expired", Some(401), "the token has expired",
        "re-run; check the runner's clock";
    TokenNotYetValid = "token_not_yet_valid", Some(401), "the token is not valid yet",
        "re-run; check the runner's clock";
    TokenTooOld = "token_too_old", Some(401), "the token was issued too long ago",
        "request the token just before the exchange";
    MissingClaim = "missing_claim", Some(401), "the token lacks a required claim",
        FRESH_TOKEN;
    InvalidClaim = "invalid_claim", Some(401), "the token has a claim of the wrong type",
        FRESH_TOKEN;
    TokenReplayed = "token_replayed", Some(401), "this token was already used; request a fresh one",
        "do not reuse job tokens: request one per exchange";
    InvalidRevocationToken = "invalid_revocation_token", Some(401), "the revocation token is not valid",
        "send the `revocation_token` of the exchange's answer";
    MalformedSecret = "malformed_secret", Some(401), "the token is not a well-formed broker secret (wrong prefix, length or checksum)",
        "send the token exactly as the broker issued it: it was mistyped or truncated (checked offline, before any lookup)";
    OperatorUnauthorized = "operator_unauthorized", Some(401), "the bearer token is not a valid operator token",
        "send an operator token, or a job token an `operators[].oidc` rule matches";
    Unauthorized = "unauthorized", Some(401), "a valid metrics bearer token is required",
        "send `metrics.token` as the bearer token";
    // 403: not allowed.
    PolicyDenied = "policy_denied", Some(403), "the credential is not allowed for this job",
        "the policy does not allow this job; `broker policy explain` shows why";
    ClaimsTooLarge = "claims_too_large", Some(403), "the token's claims exceed the policy engine's limits",
        "a claim cannot be used for the credential: fix the policy";
    InvalidClaimValue = "invalid_claim_value", Some(403), "the credential cannot be issued for this job's claims",
        "a claim cannot be used for the credential: fix the policy";
    Frozen = "frozen", Some(403), "exchanges are frozen by an operator; nothing was issued",
        "wait for the operators to lift the freeze (`GET /v1/admin/freeze` shows it)";
    ParametersExceedPolicy = "parameters_exceed_policy", Some(403), "a credential's parameters ask for more than the policy allows",
        "ask for no more than the credential's policy names (permissions, levels, repositories), or change the policy";
    OperatorForbidden = "operator_forbidden", Some(403), "the operator lacks the role this endpoint needs",
        "use an operator with the role the message names";
    WebhookOutOfScope = "webhook_out_of_scope", Some(403), "the delivery concerns a repository outside the scope of the secret that signed it",
        "a webhook delivery for a repository or project outside its secret's `scope`: audited, nothing revoked";
    // 404 to 431: the HTTP layer.
    NotFound = "not_found", Some(404), "no such endpoint",
        "check the URL (webhook endpoints exist only when `webhooks:` configures them)";
    MethodNotAllowed = "method_not_allowed", Some(405), "this endpoint does not accept that method",
        "use the method the API table lists";
    AuditGap = "audit_gap", Some(410), "audit events after the requested sequence number were pruned",
        "resume the stream from the sequence number in the message; the events before it are in your earlier copy or a signed checkpoint's export";
    HeaderTimeout = "header_timeout", Some(408), "the request's headers did not arrive in time",
        "the request's headers did not arrive within `limits.header_read_timeout`; the connection is closed";
    ReplayedDelivery = "replayed_delivery", Some(409), "this delivery was already processed",
        "nothing to do: the delivery was handled before";
    PayloadTooLarge = "payload_too_large", Some(413), "the request body is too large",
        "send a smaller body (a declared `Content-Length` over the limit is answered at once)";
    TokenTooLarge = "token_too_large", Some(431), "the bearer token is too large",
        "send the job token as issued";
    HeadersTooLarge = "headers_too_large", Some(431), "the request's headers are too large",
        "send smaller headers";
    // 429: too many.
    RateLimited = "rate_limited", Some(429), "too many exchanges for this repository; retry after the time in Retry-After",
        "too many exchanges for one repository; wait `Retry-After` seconds";
    TooManyFailures = "too_many_failures", Some(429), "too many requests from this client failed verification; retry after the time in Retry-After",
        "this client address sent too many requests that failed verification; wait `Retry-After` seconds (a request whose token verifies is never refused this way)";
    // 500: the broker's side, not worth a retry.
    StoreRejected = "store_rejected", Some(500), "the broker's store refused this request's data",
        "nothing was issued; it fails the same way if retried: report it";
    ProviderMisconfigured = "provider_misconfigured", Some(500), "the credential could not be issued; nothing was issued",
        "the broker's provider configuration does not serve this credential: report it";
    ProviderError = "provider_error", Some(500), "the credential could not be issued; nothing was issued",
        "report it";
    // 503: retry later.
    StoreUnavailable = "store_unavailable", Some(503), "the broker's store is unavailable",
        "retry after `Retry-After`; nothing was issued";
    IssuerUnavailable = "issuer_unavailable", Some(503), "the token's issuer keys are unavailable; try again",
        "retry after `Retry-After`; nothing was issued";
    TargetUnavailable = "target_unavailable", Some(503), "the credential's target is unavailable; nothing was issued",
        "retry after `Retry-After`; nothing was issued";
    Overloaded = "overloaded", Some(503), "the broker is at capacity; retry shortly",
        "retry after `Retry-After` (also: the connection cap is reached and no idle connection could be closed)";
    Timeout = "timeout", Some(503), "the request took too long",
        "retry after `Retry-After`; nothing was issued";
    LeakKeysUnavailable = "leak_keys_unavailable", Some(503), "the leak report's signing keys cannot be fetched; try again",
        "GitHub resends the report; check that `leaks.github.keys_url` is reachable from the broker";
    RevokePending = "revoke_pending", Some(503), "revocation failed and will be retried automatically",
        "nothing to do: the reaper retries; the credentials expire at their TTL regardless";
    // Audited only: why a policy denied (answered as `policy_denied`), and what succeeded.
    Ok = "ok", None, "an exchange issued every credential asked for", "";
    NoMatchingRule = "no_matching_rule", None, "policy denial: no rule allows the credential for this job", "answered as `policy_denied`";
    DeniedByRule = "denied_by_rule", None, "policy denial: a deny rule matched", "answered as `policy_denied`";
    AmbiguousTarget = "ambiguous_target", None, "policy denial: the token exchange's `resource`/`audience`/`scope` select more than one credential", "answered as OAuth `invalid_target`: name the credential as `audience`";
    ScopeNotOffered = "scope_not_offered", None, "policy denial: no credential of the token exchange's target offers the requested scope", "answered as OAuth `invalid_scope`";
    UnknownCredential = "unknown_credential", None, "policy denial: no credential of that name", "answered as `policy_denied`";
    Requested = "requested", None, "a revocation asked for (by the job, an operator or a webhook) finished", "";
    Expired = "expired", None, "the reaper revoked a grant at its expiry", "";
    Recovery = "recovery", None, "the reaper revoked a grant a crash left `issuing`", "";
    JobEnded = "job_ended", None, "a job-end webhook delivery was acted on", "";
    RevokeAll = "revoke_all", None, "an operator's revoke-all", "";
    Freeze = "freeze", None, "an operator froze exchanges", "";
    Unfreeze = "unfreeze", None, "an operator lifted the freeze", "";
    FreezeStatus = "freeze_status", None, "an operator read the freeze in force", "";
    AuditQuery = "audit_query", None, "an operator read the audit log", "";
    LeakReported = "leak_reported", None, "a leak report named a credential the broker issued; what was revoked is in the event", "";
    LeakFalsePositive = "leak_false_positive", None, "a leak report named tokens the broker did not issue (hashes in the event)", "";
    AuditStream = "audit_stream", None, "an operator opened the audit stream", "";
}

impl std::fmt::Display for ReasonCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ReasonCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<str> for ReasonCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

/// The table as Markdown (`docs/reason-codes.md`).
pub fn render_markdown() -> String {
    let mut out = String::from(
        "# Reason codes\n\n\
         Generated from `broker/src/reason.rs` (`cargo test -p broker --lib reason::` fails when\n\
         this file differs; `BROKER_UPDATE_DOCS=1` rewrites it). Error bodies are\n\
         `{\"error\": \"<code>\", \"message\": \"...\"}`; clients switch on `error`. The same code is the\n\
         audit event's `reason`.\n\n\
         | code | status | message | what to do |\n|---|---|---|---|\n",
    );
    let cell = |s: &str| s.replace('|', "\\|");
    for c in ReasonCode::ALL {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} |\n",
            c.as_str(),
            c.status()
                .map_or_else(|| "audit only".to_owned(), |s| s.to_string()),
            cell(c.message()),
            cell(c.fix()),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_strings_are_unique_and_parse_back() {
        let mut seen = std::collections::BTreeSet::new();
        for c in ReasonCode::ALL {
            assert!(seen.insert(c.as_str()), "{} twice", c.as_str());
            assert_eq!(ReasonCode::parse(c.as_str()), Some(*c));
            assert!(
                c.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{c}"
            );
        }
        assert_eq!(ReasonCode::parse("nope"), None);
    }

    /// The committed docs table is the one this build renders.
    #[test]
    fn docs_table_is_current() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reason-codes.md");
        let want = render_markdown();
        if std::env::var_os("BROKER_UPDATE_DOCS").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "docs/reason-codes.md is out of date: run `BROKER_UPDATE_DOCS=1 cargo test -p broker --lib reason::`"
        );
    }
}
