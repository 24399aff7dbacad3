use async_trait::async_trait;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::model::Project;
use crate::infra::database::Database;

const COLUMNS: &str = "id, workspace_id, name, description, created_at, updated_at";

#[async_trait]
pub trait ProjectRepository: Interface {
    async fn create(&self, workspace_id: Uuid, name: &str, description: Option<&str>) -> Result<Project, sqlx::Error>;
    async fn list(&self, workspace_id: Uuid) -> Result<Vec<Project>, sqlx::Error>;
    async fn find(&self, id: Uuid) -> Result<Option<Project>, sqlx::Error>;
    async fn save(&self, project: &Project) -> Result<Option<Project>, sqlx::Error>;
    /// Deletes the project and its tasks; returns (task id, assignee) of every deleted task, or
    /// `None` when there was no such project.
    async fn delete(&self, id: Uuid) -> Result<Option<Vec<(Uuid, Option<Uuid>)>>, sqlx::Error>;
}

#[derive(Component)]
#[shaku(interface = ProjectRepository)]
pub struct PgProjectRepository {
    #[shaku(inject)]
    db: Arc<dyn Database>,
}

#[async_trait]
impl ProjectRepository for PgProjectRepository {
    async fn create(&self, workspace_id: Uuid, name: &str, description: Option<&str>) -> Result<Project, sqlx::Error> {
        let sql =
            format!("INSERT INTO projects (workspace_id, name, description) VALUES ($1, $2, $3) RETURNING {COLUMNS}");
        let query = sqlx::query_as(&sql).bind(workspace_id).bind(name).bind(description);
        let write = async {
            let mut write = self.db.writer().await?;
            let created = query.fetch_one(write.conn()).await?;
            write.commit().await?;
            Ok(created)
        };
        self.db.run(write).await
    }

    async fn list(&self, workspace_id: Uuid) -> Result<Vec<Project>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM projects WHERE workspace_id = $1 ORDER BY created_at, id");
        self.db
            .run(sqlx::query_as(&sql).bind(workspace_id).fetch_all(self.db.pool()))
            .await
    }

    async fn find(&self, id: Uuid) -> Result<Option<Project>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM projects WHERE id = $1");
        self.db
            .run(sqlx::query_as(&sql).bind(id).fetch_optional(self.db.pool()))
            .await
    }

    async fn save(&self, project: &Project) -> Result<Option<Project>, sqlx::Error> {
        let sql = format!(
            "UPDATE projects SET name = $2, description = $3, updated_at = now() WHERE id = $1 RETURNING {COLUMNS}"
        );
        let query = sqlx::query_as(&sql)
            .bind(project.id)
            .bind(&project.name)
            .bind(&project.description);
        let write = async {
            let mut write = self.db.writer().await?;
            let saved = query.fetch_optional(write.conn()).await?;
            write.commit().await?;
            Ok(saved)
        };
        self.db.run(write).await
    }

    async fn delete(&self, id: Uuid) -> Result<Option<Vec<(Uuid, Option<Uuid>)>>, sqlx::Error> {
        let work = async {
            let mut tx = self.db.begin().await?;
            let tasks = sqlx::query_as("DELETE FROM tasks WHERE project_id = $1 RETURNING id, assignee_id")
                .bind(id)
                .fetch_all(tx.conn())
                .await?;
            let deleted = sqlx::query("DELETE FROM projects WHERE id = $1")
                .bind(id)
                .execute(tx.conn())
                .await?
                .rows_affected();
            tx.commit().await?;
            Ok((deleted == 1).then_some(tasks))
        };
        self.db.run(work).await
    }
}
