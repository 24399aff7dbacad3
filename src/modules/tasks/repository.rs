use async_trait::async_trait;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::dto::UpdateTaskRequest;
use super::model::{Task, TaskStatus};
use crate::infra::database::Database;
use crate::modules::paging::Paging;

const COLUMNS: &str = "id, project_id, workspace_id, title, description, status, priority, assignee_id, due_date, \
                       completed_at, created_at, updated_at";

/// Which tasks a list shows.
#[derive(Debug, Clone, Copy)]
pub struct TaskListFilter {
    pub status: Option<TaskStatus>,
    pub assignee_id: Option<Uuid>,
}

#[async_trait]
pub trait TaskRepository: Interface {
    /// Inserts `task` as given (`updated_at` = `created_at`), except `id`, which the database sets,
    /// and `completed_at`, which follows the status (as in `update`).
    async fn create(&self, task: &Task) -> Result<Task, sqlx::Error>;
    async fn find(&self, id: Uuid) -> Result<Option<Task>, sqlx::Error>;
    /// One page (plus one row, to tell whether there is a next page) of a project's tasks.
    async fn list_in_project(
        &self,
        project_id: Uuid,
        filter: TaskListFilter,
        paging: Paging,
    ) -> Result<Vec<Task>, sqlx::Error>;
    /// `list_in_project`, if `user_id` is a member of the project's workspace (`None` when not, or
    /// when there is no such project): authorization and the page in one statement.
    async fn list_in_project_as_member(
        &self,
        user_id: Uuid,
        project_id: Uuid,
        filter: TaskListFilter,
        paging: Paging,
    ) -> Result<Option<Vec<Task>>, sqlx::Error>;
    /// Tasks assigned to `user_id` in workspaces they are still a member of (page + one row).
    async fn list_assigned(
        &self,
        user_id: Uuid,
        status: Option<TaskStatus>,
        paging: Paging,
    ) -> Result<Vec<Task>, sqlx::Error>;
    /// Applies `change` (absent fields stay) to the task under its row lock, so two concurrent
    /// updates never revert each other. Returns the row as locked and as written.
    async fn update(&self, id: Uuid, change: &UpdateTaskRequest) -> Result<Option<(Task, Task)>, sqlx::Error>;
    async fn delete(&self, id: Uuid) -> Result<bool, sqlx::Error>;
    /// Open tasks with an assignee, due on `day`.
    async fn due_on(&self, day: chrono::NaiveDate) -> Result<Vec<Task>, sqlx::Error>;
}

/// A page of a project's tasks (`$1`), filtered by status (`$2`) and assignee (`$3`), `$4` rows
/// from `$5`: the cached and the uncached list read the same rows in the same order.
const PAGE_IN_PROJECT: &str = "project_id = $1 AND ($2::task_status IS NULL OR status = $2)
    AND ($3::uuid IS NULL OR assignee_id = $3) ORDER BY created_at, id LIMIT $4 OFFSET $5";

#[derive(Component)]
#[shaku(interface = TaskRepository)]
pub struct PgTaskRepository {
    #[shaku(inject)]
    db: Arc<dyn Database>,
}

#[async_trait]
impl TaskRepository for PgTaskRepository {
    async fn create(&self, task: &Task) -> Result<Task, sqlx::Error> {
        let sql = format!(
            "INSERT INTO tasks (project_id, workspace_id, title, description, status, priority, assignee_id, due_date,
                                completed_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $5 = 'done' THEN $9 END, $9, $9)
             RETURNING {COLUMNS}"
        );
        let query = sqlx::query_as(&sql)
            .bind(task.project_id)
            .bind(task.workspace_id)
            .bind(&task.title)
            .bind(&task.description)
            .bind(task.status)
            .bind(task.priority)
            .bind(task.assignee_id)
            .bind(task.due_date)
            // The service's clock; a task created as done is completed when it is created.
            .bind(task.created_at);
        let write = async {
            let mut write = self.db.writer().await?;
            let created = query.fetch_one(write.conn()).await?;
            write.commit().await?;
            Ok(created)
        };
        self.db.run(write).await
    }

    async fn find(&self, id: Uuid) -> Result<Option<Task>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM tasks WHERE id = $1");
        self.db
            .run(sqlx::query_as(&sql).bind(id).fetch_optional(self.db.pool()))
            .await
    }

    async fn list_in_project(
        &self,
        project_id: Uuid,
        filter: TaskListFilter,
        paging: Paging,
    ) -> Result<Vec<Task>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM tasks WHERE {PAGE_IN_PROJECT}");
        let query = sqlx::query_as(&sql)
            .bind(project_id)
            .bind(filter.status)
            .bind(filter.assignee_id)
            .bind(paging.limit + 1)
            .bind(paging.offset);
        self.db.run(query.fetch_all(self.db.pool())).await
    }

    async fn list_in_project_as_member(
        &self,
        user_id: Uuid,
        project_id: Uuid,
        filter: TaskListFilter,
        paging: Paging,
    ) -> Result<Option<Vec<Task>>, sqlx::Error> {
        use sqlx::{FromRow, Row};
        // One row at least (the access check); the page's rows, if any, ride along with it.
        let sql = format!(
            "SELECT access.allowed, page.* FROM
               (SELECT EXISTS (SELECT 1 FROM projects p JOIN workspace_members m ON m.workspace_id = p.workspace_id
                               WHERE p.id = $1 AND m.user_id = $6) AS allowed) AS access
             LEFT JOIN LATERAL
               (SELECT {COLUMNS} FROM tasks WHERE access.allowed AND {PAGE_IN_PROJECT}) AS page ON true"
        );
        let query = sqlx::query(&sql)
            .bind(project_id)
            .bind(filter.status)
            .bind(filter.assignee_id)
            .bind(paging.limit + 1)
            .bind(paging.offset)
            .bind(user_id);
        let rows = self.db.run(query.fetch_all(self.db.pool())).await?;
        if !rows
            .first()
            .map(|row| row.try_get::<bool, _>("allowed"))
            .transpose()?
            .unwrap_or(false)
        {
            return Ok(None);
        }
        let mut tasks = Vec::with_capacity(rows.len());
        for row in rows {
            if row.try_get::<Option<Uuid>, _>("id")?.is_some() {
                tasks.push(Task::from_row(&row)?);
            }
        }
        Ok(Some(tasks))
    }

    async fn list_assigned(
        &self,
        user_id: Uuid,
        status: Option<TaskStatus>,
        paging: Paging,
    ) -> Result<Vec<Task>, sqlx::Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tasks t
             WHERE t.assignee_id = $1 AND ($2::task_status IS NULL OR t.status = $2)
               AND EXISTS (SELECT 1 FROM workspace_members m WHERE m.workspace_id = t.workspace_id AND m.user_id = $1)
             ORDER BY t.created_at, t.id LIMIT $3 OFFSET $4"
        );
        let query = sqlx::query_as(&sql)
            .bind(user_id)
            .bind(status)
            .bind(paging.limit + 1)
            .bind(paging.offset);
        self.db.run(query.fetch_all(self.db.pool())).await
    }

    async fn update(&self, id: Uuid, change: &UpdateTaskRequest) -> Result<Option<(Task, Task)>, sqlx::Error> {
        // One statement: the change applies to the row as locked (a concurrent update of another
        // field stays), and no transaction costs a BEGIN and a COMMIT round trip. `before` is that
        // locked row, read once (a CTE used twice is computed once). Both rows are selected by
        // column name, so the table's column order does not matter.
        let sql = format!(
            "WITH before AS (SELECT {COLUMNS} FROM tasks WHERE id = $1 FOR UPDATE),
                  after AS (
                    UPDATE tasks AS t SET
                        title = COALESCE($2, t.title),
                        description = CASE WHEN $3 THEN $4 ELSE t.description END,
                        status = COALESCE($5, t.status),
                        priority = COALESCE($6, t.priority),
                        assignee_id = CASE WHEN $7 THEN $8 ELSE t.assignee_id END,
                        due_date = CASE WHEN $9 THEN $10 ELSE t.due_date END,
                        completed_at = CASE WHEN COALESCE($5, t.status) <> 'done' THEN NULL
                                            WHEN t.status = 'done' THEN t.completed_at ELSE now() END,
                        updated_at = now()
                    FROM before WHERE t.id = before.id
                    RETURNING t.*)
             SELECT 0 AS version, {COLUMNS} FROM before
             UNION ALL SELECT 1, {COLUMNS} FROM after ORDER BY version"
        );
        let query = sqlx::query_as(&sql)
            .bind(id)
            .bind(change.title.as_deref())
            .bind(change.description.is_some())
            .bind(change.description.as_ref().and_then(Option::as_deref))
            .bind(change.status)
            .bind(change.priority)
            .bind(change.assignee_id.is_some())
            .bind(change.assignee_id.flatten())
            .bind(change.due_date.is_some())
            .bind(change.due_date.flatten());
        let write = async {
            let mut write = self.db.writer().await?;
            let rows: Vec<Task> = query.fetch_all(write.conn()).await?;
            write.commit().await?;
            Ok(rows)
        };
        let mut rows = self.db.run(write).await?;
        let (Some(after), Some(before)) = (rows.pop(), rows.pop()) else {
            return Ok(None);
        };
        Ok(Some((before, after)))
    }

    async fn due_on(&self, day: chrono::NaiveDate) -> Result<Vec<Task>, sqlx::Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM tasks WHERE due_date = $1 AND assignee_id IS NOT NULL AND status <> 'done'
             ORDER BY workspace_id, id"
        );
        self.db
            .run(sqlx::query_as(&sql).bind(day).fetch_all(self.db.pool()))
            .await
    }

    async fn delete(&self, id: Uuid) -> Result<bool, sqlx::Error> {
        let query = sqlx::query("DELETE FROM tasks WHERE id = $1").bind(id);
        let write = async {
            let mut write = self.db.writer().await?;
            let deleted = query.execute(write.conn()).await?.rows_affected() == 1;
            write.commit().await?;
            Ok(deleted)
        };
        self.db.run(write).await
    }
}
