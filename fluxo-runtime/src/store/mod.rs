//! The storage contract the engine runs on.
//!
//! The engine talks to storage only through [`Store`]. A backend is correct
//! when the shared conformance suite passes against a real server of that
//! kind. Backends do not understand journal events: they store the opaque,
//! already-encoded bytes the engine hands them, and they enforce the few
//! rules that make the engine safe:
//!
//! * **Leases.** [`Store::claim`] hands out runnable instances under a lease
//!   with a fresh, strictly increasing `lease_token`.
//! * **Fencing.** Every [`Commit`] names the lease token it was written under;
//!   a backend applies it only if that token is still the instance's current
//!   one, all in one atomic unit, and otherwise answers
//!   [`CommitOutcome::LeaseLost`] without writing anything.
//! * **No lost wake-ups.** Every event that may un-park an instance (a signal,
//!   a cancel request, a child finishing) bumps the instance's `inbox_seq`;
//!   a [`Transition::Park`] is refused when the inbox moved since the engine
//!   last looked.

#[doc(hidden)]
pub mod conformance;
#[cfg(feature = "memory")]
pub mod memory;
#[cfg(feature = "mongodb")]
pub mod mongodb;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(all(
    test,
    any(
        feature = "sqlite",
        feature = "postgres",
        feature = "redis",
        feature = "mongodb"
    )
))]
mod test_fixtures;

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
/// The list type of [`Commit::events`], re-exported so a store, a test or
/// a benchmark can name it without depending on `smallvec` itself.
pub use smallvec::SmallVec;

/// Milliseconds since the Unix epoch, the time unit of every store.
pub type Millis = i64;

/// The current wall-clock time in [`Millis`].
pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// `d` in [`Millis`], `Millis::MAX` for a longer one.
pub(crate) fn duration_millis(d: std::time::Duration) -> Millis {
    Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX)
}

/// The journal format this build writes and reads. Instances created by a
/// build with another format are refused with a typed error.
pub const HISTORY_FORMAT: u32 = 1;

/// Lifecycle state of a workflow instance as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceStatus {
    /// Started and not finished: running on a worker, runnable, or parked on
    /// a timer, a signal or a child.
    Running,
    /// Finished with an output.
    Completed,
    /// Finished with a failure.
    Failed,
    /// Stopped by a cancel request.
    Cancelled,
}

impl InstanceStatus {
    /// Whether the instance has finished (completed, failed or cancelled).
    pub fn is_finished(self) -> bool {
        !matches!(self, InstanceStatus::Running)
    }

    /// The stable lower-case name used in storage.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Running => "running",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Cancelled => "cancelled",
        }
    }

    /// Parses the name written by [`InstanceStatus::as_str`].
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "running" => InstanceStatus::Running,
            "completed" => InstanceStatus::Completed,
            "failed" => InstanceStatus::Failed,
            "cancelled" => InstanceStatus::Cancelled,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "unknown instance status {other:?}"
                )))
            }
        })
    }
}

impl fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A workflow instance to create.
#[derive(Debug, Clone)]
pub struct NewInstance {
    /// Unique instance id.
    pub id: String,
    /// Registered workflow name.
    pub workflow: String,
    /// Workflow version the instance runs on for its whole life.
    pub version: u32,
    /// Encoded input.
    pub input: Vec<u8>,
    /// The parent instance, for a child workflow; woken when this finishes.
    pub parent_id: Option<String>,
}

/// Result of [`Store::create_instance`].
#[derive(Debug, Clone)]
pub enum CreateOutcome {
    /// A new instance was created.
    Created,
    /// An instance with that id already existed; nothing was written.
    Existing(InstanceRecord),
}

/// Result of [`Store::get_if_finished`].
#[derive(Debug, Clone)]
pub enum FinishedLookup {
    /// No instance has that id.
    NotFound,
    /// The instance exists and has not finished.
    Unfinished,
    /// The instance finished; its record.
    Finished(InstanceRecord),
}

/// Everything stored about one instance except its journal.
#[derive(Debug, Clone)]
pub struct InstanceRecord {
    /// Instance id.
    pub id: String,
    /// Workflow name.
    pub workflow: String,
    /// Workflow version.
    pub version: u32,
    /// Lifecycle state.
    pub status: InstanceStatus,
    /// Encoded input.
    pub input: Vec<u8>,
    /// Encoded output, once completed.
    pub output: Option<Vec<u8>>,
    /// Encoded failure, once failed or cancelled.
    pub failure: Option<Vec<u8>>,
    /// Parent instance of a child workflow.
    pub parent_id: Option<String>,
    /// Whether a cancel was requested.
    pub cancel_requested: bool,
    /// Journal format the instance was written with.
    pub history_format: u32,
    /// Creation time.
    pub created_at: Millis,
    /// Time of the last change, to the store clock's resolution (a few
    /// milliseconds for a step on the in-memory store).
    pub updated_at: Millis,
}

/// One journal entry as stored: an opaque encoded event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    /// Position in the instance's journal: 0, 1, 2, ... without gaps.
    pub event_id: u64,
    /// Sequence number of the workflow operation the event belongs to.
    pub seq: u64,
    /// Short event kind, for inspection (`step_completed`, `timer_fired`, ...):
    /// borrowed when the engine writes it, owned when a store reads it back.
    pub kind: Cow<'static, str>,
    /// Encoded event.
    pub data: Vec<u8>,
}

/// What a worker asks for when it claims work.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// Identity of the claiming worker, used for lease renewal.
    pub owner: String,
    /// The `(workflow, version)` pairs the worker can run.
    pub workflows: Vec<(String, u32)>,
    /// How many instances to claim at most.
    pub limit: usize,
    /// Lease length.
    pub lease: Duration,
}

/// An instance handed to a worker under a lease.
#[derive(Debug, Clone)]
pub struct ClaimedInstance {
    /// The instance.
    pub record: InstanceRecord,
    /// The fencing token every commit must carry.
    pub lease_token: u64,
    /// Number of journal entries stored (the next event id).
    pub next_event_id: u64,
    /// Current inbox sequence (see [`Transition::Park`]).
    pub inbox_seq: u64,
}

/// Result of [`Store::claim`].
#[derive(Debug, Clone, Default)]
pub struct ClaimBatch {
    /// Instances now leased to the caller.
    pub claimed: Vec<ClaimedInstance>,
    /// Earliest future time at which another instance becomes runnable, if
    /// known; the worker sleeps until then at most.
    pub next_wake: Option<Millis>,
    /// The store stopped before `limit` on purpose (it hands out instances
    /// in smaller batches so the first ones start sooner) and more may be
    /// runnable: the worker claims again at once instead of waiting.
    pub more: bool,
}

/// A signal waiting in an instance's inbox.
#[derive(Debug, Clone)]
pub struct InboxSignal {
    /// Inbox position; signals are consumed in this order.
    pub signal_id: u64,
    /// Encoded payload.
    pub payload: Vec<u8>,
}

/// State change applied together with a commit.
#[derive(Debug, Clone, Default)]
pub enum Transition {
    /// Keep the lease and keep running.
    #[default]
    None,
    /// Release the lease and sleep until `wake_at` (or until woken by the
    /// inbox when `None`). Refused with [`CommitOutcome::InboxChanged`] when
    /// the inbox sequence is no longer `seen_inbox`; the rest of the commit is
    /// still applied and the lease kept.
    Park {
        /// When the instance becomes runnable again by itself.
        wake_at: Option<Millis>,
        /// Inbox sequence the engine saw when it decided to park.
        seen_inbox: u64,
    },
    /// Release the lease; the instance is runnable again at once.
    Release,
    /// Finish with an output.
    Complete {
        /// Encoded output.
        output: Vec<u8>,
    },
    /// Finish with a failure.
    Fail {
        /// Encoded failure.
        failure: Vec<u8>,
    },
    /// Finish as cancelled.
    Cancel {
        /// Encoded failure describing the cancellation.
        failure: Vec<u8>,
    },
}

/// A fenced, atomic change to one instance.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    /// The instance. Shared, not owned: the engine hands the same id to
    /// every commit of an instance without copying it.
    pub instance_id: Arc<str>,
    /// Lease token the change is written under.
    pub lease_token: u64,
    /// Journal entries to append, with consecutive event ids starting at the
    /// instance's current `next_event_id`. Almost every commit carries one
    /// (a step's result), held inline so a commit costs no allocation for
    /// its list; read it as a slice, build it with `vec![..].into()`.
    pub events: SmallVec<[StoredEvent; 1]>,
    /// A signal consumed by this change.
    pub consume_signal: Option<u64>,
    /// Instances to create with this change (child workflows); an id that
    /// already exists is left as it is.
    pub new_instances: Vec<NewInstance>,
    /// Instances to request cancellation of (children of a cancelled parent).
    pub cancel_instances: Vec<String>,
    /// State change.
    pub transition: Transition,
}

/// Result of a [`Commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Everything was applied.
    Applied {
        /// Whether a cancel has been requested for the instance.
        cancel_requested: bool,
    },
    /// Everything but the park was applied: the inbox moved. The lease is
    /// still held.
    InboxChanged {
        /// The current inbox sequence.
        inbox_seq: u64,
        /// Whether a cancel has been requested for the instance.
        cancel_requested: bool,
    },
    /// Nothing was applied: the lease token is no longer current.
    LeaseLost,
}

/// What [`Store::commit_now`] did with a commit.
#[derive(Debug)]
pub enum CommitNow {
    /// The commit was made, or refused, at once: what [`Store::commit`]
    /// would have answered.
    Done(StoreResult<CommitOutcome>),
    /// Nothing was done: the store cannot commit without waiting. Here is
    /// the commit back, for [`Store::commit`].
    Later(Commit),
}

/// Filter for [`Store::list_instances`].
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    /// Only instances of this workflow.
    pub workflow: Option<String>,
    /// Only instances in this state.
    pub status: Option<InstanceStatus>,
    /// At most this many (newest first); `None` means 100.
    pub limit: Option<usize>,
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No instance with that id.
    #[error("no workflow instance with id {0:?}")]
    NotFound(String),
    /// The instance has finished and takes no more signals.
    #[error("workflow instance {id:?} has already finished ({status})")]
    Finished {
        /// Instance id.
        id: String,
        /// Its final state.
        status: InstanceStatus,
    },
    /// Stored data could not be understood.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A write conflicted with another (e.g. a duplicate journal position).
    #[error("conflicting write: {0}")]
    Conflict(String),
    /// The backend does not offer this operation.
    #[error("{0}")]
    Unsupported(String),
    /// The backend failed (connection, I/O, ...). Usually transient.
    #[error("storage backend error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// Wraps a backend error.
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

/// Shorthand for store results.
pub type StoreResult<T> = Result<T, StoreError>;

/// The same failure for each of the `n` commits of a batch: `e` for the
/// first, a backend error with its message for the others.
pub(crate) fn all_failed(e: StoreError, n: usize) -> Vec<StoreResult<CommitOutcome>> {
    let message = e.to_string();
    std::iter::once(Err(e))
        .chain(std::iter::repeat_with(|| {
            Err(StoreError::Backend(message.clone().into()))
        }))
        .take(n)
        .collect()
}

/// Why commit `c`, made under a lease that is still current, does not fit
/// a journal whose next entry is `next_event_id`.
#[cfg(any(feature = "memory", feature = "sqlite", feature = "postgres"))]
pub(crate) fn journal_conflict(c: &Commit, next_event_id: u64) -> StoreError {
    match c
        .events
        .iter()
        .zip(next_event_id..)
        .find(|(e, expected)| e.event_id != *expected)
    {
        Some((e, expected)) => StoreError::Conflict(format!(
            "instance {:?}: journal entry {} written where {} was expected",
            c.instance_id, e.event_id, expected
        )),
        None => StoreError::Conflict(format!(
            "instance {:?}: the journal changed during the commit",
            c.instance_id
        )),
    }
}

/// The storage interface of the engine. See the module docs for the rules a
/// backend must keep.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Short backend name for logs (`memory`, `sqlite`, ...).
    fn backend_name(&self) -> &'static str;

    /// Creates an instance, runnable at once, or reports the existing one
    /// with the same id.
    async fn create_instance(&self, new: NewInstance) -> StoreResult<CreateOutcome>;

    /// Reads one instance.
    async fn get_instance(&self, id: &str) -> StoreResult<Option<InstanceRecord>>;

    /// Reads one instance's record if it has finished: what a caller waiting
    /// for a result polls. The default reads the record with
    /// [`Store::get_instance`]; a store that can tell the status more cheaply
    /// than it copies the record overrides it.
    async fn get_if_finished(&self, id: &str) -> StoreResult<FinishedLookup> {
        Ok(match self.get_instance(id).await? {
            None => FinishedLookup::NotFound,
            Some(rec) if rec.status.is_finished() => FinishedLookup::Finished(rec),
            Some(_) => FinishedLookup::Unfinished,
        })
    }

    /// Lists instances, newest first.
    async fn list_instances(&self, filter: ListFilter) -> StoreResult<Vec<InstanceRecord>>;

    /// Reads an instance's whole journal, ordered by event id.
    async fn load_history(&self, id: &str) -> StoreResult<Vec<StoredEvent>>;

    /// Leases up to `limit` runnable instances: running, not leased (or with
    /// an expired lease), and due (`ready_at <= now`), of the listed
    /// workflows. Each claim increments the instance's lease token.
    async fn claim(&self, req: &ClaimRequest) -> StoreResult<ClaimBatch>;

    /// Extends `owner`'s leases on the instances `ids` to `lease` from now,
    /// and returns those of them that have a cancel request, sorted. An id
    /// not leased to `owner` (any more) is skipped.
    ///
    /// A lease `owner` holds on an instance it does not list is left to run
    /// out. A worker lists the instances it runs, so an instance leased to
    /// it by a claim whose answer never arrived (the connection dropped
    /// after the store applied it) becomes claimable again once that lease
    /// ends, instead of being renewed for as long as the worker lives.
    async fn renew_leases(
        &self,
        owner: &str,
        ids: &[String],
        lease: Duration,
    ) -> StoreResult<Vec<String>>;

    /// Ends every lease held by `owner` now, so that any worker can claim
    /// those instances at once. A worker starting under the id of a process
    /// that died does this.
    async fn end_leases(&self, owner: &str) -> StoreResult<()>;

    /// Applies one fenced change atomically.
    async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome>;

    /// Applies one fenced change, as [`Store::commit`] does, right here, when
    /// the store can without I/O or waiting (the in-memory store). The
    /// engine tries it before [`Store::commit`], on an async worker thread,
    /// so it must never block: a commit made here needs no future of its
    /// own. The default hands the commit back ([`CommitNow::Later`]); a
    /// store that reaches a disk or a server keeps that default (a blocking
    /// local store has [`Store::try_commit_here`] instead, which the engine
    /// calls only where it may block). A backend error answered here is
    /// retried through [`Store::commit`]. The engine calls it holding the
    /// instance's own lock, so that the bookkeeping of an applied commit
    /// follows under the same lock: it must not call back into the engine,
    /// and should hold locks of its own only briefly.
    fn commit_now(&self, commit: Commit) -> CommitNow {
        CommitNow::Later(commit)
    }

    /// Applies several changes, each fenced and atomic on its own; a backend
    /// may group them in one transaction (group commit).
    async fn commit_batch(&self, commits: Vec<Commit>) -> Vec<StoreResult<CommitOutcome>> {
        let mut out = Vec::with_capacity(commits.len());
        for c in commits {
            out.push(self.commit(c).await);
        }
        out
    }

    /// Appends a signal to a running instance's inbox and wakes it.
    async fn send_signal(&self, id: &str, name: &str, payload: Vec<u8>) -> StoreResult<u64>;

    /// The oldest unconsumed signal named `name`, and the current inbox
    /// sequence.
    async fn next_signal(&self, id: &str, name: &str) -> StoreResult<(Option<InboxSignal>, u64)>;

    /// Records a cancel request and wakes the instance. Returns the
    /// instance's status (a finished instance is left as it is).
    async fn request_cancel(&self, id: &str) -> StoreResult<InstanceStatus>;

    /// Restarts a running instance with a new input and an empty journal,
    /// keeping its id, inbox and cancel request (continue-as-new). Fenced
    /// like a commit: with a stale `lease_token` nothing is written and the
    /// answer is [`CommitOutcome::LeaseLost`]. The lease is released and the
    /// instance is runnable at once.
    async fn continue_as_new(
        &self,
        id: &str,
        lease_token: u64,
        input: Vec<u8>,
    ) -> StoreResult<CommitOutcome> {
        let _ = (id, lease_token, input);
        Err(StoreError::Unsupported(format!(
            "continue-as-new is not supported by the {} backend",
            self.backend_name()
        )))
    }

    /// Notices pushed when any process may have made work runnable (an
    /// instance created, a signal sent, a cancel requested, an instance
    /// released or woken): the counter changes on each. Workers wait on it
    /// instead of polling fast. `None` (the default): the backend cannot
    /// push, and workers poll.
    fn work_notifications(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Whether [`Store::commit_batch`] is cheaper per commit than
    /// [`Store::commit`] (one transaction, one flush): the engine then groups
    /// concurrent instances' commits (group commit).
    fn prefers_batches(&self) -> bool {
        false
    }

    /// Whether [`Store::try_commit_here`] can ever commit: the store's
    /// commit is a blocking call on this machine (a local file), which a
    /// caller allowed to block can make itself. Default `false`.
    fn commits_here(&self) -> bool {
        false
    }

    /// Applies one fenced change, as [`Store::commit`] does, on the calling
    /// thread, which it blocks; `None` (nothing done) when another write of
    /// this process holds the store at the moment, or the store cannot.
    ///
    /// The engine calls it only from a thread that may block (inside
    /// `tokio::task::block_in_place`) and only while no group commit is
    /// pending: for a lone commit, handing it to the store's own thread and
    /// back costs more than the commit itself. The default returns `None`.
    fn try_commit_here(&self, commit: &Commit) -> Option<StoreResult<CommitOutcome>> {
        let _ = commit;
        None
    }
}
