//! Commits and signals, with and without transactions (the protocol is
//! described in the module docs of the backend).

use std::time::Duration;

use ::mongodb::bson::{doc, Bson, Document};
use ::mongodb::error::{
    Error as MongoError, TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT,
};
use ::mongodb::options::{ReadConcern, ReturnDocument};
use ::mongodb::{ClientSession, Collection};
use futures::future::BoxFuture;
use futures::TryStreamExt;

use super::super::*;
use super::codec::*;
use super::{durable_write_concern, next_order, MongoStore};

/// How often a transaction that conflicted with a concurrent write is run
/// again before giving up.
pub(super) const TRANSACTION_ATTEMPTS: u32 = 10;

/// How often leftover journal entries of an older lease are cleared out of
/// the way before a commit gives up.
const REPAIRS: u32 = 3;

/// Runs a driver action inside the session when there is one.
macro_rules! run {
    ($action:expr, $session:expr) => {
        match $session.as_deref_mut() {
            Some(session) => $action.session(session).await,
            None => $action.await,
        }
    };
}

/// A failure inside a commit: a driver error (whose labels say whether a
/// transaction is worth running again) or a store error.
pub(super) enum Failure {
    Mongo(MongoError),
    Store(StoreError),
}

impl From<MongoError> for Failure {
    fn from(e: MongoError) -> Self {
        Failure::Mongo(e)
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

impl From<Failure> for StoreError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Mongo(e) => mongo_err(e),
            Failure::Store(e) => e,
        }
    }
}

impl Failure {
    pub(super) fn is_transient(&self) -> bool {
        matches!(self, Failure::Mongo(e) if e.contains_label(TRANSIENT_TRANSACTION_ERROR))
    }
}

pub(super) type Session<'a> = Option<&'a mut ClientSession>;

/// The follow-up work of a commit: everything it changes besides its own
/// instance and journal.
pub(super) struct Intent {
    /// Identifies the intent in the instance's `pending` list.
    id: String,
    pub(super) at: Millis,
    /// The consumed signal.
    consume: Option<i64>,
    /// The instance finished: its inbox goes and its parent is woken.
    finished: bool,
    /// Documents of the instances to create.
    children: Vec<Document>,
    /// Instances to request cancellation of.
    cancel: Vec<String>,
}

impl Intent {
    /// The follow-up work of `c`, if it has any.
    pub(super) fn of(c: &Commit, now: Millis) -> Option<Intent> {
        let finished = matches!(
            c.transition,
            Transition::Complete { .. } | Transition::Fail { .. } | Transition::Cancel { .. }
        );
        if !finished
            && c.consume_signal.is_none()
            && c.new_instances.is_empty()
            && c.cancel_instances.is_empty()
        {
            return None;
        }
        Some(Intent {
            id: uuid::Uuid::new_v4().simple().to_string(),
            at: now,
            consume: c.consume_signal.map(int),
            finished,
            children: c
                .new_instances
                .iter()
                .map(|new| instance_doc(new, now, next_order()))
                .collect(),
            cancel: c.cancel_instances.clone(),
        })
    }

    pub(super) fn to_doc(&self) -> Document {
        doc! {
            INTENT_ID: self.id.as_str(),
            INTENT_AT: self.at,
            INTENT_CONSUME: self.consume.map_or(Bson::Null, Bson::Int64),
            INTENT_FINISHED: self.finished,
            INTENT_CHILDREN: self.children.clone(),
            INTENT_CANCEL: self.cancel.clone(),
        }
    }

    fn from_doc(doc: &Document) -> StoreResult<Intent> {
        let f = Fields::new(doc, "pending work");
        Ok(Intent {
            id: f.str(INTENT_ID)?.to_owned(),
            at: f.i64(INTENT_AT)?,
            consume: f.opt_i64(INTENT_CONSUME)?,
            finished: f.bool(INTENT_FINISHED)?,
            children: f.docs(INTENT_CHILDREN)?.into_iter().cloned().collect(),
            cancel: f.strs(INTENT_CANCEL)?,
        })
    }
}

/// What the fence update found.
pub(super) struct Fenced {
    inbox_seq: u64,
    cancel_requested: bool,
    parent_id: Option<String>,
    /// The commit asked to park, but the inbox had moved.
    park_refused: bool,
}

impl Fenced {
    fn from_doc(doc: &Document, park_refused: bool) -> StoreResult<Self> {
        let f = Fields::new(doc, "instance");
        Ok(Fenced {
            inbox_seq: f.u64(INBOX_SEQ)?,
            cancel_requested: f.bool(CANCEL_REQUESTED)?,
            parent_id: f.opt_str(PARENT_ID)?.map(str::to_owned),
            park_refused,
        })
    }

    fn outcome(&self) -> CommitOutcome {
        if self.park_refused {
            CommitOutcome::InboxChanged {
                inbox_seq: self.inbox_seq,
                cancel_requested: self.cancel_requested,
            }
        } else {
            CommitOutcome::Applied {
                cancel_requested: self.cancel_requested,
            }
        }
    }
}

/// How a transaction body ended (other than with an error).
pub(super) enum Step<T> {
    /// Ready to commit the transaction.
    Done(T),
    /// A conditional update matched nothing; the transaction is to be
    /// aborted and the reason looked up.
    Refused,
    /// A journal position is taken; the transaction is to be aborted.
    Taken,
}

/// Whether the commit's events have consecutive ids.
fn consecutive(c: &Commit) -> bool {
    let first = c.events.first().map_or(0, |e| e.event_id);
    c.events
        .iter()
        .zip(first..)
        .all(|(e, expected)| e.event_id == expected)
}

/// The fence update: counts the events, applies the transition (the park
/// only if `park`), and records the follow-up work `intent`.
fn fence_update(c: &Commit, now: Millis, park: bool, intent: Option<&Document>) -> Document {
    let mut set = doc! { UPDATED_AT: now };
    let mut unset = Document::new();
    let mut release = |set: &mut Document, ready_at: Option<Millis>| {
        unset.insert(LEASE_OWNER, "");
        unset.insert(LEASE_EXPIRES_AT, "");
        match ready_at {
            Some(t) => set.insert(READY_AT, t),
            None => unset.insert(READY_AT, ""),
        };
    };
    let finished = match &c.transition {
        Transition::None => None,
        Transition::Park { wake_at, .. } => {
            if park {
                release(&mut set, *wake_at);
            }
            None
        }
        Transition::Release => {
            release(&mut set, Some(now));
            None
        }
        Transition::Complete { output } => {
            Some((InstanceStatus::Completed, bin(output), Bson::Null))
        }
        Transition::Fail { failure } => Some((InstanceStatus::Failed, Bson::Null, bin(failure))),
        Transition::Cancel { failure } => {
            Some((InstanceStatus::Cancelled, Bson::Null, bin(failure)))
        }
    };
    if let Some((status, output, failure)) = finished {
        set.insert(STATUS, status.as_str());
        set.insert(OUTPUT, output);
        set.insert(FAILURE, failure);
        release(&mut set, None);
    }
    let mut update = doc! { "$set": set };
    if !c.events.is_empty() {
        update.insert("$inc", doc! { NEXT_EVENT_ID: int(c.events.len() as u64) });
    }
    if !unset.is_empty() {
        update.insert("$unset", unset);
    }
    if let Some(intent) = intent {
        update.insert("$push", doc! { PENDING: intent });
    }
    update
}

/// A short, growing, jittered pause before running a conflicting
/// transaction again.
async fn pause(attempt: u32) {
    let base = 2_u64.saturating_pow(attempt.min(7));
    let ms = base + fastrand::u64(0..=base);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Aborts the transaction of `session`. The server may have aborted it
/// already (after a write error), so failures are of no interest.
async fn abort(session: &mut ClientSession) {
    if let Err(e) = session.abort_transaction().await {
        tracing::debug!(error = %e, "aborting a transaction failed");
    }
}

/// Commits the transaction of `session`, retrying when the outcome of an
/// attempt is unknown (committing again is safe).
async fn commit_transaction(session: &mut ClientSession) -> Result<(), MongoError> {
    let mut tries = 0;
    loop {
        match session.commit_transaction().await {
            Err(e) if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) && tries < 3 => {
                tries += 1;
            }
            other => return other,
        }
    }
}

/// Deletes the documents matching `filter` one by one (each delete still
/// conditional on `filter`); returns how many it deleted.
///
/// Outside transactions the store writes single documents only: a
/// single-document write that meets a document held by a transaction in
/// flight waits for it on every server, while a multi-document write may
/// stall the server (some MongoDB-compatible servers hold a collection-wide
/// lock while retrying it, and the transaction needs that collection to
/// finish).
pub(super) async fn delete_each(
    collection: &Collection<Document>,
    filter: Document,
) -> Result<u64, MongoError> {
    let found: Vec<Document> = collection
        .find(filter.clone())
        .projection(doc! { ID: 1 })
        .await?
        .try_collect()
        .await?;
    let mut deleted = 0;
    for doc in found {
        if let Some(id) = doc.get(ID) {
            let mut one = filter.clone();
            one.insert(ID, id.clone());
            deleted += collection.delete_one(one).await?.deleted_count;
        }
    }
    Ok(deleted)
}

impl MongoStore {
    async fn start_transaction(&self, session: &mut ClientSession) -> Result<(), MongoError> {
        session
            .start_transaction()
            .read_concern(ReadConcern::snapshot())
            .write_concern(durable_write_concern())
            .await
    }

    /// Runs `body` in a transaction, up to `attempts` times while it fails
    /// with a transient conflict, and commits it when it is done. The body
    /// gets the session and hands it back with its result.
    pub(super) async fn in_transaction<'a, T, F>(
        &'a self,
        attempts: u32,
        mut body: F,
    ) -> Result<Step<T>, Failure>
    where
        F: FnMut(ClientSession) -> BoxFuture<'a, (ClientSession, Result<Step<T>, Failure>)>,
    {
        let mut session = self.inner.client.start_session().await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.start_transaction(&mut session).await?;
            let (returned, result) = body(session).await;
            session = returned;
            let failure = match result {
                Ok(Step::Done(value)) => match commit_transaction(&mut session).await {
                    Ok(()) => return Ok(Step::Done(value)),
                    Err(e) => Failure::Mongo(e),
                },
                Ok(other) => {
                    abort(&mut session).await;
                    return Ok(other);
                }
                Err(f) => {
                    abort(&mut session).await;
                    f
                }
            };
            if !failure.is_transient() || attempt >= attempts {
                return Err(failure);
            }
            pause(attempt).await;
        }
    }

    /// The fenced update on the instance (see the module docs). `None` when
    /// it matched nothing.
    pub(super) async fn fence(
        &self,
        session: &mut Session<'_>,
        c: &Commit,
        now: Millis,
        intent: Option<&Document>,
    ) -> Result<Option<Fenced>, Failure> {
        let mut filter = doc! {
            ID: c.instance_id.as_ref(),
            LEASE_TOKEN: int(c.lease_token),
            LEASE_OWNER: { "$ne": null },
            STATUS: RUNNING,
        };
        if let Some(first) = c.events.first() {
            filter.insert(NEXT_EVENT_ID, int(first.event_id));
        }
        let projection = doc! { INBOX_SEQ: 1, CANCEL_REQUESTED: 1, PARENT_ID: 1 };
        let parks = matches!(c.transition, Transition::Park { .. });
        if let Transition::Park { seen_inbox, .. } = c.transition {
            let mut if_unmoved = filter.clone();
            if_unmoved.insert(INBOX_SEQ, int(seen_inbox));
            let action = self
                .inner
                .instances
                .find_one_and_update(if_unmoved, fence_update(c, now, true, intent))
                .projection(projection.clone())
                .return_document(ReturnDocument::After);
            if let Some(doc) = run!(action, session)? {
                return Ok(Some(Fenced::from_doc(&doc, false)?));
            }
        }
        // Everything but a park; when a park was asked for, only the inbox
        // can have made the first attempt fail if this one matches.
        let action = self
            .inner
            .instances
            .find_one_and_update(filter, fence_update(c, now, false, intent))
            .projection(projection)
            .return_document(ReturnDocument::After);
        match run!(action, session)? {
            Some(doc) => Ok(Some(Fenced::from_doc(&doc, parks)?)),
            None => Ok(None),
        }
    }

    /// Applies follow-up work. Every part is idempotent or harmless when
    /// repeated, so it may run more than once.
    async fn apply_intent(
        &self,
        session: &mut Session<'_>,
        instance_id: &str,
        parent_id: Option<&str>,
        intent: &Intent,
        now: Millis,
    ) -> Result<(), Failure> {
        let signals = &self.inner.signals;
        let instances = &self.inner.instances;
        if intent.finished {
            // A finished instance takes no more signals: its inbox goes,
            // the consumed signal with it.
            let inbox = doc! { INSTANCE_ID: instance_id };
            match session.as_deref_mut() {
                Some(session) => {
                    signals.delete_many(inbox).session(session).await?;
                }
                None => {
                    delete_each(signals, inbox).await?;
                }
            }
        } else if let Some(sid) = intent.consume {
            run!(
                signals.delete_one(doc! { INSTANCE_ID: instance_id, SIGNAL_ID: sid }),
                session
            )?;
        }
        for child in &intent.children {
            let mut fields = child.clone();
            let id = fields
                .remove(ID)
                .ok_or_else(|| StoreError::Corrupt("pending child without an id".to_owned()))?;
            // An id that exists is left as it is.
            run!(
                instances
                    .update_one(doc! { ID: id }, doc! { "$setOnInsert": fields })
                    .upsert(true),
                session
            )?;
        }
        // Unknown and finished instances need no cancelling.
        match session.as_deref_mut() {
            Some(session) if !intent.cancel.is_empty() => {
                instances
                    .update_many(
                        doc! { ID: { "$in": intent.cancel.clone() }, STATUS: RUNNING },
                        cancel_update(now),
                    )
                    .session(session)
                    .await?;
            }
            Some(_) => {}
            None => {
                for target in &intent.cancel {
                    instances
                        .update_one(
                            doc! { ID: target.as_str(), STATUS: RUNNING },
                            cancel_update(now),
                        )
                        .await?;
                }
            }
        }
        if intent.finished {
            if let Some(parent) = parent_id {
                run!(
                    instances.update_one(doc! { ID: parent, STATUS: RUNNING }, wake_update(now)),
                    session
                )?;
            }
        }
        Ok(())
    }

    /// Finishes the follow-up work recorded in an instance document (with
    /// `_id`, `parent_id` and `pending`) and removes it from the list.
    pub(super) async fn finish_pending(&self, doc: &Document) -> StoreResult<()> {
        let f = Fields::new(doc, "instance");
        let intents = f.docs(PENDING)?;
        if intents.is_empty() {
            return Ok(());
        }
        let id = f.str(ID)?;
        let parent = f.opt_str(PARENT_ID)?;
        for intent in intents {
            let intent = Intent::from_doc(intent)?;
            tracing::info!(
                id,
                age_ms = now_millis().saturating_sub(intent.at),
                "finishing the follow-up work of an interrupted commit"
            );
            self.apply_intent(&mut None, id, parent, &intent, now_millis())
                .await?;
            self.clear_intent(id, &intent).await?;
        }
        Ok(())
    }

    async fn clear_intent(&self, id: &str, intent: &Intent) -> StoreResult<()> {
        self.inner
            .instances
            .update_one(
                doc! { ID: id },
                doc! { "$pull": { PENDING: { INTENT_ID: intent.id.as_str() } } },
            )
            .await
            .map_err(mongo_err)?;
        Ok(())
    }

    /// Explains, without writing, why a commit cannot be applied.
    async fn diagnose(&self, c: &Commit) -> StoreResult<CommitOutcome> {
        let Some(next) = self.held_position(c).await? else {
            return Ok(CommitOutcome::LeaseLost);
        };
        Err(journal_conflict(c, next))
    }

    /// The instance's `next_event_id` if the commit's lease is current,
    /// `None` if it is not.
    async fn held_position(&self, c: &Commit) -> StoreResult<Option<u64>> {
        let doc = self
            .inner
            .instances
            .find_one(doc! { ID: c.instance_id.as_ref() })
            .projection(doc! { LEASE_TOKEN: 1, LEASE_OWNER: 1, STATUS: 1, NEXT_EVENT_ID: 1 })
            .await
            .map_err(mongo_err)?
            .ok_or_else(|| StoreError::NotFound(c.instance_id.to_string()))?;
        let f = Fields::new(&doc, "instance");
        let held = f.u64(LEASE_TOKEN)? == c.lease_token
            && f.opt_str(LEASE_OWNER)?.is_some()
            && !InstanceStatus::parse(f.str(STATUS)?)?.is_finished();
        Ok(if held {
            Some(f.u64(NEXT_EVENT_ID)?)
        } else {
            None
        })
    }

    /// After a journal position of `c` turned out to be taken: `Ok(None)`
    /// when leftovers of an older lease were removed and the commit may be
    /// tried again, `Ok(Some(LeaseLost))` when the lease is gone, else the
    /// error the commit fails with.
    async fn clear_positions(&self, c: &Commit) -> StoreResult<Option<CommitOutcome>> {
        let Some(next) = self.held_position(c).await? else {
            return Ok(Some(CommitOutcome::LeaseLost));
        };
        let first = c.events.first().map_or(next, |e| e.event_id);
        if first != next {
            return Err(StoreError::Conflict(format!(
                "instance {:?}: journal entry {first} written where {next} was expected",
                c.instance_id
            )));
        }
        // Entries at or above `next_event_id` were never committed. Those
        // written under an older lease can never be: their fence needs a
        // token that is no longer current.
        let removed = delete_each(
            &self.inner.history,
            doc! {
                INSTANCE_ID: c.instance_id.as_ref(),
                EVENT_ID: { "$gte": int(next) },
                LEASE_TOKEN: { "$lt": int(c.lease_token) },
            },
        )
        .await
        .map_err(mongo_err)?;
        if removed > 0 {
            tracing::debug!(id = %c.instance_id, removed, "removed journal entries of an older lease that never committed");
            return Ok(None);
        }
        Err(StoreError::Conflict(format!(
            "instance {:?}: journal entry {first} is already written under this lease \
             by an earlier commit whose outcome is unknown",
            c.instance_id
        )))
    }

    fn event_docs(&self, c: &Commit, writer: &str, now: Millis) -> Vec<Document> {
        c.events
            .iter()
            .map(|e| event_doc(&c.instance_id, e, c.lease_token, writer, now))
            .collect()
    }

    // ----- with transactions -----------------------------------------------

    /// Applies a commit in one transaction.
    pub(super) async fn commit_in_transaction(&self, c: &Commit) -> StoreResult<CommitOutcome> {
        if !consecutive(c) {
            return self.diagnose(c).await;
        }
        let mut repairs = 0;
        loop {
            let step = self
                .in_transaction(TRANSACTION_ATTEMPTS, |mut session| {
                    Box::pin(async move {
                        let result = self.commit_body(&mut session, c).await;
                        (session, result)
                    })
                })
                .await?;
            match step {
                Step::Done(outcome) => return Ok(outcome),
                Step::Refused => return self.diagnose(c).await,
                Step::Taken => match self.clear_positions(c).await? {
                    Some(outcome) => return Ok(outcome),
                    None if repairs < REPAIRS => repairs += 1,
                    None => {
                        return Err(StoreError::Conflict(format!(
                            "instance {:?}: journal positions stay taken",
                            c.instance_id
                        )))
                    }
                },
            }
        }
    }

    async fn commit_body(
        &self,
        session: &mut ClientSession,
        c: &Commit,
    ) -> Result<Step<CommitOutcome>, Failure> {
        let now = now_millis();
        let mut session = Some(session);
        let Some(fenced) = self.fence(&mut session, c, now, None).await? else {
            return Ok(Step::Refused);
        };
        if !c.events.is_empty() {
            let docs = self.event_docs(c, "transaction", now);
            match run!(self.inner.history.insert_many(docs).ordered(true), session) {
                Ok(_) => {}
                Err(e) if is_duplicate_key(&e) => return Ok(Step::Taken),
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(intent) = Intent::of(c, now) {
            self.apply_intent(
                &mut session,
                &c.instance_id,
                fenced.parent_id.as_deref(),
                &intent,
                now,
            )
            .await?;
        }
        Ok(Step::Done(fenced.outcome()))
    }

    /// Appends a signal and wakes the instance in one transaction.
    pub(super) async fn signal_in_transaction(
        &self,
        id: &str,
        name: &str,
        payload: &[u8],
    ) -> StoreResult<u64> {
        let step = self
            .in_transaction(TRANSACTION_ATTEMPTS, |mut session| {
                Box::pin(async move {
                    let result = self.signal_body(&mut session, id, name, payload).await;
                    (session, result)
                })
            })
            .await?;
        match step {
            Step::Done(sid) => Ok(sid),
            Step::Refused | Step::Taken => Err(self.refused_signal(id).await),
        }
    }

    async fn signal_body(
        &self,
        session: &mut ClientSession,
        id: &str,
        name: &str,
        payload: &[u8],
    ) -> Result<Step<u64>, Failure> {
        let now = now_millis();
        let doc = self
            .inner
            .instances
            .find_one_and_update(
                doc! { ID: id, STATUS: RUNNING },
                doc! {
                    "$inc": { INBOX_SEQ: 1_i64, SIGNAL_SEQ: 1_i64 },
                    "$set": { READY_AT: now, UPDATED_AT: now },
                },
            )
            .projection(doc! { SIGNAL_SEQ: 1 })
            .return_document(ReturnDocument::After)
            .session(&mut *session)
            .await?;
        let Some(doc) = doc else {
            return Ok(Step::Refused);
        };
        let sid = Fields::new(&doc, "instance").u64(SIGNAL_SEQ)?;
        self.inner
            .signals
            .insert_one(signal_doc(id, int(sid), name, payload, now))
            .session(&mut *session)
            .await?;
        Ok(Step::Done(sid))
    }

    /// Records a cancel request in a transaction; `false` when the instance
    /// is unknown or finished.
    pub(super) async fn cancel_in_transaction(&self, id: &str) -> StoreResult<bool> {
        let step = self
            .in_transaction(TRANSACTION_ATTEMPTS, |mut session| {
                Box::pin(async move {
                    let result = self
                        .inner
                        .instances
                        .update_one(
                            doc! { ID: id, STATUS: RUNNING },
                            cancel_update(now_millis()),
                        )
                        .session(&mut session)
                        .await
                        .map_err(Failure::from)
                        .map(|done| {
                            if done.matched_count > 0 {
                                Step::Done(())
                            } else {
                                Step::Refused
                            }
                        });
                    (session, result)
                })
            })
            .await?;
        Ok(matches!(step, Step::Done(())))
    }

    // ----- continue-as-new ---------------------------------------------------

    /// Restarts the instance with `input` and an empty journal (see
    /// [`Store::continue_as_new`]).
    ///
    /// The fence is one conditional update: it sets the input, moves
    /// `next_event_id` back to 0 (so the old entries are no longer part of
    /// the journal) and releases the lease. The old entries are deleted with
    /// it in one transaction where transactions are used; otherwise right
    /// after it. Entries of the next run carry a newer lease token, so the
    /// deletion (which only takes entries up to this commit's token) never
    /// touches them, and entries a crash leaves behind are leftovers that
    /// the next writer at their position clears.
    pub(super) async fn restart(
        &self,
        id: &str,
        lease_token: u64,
        input: &[u8],
    ) -> StoreResult<CommitOutcome> {
        let now = now_millis();
        let filter = doc! {
            ID: id,
            LEASE_TOKEN: int(lease_token),
            LEASE_OWNER: { "$ne": null },
            STATUS: RUNNING,
        };
        let update = doc! {
            "$set": { INPUT: bin(input), NEXT_EVENT_ID: 0_i64, READY_AT: now, UPDATED_AT: now },
            "$unset": { LEASE_OWNER: "", LEASE_EXPIRES_AT: "" },
        };
        let old_entries = doc! { INSTANCE_ID: id, LEASE_TOKEN: { "$lte": int(lease_token) } };
        let fenced = if self.inner.transactions {
            let step = self
                .in_transaction(TRANSACTION_ATTEMPTS, |mut session| {
                    let (filter, update, old_entries) =
                        (filter.clone(), update.clone(), old_entries.clone());
                    Box::pin(async move {
                        let result = async {
                            let Some(doc) = self
                                .inner
                                .instances
                                .find_one_and_update(filter, update)
                                .projection(doc! { CANCEL_REQUESTED: 1 })
                                .return_document(ReturnDocument::After)
                                .session(&mut session)
                                .await?
                            else {
                                return Ok(Step::Refused);
                            };
                            self.inner
                                .history
                                .delete_many(old_entries)
                                .session(&mut session)
                                .await?;
                            Ok(Step::Done(doc))
                        }
                        .await;
                        (session, result)
                    })
                })
                .await?;
            match step {
                Step::Done(doc) => Some(doc),
                Step::Refused | Step::Taken => None,
            }
        } else {
            let doc = self
                .inner
                .instances
                .find_one_and_update(filter, update)
                .projection(doc! { CANCEL_REQUESTED: 1 })
                .return_document(ReturnDocument::After)
                .await
                .map_err(mongo_err)?;
            if doc.is_some() {
                if let Err(e) = delete_each(&self.inner.history, old_entries).await {
                    tracing::debug!(error = %e, id, "old journal entries left for later writers to clear");
                }
            }
            doc
        };
        match fenced {
            Some(doc) => Ok(CommitOutcome::Applied {
                cancel_requested: Fields::new(&doc, "instance").bool(CANCEL_REQUESTED)?,
            }),
            // Unknown instance: NotFound; otherwise the lease is gone.
            None => self.status_of(id).await.map(|_| CommitOutcome::LeaseLost),
        }
    }

    // ----- without transactions --------------------------------------------

    /// Applies a commit with single-document writes: journal entries, then
    /// the fence, then the follow-up work (see the module docs).
    pub(super) async fn commit_single_document(&self, c: &Commit) -> StoreResult<CommitOutcome> {
        if !consecutive(c) {
            return self.diagnose(c).await;
        }
        let now = now_millis();
        let writer = uuid::Uuid::new_v4().simple().to_string();
        if !c.events.is_empty() {
            let docs = self.event_docs(c, &writer, now);
            let mut repairs = 0;
            loop {
                match self.inner.history.insert_many(&docs).ordered(true).await {
                    Ok(_) => break,
                    Err(e) if is_duplicate_key(&e) => {
                        // The entries before the taken position are ours.
                        self.delete_written(c, &writer).await?;
                        match self.clear_positions(c).await? {
                            Some(outcome) => return Ok(outcome),
                            None if repairs < REPAIRS => repairs += 1,
                            None => {
                                return Err(StoreError::Conflict(format!(
                                    "instance {:?}: journal positions stay taken",
                                    c.instance_id
                                )))
                            }
                        }
                    }
                    Err(e) => {
                        // Some entries may be written; without the fence
                        // they are not part of the journal either way.
                        if let Err(cleanup) = self.delete_written(c, &writer).await {
                            tracing::debug!(error = %cleanup, "cannot remove the entries of a failed commit");
                        }
                        return Err(mongo_err(e));
                    }
                }
            }
        }
        let intent = Intent::of(c, now);
        let intent_doc = intent.as_ref().map(Intent::to_doc);
        let fenced = match self.fence(&mut None, c, now, intent_doc.as_ref()).await {
            Ok(Some(fenced)) => fenced,
            Ok(None) => {
                if !c.events.is_empty() {
                    self.delete_written(c, &writer).await?;
                }
                return self.diagnose(c).await;
            }
            // Whether the fence applied is unknown: the entries stay. If it
            // did, they are the journal; if not, they are leftovers that a
            // later writer clears.
            Err(f) => return Err(f.into()),
        };
        if let Some(intent) = &intent {
            let done = async {
                self.apply_intent(
                    &mut None,
                    &c.instance_id,
                    fenced.parent_id.as_deref(),
                    intent,
                    now,
                )
                .await?;
                self.clear_intent(&c.instance_id, intent).await?;
                Ok::<_, Failure>(())
            };
            if let Err(f) = done.await {
                // The commit itself is durable, and its follow-up work is
                // recorded with it: the next claim of the instance or a
                // sweep finishes it.
                tracing::warn!(error = %StoreError::from(f), id = %c.instance_id, "follow-up work of a commit left for later");
            }
        }
        Ok(fenced.outcome())
    }

    /// Deletes the journal entries one commit call wrote.
    async fn delete_written(&self, c: &Commit, writer: &str) -> StoreResult<()> {
        delete_each(
            &self.inner.history,
            doc! { INSTANCE_ID: c.instance_id.as_ref(), WRITER: writer },
        )
        .await
        .map_err(mongo_err)?;
        Ok(())
    }

    /// Appends a signal with single-document writes: the id first, then the
    /// signal, then the wake-up, so the inbox moves only once the signal is
    /// readable.
    pub(super) async fn signal_single_document(
        &self,
        id: &str,
        name: &str,
        payload: &[u8],
    ) -> StoreResult<u64> {
        let doc = self
            .inner
            .instances
            .find_one_and_update(
                doc! { ID: id, STATUS: RUNNING },
                doc! { "$inc": { SIGNAL_SEQ: 1_i64 } },
            )
            .projection(doc! { SIGNAL_SEQ: 1 })
            .return_document(ReturnDocument::After)
            .await
            .map_err(mongo_err)?;
        let Some(doc) = doc else {
            return Err(self.refused_signal(id).await);
        };
        let sid = Fields::new(&doc, "instance").u64(SIGNAL_SEQ)?;
        let now = now_millis();
        self.inner
            .signals
            .insert_one(signal_doc(id, int(sid), name, payload, now))
            .await
            .map_err(mongo_err)?;
        let woken = self
            .inner
            .instances
            .update_one(doc! { ID: id, STATUS: RUNNING }, wake_update(now))
            .await
            .map_err(mongo_err)?;
        if woken.matched_count == 0 {
            // Finished meanwhile: the signal would never be read.
            self.inner
                .signals
                .delete_one(doc! { INSTANCE_ID: id, SIGNAL_ID: int(sid) })
                .await
                .map_err(mongo_err)?;
            return Err(self.refused_signal(id).await);
        }
        Ok(sid)
    }

    /// The error for a signal to an instance that is not running.
    async fn refused_signal(&self, id: &str) -> StoreError {
        match self.status_of(id).await {
            Ok(status) if status.is_finished() => StoreError::Finished {
                id: id.to_owned(),
                status,
            },
            Ok(_) => {
                StoreError::Conflict(format!("instance {id:?} changed while a signal was sent"))
            }
            Err(e) => e,
        }
    }
}
