//! Connection threads: every SQLite connection of a store lives on a thread
//! of its own and runs whole jobs sent to it (a transaction with all its
//! statements, or a query). SQLite calls block, so they stay off the async
//! runtime, and a commit costs one hand-off to the thread and one back, not
//! one per statement.
//!
//! A caller that may block its own thread can also run a job there, on the
//! connection of a one-connection set while no job holds it
//! ([`Threads::try_run_here`]): that saves the two hand-offs, which cost
//! more than the job itself for a lone commit.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread;

use rusqlite::Connection;
use tokio::sync::{oneshot, watch};

use super::open::Opener;
use crate::store::{StoreError, StoreResult};

/// A job runs with the connection and returns what is left to do once the
/// connection is free again: answering its callers. So a caller woken by
/// the answer finds the connection free to run a job on its own thread.
type Job = Box<dyn FnOnce(&mut Slot) -> Answer + Send>;

/// Sends a job's results to its callers.
pub(super) type Answer = Box<dyn FnOnce() + Send>;

/// A thread's connection.
pub(super) struct Slot {
    /// `None` once the store is closed, or while a replacement failed.
    conn: Option<Connection>,
    /// How to open the connection again; `None` for an in-memory database,
    /// which lives and dies with its only connection.
    reopen: Option<Opener>,
    /// Set after a backend failure: SQLite rolls a transaction back by
    /// itself on some I/O errors, so the connection is replaced before its
    /// next use rather than trusted.
    replace: bool,
}

impl Slot {
    /// The connection, reopened first if an earlier job failed on it.
    pub(super) fn conn(&mut self) -> StoreResult<&mut Connection> {
        if self.replace {
            if let Some(opener) = &self.reopen {
                self.conn = None;
                self.conn = Some(opener.open()?);
            }
            self.replace = false;
        }
        self.conn.as_mut().ok_or_else(closed)
    }

    /// Runs `f` with the connection and notes how it ended.
    pub(super) fn with_conn<T>(
        &mut self,
        f: impl FnOnce(&mut Connection) -> StoreResult<T>,
    ) -> StoreResult<T> {
        let out = self.conn().and_then(f);
        self.note(&out);
        out
    }

    /// Notes how a use of the connection ended: after a backend error it
    /// is replaced before its next use.
    pub(super) fn note<T>(&mut self, result: &StoreResult<T>) {
        if let Err(e) = result {
            self.note_error(e);
        }
    }

    /// Notes an error of a use of the connection.
    pub(super) fn note_error(&mut self, e: &StoreError) {
        if matches!(e, StoreError::Backend(_)) && self.reopen.is_some() {
            self.replace = true;
        }
    }
}

/// A set of threads, one connection each, taking jobs from one queue.
pub(super) struct Threads {
    /// The connection of a one-connection set, for callers that run a job
    /// on their own thread; its thread holds the lock while it runs a job.
    here: Option<Arc<Mutex<Slot>>>,
    /// `None` once closed.
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    /// Counts the threads still running; each sends once it has ended.
    ended: watch::Receiver<usize>,
}

impl Threads {
    /// Starts one thread per connection in `conns`.
    pub(super) fn start(
        name: &str,
        conns: Vec<Connection>,
        reopen: Option<Opener>,
    ) -> StoreResult<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let (running, ended) = watch::channel(conns.len());
        let running = Arc::new(running);
        let single = conns.len() == 1;
        let mut here = None;
        for (i, conn) in conns.into_iter().enumerate() {
            let rx = Arc::clone(&rx);
            let running = Arc::clone(&running);
            let slot = Arc::new(Mutex::new(Slot {
                conn: Some(conn),
                reopen: reopen.clone(),
                replace: false,
            }));
            if single {
                here = Some(Arc::clone(&slot));
            }
            thread::Builder::new()
                .name(format!("fluxo-{name}-{i}"))
                .spawn(move || {
                    loop {
                        // Only the thread holding the lock waits on the queue.
                        let job = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
                        let Ok(job) = job else { break };
                        let answer = run_job(&mut lock(&slot), job);
                        answer();
                    }
                    // Closed: the connection goes with the thread, also for
                    // callers that would run a job here.
                    let mut slot = lock(&slot);
                    slot.conn = None;
                    slot.reopen = None;
                    running.send_modify(|n| *n -= 1);
                })
                .map_err(StoreError::backend)?;
        }
        Ok(Threads {
            here,
            queue: Mutex::new(Some(tx)),
            ended,
        })
    }

    /// Runs `f` with the connection on the calling thread, which it blocks,
    /// if this is a one-connection set and no job holds the connection;
    /// `None` (nothing run) otherwise. For callers that may block, to save
    /// the hand-off to the connection's thread and back. A backend error
    /// makes the connection be reopened before its next use; a panic in `f`
    /// is an error, as on the thread.
    pub(super) fn try_run_here<T, F>(&self, f: F) -> Option<StoreResult<T>>
    where
        F: FnOnce(&mut Connection) -> StoreResult<T>,
    {
        let mut slot = match self.here.as_ref()?.try_lock() {
            Ok(slot) => slot,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        Some(
            guarded(&mut slot, |slot| slot.with_conn(f)).unwrap_or_else(|| {
                Err(StoreError::Backend(
                    "a SQLite job panicked; its connection is replaced".into(),
                ))
            }),
        )
    }

    /// Runs `f` on one of the connections and returns its result. A backend
    /// error makes that connection be reopened before its next use.
    pub(super) async fn run<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        self.run_on_slot(move |slot| slot.with_conn(f)).await?
    }

    /// Runs `f` with the slot itself, for jobs that use the connection
    /// several times and note each outcome.
    pub(super) async fn run_on_slot<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Slot) -> T + Send + 'static,
    {
        let (reply, result) = oneshot::channel();
        let job: Job = Box::new(move |slot: &mut Slot| -> Answer {
            // The caller gave up (its future was dropped) before the job
            // started: it is not run, as a dropped transaction is not.
            if reply.is_closed() {
                return Box::new(|| ());
            }
            let out = f(slot);
            Box::new(move || {
                let _ = reply.send(out);
            })
        });
        self.send(job)?;
        result.await.map_err(|_| {
            StoreError::Backend("a SQLite connection thread failed while running a job".into())
        })
    }

    /// Queues `f` to run on one of the connections, without waiting for
    /// it; unlike [`Threads::run_on_slot`] it runs even if nobody waits by
    /// then. Fails only when the threads are closed (`f` is dropped).
    pub(super) fn submit<F>(&self, f: F) -> StoreResult<()>
    where
        F: FnOnce(&mut Slot) -> Answer + Send + 'static,
    {
        self.send(Box::new(f))
    }

    /// Queues a job; fails when the threads are closed.
    fn send(&self, job: Job) -> StoreResult<()> {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let sender = queue.as_ref().ok_or_else(closed)?;
        sender.send(job).map_err(|_| closed())
    }

    /// Lets the threads finish the jobs already queued, then closes their
    /// connections and ends them. Later calls fail.
    pub(super) async fn close(&self) {
        drop(
            self.queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let mut ended = self.ended.clone();
        // Errs only if every thread is gone, which is what is waited for.
        let _ = ended.wait_for(|running| *running == 0).await;
    }
}

/// Runs a job from the queue. A panicking job drops its reply channels,
/// which its callers see as an error; the thread goes on, with a fresh
/// connection.
fn run_job(slot: &mut Slot, job: Job) -> Answer {
    guarded(slot, job).unwrap_or_else(|| Box::new(|| ()))
}

/// Runs `f` with the slot; `None` if it panicked, in which case the
/// connection is replaced before its next use.
fn guarded<T>(slot: &mut Slot, f: impl FnOnce(&mut Slot) -> T) -> Option<T> {
    let out = catch_unwind(AssertUnwindSafe(|| f(slot))).ok();
    if out.is_none() {
        slot.replace = slot.reopen.is_some();
    }
    out
}

/// Locks a slot; a job that panicked while holding it left it usable
/// (its connection is replaced before the next use).
fn lock(slot: &Mutex<Slot>) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(super) fn closed() -> StoreError {
    StoreError::Backend("the SQLite store is closed".into())
}
