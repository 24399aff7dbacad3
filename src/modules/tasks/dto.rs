use chrono::NaiveDate;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use validator::Validate;

use super::model::{TaskPriority, TaskStatus};
use crate::error::{no_nul, not_blank};
use crate::modules::nullable;
use crate::modules::paging::{Paging, DEFAULT_LIMIT};

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTaskRequest {
    #[validate(length(min = 1, max = 200), custom(function = "not_blank"))]
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000]*[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    )]
    #[schema(example = "Write the README")]
    pub title: String,
    #[validate(length(max = 10000), custom(function = "no_nul"))]
    #[schema(max_length = 10000, pattern = r"^[^\u0000]*$")]
    pub description: Option<String>,
    /// Defaults to `todo`.
    pub status: Option<TaskStatus>,
    /// Defaults to `medium`.
    pub priority: Option<TaskPriority>,
    /// Must be a member of the workspace.
    pub assignee_id: Option<Uuid>,
    #[schema(value_type = Option<String>, format = Date, example = "2026-12-24")]
    pub due_date: Option<NaiveDate>,
}

/// Absent fields stay as they are; `null` clears `description`, `assigneeId` and `dueDate`.
#[derive(Debug, Default, Deserialize, Validate, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateTaskRequest {
    #[validate(length(min = 1, max = 200), custom(function = "not_blank"))]
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = r"^[^\u0000]*[^\u0000\t-\r \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\u0000]*$"
    )]
    pub title: Option<String>,
    #[serde(default, deserialize_with = "nullable::deserialize")]
    #[validate(length(max = 10000), custom(function = "no_nul"))]
    #[schema(max_length = 10000, pattern = r"^[^\u0000]*$")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    pub status: Option<TaskStatus>,
    pub priority: Option<TaskPriority>,
    #[serde(default, deserialize_with = "nullable::deserialize")]
    #[schema(value_type = Option<Uuid>)]
    pub assignee_id: Option<Option<Uuid>>,
    #[serde(default, deserialize_with = "nullable::deserialize")]
    #[schema(value_type = Option<String>, format = Date)]
    pub due_date: Option<Option<NaiveDate>>,
}

/// Filters and paging for task lists. Unknown parameters are rejected.
#[derive(Debug, Clone, Default, Deserialize, Validate, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct TaskQuery {
    pub status: Option<TaskStatus>,
    pub assignee_id: Option<Uuid>,
    /// Page size, 1–100 (default 50).
    #[validate(range(min = 1, max = 100))]
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// Items to skip (default 0).
    #[validate(range(min = 0, max = 1000000))]
    #[param(minimum = 0, maximum = 1000000)]
    pub offset: Option<i64>,
}

/// Filters and paging for the tasks assigned to me: the assignee is implied.
#[derive(Debug, Clone, Default, Deserialize, Validate, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AssignedTaskQuery {
    pub status: Option<TaskStatus>,
    /// Page size, 1–100 (default 50).
    #[validate(range(min = 1, max = 100))]
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<i64>,
    /// Items to skip (default 0).
    #[validate(range(min = 0, max = 1000000))]
    #[param(minimum = 0, maximum = 1000000)]
    pub offset: Option<i64>,
}

impl From<AssignedTaskQuery> for TaskQuery {
    fn from(query: AssignedTaskQuery) -> Self {
        TaskQuery {
            status: query.status,
            assignee_id: None,
            limit: query.limit,
            offset: query.offset,
        }
    }
}

impl TaskQuery {
    pub fn paging(&self) -> Paging {
        Paging {
            limit: self.limit.unwrap_or(DEFAULT_LIMIT),
            offset: self.offset.unwrap_or(0),
        }
    }
}
