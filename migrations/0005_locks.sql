-- Locks and semaphores (`infra::locks`). Postgres keeps their leases in memory and memory-synced
-- modes, and the fencing tokens of every lock whichever store keeps the lease.

-- One row per lock name, kept for good: `fence` is the last fencing token issued for the name, by
-- either store, and only grows. `owner` and `expires_at` are the lease while it is held here
-- (NULL when free, or when the lease lives in Redis).
CREATE TABLE locks (
    name       text PRIMARY KEY,
    fence      bigint NOT NULL,
    owner      uuid,
    expires_at timestamptz
);

-- One row per holder of a semaphore's permit; rows whose lease ended are deleted by the next
-- acquisition of the same name.
CREATE TABLE semaphore_permits (
    name       text NOT NULL,
    holder     uuid NOT NULL,
    expires_at timestamptz NOT NULL,
    CONSTRAINT semaphore_permits_pkey PRIMARY KEY (name, holder)
);
