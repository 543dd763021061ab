//! Argon2id password hashing (OWASP: m = 19 MiB, t = 2, p = 1) on a few threads of its own, at
//! a lower scheduling priority, behind a semaphore. A login flood queues here, and while it
//! runs the other RPCs keep the CPU first: a hash takes 13–35 ms of CPU, a catalog read 20 µs,
//! so sharing the core equally would make every other call wait behind hashes. Idle CPU still
//! goes to the hashes, so logins are slowed only while the server is busy.

use std::{
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash},
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::error::AppError;

/// How long a hash may wait for its turn before the caller is told to come back later.
const QUEUE_WAIT: Duration = Duration::from_secs(10);

fn argon2() -> Argon2<'static> {
    // Params::new only fails on out-of-range values; these are the documented defaults.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or(Params::DEFAULT);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Nice value of the hashing threads: the scheduler gives a nice-0 thread about nine times
/// their share of a contended core (Linux; elsewhere they run at normal priority).
const HASHING_NICE: i32 = 10;

type Job = Box<dyn FnOnce() + Send>;

pub struct Passwords {
    permits: Arc<Semaphore>,
    /// To the hashing threads; they stop when this is dropped.
    jobs: mpsc::Sender<Job>,
    /// Verified against when the login names nobody, so both failures cost the same.
    dummy_hash: String,
}

impl Passwords {
    /// `concurrency` hashes at most run at once: half the cores, at least one.
    pub async fn new() -> Result<Self, AppError> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (cores / 2).max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || hashing_thread(&queue))
                .map_err(|e| AppError::Internal(e.into()))?;
        }
        let mut passwords = Self {
            permits: Arc::new(Semaphore::new(threads)),
            jobs,
            dummy_hash: String::new(),
        };
        passwords.dummy_hash = passwords
            .run(|| hash_now(b"not a real password: dummy"))
            .await??;
        Ok(passwords)
    }

    pub async fn hash(&self, password: &SecretString) -> Result<String, AppError> {
        let password = password.expose_secret().as_bytes().to_vec();
        self.run(move || hash_now(&password)).await?
    }

    /// True when `password` matches `phc`; with no hash (unknown user) a dummy is checked and
    /// the answer is false.
    pub async fn verify(
        &self,
        password: &SecretString,
        phc: Option<String>,
    ) -> Result<bool, AppError> {
        let known = phc.is_some();
        let phc = phc.unwrap_or_else(|| self.dummy_hash.clone());
        let password = password.expose_secret().as_bytes().to_vec();
        let matched = self
            .run(move || {
                PasswordHash::new(&phc)
                    .map(|parsed| argon2().verify_password(&password, &parsed).is_ok())
                    .unwrap_or(false)
            })
            .await?;
        Ok(known && matched)
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AppError> {
        let permit = tokio::time::timeout(QUEUE_WAIT, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| AppError::Unavailable("password hashing queue is full".into()))?
            .map_err(|e| AppError::Internal(e.into()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _permit = permit;
            let _ = tx.send(work());
        });
        self.jobs
            .send(job)
            .map_err(|_| AppError::Internal(anyhow::anyhow!("password hashing threads stopped")))?;
        rx.await
            .map_err(|_| AppError::Internal(anyhow::anyhow!("password hashing job lost")))
    }
}

/// Runs hashing jobs until every sender is gone.
fn hashing_thread(queue: &Mutex<mpsc::Receiver<Job>>) {
    lower_priority();
    loop {
        let job = match queue.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(),
            Err(mpsc::RecvError) => return,
        }
    }
}

/// Lowers the calling thread's scheduling priority (Linux nice values are per thread).
#[cfg(target_os = "linux")]
fn lower_priority() {
    // SAFETY: gettid and setpriority only read their integer arguments; setpriority on our
    // own thread id changes nothing but this thread's nice value.
    let result = unsafe {
        let tid = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, HASHING_NICE)
    };
    if result != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lower the priority of the password hashing thread"
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

fn hash_now(password: &[u8]) -> Result<String, AppError> {
    argon2()
        .hash_password(password)
        .map(|h| h.to_string())
        .map_err(|e| AppError::Internal(anyhow::anyhow!("argon2: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_with_owasp_parameters_and_verify() {
        let passwords = Passwords::new().await.expect("init");
        let secret = SecretString::from("correct horse battery");
        let phc = passwords.hash(&secret).await.expect("hash");
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(
            passwords
                .verify(&secret, Some(phc.clone()))
                .await
                .expect("verify")
        );
        let wrong = SecretString::from("wrong horse battery");
        assert!(!passwords.verify(&wrong, Some(phc)).await.expect("verify"));
        assert!(!passwords.verify(&secret, None).await.expect("dummy"));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn hashes_run_on_threads_of_lower_priority() {
        let passwords = Passwords::new().await.expect("init");
        // SAFETY: reads this thread's nice value.
        let nice = passwords
            .run(|| unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) })
            .await
            .expect("run");
        assert_eq!(nice, HASHING_NICE);
        let name = passwords
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .expect("run");
        assert!(name.is_some_and(|n| n.starts_with("argon2-")));
    }
}
