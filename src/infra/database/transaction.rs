//! Writes that commit together. A caller that owns a transaction (the idempotency middleware:
//! the write and the record of its answer commit at once) opens it with `OpenTransaction` and
//! runs the request in its `scope`; every repository write in that scope, made through
//! `Database::writer` or `Database::begin`, then runs on that transaction instead of a
//! connection of its own. A later write of the same unit (an outbox row beside a domain row)
//! joins the same way.
//!
//! Guarantees: inside a scope, nothing a repository writes commits before the owner commits, and
//! a rollback undoes all of it. Each joined write runs in a savepoint, so a write that fails (a
//! unique violation answered 409) undoes only itself, as it would on its own connection.
//! Not guaranteed: reads (`db.pool()`) do not join; they see committed data only, never the
//! scope's own uncommitted writes.

use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

tokio::task_local! {
    /// The transaction the current request's writes join, if its owner opened one.
    static OPEN: OpenTransaction;
}

/// A transaction that repository writes in its `scope` join. Cloning shares it.
#[derive(Clone)]
pub struct OpenTransaction(Arc<Mutex<Open>>);

struct Open {
    tx: Option<Transaction<'static, Postgres>>,
    /// A joined write failed (or hit its deadline) inside its savepoint: rolled back to it
    /// before the transaction is used again.
    savepoint_abandoned: bool,
}

const SAVEPOINT: &str = "SAVEPOINT nestling_write";
const RELEASE: &str = "RELEASE SAVEPOINT nestling_write";
const ROLLBACK_TO: &str = "ROLLBACK TO SAVEPOINT nestling_write";

impl OpenTransaction {
    pub fn new(tx: Transaction<'static, Postgres>) -> Self {
        Self(Arc::new(Mutex::new(Open {
            tx: Some(tx),
            savepoint_abandoned: false,
        })))
    }

    /// Runs `work` with its repository writes joining this transaction.
    pub async fn scope<F: std::future::Future>(&self, work: F) -> F::Output {
        OPEN.scope(self.clone(), work).await
    }

    /// The transaction, for its owner to finish (commit, or drop to roll back), with what a
    /// failed write left rolled back. Call it after `scope` has returned.
    pub async fn take(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut open = self.0.lock().await;
        let mut tx = open.tx.take().ok_or(sqlx::Error::PoolClosed)?;
        if std::mem::take(&mut open.savepoint_abandoned) {
            sqlx::query(ROLLBACK_TO).execute(&mut *tx).await?;
            sqlx::query(RELEASE).execute(&mut *tx).await?;
        }
        Ok(tx)
    }
}

/// Where one repository write runs: see `Database::writer` and `Database::begin`.
pub enum Write {
    /// A pooled connection, autocommit: one statement needs no transaction of its own.
    Alone(PoolConnection<Postgres>),
    /// A transaction of its own.
    Own(Transaction<'static, Postgres>),
    /// The open transaction of the scope, inside a savepoint.
    Joined(Joined),
}

pub struct Joined {
    open: OwnedMutexGuard<Open>,
    released: bool,
}

impl Drop for Joined {
    fn drop(&mut self) {
        if !self.released {
            // Cannot roll back here (no async in drop): the next user of the transaction does.
            self.open.savepoint_abandoned = true;
        }
    }
}

impl Joined {
    fn conn(&mut self) -> &mut PgConnection {
        self.open.tx.as_mut().expect("taken only by its owner, after the scope")
    }
}

impl Write {
    /// The connection to run the write's statements on.
    pub fn conn(&mut self) -> &mut PgConnection {
        match self {
            Write::Alone(conn) => conn,
            Write::Own(tx) => tx,
            Write::Joined(joined) => joined.conn(),
        }
    }

    /// Ends the write: commits its own transaction, or releases its savepoint (the owner of the
    /// open transaction commits it). Dropped without this, the write is undone.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Write::Alone(_) => Ok(()),
            Write::Own(tx) => tx.commit().await,
            Write::Joined(mut joined) => {
                sqlx::query(RELEASE).execute(joined.conn()).await?;
                joined.released = true;
                Ok(())
            }
        }
    }
}

/// The open transaction of the scope (in a savepoint), else a connection of its own: a
/// transaction when `transaction` is set, autocommit otherwise.
pub(super) async fn write(pool: &PgPool, transaction: bool) -> Result<Write, sqlx::Error> {
    if let Ok(open) = OPEN.try_with(|open| open.0.clone()) {
        let mut open = open.lock_owned().await;
        let abandoned = std::mem::take(&mut open.savepoint_abandoned);
        let tx = open.tx.as_mut().ok_or(sqlx::Error::PoolClosed)?;
        if abandoned {
            sqlx::query(ROLLBACK_TO).execute(&mut **tx).await?;
            sqlx::query(RELEASE).execute(&mut **tx).await?;
        }
        sqlx::query(SAVEPOINT).execute(&mut **tx).await?;
        return Ok(Write::Joined(Joined { open, released: false }));
    }
    if transaction {
        Ok(Write::Own(pool.begin().await?))
    } else {
        Ok(Write::Alone(pool.acquire().await?))
    }
}
