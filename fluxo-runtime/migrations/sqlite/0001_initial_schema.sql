-- Fluxo SQLite schema, version 1.
--
-- Times are milliseconds since the Unix epoch. Payloads and journal entries
-- are opaque bytes encoded by the engine.

CREATE TABLE IF NOT EXISTS instances (
    id               TEXT    NOT NULL PRIMARY KEY,
    workflow         TEXT    NOT NULL,
    version          INTEGER NOT NULL,
    status           TEXT    NOT NULL,
    input            BLOB    NOT NULL,
    output           BLOB,
    failure          BLOB,
    parent_id        TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    history_format   INTEGER NOT NULL,
    -- When the instance becomes runnable by itself; NULL while it waits for
    -- its inbox only, or once finished.
    ready_at         INTEGER,
    -- Current lease holder; NULL when not leased.
    lease_owner      TEXT,
    -- Fencing token: incremented by every claim, never reset.
    lease_token      INTEGER NOT NULL DEFAULT 0,
    lease_expires_at INTEGER NOT NULL DEFAULT 0,
    -- Bumped by everything that may un-park the instance.
    inbox_seq        INTEGER NOT NULL DEFAULT 0,
    -- Number of journal entries stored.
    next_event_id    INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);

-- Claiming: unleased running instances in wake-up order.
CREATE INDEX IF NOT EXISTS instances_runnable
    ON instances (ready_at)
    WHERE status = 'running' AND lease_owner IS NULL;

-- Claiming: leases in expiry order, to take over the expired ones.
CREATE INDEX IF NOT EXISTS instances_lease_expiry
    ON instances (lease_expires_at)
    WHERE lease_owner IS NOT NULL;

-- Lease renewal by owner.
CREATE INDEX IF NOT EXISTS instances_lease_owner
    ON instances (lease_owner)
    WHERE lease_owner IS NOT NULL;

-- Listing, newest first, optionally by workflow or status.
CREATE INDEX IF NOT EXISTS instances_created
    ON instances (created_at);
CREATE INDEX IF NOT EXISTS instances_workflow_created
    ON instances (workflow, created_at);
CREATE INDEX IF NOT EXISTS instances_status_created
    ON instances (status, created_at);

-- The journal: one row per entry, clustered by instance.
CREATE TABLE IF NOT EXISTS history (
    instance_id TEXT    NOT NULL,
    event_id    INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    data        BLOB    NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (instance_id, event_id)
) WITHOUT ROWID;

-- The signal inbox. AUTOINCREMENT keeps ids increasing even after the newest
-- signal was consumed, so arrival order is never reused.
CREATE TABLE IF NOT EXISTS signals (
    signal_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    instance_id TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE INDEX IF NOT EXISTS signals_by_instance
    ON signals (instance_id, name, signal_id);
