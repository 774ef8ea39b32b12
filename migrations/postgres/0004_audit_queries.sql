-- Audit queries (GET /v1/audit, `broker audit query`) and views for analysts.
--
-- Indexes for the common filters. Every query orders newest first by (time, seq), so each
-- index ends in time (or time, seq) and a filtered page is an index range scan. Filters on
-- grant_id, request_id and repository use the indexes of 0001.

CREATE INDEX audit_events_repository_id_idx ON audit_events (repository_id, time)
    WHERE repository_id IS NOT NULL;
CREATE INDEX audit_events_actor_idx ON audit_events (actor, time) WHERE actor IS NOT NULL;
CREATE INDEX audit_events_outcome_idx ON audit_events (outcome, time, seq);
CREATE INDEX audit_events_reason_idx ON audit_events (reason, time);
-- Credential-name filter: containment (@>) on the event's two credential lists.
CREATE INDEX audit_events_credentials_requested_idx ON audit_events
    USING gin ((event -> 'credentials_requested') jsonb_path_ops);
CREATE INDEX audit_events_credentials_granted_idx ON audit_events
    USING gin ((event -> 'credentials_granted') jsonb_path_ops);
-- Kind filter: grants holding a credential of a kind (the unique (kind, resource_id) key of
-- 0001 covers the lookup; this one makes it index-only).
CREATE INDEX grant_credentials_kind_grant_id_idx ON grant_credentials (kind, grant_id);

-- Views for analysts who query Postgres directly. They only read audit_events, so they are as
-- append-only and as secret-free as the table itself.

CREATE VIEW audit_grants AS
SELECT e.seq,
       e.time,
       e.grant_id,
       e.request_id,
       e.repository,
       e.repository_id,
       e.event -> 'job' ->> 'issuer'    AS issuer,
       e.event -> 'job' ->> 'sub'       AS subject,
       e.event -> 'job' ->> 'ref'       AS git_ref,
       e.event -> 'job' ->> 'workflow'  AS workflow,
       e.event -> 'job' ->> 'run_id'    AS run_id,
       e.event -> 'credentials_granted' AS credentials,
       e.event -> 'rules_matched'       AS rules_matched,
       e.event ->> 'bundle_digest'      AS bundle_digest,
       (e.event ->> 'ttl_seconds')::bigint AS ttl_seconds,
       (e.event ->> 'expires_at')::timestamptz AS expires_at
FROM audit_events e
WHERE e.action = 'exchange' AND e.outcome = 'allow';

COMMENT ON VIEW audit_grants IS 'One row per credential grant: exchanges the policy allowed and the broker issued.';
COMMENT ON COLUMN audit_grants.seq IS 'audit_events.seq (insertion order).';
COMMENT ON COLUMN audit_grants.time IS 'When the grant was issued (broker clock).';
COMMENT ON COLUMN audit_grants.grant_id IS 'The grant; join with audit_revocations.grant_id for its end.';
COMMENT ON COLUMN audit_grants.request_id IS 'HTTP request id of the exchange.';
COMMENT ON COLUMN audit_grants.repository IS 'Repository / project path of the job.';
COMMENT ON COLUMN audit_grants.repository_id IS 'Immutable repository / project id of the job.';
COMMENT ON COLUMN audit_grants.issuer IS 'Configured issuer name that verified the job token.';
COMMENT ON COLUMN audit_grants.subject IS 'sub claim of the job token.';
COMMENT ON COLUMN audit_grants.git_ref IS 'ref claim (branch or tag) of the job.';
COMMENT ON COLUMN audit_grants.workflow IS 'Workflow (GitHub) or CI config (GitLab) of the job.';
COMMENT ON COLUMN audit_grants.run_id IS 'Run (GitHub) or pipeline (GitLab) id.';
COMMENT ON COLUMN audit_grants.credentials IS 'JSON array of the credential names granted.';
COMMENT ON COLUMN audit_grants.rules_matched IS 'JSON array of the policy rules that allowed them.';
COMMENT ON COLUMN audit_grants.bundle_digest IS 'Digest of the policy bundle that decided.';
COMMENT ON COLUMN audit_grants.ttl_seconds IS 'Lifetime granted, in seconds.';
COMMENT ON COLUMN audit_grants.expires_at IS 'When the credentials expire.';

CREATE VIEW audit_denials AS
SELECT e.seq,
       e.time,
       e.request_id,
       e.outcome,
       e.reason,
       e.repository,
       e.repository_id,
       e.event -> 'job' ->> 'issuer'      AS issuer,
       e.event -> 'job' ->> 'sub'         AS subject,
       e.event -> 'credentials_requested' AS credentials_requested,
       e.event ->> 'detail'               AS detail,
       e.event ->> 'client_addr'          AS client_addr
FROM audit_events e
WHERE e.action = 'exchange' AND e.outcome IN ('deny', 'error');

COMMENT ON VIEW audit_denials IS 'One row per refused or failed exchange (policy denial, bad token, replay, freeze, provider error).';
COMMENT ON COLUMN audit_denials.seq IS 'audit_events.seq (insertion order).';
COMMENT ON COLUMN audit_denials.time IS 'When the exchange was refused (broker clock).';
COMMENT ON COLUMN audit_denials.request_id IS 'HTTP request id of the exchange.';
COMMENT ON COLUMN audit_denials.outcome IS 'deny (refused) or error (failed while issuing).';
COMMENT ON COLUMN audit_denials.reason IS 'Stable reason code (policy_denied, token_expired, frozen, ...).';
COMMENT ON COLUMN audit_denials.repository IS 'Repository of the job, when its token was verified far enough to know it.';
COMMENT ON COLUMN audit_denials.repository_id IS 'Repository id of the job, likewise.';
COMMENT ON COLUMN audit_denials.issuer IS 'Configured issuer name, if the token got that far.';
COMMENT ON COLUMN audit_denials.subject IS 'sub claim, if the token was verified.';
COMMENT ON COLUMN audit_denials.credentials_requested IS 'JSON array of the credential names asked for.';
COMMENT ON COLUMN audit_denials.detail IS 'Non-secret detail (which credential was denied and why).';
COMMENT ON COLUMN audit_denials.client_addr IS 'Client address of the request.';

CREATE VIEW audit_revocations AS
SELECT e.seq,
       e.time,
       e.grant_id,
       e.action,
       e.outcome,
       e.reason,
       e.actor,
       e.repository,
       e.repository_id,
       e.event -> 'resource_ids' AS resource_ids,
       e.event ->> 'detail'      AS detail
FROM audit_events e
WHERE e.action IN ('revoke', 'expire', 'recover', 'revoke_failed');

COMMENT ON VIEW audit_revocations IS 'One row per revocation attempt: on request, by the reaper after expiry, crash recovery, and failed attempts to be retried.';
COMMENT ON COLUMN audit_revocations.seq IS 'audit_events.seq (insertion order).';
COMMENT ON COLUMN audit_revocations.time IS 'When the attempt finished (broker clock).';
COMMENT ON COLUMN audit_revocations.grant_id IS 'The grant revoked; join with audit_grants.grant_id.';
COMMENT ON COLUMN audit_revocations.action IS 'revoke (requested), expire (reaper), recover (crash cleanup) or revoke_failed (will be retried).';
COMMENT ON COLUMN audit_revocations.outcome IS 'success or failure.';
COMMENT ON COLUMN audit_revocations.reason IS 'Stable reason code.';
COMMENT ON COLUMN audit_revocations.actor IS 'Who revoked: job, reaper, operator:<name>.';
COMMENT ON COLUMN audit_revocations.repository IS 'Repository of the job that held the grant.';
COMMENT ON COLUMN audit_revocations.repository_id IS 'Repository id of the job that held the grant.';
COMMENT ON COLUMN audit_revocations.resource_ids IS 'JSON array of the non-secret ids of the resources revoked.';
COMMENT ON COLUMN audit_revocations.detail IS 'Non-secret detail (e.g. the failure).';
