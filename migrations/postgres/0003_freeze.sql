-- The emergency freeze: while the row exists, every replica refuses new exchanges that match its
-- filter (403 frozen). Kept in the store so it survives restarts and reaches every replica; each
-- replica re-reads it at most every few seconds (see docs/operations.md for the bound).

CREATE TABLE broker_freeze (
    id     integer     PRIMARY KEY CHECK (id = 1),
    filter jsonb       NOT NULL,
    reason text        NOT NULL,
    actor  text        NOT NULL,
    since  timestamptz NOT NULL
);

COMMENT ON TABLE broker_freeze IS 'At most one row: present = exchanges matching filter are refused with 403 frozen.';
COMMENT ON COLUMN broker_freeze.filter IS 'Which exchanges are refused (issuer, repository, repository_id, credential, kind); {} = all.';
COMMENT ON COLUMN broker_freeze.reason IS 'Why, as given by the operator.';
COMMENT ON COLUMN broker_freeze.actor IS 'Who froze (operator:<name>).';
COMMENT ON COLUMN broker_freeze.since IS 'When the freeze was set (broker clock).';
