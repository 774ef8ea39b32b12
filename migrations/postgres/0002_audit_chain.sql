-- Tamper evidence for the audit log: every event is hash-chained to the one before it, and the
-- table refuses UPDATE, DELETE and TRUNCATE.
--
-- hash = sha256(prev_hash || canonical event JSON), lowercase hex; the first chained event has
-- prev_hash = 64 zeros. The broker computes hashes (the canonical form is defined in
-- broker/src/store/chain.rs); the database only keeps them.
--
-- Appenders serialise on the single row of audit_chain_head (SELECT ... FOR UPDATE inside the
-- transaction that appends), so concurrent replicas extend one chain, in seq order.

ALTER TABLE audit_events ADD COLUMN prev_hash text;
ALTER TABLE audit_events ADD COLUMN hash text;

COMMENT ON COLUMN audit_events.prev_hash IS 'hash of the previous event in the chain (64 zeros for the first). NULL only for events written before the chain existed.';
COMMENT ON COLUMN audit_events.hash IS 'Lowercase hex sha256(prev_hash || canonical event JSON). NULL only for events written before the chain existed.';

CREATE UNIQUE INDEX audit_events_hash_idx ON audit_events (hash) WHERE hash IS NOT NULL;

CREATE TABLE audit_chain_head (
    id              integer PRIMARY KEY CHECK (id = 1),
    seq             bigint  NOT NULL,
    hash            text    NOT NULL,
    legacy_max_seq  bigint  NOT NULL
);

COMMENT ON TABLE audit_chain_head IS 'The newest chained audit event (one row). Appenders lock it to extend the chain one at a time; verify compares it with the newest row to detect a truncated tail.';
COMMENT ON COLUMN audit_chain_head.seq IS 'seq of the newest chained event (legacy_max_seq before the first).';
COMMENT ON COLUMN audit_chain_head.hash IS 'hash of the newest chained event (64 zeros before the first).';
COMMENT ON COLUMN audit_chain_head.legacy_max_seq IS 'Events with seq up to this predate the chain and carry no hash; any later event without one is a break.';

INSERT INTO audit_chain_head (id, seq, hash, legacy_max_seq)
SELECT 1, COALESCE(max(seq), 0), repeat('0', 64), COALESCE(max(seq), 0) FROM audit_events;

CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- The head only moves forward: it may be updated, never deleted.
CREATE TRIGGER audit_chain_head_no_delete
    BEFORE DELETE OR TRUNCATE ON audit_chain_head
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
