-- In-app event subscribers (src/infra/events) run apart from the relay: a slow or failing
-- subscriber must not hold back the events streamed to clients. Each event is marked once every
-- subscriber of its type has run; an event of a type nobody subscribes to is marked when recorded.
ALTER TABLE events ADD COLUMN handled_at timestamptz;
-- Recorded before subscribers had a queue of their own: the relay ran them already.
UPDATE events SET handled_at = coalesce(published_at, now());

-- The subscribers' queue, in order: only rows still to handle are in this index.
CREATE INDEX events_unhandled ON events (workspace_id, seq) WHERE handled_at IS NULL;
