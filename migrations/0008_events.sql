-- Durable events (README, "Events"; src/infra/events): a transactional outbox. A domain write
-- inserts its event row in its own transaction; the relay numbers and publishes rows in order,
-- in-app subscribers handle them, and SSE streams read what a client missed from here.

-- Each workspace's last sequence number, raised by the relay (one pass at a time across the
-- fleet) as it numbers events. No foreign key: a deleted workspace's last event
-- (`workspace.deleted`) keeps its number; the prune drops the counter with the last rows.
CREATE TABLE event_streams (
    workspace_id uuid PRIMARY KEY,
    head bigint NOT NULL
);

CREATE TABLE events (
    -- The order the relay takes rows in (per workspace, the order of their numbers).
    id bigserial PRIMARY KEY,
    workspace_id uuid NOT NULL,
    -- The workspace's sequence number (the SSE id), given by the relay with `published_at`:
    -- NULL until then, so a reader never sees a number before every lower one is readable.
    seq bigint,
    type text NOT NULL,
    data jsonb NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at timestamptz,
    -- Set once every in-app subscriber of its type ran (at once when it has none).
    handled_at timestamptz
);

-- Reads by number (streams catching up); rows not yet numbered are left out by their WHERE.
CREATE UNIQUE INDEX events_workspace_seq ON events (workspace_id, seq);
-- The relay's queue, in order.
CREATE INDEX events_unpublished ON events (id) WHERE published_at IS NULL;
-- The subscribers' queue, in order per workspace.
CREATE INDEX events_unhandled ON events (workspace_id, seq) WHERE handled_at IS NULL AND published_at IS NOT NULL;
-- The prune deletes by age.
CREATE INDEX events_occurred_at ON events (occurred_at);
