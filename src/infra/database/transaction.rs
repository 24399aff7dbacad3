//! Writes that commit together. A caller that owns a transaction (the idempotency middleware:
//! the write and the record of its answer commit at once) opens it with `OpenTransaction` and
//! runs the request in its `scope`; every repository write in that scope, made through
//! `Database::writer` or `Database::begin`, then runs on that transaction instead of a
//! connection of its own. A later write of the same unit (an outbox row beside a domain row)
//! joins the same way.
//!
//! A service whose writes must commit together (a domain row and its event, see `infra::events`)
//! runs them in `Database::transaction`: it joins the request's open transaction if there is one,
//! and otherwise opens one of its own, commits it when the work succeeds, and rolls it back when
//! it fails. Work that must follow the commit (waking the event relay) registers `after_commit`.
//!
//! Guarantees: inside a scope, nothing a repository writes commits before the owner commits, and
//! a rollback undoes all of it. Each joined write of a request's transaction runs in a savepoint,
//! so a write that fails (a unique violation answered 409) undoes only itself, as it would on its
//! own connection; in `Database::transaction`'s own transaction a failed write fails the whole
//! unit, so it needs no savepoints (two round trips fewer per write).
//! Not guaranteed: reads (`db.pool()`) do not join; they see committed data only, never the
//! scope's own uncommitted writes.

use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};

tokio::task_local! {
    /// The transaction the current request's writes join, if its owner opened one.
    static OPEN: Option<OpenTransaction>;
}

/// A transaction that repository writes in its `scope` join. Cloning shares it.
#[derive(Clone)]
pub struct OpenTransaction(Arc<Mutex<Open>>);

struct Open {
    tx: Option<Transaction<'static, Postgres>>,
    /// Joined writes run in savepoints (a request's transaction) or not (`Database::transaction`).
    savepoints: bool,
    /// A joined write failed (or hit its deadline) inside its savepoint: rolled back to it
    /// before the transaction is used again. Without savepoints the transaction is lost.
    savepoint_abandoned: bool,
    /// What runs once the owner has committed (`after_commit`).
    after_commit: Vec<Box<dyn FnOnce() + Send>>,
}

const SAVEPOINT: &str = "SAVEPOINT nestling_write";
const RELEASE: &str = "RELEASE SAVEPOINT nestling_write";
const ROLLBACK_TO: &str = "ROLLBACK TO SAVEPOINT nestling_write";

impl OpenTransaction {
    /// A transaction whose joined writes each run in a savepoint: one may fail alone.
    pub fn new(tx: Transaction<'static, Postgres>) -> Self {
        Self::with(tx, true)
    }

    fn with(tx: Transaction<'static, Postgres>, savepoints: bool) -> Self {
        Self(Arc::new(Mutex::new(Open {
            tx: Some(tx),
            savepoints,
            savepoint_abandoned: false,
            after_commit: Vec::new(),
        })))
    }

    /// Runs what writes registered with `after_commit`: call it once the commit succeeded.
    pub async fn committed(&self) {
        let hooks = std::mem::take(&mut self.0.lock().await.after_commit);
        for hook in hooks {
            hook();
        }
    }

    /// Runs `work` with its repository writes joining this transaction.
    pub async fn scope<F: std::future::Future>(&self, work: F) -> F::Output {
        OPEN.scope(Some(self.clone()), work).await
    }

    /// The transaction, for its owner to finish (commit, or drop to roll back), with what a
    /// failed write left rolled back. Call it after `scope` has returned.
    pub async fn take(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut open = self.0.lock().await;
        let mut tx = open.tx.take().ok_or(sqlx::Error::PoolClosed)?;
        if std::mem::take(&mut open.savepoint_abandoned) {
            if !open.savepoints {
                // Postgres answers COMMIT on a failed transaction with a rollback, not an error:
                // the owner must not believe it committed.
                return Err(sqlx::Error::Protocol("a write of the transaction failed".into()));
            }
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

fn current() -> Option<Arc<Mutex<Open>>> {
    OPEN.try_with(|open| open.as_ref().map(|open| open.0.clone()))
        .ok()
        .flatten()
}

/// Runs `work` with its writes on connections of their own, committed by themselves, even inside
/// a scope: for fault tests that must commit a write and then report it failed.
pub async fn outside<F: std::future::Future>(work: F) -> F::Output {
    OPEN.scope(None, work).await
}

/// Runs `hook` once the current unit of writes has committed: at once outside a transaction
/// (an autocommitted write has), after the owner's commit inside one, never after a rollback.
pub async fn after_commit(hook: impl FnOnce() + Send + 'static) {
    match current() {
        Some(open) => open.lock().await.after_commit.push(Box::new(hook)),
        None => hook(),
    }
}

/// Runs `work` with its writes in one transaction: the scope's own when there is one (its owner
/// commits), else a new one, committed when `work` succeeds and rolled back when it fails.
pub(super) async fn run_in_transaction<T, E: From<sqlx::Error>>(
    pool: &PgPool,
    deadline: std::time::Duration,
    work: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, E> {
    if current().is_some() {
        return work.await;
    }
    let tx = super::within(deadline, pool.begin()).await?;
    let open = OpenTransaction::with(tx, false);
    let done = open.scope(work).await;
    let tx = open.take().await;
    match (done, tx) {
        (Ok(done), Ok(tx)) => {
            super::within(deadline, tx.commit()).await?;
            open.committed().await;
            Ok(done)
        }
        // Dropped, the transaction rolls back (sqlx sends the ROLLBACK in the background).
        (Err(err), _) => Err(err),
        (Ok(_), Err(err)) => Err(err.into()),
    }
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
                if joined.open.savepoints {
                    sqlx::query(RELEASE).execute(joined.conn()).await?;
                }
                joined.released = true;
                Ok(())
            }
        }
    }
}

/// The open transaction of the scope (in a savepoint), else a connection of its own: a
/// transaction when `transaction` is set, autocommit otherwise.
pub(super) async fn write(pool: &PgPool, transaction: bool) -> Result<Write, sqlx::Error> {
    if let Some(open) = current() {
        let mut open = open.lock_owned().await;
        if !open.savepoints {
            if open.savepoint_abandoned {
                return Err(sqlx::Error::Protocol("a write of the transaction failed".into()));
            }
            return Ok(Write::Joined(Joined { open, released: false }));
        }
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
