//! Argon2id password hashing (OWASP: m = 19 MiB, t = 2, p = 1) on a few threads of its own, at
//! the lowest scheduling priority, behind a semaphore. A login flood queues here, and while it
//! runs the other RPCs keep the CPU first: a hash takes 13–35 ms of CPU, a catalog read 20 µs,
//! so sharing the core equally would make every other call wait behind hashes. Idle CPU still
//! goes to the hashes, so logins are slowed only while the server is busy (and only as much
//! as it is: on a saturated core they get a sliver of it, on a half-busy one the idle half).
//!
//! The queue is bounded by length, not by time: a hash that finds it full is refused at once
//! (`UNAVAILABLE`, nothing done), and one that got in waits for its turn as long as its
//! request's deadline allows. A time bound would refuse logins that had already waited, only
//! because the server was busy with other calls, and make them queue again from the end.

use std::sync::{Arc, Mutex, mpsc};

use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{PasswordHasher, PasswordVerifier, phc::PasswordHash},
};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

use crate::error::AppError;

/// Hashes that may wait for each hashing thread; one more is told to come back later.
const WAITING_PER_THREAD: usize = 64;

fn argon2() -> Argon2<'static> {
    // Params::new only fails on out-of-range values; these are the documented defaults.
    let params = Params::new(19 * 1024, 2, 1, None).unwrap_or(Params::DEFAULT);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// Nice value of the hashing threads, the lowest there is. They also run under `SCHED_IDLE`
/// (`lower_priority`); the nice value is what remains if that is refused.
const HASHING_NICE: i32 = 19;

type Job = Box<dyn FnOnce() + Send>;

pub struct Passwords {
    /// One per hash running or waiting: the queue's bound.
    places: Arc<Semaphore>,
    /// One per hashing thread.
    permits: Arc<Semaphore>,
    /// To the hashing threads; they stop when this is dropped.
    jobs: mpsc::Sender<Job>,
    /// Verified against when the login names nobody, so both failures cost the same.
    dummy_hash: String,
}

impl Passwords {
    /// Hashes run on half the cores' worth of threads, at least one.
    pub async fn new() -> Result<Self, AppError> {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (cores / 2).max(1);
        Self::with_threads(threads, WAITING_PER_THREAD * threads).await
    }

    /// `threads` hashing threads, and `waiting` hashes at most waiting for them.
    async fn with_threads(threads: usize, waiting: usize) -> Result<Self, AppError> {
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
            places: Arc::new(Semaphore::new(threads + waiting)),
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
        let place = self
            .places
            .clone()
            .try_acquire_owned()
            .map_err(|_| AppError::Unavailable("password hashing queue is full".into()))?;
        // Dropped with the request (its deadline, or the client gone) while still waiting.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| AppError::Internal(e.into()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let result = work();
            // Freed before the caller hears back, so that its next hash finds them free.
            drop((place, permit));
            let _ = tx.send(result);
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

/// Puts the calling thread at the lowest scheduling priority (Linux: both are per thread).
///
/// `SCHED_IDLE`: a thread of normal policy that wakes up (a request arrived) takes the core
/// from it at once, where a nice-19 thread keeps it until its slice is used. P9, `ListPrograms`
/// p99 with 50 logins running over its p99 without: 2.7 at nice 10, 1.65 at nice 19, 0.83
/// under `SCHED_IDLE` (short runs, the same machine; logins per window unchanged).
#[cfg(target_os = "linux")]
fn lower_priority() {
    let warn = |what: &str| {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot {what} of the password hashing thread"
        );
    };
    // SAFETY: gettid and setpriority only read their integer arguments; setpriority on our
    // own thread id changes nothing but this thread's nice value.
    if unsafe {
        libc::setpriority(
            libc::PRIO_PROCESS,
            libc::gettid() as libc::id_t,
            HASHING_NICE,
        )
    } != 0
    {
        warn("lower the nice value");
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param that outlives the
    // call, which only reads it.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        warn("set SCHED_IDLE");
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
        // SAFETY: reads the calling thread's scheduling policy.
        let policy = passwords
            .run(|| unsafe { libc::sched_getscheduler(0) })
            .await
            .expect("run");
        assert_eq!(policy, libc::SCHED_IDLE);
        let name = passwords
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .expect("run");
        assert!(name.is_some_and(|n| n.starts_with("argon2-")));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_the_queued_hashes_all_run() {
        let passwords = Arc::new(Passwords::with_threads(1, 3).await.expect("init"));
        // The one thread is held by a job until `release` is sent.
        let (release, hold) = mpsc::channel::<()>();
        let busy = tokio::spawn({
            let passwords = passwords.clone();
            async move { passwords.run(move || hold.recv().is_ok()).await }
        });
        let queued: Vec<_> = (0..3)
            .map(|_| {
                let passwords = passwords.clone();
                tokio::spawn(async move {
                    passwords
                        .verify(&SecretString::from("queued password"), None)
                        .await
                })
            })
            .collect();
        while passwords.places.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
        let refused = passwords
            .verify(&SecretString::from("one too many"), None)
            .await;
        assert!(
            matches!(&refused, Err(AppError::Unavailable(m)) if m.contains("queue is full")),
            "{refused:?}"
        );
        release.send(()).expect("release the thread");
        assert!(busy.await.expect("join").expect("run"));
        for task in queued {
            assert!(!task.await.expect("join").expect("verify"));
        }
        assert_eq!(passwords.places.available_permits(), 4);
    }
}
