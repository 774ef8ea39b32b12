-- The emergency freeze: while the row exists, new exchanges matching its filter are refused
-- (403 frozen). Same shape as the Postgres table.
CREATE TABLE broker_freeze (
    id     INTEGER PRIMARY KEY CHECK (id = 1),
    filter TEXT    NOT NULL,  -- JSON filter; {} = all exchanges
    reason TEXT    NOT NULL,  -- why, as given by the operator
    actor  TEXT    NOT NULL,  -- operator:<name>
    since  INTEGER NOT NULL   -- when it was set (unix ms)
) STRICT;
