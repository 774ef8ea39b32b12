-- Audit checkpoints and retention.
--
-- A checkpoint records where the hash chain stood: the seq and hash of an event and how many
-- chained events (from the first ever, pruned ones included) lead up to it. `broker audit
-- checkpoint` records one (kind 'export') and prints it signed, to be kept off this database;
-- `broker audit prune` records one (kind 'prune') at the cut in the transaction that deletes the
-- events up to it, so `broker audit verify` starts the walk from the cut.
--
-- Prune is the only way rows leave audit_events, and the triggers below keep it narrow: a
-- DELETE is refused unless the transaction set broker.audit_prune = 'on' AND the row lies at or
-- before the newest prune checkpoint, and a prune checkpoint is refused unless it names a stored
-- event, its hash and the true count, and moves forward. So the guarded path can only drop a
-- prefix of the log and always leaves an honest, append-only record of what it dropped.
-- LIMIT: a role that owns the tables (or a superuser) can disable triggers and rewrite anything;
-- against that, only checkpoints exported off-box help (see docs/operations.md).

CREATE TABLE audit_checkpoints (
    id              bigserial   PRIMARY KEY,
    kind            text        NOT NULL CHECK (kind IN ('export', 'prune')),
    created_at      timestamptz NOT NULL,
    seq             bigint      NOT NULL,
    hash            text        NOT NULL,
    event_count     bigint      NOT NULL CHECK (event_count >= 0),
    last_event_id   uuid,
    last_event_time timestamptz,
    pruned_before   timestamptz
);

COMMENT ON TABLE audit_checkpoints IS 'Where the audit hash chain stood at a moment: exported (signed copy kept elsewhere) or at a prune cut (the events up to it are deleted). Append-only.';
COMMENT ON COLUMN audit_checkpoints.kind IS 'export (broker audit checkpoint) or prune (broker audit prune: events with seq <= this seq are deleted).';
COMMENT ON COLUMN audit_checkpoints.created_at IS 'When the checkpoint was taken (broker clock).';
COMMENT ON COLUMN audit_checkpoints.seq IS 'seq of the last event covered.';
COMMENT ON COLUMN audit_checkpoints.hash IS 'Chain hash at that event (its hash; 64 zeros before the first chained event).';
COMMENT ON COLUMN audit_checkpoints.event_count IS 'Chained events from the first ever up to and including seq (pruned ones included).';
COMMENT ON COLUMN audit_checkpoints.last_event_id IS 'Id of the event at seq, if any.';
COMMENT ON COLUMN audit_checkpoints.last_event_time IS 'Time of the event at seq, if any.';
COMMENT ON COLUMN audit_checkpoints.pruned_before IS 'prune only: the DATE given to broker audit prune.';

CREATE INDEX audit_checkpoints_kind_seq_idx ON audit_checkpoints (kind, seq);

CREATE FUNCTION audit_checkpoints_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_checkpoints is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_checkpoints_append_only
    BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate
    BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_checkpoints_append_only();

-- A prune checkpoint must be true: it moves forward, names a stored event with its hash, and
-- counts exactly the chained events since the previous cut.
CREATE FUNCTION audit_checkpoints_check_prune() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    prev_seq   bigint;
    prev_count bigint;
BEGIN
    IF NEW.kind <> 'prune' THEN
        RETURN NEW;
    END IF;
    SELECT c.seq, c.event_count INTO prev_seq, prev_count
    FROM audit_checkpoints c WHERE c.kind = 'prune' ORDER BY c.seq DESC LIMIT 1;
    prev_seq := COALESCE(prev_seq, 0);
    prev_count := COALESCE(prev_count, 0);
    IF NEW.seq <= prev_seq THEN
        RAISE EXCEPTION 'prune checkpoints only move forward' USING ERRCODE = 'check_violation';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM audit_events e
                   WHERE e.seq = NEW.seq AND COALESCE(e.hash, repeat('0', 64)) = NEW.hash) THEN
        RAISE EXCEPTION 'a prune checkpoint must name a stored event and its hash'
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.event_count <> prev_count + (SELECT count(*) FROM audit_events e
                                        WHERE e.seq > prev_seq AND e.seq <= NEW.seq
                                          AND e.hash IS NOT NULL) THEN
        RAISE EXCEPTION 'a prune checkpoint must count the events it cuts'
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER audit_checkpoints_check_prune
    BEFORE INSERT ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_check_prune();

-- audit_events rows: UPDATE is always refused; DELETE only inside a prune transaction and only
-- up to the newest prune checkpoint (which the same transaction wrote first).
CREATE FUNCTION audit_events_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       AND current_setting('broker.audit_prune', true) = 'on'
       AND OLD.seq <= (SELECT max(c.seq) FROM audit_checkpoints c WHERE c.kind = 'prune') THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_events is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

DROP TRIGGER audit_events_append_only ON audit_events;
CREATE TRIGGER audit_events_append_only
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_guard();
