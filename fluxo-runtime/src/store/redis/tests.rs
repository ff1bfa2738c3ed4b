use std::collections::HashSet;
use std::time::Instant;

use ::redis::aio::MultiplexedConnection;
use tokio::sync::watch;

use super::*;
use crate::store::conformance;
use crate::store::test_fixtures::{claim_request, commit, event, new_instance};

mod conformance_suite {
    crate::store_conformance_tests!(optional: async {
        super::super::test_store_from_env().await.map(Box::new)
    });
}

/// A store for the test, or return (the fixture reported the skip).
macro_rules! store_or_skip {
    () => {
        match test_store_from_env().await {
            Some(store) => store,
            None => return,
        }
    };
}

/// Another store (its own connections) on the prefix of `store`.
async fn second_store(store: &RedisStore) -> RedisStore {
    RedisStore::connect_with(RedisOptions::new(test_url()).prefix(store.prefix()))
        .await
        .expect("open a second store on the same prefix")
}

/// A plain connection for looking at the server directly.
async fn admin() -> MultiplexedConnection {
    Client::open(test_url())
        .expect("test URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test server")
}

async fn started(store: &RedisStore, workflow: &str) -> ClaimedInstance {
    store
        .create_instance(new_instance(workflow))
        .await
        .expect("create");
    let mut batch = store
        .claim(&claim_request(workflow, 10, Duration::from_secs(60)))
        .await
        .expect("claim");
    assert_eq!(batch.claimed.len(), 1);
    batch.claimed.remove(0)
}

/// The keys matching `pattern`.
async fn scan(conn: &mut MultiplexedConnection, pattern: &str) -> Vec<Vec<u8>> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, found): (u64, Vec<Vec<u8>>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("scan");
        keys.extend(found);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

/// The Redis Cluster hash slot of a key.
fn key_slot(key: &[u8]) -> u16 {
    let mut hashed = key;
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                hashed = &key[open + 1..open + 1 + len];
            }
        }
    }
    // CRC16-CCITT (XMODEM), as Redis Cluster uses.
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// The ids of the clients whose `CLIENT LIST` line has `name=<name>`.
async fn clients_named(conn: &mut MultiplexedConnection, name: &str) -> Vec<u64> {
    let list: String = ::redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(conn)
        .await
        .expect("client list");
    list.lines()
        .filter(|line| line.split(' ').any(|f| f == format!("name={name}")))
        .filter_map(|line| {
            line.split(' ')
                .find_map(|f| f.strip_prefix("id="))
                .and_then(|id| id.parse().ok())
        })
        .collect()
}

async fn kill_client(conn: &mut MultiplexedConnection, id: u64) {
    let killed: u64 = ::redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(conn)
        .await
        .expect("client kill");
    assert_eq!(killed, 1, "client {id} should have been killed");
}

/// Waits until the store's subscriber hears messages on its channel (proved
/// by publishing probes), then forgets the bumps seen so far.
async fn until_subscribed(store: &RedisStore, rx: &mut watch::Receiver<u64>) {
    let mut admin = admin().await;
    for _ in 0..100 {
        let receivers: u64 = ::redis::cmd("PUBLISH")
            .arg(store.channel())
            .arg("probe")
            .query_async(&mut admin)
            .await
            .expect("publish");
        if receivers > 0
            && tokio::time::timeout(Duration::from_secs(2), rx.changed())
                .await
                .is_ok()
        {
            // Let a burst settle, then start from a clean slate.
            tokio::time::sleep(Duration::from_millis(50)).await;
            rx.borrow_and_update();
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the work notification subscriber never came up");
}

async fn notified(rx: &mut watch::Receiver<u64>, what: &str) {
    match tokio::time::timeout(Duration::from_secs(3), rx.changed()).await {
        Ok(Ok(())) => {
            rx.borrow_and_update();
        }
        Ok(Err(_)) => panic!("the notification subscriber stopped ({what})"),
        Err(_) => panic!("no work notification after {what}"),
    }
}

#[tokio::test]
async fn whole_suite_on_one_store() {
    let store = store_or_skip!();
    conformance::run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_prefix_never_share_an_instance() {
    let store = store_or_skip!();
    let other = second_store(&store).await;
    tokio::join!(conformance::run_all(&store), conformance::run_all(&other));

    let wf = uuid::Uuid::new_v4().to_string();
    for _ in 0..60 {
        store
            .create_instance(new_instance(&wf))
            .await
            .expect("create");
    }
    let claims = (0..8).map(|i| {
        let s = if i % 2 == 0 {
            store.clone()
        } else {
            other.clone()
        };
        let req = claim_request(&wf, 9, Duration::from_secs(60));
        tokio::spawn(async move { s.claim(&req).await.expect("claim") })
    });
    let mut seen = HashSet::new();
    for batch in futures::future::join_all(claims).await {
        for c in batch.expect("claim task").claimed {
            assert!(
                seen.insert(c.record.id.clone()),
                "{} claimed twice",
                c.record.id
            );
        }
    }
    assert_eq!(seen.len(), 60, "every instance is claimed once");

    // A lease taken over through the other store fences out the first
    // holder; a live lease is not taken.
    let wf = format!("{wf}-takeover");
    other
        .create_instance(new_instance(&wf))
        .await
        .expect("create");
    let stale = other
        .claim(&claim_request(&wf, 10, Duration::ZERO))
        .await
        .expect("claim")
        .claimed
        .remove(0);
    let fresh = store
        .claim(&claim_request(&wf, 10, Duration::from_secs(60)))
        .await
        .expect("claim")
        .claimed
        .remove(0);
    assert!(fresh.lease_token > stale.lease_token);
    assert!(other
        .claim(&claim_request(&wf, 10, Duration::from_secs(60)))
        .await
        .expect("claim")
        .claimed
        .is_empty());
    assert_eq!(
        other
            .commit(commit(&stale, vec![event(0)], Transition::None))
            .await
            .expect("commit"),
        CommitOutcome::LeaseLost
    );
    assert_eq!(
        store
            .commit(commit(&fresh, vec![event(0)], Transition::None))
            .await
            .expect("commit"),
        CommitOutcome::Applied {
            cancel_requested: false
        }
    );
    drop(other);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_notifications_come_from_other_stores() {
    let store = store_or_skip!();
    let other = second_store(&store).await;
    let mut rx = store
        .work_notifications()
        .expect("a Redis store pushes notifications");
    until_subscribed(&store, &mut rx).await;

    let wf = uuid::Uuid::new_v4().to_string();
    let id = {
        let new = new_instance(&wf);
        let id = new.id.clone();
        other.create_instance(new).await.expect("create");
        id
    };
    notified(&mut rx, "another store created an instance").await;

    let c = store
        .claim(&claim_request(&wf, 10, Duration::from_secs(60)))
        .await
        .expect("claim")
        .claimed
        .remove(0);
    let park = Transition::Park {
        wake_at: None,
        seen_inbox: c.inbox_seq,
    };
    store.commit(commit(&c, vec![], park)).await.expect("park");
    other
        .send_signal(&id, "go", b"now".to_vec())
        .await
        .expect("signal");
    notified(&mut rx, "another store sent a signal").await;

    let c = store
        .claim(&claim_request(&wf, 10, Duration::from_secs(60)))
        .await
        .expect("claim")
        .claimed
        .remove(0);
    let park = Transition::Park {
        wake_at: None,
        seen_inbox: c.inbox_seq,
    };
    store.commit(commit(&c, vec![], park)).await.expect("park");
    other.request_cancel(&id).await.expect("cancel");
    notified(&mut rx, "another store requested a cancel").await;

    // A second receiver shares the one subscriber.
    let mut again = store.work_notifications().expect("notifications");
    other
        .create_instance(new_instance(&wf))
        .await
        .expect("create");
    notified(&mut again, "a second receiver").await;

    // The subscriber stops with the store.
    drop(store);
    match tokio::time::timeout(Duration::from_secs(3), rx.changed()).await {
        Ok(Err(_)) => {}
        Ok(Ok(())) => {
            // A bump raced the drop; the next wait must see the end.
            let end = tokio::time::timeout(Duration::from_secs(3), rx.changed()).await;
            assert!(
                matches!(end, Ok(Err(_))),
                "the subscriber must stop: {end:?}"
            );
        }
        Err(_) => panic!("the subscriber must stop when the store is dropped"),
    }
    let mut admin = admin().await;
    let mut receivers = 1;
    for _ in 0..50 {
        receivers = ::redis::cmd("PUBLISH")
            .arg(other.channel())
            .arg("probe")
            .query_async(&mut admin)
            .await
            .expect("publish");
        if receivers == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(receivers, 0, "the subscription must close with the store");
}

#[tokio::test]
async fn keys_stay_under_the_prefix_in_one_slot() {
    let store = store_or_skip!();
    let elsewhere = store_or_skip!();
    let mark = uuid::Uuid::new_v4().simple().to_string();
    // Ids, names and owners with the characters a key layout could trip on.
    let wf = format!("wf:{{{mark}}}:x");
    let id = format!("id:{{{mark}}}:h:1");
    let owner = format!("owner {{{mark}}}");
    let new = NewInstance {
        id: id.clone(),
        workflow: wf.clone(),
        version: 3,
        input: vec![0, 1, 255],
        parent_id: None,
    };
    store.create_instance(new).await.expect("create");
    let sid = store
        .send_signal(&id, "name:;{x}", vec![9, 0, 9])
        .await
        .expect("signal");
    let req = ClaimRequest {
        owner: owner.clone(),
        workflows: vec![(wf.clone(), 3)],
        limit: 5,
        lease: Duration::from_secs(60),
    };
    let c = store.claim(&req).await.expect("claim").claimed.remove(0);
    assert_eq!(c.record.id, id);
    let (signal, _) = store.next_signal(&id, "name:;{x}").await.expect("next");
    assert_eq!(
        signal.map(|s| (s.signal_id, s.payload)),
        Some((sid, vec![9, 0, 9]))
    );
    let (none, _) = store.next_signal(&id, "name:").await.expect("next");
    assert!(none.is_none(), "signal names are matched exactly");
    let mut child = new_instance(&format!("{wf}-child"));
    child.id = format!("{id}:child");
    child.parent_id = Some(id.clone());
    let mut first = commit(&c, vec![event(0), event(1)], Transition::None);
    first.new_instances = vec![child];
    first.consume_signal = Some(sid);
    store.commit(first).await.expect("commit");
    store
        .renew_leases(&owner, std::slice::from_ref(&id), Duration::from_secs(60))
        .await
        .expect("renew");

    let mut admin = admin().await;
    let base = format!("{{{}}}:", store.prefix());
    let marked = scan(&mut admin, &format!("*{mark}*")).await;
    assert!(
        marked.len() >= 5,
        "keys of the instance, inbox, journal, indexes, owner"
    );
    for key in &marked {
        assert!(
            key.starts_with(base.as_bytes()),
            "key {:?} is outside the prefix",
            String::from_utf8_lossy(key)
        );
    }
    let all = scan(&mut admin, &format!("{}*", glob_escape(&base))).await;
    let slots: HashSet<u16> = all.iter().map(|k| key_slot(k)).collect();
    assert_eq!(slots.len(), 1, "every key of a prefix is in one hash slot");
    assert_eq!(
        slots.into_iter().next(),
        Some(key_slot(store.prefix().as_bytes()))
    );

    // Another prefix sees none of it.
    assert!(elsewhere.get_instance(&id).await.expect("get").is_none());
    assert!(elsewhere
        .list_instances(ListFilter::default())
        .await
        .expect("list")
        .is_empty());
    let mut req = req.clone();
    req.owner = format!("{owner}-2");
    assert!(elsewhere
        .claim(&req)
        .await
        .expect("claim")
        .claimed
        .is_empty());
    assert!(matches!(
        elsewhere.send_signal(&id, "x", vec![]).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        elsewhere.load_history(&id).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(elsewhere
        .renew_leases(&owner, std::slice::from_ref(&id), Duration::from_secs(60))
        .await
        .expect("renew")
        .is_empty());
    // And its own keys are apart.
    let other_base = format!("{{{}}}:", elsewhere.prefix());
    elsewhere
        .create_instance(new_instance("elsewhere"))
        .await
        .expect("create");
    let theirs = scan(&mut admin, &format!("{}*", glob_escape(&other_base))).await;
    assert!(!theirs.is_empty());
    assert!(theirs.iter().all(|k| !all.contains(k)));
}

#[tokio::test]
async fn test_keys_are_deleted_with_the_store() {
    let store = store_or_skip!();
    let pattern = format!("{}*", glob_escape(&format!("{{{}}}:", store.prefix())));
    started(&store, "cleanup").await;
    let mut admin = admin().await;
    assert!(!scan(&mut admin, &pattern).await.is_empty());
    let clone = store.clone();
    drop(store);
    assert!(
        !scan(&mut admin, &pattern).await.is_empty(),
        "a clone keeps the keys"
    );
    drop(clone);
    assert!(scan(&mut admin, &pattern).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_its_connections_are_killed() {
    let store = store_or_skip!();
    let mut admin = admin().await;
    let name = format!("fluxo-test-{}", uuid::Uuid::new_v4().simple());
    let mut conn = store.inner.conn.clone();
    ::redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(&name)
        .query_async::<()>(&mut conn)
        .await
        .expect("name the store's connection");
    let ids = clients_named(&mut admin, &name).await;
    assert_eq!(ids.len(), 1, "one command connection per store: {ids:?}");
    let killed: u64 = ::redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(ids[0])
        .arg("TYPE")
        .arg("normal")
        .query_async(&mut admin)
        .await
        .expect("client kill");
    assert_eq!(killed, 1);

    // The next operation may fail once; then everything works again.
    let wf = uuid::Uuid::new_v4().to_string();
    let mut failures = 0;
    loop {
        match store.create_instance(new_instance(&wf)).await {
            Ok(CreateOutcome::Created) => break,
            Err(StoreError::Backend(e)) if failures == 0 => {
                failures += 1;
                eprintln!("first call after the kill failed as expected: {e}");
            }
            other => panic!("expected the store to recover, got {other:?}"),
        }
    }
    let c = started(&store, &format!("{wf}-after")).await;
    assert_eq!(
        store
            .commit(commit(
                &c,
                vec![event(0)],
                Transition::Complete { output: vec![1] }
            ))
            .await
            .expect("commit"),
        CommitOutcome::Applied {
            cancel_requested: false
        }
    );
    assert_eq!(
        store.load_history(&c.record.id).await.expect("history"),
        vec![event(0)]
    );

    // The notification subscriber comes back too, and says so.
    let mut rx = store.work_notifications().expect("notifications");
    until_subscribed(&store, &mut rx).await;
    let notify_name = notifier_name(store.prefix());
    let ids = clients_named(&mut admin, &notify_name).await;
    assert_eq!(ids.len(), 1, "one subscriber per store: {ids:?}");
    kill_client(&mut admin, ids[0]).await;
    notified(&mut rx, "the subscriber reconnected").await;
    let other = second_store(&store).await;
    // The bump after reconnecting may come before the subscription is
    // live again only if the subscriber is wrong; a creation must be heard.
    until_subscribed(&store, &mut rx).await;
    other
        .create_instance(new_instance(&wf))
        .await
        .expect("create");
    notified(&mut rx, "a creation after the reconnect").await;
    let ids = clients_named(&mut admin, &notify_name).await;
    assert_eq!(ids.len(), 1, "still one subscriber: {ids:?}");
}

#[tokio::test]
async fn batches_are_pipelined_and_survive_a_script_flush() {
    let store = store_or_skip!();
    let a = started(&store, "flush-a").await;
    let b = started(&store, "flush-b").await;
    let mut admin = admin().await;
    // As after a restart of Redis: the server forgot the scripts.
    ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut admin)
        .await
        .expect("script flush");
    let results = store
        .commit_batch(vec![
            commit(&a, vec![event(0)], Transition::None),
            commit(&b, vec![event(0)], Transition::None),
            commit(&a, vec![event(1)], Transition::Complete { output: vec![] }),
            commit(&b, vec![event(3)], Transition::None),
        ])
        .await;
    assert!(
        matches!(results[0], Ok(CommitOutcome::Applied { .. })),
        "{results:?}"
    );
    assert!(
        matches!(results[1], Ok(CommitOutcome::Applied { .. })),
        "{results:?}"
    );
    assert!(
        matches!(results[2], Ok(CommitOutcome::Applied { .. })),
        "{results:?}"
    );
    assert!(
        matches!(results[3], Err(StoreError::Conflict(_))),
        "{results:?}"
    );
    assert_eq!(
        store.load_history(&a.record.id).await.expect("history"),
        vec![event(0), event(1)]
    );
    ::redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async::<()>(&mut admin)
        .await
        .expect("script flush");
    assert_eq!(
        store
            .commit(commit(&b, vec![event(1)], Transition::Release))
            .await
            .expect("a single commit loads its script again"),
        CommitOutcome::Applied {
            cancel_requested: false
        }
    );
}

#[tokio::test]
async fn undecodable_data_is_corrupt() {
    let store = store_or_skip!();
    let c = started(&store, "corrupt").await;
    let mut admin = admin().await;
    let key = store.key("i", &c.record.id);
    ::redis::cmd("HSET")
        .arg(&key)
        .arg("st")
        .arg("sleeping")
        .query_async::<()>(&mut admin)
        .await
        .expect("hset");
    assert!(matches!(
        store.get_instance(&c.record.id).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.list_instances(ListFilter::default()).await,
        Err(StoreError::Corrupt(_))
    ));
    ::redis::cmd("HSET")
        .arg(&key)
        .arg("st")
        .arg("running")
        .arg("ver")
        .arg("-1")
        .query_async::<()>(&mut admin)
        .await
        .expect("hset");
    assert!(matches!(
        store.get_instance(&c.record.id).await,
        Err(StoreError::Corrupt(_))
    ));
    let history = store.key("h", &c.record.id);
    ::redis::cmd("RPUSH")
        .arg(&history)
        .arg("short")
        .query_async::<()>(&mut admin)
        .await
        .expect("rpush");
    assert!(matches!(
        store.load_history(&c.record.id).await,
        Err(StoreError::Corrupt(_))
    ));
    ::redis::cmd("DEL")
        .arg(&history)
        .query_async::<()>(&mut admin)
        .await
        .expect("del");
    ::redis::cmd("SET")
        .arg(&history)
        .arg("not a list")
        .query_async::<()>(&mut admin)
        .await
        .expect("set");
    let r = store.load_history(&c.record.id).await;
    assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");
    // A refused commit wrote nothing, even with a broken journal key.
    let before: Vec<(Vec<u8>, Vec<u8>)> = ::redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .expect("hgetall");
    let mut bad = commit(&c, vec![event(0)], Transition::Complete { output: vec![] });
    bad.new_instances = vec![new_instance("corrupt-child")];
    let child = bad.new_instances[0].id.clone();
    assert!(matches!(
        store.commit(bad).await,
        Err(StoreError::Corrupt(_))
    ));
    let after: Vec<(Vec<u8>, Vec<u8>)> = ::redis::cmd("HGETALL")
        .arg(&key)
        .query_async(&mut admin)
        .await
        .expect("hgetall");
    assert_eq!(before, after);
    assert!(store.get_instance(&child).await.expect("get").is_none());
}

/// Keys of the wrong type anywhere a change would write make it refuse
/// before its first write, instead of failing half-way.
#[tokio::test]
async fn foreign_keys_refuse_a_change_before_it_writes() {
    let store = store_or_skip!();
    let mut admin = admin().await;
    let writer = admin.clone();
    let set = |key: String| {
        let mut admin = writer.clone();
        async move {
            ::redis::cmd("SET")
                .arg(key)
                .arg("foreign")
                .query_async::<()>(&mut admin)
                .await
                .expect("set");
        }
    };
    let c = started(&store, "foreign").await;
    let id = c.record.id.clone();

    // A commit cancelling an instance whose key is not a hash.
    let victim = uuid::Uuid::new_v4().to_string();
    set(store.key("i", &victim)).await;
    let mut bad = commit(&c, vec![event(0)], Transition::Complete { output: vec![] });
    bad.new_instances = vec![new_instance("foreign-child")];
    bad.cancel_instances = vec![victim.clone()];
    let child = bad.new_instances[0].id.clone();
    let r = store.commit(bad).await;
    assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");
    assert!(store.load_history(&id).await.expect("history").is_empty());
    assert_eq!(
        store
            .get_instance(&id)
            .await
            .expect("get")
            .expect("exists")
            .status,
        InstanceStatus::Running
    );
    assert!(store.get_instance(&child).await.expect("get").is_none());

    // A signal whose inbox key is not a sorted set.
    let (_, before) = store.next_signal(&id, "x").await.expect("next_signal");
    set(store.key("s", &id)).await;
    let r = store.send_signal(&id, "x", vec![]).await;
    assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");
    ::redis::cmd("DEL")
        .arg(store.key("s", &id))
        .query_async::<()>(&mut admin)
        .await
        .expect("del");
    let (none, after) = store.next_signal(&id, "x").await.expect("next_signal");
    assert!(none.is_none());
    assert_eq!(before, after, "the refused signal did not move the inbox");

    // A claim whose owner set is not a set.
    let wf = uuid::Uuid::new_v4().to_string();
    let created = new_instance(&wf);
    let created_id = created.id.clone();
    store.create_instance(created).await.expect("create");
    let req = claim_request(&wf, 10, Duration::from_secs(60));
    set(store.key("owner", &req.owner)).await;
    let r = store.claim(&req).await;
    assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");
    let mut other = claim_request(&wf, 10, Duration::from_secs(60));
    other.owner = format!("{}-2", req.owner);
    let batch = store.claim(&other).await.expect("claim");
    assert_eq!(batch.claimed.len(), 1, "the refused claim took nothing");
    assert_eq!(batch.claimed[0].record.id, created_id);
    assert_eq!(batch.claimed[0].lease_token, 1);

    // A creation whose listing index is not a sorted set.
    let wf = uuid::Uuid::new_v4().to_string();
    set(store.key("wf", &wf)).await;
    let new = new_instance(&wf);
    let new_id = new.id.clone();
    let r = store.create_instance(new).await;
    assert!(matches!(r, Err(StoreError::Corrupt(_))), "{r:?}");
    assert!(store.get_instance(&new_id).await.expect("get").is_none());
}

#[tokio::test]
async fn invalid_prefixes_are_refused() {
    for prefix in ["", "a{b", "a}b"] {
        match RedisStore::connect_with(RedisOptions::new(test_url()).prefix(prefix)).await {
            Err(StoreError::Backend(e)) => assert!(e.to_string().contains("prefix"), "{e}"),
            other => panic!("prefix {prefix:?} must be refused, got {other:?}"),
        }
    }
    let store = store_or_skip!();
    assert_eq!(store.backend_name(), "redis");
    assert!(format!("{store:?}").contains(store.prefix()));
    assert_eq!(store.channel(), format!("{}:work", store.prefix()));
}

#[test]
fn events_round_trip_their_encoding() {
    let e = StoredEvent {
        event_id: 7,
        seq: u64::MAX,
        kind: "kind:with{braces}".into(),
        data: vec![0, 255, 10, 13],
    };
    assert_eq!(decode_event(7, &encode_event(&e)).expect("decode"), e);
    assert!(matches!(
        decode_event(8, &encode_event(&e)),
        Err(StoreError::Corrupt(_))
    ));
    let raw = encode_event(&e);
    assert!(matches!(
        decode_event(7, &raw[..raw.len() - 5]),
        Err(StoreError::Corrupt(_))
    ));
    assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
    // The CRC16 check value of the XMODEM variant.
    assert_eq!(key_slot(b"123456789"), 0x31C3);
}

/// Measures commits against the test server; run with
/// `cargo test -p fluxo-runtime --features redis --lib store::redis -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn commit_latency_report() {
    let store = store_or_skip!();
    let c = started(&store, "latency").await;
    let data = vec![7u8; 200];
    let n = 5_000u64;
    let mut times = Vec::with_capacity(n as usize);
    for i in 0..n {
        let e = StoredEvent {
            event_id: i,
            seq: i,
            kind: "step_completed".into(),
            data: data.clone(),
        };
        let start = Instant::now();
        let outcome = store
            .commit(commit(&c, vec![e], Transition::None))
            .await
            .expect("commit");
        times.push(start.elapsed());
        assert!(matches!(outcome, CommitOutcome::Applied { .. }));
    }
    times.sort();
    let mean = times.iter().sum::<Duration>() / n as u32;
    println!(
        "single commit, one 200-byte event, sequential x{n}: mean {mean:?}, p50 {:?}, p99 {:?}, max {:?}",
        times[times.len() / 2],
        times[times.len() * 99 / 100],
        times[times.len() - 1]
    );

    // Many instances committing at once: concurrent single commits on the
    // multiplexed connection against one pipelined batch per round.
    let instances = 64usize;
    let rounds = 50u64;
    let mut claimed = Vec::new();
    for _ in 0..instances {
        store
            .create_instance(new_instance("latency-many"))
            .await
            .expect("create");
    }
    let batch = store
        .claim(&claim_request(
            "latency-many",
            instances,
            Duration::from_secs(600),
        ))
        .await
        .expect("claim");
    claimed.extend(batch.claimed);
    assert_eq!(claimed.len(), instances);
    let start = Instant::now();
    for round in 0..rounds {
        let commits = claimed.iter().map(|c| {
            let store = store.clone();
            let cm = commit(
                c,
                vec![StoredEvent {
                    event_id: round,
                    seq: round,
                    kind: "k".into(),
                    data: data.clone(),
                }],
                Transition::None,
            );
            async move { store.commit(cm).await.expect("commit") }
        });
        futures::future::join_all(commits).await;
    }
    let concurrent = start.elapsed();
    let start = Instant::now();
    for round in rounds..2 * rounds {
        let commits = claimed
            .iter()
            .map(|c| {
                commit(
                    c,
                    vec![StoredEvent {
                        event_id: round,
                        seq: round,
                        kind: "k".into(),
                        data: data.clone(),
                    }],
                    Transition::None,
                )
            })
            .collect();
        for r in store.commit_batch(commits).await {
            assert!(matches!(r, Ok(CommitOutcome::Applied { .. })), "{r:?}");
        }
    }
    let batched = start.elapsed();
    let total = instances as u32 * rounds as u32;
    println!(
        "{total} commits from {instances} instances: concurrent single commits {:?} per commit, \
         pipelined batches of {instances} {:?} per commit",
        concurrent / total,
        batched / total
    );
}
