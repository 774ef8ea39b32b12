-- Initial schema (SQLite): grants (leases on minted credentials), their credentials, replay
-- records and the audit log. Same shape as the Postgres schema, with these encodings:
--   * times are INTEGER unix milliseconds (UTC), written by the broker from its clock;
--   * uuids are TEXT in hyphenated lowercase form;
--   * JSON is TEXT.

-- One grant per successful exchange intent: a lease on the credentials minted for one CI job.
-- Written in 'issuing' before anything is minted so a crash always leaves a revocation path.
CREATE TABLE grants (
    id              TEXT    PRIMARY KEY NOT NULL,  -- grant id (UUIDv7)
    -- lifecycle; every change is a compare-and-set on this column
    status          TEXT    NOT NULL
        CHECK (status IN ('issuing', 'active', 'revoking', 'revoked', 'expired', 'failed')),
    issuer          TEXT    NOT NULL,              -- configured issuer name
    subject         TEXT    NOT NULL,              -- verified sub claim
    repository      TEXT,                          -- repository / project path, if any
    repository_id   TEXT,                          -- immutable repository / project id, if any
    job             TEXT    NOT NULL,              -- non-secret job identity (JSON)
    bundle_digest   TEXT    NOT NULL,              -- policy bundle that allowed the grant
    revocation_hash TEXT    NOT NULL UNIQUE,       -- hex SHA-256 of the revocation token; never the token
    created_at      INTEGER NOT NULL,              -- intent written (unix ms)
    expires_at      INTEGER NOT NULL,              -- credentials stop being valid (unix ms)
    revoked_at      INTEGER,                       -- reached a final state (unix ms)
    -- why revocation started; set on first claim, kept across re-claims
    revoke_cause    TEXT
        CHECK (revoke_cause IN ('requested', 'expired', 'recovery')),
    lease_until     INTEGER,                       -- revoking: claim held until (unix ms)
    revoke_attempts INTEGER NOT NULL DEFAULT 0 CHECK (revoke_attempts >= 0), -- failed attempts
    last_error      TEXT                           -- non-secret text of the last failure
) STRICT;

-- Reaper: active grants past expiry, issuing grants created long ago, revoking with lapsed lease.
CREATE INDEX grants_status_expires_at_idx ON grants (status, expires_at);
CREATE INDEX grants_status_created_at_idx ON grants (status, created_at);
CREATE INDEX grants_lease_until_idx ON grants (lease_until) WHERE status = 'revoking';

-- Credentials recorded with a grant, in request order: what the revoke path needs.
CREATE TABLE grant_credentials (
    grant_id    TEXT    NOT NULL REFERENCES grants (id) ON DELETE CASCADE,
    position    INTEGER NOT NULL CHECK (position >= 0),  -- order within the grant (0-based)
    name        TEXT    NOT NULL,                        -- credential definition name
    kind        TEXT    NOT NULL,                        -- credential kind (api_token, ...)
    resource_id TEXT    NOT NULL,                        -- non-secret id of the minted resource
    details     TEXT    NOT NULL,                        -- non-secret provider details (JSON)
    PRIMARY KEY (grant_id, position),
    UNIQUE (kind, resource_id)                           -- introspection finds exactly one grant
) STRICT;

-- Replay records: a job token (iss, jti) already exchanged, kept until the token expires.
CREATE TABLE used_jti (
    iss        TEXT    NOT NULL,  -- issuer URL (iss claim)
    jti        TEXT    NOT NULL,  -- token id (jti claim)
    expires_at INTEGER NOT NULL,  -- end of the replay window (unix ms)
    PRIMARY KEY (iss, jti)
) STRICT;

CREATE INDEX used_jti_expires_at_idx ON used_jti (expires_at);

-- Append-only audit log. Holds no secret by construction (AuditEvent cannot carry one).
-- grant_id is not a foreign key: deny events have no grant and the log outlives grant rows.
CREATE TABLE audit_events (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order, tie-breaker
    id            TEXT    NOT NULL UNIQUE,            -- event id (UUIDv7)
    time          INTEGER NOT NULL,                   -- when it happened (unix ms)
    action        TEXT    NOT NULL,
    outcome       TEXT    NOT NULL,
    reason        TEXT    NOT NULL,                   -- stable reason code
    grant_id      TEXT,
    request_id    TEXT,
    repository    TEXT,
    repository_id TEXT,
    actor         TEXT,
    event         TEXT    NOT NULL                    -- the whole AuditEvent as JSON
) STRICT;

CREATE INDEX audit_events_time_idx ON audit_events (time, seq);
CREATE INDEX audit_events_grant_id_idx ON audit_events (grant_id) WHERE grant_id IS NOT NULL;
CREATE INDEX audit_events_request_id_idx ON audit_events (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX audit_events_repository_idx ON audit_events (repository, time) WHERE repository IS NOT NULL;
