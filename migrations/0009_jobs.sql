-- Background jobs (README, "Jobs"; src/infra/jobs): a queue in Postgres, so that a job is enqueued
-- in the same transaction as the write that causes it (a rolled-back write enqueues nothing) and
-- nothing depends on Redis.
CREATE TABLE jobs (
    id bigserial PRIMARY KEY,
    queue text NOT NULL,
    kind text NOT NULL,
    payload jsonb NOT NULL,
    -- queued: waits for run_at; running: held by `worker` until `lease_until` (renewed while it
    -- runs); done; dead: failed its last attempt (kept with `last_error`).
    state text NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done', 'dead')),
    attempts integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL CHECK (max_attempts > 0),
    run_at timestamptz NOT NULL DEFAULT now(),
    -- A job of a kind that coalesces: while one with this key is queued, another is not added.
    unique_key text,
    worker text,
    lease_until timestamptz,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz
);

-- What workers take, oldest due first.
CREATE INDEX jobs_due ON jobs (queue, run_at, id) WHERE state = 'queued';
-- Leases that may have expired (a worker died).
CREATE INDEX jobs_leases ON jobs (lease_until) WHERE state = 'running';
-- Coalescing: one queued job per (kind, key).
CREATE UNIQUE INDEX jobs_queued_once ON jobs (kind, unique_key) WHERE state = 'queued' AND unique_key IS NOT NULL;
-- The dead list, and the purge of finished jobs.
CREATE INDEX jobs_dead ON jobs (id) WHERE state = 'dead';
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE state = 'done';

-- The scheduler: each fire time of each schedule, inserted by the one instance that enqueues its
-- job (the others' inserts conflict), so a tick runs once across the fleet.
CREATE TABLE job_ticks (
    schedule text NOT NULL,
    fire_at timestamptz NOT NULL,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, fire_at)
);
