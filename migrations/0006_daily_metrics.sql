-- Daily workspace metrics as a table (`modules::metrics`): one row per workspace and UTC day,
-- written by a rebuild (`POST /api/workspaces/{id}/metrics/rebuild`) under the workspace's lock.
-- A stored row is exact: every change to a task deletes the rows it can move (its days, and every
-- later day, whose open count it changes), and a read computes days without a row from the tasks.
CREATE TABLE daily_metrics (
    workspace_id       uuid NOT NULL REFERENCES workspaces (id) ON DELETE CASCADE,
    date               date NOT NULL,
    created            bigint NOT NULL,
    completed          bigint NOT NULL,
    open_at_end_of_day bigint NOT NULL,
    CONSTRAINT daily_metrics_pkey PRIMARY KEY (workspace_id, date)
);

-- The fence of the rebuild whose rows are stored, per workspace: a rebuild is written only with a
-- higher one (`… WHERE fence < $fence`), so a holder that paused past its lease while a newer
-- rebuild wrote is refused. Kept per workspace, not per row: task changes delete rows, and a
-- deleted row could not refuse anything.
CREATE TABLE daily_metrics_rebuilds (
    workspace_id uuid PRIMARY KEY REFERENCES workspaces (id) ON DELETE CASCADE,
    fence        bigint NOT NULL,
    rebuilt_at   timestamptz NOT NULL
);

-- The advisory lock that keeps a rebuild (exclusive) and task changes (shared: they do not wait
-- for each other) of one workspace apart. Without it a task change committed while a rebuild
-- computes could delete nothing (the rebuild's rows are not committed yet) and the rebuild would
-- then store counts without it.
CREATE FUNCTION daily_metrics_lock_key(workspace_id uuid) RETURNS bigint
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT hashtextextended('daily_metrics:' || workspace_id::text, 0) $$;

-- A task counts on the day it was created, the day it was completed, and is open on every day in
-- between: a change moves the counts of its earliest day and of every day after it.
CREATE FUNCTION daily_metrics_forget_from(workspace uuid, since timestamptz) RETURNS void
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(daily_metrics_lock_key(workspace));
    DELETE FROM daily_metrics
    WHERE workspace_id = workspace AND date >= (since AT TIME ZONE 'UTC')::date;
END
$$;

-- Both the task as it was and as it is: a task moved to another day forgets both days' rows.
CREATE FUNCTION daily_metrics_forget() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        PERFORM daily_metrics_forget_from(OLD.workspace_id, least(OLD.created_at, OLD.completed_at));
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        PERFORM daily_metrics_forget_from(NEW.workspace_id, least(NEW.created_at, NEW.completed_at));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER tasks_forget_daily_metrics
    AFTER INSERT OR DELETE ON tasks
    FOR EACH ROW EXECUTE FUNCTION daily_metrics_forget();

-- Renaming, assigning or moving a task through statuses short of done touches no count.
CREATE TRIGGER tasks_forget_daily_metrics_on_update
    AFTER UPDATE OF workspace_id, created_at, completed_at ON tasks
    FOR EACH ROW
    WHEN (OLD.workspace_id IS DISTINCT FROM NEW.workspace_id
          OR OLD.created_at IS DISTINCT FROM NEW.created_at
          OR OLD.completed_at IS DISTINCT FROM NEW.completed_at)
    EXECUTE FUNCTION daily_metrics_forget();
