use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::*;
use crate::store::conformance;
use crate::store::test_fixtures::{claim_request, commit, event, new_instance};

mod conformance_suite {
    crate::store_conformance_tests!(optional: async {
        super::super::test_store_from_env().await.map(Box::new)
    });
}

/// The server the tests use.
fn test_url() -> String {
    std::env::var("FLUXO_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.to_owned())
}

/// Another store (its own pool) on the schema of `store`.
async fn second_store(store: &PostgresStore, application_name: &str) -> PostgresStore {
    PostgresStore::connect_with(
        PostgresOptions::new(test_url())
            .schema(store.schema())
            .application_name(application_name)
            .max_connections(4),
    )
    .await
    .expect("open a second store on the same schema")
}

async fn started(store: &PostgresStore, workflow: &str) -> ClaimedInstance {
    store
        .create_instance(new_instance(workflow))
        .await
        .expect("create");
    let mut batch = store
        .claim(&claim_request(workflow, 10, Duration::from_secs(600)))
        .await
        .expect("claim");
    assert_eq!(batch.claimed.len(), 1);
    batch.claimed.remove(0)
}

async fn raw(store: &PostgresStore, sql: &str) {
    sqlx::raw_sql(sql)
        .execute(store.pool())
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// Waits for the next bump of a notification counter.
async fn notified(rx: &mut tokio::sync::watch::Receiver<u64>, within: Duration) -> bool {
    matches!(tokio::time::timeout(within, rx.changed()).await, Ok(Ok(())))
}

#[tokio::test]
async fn whole_suite_on_one_shared_schema() {
    let Some(store) = test_store_from_env().await else {
        return;
    };
    conformance::run_all(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_schema_never_share_an_instance() {
    let Some(a) = test_store_from_env().await else {
        return;
    };
    let b = second_store(&a, &format!("{}_b", a.schema())).await;
    tokio::join!(conformance::run_all(&a), conformance::run_all(&b));

    // Many claimers on both pools at once: every instance is handed out once.
    let wf = uuid::Uuid::new_v4().to_string();
    for _ in 0..120 {
        a.create_instance(new_instance(&wf)).await.expect("create");
    }
    let mut claimers = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let wf = wf.clone();
        claimers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let batch = store
                    .claim(&claim_request(&wf, 7, Duration::from_secs(600)))
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
            assert!(seen.insert(id.clone()), "{id} claimed twice");
        }
    }
    assert_eq!(seen.len(), 120);

    // Leases that expire at once: instances are claimed again and again, but
    // a lease (instance, token) is never handed out twice and only the
    // newest holder can write.
    let wf = uuid::Uuid::new_v4().to_string();
    for _ in 0..10 {
        a.create_instance(new_instance(&wf)).await.expect("create");
    }
    let mut claimers = Vec::new();
    for i in 0..6 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let wf = wf.clone();
        claimers.push(tokio::spawn(async move {
            let mut leases = Vec::new();
            for _ in 0..25 {
                let batch = store
                    .claim(&claim_request(&wf, 3, Duration::ZERO))
                    .await
                    .expect("claim");
                leases.extend(
                    batch
                        .claimed
                        .into_iter()
                        .map(|c| (c.record.id, c.lease_token)),
                );
            }
            leases
        }));
    }
    let mut leases: HashMap<String, Vec<u64>> = HashMap::new();
    for claimer in claimers {
        for (id, token) in claimer.await.expect("claimer") {
            leases.entry(id).or_default().push(token);
        }
    }
    for (id, mut tokens) in leases {
        let n = tokens.len();
        tokens.sort_unstable();
        tokens.dedup();
        assert_eq!(tokens.len(), n, "a lease of {id} was handed out twice");
        let newest = *tokens.last().expect("claimed");
        for token in tokens {
            let c = Commit {
                instance_id: id.as_str().into(),
                lease_token: token,
                ..Commit::default()
            };
            let outcome = b.commit(c).await.expect("commit");
            if token == newest {
                assert!(matches!(outcome, CommitOutcome::Applied { .. }));
            } else {
                assert_eq!(
                    outcome,
                    CommitOutcome::LeaseLost,
                    "old token {token} of {id}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_park_racing_a_signal_never_loses_the_wake_up() {
    let Some(store) = test_store_from_env().await else {
        return;
    };
    let wf = uuid::Uuid::new_v4().to_string();
    for round in 0..40 {
        let c = started(&store, &wf).await;
        let (_, seen) = store.next_signal(&c.record.id, "go").await.expect("next");
        let park = commit(
            &c,
            vec![event(0)],
            Transition::Park {
                wake_at: None,
                seen_inbox: seen,
            },
        );
        let signal = {
            let store = store.clone();
            let id = c.record.id.clone();
            tokio::spawn(async move { store.send_signal(&id, "go", vec![]).await })
        };
        let parked = store.commit(park).await.expect("park");
        signal.await.expect("task").expect("signal");
        let batch = store
            .claim(&claim_request(&wf, 10, Duration::from_secs(600)))
            .await
            .expect("claim");
        match parked {
            CommitOutcome::Applied { .. } => assert_eq!(
                batch.claimed.len(),
                1,
                "round {round}: parked, then the signal must make it runnable"
            ),
            CommitOutcome::InboxChanged { inbox_seq, .. } => {
                assert_eq!(inbox_seq, seen + 1);
                assert!(batch.claimed.is_empty(), "round {round}: the lease is kept");
                let done = commit(&c, vec![], Transition::Complete { output: vec![] });
                store.commit(done).await.expect("complete");
            }
            CommitOutcome::LeaseLost => panic!("round {round}: the lease was lost"),
        }
        if let Some(again) = batch.claimed.first() {
            let done = commit(again, vec![], Transition::Complete { output: vec![] });
            store.commit(done).await.expect("complete");
        }
    }
}

#[tokio::test]
async fn work_notifications_come_from_other_stores() {
    let Some(a) = test_store_from_env().await else {
        return;
    };
    let b = second_store(&a, &format!("{}_b", a.schema())).await;
    let mut rx = a.work_notifications().expect("notifications");
    assert!(
        notified(&mut rx, Duration::from_secs(30)).await,
        "the listener reports that it is connected"
    );
    let mut again = a
        .work_notifications()
        .expect("one listener, many receivers");

    let wf = "notified";
    match b.create_instance(new_instance(wf)).await.expect("create") {
        CreateOutcome::Created => {}
        other => panic!("{other:?}"),
    }
    assert!(
        notified(&mut rx, Duration::from_secs(5)).await,
        "a new instance"
    );
    assert!(
        notified(&mut again, Duration::from_secs(5)).await,
        "every receiver"
    );
    let c = b
        .claim(&claim_request(wf, 10, Duration::from_secs(600)))
        .await
        .expect("claim")
        .claimed
        .remove(0);
    let park = commit(
        &c,
        vec![],
        Transition::Park {
            wake_at: None,
            seen_inbox: c.inbox_seq,
        },
    );
    b.commit(park).await.expect("park");
    rx.mark_unchanged();
    b.send_signal(&c.record.id, "go", vec![])
        .await
        .expect("signal");
    assert!(notified(&mut rx, Duration::from_secs(5)).await, "a signal");
    b.request_cancel(&c.record.id).await.expect("cancel");
    assert!(
        notified(&mut rx, Duration::from_secs(5)).await,
        "a cancel request"
    );
    let c = b
        .claim(&claim_request(wf, 10, Duration::from_secs(600)))
        .await
        .expect("claim")
        .claimed
        .remove(0);
    // A plain step commit makes nothing runnable: no notification.
    b.commit(commit(&c, vec![event(0)], Transition::None))
        .await
        .expect("commit");
    assert!(
        !notified(&mut rx, Duration::from_millis(300)).await,
        "a step commit notifies nobody"
    );
    b.commit(commit(&c, vec![], Transition::Release))
        .await
        .expect("release");
    assert!(notified(&mut rx, Duration::from_secs(5)).await, "a release");

    // The listener stops with the last clone of the store.
    drop(again);
    drop(a);
    tokio::time::timeout(Duration::from_secs(5), async {
        while rx.changed().await.is_ok() {}
    })
    .await
    .expect("the listener stops when the store is dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_from_terminated_connections() {
    let Some(store) = test_store_from_env().await else {
        return;
    };
    let other = second_store(&store, &format!("{}_other", store.schema())).await;
    let mut rx = store.work_notifications().expect("notifications");
    assert!(notified(&mut rx, Duration::from_secs(30)).await);
    let wf = "terminated";
    let c = started(&store, wf).await;
    // Open the commit connection, and fill the pool with idle connections.
    let first = commit(&c, vec![event(0)], Transition::None);
    assert!(matches!(
        store.commit(first).await,
        Ok(CommitOutcome::Applied { .. })
    ));
    futures::future::join_all((0..4).map(|_| store.get_instance(&c.record.id))).await;

    let mut admin = PgConnection::connect(&test_url()).await.expect("connect");
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid() \
           AND application_name = $1",
    )
    .bind(store.schema())
    .fetch_all(&mut admin)
    .await
    .expect("terminate");
    assert!(
        killed.len() >= 2,
        "the pool and the listener were connected"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut errors = 0;
    let mut events = 1;
    for _ in 0..10 {
        let next = commit(&c, vec![event(events)], Transition::None);
        match store.commit(next).await {
            Ok(outcome) => {
                assert!(matches!(outcome, CommitOutcome::Applied { .. }));
                events += 1;
            }
            Err(StoreError::Backend(e)) => {
                errors += 1;
                eprintln!("expected after the connections were ended: {e}");
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(
        errors <= 1,
        "{errors} failures: dead connections were reused"
    );
    assert_eq!(
        store
            .load_history(&c.record.id)
            .await
            .expect("history")
            .len() as u64,
        events
    );
    // The listener reconnected and says so, then hears the others again.
    assert!(
        notified(&mut rx, Duration::from_secs(15)).await,
        "the listener reconnects"
    );
    rx.mark_unchanged();
    other
        .create_instance(new_instance("after-reconnect"))
        .await
        .expect("create");
    assert!(
        notified(&mut rx, Duration::from_secs(5)).await,
        "notifications arrive after reconnecting"
    );
}

#[tokio::test]
async fn schemas_are_isolated() {
    let (Some(a), Some(b)) = (test_store_from_env().await, test_store_from_env().await) else {
        return;
    };
    assert_ne!(a.schema(), b.schema());
    let mut rx_b = b.work_notifications().expect("notifications");
    assert!(notified(&mut rx_b, Duration::from_secs(10)).await);
    let wf = "isolated";
    let new = new_instance(wf);
    let id = new.id.clone();
    a.create_instance(new).await.expect("create");
    assert!(b.get_instance(&id).await.expect("get").is_none());
    assert!(b
        .list_instances(ListFilter::default())
        .await
        .expect("list")
        .is_empty());
    let batch = b
        .claim(&claim_request(wf, 10, Duration::from_secs(600)))
        .await
        .expect("claim");
    assert!(batch.claimed.is_empty());
    assert!(matches!(
        b.send_signal(&id, "x", vec![]).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(
        !notified(&mut rx_b, Duration::from_millis(300)).await,
        "another schema's work is not announced"
    );
    // The same id can live in both.
    let mut same = new_instance("other");
    same.id = id.clone();
    assert!(matches!(
        b.create_instance(same).await,
        Ok(CreateOutcome::Created)
    ));
    assert_eq!(
        a.get_instance(&id).await.expect("get").expect("a").workflow,
        wf
    );
}

#[tokio::test]
async fn commit_batch_isolates_failing_commits() {
    let Some(db) = test_store_from_env().await else {
        return;
    };
    let wf = "batch";
    let a = started(&db, wf).await;
    let b = started(&db, wf).await;
    let c = started(&db, wf).await;
    let d = started(&db, wf).await;
    let e = started(&db, wf).await;
    // A journal row the instance's counter does not know about: the insert
    // of b's commit fails with a unique violation.
    raw(
        &db,
        &format!(
            "INSERT INTO \"{}\".history VALUES ('{}', 1, 1, 'stray', '\\x00', 0)",
            db.schema(),
            b.record.id
        ),
    )
    .await;
    let stale = ClaimedInstance {
        lease_token: e.lease_token - 1,
        ..e.clone()
    };
    let complete =
        |c: &ClaimedInstance, events| commit(c, events, Transition::Complete { output: vec![1] });
    // A kind Postgres text cannot hold: that statement fails.
    let mut nul = event(0);
    nul.kind = "bad\0kind".into();
    let results = db
        .commit_batch(vec![
            complete(&a, vec![event(0)]),
            complete(&b, vec![event(0), event(1)]),
            complete(&stale, vec![event(0)]),
            complete(&c, vec![nul]),
            complete(&d, vec![event(0)]),
        ])
        .await;
    assert!(
        matches!(results[0], Ok(CommitOutcome::Applied { .. })),
        "{:?}",
        results[0]
    );
    assert!(
        matches!(results[1], Err(StoreError::Conflict(_))),
        "{:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Ok(CommitOutcome::LeaseLost)),
        "{:?}",
        results[2]
    );
    assert!(
        matches!(results[3], Err(StoreError::Backend(_))),
        "{:?}",
        results[3]
    );
    assert!(
        matches!(results[4], Ok(CommitOutcome::Applied { .. })),
        "{:?}",
        results[4]
    );
    for (claimed, status, journal) in [
        (&a, InstanceStatus::Completed, 1),
        (&b, InstanceStatus::Running, 1),
        (&c, InstanceStatus::Running, 0),
        (&d, InstanceStatus::Completed, 1),
        (&e, InstanceStatus::Running, 0),
    ] {
        let id = &claimed.record.id;
        let r = db.get_instance(id).await.expect("get").expect("exists");
        assert_eq!(r.status, status, "{id}");
        assert_eq!(db.load_history(id).await.expect("history").len(), journal);
    }
    assert_eq!(
        db.inner.group_fallbacks.load(Ordering::Relaxed),
        1,
        "the group statement failed, then the commits were written one by one"
    );
    // The failed commits kept their leases.
    let again = db
        .commit(commit(&c, vec![event(0)], Transition::None))
        .await
        .expect("commit");
    assert!(matches!(again, CommitOutcome::Applied { .. }));
}

#[tokio::test]
async fn concurrent_openers_migrate_once() {
    let Some(first) = test_store_from_env().await else {
        return;
    };
    // A fresh schema opened by several stores at once.
    let schema = format!("{}_m", first.schema());
    let open = || {
        PostgresStore::connect_with(
            PostgresOptions::new(test_url())
                .schema(schema.clone())
                .application_name(first.schema())
                .max_connections(1),
        )
    };
    let stores = futures::future::join_all((0..4).map(|_| open())).await;
    let stores: Vec<PostgresStore> = stores
        .into_iter()
        .map(|s| s.expect("every opener succeeds"))
        .collect();
    let versions: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT version FROM \"{schema}\".fluxo_migrations ORDER BY version"
    ))
    .fetch_all(first.pool())
    .await
    .expect("migrations");
    assert_eq!(versions, vec![1]);
    stores[0]
        .create_instance(new_instance("migrated"))
        .await
        .expect("the schema works");
    drop(stores);
    raw(&first, &format!("DROP SCHEMA \"{schema}\" CASCADE")).await;
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let Some(store) = test_store_from_env().await else {
        return;
    };
    raw(
        &store,
        &format!(
            "INSERT INTO \"{}\".fluxo_migrations (version, description) VALUES (99, 'future')",
            store.schema()
        ),
    )
    .await;
    let reopened = PostgresStore::from_pool(
        store.pool().clone(),
        PostgresOptions::new("unused").schema(store.schema()),
    )
    .await;
    match reopened {
        Err(StoreError::Corrupt(message)) => assert!(message.contains("99"), "{message}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn invalid_options_are_refused() {
    let long = "x".repeat(59);
    for schema in [
        "",
        "Upper",
        "1abc",
        "a-b",
        "a b",
        "pg_mine",
        "a\"b",
        long.as_str(),
    ] {
        let options = PostgresOptions::new(test_url()).schema(schema);
        match PostgresStore::connect_with(options).await {
            Err(StoreError::Backend(e)) => assert!(e.to_string().contains("schema"), "{e}"),
            other => panic!("schema {schema:?} must be refused, got {other:?}"),
        }
    }
    assert!(validate_schema("fluxo_2").is_ok());
    assert!(validate_schema("_x").is_ok());
    assert!(validate_schema(&"x".repeat(58)).is_ok());
    match PostgresStore::connect("not a url").await {
        Err(StoreError::Backend(e)) => assert!(e.to_string().contains("URL"), "{e}"),
        other => panic!("expected a refused URL, got {other:?}"),
    }
}

#[tokio::test]
async fn undecodable_rows_are_corrupt() {
    let Some(db) = test_store_from_env().await else {
        return;
    };
    let c = started(&db, "corrupt").await;
    let table = format!("\"{}\".instances", db.schema());
    raw(
        &db,
        &format!(
            "UPDATE {table} SET status = 'sleeping' WHERE id = '{}'",
            c.record.id
        ),
    )
    .await;
    match db.get_instance(&c.record.id).await {
        Err(StoreError::Corrupt(_)) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    raw(
        &db,
        &format!(
            "UPDATE {table} SET status = 'running', version = -1 WHERE id = '{}'",
            c.record.id
        ),
    )
    .await;
    match db.list_instances(ListFilter::default()).await {
        Err(StoreError::Corrupt(_)) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn server_clock_sets_times() {
    let Some(db) = test_store_from_env().await else {
        return;
    };
    let server: i64 = sqlx::query_scalar(&format!("SELECT {}", sql::NOW))
        .fetch_one(db.pool())
        .await
        .expect("now");
    let c = started(&db, "clock").await;
    assert!((c.record.created_at - server).abs() < 5_000);
    let expires: i64 = sqlx::query_scalar(&format!(
        "SELECT lease_expires_at FROM \"{}\".instances WHERE id = $1",
        db.schema()
    ))
    .bind(c.record.id.as_str())
    .fetch_one(db.pool())
    .await
    .expect("lease");
    let lease = expires - c.record.created_at;
    assert!(
        (599_000..=605_000).contains(&lease),
        "a 600 s lease ends 600 s after the claim by the server's clock, got {lease} ms"
    );
}

/// Commit latency and throughput against the test server. Run with
/// `cargo test --release -p fluxo-runtime --features postgres --lib
/// store::postgres::tests::measure -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn measure_commit_latency() {
    let Some(db) = test_store_from_env().await else {
        return;
    };
    for synchronous in [true, false] {
        let store = PostgresStore::connect_with(
            PostgresOptions::new(test_url())
                .schema(db.schema())
                .application_name(db.schema())
                .synchronous_commit(synchronous),
        )
        .await
        .expect("open");
        let c = started(&store, "measure").await;
        let n = 2_000u64;
        let mut times = Vec::with_capacity(n as usize);
        for i in 0..n {
            let started = Instant::now();
            let outcome = store
                .commit(commit(&c, vec![event(i)], Transition::None))
                .await
                .expect("commit");
            times.push(started.elapsed());
            assert!(matches!(outcome, CommitOutcome::Applied { .. }));
        }
        times.sort();
        let mean = times.iter().sum::<Duration>() / n as u32;
        println!(
            "synchronous_commit={}: sequential commit of one event: mean {:?}, p50 {:?}, p99 {:?}",
            if synchronous { "on" } else { "off" },
            mean,
            times[times.len() / 2],
            times[times.len() * 99 / 100],
        );

        // Group commit: 64 instances, batches of 64 one-event commits.
        let wf = format!("measure-batch-{synchronous}");
        let mut claimed = Vec::new();
        for _ in 0..64 {
            claimed.push(started(&store, &wf).await);
        }
        let rounds = 100u64;
        let begin = Instant::now();
        for round in 0..rounds {
            let batch = claimed
                .iter()
                .map(|c| commit(c, vec![event(round)], Transition::None))
                .collect();
            for r in store.commit_batch(batch).await {
                assert!(matches!(r, Ok(CommitOutcome::Applied { .. })), "{r:?}");
            }
        }
        let elapsed = begin.elapsed();
        println!(
            "synchronous_commit={}: group commit: {:.0} commits/s ({:?} per batch of 64)",
            if synchronous { "on" } else { "off" },
            (rounds * 64) as f64 / elapsed.as_secs_f64(),
            elapsed / rounds as u32,
        );
    }
}

/// A group of commits of every kind, each to its own instance (so that the
/// group fits one statement), described by what it did: the result of each
/// commit and the state of each instance after.
async fn mixed_group(store: &dyn Store) -> Vec<String> {
    let prefix = uuid::Uuid::new_v4().simple().to_string();
    let wf = |name: &str| format!("{prefix}-{name}");
    let lease = Duration::from_secs(600);
    let claim = |name: &'static str| {
        let workflow = wf(name);
        async move {
            let mut batch = store
                .claim(&claim_request(&workflow, 10, lease))
                .await
                .expect("claim");
            assert_eq!(batch.claimed.len(), 1, "{name}");
            batch.claimed.remove(0)
        }
    };
    let mut ids = Vec::new();
    for name in [
        "parent", "steps", "park", "moved", "release", "child", "fail", "consume", "stale", "gap",
        "due",
    ] {
        let mut new = new_instance(&wf(name));
        new.id = format!("{prefix}-{name}-id");
        if name == "child" {
            new.parent_id = Some(format!("{prefix}-parent-id"));
        }
        store.create_instance(new).await.expect("create");
        ids.push((name, format!("{prefix}-{name}-id")));
    }
    let parent = claim("parent").await;
    let park_parent = commit(
        &parent,
        vec![event(0)],
        Transition::Park {
            wake_at: None,
            seen_inbox: parent.inbox_seq,
        },
    );
    store.commit(park_parent).await.expect("park parent");
    let steps = claim("steps").await;
    let park = claim("park").await;
    let moved = claim("moved").await;
    store
        .send_signal(&moved.record.id, "late", vec![1])
        .await
        .expect("signal");
    let release = claim("release").await;
    let child = claim("child").await;
    let fail = claim("fail").await;
    store
        .send_signal(&fail.record.id, "pending", vec![2])
        .await
        .expect("signal");
    store
        .send_signal(&fail.record.id, "pending", vec![3])
        .await
        .expect("signal");
    let consume = claim("consume").await;
    let first = store
        .send_signal(&consume.record.id, "go", b"first".to_vec())
        .await
        .expect("signal");
    store
        .send_signal(&consume.record.id, "go", b"second".to_vec())
        .await
        .expect("signal");
    let stale = claim("stale").await;
    let gap = claim("gap").await;
    let due = claim("due").await;
    let stale = ClaimedInstance {
        lease_token: stale.lease_token + 7,
        ..stale
    };
    let mut consuming = commit(&consume, vec![event(0)], Transition::None);
    consuming.consume_signal = Some(first);
    let results = store
        .commit_batch(vec![
            commit(&steps, vec![event(0), event(1), event(2)], Transition::None),
            commit(
                &park,
                vec![event(0)],
                Transition::Park {
                    wake_at: Some(now_millis() + 3_600_000),
                    seen_inbox: park.inbox_seq,
                },
            ),
            commit(
                &moved,
                vec![],
                Transition::Park {
                    wake_at: None,
                    seen_inbox: moved.inbox_seq,
                },
            ),
            commit(&release, vec![event(0)], Transition::Release),
            commit(
                &child,
                vec![event(0)],
                Transition::Complete {
                    output: b"out".to_vec(),
                },
            ),
            commit(
                &fail,
                vec![],
                Transition::Fail {
                    failure: b"bad".to_vec(),
                },
            ),
            consuming,
            commit(&stale, vec![event(0)], Transition::None),
            commit(&gap, vec![event(3)], Transition::None),
            Commit {
                instance_id: format!("{prefix}-missing-id").into(),
                lease_token: 1,
                ..Commit::default()
            },
            commit(
                &due,
                vec![],
                Transition::Park {
                    wake_at: Some(now_millis() - 1_000),
                    seen_inbox: due.inbox_seq,
                },
            ),
        ])
        .await;
    let mut report: Vec<String> = results
        .iter()
        .map(|r| match r {
            Ok(outcome) => format!("{outcome:?}"),
            Err(StoreError::NotFound(_)) => "NotFound".to_owned(),
            Err(StoreError::Conflict(_)) => "Conflict".to_owned(),
            Err(e) => format!("unexpected error {e}"),
        })
        .collect();
    for (name, id) in &ids {
        let r = store.get_instance(id).await.expect("get").expect("exists");
        let history = store.load_history(id).await.expect("history");
        let (signal, inbox_seq) = store.next_signal(id, "go").await.expect("next");
        let (pending, _) = store.next_signal(id, "pending").await.expect("next");
        let runnable = store
            .claim(&claim_request(&wf(name), 10, lease))
            .await
            .expect("claim")
            .claimed
            .len();
        report.push(format!(
            "{name}: {} output={:?} failure={:?} journal={} inbox_seq={inbox_seq} go={:?} \
             pending={} runnable={runnable}",
            r.status,
            r.output,
            r.failure,
            history.len(),
            signal.map(|s| s.payload),
            pending.is_some(),
        ));
    }
    report
}

#[tokio::test]
async fn group_statement_matches_the_memory_store() {
    let Some(db) = test_store_from_env().await else {
        return;
    };
    let memory = crate::store::memory::MemoryStore::new();
    let expected = mixed_group(&memory).await;
    let got = mixed_group(&db).await;
    assert_eq!(got, expected);
    assert_eq!(
        db.inner.group_fallbacks.load(Ordering::Relaxed),
        0,
        "the group was written by the one statement"
    );
}

#[tokio::test]
async fn a_parent_in_the_group_of_its_finishing_child_is_woken() {
    let Some(db) = test_store_from_env().await else {
        return;
    };
    let wf = uuid::Uuid::new_v4().to_string();
    let child_wf = format!("{wf}-child");
    let parent = started(&db, &wf).await;
    let mut child = new_instance(&child_wf);
    child.parent_id = Some(parent.record.id.clone());
    let mut spawn = commit(&parent, vec![event(0)], Transition::None);
    spawn.new_instances = vec![child];
    db.commit(spawn).await.expect("spawn");
    let child = db
        .claim(&claim_request(&child_wf, 10, Duration::from_secs(600)))
        .await
        .expect("claim")
        .claimed
        .remove(0);
    let (_, seen) = db.next_signal(&parent.record.id, "x").await.expect("next");
    let results = db
        .commit_batch(vec![
            commit(
                &parent,
                vec![event(1)],
                Transition::Park {
                    wake_at: None,
                    seen_inbox: seen,
                },
            ),
            commit(
                &child,
                vec![event(0)],
                Transition::Complete { output: vec![] },
            ),
        ])
        .await;
    assert!(matches!(results[1], Ok(CommitOutcome::Applied { .. })));
    let batch = db
        .claim(&claim_request(&wf, 10, Duration::from_secs(600)))
        .await
        .expect("claim");
    match results[0] {
        Ok(CommitOutcome::Applied { .. }) => {
            assert_eq!(batch.claimed.len(), 1, "the parked parent was woken");
            assert!(batch.claimed[0].inbox_seq > seen);
        }
        Ok(CommitOutcome::InboxChanged { inbox_seq, .. }) => assert!(inbox_seq > seen),
        ref other => panic!("{other:?}"),
    }
}

/// Creates made at the same time are written by one statement.
#[tokio::test]
async fn concurrent_creates_are_written_together() {
    let Some(db) = test_store_from_env().await else {
        return;
    };
    let mut rx = db.work_notifications().expect("notifications");
    // Let the listener start before the creates.
    db.create_instance(new_instance("tp-warm"))
        .await
        .expect("create");
    assert!(notified(&mut rx, Duration::from_secs(5)).await);
    let written = db.inner.creates.counts().written.load(Ordering::Relaxed);
    let news: Vec<NewInstance> = (0..40).map(|_| new_instance("tp-group")).collect();
    let outcomes =
        futures::future::join_all(news.iter().cloned().map(|n| db.create_instance(n))).await;
    for outcome in &outcomes {
        assert!(matches!(outcome, Ok(CreateOutcome::Created)), "{outcome:?}");
    }
    assert_eq!(
        db.inner.creates.counts().written.load(Ordering::Relaxed),
        written + 1,
        "the creates queued together went in one statement"
    );
    assert!(
        notified(&mut rx, Duration::from_secs(5)).await,
        "a group of creates notifies the workers"
    );
    let batch = db
        .claim(&claim_request("tp-group", 100, Duration::from_secs(600)))
        .await
        .expect("claim");
    let claimed: HashSet<&str> = batch.claimed.iter().map(|c| c.record.id.as_str()).collect();
    let created: HashSet<&str> = news.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(claimed, created, "every create of the group is runnable");
}

/// A create Postgres refuses fails alone: the others of its group are
/// written one by one instead.
#[tokio::test]
async fn a_refused_create_fails_alone() {
    let Some(db) = test_store_from_env().await else {
        return;
    };
    let counts = db.inner.creates.counts();
    let (written, refused) = (
        counts.written.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
    );
    let mut news: Vec<NewInstance> = (0..10).map(|_| new_instance("refused")).collect();
    // Postgres text cannot hold a NUL byte: the group statement fails.
    news[4].workflow = "refused\0".to_owned();
    let outcomes =
        futures::future::join_all(news.iter().cloned().map(|n| db.create_instance(n))).await;
    for (i, outcome) in outcomes.iter().enumerate() {
        if i == 4 {
            assert!(outcome.is_err(), "the refused create fails: {outcome:?}");
        } else {
            assert!(
                matches!(outcome, Ok(CreateOutcome::Created)),
                "create {i}: {outcome:?}"
            );
            let r = db.get_instance(&news[i].id).await.expect("get");
            assert!(r.is_some(), "create {i} was written");
        }
    }
    assert_eq!(
        (
            counts.written.load(Ordering::Relaxed),
            counts.refused.load(Ordering::Relaxed)
        ),
        (written, refused + 1),
        "the group statement was tried and refused"
    );
}

/// A group that cannot be written at all (no connection free) fails as a
/// whole after one wait, instead of each create waiting in turn.
#[tokio::test]
async fn creates_without_a_connection_fail_together() {
    let Some(db) = test_store_from_env().await else {
        return;
    };
    let small = PostgresStore::connect_with(
        PostgresOptions::new(test_url())
            .schema(db.schema())
            .max_connections(1)
            .acquire_timeout(Duration::from_millis(300)),
    )
    .await
    .expect("open a store with one connection");
    let held = small.pool().acquire().await.expect("the only connection");
    let started = Instant::now();
    let outcomes = futures::future::join_all(
        (0..5).map(|_| small.create_instance(new_instance("no-connection"))),
    )
    .await;
    let took = started.elapsed();
    drop(held);
    for outcome in &outcomes {
        assert!(
            matches!(outcome, Err(StoreError::Backend(_))),
            "{outcome:?}"
        );
    }
    assert!(
        took < Duration::from_millis(1_200),
        "one wait for the group, not one per create: {took:?}"
    );
    assert_eq!(
        small.inner.creates.counts().refused.load(Ordering::Relaxed),
        0
    );
    assert!(matches!(
        small.create_instance(new_instance("no-connection")).await,
        Ok(CreateOutcome::Created)
    ));
}
