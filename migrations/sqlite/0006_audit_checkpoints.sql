-- Audit checkpoints and retention (SQLite). Same scheme as the Postgres migration: a checkpoint
-- records the seq and hash of an event and how many chained events (pruned ones included) lead
-- up to it; kind 'export' is printed signed by `broker audit checkpoint`, kind 'prune' is
-- written by `broker audit prune` at the cut in the transaction that deletes up to it.
--
-- SQLite has no session settings, so the prune transaction switches audit_prune_guard on, deletes
-- and switches it off again before committing (nobody else sees it on: one writer at a time).
-- A DELETE on audit_events is refused unless the guard is on AND the row lies at or before the
-- newest prune checkpoint; a prune checkpoint must name a stored event, its hash and the true
-- count. LIMIT: whoever can write the database file can drop triggers; only checkpoints kept
-- off-box help against that.

CREATE TABLE audit_checkpoints (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    kind            TEXT    NOT NULL CHECK (kind IN ('export', 'prune')),
    created_at      INTEGER NOT NULL,  -- unix milliseconds (broker clock)
    seq             INTEGER NOT NULL,  -- seq of the last event covered
    hash            TEXT    NOT NULL,  -- chain hash at that event (64 zeros before the first)
    event_count     INTEGER NOT NULL CHECK (event_count >= 0),  -- chained events up to seq, pruned included
    last_event_id   TEXT,              -- id of the event at seq
    last_event_time INTEGER,           -- its time, unix milliseconds
    pruned_before   INTEGER            -- prune only: the DATE given, unix milliseconds
) STRICT;

CREATE INDEX audit_checkpoints_kind_seq_idx ON audit_checkpoints (kind, seq);

-- On only inside a prune transaction (one row).
CREATE TABLE audit_prune_guard (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    active INTEGER NOT NULL
) STRICT;
INSERT INTO audit_prune_guard (id, active) VALUES (1, 0);

CREATE TRIGGER audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoints is append-only (UPDATE refused)');
END;
CREATE TRIGGER audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
BEGIN
    SELECT RAISE(ABORT, 'audit_checkpoints is append-only (DELETE refused)');
END;
CREATE TRIGGER audit_prune_guard_no_delete BEFORE DELETE ON audit_prune_guard
BEGIN
    SELECT RAISE(ABORT, 'audit_prune_guard cannot be deleted');
END;

CREATE TRIGGER audit_checkpoints_check_prune BEFORE INSERT ON audit_checkpoints
WHEN NEW.kind = 'prune'
BEGIN
    SELECT RAISE(ABORT, 'prune checkpoints only move forward')
    WHERE NEW.seq <= COALESCE((SELECT max(seq) FROM audit_checkpoints WHERE kind = 'prune'), 0);
    SELECT RAISE(ABORT, 'a prune checkpoint must name a stored event and its hash')
    WHERE NOT EXISTS (
        SELECT 1 FROM audit_events e
        WHERE e.seq = NEW.seq
          AND COALESCE(e.hash, '0000000000000000000000000000000000000000000000000000000000000000') = NEW.hash);
    SELECT RAISE(ABORT, 'a prune checkpoint must count the events it cuts')
    WHERE NEW.event_count <>
        COALESCE((SELECT event_count FROM audit_checkpoints WHERE kind = 'prune'
                  ORDER BY seq DESC LIMIT 1), 0)
        + (SELECT count(*) FROM audit_events e
           WHERE e.seq > COALESCE((SELECT max(seq) FROM audit_checkpoints WHERE kind = 'prune'), 0)
             AND e.seq <= NEW.seq AND e.hash IS NOT NULL);
END;

-- DELETE only inside a prune transaction and only up to the newest prune checkpoint. Same name
-- as the trigger of 0002, which this replaces.
DROP TRIGGER audit_events_no_delete;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
WHEN (SELECT active FROM audit_prune_guard WHERE id = 1) IS NOT 1
  OR OLD.seq > COALESCE((SELECT max(seq) FROM audit_checkpoints WHERE kind = 'prune'), 0)
BEGIN
    SELECT RAISE(ABORT, 'audit_events is append-only (DELETE refused)');
END;
