//! Password hashing (argon2id, about 19 MiB and tens of milliseconds of CPU each) on a fixed pool
//! of `PASSWORD_HASH_CONCURRENCY` threads. Without the bound, every concurrent login ran its own
//! hash on tokio's blocking pool (up to 512 threads): 400 logins raised the RSS by gigabytes.
//! A request that gets no slot within `PASSWORD_HASH_WAIT_MS` answers 503 with `Retry-After`.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString};
use argon2::Argon2;
use async_trait::async_trait;
use shaku::{Component, Interface};
use tokio::sync::{oneshot, Semaphore};

use crate::config::PasswordSettings;
use crate::error::{AppError, AppResult};

#[async_trait]
pub trait PasswordHasher: Interface {
    async fn hash(&self, password: String) -> AppResult<String>;
    /// Checks `password` against `stored`, or against a throw-away hash when the user does not
    /// exist, so an unknown email costs the same time as a wrong password.
    async fn verify(&self, password: String, stored: Option<String>) -> AppResult<bool>;
}

type Job = Box<dyn FnOnce() + Send>;

pub struct Argon2Hasher {
    slots: Semaphore,
    jobs: mpsc::Sender<Job>,
    wait: Duration,
}

pub struct Argon2HasherParameters {
    pub settings: PasswordSettings,
}

impl Default for Argon2HasherParameters {
    fn default() -> Self {
        panic!("container::builder sets the Argon2Hasher parameters")
    }
}

impl<M: shaku::Module> Component<M> for Argon2Hasher {
    type Interface = dyn PasswordHasher;
    type Parameters = Argon2HasherParameters;

    fn build(_: &mut shaku::ModuleBuildContext<M>, params: Argon2HasherParameters) -> Box<dyn PasswordHasher> {
        Box::new(Argon2Hasher::new(&params.settings))
    }
}

impl Argon2Hasher {
    /// Starts the hashing threads; they end when the hasher is dropped.
    pub fn new(settings: &PasswordSettings) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let threads = settings.concurrency.max(1);
        for n in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || loop {
                    let job = queue.lock().unwrap().recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })
                .expect("spawn a hashing thread");
        }
        Self {
            slots: Semaphore::new(threads),
            jobs,
            wait: settings.wait,
        }
    }

    /// Runs `work` on a hashing thread once a slot is free, or answers 503 after the wait.
    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> AppResult<T> {
        let _slot = tokio::time::timeout(self.wait, self.slots.acquire())
            .await
            .map_err(|_| AppError::ServiceBusy { retry_after_secs: 1 })?
            .map_err(AppError::internal)?;
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = reply.send(work());
        });
        self.jobs
            .send(job)
            .map_err(|_| AppError::internal("the hashing threads have stopped"))?;
        // The slot is held until the thread is done, even if this request goes away meanwhile.
        answer.await.map_err(AppError::internal)
    }
}

#[async_trait]
impl PasswordHasher for Argon2Hasher {
    async fn hash(&self, password: String) -> AppResult<String> {
        self.run(move || hash_blocking(&password)).await?
    }

    async fn verify(&self, password: String, stored: Option<String>) -> AppResult<bool> {
        self.run(move || {
            let stored = stored.as_deref().unwrap_or_else(|| dummy_hash());
            let parsed = PasswordHash::new(stored).map_err(|e| AppError::internal(e.to_string()))?;
            Ok(Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
        })
        .await?
    }
}

/// One hash on the calling thread (the seed command).
pub fn hash_blocking(password: &str) -> AppResult<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AppError::internal(e.to_string()))
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_blocking("nestling-timing-equalizer").expect("argon2 hashes a constant"))
}
