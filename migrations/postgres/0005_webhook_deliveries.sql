-- Job-end webhooks (POST /v1/hooks/github, /v1/hooks/gitlab): replay records for deliveries
-- that were acted on, and the lookup of a finished job's active grants.

CREATE TABLE webhook_deliveries (
    source      text        NOT NULL CHECK (source IN ('github', 'gitlab')),
    delivery_id text        NOT NULL,
    received_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (source, delivery_id)
);

COMMENT ON TABLE webhook_deliveries IS 'Replay records: a signed job-end delivery the broker acted on; a second delivery with the same id is refused (409 replayed_delivery) until expires_at. Only deliveries whose signature verified are recorded, so forged requests cannot block real ones.';
COMMENT ON COLUMN webhook_deliveries.source IS 'Which endpoint received it: github or gitlab.';
COMMENT ON COLUMN webhook_deliveries.delivery_id IS 'X-GitHub-Delivery, or GitLab Idempotency-Key / X-Gitlab-Event-UUID (non-secret, at most 128 characters).';
COMMENT ON COLUMN webhook_deliveries.received_at IS 'When it was accepted (broker clock).';
COMMENT ON COLUMN webhook_deliveries.expires_at IS 'End of the replay window (webhooks.delivery_ttl); the reaper purges rows past it.';

CREATE INDEX webhook_deliveries_expires_at_idx ON webhook_deliveries (expires_at);

-- A finished job's active grants: repository id plus the job id kept in grants.job (GitHub
-- check_run_id, GitLab job_id). Only active rows are indexed; they are few.
CREATE INDEX grants_active_job_idx ON grants (repository_id, (job ->> 'job_id'))
    WHERE status = 'active';
