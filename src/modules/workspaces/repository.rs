use async_trait::async_trait;
use shaku::{Component, Interface};
use std::sync::Arc;
use uuid::Uuid;

use super::model::{Member, Role, Workspace};
use crate::infra::database::Database;

pub const MEMBER_UNIQUE: &str = "workspace_members_pkey";

const COLUMNS: &str = "w.id, w.name, w.created_by, w.created_at, w.updated_at";

#[async_trait]
pub trait WorkspaceRepository: Interface {
    /// Creates the workspace with `owner` as its first owner.
    async fn create(&self, name: &str, owner: Uuid) -> Result<Workspace, sqlx::Error>;
    async fn list_for_user(&self, user_id: Uuid) -> Result<Vec<Workspace>, sqlx::Error>;
    async fn find(&self, id: Uuid) -> Result<Option<Workspace>, sqlx::Error>;
    async fn rename(&self, id: Uuid, name: &str) -> Result<Option<Workspace>, sqlx::Error>;
    async fn delete(&self, id: Uuid) -> Result<bool, sqlx::Error>;
    async fn role_of(&self, workspace_id: Uuid, user_id: Uuid) -> Result<Option<Role>, sqlx::Error>;
    async fn members(&self, workspace_id: Uuid) -> Result<Vec<Member>, sqlx::Error>;
    /// (task id, project id) of the user's tasks in the workspace: what removing them unassigns.
    async fn assigned_tasks(&self, workspace_id: Uuid, user_id: Uuid) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error>;
    async fn add_member(&self, workspace_id: Uuid, user_id: Uuid, role: Role) -> Result<Member, sqlx::Error>;
    /// Removes the member and unassigns their tasks in this workspace, atomically.
    /// Refuses (returns `Ok(false)`) when that would leave the workspace without an owner.
    async fn remove_member(&self, workspace_id: Uuid, user_id: Uuid) -> Result<RemoveOutcome, sqlx::Error>;
}

#[derive(Debug, PartialEq, Eq)]
pub enum RemoveOutcome {
    /// With the (task id, project id) of every task that lost its assignee.
    Removed {
        unassigned: Vec<(Uuid, Uuid)>,
    },
    NotAMember,
    LastOwner,
}

#[derive(Component)]
#[shaku(interface = WorkspaceRepository)]
pub struct PgWorkspaceRepository {
    #[shaku(inject)]
    db: Arc<dyn Database>,
}

const MEMBER_SELECT: &str = "SELECT m.user_id, u.email, u.name, m.role, m.joined_at
     FROM workspace_members m JOIN users u ON u.id = m.user_id";

#[async_trait]
impl WorkspaceRepository for PgWorkspaceRepository {
    async fn create(&self, name: &str, owner: Uuid) -> Result<Workspace, sqlx::Error> {
        let work = async {
            let mut tx = self.db.begin().await?;
            let workspace: Workspace = sqlx::query_as(&format!(
                "INSERT INTO workspaces AS w (name, created_by) VALUES ($1, $2) RETURNING {COLUMNS}"
            ))
            .bind(name)
            .bind(owner)
            .fetch_one(tx.conn())
            .await?;
            sqlx::query("INSERT INTO workspace_members (workspace_id, user_id, role) VALUES ($1, $2, 'owner')")
                .bind(workspace.id)
                .bind(owner)
                .execute(tx.conn())
                .await?;
            tx.commit().await?;
            Ok(workspace)
        };
        self.db.run(work).await
    }

    async fn list_for_user(&self, user_id: Uuid) -> Result<Vec<Workspace>, sqlx::Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM workspaces w JOIN workspace_members m ON m.workspace_id = w.id
             WHERE m.user_id = $1 ORDER BY w.created_at, w.id"
        );
        self.db
            .run(sqlx::query_as(&sql).bind(user_id).fetch_all(self.db.pool()))
            .await
    }

    async fn find(&self, id: Uuid) -> Result<Option<Workspace>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM workspaces w WHERE w.id = $1");
        self.db
            .run(sqlx::query_as(&sql).bind(id).fetch_optional(self.db.pool()))
            .await
    }

    async fn rename(&self, id: Uuid, name: &str) -> Result<Option<Workspace>, sqlx::Error> {
        let sql = format!("UPDATE workspaces w SET name = $2, updated_at = now() WHERE w.id = $1 RETURNING {COLUMNS}");
        let write = async {
            let mut write = self.db.writer().await?;
            let renamed = sqlx::query_as(&sql)
                .bind(id)
                .bind(name)
                .fetch_optional(write.conn())
                .await?;
            write.commit().await?;
            Ok(renamed)
        };
        self.db.run(write).await
    }

    async fn delete(&self, id: Uuid) -> Result<bool, sqlx::Error> {
        let query = sqlx::query("DELETE FROM workspaces WHERE id = $1").bind(id);
        let write = async {
            let mut write = self.db.writer().await?;
            let deleted = query.execute(write.conn()).await?.rows_affected() == 1;
            write.commit().await?;
            Ok(deleted)
        };
        self.db.run(write).await
    }

    async fn role_of(&self, workspace_id: Uuid, user_id: Uuid) -> Result<Option<Role>, sqlx::Error> {
        let query = sqlx::query_scalar("SELECT role FROM workspace_members WHERE workspace_id = $1 AND user_id = $2")
            .bind(workspace_id)
            .bind(user_id);
        self.db.run(query.fetch_optional(self.db.pool())).await
    }

    async fn members(&self, workspace_id: Uuid) -> Result<Vec<Member>, sqlx::Error> {
        let sql = format!("{MEMBER_SELECT} WHERE m.workspace_id = $1 ORDER BY m.joined_at, m.user_id");
        self.db
            .run(sqlx::query_as(&sql).bind(workspace_id).fetch_all(self.db.pool()))
            .await
    }

    async fn assigned_tasks(&self, workspace_id: Uuid, user_id: Uuid) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error> {
        let query = sqlx::query_as("SELECT id, project_id FROM tasks WHERE workspace_id = $1 AND assignee_id = $2")
            .bind(workspace_id)
            .bind(user_id);
        self.db.run(query.fetch_all(self.db.pool())).await
    }

    async fn add_member(&self, workspace_id: Uuid, user_id: Uuid, role: Role) -> Result<Member, sqlx::Error> {
        let work = async {
            let mut tx = self.db.begin().await?;
            sqlx::query("INSERT INTO workspace_members (workspace_id, user_id, role) VALUES ($1, $2, $3)")
                .bind(workspace_id)
                .bind(user_id)
                .bind(role)
                .execute(tx.conn())
                .await?;
            let member = sqlx::query_as(&format!("{MEMBER_SELECT} WHERE m.workspace_id = $1 AND m.user_id = $2"))
                .bind(workspace_id)
                .bind(user_id)
                .fetch_one(tx.conn())
                .await?;
            tx.commit().await?;
            Ok(member)
        };
        self.db.run(work).await
    }

    async fn remove_member(&self, workspace_id: Uuid, user_id: Uuid) -> Result<RemoveOutcome, sqlx::Error> {
        let work = async {
            let mut tx = self.db.begin().await?;
            // Lock the membership rows so two concurrent removals cannot both remove "the other" owner.
            let roles: Vec<(Uuid, Role)> =
                sqlx::query_as("SELECT user_id, role FROM workspace_members WHERE workspace_id = $1 FOR UPDATE")
                    .bind(workspace_id)
                    .fetch_all(tx.conn())
                    .await?;
            let owners = roles.iter().filter(|(_, r)| *r == Role::Owner).count();
            let refused = match roles.iter().find(|(id, _)| *id == user_id) {
                None => Some(RemoveOutcome::NotAMember),
                Some((_, Role::Owner)) if owners == 1 => Some(RemoveOutcome::LastOwner),
                Some(_) => None,
            };
            if let Some(refused) = refused {
                // Ended, not dropped: a refusal is an answer, not a failed write of the unit.
                tx.commit().await?;
                return Ok(refused);
            }
            sqlx::query("DELETE FROM workspace_members WHERE workspace_id = $1 AND user_id = $2")
                .bind(workspace_id)
                .bind(user_id)
                .execute(tx.conn())
                .await?;
            let unassigned = sqlx::query_as(
                "UPDATE tasks SET assignee_id = NULL, updated_at = now() WHERE workspace_id = $1 AND assignee_id = $2
                 RETURNING id, project_id",
            )
            .bind(workspace_id)
            .bind(user_id)
            .fetch_all(tx.conn())
            .await?;
            tx.commit().await?;
            Ok(RemoveOutcome::Removed { unassigned })
        };
        self.db.run(work).await
    }
}
