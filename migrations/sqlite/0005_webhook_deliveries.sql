-- Job-end webhooks: replay records for deliveries that were acted on, and the lookup of a
-- finished job's active grants. Same shape as the Postgres migration.
CREATE TABLE webhook_deliveries (
    source      TEXT    NOT NULL CHECK (source IN ('github', 'gitlab')), -- which endpoint
    delivery_id TEXT    NOT NULL, -- X-GitHub-Delivery / GitLab Idempotency-Key or event UUID
    received_at INTEGER NOT NULL, -- when it was accepted (unix ms)
    expires_at  INTEGER NOT NULL, -- end of the replay window (unix ms); purged after
    PRIMARY KEY (source, delivery_id)
) STRICT;

CREATE INDEX webhook_deliveries_expires_at_idx ON webhook_deliveries (expires_at);

-- A finished job's active grants: repository id plus the job id kept in grants.job.
CREATE INDEX grants_active_job_idx ON grants (repository_id, json_extract(job, '$.job_id'))
    WHERE status = 'active';
