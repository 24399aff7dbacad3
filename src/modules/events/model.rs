//! The events of a workspace: what the domain records with each change (in its transaction) and
//! what `GET /api/workspaces/{id}/events` streams. `data` is the entity as the API answers it,
//! or its ids when it is gone.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::infra::events::EventBus;
use crate::modules::projects::model::Project;
use crate::modules::tasks::model::Task;
use crate::modules::workspaces::model::{Member, Workspace};

pub enum WorkspaceEvent<'a> {
    TaskCreated(&'a Task),
    TaskUpdated(&'a Task),
    TaskDeleted(&'a Task),
    /// The morning reminder: an open task due today, for its assignee.
    TaskDue {
        task: &'a Task,
        day: chrono::NaiveDate,
    },
    ProjectCreated(&'a Project),
    ProjectUpdated(&'a Project),
    /// Its tasks went with it (no `task.deleted` for each).
    ProjectDeleted {
        workspace_id: Uuid,
        id: Uuid,
    },
    MemberAdded {
        workspace_id: Uuid,
        member: &'a Member,
    },
    /// The member's tasks in the workspace were unassigned with it.
    MemberRemoved {
        workspace_id: Uuid,
        user_id: Uuid,
    },
    WorkspaceUpdated(&'a Workspace),
    /// The last event of the workspace: its streams end after it.
    WorkspaceDeleted {
        workspace_id: Uuid,
    },
}

pub const MEMBER_ADDED: &str = "member.added";
pub const MEMBER_REMOVED: &str = "member.removed";
pub const WORKSPACE_DELETED: &str = "workspace.deleted";

/// Every type a workspace's stream carries (the README and the OpenAPI description list them).
pub const EVENT_TYPES: [&str; 12] = [
    "task.created",
    "task.updated",
    "task.deleted",
    "task.due",
    "project.created",
    "project.updated",
    "project.deleted",
    MEMBER_ADDED,
    MEMBER_REMOVED,
    "workspace.updated",
    WORKSPACE_DELETED,
    // Not an event of the table: a stream tells a client that fell further behind than the
    // retention to reload (see `controller`).
    "resync",
];

impl WorkspaceEvent<'_> {
    pub fn event_type(&self) -> &'static str {
        match self {
            Self::TaskCreated(_) => "task.created",
            Self::TaskUpdated(_) => "task.updated",
            Self::TaskDeleted(_) => "task.deleted",
            Self::TaskDue { .. } => "task.due",
            Self::ProjectCreated(_) => "project.created",
            Self::ProjectUpdated(_) => "project.updated",
            Self::ProjectDeleted { .. } => "project.deleted",
            Self::MemberAdded { .. } => MEMBER_ADDED,
            Self::MemberRemoved { .. } => MEMBER_REMOVED,
            Self::WorkspaceUpdated(_) => "workspace.updated",
            Self::WorkspaceDeleted { .. } => WORKSPACE_DELETED,
        }
    }

    pub fn workspace_id(&self) -> Uuid {
        match self {
            Self::TaskCreated(task) | Self::TaskUpdated(task) | Self::TaskDeleted(task) => task.workspace_id,
            Self::TaskDue { task, .. } => task.workspace_id,
            Self::ProjectCreated(project) | Self::ProjectUpdated(project) => project.workspace_id,
            Self::ProjectDeleted { workspace_id, .. }
            | Self::MemberAdded { workspace_id, .. }
            | Self::MemberRemoved { workspace_id, .. }
            | Self::WorkspaceDeleted { workspace_id } => *workspace_id,
            Self::WorkspaceUpdated(workspace) => workspace.id,
        }
    }

    pub fn data(&self) -> Value {
        let entity = |value: Result<Value, serde_json::Error>| value.expect("entities serialise");
        match self {
            Self::TaskCreated(task) | Self::TaskUpdated(task) => entity(serde_json::to_value(task)),
            Self::TaskDeleted(task) => json!({ "id": task.id, "projectId": task.project_id }),
            Self::TaskDue { task, day } => json!({ "task": task, "assigneeId": task.assignee_id, "day": day }),
            Self::ProjectCreated(project) | Self::ProjectUpdated(project) => entity(serde_json::to_value(project)),
            Self::ProjectDeleted { id, .. } => json!({ "id": id }),
            Self::MemberAdded { member, .. } => entity(serde_json::to_value(member)),
            Self::MemberRemoved { user_id, .. } => json!({ "userId": user_id }),
            Self::WorkspaceUpdated(workspace) => entity(serde_json::to_value(workspace)),
            Self::WorkspaceDeleted { workspace_id } => json!({ "id": workspace_id }),
        }
    }

    /// Records the event in the current transaction (see `EventBus::record`).
    pub async fn record(self, events: &dyn EventBus) -> Result<(), sqlx::Error> {
        events.record(self.workspace_id(), self.event_type(), self.data()).await
    }
}
