//! Document layout: how records are written to and read from the
//! collections, and how driver errors become [`StoreError`]s.

use ::mongodb::bson::spec::BinarySubtype;
use ::mongodb::bson::{doc, Binary, Bson, Document};
use ::mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};

use super::super::*;

/// Server error code of a unique index violation.
const DUPLICATE_KEY: i32 = 11000;

// ----- field names -------------------------------------------------------------

// instances
pub(super) const ID: &str = "_id";
pub(super) const WORKFLOW: &str = "workflow";
pub(super) const VERSION: &str = "version";
pub(super) const STATUS: &str = "status";
pub(super) const INPUT: &str = "input";
pub(super) const OUTPUT: &str = "output";
pub(super) const FAILURE: &str = "failure";
pub(super) const PARENT_ID: &str = "parent_id";
pub(super) const CANCEL_REQUESTED: &str = "cancel_requested";
pub(super) const HISTORY_FORMAT_FIELD: &str = "history_format";
pub(super) const CREATED_AT: &str = "created_at";
pub(super) const UPDATED_AT: &str = "updated_at";
/// Tie-breaker for instances created in the same millisecond.
pub(super) const ORDER: &str = "order";
/// When an unleased running instance becomes runnable; absent when it only
/// waits for its inbox, while leased, and once finished.
pub(super) const READY_AT: &str = "ready_at";
/// Absent when not leased.
pub(super) const LEASE_OWNER: &str = "lease_owner";
/// Absent when not leased.
pub(super) const LEASE_EXPIRES_AT: &str = "lease_expires_at";
pub(super) const LEASE_TOKEN: &str = "lease_token";
pub(super) const NEXT_EVENT_ID: &str = "next_event_id";
pub(super) const INBOX_SEQ: &str = "inbox_seq";
/// The last signal id handed out for the instance.
pub(super) const SIGNAL_SEQ: &str = "signal_seq";
/// Follow-up work of single-document commits not yet known to be done.
pub(super) const PENDING: &str = "pending";

// history (also INSTANCE_ID, LEASE_TOKEN, CREATED_AT)
pub(super) const INSTANCE_ID: &str = "instance_id";
pub(super) const EVENT_ID: &str = "event_id";
pub(super) const SEQ: &str = "seq";
pub(super) const KIND: &str = "kind";
pub(super) const DATA: &str = "data";
/// Identifies the commit call that wrote a journal entry.
pub(super) const WRITER: &str = "writer";

// signals (also INSTANCE_ID, CREATED_AT)
pub(super) const SIGNAL_ID: &str = "signal_id";
pub(super) const NAME: &str = "name";
pub(super) const PAYLOAD: &str = "payload";

// pending intents
pub(super) const INTENT_ID: &str = "id";
pub(super) const INTENT_AT: &str = "at";
pub(super) const INTENT_CONSUME: &str = "consume";
pub(super) const INTENT_FINISHED: &str = "finished";
pub(super) const INTENT_CHILDREN: &str = "children";
pub(super) const INTENT_CANCEL: &str = "cancel";

pub(super) const RUNNING: &str = "running";

// ----- errors ------------------------------------------------------------------

/// Maps a driver error: undecodable documents are `Corrupt`, the rest is a
/// backend failure.
pub(super) fn mongo_err(e: MongoError) -> StoreError {
    match &*e.kind {
        ErrorKind::BsonDeserialization(_) => StoreError::Corrupt(e.to_string()),
        _ => StoreError::backend(e),
    }
}

/// Whether the error is (or contains) a unique index violation.
pub(super) fn is_duplicate_key(e: &MongoError) -> bool {
    match &*e.kind {
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        ErrorKind::InsertMany(m) => m
            .write_errors
            .as_ref()
            .is_some_and(|errors| errors.iter().any(|w| w.code == DUPLICATE_KEY)),
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        _ => false,
    }
}

/// The error a server gives when it has no change streams (a standalone
/// server) or no transactions, as opposed to a network failure.
pub(super) fn is_unsupported(e: &MongoError) -> bool {
    matches!(
        &*e.kind,
        ErrorKind::Command(_)
            | ErrorKind::IncompatibleServer { .. }
            | ErrorKind::SessionsNotSupported
    )
}

// ----- values ------------------------------------------------------------------

/// A u64 as stored. Values beyond `i64::MAX` never occur in the database, so
/// they become -1, which matches nothing.
pub(super) fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(-1)
}

pub(super) fn bin(bytes: &[u8]) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Generic,
        bytes: bytes.to_vec(),
    })
}

fn corrupt(what: &str, key: &str, found: Option<&Bson>) -> StoreError {
    match found {
        None => StoreError::Corrupt(format!("{what}: field {key:?} is missing")),
        Some(v) => {
            StoreError::Corrupt(format!("{what}: field {key:?} has an unexpected value {v}"))
        }
    }
}

/// Reads document fields with errors naming the document and the field.
pub(super) struct Fields<'a> {
    doc: &'a Document,
    what: &'a str,
}

impl<'a> Fields<'a> {
    pub(super) fn new(doc: &'a Document, what: &'a str) -> Self {
        Fields { doc, what }
    }

    fn bad(&self, key: &str) -> StoreError {
        corrupt(self.what, key, self.doc.get(key))
    }

    pub(super) fn opt_i64(&self, key: &str) -> StoreResult<Option<i64>> {
        match self.doc.get(key) {
            None | Some(Bson::Null) => Ok(None),
            Some(Bson::Int64(v)) => Ok(Some(*v)),
            Some(Bson::Int32(v)) => Ok(Some(i64::from(*v))),
            Some(_) => Err(self.bad(key)),
        }
    }

    pub(super) fn i64(&self, key: &str) -> StoreResult<i64> {
        self.opt_i64(key)?.ok_or_else(|| self.bad(key))
    }

    pub(super) fn u64(&self, key: &str) -> StoreResult<u64> {
        u64::try_from(self.i64(key)?).map_err(|_| self.bad(key))
    }

    pub(super) fn u32(&self, key: &str) -> StoreResult<u32> {
        u32::try_from(self.i64(key)?).map_err(|_| self.bad(key))
    }

    pub(super) fn opt_str(&self, key: &str) -> StoreResult<Option<&'a str>> {
        match self.doc.get(key) {
            None | Some(Bson::Null) => Ok(None),
            Some(Bson::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(self.bad(key)),
        }
    }

    pub(super) fn str(&self, key: &str) -> StoreResult<&'a str> {
        self.opt_str(key)?.ok_or_else(|| self.bad(key))
    }

    pub(super) fn opt_bin(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        match self.doc.get(key) {
            None | Some(Bson::Null) => Ok(None),
            Some(Bson::Binary(b)) => Ok(Some(b.bytes.clone())),
            Some(_) => Err(self.bad(key)),
        }
    }

    pub(super) fn bin(&self, key: &str) -> StoreResult<Vec<u8>> {
        self.opt_bin(key)?.ok_or_else(|| self.bad(key))
    }

    pub(super) fn bool(&self, key: &str) -> StoreResult<bool> {
        match self.doc.get(key) {
            None | Some(Bson::Null) => Ok(false),
            Some(Bson::Boolean(b)) => Ok(*b),
            Some(_) => Err(self.bad(key)),
        }
    }

    pub(super) fn docs(&self, key: &str) -> StoreResult<Vec<&'a Document>> {
        match self.doc.get(key) {
            None | Some(Bson::Null) => Ok(Vec::new()),
            Some(Bson::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Bson::Document(d) => Ok(d),
                    _ => Err(self.bad(key)),
                })
                .collect(),
            Some(_) => Err(self.bad(key)),
        }
    }

    pub(super) fn strs(&self, key: &str) -> StoreResult<Vec<String>> {
        match self.doc.get(key) {
            None | Some(Bson::Null) => Ok(Vec::new()),
            Some(Bson::Array(items)) => items
                .iter()
                .map(|item| match item {
                    Bson::String(s) => Ok(s.clone()),
                    _ => Err(self.bad(key)),
                })
                .collect(),
            Some(_) => Err(self.bad(key)),
        }
    }
}

// ----- instances ---------------------------------------------------------------

/// The document of a new instance, runnable at `now`.
pub(super) fn instance_doc(new: &NewInstance, now: Millis, order: i64) -> Document {
    doc! {
        ID: new.id.as_str(),
        WORKFLOW: new.workflow.as_str(),
        VERSION: i64::from(new.version),
        STATUS: RUNNING,
        INPUT: bin(&new.input),
        OUTPUT: Bson::Null,
        FAILURE: Bson::Null,
        PARENT_ID: new.parent_id.as_deref().map_or(Bson::Null, |p| Bson::String(p.to_owned())),
        CANCEL_REQUESTED: false,
        HISTORY_FORMAT_FIELD: i64::from(HISTORY_FORMAT),
        CREATED_AT: now,
        UPDATED_AT: now,
        ORDER: order,
        READY_AT: now,
        LEASE_TOKEN: 0_i64,
        NEXT_EVENT_ID: 0_i64,
        INBOX_SEQ: 0_i64,
        SIGNAL_SEQ: 0_i64,
    }
}

/// Every field but the large and internal ones, for reading records.
pub(super) fn record_projection() -> Document {
    doc! { PENDING: 0 }
}

/// Decodes the public part of an instance document.
pub(super) fn record_from_doc(doc: &Document) -> StoreResult<InstanceRecord> {
    let f = Fields::new(doc, "instance");
    Ok(InstanceRecord {
        id: f.str(ID)?.to_owned(),
        workflow: f.str(WORKFLOW)?.to_owned(),
        version: f.u32(VERSION)?,
        status: InstanceStatus::parse(f.str(STATUS)?)?,
        input: f.bin(INPUT)?,
        output: f.opt_bin(OUTPUT)?,
        failure: f.opt_bin(FAILURE)?,
        parent_id: f.opt_str(PARENT_ID)?.map(str::to_owned),
        cancel_requested: f.bool(CANCEL_REQUESTED)?,
        history_format: f.u32(HISTORY_FORMAT_FIELD)?,
        created_at: f.i64(CREATED_AT)?,
        updated_at: f.i64(UPDATED_AT)?,
    })
}

/// Decodes an instance document returned by a claim.
pub(super) fn claimed_from_doc(doc: &Document) -> StoreResult<ClaimedInstance> {
    let f = Fields::new(doc, "instance");
    Ok(ClaimedInstance {
        record: record_from_doc(doc)?,
        lease_token: f.u64(LEASE_TOKEN)?,
        next_event_id: f.u64(NEXT_EVENT_ID)?,
        inbox_seq: f.u64(INBOX_SEQ)?,
    })
}

/// Update that wakes a running instance: its inbox moves and it is runnable
/// at `now`.
pub(super) fn wake_update(now: Millis) -> Document {
    doc! {
        "$inc": { INBOX_SEQ: 1_i64 },
        "$set": { READY_AT: now, UPDATED_AT: now },
    }
}

/// Update that records a cancel request and wakes the instance.
pub(super) fn cancel_update(now: Millis) -> Document {
    doc! {
        "$inc": { INBOX_SEQ: 1_i64 },
        "$set": { CANCEL_REQUESTED: true, READY_AT: now, UPDATED_AT: now },
    }
}

/// Filter for the `(workflow, version)` pairs of a claim.
pub(super) fn workflows_filter(workflows: &[(String, u32)]) -> Vec<Document> {
    workflows
        .iter()
        .map(|(w, v)| doc! { WORKFLOW: w.as_str(), VERSION: i64::from(*v) })
        .collect()
}

// ----- history -----------------------------------------------------------------

pub(super) fn event_doc(
    instance_id: &str,
    e: &StoredEvent,
    lease_token: u64,
    writer: &str,
    now: Millis,
) -> Document {
    doc! {
        INSTANCE_ID: instance_id,
        EVENT_ID: int(e.event_id),
        SEQ: int(e.seq),
        KIND: e.kind.as_ref(),
        DATA: bin(&e.data),
        LEASE_TOKEN: int(lease_token),
        WRITER: writer,
        CREATED_AT: now,
    }
}

pub(super) fn event_from_doc(doc: &Document) -> StoreResult<StoredEvent> {
    let f = Fields::new(doc, "journal entry");
    Ok(StoredEvent {
        event_id: f.u64(EVENT_ID)?,
        seq: f.u64(SEQ)?,
        kind: f.str(KIND)?.to_owned().into(),
        data: f.bin(DATA)?,
    })
}

// ----- signals -----------------------------------------------------------------

pub(super) fn signal_doc(
    instance_id: &str,
    signal_id: i64,
    name: &str,
    payload: &[u8],
    now: Millis,
) -> Document {
    doc! {
        INSTANCE_ID: instance_id,
        SIGNAL_ID: signal_id,
        NAME: name,
        PAYLOAD: bin(payload),
        CREATED_AT: now,
    }
}

pub(super) fn signal_from_doc(doc: &Document) -> StoreResult<InboxSignal> {
    let f = Fields::new(doc, "signal");
    Ok(InboxSignal {
        signal_id: f.u64(SIGNAL_ID)?,
        payload: f.bin(PAYLOAD)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_documents_round_trip() {
        let new = NewInstance {
            id: "a".to_owned(),
            workflow: "wf".to_owned(),
            version: 3,
            input: vec![0, 255],
            parent_id: Some("p".to_owned()),
        };
        let doc = instance_doc(&new, 42, 7);
        let r = record_from_doc(&doc).expect("decode");
        assert_eq!(r.id, "a");
        assert_eq!(r.workflow, "wf");
        assert_eq!(r.version, 3);
        assert_eq!(r.status, InstanceStatus::Running);
        assert_eq!(r.input, vec![0, 255]);
        assert_eq!(r.output, None);
        assert_eq!(r.parent_id.as_deref(), Some("p"));
        assert_eq!(r.history_format, HISTORY_FORMAT);
        assert_eq!((r.created_at, r.updated_at), (42, 42));
        let c = claimed_from_doc(&doc).expect("decode");
        assert_eq!((c.lease_token, c.next_event_id, c.inbox_seq), (0, 0, 0));
    }

    #[test]
    fn bad_documents_are_corrupt() {
        let mut doc = instance_doc(&sample(), 1, 1);
        doc.insert(STATUS, "sleeping");
        assert!(matches!(record_from_doc(&doc), Err(StoreError::Corrupt(_))));
        let mut doc = instance_doc(&sample(), 1, 1);
        doc.insert(VERSION, -1_i64);
        match record_from_doc(&doc) {
            Err(StoreError::Corrupt(m)) => assert!(m.contains("version"), "{m}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let mut doc = instance_doc(&sample(), 1, 1);
        doc.remove(INPUT);
        assert!(matches!(record_from_doc(&doc), Err(StoreError::Corrupt(_))));
        let mut doc = instance_doc(&sample(), 1, 1);
        doc.insert(INPUT, "text, not bytes");
        assert!(matches!(record_from_doc(&doc), Err(StoreError::Corrupt(_))));
        let e = doc! { EVENT_ID: 1_i32, SEQ: 1_i64, KIND: "k" };
        assert!(matches!(event_from_doc(&e), Err(StoreError::Corrupt(_))));
        let e = doc! { EVENT_ID: 1_i32, SEQ: 1_i64, KIND: "k", DATA: bin(b"x") };
        assert_eq!(event_from_doc(&e).expect("int32 ids decode").event_id, 1);
    }

    #[test]
    fn out_of_range_numbers_match_nothing() {
        assert_eq!(int(u64::MAX), -1);
        assert_eq!(int(5), 5);
    }

    fn sample() -> NewInstance {
        NewInstance {
            id: "x".to_owned(),
            workflow: "w".to_owned(),
            version: 1,
            input: Vec::new(),
            parent_id: None,
        }
    }
}
