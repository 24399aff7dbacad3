-- Durable events (README, "Events"; src/infra/events): a transactional outbox. A domain write
-- inserts its event row in its own transaction; the relay publishes rows not yet published, and
-- SSE streams read what a client missed from here.

-- Each workspace's last sequence number. Taking the next one locks the workspace's row until the
-- transaction ends, so numbers are handed out in commit order: a reader that has seen number N
-- has seen (or can read) every number below it. No foreign key: a deleted workspace's last event
-- (`workspace.deleted`) keeps its number, and its stream is pruned with its rows.
CREATE TABLE event_streams (
    workspace_id uuid PRIMARY KEY,
    head bigint NOT NULL
);

CREATE TABLE events (
    workspace_id uuid NOT NULL,
    seq bigint NOT NULL,
    type text NOT NULL,
    data jsonb NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- Set by the relay once the event is published; NULL rows are its queue.
    published_at timestamptz,
    PRIMARY KEY (workspace_id, seq)
);

-- The relay's queue, in order: only unpublished rows are in this index.
CREATE INDEX events_unpublished ON events (workspace_id, seq) WHERE published_at IS NULL;
-- The prune deletes by age.
CREATE INDEX events_occurred_at ON events (occurred_at);
