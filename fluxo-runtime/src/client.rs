//! The [`Fluxo`] handle and typed [`WorkflowHandle`]s: start, signal, await,
//! inspect and cancel workflow instances.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{DecodeError, Error, Failure};
use crate::finish_watch::{Ended, FinishWatch};
use crate::history::Event;
use crate::observe::LifecycleEvent;
use crate::payload;
use crate::shared::Shared;
use crate::store::{
    CreateOutcome, FinishedLookup, InstanceRecord, InstanceStatus, ListFilter, NewInstance, Store,
    StoreError,
};
use crate::worker::WorkerBuilder;
use crate::workflow::{Definition, HasSignal, Signal, Workflow};

/// The entry point: a store, the registered workflows, and the means to start
/// and drive instances. Cheap to clone.
#[derive(Clone)]
pub struct Fluxo {
    pub(crate) shared: Arc<Shared>,
}

impl std::fmt::Debug for Fluxo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fluxo")
            .field("backend", &self.shared.store.backend_name())
            .finish()
    }
}

/// Options for starting an instance.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    id: Option<String>,
}

impl StartOptions {
    /// Default options: a new id, a version 7 UUID (the time in
    /// milliseconds, then a counter and random bits). Default ids sort by
    /// start: after every default id this process made before, and across
    /// processes to the millisecond (as far as their clocks agree). They
    /// tell when an instance started; do not use them as secrets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Uses `id` as the instance id. Starting an id that already exists
    /// returns the existing instance's handle instead of starting it twice.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
}

/// One journal entry, decoded, as returned by [`Fluxo::history`].
#[derive(Debug, Clone, PartialEq)]
pub struct HistoryEntry {
    /// Position in the journal.
    pub event_id: u64,
    /// Sequence number of the operation.
    pub seq: u64,
    /// The event.
    pub event: Event,
}

impl Fluxo {
    /// A Fluxo on any [`Store`].
    pub fn with_store(store: impl Store) -> Self {
        Self::from_store(Arc::new(store))
    }

    /// A Fluxo on a shared store.
    pub fn from_store(store: Arc<dyn Store>) -> Self {
        Fluxo {
            shared: Shared::new(store),
        }
    }

    /// A Fluxo on the in-memory backend (for tests: nothing survives the
    /// process).
    #[cfg(feature = "memory")]
    pub fn in_memory() -> Self {
        Self::with_store(crate::store::memory::MemoryStore::new())
    }

    /// A Fluxo on a SQLite file, created if missing (WAL, `synchronous=FULL`).
    #[cfg(feature = "sqlite")]
    pub async fn sqlite(path: impl AsRef<std::path::Path>) -> Result<Self, Error> {
        Ok(Self::with_store(
            crate::store::sqlite::SqliteStore::open(path).await?,
        ))
    }

    /// A Fluxo on Postgres at `url`, in the schema `fluxo` (created and
    /// migrated as needed). See
    /// [`PostgresStore`](crate::store::postgres::PostgresStore) for options.
    #[cfg(feature = "postgres")]
    pub async fn postgres(url: &str) -> Result<Self, Error> {
        Ok(Self::with_store(
            crate::store::postgres::PostgresStore::connect(url).await?,
        ))
    }

    /// A Fluxo on the Postgres pool your service already has, in the schema
    /// `fluxo`.
    #[cfg(feature = "postgres")]
    pub async fn postgres_pool(pool: &sqlx::PgPool) -> Result<Self, Error> {
        let options = crate::store::postgres::PostgresOptions::new("");
        let store = crate::store::postgres::PostgresStore::from_pool(pool.clone(), options).await?;
        Ok(Self::with_store(store))
    }

    /// A Fluxo on Redis at `url`, keys under the prefix `fluxo`. See
    /// [`RedisStore`](crate::store::redis::RedisStore) for options and the
    /// durability you get.
    #[cfg(feature = "redis")]
    pub async fn redis(url: &str) -> Result<Self, Error> {
        Ok(Self::with_store(
            crate::store::redis::RedisStore::connect(url).await?,
        ))
    }

    /// A Fluxo on MongoDB at `url` (a replica set or sharded cluster of
    /// MongoDB 6 or later; a standalone server works without transactions),
    /// in database `fluxo`. See
    /// [`MongoStore`](crate::store::mongodb::MongoStore) for options and the
    /// durability you get.
    #[cfg(feature = "mongodb")]
    pub async fn mongodb(url: &str) -> Result<Self, Error> {
        Ok(Self::with_store(
            crate::store::mongodb::MongoStore::connect(url).await?,
        ))
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// Registers workflow `W` so workers of this Fluxo run it. Several
    /// versions of one workflow may be registered side by side.
    pub fn register<W: Workflow>(&self, _workflow: W) -> Result<&Self, Error> {
        self.shared.registry_mut().insert(Definition::of::<W>());
        self.shared.notify_work();
        Ok(self)
    }

    /// Registers a workflow defined at run time, with JSON input and output
    /// (the builder and DAG APIs use this). Start it with
    /// [`Fluxo::start_by_name`] and read its output with
    /// [`Fluxo::result_value`].
    pub fn register_dynamic<F>(
        &self,
        name: impl Into<String>,
        version: u32,
        run: F,
    ) -> Result<&Self, Error>
    where
        F: Fn(
                crate::WorkflowContext,
                serde_json::Value,
            ) -> futures::future::BoxFuture<
                'static,
                Result<serde_json::Value, crate::WorkflowError>,
            > + Send
            + Sync
            + 'static,
    {
        self.shared
            .registry_mut()
            .insert(Definition::dynamic(name.into(), version, run));
        self.shared.notify_work();
        Ok(self)
    }

    /// Waits for instance `id` to finish and returns its output as JSON, or
    /// the typed error it ended with.
    pub async fn result_value(&self, id: &str) -> Result<serde_json::Value, Error> {
        let ended = self.wait_ended(id).await?;
        output_of(&ended, "serde_json::Value")
    }

    /// Installs an observer of lifecycle events (once per `Fluxo`; use a
    /// [`CompositeObserver`](crate::observe::CompositeObserver) for several).
    /// Returns `false` if one was already installed.
    pub fn observe(&self, observer: impl crate::observe::Observer) -> bool {
        self.shared.observer.set(Arc::new(observer)).is_ok()
    }

    /// Installs middleware around every step attempt of this `Fluxo`'s
    /// workers (once; build the whole stack first). Returns `false` if a
    /// stack was already installed.
    pub fn use_middleware(&self, stack: crate::middleware::MiddlewareStack) -> bool {
        self.shared.middleware.set(stack).is_ok()
    }

    /// A worker builder: `fluxo.worker().concurrency(32).spawn()`.
    pub fn worker(&self) -> WorkerBuilder {
        WorkerBuilder::new(self.clone())
    }

    /// Starts an instance of a registered workflow by name (its latest
    /// version), with a JSON input.
    pub async fn start_by_name(
        &self,
        workflow: &str,
        input: serde_json::Value,
        options: StartOptions,
    ) -> Result<String, Error> {
        let version = self
            .shared
            .registry()
            .latest(workflow)
            .map(|d| d.version)
            .ok_or_else(|| Error::UnknownWorkflow {
                name: workflow.to_owned(),
                version: None,
            })?;
        let input = payload::encode(&input)?;
        self.create(workflow, version, input, options).await
    }

    async fn create(
        &self,
        workflow: &str,
        version: u32,
        input: Vec<u8>,
        options: StartOptions,
    ) -> Result<String, Error> {
        let id = options
            .id
            // Time-ordered: instances started close together sit close
            // together in a store's indexes, so a step's commit touches few
            // pages.
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let new = NewInstance {
            id: id.clone(),
            workflow: workflow.to_owned(),
            version,
            input,
            parent_id: None,
        };
        match self.shared.store.create_instance(new).await? {
            CreateOutcome::Created => {
                tracing::info!(workflow, %id, "workflow started");
                self.shared.observe(|o| {
                    o.on_event(&LifecycleEvent::WorkflowStarted { workflow, id: &id })
                });
                self.shared.notify_work();
            }
            CreateOutcome::Existing(rec) if rec.workflow != workflow => {
                return Err(Error::WorkflowMismatch {
                    id,
                    expected: workflow.to_owned(),
                    found: rec.workflow,
                })
            }
            CreateOutcome::Existing(_) => {}
        }
        Ok(id)
    }

    /// Reads an instance.
    pub async fn instance(&self, id: &str) -> Result<InstanceRecord, Error> {
        self.shared
            .store
            .get_instance(id)
            .await?
            .ok_or_else(|| Error::NotFound { id: id.to_owned() })
    }

    /// Lists instances, newest first.
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<InstanceRecord>, Error> {
        Ok(self.shared.store.list_instances(filter).await?)
    }

    /// An instance's journal, decoded.
    pub async fn history(&self, id: &str) -> Result<Vec<HistoryEntry>, Error> {
        let rec = self.instance(id).await?;
        self.shared
            .store
            .load_history(id)
            .await?
            .into_iter()
            .map(|s| {
                Event::from_stored(&s)
                    .map(|event| HistoryEntry {
                        event_id: s.event_id,
                        seq: s.seq,
                        event,
                    })
                    .map_err(|message| {
                        Error::Decode(Box::new(DecodeError {
                            workflow: rec.workflow.clone(),
                            id: id.to_owned(),
                            seq: Some(s.seq),
                            what: format!("journal entry {}", s.event_id),
                            type_name: "fluxo::history::Event".into(),
                            message,
                        }))
                    })
            })
            .collect()
    }

    /// Sends a signal by name with a JSON payload (see
    /// [`WorkflowHandle::signal`] for the typed form).
    pub async fn signal_by_name(
        &self,
        id: &str,
        signal: &str,
        payload: serde_json::Value,
    ) -> Result<(), Error> {
        let bytes = payload::encode(&payload)?;
        self.send_signal(id, signal, bytes).await
    }

    async fn send_signal(&self, id: &str, signal: &str, payload: Vec<u8>) -> Result<(), Error> {
        match self.shared.store.send_signal(id, signal, payload).await {
            Ok(_) => {
                self.shared.notify_work();
                Ok(())
            }
            Err(StoreError::NotFound(_)) => Err(Error::NotFound { id: id.to_owned() }),
            Err(StoreError::Finished { status, .. }) => Err(Error::WorkflowFinished {
                id: id.to_owned(),
                status,
                signal: signal.to_owned(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Requests cancellation of an instance; it stops at its next operation
    /// (a running step is interrupted) and its children are cancelled too.
    /// Cancelling a finished instance does nothing.
    pub async fn cancel(&self, id: &str) -> Result<(), Error> {
        match self.shared.store.request_cancel(id).await {
            Ok(_) => {
                self.shared.cancel_local(id);
                self.shared.notify_work();
                Ok(())
            }
            Err(StoreError::NotFound(_)) => Err(Error::NotFound { id: id.to_owned() }),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until an instance finishes and returns its record.
    pub async fn wait_finished(&self, id: &str) -> Result<InstanceRecord, Error> {
        self.wait_end(id, |_| None, |rec| rec).await
    }

    /// Waits until instance `id` finishes and returns how it ended: handed
    /// over by the worker of this process that recorded it, if one did, or
    /// else read from the store.
    pub(crate) async fn wait_ended(&self, id: &str) -> Result<Arc<Ended>, Error> {
        self.wait_end(id, FinishWatch::ended, |rec| Arc::new(rec.into()))
            .await
    }

    /// Waits until instance `id` finishes: `here` takes what a finish in
    /// this process left with the watch, `read` the record the store
    /// returns.
    async fn wait_end<T>(
        &self,
        id: &str,
        here: impl Fn(&FinishWatch) -> Option<T>,
        read: impl Fn(InstanceRecord) -> T,
    ) -> Result<T, Error> {
        let mut poll = Duration::from_millis(2);
        let watch = self.shared.finished.watch(id);
        // Whether the last wait ran out rather than being woken.
        let mut timed_out = false;
        loop {
            let notified = watch.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(end) = here(&watch) {
                return Ok(end);
            }
            // An instance that a worker of this client runs has not
            // finished, and its end wakes this wait: the store is read only
            // when the end was not handed over, or after 250 ms. (Decided
            // after `enable`, so an end right after this look is not missed.)
            if timed_out || !self.shared.runs_here(id) {
                // A lost connection while waiting is retried, not returned.
                let store = &self.shared.store;
                match crate::instance::retry_transient(|| store.get_if_finished(id)).await? {
                    FinishedLookup::Finished(rec) => return Ok(read(rec)),
                    FinishedLookup::NotFound => return Err(Error::NotFound { id: id.to_owned() }),
                    FinishedLookup::Unfinished => {}
                }
            }
            // Local finishes notify at once; other processes are polled.
            // While a worker of this client runs the instance, its finish
            // wakes this wait, and the store is read every 250 ms only, in
            // case the run went elsewhere without this process noticing yet
            // (a lease lost during a long step). A claim by a worker here
            // wakes the wait too, which then reads nothing until the run
            // ends here or 250 ms pass.
            timed_out = if self.shared.runs_here(id) {
                tokio::time::timeout(Duration::from_millis(250), notified)
                    .await
                    .is_err()
            } else {
                let waited = tokio::time::timeout(poll, notified).await;
                poll = (poll * 2).min(Duration::from_millis(250));
                waited.is_err()
            };
        }
    }
}

/// A typed handle to one instance of workflow `W`.
pub struct WorkflowHandle<W: Workflow> {
    fluxo: Fluxo,
    id: String,
    _w: PhantomData<fn() -> W>,
}

impl<W: Workflow> Clone for WorkflowHandle<W> {
    fn clone(&self) -> Self {
        WorkflowHandle {
            fluxo: self.fluxo.clone(),
            id: self.id.clone(),
            _w: PhantomData,
        }
    }
}

impl<W: Workflow> std::fmt::Debug for WorkflowHandle<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowHandle")
            .field("workflow", &W::NAME)
            .field("id", &self.id)
            .finish()
    }
}

impl<W: Workflow> WorkflowHandle<W> {
    /// Starts an instance of `W` (it need not be registered in this process:
    /// any worker that registered it runs it).
    pub async fn start(
        fluxo: &Fluxo,
        input: W::Input,
        options: StartOptions,
    ) -> Result<Self, Error> {
        let bytes = payload::encode(&input)?;
        let id = fluxo.create(W::NAME, W::VERSION, bytes, options).await?;
        Ok(Self::new(fluxo, id))
    }

    /// A handle to an existing instance by id (e.g. from another process).
    pub fn new(fluxo: &Fluxo, id: impl Into<String>) -> Self {
        WorkflowHandle {
            fluxo: fluxo.clone(),
            id: id.into(),
            _w: PhantomData,
        }
    }

    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Sends a signal. Only signals the workflow declared compile. The signal
    /// is durable once this returns, even if the workflow is not waiting yet.
    pub fn signal<S: Signal>(
        &self,
        signal: S,
    ) -> impl std::future::Future<Output = Result<(), Error>> + Send + '_
    where
        W: HasSignal<S>,
    {
        let bytes = payload::encode(&signal);
        async move { self.fluxo.send_signal(&self.id, S::NAME, bytes?).await }
    }

    /// The instance's current state.
    pub async fn status(&self) -> Result<InstanceStatus, Error> {
        Ok(self.fluxo.instance(&self.id).await?.status)
    }

    /// Requests cancellation (see [`Fluxo::cancel`]).
    pub async fn cancel(&self) -> Result<(), Error> {
        self.fluxo.cancel(&self.id).await
    }

    /// Waits for the instance to finish and returns its typed output, or the
    /// typed error it ended with.
    pub async fn result(&self) -> Result<W::Output, Error> {
        let ended = self.fluxo.wait_ended(&self.id).await?;
        outcome::<W>(&ended)
    }

    /// Like [`WorkflowHandle::result`], giving up after `timeout`.
    pub async fn result_timeout(&self, timeout: Duration) -> Result<W::Output, Error> {
        match tokio::time::timeout(timeout, self.result()).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                id: self.id.clone(),
            }),
        }
    }

    /// The last value the workflow published under `key` with
    /// [`WorkflowContext::set_event`](crate::WorkflowContext::set_event), if
    /// any.
    pub async fn event<T: crate::payload::Payload>(&self, key: &str) -> Result<Option<T>, Error> {
        let history = self.fluxo.history(&self.id).await?;
        let Some((seq, value)) = history.into_iter().rev().find_map(|e| match e.event {
            Event::EventPublished { key: k, value } if k == key => Some((e.seq, value)),
            _ => None,
        }) else {
            return Ok(None);
        };
        serde_json::from_value(value).map(Some).map_err(|e| {
            Error::Decode(Box::new(DecodeError {
                workflow: W::NAME.to_owned(),
                id: self.id.clone(),
                seq: Some(seq),
                what: format!("event `{key}`"),
                type_name: std::any::type_name::<T>().to_owned(),
                message: e.to_string(),
            }))
        })
    }

    /// Waits up to `timeout` for the workflow to publish a value under
    /// `key` (see [`WorkflowHandle::event`]).
    pub async fn wait_event<T: crate::payload::Payload>(
        &self,
        key: &str,
        timeout: Duration,
    ) -> Result<T, Error> {
        // A timeout too long to add to the clock never comes.
        let deadline = tokio::time::Instant::now().checked_add(timeout);
        let mut poll = Duration::from_millis(5);
        loop {
            if let Some(v) = self.event(key).await? {
                return Ok(v);
            }
            if deadline.is_some_and(|d| tokio::time::Instant::now() + poll > d) {
                return Err(Error::Timeout {
                    id: self.id.clone(),
                });
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(Duration::from_millis(200));
        }
    }

    /// The finished instance's output without waiting: `Ok(None)` while it
    /// runs.
    pub async fn try_result(&self) -> Result<Option<W::Output>, Error> {
        let rec = self.fluxo.instance(&self.id).await?;
        if !rec.status.is_finished() {
            return Ok(None);
        }
        outcome::<W>(&rec.into()).map(Some)
    }
}

fn outcome<W: Workflow>(rec: &Ended) -> Result<W::Output, Error> {
    if rec.workflow != W::NAME {
        return Err(Error::WorkflowMismatch {
            id: rec.id.clone(),
            expected: W::NAME.to_owned(),
            found: rec.workflow.clone(),
        });
    }
    output_of(rec, std::any::type_name::<W::Output>())
}

/// The output of a finished instance decoded as `T` (named `type_name` in
/// a decode error), or the typed error it ended with.
fn output_of<T: serde::de::DeserializeOwned>(rec: &Ended, type_name: &str) -> Result<T, Error> {
    match rec.status {
        InstanceStatus::Completed => payload::decode(rec.output.as_deref().unwrap_or_default())
            .map_err(|message| {
                Error::Decode(Box::new(DecodeError {
                    workflow: rec.workflow.clone(),
                    id: rec.id.clone(),
                    seq: None,
                    what: "output".into(),
                    type_name: type_name.to_owned(),
                    message,
                }))
            }),
        _ => Err(rec
            .failure
            .as_deref()
            .and_then(|f| payload::decode::<Failure>(f).ok())
            .unwrap_or(Failure::Cancelled)
            .into_error(&rec.workflow, &rec.id)),
    }
}
