-- Fluxo Postgres schema, version 1.
--
-- {schema} is replaced by the store's schema (a validated, quoted
-- identifier) before the migration runs. Times are milliseconds since the
-- Unix epoch by the server's clock. Payloads and journal entries are opaque
-- bytes encoded by the engine.

CREATE TABLE {schema}.instances (
    id               TEXT    NOT NULL PRIMARY KEY,
    workflow         TEXT    NOT NULL,
    version          BIGINT  NOT NULL,
    status           TEXT    NOT NULL,
    input            BYTEA   NOT NULL,
    output           BYTEA,
    failure          BYTEA,
    parent_id        TEXT,
    cancel_requested BOOLEAN NOT NULL DEFAULT false,
    history_format   BIGINT  NOT NULL,
    -- When the instance becomes runnable by itself; NULL while it waits for
    -- its inbox only, or once finished.
    ready_at         BIGINT,
    -- Current lease holder; NULL when not leased.
    lease_owner      TEXT,
    -- Fencing token: incremented by every claim, never reset.
    lease_token      BIGINT  NOT NULL DEFAULT 0,
    lease_expires_at BIGINT  NOT NULL DEFAULT 0,
    -- Bumped by everything that may un-park the instance.
    inbox_seq        BIGINT  NOT NULL DEFAULT 0,
    -- Number of journal entries stored.
    next_event_id    BIGINT  NOT NULL DEFAULT 0,
    -- Creation order, to list instances created in the same millisecond.
    created_seq      BIGINT  GENERATED ALWAYS AS IDENTITY,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL
) WITH (fillfactor = 80);

-- Claiming: unleased running instances in wake-up order.
CREATE INDEX instances_runnable
    ON {schema}.instances (ready_at)
    WHERE status = 'running' AND lease_owner IS NULL;

-- Claiming: leases in expiry order, to take over the expired ones.
CREATE INDEX instances_lease_expiry
    ON {schema}.instances (lease_expires_at)
    WHERE lease_owner IS NOT NULL;

-- Lease renewal by owner.
CREATE INDEX instances_lease_owner
    ON {schema}.instances (lease_owner)
    WHERE lease_owner IS NOT NULL;

-- Listing, newest first, optionally by workflow or status.
CREATE INDEX instances_created
    ON {schema}.instances (created_at, created_seq);
CREATE INDEX instances_workflow_created
    ON {schema}.instances (workflow, created_at, created_seq);
CREATE INDEX instances_status_created
    ON {schema}.instances (status, created_at, created_seq);

-- The journal: one row per entry.
CREATE TABLE {schema}.history (
    instance_id TEXT   NOT NULL,
    event_id    BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    kind        TEXT   NOT NULL,
    data        BYTEA  NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (instance_id, event_id)
);

-- The signal inbox. Ids come from a sequence, so arrival order is never
-- reused, even after the newest signal was consumed.
CREATE TABLE {schema}.signals (
    signal_id   BIGSERIAL PRIMARY KEY,
    instance_id TEXT   NOT NULL,
    name        TEXT   NOT NULL,
    payload     BYTEA  NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE INDEX signals_by_instance
    ON {schema}.signals (instance_id, name, signal_id);
