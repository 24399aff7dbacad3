//! The morning due-date reminder (`tasks.due-reminders`, `JOBS_DUE_REMINDERS_SCHEDULE`, 08:00 UTC
//! by default): every open, assigned task due that day gets a `task.due` event on its
//! workspace's stream, which its assignee's client shows. One transaction for the run: its events
//! all commit or none do. At least once: a run retried after a failed commit records none twice,
//! but one retried after its commit answer was lost would (the event carries the day, so a
//! client can tell).

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};

use super::repository::TaskRepository;
use crate::infra::database::Database;
use crate::infra::events::EventBus;
use crate::infra::jobs::{Claimed, JobHandler, JobKind};
use crate::modules::events::model::WorkspaceEvent;

pub const DUE_REMINDERS: &str = "tasks.due-reminders";

pub fn kind() -> JobKind {
    JobKind {
        name: DUE_REMINDERS,
        queue: "reminders",
        max_attempts: 5,
        backoff: Duration::from_secs(10),
        backoff_max: Duration::from_secs(600),
        timeout: Duration::from_secs(120),
    }
}

/// What the handler needs, resolved from the container at start-up.
pub struct Reminders {
    pub tasks: Arc<dyn TaskRepository>,
    pub events: Arc<dyn EventBus>,
    pub db: Arc<dyn Database>,
}

pub fn handler(reminders: Reminders) -> JobHandler {
    let reminders = Arc::new(reminders);
    Arc::new(move |job: Claimed| {
        let reminders = reminders.clone();
        Box::pin(async move {
            // The tick's day (UTC), not the day the attempt runs: a retry after midnight still
            // reminds of the day it was for.
            let day: NaiveDate = job.payload["firedAt"]
                .as_str()
                .and_then(|at| at.parse::<DateTime<Utc>>().ok())
                .unwrap_or_else(Utc::now)
                .date_naive();
            let Reminders { tasks, events, db } = &*reminders;
            let sent = db
                .transaction(async {
                    let due = tasks.due_on(day).await?;
                    for task in &due {
                        WorkspaceEvent::TaskDue { task, day }.record(&**events).await?;
                    }
                    Ok::<_, sqlx::Error>(due.len())
                })
                .await
                .map_err(|err| err.to_string())?;
            log::info!("reminders: {sent} tasks due on {day}");
            Ok(())
        })
    })
}
