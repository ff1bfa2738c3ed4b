//! MongoDB backend: workflows stored in the MongoDB deployment the service
//! already runs (a replica set or a sharded cluster of MongoDB 6 or later;
//! a standalone server works too, with the limits below).
//!
//! # Collections
//!
//! All collections live in [`MongoOptions::database`] and carry
//! [`MongoOptions::collection_prefix`], so several independent Fluxo
//! deployments can share a database:
//!
//! * `instances`: one document per instance (`_id` is the instance id) with
//!   its record, the lease (`lease_owner`, `lease_expires_at`, a strictly
//!   increasing `lease_token`), `ready_at`, the journal length
//!   `next_event_id`, the inbox sequence `inbox_seq` and the last signal id
//!   `signal_seq`.
//! * `history`: one document per journal entry, with a unique index on
//!   `(instance_id, event_id)`. Only the entries below the instance's
//!   `next_event_id` belong to the journal (see *Commits*).
//! * `signals`: the inbox, one document per signal; signal ids come from
//!   the instance's own `signal_seq`, so they increase in arrival order and
//!   are never reused.
//!
//! Indexes are created when a store opens; creating them again is a no-op.
//!
//! # Durability
//!
//! Every write uses write concern `majority` with `j: true`: when a call
//! returns, what it wrote is in the on-disk journal of a majority of the
//! replica set. It survives a crash of any Fluxo process, a crash or power
//! loss of any minority of the data-bearing nodes, and a fail-over (the new
//! primary has it). A call that returned an error may or may not have been
//! applied; the engine's fencing makes retrying it safe. Reads go to the
//! primary. On a standalone server "majority" means the one server, and
//! `j: true` still makes every acknowledged write survive a crash of it.
//!
//! Reads use the server's default read concern. Data a worker acts on is
//! read after its claim, whose write was acknowledged by a majority; what
//! the claim's instance holds then was written before it, so it is
//! majority-committed as well.
//!
//! # Commits
//!
//! Correctness rests on single-document atomicity, never on multi-document
//! transactions:
//!
//! * A claim is one `findOneAndUpdate` per instance: it matches only an
//!   instance that is running and either unleased and due or leased with an
//!   expired lease, `$inc`s its `lease_token` and returns the new document.
//!   Two workers can never both match the same version of the document.
//! * The **fence** of a commit is one `findOneAndUpdate` on the instance that
//!   matches only if `lease_token` is the commit's, a lease is held, the
//!   instance is running and `next_event_id` is the commit's first event id;
//!   it `$inc`s `next_event_id` by the number of events and applies the
//!   transition. A park also requires `inbox_seq` to be the one the engine
//!   saw; when only that fails, a second attempt applies the commit without
//!   the park and answers [`CommitOutcome::InboxChanged`].
//!
//! Where the deployment offers transactions (a replica set or a sharded
//! cluster), a commit runs the fence, the journal entries and all its
//! follow-up work (the consumed signal, new child instances, cancel
//! requests, the parent's wake-up) in one transaction, so it is applied
//! entirely or not at all.
//!
//! Without transactions (a standalone server, or
//! [`Transactions::Never`]) the same commit is applied in this order:
//!
//! 1. The journal entries are inserted **first**, tagged with the lease token
//!    and an id of this commit call. The unique index is the fence for
//!    positions: an entry below `next_event_id` is committed and can never
//!    be overwritten. Entries at or above `next_event_id` are leftovers of a
//!    commit whose fence never applied; they are not part of the journal
//!    (reads ignore them), and a writer holding a newer lease deletes those
//!    written under an older token when it needs their positions: the older
//!    holder's fence can no longer match. Leftovers written under the
//!    current lease are not touched (the call that wrote them may still be
//!    applying its fence): the commit fails with [`StoreError::Conflict`],
//!    and the instance's next lease clears them.
//! 2. The fence. It also appends the commit's follow-up work to the
//!    instance's `pending` list, in the same single-document update. If the
//!    fence matches nothing, the entries of step 1 are deleted and nothing
//!    else was written.
//! 3. The follow-up work is applied. Every part of it is idempotent (signal
//!    deletion, child creation by upsert) or harmless when repeated (an
//!    extra wake-up), and its entry is then removed from `pending`.
//!
//! A crash between 1 and 2 leaves only ignored leftovers; a crash between 2
//! and 3 leaves the work in `pending`, where the next claim of the instance
//! finishes it before handing the instance out, and where a periodic sweep
//! (run by claims) finishes it for instances nobody claims any more (a
//! finished child still has to wake its parent). Until then, reads already
//! see the commit: the journal has its entries and a consumed signal is
//! hidden from the inbox.
//!
//! Sending a signal without transactions takes the signal id from the
//! instance (`$inc signal_seq`), inserts the signal, and only then moves the
//! inbox (`$inc inbox_seq`), so an engine that parks after reading the inbox
//! either saw the signal or is refused the park.
//!
//! # Several processes
//!
//! Any number of worker processes may share the collections: claims and
//! fences are conditional updates of single documents, so the processes
//! split the work between them without any other coordination.
//!
//! * With transactions, a claim reads a few candidates and claims each one
//!   in a small transaction of its own. A candidate held by another
//!   transaction conflicts at once and is skipped, so a worker never waits
//!   behind the open transaction of a process that died in the middle of a
//!   commit (the server aborts that transaction after its lifetime limit,
//!   60 s by default, and the instance is claimed then).
//! * Outside transactions every update and delete statement changes one
//!   document (journal entries are inserted, and no transaction holds a
//!   document that does not exist yet). A single-document write that meets
//!   a document held by a transaction waits for it, holding one pooled
//!   connection; multi-document updates and deletes are kept inside
//!   transactions, where a conflict fails at once and the transaction is
//!   run again.
//! * Lease renewal is one `update` command per worker, with one
//!   single-document statement per lease.
//! * A worker runs up to its concurrency of instances through the client's
//!   connection pool: give the pool (`maxPoolSize` in the URL, default 10)
//!   about as many connections as the worker runs instances at once if
//!   commits should not queue for connections.
//! * Work made runnable by other processes reaches workers through a change
//!   stream ([`Store::work_notifications`]) where the deployment offers
//!   change streams (replica sets and sharded clusters); on a standalone
//!   server workers poll.
//! * Lease expiry and timers are compared against each process's own
//!   clock (claims are plain conditional updates): keep the hosts' clocks
//!   in sync (NTP). A clock that runs
//!   ahead takes over leases early; fencing keeps that safe, at the cost
//!   of repeated work.
//! * On a sharded cluster, leave the collections unsharded (the default):
//!   claims update documents found by other fields than the shard key.

mod claim;
mod codec;
mod commit;
mod notify;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ::mongodb::bson::{doc, Bson, Document};
use ::mongodb::options::{
    Acknowledgment, ClientOptions, CollectionOptions, Hint, IndexOptions, WriteConcern,
};
use ::mongodb::{Client, Collection, IndexModel};
use async_trait::async_trait;
use futures::TryStreamExt;

use self::codec::*;
use super::*;

/// Whether commits use multi-document transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transactions {
    /// Use transactions where the deployment offers them (replica sets and
    /// sharded clusters), the single-document protocol elsewhere.
    #[default]
    Auto,
    /// Always use the single-document protocol (see the module docs). Every
    /// rule of the store still holds; a commit costs more round trips, and
    /// after a crash its follow-up work is finished by the next claim.
    Never,
}

/// How to open a [`MongoStore`].
#[derive(Debug, Clone)]
pub struct MongoOptions {
    /// Connection string, e.g. `mongodb://db1,db2,db3/?replicaSet=rs0`.
    /// Ignored by [`MongoStore::from_client`].
    pub url: String,
    /// Database holding the collections. Default `"fluxo"`.
    pub database: String,
    /// Prefix of every collection name. Default `"fluxo_"`.
    pub collection_prefix: String,
    /// Whether commits use transactions. Default [`Transactions::Auto`].
    pub transactions: Transactions,
    /// Whether to watch for work made runnable by other processes with a
    /// change stream, where the deployment supports one. Default `true`.
    pub work_notifications: bool,
}

impl Default for MongoOptions {
    fn default() -> Self {
        MongoOptions::new("mongodb://127.0.0.1:27017")
    }
}

impl MongoOptions {
    /// Default options for the deployment at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        MongoOptions {
            url: url.into(),
            database: "fluxo".to_owned(),
            collection_prefix: "fluxo_".to_owned(),
            transactions: Transactions::Auto,
            work_notifications: true,
        }
    }

    /// Sets the database.
    pub fn database(mut self, database: impl Into<String>) -> Self {
        self.database = database.into();
        self
    }

    /// Sets the collection name prefix.
    pub fn collection_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.collection_prefix = prefix.into();
        self
    }

    /// Sets whether commits use transactions.
    pub fn transactions(mut self, transactions: Transactions) -> Self {
        self.transactions = transactions;
        self
    }

    /// Sets whether to watch for other processes' work with a change stream.
    pub fn work_notifications(mut self, enabled: bool) -> Self {
        self.work_notifications = enabled;
        self
    }
}

/// A [`Store`] in a MongoDB database. Cloning is cheap and shares the
/// connection pool.
#[derive(Clone)]
pub struct MongoStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    database: String,
    prefix: String,
    instances: Collection<Document>,
    history: Collection<Document>,
    signals: Collection<Document>,
    /// Whether commits and signals use transactions.
    transactions: bool,
    /// The change stream, when the deployment has them.
    notifier: Option<notify::Notifier>,
    /// When claims last looked for unfinished follow-up work.
    last_sweep: AtomicI64,
    /// Drops the database with the store (test stores only).
    _cleanup: Option<DropDatabase>,
}

impl fmt::Debug for MongoStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoStore")
            .field("database", &self.inner.database)
            .field("collection_prefix", &self.inner.prefix)
            .field("transactions", &self.inner.transactions)
            .field("work_notifications", &self.inner.notifier.is_some())
            .finish_non_exhaustive()
    }
}

/// How often (at most) claims look for follow-up work a crashed process
/// left unfinished.
const SWEEP_EVERY: Millis = 10_000;

/// Lease renewals sent in one `update` command at most.
const RENEWALS_PER_COMMAND: usize = 1_000;

/// Tie-breaker for instances created by this process in one millisecond.
static CREATION_ORDER: AtomicI64 = AtomicI64::new(0);

fn next_order() -> i64 {
    CREATION_ORDER.fetch_add(1, Ordering::Relaxed)
}

/// What the server says it is.
struct Topology {
    /// A replica set member or a `mongos`: transactions and change streams.
    clustered: bool,
}

impl MongoStore {
    /// Connects to the deployment at `url` with default options.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        Self::connect_with(MongoOptions::new(url)).await
    }

    /// Connects with `options`.
    pub async fn connect_with(options: MongoOptions) -> StoreResult<Self> {
        let client_options = ClientOptions::parse(&options.url)
            .await
            .map_err(mongo_err)?;
        let client = Client::with_options(client_options).map_err(mongo_err)?;
        Self::from_client(client, options).await
    }

    /// Opens a store on an existing client (sharing its connection pool);
    /// `options.url` is not used. Every write of the store uses write concern
    /// `majority` with journaling, whatever the client's defaults.
    pub async fn from_client(client: Client, options: MongoOptions) -> StoreResult<Self> {
        Self::open(client, options, None).await
    }

    async fn open(
        client: Client,
        options: MongoOptions,
        cleanup: Option<DropDatabase>,
    ) -> StoreResult<Self> {
        let topology = topology(&client).await?;
        let db = client.database(&options.database);
        let durable = CollectionOptions::builder()
            .write_concern(durable_write_concern())
            .build();
        let collection = |name: &str| {
            db.collection_with_options::<Document>(
                &format!("{}{name}", options.collection_prefix),
                durable.clone(),
            )
        };
        let instances = collection("instances");
        let history = collection("history");
        let signals = collection("signals");
        create_indexes(&instances, &history, &signals).await?;
        let notifier = if options.work_notifications && topology.clustered {
            notify::Notifier::start(instances.clone()).await
        } else {
            None
        };
        Ok(MongoStore {
            inner: Arc::new(Inner {
                client,
                database: options.database,
                prefix: options.collection_prefix,
                instances,
                history,
                signals,
                transactions: topology.clustered && options.transactions == Transactions::Auto,
                notifier,
                last_sweep: AtomicI64::new(0),
                _cleanup: cleanup,
            }),
        })
    }

    /// The database the collections are in.
    pub fn database_name(&self) -> &str {
        &self.inner.database
    }

    /// The prefix of the collection names.
    pub fn collection_prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// Whether commits use transactions (see [`Transactions`]).
    pub fn uses_transactions(&self) -> bool {
        self.inner.transactions
    }

    /// The client the store uses.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Tells this process's workers at once about work it made runnable;
    /// other processes learn it from the change stream.
    fn notify_local(&self) {
        if let Some(n) = &self.inner.notifier {
            n.bump();
        }
    }

    async fn status_of(&self, id: &str) -> StoreResult<InstanceStatus> {
        let doc = self
            .inner
            .instances
            .find_one(doc! { ID: id })
            .projection(doc! { STATUS: 1 })
            .await
            .map_err(mongo_err)?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        InstanceStatus::parse(Fields::new(&doc, "instance").str(STATUS)?)
    }

    /// Releases a lease this claim took but cannot use, so that the next
    /// claim can take the instance at once instead of when the lease runs
    /// out.
    async fn hand_back(&self, c: &ClaimedInstance) {
        let released = self
            .inner
            .instances
            .update_one(
                doc! { ID: c.record.id.as_str(), LEASE_TOKEN: int(c.lease_token) },
                doc! {
                    "$unset": { LEASE_OWNER: "", LEASE_EXPIRES_AT: "" },
                    "$set": { READY_AT: now_millis() },
                },
            )
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, id = %c.record.id, "cannot hand back an instance; it is claimable when its lease expires");
        }
    }

    /// Finishes the follow-up work of commits whose process stopped before
    /// it was done, at most every [`SWEEP_EVERY`]. Work younger than `grace`
    /// may still be under way and is left alone.
    async fn sweep(&self, now: Millis, grace: Millis) {
        let last = self.inner.last_sweep.load(Ordering::Relaxed);
        if now.saturating_sub(last) < SWEEP_EVERY
            || self
                .inner
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let filter =
            doc! { format!("{PENDING}.{INTENT_AT}"): { "$lte": now.saturating_sub(grace) } };
        let found: Result<Vec<Document>, _> = match self
            .inner
            .instances
            .find(filter)
            .projection(doc! { ID: 1, PARENT_ID: 1, PENDING: 1 })
            .limit(32)
            .await
        {
            Ok(cursor) => cursor.try_collect().await,
            Err(e) => Err(e),
        };
        match found {
            Ok(docs) => {
                for doc in docs {
                    if let Err(e) = self.finish_pending(&doc).await {
                        tracing::warn!(error = %e, "cannot finish a commit's follow-up work");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for unfinished follow-up work"),
        }
    }

    /// Extends the leases of `owner` on the instances `filter` matches to
    /// `lease` from now; those of them with a cancel request, sorted.
    async fn extend_leases(
        &self,
        owner: &str,
        filter: Document,
        lease: Duration,
    ) -> StoreResult<Vec<String>> {
        let held: Vec<Document> = self
            .inner
            .instances
            .find(filter)
            .projection(doc! { ID: 1, CANCEL_REQUESTED: 1 })
            .await
            .map_err(mongo_err)?
            .try_collect()
            .await
            .map_err(mongo_err)?;
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let expires = now_millis().saturating_add(duration_millis(lease));
        let mut statements = Vec::with_capacity(held.len());
        let mut cancelled = Vec::new();
        for doc in &held {
            let f = Fields::new(doc, "instance");
            let id = f.str(ID)?;
            statements.push(doc! {
                "q": { ID: id, LEASE_OWNER: owner },
                "u": { "$set": { LEASE_EXPIRES_AT: expires } },
                "multi": false,
            });
            if f.bool(CANCEL_REQUESTED)? {
                cancelled.push(id.to_owned());
            }
        }
        // One round trip with one single-document update per lease. An
        // update of an instance whose commit transaction is in flight waits
        // for it on the server; as single-document updates, they hold one
        // pooled connection (not the whole pool) and no lock that the
        // transaction needs to finish.
        for batch in statements.chunks(RENEWALS_PER_COMMAND) {
            let reply = self
                .inner
                .instances
                .client()
                .database(&self.inner.database)
                .run_command(doc! {
                    "update": self.inner.instances.name(),
                    "updates": batch,
                    "ordered": false,
                    "writeConcern": { "w": "majority", "j": true },
                })
                .await
                .map_err(mongo_err)?;
            let failure = match (reply.get("writeErrors"), reply.get("writeConcernError")) {
                (Some(Bson::Array(errors)), _) if !errors.is_empty() => Some(&errors[0]),
                (_, Some(error)) => Some(error),
                _ => None,
            };
            if let Some(failure) = failure {
                return Err(StoreError::backend(std::io::Error::other(format!(
                    "renewing leases failed: {failure}"
                ))));
            }
        }
        cancelled.sort();
        Ok(cancelled)
    }
}

fn durable_write_concern() -> WriteConcern {
    WriteConcern::builder()
        .w(Acknowledgment::Majority)
        .journal(true)
        .build()
}

async fn topology(client: &Client) -> StoreResult<Topology> {
    let hello = client
        .database("admin")
        .run_command(doc! { "hello": 1 })
        .await
        .map_err(mongo_err)?;
    let replica_set = matches!(hello.get("setName"), Some(Bson::String(_)));
    let mongos = matches!(hello.get("msg"), Some(Bson::String(m)) if m == "isdbgrid");
    let sessions = hello.contains_key("logicalSessionTimeoutMinutes");
    Ok(Topology {
        clustered: (replica_set || mongos) && sessions,
    })
}

fn index(name: &str, keys: Document) -> IndexModel {
    IndexModel::builder()
        .keys(keys)
        .options(IndexOptions::builder().name(name.to_owned()).build())
        .build()
}

async fn create_indexes(
    instances: &Collection<Document>,
    history: &Collection<Document>,
    signals: &Collection<Document>,
) -> StoreResult<()> {
    instances
        .create_indexes([
            // Claims of due instances and the next wake-up time.
            index("runnable", doc! { READY_AT: 1 }),
            // Claims of expired leases.
            index("lease_expiry", doc! { LEASE_EXPIRES_AT: 1 }),
            // Lease renewal.
            index("lease_owner", doc! { LEASE_OWNER: 1 }),
            // Listing, newest first.
            index("created", doc! { CREATED_AT: -1, ORDER: -1 }),
            index(
                "workflow_created",
                doc! { WORKFLOW: 1, CREATED_AT: -1, ORDER: -1 },
            ),
            index(
                "status_created",
                doc! { STATUS: 1, CREATED_AT: -1, ORDER: -1 },
            ),
            // Unfinished follow-up work of single-document commits.
            IndexModel::builder()
                .keys(doc! { format!("{PENDING}.{INTENT_AT}"): 1 })
                .options(
                    IndexOptions::builder()
                        .name("pending".to_owned())
                        .sparse(true)
                        .build(),
                )
                .build(),
        ])
        .await
        .map_err(mongo_err)?;
    history
        .create_index(
            IndexModel::builder()
                .keys(doc! { INSTANCE_ID: 1, EVENT_ID: 1 })
                .options(
                    IndexOptions::builder()
                        .name("position".to_owned())
                        .unique(true)
                        .build(),
                )
                .build(),
        )
        .await
        .map_err(mongo_err)?;
    signals
        .create_index(index(
            "inbox",
            doc! { INSTANCE_ID: 1, NAME: 1, SIGNAL_ID: 1 },
        ))
        .await
        .map_err(mongo_err)?;
    Ok(())
}

#[async_trait]
impl Store for MongoStore {
    fn backend_name(&self) -> &'static str {
        "mongodb"
    }

    async fn create_instance(&self, new: NewInstance) -> StoreResult<CreateOutcome> {
        let doc = instance_doc(&new, now_millis(), next_order());
        match self.inner.instances.insert_one(doc).await {
            Ok(_) => {
                self.notify_local();
                Ok(CreateOutcome::Created)
            }
            Err(e) if is_duplicate_key(&e) => match self.get_instance(&new.id).await? {
                Some(existing) => Ok(CreateOutcome::Existing(existing)),
                // Instances are never deleted: the one in the way is there.
                None => Err(StoreError::Conflict(format!(
                    "instance {:?} could neither be created nor read",
                    new.id
                ))),
            },
            Err(e) => Err(mongo_err(e)),
        }
    }

    async fn get_instance(&self, id: &str) -> StoreResult<Option<InstanceRecord>> {
        let doc = self
            .inner
            .instances
            .find_one(doc! { ID: id })
            .projection(record_projection())
            .await
            .map_err(mongo_err)?;
        doc.as_ref().map(record_from_doc).transpose()
    }

    async fn list_instances(&self, filter: ListFilter) -> StoreResult<Vec<InstanceRecord>> {
        let limit = filter.limit.unwrap_or(100);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut query = Document::new();
        if let Some(w) = &filter.workflow {
            query.insert(WORKFLOW, w.as_str());
        }
        if let Some(s) = filter.status {
            query.insert(STATUS, s.as_str());
        }
        let docs: Vec<Document> = self
            .inner
            .instances
            .find(query)
            .sort(doc! { CREATED_AT: -1, ORDER: -1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .projection(record_projection())
            .await
            .map_err(mongo_err)?
            .try_collect()
            .await
            .map_err(mongo_err)?;
        docs.iter().map(record_from_doc).collect()
    }

    async fn load_history(&self, id: &str) -> StoreResult<Vec<StoredEvent>> {
        // The journal is what lies below `next_event_id`; anything above it
        // is left over from a commit that was never applied.
        let inst = self
            .inner
            .instances
            .find_one(doc! { ID: id })
            .projection(doc! { NEXT_EVENT_ID: 1 })
            .await
            .map_err(mongo_err)?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        let next = Fields::new(&inst, "instance").u64(NEXT_EVENT_ID)?;
        if next == 0 {
            return Ok(Vec::new());
        }
        let docs: Vec<Document> = self
            .inner
            .history
            .find(doc! { INSTANCE_ID: id, EVENT_ID: { "$lt": int(next) } })
            .sort(doc! { EVENT_ID: 1 })
            .await
            .map_err(mongo_err)?
            .try_collect()
            .await
            .map_err(mongo_err)?;
        let mut events = Vec::with_capacity(docs.len());
        for (expected, doc) in (0..).zip(&docs) {
            let e = event_from_doc(doc)?;
            if e.event_id != expected {
                return Err(StoreError::Corrupt(format!(
                    "instance {id:?}: journal entry {expected} is missing"
                )));
            }
            events.push(e);
        }
        if events.len() as u64 != next {
            return Err(StoreError::Corrupt(format!(
                "instance {id:?}: journal entries {} to {} are missing",
                events.len(),
                next - 1
            )));
        }
        Ok(events)
    }

    async fn claim(&self, req: &ClaimRequest) -> StoreResult<ClaimBatch> {
        if req.workflows.is_empty() {
            return Ok(ClaimBatch::default());
        }
        self.sweep(now_millis(), duration_millis(req.lease).max(1_000))
            .await;
        let now = now_millis();
        let docs = self.claim_documents(req, now).await?;
        let more = docs.len() >= req.limit.min(claim::BATCH);
        let next_wake = self
            .inner
            .instances
            .find_one(doc! {
                READY_AT: { "$gt": now },
                LEASE_OWNER: Bson::Null,
                STATUS: RUNNING,
                "$or": workflows_filter(&req.workflows),
            })
            .sort(doc! { READY_AT: 1 })
            .hint(Hint::Name("runnable".to_owned()))
            .projection(doc! { READY_AT: 1 })
            .await
            .map_err(mongo_err)?
            .map(|doc| Fields::new(&doc, "instance").i64(READY_AT))
            .transpose()?;
        let mut claimed = Vec::with_capacity(docs.len());
        for doc in &docs {
            // Failing the whole batch would strand the other leases it took
            // until they expire; the undecodable instance alone stays out.
            let c = match claimed_from_doc(doc) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, id = ?doc.get(ID), "cannot run an instance whose document is corrupt");
                    continue;
                }
            };
            // An instance whose last commit's follow-up work is unfinished
            // runs only once it is done; if that fails now, it is handed
            // back for a later claim to try again.
            if let Err(e) = self.finish_pending(doc).await {
                tracing::warn!(error = %e, id = %c.record.id, "cannot finish a commit's follow-up work; not running the instance yet");
                self.hand_back(&c).await;
                continue;
            }
            claimed.push(c);
        }
        claimed.sort_by_key(|c| c.record.created_at);
        Ok(ClaimBatch {
            claimed,
            next_wake,
            more,
        })
    }

    async fn renew_leases(
        &self,
        owner: &str,
        ids: &[String],
        lease: Duration,
    ) -> StoreResult<Vec<String>> {
        self.extend_leases(
            owner,
            doc! { ID: { "$in": ids }, LEASE_OWNER: owner },
            lease,
        )
        .await
    }

    async fn end_leases(&self, owner: &str) -> StoreResult<()> {
        self.extend_leases(owner, doc! { LEASE_OWNER: owner }, Duration::ZERO)
            .await
            .map(drop)
    }

    async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        let wakes_others = !commit.new_instances.is_empty()
            || !commit.cancel_instances.is_empty()
            || matches!(
                commit.transition,
                Transition::Release
                    | Transition::Complete { .. }
                    | Transition::Fail { .. }
                    | Transition::Cancel { .. }
            );
        let outcome = if self.inner.transactions {
            self.commit_in_transaction(&commit).await
        } else {
            self.commit_single_document(&commit).await
        };
        if wakes_others && matches!(outcome, Ok(o) if o != CommitOutcome::LeaseLost) {
            self.notify_local();
        }
        outcome
    }

    async fn send_signal(&self, id: &str, name: &str, payload: Vec<u8>) -> StoreResult<u64> {
        let sid = if self.inner.transactions {
            self.signal_in_transaction(id, name, &payload).await?
        } else {
            self.signal_single_document(id, name, &payload).await?
        };
        self.notify_local();
        Ok(sid)
    }

    async fn next_signal(&self, id: &str, name: &str) -> StoreResult<(Option<InboxSignal>, u64)> {
        // The inbox sequence is read first: a signal that arrives after the
        // query below moves it past the value returned here.
        let inst = self
            .inner
            .instances
            .find_one(doc! { ID: id })
            .projection(doc! {
                STATUS: 1,
                INBOX_SEQ: 1,
                format!("{PENDING}.{INTENT_CONSUME}"): 1,
            })
            .await
            .map_err(mongo_err)?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        let f = Fields::new(&inst, "instance");
        let inbox_seq = f.u64(INBOX_SEQ)?;
        if InstanceStatus::parse(f.str(STATUS)?)?.is_finished() {
            return Ok((None, inbox_seq));
        }
        // Signals consumed by a commit whose follow-up work is unfinished
        // are gone already.
        let mut consumed = Vec::new();
        for intent in f.docs(PENDING)? {
            if let Some(sid) = Fields::new(intent, "pending work").opt_i64(INTENT_CONSUME)? {
                consumed.push(sid);
            }
        }
        let mut filter = doc! { INSTANCE_ID: id, NAME: name };
        if !consumed.is_empty() {
            filter.insert(SIGNAL_ID, doc! { "$nin": consumed });
        }
        let signal = self
            .inner
            .signals
            .find_one(filter)
            .sort(doc! { SIGNAL_ID: 1 })
            .await
            .map_err(mongo_err)?;
        Ok((signal.as_ref().map(signal_from_doc).transpose()?, inbox_seq))
    }

    async fn request_cancel(&self, id: &str) -> StoreResult<InstanceStatus> {
        let requested = if self.inner.transactions {
            // Fails fast (and is tried again) instead of waiting on an
            // instance another transaction holds.
            self.cancel_in_transaction(id).await?
        } else {
            self.inner
                .instances
                .update_one(
                    doc! { ID: id, STATUS: RUNNING },
                    cancel_update(now_millis()),
                )
                .await
                .map_err(mongo_err)?
                .matched_count
                > 0
        };
        if !requested {
            // Unknown or finished: nothing was written.
            return self.status_of(id).await;
        }
        self.notify_local();
        Ok(InstanceStatus::Running)
    }

    async fn continue_as_new(
        &self,
        id: &str,
        lease_token: u64,
        input: Vec<u8>,
    ) -> StoreResult<CommitOutcome> {
        let outcome = self.restart(id, lease_token, &input).await?;
        if outcome != CommitOutcome::LeaseLost {
            self.notify_local();
        }
        Ok(outcome)
    }

    fn work_notifications(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner
            .notifier
            .as_ref()
            .map(notify::Notifier::subscribe)
    }
}

// ---------------------------------------------------------------------------
// Test fixtures

/// URL of the server the tests use when `FLUXO_TEST_MONGODB_URL` is unset.
const DEFAULT_TEST_URL: &str = "mongodb://127.0.0.1:27017/?directConnection=true";

/// A store on a fresh database of the test server (`FLUXO_TEST_MONGODB_URL`,
/// default `mongodb://127.0.0.1:27017/?directConnection=true`), dropped with
/// the store. `None` (after saying so on stderr) when the server cannot be
/// reached, unless `CI` is set: then it panics.
#[doc(hidden)]
pub async fn test_store_from_env() -> Option<MongoStore> {
    test_store_with(|options| options).await
}

/// Like [`test_store_from_env`], with options adjusted by `adjust`.
pub(crate) async fn test_store_with(
    adjust: impl FnOnce(MongoOptions) -> MongoOptions,
) -> Option<MongoStore> {
    /// Why the test server cannot be used, once a fixture found out: the
    /// tests after it skip (or fail) at once instead of waiting again.
    static UNUSABLE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

    let url = test_url();
    if let Some(reason) = UNUSABLE.get() {
        return unusable(&url, reason);
    }
    let name = format!(
        "fluxo_test_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    );
    let client = match test_client(&url).await {
        Ok(client) => client,
        Err(e) => return unusable(&url, UNUSABLE.get_or_init(|| e.to_string())),
    };
    let cleanup = DropDatabase {
        url: url.clone(),
        name: name.clone(),
    };
    let options = adjust(MongoOptions::new(url.clone()).database(name));
    // A server that answers pings but takes no writes would hang every test.
    match tokio::time::timeout(
        TEST_SERVER_PATIENCE,
        MongoStore::open(client, options, Some(cleanup)),
    )
    .await
    {
        Ok(Ok(store)) => Some(store),
        Ok(Err(e)) => panic!("opening a MongoDB store on {url} failed: {e}"),
        Err(_) => {
            let reason = UNUSABLE.get_or_init(|| {
                format!(
                    "it answers but did not create a database within {} s; restart it",
                    TEST_SERVER_PATIENCE.as_secs()
                )
            });
            unusable(&url, reason)
        }
    }
}

/// How long the test fixtures wait for the test server to create or drop a
/// database.
const TEST_SERVER_PATIENCE: Duration = Duration::from_secs(20);

/// Skips a test whose server cannot be used, or fails it when `CI` is set.
fn unusable(url: &str, reason: &str) -> Option<MongoStore> {
    if std::env::var_os("CI").is_some() {
        panic!(
            "the MongoDB tests need a server: cannot use {url} ({reason}); \
             set FLUXO_TEST_MONGODB_URL to a reachable server"
        );
    }
    eprintln!(
        "SKIPPED: MongoDB test: cannot use {url} ({reason}); \
         set FLUXO_TEST_MONGODB_URL to a reachable server to run it"
    );
    None
}

pub(crate) fn test_url() -> String {
    std::env::var("FLUXO_TEST_MONGODB_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.to_owned())
}

/// A client of the test server that has answered a ping.
pub(crate) async fn test_client(url: &str) -> Result<Client, ::mongodb::error::Error> {
    let mut options = ClientOptions::parse(url).await?;
    options
        .server_selection_timeout
        .get_or_insert(Duration::from_secs(5));
    let client = Client::with_options(options)?;
    client
        .database("admin")
        .run_command(doc! { "ping": 1 })
        .await?;
    Ok(client)
}

/// Drops a test database when dropped, from a thread of its own (dropping
/// happens outside async code, and the test's runtime may be shutting down).
struct DropDatabase {
    url: String,
    name: String,
}

impl Drop for DropDatabase {
    fn drop(&mut self) {
        let url = std::mem::take(&mut self.url);
        let name = std::mem::take(&mut self.name);
        let dropper = std::thread::spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::warn!(error = %e, database = name, "cannot drop the test database");
                    return;
                }
            };
            runtime.block_on(async {
                let dropped = async {
                    let client = test_client(&url).await?;
                    client.database(&name).drop().await
                };
                match tokio::time::timeout(TEST_SERVER_PATIENCE, dropped).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, database = name, "cannot drop the test database")
                    }
                    Err(_) => {
                        tracing::warn!(database = name, "dropping the test database timed out")
                    }
                }
            });
        });
        let _ = dropper.join();
    }
}
