//! Demo data for the walk-through: `demo@nestling.dev` / `demo-password`, a teammate, two
//! workspaces, five projects and 300 tasks spread over the last 60 days. Runs once; a second run
//! sees the demo user and does nothing.

use chrono::{Duration, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use uuid::Uuid;

use crate::modules::auth::password;

pub const DEMO_EMAIL: &str = "demo@nestling.dev";
pub const DEMO_PASSWORD: &str = "demo-password";
const TEAMMATE_EMAIL: &str = "sam@nestling.dev";
const TASKS: usize = 300;
const DAYS: i64 = 60;

const VERBS: [&str; 8] = ["Write", "Review", "Fix", "Design", "Ship", "Test", "Plan", "Document"];
const NOUNS: [&str; 8] = [
    "login page",
    "invoice export",
    "search",
    "onboarding",
    "API limits",
    "dashboard",
    "billing",
    "release notes",
];

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("seeding failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("seeding failed: cannot hash the demo password")]
    Hash,
}

pub async fn run(pool: &PgPool) -> Result<(), SeedError> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE email = $1)")
        .bind(DEMO_EMAIL)
        .fetch_one(pool)
        .await?;
    if exists {
        log::info!("seed: demo data already present (log in as {DEMO_EMAIL} / {DEMO_PASSWORD})");
        return Ok(());
    }
    let hash = tokio::task::spawn_blocking(|| password::hash_blocking(DEMO_PASSWORD))
        .await
        .map_err(|_| SeedError::Hash)?
        .map_err(|_| SeedError::Hash)?;
    let mut rng = StdRng::seed_from_u64(42);
    let now = Utc::now();
    let mut tx = pool.begin().await?;

    let user = |email: &'static str, name: &'static str| {
        let sql = "INSERT INTO users (email, email_key, name, password_hash) VALUES ($1, $2, $3, $4) RETURNING id";
        sqlx::query_scalar::<_, Uuid>(sql)
            .bind(email)
            .bind(crate::modules::users::model::email_key(email))
            .bind(name)
            .bind(hash.clone())
    };
    let demo = user(DEMO_EMAIL, "Demo User").fetch_one(&mut *tx).await?;
    let teammate = user(TEAMMATE_EMAIL, "Sam Teammate").fetch_one(&mut *tx).await?;

    let layout: [(&str, &[&str], &[Uuid]); 2] = [
        (
            "Acme Inc",
            &["Website relaunch", "Mobile app", "Internal tools"],
            &[demo, teammate],
        ),
        ("Side Project", &["Blog", "Newsletter"], &[demo]),
    ];
    let mut projects = Vec::new();
    for (workspace_name, project_names, members) in layout {
        let workspace: Uuid = sqlx::query_scalar(
            "INSERT INTO workspaces (name, created_by, created_at) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(workspace_name)
        .bind(demo)
        .bind(now - Duration::days(DAYS + 1))
        .fetch_one(&mut *tx)
        .await?;
        for (i, member) in members.iter().enumerate() {
            sqlx::query("INSERT INTO workspace_members (workspace_id, user_id, role) VALUES ($1, $2, $3::member_role)")
                .bind(workspace)
                .bind(member)
                .bind(if i == 0 { "owner" } else { "member" })
                .execute(&mut *tx)
                .await?;
        }
        for name in project_names {
            let project: Uuid = sqlx::query_scalar(
                "INSERT INTO projects (workspace_id, name, created_at) VALUES ($1, $2, $3) RETURNING id",
            )
            .bind(workspace)
            .bind(name)
            .bind(now - Duration::days(DAYS + 1))
            .fetch_one(&mut *tx)
            .await?;
            projects.push((workspace, project, members));
        }
    }

    for n in 0..TASKS {
        let (workspace, project, members) = projects[n % projects.len()];
        let created = now - Duration::seconds(rng.gen_range(0..DAYS * 86_400));
        let roll: f64 = rng.gen();
        let (status, completed) = if roll < 0.45 {
            let open_for = (now - created).num_seconds().max(1);
            ("done", Some(created + Duration::seconds(rng.gen_range(0..open_for))))
        } else if roll < 0.65 {
            ("in_progress", None)
        } else {
            ("todo", None)
        };
        let assignee = if rng.gen_bool(0.8) {
            Some(members[rng.gen_range(0..members.len())])
        } else {
            None
        };
        let priority = ["low", "medium", "high", "urgent"][rng.gen_range(0..4)];
        let title = format!(
            "{} {}",
            VERBS[rng.gen_range(0..VERBS.len())],
            NOUNS[rng.gen_range(0..NOUNS.len())]
        );
        let due = rng
            .gen_bool(0.5)
            .then(|| (created + Duration::days(rng.gen_range(1..30))).date_naive());
        sqlx::query(
            "INSERT INTO tasks (project_id, workspace_id, title, status, priority, assignee_id, due_date,
                                completed_at, created_at, updated_at)
             VALUES ($1, $2, $3, $4::task_status, $5::task_priority, $6, $7, $8, $9, coalesce($8, $9))",
        )
        .bind(project)
        .bind(workspace)
        .bind(title)
        .bind(status)
        .bind(priority)
        .bind(assignee)
        .bind(due)
        .bind(completed)
        .bind(created)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    log::info!(
        "seed: created {DEMO_EMAIL} / {DEMO_PASSWORD} (and {TEAMMATE_EMAIL}), 2 workspaces, {} projects, {TASKS} tasks",
        projects.len()
    );
    Ok(())
}
