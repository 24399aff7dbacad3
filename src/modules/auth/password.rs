//! Password hashing (argon2id, about 19 MiB and tens of milliseconds of CPU each) on a fixed pool
//! of `PASSWORD_HASH_CONCURRENCY` threads. Without the bound, every concurrent login ran its own
//! hash on tokio's blocking pool (up to 512 threads): 400 logins raised the RSS by gigabytes.
//! A request that gets no slot within `PASSWORD_HASH_WAIT_MS` answers 503 with `Retry-After`.
//! Each thread hashes in one memory area of its own, reused: argon2's own API allocates a fresh
//! area per hash, and the allocator kept every one of them (ten sequential hashes on one thread
//! left the RSS 190 MiB higher).

use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use argon2::password_hash::{rand_core::OsRng, Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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

/// Work for a hashing thread, given the thread's reusable memory.
type Job = Box<dyn FnOnce(&mut Vec<Block>) + Send>;

pub struct Argon2Hasher {
    slots: Semaphore,
    jobs: mpsc::Sender<Job>,
    wait: Duration,
}

pub struct Argon2HasherParameters {
    pub settings: PasswordSettings,
}

crate::container::set_by_the_container!(Argon2HasherParameters);

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
                .spawn(move || {
                    let mut memory = Vec::new();
                    loop {
                        let job = queue.lock().unwrap().recv();
                        match job {
                            Ok(job) => job(&mut memory),
                            Err(_) => return,
                        }
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
    async fn run<T: Send + 'static>(&self, work: impl FnOnce(&mut Vec<Block>) -> T + Send + 'static) -> AppResult<T> {
        let _slot = tokio::time::timeout(self.wait, self.slots.acquire())
            .await
            .map_err(|_| AppError::ServiceBusy { retry_after_secs: 1 })?
            .map_err(AppError::internal)?;
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |memory| {
            let _ = reply.send(work(memory));
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
        self.run(move |memory| hash_with(memory, &password)).await?
    }

    async fn verify(&self, password: String, stored: Option<String>) -> AppResult<bool> {
        self.run(move |memory| {
            let dummy;
            let stored = match &stored {
                Some(stored) => stored.as_str(),
                None => {
                    dummy = dummy_hash(memory)?;
                    dummy
                }
            };
            verify_with(memory, &password, stored)
        })
        .await?
    }
}

fn internal(err: impl std::fmt::Display) -> AppError {
    AppError::internal(err.to_string())
}

/// Hashes into `memory`, grown once to what the parameters need.
fn compute(argon2: &Argon2, memory: &mut Vec<Block>, password: &str, salt: &[u8], out: &mut [u8]) -> AppResult<()> {
    let needed = argon2.params().block_count();
    if memory.len() < needed {
        memory.resize(needed, Block::default());
    }
    argon2
        .hash_password_into_with_memory(password.as_bytes(), salt, out, &mut memory[..needed])
        .map_err(internal)
}

/// An argon2id PHC string with the default parameters and a fresh salt.
fn hash_with(memory: &mut Vec<Block>, password: &str) -> AppResult<String> {
    let argon2 = Argon2::default();
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_bytes = [0u8; 64];
    let raw_salt = salt.as_salt().decode_b64(&mut salt_bytes).map_err(internal)?;
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    compute(&argon2, memory, password, raw_salt, &mut out)?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(argon2.params()).map_err(internal)?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(internal)?),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches a PHC string (whatever its parameters), compared in constant time.
fn verify_with(memory: &mut Vec<Block>, password: &str, stored: &str) -> AppResult<bool> {
    use subtle::ConstantTimeEq;
    let parsed = PasswordHash::new(stored).map_err(internal)?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(internal)?;
    let version = parsed.version.map(Version::try_from).transpose().map_err(internal)?;
    let params = Params::try_from(&parsed).map_err(internal)?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(internal("stored password hash has no salt or no hash"));
    };
    let mut salt_bytes = [0u8; 64];
    let raw_salt = salt.decode_b64(&mut salt_bytes).map_err(internal)?;
    let argon2 = Argon2::new(algorithm, version.unwrap_or_default(), params);
    let mut out = vec![0u8; expected.len()];
    compute(&argon2, memory, password, raw_salt, &mut out)?;
    Ok(expected.as_bytes().ct_eq(&out).into())
}

/// One hash on the calling thread (the seed command).
pub fn hash_blocking(password: &str) -> AppResult<String> {
    hash_with(&mut Vec::new(), password)
}

fn dummy_hash(memory: &mut Vec<Block>) -> AppResult<&'static str> {
    static DUMMY: OnceLock<String> = OnceLock::new();
    if let Some(hash) = DUMMY.get() {
        return Ok(hash);
    }
    let hash = hash_with(memory, "nestling-timing-equalizer")?;
    Ok(DUMMY.get_or_init(|| hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::{PasswordHasher as _, PasswordVerifier};

    #[test]
    fn hashes_verify_both_ways_with_the_argon2_crate() {
        let mut memory = Vec::new();
        let ours = hash_with(&mut memory, "correct horse").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(Argon2::default().verify_password(b"correct horse", &parsed).is_ok());
        assert!(Argon2::default().verify_password(b"wrong", &parsed).is_err());
        let salt = SaltString::generate(&mut OsRng);
        let theirs = Argon2::default()
            .hash_password(b"battery staple", &salt)
            .unwrap()
            .to_string();
        assert!(verify_with(&mut memory, "battery staple", &theirs).unwrap());
        assert!(!verify_with(&mut memory, "battery", &theirs).unwrap());
        assert_eq!(memory.len(), Params::default().block_count(), "one memory area, reused");
    }

    /// Unknown emails are checked against the dummy: it must cost what a user's hash costs.
    #[test]
    fn the_dummy_hash_has_the_parameters_of_a_real_one() {
        let mut memory = Vec::new();
        let real = hash_with(&mut memory, "a user's password").unwrap();
        let dummy = dummy_hash(&mut memory).unwrap();
        let params = |phc: &str| PasswordHash::new(phc).unwrap().params.to_string();
        assert_eq!(params(dummy), params(&real));
        assert_eq!(
            PasswordHash::new(dummy).unwrap().algorithm,
            PasswordHash::new(&real).unwrap().algorithm
        );
    }
}
