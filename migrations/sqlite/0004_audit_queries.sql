-- Audit queries (GET /v1/audit, `broker audit query`): indexes for the common filters. Every
-- query orders newest first by (time, seq), so each index ends in time. Filters on grant_id,
-- request_id and repository use the indexes of 0001; the credential-name filter reads the event
-- JSON (json_each) of rows the other filters left.

CREATE INDEX audit_events_repository_id_idx ON audit_events (repository_id, time)
    WHERE repository_id IS NOT NULL;
CREATE INDEX audit_events_actor_idx ON audit_events (actor, time) WHERE actor IS NOT NULL;
CREATE INDEX audit_events_outcome_idx ON audit_events (outcome, time, seq);
CREATE INDEX audit_events_reason_idx ON audit_events (reason, time);
-- Kind filter: grants holding a credential of a kind.
CREATE INDEX grant_credentials_kind_grant_id_idx ON grant_credentials (kind, grant_id);
