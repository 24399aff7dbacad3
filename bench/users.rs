//! Many users for `bench/run.sh`'s many-users scenario: `N` users, each a member of the demo
//! user's first workspace with a token of its own, written one per line to `TOKENS_FILE` (wrk's
//! script picks one per request). Idempotent: a second run reuses the users and gives each a
//! fresh token. Rows go straight into the tables (a login per user would spend minutes hashing
//! passwords, and the login limit would refuse most).
//!
//! Usage: `cargo run --release --example users N TOKENS_FILE`, with the database at
//! `DATABASE_URL` or the dev service, after `nestling seed`.

use std::io::Write;

use nestling::config::Settings;
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

#[actix_web::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: users N TOKENS_FILE";
    let mut args = std::env::args().skip(1);
    let count: i64 = args.next().ok_or(usage)?.parse()?;
    let tokens_file = args.next().ok_or(usage)?;
    let mut settings = Settings::from_env()?;
    let pool = nestling::infra::database::prepare(&mut settings, true).await?;

    let (workspace, password_hash): (Uuid, String) = sqlx::query_as(
        "SELECT m.workspace_id, u.password_hash FROM users u
         JOIN workspace_members m ON m.user_id = u.id AND m.role = 'owner'
         WHERE u.email = $1 ORDER BY m.workspace_id LIMIT 1",
    )
    .bind(nestling::seed::DEMO_EMAIL)
    .fetch_optional(&pool)
    .await?
    .ok_or("no demo user: run `nestling seed` first")?;

    let mut tx = pool.begin().await?;
    // Every bench user, created once, then a member of the workspace (set-based: one statement
    // for all of them).
    let users: Vec<Uuid> = sqlx::query_scalar(
        "WITH wanted AS (
             SELECT format('bench-user-%s@nestling.dev', n) AS email, n FROM generate_series(1, $1) AS n)
         INSERT INTO users (email, email_key, name, password_hash)
         SELECT email, email, format('Bench user %s', n), $2 FROM wanted
         ON CONFLICT (email_key) DO UPDATE SET name = EXCLUDED.name
         RETURNING id",
    )
    .bind(count)
    .bind(&password_hash)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO workspace_members (workspace_id, user_id, role)
         SELECT $1, id, 'member' FROM unnest($2::uuid[]) AS id ON CONFLICT DO NOTHING",
    )
    .bind(workspace)
    .bind(&users)
    .execute(&mut *tx)
    .await?;
    let mut tokens = Vec::with_capacity(users.len());
    let mut hashes = Vec::with_capacity(users.len());
    for _ in &users {
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let token = hex::encode(bytes);
        hashes.push(Sha256::digest(token.as_bytes()).to_vec());
        tokens.push(token);
    }
    sqlx::query(
        "INSERT INTO auth_tokens (token_hash, user_id, expires_at)
         SELECT hash, id, now() + interval '1 day' FROM unnest($1::bytea[], $2::uuid[]) AS t (hash, id)",
    )
    .bind(&hashes)
    .bind(&users)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;

    let mut out = std::io::BufWriter::new(std::fs::File::create(&tokens_file)?);
    for token in &tokens {
        writeln!(out, "{token}")?;
    }
    out.flush()?;
    println!(
        "{} users in workspace {workspace}, tokens in {tokens_file}",
        users.len()
    );
    Ok(())
}
