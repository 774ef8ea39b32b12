-- Initial schema: grants (leases on minted credentials), their credentials, replay records and
-- the audit log. Every time is a timestamptz written by the broker from its clock (never now()),
-- so expiry decisions stay testable and identical across backends.

CREATE TABLE grants (
    id              uuid        PRIMARY KEY,
    status          text        NOT NULL
        CHECK (status IN ('issuing', 'active', 'revoking', 'revoked', 'expired', 'failed')),
    issuer          text        NOT NULL,
    subject         text        NOT NULL,
    repository      text,
    repository_id   text,
    job             jsonb       NOT NULL,
    bundle_digest   text        NOT NULL,
    revocation_hash text        NOT NULL UNIQUE,
    created_at      timestamptz NOT NULL,
    expires_at      timestamptz NOT NULL,
    revoked_at      timestamptz,
    revoke_cause    text
        CHECK (revoke_cause IN ('requested', 'expired', 'recovery')),
    lease_until     timestamptz,
    revoke_attempts integer     NOT NULL DEFAULT 0 CHECK (revoke_attempts >= 0),
    last_error      text
);

COMMENT ON TABLE grants IS 'One grant per successful exchange intent: a lease on the credentials minted for one CI job. Written in issuing before anything is minted so a crash always leaves a revocation path.';
COMMENT ON COLUMN grants.id IS 'Grant id (UUIDv7 chosen by the broker); also the seed of deterministic resource ids.';
COMMENT ON COLUMN grants.status IS 'Lifecycle: issuing -> active -> revoking -> revoked|expired, or issuing -> failed. Every change is a compare-and-set on this column.';
COMMENT ON COLUMN grants.issuer IS 'Configured issuer name the job token was verified against.';
COMMENT ON COLUMN grants.subject IS 'Verified sub claim of the job token.';
COMMENT ON COLUMN grants.repository IS 'Repository (GitHub) or project path (GitLab) of the job, if the issuer provides one.';
COMMENT ON COLUMN grants.repository_id IS 'Immutable repository/project id of the job, if the issuer provides one.';
COMMENT ON COLUMN grants.job IS 'Non-secret job identity (run id, attempt, job id) for webhooks and operators.';
COMMENT ON COLUMN grants.bundle_digest IS 'Digest of the policy bundle that allowed the grant.';
COMMENT ON COLUMN grants.revocation_hash IS 'Lowercase hex SHA-256 of the revocation token handed to the job. The token itself is never stored.';
COMMENT ON COLUMN grants.created_at IS 'When the intent was written (broker clock).';
COMMENT ON COLUMN grants.expires_at IS 'When the credentials stop being valid; the reaper revokes active grants past this time.';
COMMENT ON COLUMN grants.revoked_at IS 'When the grant reached a final state after revocation or failure.';
COMMENT ON COLUMN grants.revoke_cause IS 'Why revocation started (requested, expired, recovery); set on first claim and kept across re-claims; decides the final status.';
COMMENT ON COLUMN grants.lease_until IS 'While revoking: the claim is held until this time; afterwards (or at the retry time) another worker may re-claim it.';
COMMENT ON COLUMN grants.revoke_attempts IS 'Number of revocation attempts that failed so far.';
COMMENT ON COLUMN grants.last_error IS 'Non-secret text of the last failed revocation attempt.';

-- The reaper looks for active grants past expiry and issuing grants created long ago.
CREATE INDEX grants_status_expires_at_idx ON grants (status, expires_at);
CREATE INDEX grants_status_created_at_idx ON grants (status, created_at);
-- Revoking grants whose lease ran out (only revoking rows carry a lease).
CREATE INDEX grants_lease_until_idx ON grants (lease_until) WHERE status = 'revoking';

CREATE TABLE grant_credentials (
    grant_id    uuid    NOT NULL REFERENCES grants (id) ON DELETE CASCADE,
    position    integer NOT NULL CHECK (position >= 0),
    name        text    NOT NULL,
    kind        text    NOT NULL,
    resource_id text    NOT NULL,
    details     jsonb   NOT NULL,
    PRIMARY KEY (grant_id, position),
    CONSTRAINT grant_credentials_kind_resource_id_key UNIQUE (kind, resource_id)
);

COMMENT ON TABLE grant_credentials IS 'Credentials recorded with a grant, in request order; what the revoke path needs to undo each one.';
COMMENT ON COLUMN grant_credentials.grant_id IS 'Owning grant.';
COMMENT ON COLUMN grant_credentials.position IS 'Order within the grant (0-based), same as the exchange request and response.';
COMMENT ON COLUMN grant_credentials.name IS 'Credential definition name from the policy files.';
COMMENT ON COLUMN grant_credentials.kind IS 'Credential kind (api_token, ...).';
COMMENT ON COLUMN grant_credentials.resource_id IS 'Non-secret id of the minted resource (token id, role name, session name); unique per kind so introspection finds exactly one grant.';
COMMENT ON COLUMN grant_credentials.details IS 'Non-secret provider details from the intent, replaced by the minted details on activation.';

CREATE TABLE used_jti (
    iss        text        NOT NULL,
    jti        text        NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (iss, jti)
);

COMMENT ON TABLE used_jti IS 'Replay records: a job token (iss, jti) that was already exchanged; kept until the token itself expires.';
COMMENT ON COLUMN used_jti.iss IS 'Issuer URL (iss claim) of the token.';
COMMENT ON COLUMN used_jti.jti IS 'Token id (jti claim).';
COMMENT ON COLUMN used_jti.expires_at IS 'End of the replay window (token exp plus leeway); a record past it may be replaced or purged.';

CREATE INDEX used_jti_expires_at_idx ON used_jti (expires_at);

CREATE TABLE audit_events (
    seq           bigserial   PRIMARY KEY,
    id            uuid        NOT NULL UNIQUE,
    time          timestamptz NOT NULL,
    action        text        NOT NULL,
    outcome       text        NOT NULL,
    reason        text        NOT NULL,
    grant_id      uuid,
    request_id    text,
    repository    text,
    repository_id text,
    actor         text,
    event         jsonb       NOT NULL
);

COMMENT ON TABLE audit_events IS 'Append-only audit log: every exchange attempt, revocation and reaping. Holds no secret by construction (AuditEvent cannot carry one).';
COMMENT ON COLUMN audit_events.seq IS 'Insertion order; breaks ties between events with the same time.';
COMMENT ON COLUMN audit_events.id IS 'Event id (UUIDv7).';
COMMENT ON COLUMN audit_events.time IS 'When the event happened (broker clock).';
COMMENT ON COLUMN audit_events.action IS 'What happened (exchange, revoke, expire, recover, revoke_failed, admin).';
COMMENT ON COLUMN audit_events.outcome IS 'allow, deny, error, success or failure.';
COMMENT ON COLUMN audit_events.reason IS 'Stable snake_case reason code.';
COMMENT ON COLUMN audit_events.grant_id IS 'Grant concerned, if any. Not a foreign key: deny events have no grant and the log must outlive grant rows.';
COMMENT ON COLUMN audit_events.request_id IS 'HTTP request id, to join with access logs.';
COMMENT ON COLUMN audit_events.repository IS 'Repository of the job (copied from the event for filtering).';
COMMENT ON COLUMN audit_events.repository_id IS 'Repository id of the job (copied from the event for filtering).';
COMMENT ON COLUMN audit_events.actor IS 'Who acted for revocations and admin actions (job, reaper, operator:<name>).';
COMMENT ON COLUMN audit_events.event IS 'The whole AuditEvent as JSON; the columns above are copies for indexing.';

CREATE INDEX audit_events_time_idx ON audit_events (time, seq);
CREATE INDEX audit_events_grant_id_idx ON audit_events (grant_id) WHERE grant_id IS NOT NULL;
CREATE INDEX audit_events_request_id_idx ON audit_events (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX audit_events_repository_idx ON audit_events (repository, time) WHERE repository IS NOT NULL;
