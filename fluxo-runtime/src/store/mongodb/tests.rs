use std::collections::HashSet;
use std::time::{Duration, Instant};

use ::mongodb::bson::{doc, Document};
use futures::TryStreamExt;

use super::commit::Intent;
use super::*;
use crate::store::test_fixtures::{claim_request, commit, event, new_instance};

/// The conformance suite with transactions (the test server is a replica
/// set).
mod transactions {
    crate::store_conformance_tests!(optional: async {
        super::super::test_store_from_env().await.map(Box::new)
    });
}

/// The conformance suite on the single-document protocol.
mod single_document {
    crate::store_conformance_tests!(optional: async {
        super::super::test_store_with(|o| o.transactions(super::Transactions::Never))
            .await
            .map(Box::new)
    });
}

async fn store(transactions: Transactions) -> Option<MongoStore> {
    test_store_with(|o| o.transactions(transactions)).await
}

/// Another store (its own client) on the collections of `store`.
async fn second_store(store: &MongoStore, transactions: Transactions) -> MongoStore {
    MongoStore::connect_with(
        MongoOptions::new(test_url())
            .database(store.database_name())
            .collection_prefix(store.collection_prefix())
            .transactions(transactions),
    )
    .await
    .expect("open a second store on the same collections")
}

/// Creates an instance of a fresh workflow and claims it.
async fn started(store: &MongoStore, lease: Duration) -> ClaimedInstance {
    let wf = uuid::Uuid::new_v4().to_string();
    store
        .create_instance(new_instance(&wf))
        .await
        .expect("create");
    claim_only(store, &wf, lease).await
}

/// Claims the one runnable instance of `workflow`.
async fn claim_only(store: &MongoStore, workflow: &str, lease: Duration) -> ClaimedInstance {
    let mut batch = store
        .claim(&claim_request(workflow, 10, lease))
        .await
        .expect("claim");
    assert_eq!(
        batch.claimed.len(),
        1,
        "one runnable instance of {workflow}"
    );
    batch.claimed.remove(0)
}

const BOTH: [Transactions; 2] = [Transactions::Auto, Transactions::Never];

#[test]
fn option_defaults_and_builders() {
    let o = MongoOptions::default();
    assert_eq!(o.url, "mongodb://127.0.0.1:27017");
    assert_eq!(o.database, "fluxo");
    assert_eq!(o.collection_prefix, "fluxo_");
    assert_eq!(o.transactions, Transactions::Auto);
    assert!(o.work_notifications);
    let o = MongoOptions::new("mongodb://db")
        .database("d")
        .collection_prefix("p_")
        .transactions(Transactions::Never)
        .work_notifications(false);
    assert_eq!(
        (
            o.url.as_str(),
            o.database.as_str(),
            o.collection_prefix.as_str()
        ),
        ("mongodb://db", "d", "p_")
    );
    assert_eq!(o.transactions, Transactions::Never);
    assert!(!o.work_notifications);
}

#[tokio::test]
async fn unreachable_server_is_a_backend_error() {
    let started = Instant::now();
    let url = "mongodb://127.0.0.1:1/?directConnection=true&serverSelectionTimeoutMS=300";
    match MongoStore::connect(url).await {
        Err(StoreError::Backend(_)) => {}
        other => panic!("expected a backend error, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn store_uses_what_the_server_offers() {
    let Some(store) = test_store_from_env().await else {
        return;
    };
    assert_eq!(store.backend_name(), "mongodb");
    assert!(
        store.uses_transactions(),
        "the test server is a replica set: transactions are used"
    );
    assert!(
        store.work_notifications().is_some(),
        "the test server has change streams"
    );
    assert!(!store.prefers_batches());
    let never = second_store(&store, Transactions::Never).await;
    assert!(!never.uses_transactions());
    let quiet = MongoStore::from_client(
        store.client().clone(),
        MongoOptions::new("unused")
            .database(store.database_name())
            .work_notifications(false),
    )
    .await
    .expect("open on an existing client");
    assert!(quiet.work_notifications().is_none());
    assert!(format!("{store:?}").contains(store.database_name()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_never_share_an_instance() {
    let Some(a) = test_store_from_env().await else {
        return;
    };
    // One store with transactions, one without: they work on the same data.
    let b = second_store(&a, Transactions::Never).await;
    tokio::join!(conformance::run_all(&a), conformance::run_all(&b));

    let wf = uuid::Uuid::new_v4().to_string();
    let mut all = HashSet::new();
    for i in 0..40 {
        let store = if i % 2 == 0 { &a } else { &b };
        let new = new_instance(&wf);
        all.insert(new.id.clone());
        store.create_instance(new).await.expect("create");
    }
    let mut claimers = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let wf = wf.clone();
        claimers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = store
                    .claim(&claim_request(&wf, 3, Duration::from_secs(600)))
                    .await
                    .expect("claim");
                if batch.claimed.is_empty() {
                    return got;
                }
                got.extend(batch.claimed.into_iter().map(|c| c.record.id));
            }
        }));
    }
    let mut seen = HashSet::new();
    for claimer in claimers {
        for id in claimer.await.expect("claimer") {
            assert!(seen.insert(id.clone()), "{id} was claimed twice");
        }
    }
    assert_eq!(seen, all, "every instance is claimed exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_signals_and_commits_on_one_instance() {
    for mode in BOTH {
        let Some(store) = store(mode).await else {
            return;
        };
        let c = started(&store, Duration::from_secs(600)).await;
        let id = c.record.id.clone();
        let senders = (0..12).map(|i| {
            let store = store.clone();
            let id = id.clone();
            tokio::spawn(async move {
                store
                    .send_signal(&id, "s", vec![i])
                    .await
                    .expect("send_signal")
            })
        });
        let committer = {
            let store = store.clone();
            let c = c.clone();
            tokio::spawn(async move {
                for i in 0..6 {
                    let outcome = store
                        .commit(commit(&c, vec![event(i)], Transition::None))
                        .await
                        .expect("commit");
                    assert!(matches!(outcome, CommitOutcome::Applied { .. }));
                }
            })
        };
        let mut ids = HashSet::new();
        for sender in senders {
            assert!(
                ids.insert(sender.await.expect("sender")),
                "{mode:?}: signal ids are unique"
            );
        }
        committer.await.expect("committer");
        let (_, inbox_seq) = store.next_signal(&id, "s").await.expect("next_signal");
        assert_eq!(
            inbox_seq,
            c.inbox_seq + 12,
            "{mode:?}: each signal moves the inbox once"
        );
        assert_eq!(store.load_history(&id).await.expect("history").len(), 6);
        let stored: Vec<Document> = store
            .inner
            .signals
            .find(doc! { INSTANCE_ID: id.as_str() })
            .await
            .expect("find")
            .try_collect()
            .await
            .expect("signals");
        assert_eq!(stored.len(), 12, "{mode:?}: every signal is in the inbox");
    }
}

/// Inserts a journal entry the instance's counter does not cover.
async fn stray_entry(store: &MongoStore, id: &str, event_id: u64, lease_token: u64) {
    store
        .inner
        .history
        .insert_one(codec::event_doc(
            id,
            &StoredEvent {
                event_id,
                seq: event_id,
                kind: "stray".into(),
                data: b"stray".to_vec(),
            },
            lease_token,
            "stray-writer",
            now_millis(),
        ))
        .await
        .expect("insert a stray entry");
}

#[tokio::test]
async fn journal_positions_are_fenced_by_the_unique_index() {
    for mode in BOTH {
        let Some(store) = store(mode).await else {
            return;
        };
        // A committed position is a conflict, and the commit writes nothing.
        let c = started(&store, Duration::from_secs(600)).await;
        let id = c.record.id.clone();
        store
            .commit(commit(&c, vec![event(0)], Transition::None))
            .await
            .expect("commit");
        let mut dup = commit(
            &c,
            vec![event(0), event(1)],
            Transition::Complete { output: vec![] },
        );
        dup.new_instances = vec![new_instance("dup-child")];
        let child = dup.new_instances[0].id.clone();
        match store.commit(dup).await {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("{mode:?}: expected a conflict, got {other:?}"),
        }
        assert_eq!(
            store.load_history(&id).await.expect("history"),
            vec![event(0)]
        );
        assert!(store.get_instance(&child).await.expect("get").is_none());
        assert_eq!(
            store
                .get_instance(&id)
                .await
                .expect("get")
                .expect("exists")
                .status,
            InstanceStatus::Running
        );

        // A leftover of an older lease at the next position is not part of
        // the journal, and is cleared out of the way of the current holder.
        stray_entry(&store, &id, 1, c.lease_token - 1).await;
        assert_eq!(
            store.load_history(&id).await.expect("history"),
            vec![event(0)]
        );
        assert_eq!(
            store
                .commit(commit(&c, vec![event(1), event(2)], Transition::None))
                .await
                .expect("commit over a leftover"),
            CommitOutcome::Applied {
                cancel_requested: false
            }
        );
        assert_eq!(
            store.load_history(&id).await.expect("history"),
            vec![event(0), event(1), event(2)]
        );

        // A leftover written under the current lease may still be committed
        // by the call that wrote it: the commit is refused.
        stray_entry(&store, &id, 3, c.lease_token).await;
        match store
            .commit(commit(&c, vec![event(3)], Transition::None))
            .await
        {
            Err(StoreError::Conflict(m)) => assert!(m.contains("unknown"), "{m}"),
            other => panic!("{mode:?}: expected a conflict, got {other:?}"),
        }
        assert_eq!(store.load_history(&id).await.expect("history").len(), 3);

        // A newer claim takes over: the leftover is cleared then.
        store
            .commit(commit(&c, vec![], Transition::Release))
            .await
            .expect("release");
        let again = claim_only(&store, &c.record.workflow, Duration::from_secs(600)).await;
        assert_eq!(again.next_event_id, 3);
        assert_eq!(
            store
                .commit(commit(&again, vec![event(3)], Transition::None))
                .await
                .expect("commit"),
            CommitOutcome::Applied {
                cancel_requested: false
            }
        );
        assert_eq!(
            store.load_history(&id).await.expect("history"),
            (0..4).map(event).collect::<Vec<_>>()
        );
    }
}

/// Applies only the fence of a commit (with its follow-up work recorded),
/// as a process that dies right after it would.
async fn fence_only(store: &MongoStore, c: &Commit, intent: Option<&Intent>) {
    let intent = intent.map(Intent::to_doc);
    let fenced = store
        .fence(&mut None, c, now_millis(), intent.as_ref())
        .await
        .map_err(StoreError::from)
        .expect("fence");
    assert!(fenced.is_some(), "the fence applies");
}

#[tokio::test]
async fn follow_up_work_of_an_interrupted_commit_is_finished_by_the_next_claim() {
    let Some(store) = store(Transactions::Never).await else {
        return;
    };
    let target = started(&store, Duration::from_secs(600)).await;
    let c = started(&store, Duration::ZERO).await;
    let id = c.record.id.clone();
    let sid = store
        .send_signal(&id, "go", b"go".to_vec())
        .await
        .expect("signal");
    let mut child = new_instance("orphan-child");
    child.parent_id = Some(id.clone());
    let child_id = child.id.clone();
    let mut crashed = commit(&c, vec![event(0)], Transition::None);
    crashed.consume_signal = Some(sid);
    crashed.new_instances = vec![child];
    crashed.cancel_instances = vec![target.record.id.clone()];
    let intent = Intent::of(&crashed, now_millis()).expect("follow-up work");
    // The process dies after journal and fence.
    store
        .inner
        .history
        .insert_one(codec::event_doc(
            &id,
            &event(0),
            c.lease_token,
            "w",
            now_millis(),
        ))
        .await
        .expect("insert");
    fence_only(&store, &crashed, Some(&intent)).await;

    // The commit is visible at once: journal and consumed signal.
    assert_eq!(
        store.load_history(&id).await.expect("history"),
        vec![event(0)]
    );
    let (signal, _) = store.next_signal(&id, "go").await.expect("next_signal");
    assert!(
        signal.is_none(),
        "a consumed signal is hidden while its deletion is pending"
    );
    assert!(store.get_instance(&child_id).await.expect("get").is_none());

    // The lease expired; the next claim finishes the work first.
    let again = claim_only(&store, &c.record.workflow, Duration::from_secs(600)).await;
    assert_eq!(again.next_event_id, 1);
    let child = store
        .get_instance(&child_id)
        .await
        .expect("get")
        .expect("child created");
    assert_eq!(child.parent_id.as_deref(), Some(id.as_str()));
    assert!(
        store
            .get_instance(&target.record.id)
            .await
            .expect("get")
            .expect("exists")
            .cancel_requested,
        "the cancel request is delivered"
    );
    let inst = store
        .inner
        .instances
        .find_one(doc! { ID: id.as_str() })
        .await
        .expect("find")
        .expect("exists");
    assert!(
        codec::Fields::new(&inst, "instance")
            .docs(PENDING)
            .expect("pending")
            .is_empty(),
        "the finished work is removed from the instance"
    );
    let left = store
        .inner
        .signals
        .count_documents(doc! { INSTANCE_ID: id.as_str() })
        .await
        .expect("count");
    assert_eq!(left, 0, "the consumed signal is deleted");
}

#[tokio::test]
async fn interrupted_finish_wakes_the_parent_by_a_sweep() {
    let Some(store) = store(Transactions::Never).await else {
        return;
    };
    let parent = started(&store, Duration::from_secs(600)).await;
    let mut child = new_instance(&uuid::Uuid::new_v4().to_string());
    child.parent_id = Some(parent.record.id.clone());
    let mut start_child = commit(
        &parent,
        vec![event(0)],
        Transition::Park {
            wake_at: None,
            seen_inbox: parent.inbox_seq,
        },
    );
    start_child.new_instances = vec![child.clone()];
    assert_eq!(
        store.commit(start_child).await.expect("commit"),
        CommitOutcome::Applied {
            cancel_requested: false
        }
    );
    let c = claim_only(&store, &child.workflow, Duration::from_secs(600)).await;
    let done = commit(
        &c,
        vec![],
        Transition::Complete {
            output: b"42".to_vec(),
        },
    );
    let mut intent = Intent::of(&done, now_millis()).expect("follow-up work");
    // Long enough ago that its process is surely gone.
    intent.at -= 3_600_000;
    fence_only(&store, &done, Some(&intent)).await;
    assert_eq!(
        store
            .get_instance(&child.id)
            .await
            .expect("get")
            .expect("exists")
            .status,
        InstanceStatus::Completed
    );
    // Nobody claims the finished child again; a claim's sweep wakes the
    // parent (sweeps run at most every few seconds: this one is due).
    store.inner.last_sweep.store(0, Ordering::Relaxed);
    let woken = claim_only(&store, &parent.record.workflow, Duration::from_secs(600)).await;
    assert!(
        woken.inbox_seq > parent.inbox_seq,
        "the finished child woke its parent"
    );
}

#[tokio::test]
async fn work_notifications_come_from_other_stores() {
    let Some(a) = test_store_from_env().await else {
        return;
    };
    let mut rx = a.work_notifications().expect("change streams");
    let b = second_store(&a, Transactions::Auto).await;
    let wait = |rx: &mut tokio::sync::watch::Receiver<u64>| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), rx.changed())
                .await
                .map(|r| r.is_ok())
                .unwrap_or(false)
        }
    };
    rx.borrow_and_update();
    let waiting = tokio::spawn(wait(&mut rx));
    let wf = uuid::Uuid::new_v4().to_string();
    let new = new_instance(&wf);
    let id = new.id.clone();
    b.create_instance(new).await.expect("create");
    assert!(
        waiting.await.expect("wait"),
        "another store's new instance is notified"
    );

    let c = claim_only(&b, &wf, Duration::from_secs(600)).await;
    b.commit(commit(
        &c,
        vec![],
        Transition::Park {
            wake_at: None,
            seen_inbox: c.inbox_seq,
        },
    ))
    .await
    .expect("park");
    tokio::time::sleep(Duration::from_millis(300)).await;
    rx.borrow_and_update();
    let waiting = tokio::spawn(wait(&mut rx));
    b.send_signal(&id, "go", vec![]).await.expect("signal");
    assert!(
        waiting.await.expect("wait"),
        "another store's signal is notified"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    rx.borrow_and_update();
    let waiting = tokio::spawn(wait(&mut rx));
    b.request_cancel(&id).await.expect("cancel");
    assert!(
        waiting.await.expect("wait"),
        "another store's cancel request is notified"
    );

    // The task stops with the store.
    drop(a);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the change stream task ends when the store is dropped"
    );
}

#[tokio::test]
async fn collection_prefixes_isolate_stores() {
    let Some(a) = test_store_from_env().await else {
        return;
    };
    let b = MongoStore::connect_with(
        MongoOptions::new(test_url())
            .database(a.database_name())
            .collection_prefix("other_"),
    )
    .await
    .expect("open");
    assert_eq!(b.collection_prefix(), "other_");
    let wf = uuid::Uuid::new_v4().to_string();
    let new = new_instance(&wf);
    let id = new.id.clone();
    a.create_instance(new.clone()).await.expect("create");
    assert!(b.get_instance(&id).await.expect("get").is_none());
    assert!(b
        .list_instances(ListFilter::default())
        .await
        .expect("list")
        .is_empty());
    assert!(b
        .claim(&claim_request(&wf, 10, Duration::from_secs(60)))
        .await
        .expect("claim")
        .claimed
        .is_empty());
    assert!(matches!(
        b.create_instance(new).await,
        Ok(CreateOutcome::Created)
    ));
    claim_only(&a, &wf, Duration::from_secs(60)).await;
    claim_only(&b, &wf, Duration::from_secs(60)).await;
    let mut names = a
        .client()
        .database(a.database_name())
        .list_collection_names()
        .await
        .expect("collections");
    names.sort();
    assert_eq!(
        names,
        [
            "fluxo_history",
            "fluxo_instances",
            "fluxo_signals",
            "other_history",
            "other_instances",
            "other_signals"
        ]
    );
}

#[tokio::test]
async fn opening_again_keeps_data_and_indexes() {
    let Some(a) = test_store_from_env().await else {
        return;
    };
    let c = started(&a, Duration::from_secs(600)).await;
    a.commit(commit(&c, vec![event(0)], Transition::None))
        .await
        .expect("commit");
    let b = second_store(&a, Transactions::Auto).await;
    assert_eq!(
        b.load_history(&c.record.id).await.expect("history"),
        vec![event(0)]
    );
    let indexes: HashSet<String> = a
        .inner
        .instances
        .list_index_names()
        .await
        .expect("indexes")
        .into_iter()
        .collect();
    for name in [
        "runnable",
        "lease_expiry",
        "lease_owner",
        "created",
        "workflow_created",
        "status_created",
        "pending",
    ] {
        assert!(indexes.contains(name), "index {name} in {indexes:?}");
    }
    let unique = a
        .inner
        .history
        .list_indexes()
        .await
        .expect("indexes")
        .try_collect::<Vec<_>>()
        .await
        .expect("indexes")
        .into_iter()
        .find(|i| i.options.as_ref().and_then(|o| o.name.as_deref()) == Some("position"))
        .expect("the position index");
    assert_eq!(unique.options.and_then(|o| o.unique), Some(true));
}

#[tokio::test]
async fn undecodable_documents_are_corrupt() {
    let Some(store) = test_store_from_env().await else {
        return;
    };
    let c = started(&store, Duration::from_secs(600)).await;
    let id = c.record.id.as_str();
    let set = |update: Document| {
        let store = store.clone();
        async move {
            store
                .inner
                .instances
                .update_one(doc! { ID: id }, doc! { "$set": update })
                .await
                .expect("update");
        }
    };
    set(doc! { STATUS: "sleeping" }).await;
    match store.get_instance(id).await {
        Err(StoreError::Corrupt(_)) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    set(doc! { STATUS: RUNNING, VERSION: -1_i64 }).await;
    match store.list_instances(ListFilter::default()).await {
        Err(StoreError::Corrupt(_)) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    set(doc! { VERSION: 1_i64 }).await;
    store
        .commit(commit(&c, vec![event(0)], Transition::None))
        .await
        .expect("commit");
    store
        .inner
        .history
        .update_one(doc! { INSTANCE_ID: id }, doc! { "$set": { DATA: "text" } })
        .await
        .expect("update");
    match store.load_history(id).await {
        Err(StoreError::Corrupt(_)) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    store
        .inner
        .history
        .delete_many(doc! { INSTANCE_ID: id })
        .await
        .expect("delete");
    match store.load_history(id).await {
        Err(StoreError::Corrupt(m)) => assert!(m.contains("missing"), "{m}"),
        other => panic!("a journal with a hole is Corrupt, got {other:?}"),
    }
}

/// Single-commit latency on the test server, for the record:
/// `cargo test -p fluxo-runtime --features mongodb --lib commit_latency -- --ignored --nocapture`
#[tokio::test]
#[ignore]
async fn commit_latency() {
    const N: u64 = 200;
    for mode in BOTH {
        let Some(store) = store(mode).await else {
            return;
        };
        let c = started(&store, Duration::from_secs(600)).await;
        let mut samples = Vec::new();
        for i in 0..N {
            let one = commit(&c, vec![event(i)], Transition::None);
            let started = Instant::now();
            store.commit(one).await.expect("commit");
            samples.push(started.elapsed());
        }
        samples.sort();
        let mean = samples.iter().sum::<Duration>() / N as u32;
        println!(
            "{mode:?}: step commit (1 event) x{N}: mean {mean:?}, p50 {:?}, p99 {:?}",
            samples[samples.len() / 2],
            samples[samples.len() * 99 / 100]
        );
        let mut parks = Vec::new();
        for _ in 0..20 {
            let c = started(&store, Duration::from_secs(600)).await;
            let sid = store
                .send_signal(&c.record.id, "s", vec![])
                .await
                .expect("signal");
            let mut one = commit(
                &c,
                vec![event(0), event(1)],
                Transition::Park {
                    wake_at: None,
                    seen_inbox: c.inbox_seq + 1,
                },
            );
            one.consume_signal = Some(sid);
            let started = Instant::now();
            store.commit(one).await.expect("commit");
            parks.push(started.elapsed());
        }
        let mean = parks.iter().sum::<Duration>() / parks.len() as u32;
        println!("{mode:?}: consume a signal + 2 events + park x20: mean {mean:?}");
    }
}

#[tokio::test]
async fn claims_skip_an_instance_another_transaction_holds() {
    let Some(store) = test_store_from_env().await else {
        return;
    };
    let wf = uuid::Uuid::new_v4().to_string();
    let held = new_instance(&wf);
    let free = new_instance(&wf);
    store.create_instance(held.clone()).await.expect("create");
    store.create_instance(free.clone()).await.expect("create");
    // A transaction that stays open, as one of a process that died in the
    // middle of it (the server aborts those only after a time limit).
    let mut session = store.client().start_session().await.expect("session");
    session.start_transaction().await.expect("transaction");
    store
        .inner
        .instances
        .update_one(doc! { ID: held.id.as_str() }, doc! { "$set": { "x": 1 } })
        .session(&mut session)
        .await
        .expect("update in the transaction");
    let started = Instant::now();
    let batch = store
        .claim(&claim_request(&wf, 10, Duration::from_secs(600)))
        .await
        .expect("claim");
    let ids: Vec<&str> = batch.claimed.iter().map(|c| c.record.id.as_str()).collect();
    assert_eq!(ids, vec![free.id.as_str()], "the held instance is skipped");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the claim does not wait for the transaction"
    );
    session.abort_transaction().await.expect("abort");
    claim_only(&store, &wf, Duration::from_secs(600)).await;
}
