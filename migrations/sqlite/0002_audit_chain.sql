-- Tamper evidence for the audit log (SQLite): every event is hash-chained to the one before it,
-- and triggers refuse UPDATE and DELETE. Same scheme as the Postgres migration:
-- hash = sha256(prev_hash || canonical event JSON), lowercase hex, computed by the broker; the
-- first chained event has prev_hash = 64 zeros. SQLite has a single writer, and appends run in
-- BEGIN IMMEDIATE transactions, so the chain is extended one event at a time.

ALTER TABLE audit_events ADD COLUMN prev_hash TEXT;  -- NULL only for events older than the chain
ALTER TABLE audit_events ADD COLUMN hash TEXT;       -- NULL only for events older than the chain

CREATE UNIQUE INDEX audit_events_hash_idx ON audit_events (hash) WHERE hash IS NOT NULL;

-- The newest chained event (one row); verify compares it with the newest row.
CREATE TABLE audit_chain_head (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    seq            INTEGER NOT NULL,  -- seq of the newest chained event
    hash           TEXT    NOT NULL,  -- its hash (64 zeros before the first)
    legacy_max_seq INTEGER NOT NULL   -- events up to this seq predate the chain
) STRICT;

INSERT INTO audit_chain_head (id, seq, hash, legacy_max_seq)
SELECT 1, COALESCE(max(seq), 0), '0000000000000000000000000000000000000000000000000000000000000000',
       COALESCE(max(seq), 0)
FROM audit_events;

CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only (UPDATE refused)');
END;

CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only (DELETE refused)');
END;

CREATE TRIGGER audit_chain_head_no_delete BEFORE DELETE ON audit_chain_head
BEGIN
    SELECT RAISE(ABORT, 'audit_chain_head cannot be deleted');
END;
