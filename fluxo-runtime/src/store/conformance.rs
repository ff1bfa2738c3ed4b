//! The store conformance suite: the behaviour every [`Store`] backend must
//! show, written against the trait only.
//!
//! Each check is a public async fn that takes the store under test and
//! panics with a message naming the broken rule. Every check works on its
//! own workflow names, instance ids and lease owners, so checks may share one
//! database and run concurrently.
//!
//! A backend runs the whole suite with [`store_conformance_tests!`](crate::store_conformance_tests):
//!
//! ```ignore
//! mod conformance {
//!     fluxo_runtime::store_conformance_tests!(async {
//!         std::sync::Arc::new(fluxo_runtime::store::memory::MemoryStore::new())
//!     });
//! }
//! ```
//!
//! The argument is an expression evaluating to a future whose output
//! dereferences to the store (`Arc<S>`, `Box<S>`, or a guard that cleans up
//! when dropped). It is evaluated once per test. Attributes written before it
//! (such as `#[ignore]`) are put on every generated test.

use std::collections::HashSet;
use std::time::Duration;

use super::*;

/// Runs the whole suite against one store, check after check.
pub async fn run_all(store: &dyn Store) {
    create_instance_and_get(store).await;
    create_existing_instance_reports_it(store).await;
    concurrent_creates_each_get_their_outcome(store).await;
    claim_filters_by_workflow_and_version(store).await;
    claim_respects_limit(store).await;
    claim_skips_leased_instances(store).await;
    expired_lease_is_reclaimable_with_higher_token(store).await;
    lease_token_strictly_increases(store).await;
    claim_respects_ready_at_and_reports_next_wake(store).await;
    park_without_timer_waits_for_inbox(store).await;
    park_until_the_end_of_time_stays_in_the_future(store).await;
    fenced_commit_with_stale_token_writes_nothing(store).await;
    commit_without_lease_is_refused(store).await;
    commit_to_unknown_instance_is_not_found(store).await;
    event_ids_continue_without_gaps(store).await;
    single_entry_commits_are_fenced(store).await;
    a_step_commit_moves_updated_at(store).await;
    history_round_trips(store).await;
    park_and_wake_by_signal(store).await;
    park_refused_when_inbox_moved(store).await;
    signals_consumed_in_arrival_order_per_name(store).await;
    send_signal_to_unknown_or_finished_fails(store).await;
    request_cancel_semantics(store).await;
    renew_leases_extends_and_reports_cancel(store).await;
    release_makes_instance_runnable(store).await;
    finishing_transitions(store).await;
    child_creation_and_parent_wake(store).await;
    cancel_instances_in_commit(store).await;
    commit_batch_fences_each_commit(store).await;
    list_instances_filters(store).await;
    concurrent_claims_never_share_an_instance(store).await;
    cancel_instances_written_by_the_same_commit(store).await;
    signal_ids_are_never_reused(store).await;
    continue_as_new_restarts_with_an_empty_journal(store).await;
    renewal_extends_only_the_listed_leases(store).await;
    end_leases_lets_any_worker_claim_at_once(store).await;
    get_if_finished_reads_only_finished_instances(store).await;
    commit_now_commits_as_commit_does_or_hands_back(store).await;
}

/// Generates one `#[tokio::test]` per check of the store conformance suite.
///
/// `$make` is an expression evaluating to a future whose output dereferences
/// to the store under test; attributes before it go on every test.
///
/// With `optional:` first, the future's output is an `Option` of such a
/// value instead, and a test whose fixture is `None` (a server that cannot
/// be reached, say) returns at once; the fixture reports the skip itself.
///
/// ```ignore
/// mod conformance {
///     fluxo_runtime::store_conformance_tests!(optional: async {
///         fluxo_runtime::store::postgres::test_store_from_env().await
///     });
/// }
/// ```
#[doc(hidden)]
#[macro_export]
macro_rules! store_conformance_tests {
    (@tests $mode:ident $attrs:tt ($make:expr) $($check:ident),* $(,)?) => {
        $( $crate::store_conformance_tests!(@test $mode $attrs ($make) $check); )*
    };
    (@test required [$($attr:tt)*] ($make:expr) $check:ident) => {
        #[::tokio::test]
        $($attr)*
        async fn $check() {
            let fixture = $make.await;
            $crate::store::conformance::$check(&*fixture).await;
        }
    };
    (@test optional [$($attr:tt)*] ($make:expr) $check:ident) => {
        #[::tokio::test]
        $($attr)*
        async fn $check() {
            let ::core::option::Option::Some(fixture) = $make.await else {
                return;
            };
            $crate::store::conformance::$check(&*fixture).await;
        }
    };
    (@all $mode:ident $attrs:tt ($make:expr)) => {
        $crate::store_conformance_tests!(@tests $mode $attrs ($make)
            create_instance_and_get,
            create_existing_instance_reports_it,
            concurrent_creates_each_get_their_outcome,
            claim_filters_by_workflow_and_version,
            claim_respects_limit,
            claim_skips_leased_instances,
            expired_lease_is_reclaimable_with_higher_token,
            lease_token_strictly_increases,
            claim_respects_ready_at_and_reports_next_wake,
            park_without_timer_waits_for_inbox,
            park_until_the_end_of_time_stays_in_the_future,
            fenced_commit_with_stale_token_writes_nothing,
            commit_without_lease_is_refused,
            commit_to_unknown_instance_is_not_found,
            event_ids_continue_without_gaps,
            single_entry_commits_are_fenced,
            a_step_commit_moves_updated_at,
            history_round_trips,
            park_and_wake_by_signal,
            park_refused_when_inbox_moved,
            signals_consumed_in_arrival_order_per_name,
            send_signal_to_unknown_or_finished_fails,
            request_cancel_semantics,
            renew_leases_extends_and_reports_cancel,
            release_makes_instance_runnable,
            finishing_transitions,
            child_creation_and_parent_wake,
            cancel_instances_in_commit,
            commit_batch_fences_each_commit,
            list_instances_filters,
            concurrent_claims_never_share_an_instance,
            cancel_instances_written_by_the_same_commit,
            signal_ids_are_never_reused,
            continue_as_new_restarts_with_an_empty_journal,
            renewal_extends_only_the_listed_leases,
            end_leases_lets_any_worker_claim_at_once,
            get_if_finished_reads_only_finished_instances,
            commit_now_commits_as_commit_does_or_hands_back,
        );
    };
    (optional: $(#[$meta:meta])* $make:expr $(,)?) => {
        $crate::store_conformance_tests!(@all optional [$(#[$meta])*] ($make));
    };
    ($(#[$meta:meta])* $make:expr $(,)?) => {
        $crate::store_conformance_tests!(@all required [$(#[$meta])*] ($make));
    };
}

// ---------------------------------------------------------------------------
// Helpers

/// A lease long enough never to expire during a check.
const LONG: Duration = Duration::from_secs(600);

/// A lease that is expired as soon as it is granted.
const EXPIRED: Duration = Duration::ZERO;

const HOUR: Millis = 3_600_000;

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn new_instance(workflow: &str, version: u32) -> NewInstance {
    NewInstance {
        id: unique("inst"),
        workflow: workflow.to_owned(),
        version,
        input: format!("input of {workflow}").into_bytes(),
        parent_id: None,
    }
}

async fn create(store: &dyn Store, workflow: &str, version: u32) -> String {
    let new = new_instance(workflow, version);
    let id = new.id.clone();
    match store.create_instance(new).await {
        Ok(CreateOutcome::Created) => id,
        other => panic!("create_instance of a fresh id must answer Created, got {other:?}"),
    }
}

fn request(owner: &str, workflows: &[(&str, u32)], limit: usize, lease: Duration) -> ClaimRequest {
    ClaimRequest {
        owner: owner.to_owned(),
        workflows: workflows
            .iter()
            .map(|(w, v)| ((*w).to_owned(), *v))
            .collect(),
        limit,
        lease,
    }
}

async fn claim(
    store: &dyn Store,
    owner: &str,
    workflow: &str,
    limit: usize,
    lease: Duration,
) -> ClaimBatch {
    store
        .claim(&request(owner, &[(workflow, 1)], limit, lease))
        .await
        .unwrap_or_else(|e| panic!("claim failed: {e}"))
}

/// Claims `id`, which must be the only runnable instance of `workflow`.
async fn claim_one(
    store: &dyn Store,
    id: &str,
    workflow: &str,
    lease: Duration,
) -> ClaimedInstance {
    let owner = unique("owner");
    let mut batch = claim(store, &owner, workflow, 10, lease).await;
    assert_eq!(
        batch.claimed.len(),
        1,
        "expected instance {id} to be the one runnable instance of {workflow}, claimed {:?}",
        ids(&batch)
    );
    let claimed = batch.claimed.remove(0);
    assert_eq!(claimed.record.id, id, "claimed the wrong instance");
    claimed
}

async fn assert_not_claimable(store: &dyn Store, workflow: &str, why: &str) -> ClaimBatch {
    let batch = claim(store, &unique("owner"), workflow, 10, LONG).await;
    assert!(
        batch.claimed.is_empty(),
        "{why}: expected nothing runnable in {workflow}, claimed {:?}",
        ids(&batch)
    );
    batch
}

fn ids(batch: &ClaimBatch) -> Vec<&str> {
    batch.claimed.iter().map(|c| c.record.id.as_str()).collect()
}

fn event(event_id: u64, seq: u64, kind: &str) -> StoredEvent {
    StoredEvent {
        event_id,
        seq,
        kind: kind.to_owned().into(),
        data: format!("{kind}#{event_id}").into_bytes(),
    }
}

fn commit(claimed: &ClaimedInstance, events: Vec<StoredEvent>, transition: Transition) -> Commit {
    Commit {
        instance_id: claimed.record.id.as_str().into(),
        lease_token: claimed.lease_token,
        events: events.into(),
        transition,
        ..Commit::default()
    }
}

async fn apply(store: &dyn Store, c: Commit) -> CommitOutcome {
    let id = c.instance_id.clone();
    store
        .commit(c)
        .await
        .unwrap_or_else(|e| panic!("commit to {id} failed: {e}"))
}

async fn get(store: &dyn Store, id: &str) -> InstanceRecord {
    store
        .get_instance(id)
        .await
        .unwrap_or_else(|e| panic!("get_instance({id}) failed: {e}"))
        .unwrap_or_else(|| panic!("instance {id} should exist"))
}

async fn history(store: &dyn Store, id: &str) -> Vec<StoredEvent> {
    store
        .load_history(id)
        .await
        .unwrap_or_else(|e| panic!("load_history({id}) failed: {e}"))
}

async fn next_signal(store: &dyn Store, id: &str, name: &str) -> (Option<InboxSignal>, u64) {
    store
        .next_signal(id, name)
        .await
        .unwrap_or_else(|e| panic!("next_signal({id}, {name}) failed: {e}"))
}

async fn send(store: &dyn Store, id: &str, name: &str, payload: &str) -> u64 {
    store
        .send_signal(id, name, payload.as_bytes().to_vec())
        .await
        .unwrap_or_else(|e| panic!("send_signal({id}, {name}) failed: {e}"))
}

fn applied(cancel_requested: bool) -> CommitOutcome {
    CommitOutcome::Applied { cancel_requested }
}

/// Claims a fresh instance of a fresh workflow and finishes it with `transition`.
async fn finished_instance(store: &dyn Store, transition: Transition) -> (String, String) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let c = claim_one(store, &id, &wf, LONG).await;
    assert_eq!(
        apply(store, commit(&c, vec![], transition)).await,
        applied(false)
    );
    (wf, id)
}

// ---------------------------------------------------------------------------
// Checks

/// A created instance is stored as given, running, and runnable at once.
pub async fn create_instance_and_get(store: &dyn Store) {
    let wf = unique("wf");
    let before = now_millis();
    let new = NewInstance {
        id: unique("inst"),
        workflow: wf.clone(),
        version: 7,
        input: vec![0, 159, 146, 150, 255],
        parent_id: Some("some-parent".to_owned()),
    };
    let id = new.id.clone();
    match store.create_instance(new).await {
        Ok(CreateOutcome::Created) => {}
        other => panic!("create_instance must answer Created for a new id, got {other:?}"),
    }
    let r = get(store, &id).await;
    assert_eq!(r.id, id);
    assert_eq!(r.workflow, wf);
    assert_eq!(r.version, 7);
    assert_eq!(
        r.status,
        InstanceStatus::Running,
        "a new instance is running"
    );
    assert_eq!(
        r.input,
        vec![0, 159, 146, 150, 255],
        "input bytes must round-trip"
    );
    assert_eq!(r.output, None);
    assert_eq!(r.failure, None);
    assert_eq!(r.parent_id.as_deref(), Some("some-parent"));
    assert!(!r.cancel_requested);
    assert_eq!(r.history_format, HISTORY_FORMAT);
    assert!(
        r.created_at >= before - 1_000,
        "created_at {} is not a current time",
        r.created_at
    );
    assert!(r.updated_at >= r.created_at);

    let unknown = unique("missing");
    assert!(
        store
            .get_instance(&unknown)
            .await
            .expect("get_instance")
            .is_none(),
        "get_instance of an unknown id must be None"
    );

    let claimed = store
        .claim(&request(&unique("owner"), &[(&wf, 7)], 10, LONG))
        .await
        .expect("claim");
    assert_eq!(
        ids(&claimed),
        vec![id.as_str()],
        "a new instance is runnable at once"
    );
    let c = &claimed.claimed[0];
    assert_eq!(c.next_event_id, 0, "a new instance has no journal");
    assert!(
        c.lease_token > 0,
        "the first claim hands out a token above 0"
    );
    assert_eq!(c.record.input, vec![0, 159, 146, 150, 255]);
}

/// Creating an id that exists writes nothing and reports the stored record.
pub async fn create_existing_instance_reports_it(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let again = NewInstance {
        id: id.clone(),
        workflow: unique("other-wf"),
        version: 2,
        input: b"other input".to_vec(),
        parent_id: None,
    };
    match store.create_instance(again).await {
        Ok(CreateOutcome::Existing(r)) => {
            assert_eq!(r.id, id);
            assert_eq!(r.workflow, wf, "Existing must report the stored record");
            assert_eq!(r.version, 1);
            assert_eq!(r.input, format!("input of {wf}").into_bytes());
        }
        other => panic!("create_instance of an existing id must answer Existing, got {other:?}"),
    }
    let r = get(store, &id).await;
    assert_eq!(
        r.workflow, wf,
        "the existing instance must be left as it is"
    );
    assert_eq!(r.input, format!("input of {wf}").into_bytes());
}

/// Creates made at the same time (which a store may write together) each
/// get their own outcome: a new id is created with its own input, an id
/// that exists is reported with its stored record, and of two creates of
/// one new id exactly one creates it.
pub async fn concurrent_creates_each_get_their_outcome(store: &dyn Store) {
    let wf = unique("wf");
    let existing = create(store, &wf, 1).await;
    let twice = unique("inst");
    let fresh: Vec<String> = (0..20).map(|_| unique("inst")).collect();
    let ids: Vec<String> = fresh
        .iter()
        .cloned()
        .chain([existing.clone(), twice.clone(), twice.clone()])
        .collect();
    let creates = ids.iter().enumerate().map(|(i, id)| {
        store.create_instance(NewInstance {
            id: id.clone(),
            workflow: wf.clone(),
            version: 2,
            input: format!("input #{i}").into_bytes(),
            parent_id: None,
        })
    });
    let outcomes = futures::future::join_all(creates).await;
    for (i, (id, outcome)) in ids.iter().zip(&outcomes).enumerate().take(fresh.len()) {
        assert!(
            matches!(outcome, Ok(CreateOutcome::Created)),
            "a new id must be created, got {outcome:?}"
        );
        let r = get(store, id).await;
        assert_eq!(r.input, format!("input #{i}").into_bytes(), "its own input");
        assert_eq!((r.version, r.status), (2, InstanceStatus::Running));
    }
    match &outcomes[fresh.len()] {
        Ok(CreateOutcome::Existing(r)) => {
            assert_eq!((r.id.as_str(), r.version), (existing.as_str(), 1));
        }
        other => panic!("an existing id must answer Existing, got {other:?}"),
    }
    let twice_outcomes = &outcomes[fresh.len() + 1..];
    let created = twice_outcomes
        .iter()
        .filter(|o| matches!(o, Ok(CreateOutcome::Created)))
        .count();
    let found = twice_outcomes
        .iter()
        .filter(|o| matches!(o, Ok(CreateOutcome::Existing(r)) if r.id == twice))
        .count();
    assert_eq!(
        (created, found),
        (1, 1),
        "of two creates of one id, one creates it and the other finds it: {twice_outcomes:?}"
    );
    let listed = store
        .list_instances(ListFilter {
            workflow: Some(wf.clone()),
            ..ListFilter::default()
        })
        .await
        .expect("list_instances");
    assert_eq!(
        listed.len(),
        fresh.len() + 2,
        "each id once: the fresh ones, the existing one and the one created twice"
    );
}

/// Claims only hand out instances of the listed (workflow, version) pairs.
pub async fn claim_filters_by_workflow_and_version(store: &dyn Store) {
    let a = unique("wf-a");
    let b = unique("wf-b");
    let a1 = create(store, &a, 1).await;
    let a2 = create(store, &a, 2).await;
    let b1 = create(store, &b, 1).await;

    let batch = store
        .claim(&request(&unique("owner"), &[(&a, 1)], 10, LONG))
        .await
        .expect("claim");
    assert_eq!(ids(&batch), vec![a1.as_str()], "only {a}@1 was asked for");

    let nothing = store
        .claim(&request(&unique("owner"), &[], 10, LONG))
        .await
        .expect("claim");
    assert!(
        nothing.claimed.is_empty(),
        "a claim for no workflow claims nothing"
    );

    let batch = store
        .claim(&request(
            &unique("owner"),
            &[(&a, 2), (&b, 1), (&b, 3)],
            10,
            LONG,
        ))
        .await
        .expect("claim");
    let got: HashSet<&str> = ids(&batch).into_iter().collect();
    let want: HashSet<&str> = [a2.as_str(), b1.as_str()].into_iter().collect();
    assert_eq!(
        got, want,
        "claim must hand out exactly the instances of the listed versions"
    );
}

/// A claim hands out at most `limit` instances.
pub async fn claim_respects_limit(store: &dyn Store) {
    let wf = unique("wf");
    let mut all = HashSet::new();
    for _ in 0..5 {
        all.insert(create(store, &wf, 1).await);
    }
    let zero = claim(store, &unique("owner"), &wf, 0, LONG).await;
    assert!(zero.claimed.is_empty(), "limit 0 claims nothing");
    let first = claim(store, &unique("owner"), &wf, 2, LONG).await;
    assert_eq!(
        first.claimed.len(),
        2,
        "limit 2 must claim 2 of 5 runnable instances"
    );
    let second = claim(store, &unique("owner"), &wf, 10, LONG).await;
    assert_eq!(
        second.claimed.len(),
        3,
        "the 3 instances left must be claimed"
    );
    let got: HashSet<String> = first
        .claimed
        .iter()
        .chain(&second.claimed)
        .map(|c| c.record.id.clone())
        .collect();
    assert_eq!(got, all, "every instance is claimed exactly once");
    assert_not_claimable(store, &wf, "all instances are leased").await;
}

/// An instance under a live lease is not handed out again.
pub async fn claim_skips_leased_instances(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    claim_one(store, &id, &wf, LONG).await;
    let batch = assert_not_claimable(store, &wf, "the instance is leased").await;
    assert_eq!(
        batch.next_wake, None,
        "a leased instance gives no next_wake"
    );
}

/// An expired lease is taken over with a higher token; the old token is fenced out.
pub async fn expired_lease_is_reclaimable_with_higher_token(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let old = claim_one(store, &id, &wf, EXPIRED).await;
    let new = claim_one(store, &id, &wf, LONG).await;
    assert!(
        new.lease_token > old.lease_token,
        "reclaiming an expired lease must hand out a higher token ({} then {})",
        old.lease_token,
        new.lease_token
    );
    assert_eq!(
        apply(
            store,
            commit(&old, vec![event(0, 0, "old")], Transition::None)
        )
        .await,
        CommitOutcome::LeaseLost,
        "the previous holder's token must be fenced out"
    );
    assert_eq!(
        apply(
            store,
            commit(&new, vec![event(0, 0, "new")], Transition::None)
        )
        .await,
        applied(false)
    );
    assert_eq!(history(store, &id).await, vec![event(0, 0, "new")]);
}

/// Every claim of an instance hands out a strictly greater token.
pub async fn lease_token_strictly_increases(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let mut last = 0;
    for _ in 0..4 {
        let c = claim_one(store, &id, &wf, EXPIRED).await;
        assert!(c.lease_token > last, "token {} after {last}", c.lease_token);
        last = c.lease_token;
    }
    let c = claim_one(store, &id, &wf, LONG).await;
    assert!(c.lease_token > last, "token {} after {last}", c.lease_token);
    assert_eq!(
        apply(store, commit(&c, vec![], Transition::Release)).await,
        applied(false)
    );
    let after_release = claim_one(store, &id, &wf, LONG).await;
    assert!(
        after_release.lease_token > c.lease_token,
        "a claim after a release must hand out a higher token"
    );
    let park = Transition::Park {
        wake_at: Some(now_millis() - 1),
        seen_inbox: after_release.inbox_seq,
    };
    assert_eq!(
        apply(store, commit(&after_release, vec![], park)).await,
        applied(false)
    );
    let after_park = claim_one(store, &id, &wf, LONG).await;
    assert!(
        after_park.lease_token > after_release.lease_token,
        "a claim after a park must hand out a higher token"
    );
}

/// Parked instances wait for their time; `next_wake` reports the earliest.
pub async fn claim_respects_ready_at_and_reports_next_wake(store: &dyn Store) {
    let wf = unique("wf");
    let other = unique("wf-other");
    let now = now_millis();
    let mut parked = Vec::new();
    for (workflow, wake_at) in [
        (&wf, now + 2 * HOUR),
        (&wf, now + HOUR),
        (&other, now + HOUR / 2),
    ] {
        let id = create(store, workflow, 1).await;
        let c = claim_one(store, &id, workflow, LONG).await;
        let park = Transition::Park {
            wake_at: Some(wake_at),
            seen_inbox: c.inbox_seq,
        };
        assert_eq!(apply(store, commit(&c, vec![], park)).await, applied(false));
        parked.push(id);
    }
    let late = &parked[0];
    let past = create(store, &wf, 1).await;
    let batch = claim(store, &unique("owner"), &wf, 10, LONG).await;
    assert_eq!(
        ids(&batch),
        vec![past.as_str()],
        "only the instance that is due may be claimed"
    );
    assert_eq!(
        batch.next_wake,
        Some(now + HOUR),
        "next_wake must be the earliest future wake-up of the claimed workflows"
    );
    let c = &batch.claimed[0];
    let park = Transition::Park {
        wake_at: Some(now_millis() - 10),
        seen_inbox: c.inbox_seq,
    };
    assert_eq!(apply(store, commit(c, vec![], park)).await, applied(false));
    claim_one(store, &past, &wf, LONG).await;
    assert_eq!(get(store, late).await.status, InstanceStatus::Running);
}

/// A park until `Millis::MAX` (a sleep of `Duration::MAX`) is not due, and
/// the wake-up it reports stays far in the future: a store may hold it less
/// precisely, never as a time in the past.
pub async fn park_until_the_end_of_time_stays_in_the_future(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let c = claim_one(store, &id, &wf, LONG).await;
    let park = Transition::Park {
        wake_at: Some(Millis::MAX),
        seen_inbox: c.inbox_seq,
    };
    assert_eq!(apply(store, commit(&c, vec![], park)).await, applied(false));
    let batch = assert_not_claimable(store, &wf, "parked until the end of time").await;
    let next = batch.next_wake.expect("the wake-up is reported");
    let millennia = 1000 * 365 * 24 * HOUR;
    assert!(
        next > now_millis() + millennia,
        "a wake-up at the end of time must stay in the future, got {next}"
    );
}

/// A park without a timer makes the instance wait for its inbox only.
pub async fn park_without_timer_waits_for_inbox(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let c = claim_one(store, &id, &wf, LONG).await;
    let park = Transition::Park {
        wake_at: None,
        seen_inbox: c.inbox_seq,
    };
    assert_eq!(
        apply(store, commit(&c, vec![event(0, 0, "waiting")], park)).await,
        applied(false)
    );
    let batch = assert_not_claimable(store, &wf, "parked without a timer").await;
    assert_eq!(
        batch.next_wake, None,
        "an instance parked without a timer has no wake-up time"
    );
    assert_eq!(get(store, &id).await.status, InstanceStatus::Running);
}

/// A commit under a stale token is refused and writes nothing at all.
pub async fn fenced_commit_with_stale_token_writes_nothing(store: &dyn Store) {
    let wf = unique("wf");
    let child_wf = unique("wf-child");
    let id = create(store, &wf, 1).await;
    let target = create(store, &unique("wf-target"), 1).await;
    let sid = send(store, &id, "go", "payload").await;
    let stale = claim_one(store, &id, &wf, EXPIRED).await;
    let current = claim_one(store, &id, &wf, LONG).await;

    let mut child = new_instance(&child_wf, 1);
    child.parent_id = Some(id.clone());
    let child_id = child.id.clone();
    let mut c = commit(
        &stale,
        vec![event(0, 0, "stale")],
        Transition::Complete {
            output: b"stale".to_vec(),
        },
    );
    c.consume_signal = Some(sid);
    c.new_instances = vec![child];
    c.cancel_instances = vec![target.clone()];
    assert_eq!(
        apply(store, c).await,
        CommitOutcome::LeaseLost,
        "a stale token must be fenced out"
    );

    assert!(
        history(store, &id).await.is_empty(),
        "a fenced-out commit must not write events"
    );
    let r = get(store, &id).await;
    assert_eq!(
        r.status,
        InstanceStatus::Running,
        "a fenced-out commit must not finish the instance"
    );
    assert_eq!(r.output, None);
    assert!(
        store
            .get_instance(&child_id)
            .await
            .expect("get_instance")
            .is_none(),
        "a fenced-out commit must not create instances"
    );
    assert!(
        !get(store, &target).await.cancel_requested,
        "a fenced-out commit must not request cancellations"
    );
    let (signal, _) = next_signal(store, &id, "go").await;
    assert_eq!(
        signal.map(|s| s.signal_id),
        Some(sid),
        "a fenced-out commit must not consume a signal"
    );
    // The lease holder is unaffected.
    assert_eq!(
        apply(
            store,
            commit(&current, vec![event(0, 0, "current")], Transition::None)
        )
        .await,
        applied(false)
    );
    assert_eq!(history(store, &id).await, vec![event(0, 0, "current")]);
}

/// Without a lease (never claimed, released, parked, finished) a commit is refused.
pub async fn commit_without_lease_is_refused(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let never = Commit {
        instance_id: id.as_str().into(),
        lease_token: 0,
        events: vec![event(0, 0, "x")].into(),
        ..Commit::default()
    };
    assert_eq!(
        apply(store, never).await,
        CommitOutcome::LeaseLost,
        "never claimed"
    );

    let c = claim_one(store, &id, &wf, LONG).await;
    assert_eq!(
        apply(store, commit(&c, vec![], Transition::Release)).await,
        applied(false)
    );
    assert_eq!(
        apply(store, commit(&c, vec![event(0, 0, "x")], Transition::None)).await,
        CommitOutcome::LeaseLost,
        "a commit after releasing the lease must be refused"
    );

    let c = claim_one(store, &id, &wf, LONG).await;
    let park = Transition::Park {
        wake_at: Some(now_millis() + HOUR),
        seen_inbox: c.inbox_seq,
    };
    assert_eq!(apply(store, commit(&c, vec![], park)).await, applied(false));
    assert_eq!(
        apply(store, commit(&c, vec![event(0, 0, "x")], Transition::None)).await,
        CommitOutcome::LeaseLost,
        "a commit after parking must be refused"
    );

    let wf = unique("wf");
    let done = create(store, &wf, 1).await;
    let c = claim_one(store, &done, &wf, LONG).await;
    let complete = Transition::Complete { output: vec![1] };
    assert_eq!(
        apply(store, commit(&c, vec![], complete)).await,
        applied(false)
    );
    assert_eq!(
        apply(store, commit(&c, vec![event(0, 0, "x")], Transition::None)).await,
        CommitOutcome::LeaseLost,
        "a commit to a finished instance must be refused"
    );
    assert!(history(store, &id).await.is_empty());
    assert!(history(store, &done).await.is_empty());
}

/// A commit to an id that does not exist is `NotFound`.
pub async fn commit_to_unknown_instance_is_not_found(store: &dyn Store) {
    let c = Commit {
        instance_id: unique("missing").into(),
        lease_token: 1,
        events: vec![event(0, 0, "x")].into(),
        ..Commit::default()
    };
    match store.commit(c).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("a commit to an unknown instance must be NotFound, got {other:?}"),
    }
}

/// Journal entries continue `next_event_id` without gaps; anything else is a
/// `Conflict` that writes nothing and keeps the lease.
pub async fn event_ids_continue_without_gaps(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let c = claim_one(store, &id, &wf, LONG).await;
    assert_eq!(
        apply(
            store,
            commit(
                &c,
                vec![event(0, 0, "a"), event(1, 1, "b")],
                Transition::None
            )
        )
        .await,
        applied(false)
    );
    let bad: [(&str, Vec<StoredEvent>); 4] = [
        ("a duplicate id", vec![event(1, 1, "dup")]),
        ("a gap", vec![event(3, 3, "gap")]),
        (
            "a gap inside the commit",
            vec![event(2, 2, "ok"), event(4, 4, "gap")],
        ),
        (
            "a repeated id inside the commit",
            vec![event(2, 2, "ok"), event(2, 2, "again")],
        ),
    ];
    for (what, events) in bad {
        let mut bad_commit = commit(&c, events, Transition::Complete { output: vec![] });
        bad_commit.new_instances = vec![new_instance(&unique("wf"), 1)];
        let child = bad_commit.new_instances[0].id.clone();
        match store.commit(bad_commit).await {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("{what} must be a Conflict, got {other:?}"),
        }
        assert!(
            store
                .get_instance(&child)
                .await
                .expect("get_instance")
                .is_none(),
            "a conflicting commit ({what}) must write nothing"
        );
    }
    assert_eq!(
        history(store, &id).await.len(),
        2,
        "conflicting commits must write no event"
    );
    assert_eq!(get(store, &id).await.status, InstanceStatus::Running);
    assert_eq!(
        apply(store, commit(&c, vec![], Transition::None)).await,
        applied(false),
        "a commit without events needs no position"
    );
    assert_eq!(
        apply(
            store,
            commit(&c, vec![event(2, 2, "c")], Transition::Release)
        )
        .await,
        applied(false),
        "the lease survives a conflict"
    );
    let again = claim_one(store, &id, &wf, LONG).await;
    assert_eq!(
        again.next_event_id, 3,
        "next_event_id counts the stored entries"
    );
    let stored: Vec<u64> = history(store, &id)
        .await
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(stored, vec![0, 1, 2]);
}

/// The commit of a step's completion, one journal entry and nothing else
/// (a store may write it with a statement of its own), is fenced like any
/// other: by lease token and by journal position, writing nothing when
/// refused, and it reports a pending cancel request.
pub async fn single_entry_commits_are_fenced(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let stale = claim_one(store, &id, &wf, EXPIRED).await;
    let c = claim_one(store, &id, &wf, LONG).await;
    let one = |claimed: &ClaimedInstance, event_id: u64, kind: &str| {
        commit(
            claimed,
            vec![event(event_id, event_id, kind)],
            Transition::None,
        )
    };
    assert_eq!(
        apply(store, one(&stale, 0, "stale")).await,
        CommitOutcome::LeaseLost,
        "a stale token must be fenced out"
    );
    assert_eq!(apply(store, one(&c, 0, "a")).await, applied(false));
    assert_eq!(apply(store, one(&c, 1, "b")).await, applied(false));
    for (what, event_id) in [("a duplicate id", 1), ("a gap", 3)] {
        match store.commit(one(&c, event_id, "bad")).await {
            Err(StoreError::Conflict(_)) => {}
            other => panic!("{what} must be a Conflict, got {other:?}"),
        }
    }
    assert_eq!(
        apply(store, one(&stale, 2, "stale")).await,
        CommitOutcome::LeaseLost,
        "a stale token stays fenced out at the right position"
    );
    store.request_cancel(&id).await.expect("request_cancel");
    assert_eq!(
        apply(store, one(&c, 2, "c")).await,
        applied(true),
        "the commit reports the cancel request"
    );
    assert_eq!(
        history(store, &id).await,
        vec![event(0, 0, "a"), event(1, 1, "b"), event(2, 2, "c")],
        "refused commits must write nothing"
    );
    assert_eq!(
        apply(store, commit(&c, vec![], Transition::Release)).await,
        applied(true)
    );
    let again = claim_one(store, &id, &wf, LONG).await;
    assert_eq!(
        again.next_event_id, 3,
        "next_event_id counts the stored entries"
    );
}

/// A commit that only adds a journal entry (a step's) is a change of the
/// instance: its `updated_at` moves, as read and as listed.
pub async fn a_step_commit_moves_updated_at(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let c = claim_one(store, &id, &wf, LONG).await;
    let before = get(store, &id).await.updated_at;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let step = commit(&c, vec![event(0, 0, "step")], Transition::None);
    assert_eq!(apply(store, step).await, applied(false));
    let after = get(store, &id).await.updated_at;
    // A store may stamp a step from a coarse clock, a few ms behind.
    assert!(
        after >= before + 100,
        "a step 200 ms later moved updated_at from {before} to {after} only"
    );
    let listed = store
        .list_instances(ListFilter {
            workflow: Some(wf),
            ..ListFilter::default()
        })
        .await
        .expect("list_instances");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].updated_at, after, "listed as read");
}

/// The journal reads back exactly as written, ordered by event id.
pub async fn history_round_trips(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    assert!(
        history(store, &id).await.is_empty(),
        "a new instance has an empty journal"
    );
    match store.load_history(&unique("missing")).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("load_history of an unknown id must be NotFound, got {other:?}"),
    }
    let c = claim_one(store, &id, &wf, LONG).await;
    let mut written = Vec::new();
    for batch in 0..3u64 {
        let events: Vec<StoredEvent> = (0..4u64)
            .map(|i| {
                let n = batch * 4 + i;
                StoredEvent {
                    event_id: n,
                    seq: n / 2,
                    kind: format!("kind_{n}").into(),
                    data: vec![0, 255, n as u8, 10, 13],
                }
            })
            .collect();
        written.extend(events.clone());
        assert_eq!(
            apply(store, commit(&c, events, Transition::None)).await,
            applied(false)
        );
    }
    let empty = StoredEvent {
        event_id: 12,
        seq: 12,
        kind: "".into(),
        data: Vec::new(),
    };
    written.push(empty.clone());
    assert_eq!(
        apply(store, commit(&c, vec![empty], Transition::None)).await,
        applied(false)
    );
    assert_eq!(
        history(store, &id).await,
        written,
        "the journal must round-trip exactly"
    );

    let mut bare = new_instance(&wf, 2);
    bare.input = Vec::new();
    let bare_id = bare.id.clone();
    assert!(matches!(
        store.create_instance(bare).await,
        Ok(CreateOutcome::Created)
    ));
    assert_eq!(
        get(store, &bare_id).await.input,
        Vec::<u8>::new(),
        "an empty input round-trips"
    );
}

/// A parked instance is woken by a signal, which it then reads and consumes.
pub async fn park_and_wake_by_signal(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let c = claim_one(store, &id, &wf, LONG).await;
    let (none, seen) = next_signal(store, &id, "approved").await;
    assert!(none.is_none(), "a new instance has an empty inbox");
    assert_eq!(
        seen, c.inbox_seq,
        "next_signal and claim report the same inbox sequence"
    );
    let park = Transition::Park {
        wake_at: None,
        seen_inbox: seen,
    };
    assert_eq!(
        apply(store, commit(&c, vec![event(0, 0, "wait")], park)).await,
        applied(false)
    );
    assert_not_claimable(store, &wf, "parked on its inbox").await;

    let sid = send(store, &id, "approved", "by ana").await;
    let woken = claim_one(store, &id, &wf, LONG).await;
    assert!(
        woken.inbox_seq > seen,
        "a signal must move the inbox sequence"
    );
    assert_eq!(woken.next_event_id, 1);
    let (signal, seq) = next_signal(store, &id, "approved").await;
    let signal = signal.expect("the signal must be in the inbox");
    assert_eq!(signal.signal_id, sid);
    assert_eq!(signal.payload, b"by ana".to_vec());
    assert_eq!(seq, woken.inbox_seq);

    let mut consume = commit(
        &woken,
        vec![event(1, 0, "signal_received")],
        Transition::None,
    );
    consume.consume_signal = Some(sid);
    assert_eq!(apply(store, consume).await, applied(false));
    let (gone, after) = next_signal(store, &id, "approved").await;
    assert!(gone.is_none(), "a consumed signal must leave the inbox");
    assert_eq!(
        after, seq,
        "consuming a signal does not move the inbox sequence"
    );
}

/// A park is refused when the inbox moved since the engine looked; the rest
/// of the commit is applied and the lease kept.
pub async fn park_refused_when_inbox_moved(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let c = claim_one(store, &id, &wf, LONG).await;
    let (_, seen) = next_signal(store, &id, "go").await;
    send(store, &id, "go", "now").await;
    let park = Transition::Park {
        wake_at: None,
        seen_inbox: seen,
    };
    match apply(store, commit(&c, vec![event(0, 0, "wait")], park)).await {
        CommitOutcome::InboxChanged {
            inbox_seq,
            cancel_requested,
        } => {
            assert_eq!(
                inbox_seq,
                seen + 1,
                "InboxChanged must report the current sequence"
            );
            assert!(!cancel_requested);
        }
        other => panic!("a park on a moved inbox must be refused with InboxChanged, got {other:?}"),
    }
    assert_eq!(
        history(store, &id).await,
        vec![event(0, 0, "wait")],
        "the events of a refused park are still written"
    );
    assert_not_claimable(store, &wf, "the lease is kept after a refused park").await;
    let (signal, seq) = next_signal(store, &id, "go").await;
    assert!(signal.is_some());
    let park = Transition::Park {
        wake_at: None,
        seen_inbox: seq,
    };
    assert_eq!(
        apply(store, commit(&c, vec![event(1, 1, "retry")], park)).await,
        applied(false),
        "the lease holder can commit again after a refused park"
    );
}

/// Signals are consumed per name, in arrival order.
pub async fn signals_consumed_in_arrival_order_per_name(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let (_, start) = next_signal(store, &id, "a").await;
    let a1 = send(store, &id, "a", "a1").await;
    let b1 = send(store, &id, "b", "b1").await;
    let a2 = send(store, &id, "a", "a2").await;
    assert!(
        a1 < b1 && b1 < a2,
        "signal ids must increase in arrival order: {a1} {b1} {a2}"
    );
    let c = claim_one(store, &id, &wf, LONG).await;
    assert_eq!(
        c.inbox_seq,
        start + 3,
        "every signal moves the inbox sequence once"
    );

    let (first, _) = next_signal(store, &id, "a").await;
    let first = first.expect("signal a1");
    assert_eq!(
        (first.signal_id, first.payload.as_slice()),
        (a1, &b"a1"[..])
    );
    let mut consume = commit(&c, vec![event(0, 0, "got_a")], Transition::None);
    consume.consume_signal = Some(a1);
    assert_eq!(apply(store, consume).await, applied(false));

    let (second, _) = next_signal(store, &id, "a").await;
    let second = second.expect("signal a2");
    assert_eq!(
        (second.signal_id, second.payload.as_slice()),
        (a2, &b"a2"[..])
    );
    let (b, _) = next_signal(store, &id, "b").await;
    let b = b.expect("signal b1");
    assert_eq!((b.signal_id, b.payload.as_slice()), (b1, &b"b1"[..]));
    let (none, _) = next_signal(store, &id, "c").await;
    assert!(none.is_none(), "no signal of that name");
    let empty = send(store, &id, "empty", "").await;
    let (signal, _) = next_signal(store, &id, "empty").await;
    let signal = signal.expect("a signal with an empty payload is still a signal");
    assert_eq!((signal.signal_id, signal.payload.len()), (empty, 0));

    let mut consume = commit(&c, vec![event(1, 1, "got_b")], Transition::None);
    consume.consume_signal = Some(b1);
    assert_eq!(apply(store, consume).await, applied(false));
    let (b, _) = next_signal(store, &id, "b").await;
    assert!(b.is_none(), "b1 was consumed");
    let (a, _) = next_signal(store, &id, "a").await;
    assert_eq!(
        a.map(|s| s.signal_id),
        Some(a2),
        "consuming b1 must leave a2 in place"
    );

    match store.next_signal(&unique("missing"), "a").await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("next_signal of an unknown id must be NotFound, got {other:?}"),
    }
}

/// Signals to unknown or finished instances are refused with typed errors.
pub async fn send_signal_to_unknown_or_finished_fails(store: &dyn Store) {
    let missing = unique("missing");
    match store.send_signal(&missing, "x", vec![]).await {
        Err(StoreError::NotFound(id)) => assert_eq!(id, missing),
        other => panic!("a signal to an unknown instance must be NotFound, got {other:?}"),
    }
    for (transition, status) in [
        (
            Transition::Complete { output: vec![1] },
            InstanceStatus::Completed,
        ),
        (
            Transition::Fail { failure: vec![2] },
            InstanceStatus::Failed,
        ),
        (
            Transition::Cancel { failure: vec![3] },
            InstanceStatus::Cancelled,
        ),
    ] {
        let (_, id) = finished_instance(store, transition).await;
        match store.send_signal(&id, "x", vec![]).await {
            Err(StoreError::Finished { id: got, status: s }) => {
                assert_eq!(got, id);
                assert_eq!(s, status, "Finished must carry the final status");
            }
            other => panic!("a signal to a {status} instance must be Finished, got {other:?}"),
        }
    }
}

/// A cancel request is recorded, wakes the instance and is reported to the
/// lease holder; a finished instance is left alone.
pub async fn request_cancel_semantics(store: &dyn Store) {
    match store.request_cancel(&unique("missing")).await {
        Err(StoreError::NotFound(_)) => {}
        other => panic!("cancelling an unknown instance must be NotFound, got {other:?}"),
    }
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let c = claim_one(store, &id, &wf, LONG).await;
    let park = Transition::Park {
        wake_at: None,
        seen_inbox: c.inbox_seq,
    };
    assert_eq!(apply(store, commit(&c, vec![], park)).await, applied(false));

    let status = store.request_cancel(&id).await.expect("request_cancel");
    assert_eq!(status, InstanceStatus::Running);
    assert!(
        get(store, &id).await.cancel_requested,
        "the request must be recorded"
    );
    let woken = claim_one(store, &id, &wf, LONG).await;
    assert!(
        woken.inbox_seq > c.inbox_seq,
        "a cancel request moves the inbox sequence"
    );
    assert!(woken.record.cancel_requested);
    assert_eq!(
        apply(
            store,
            commit(&woken, vec![event(0, 0, "noticed")], Transition::None)
        )
        .await,
        applied(true),
        "commits must report the cancel request"
    );
    let park = Transition::Park {
        wake_at: None,
        seen_inbox: c.inbox_seq,
    };
    match apply(store, commit(&woken, vec![], park)).await {
        CommitOutcome::InboxChanged {
            cancel_requested, ..
        } => assert!(
            cancel_requested,
            "InboxChanged must report the cancel request"
        ),
        other => panic!("expected InboxChanged, got {other:?}"),
    }
    assert_eq!(
        apply(
            store,
            commit(
                &woken,
                vec![],
                Transition::Cancel {
                    failure: b"cancelled".to_vec()
                }
            )
        )
        .await,
        applied(true)
    );
    let r = get(store, &id).await;
    assert_eq!(r.status, InstanceStatus::Cancelled);
    assert_eq!(r.failure, Some(b"cancelled".to_vec()));
    assert_eq!(
        store.request_cancel(&id).await.expect("request_cancel"),
        InstanceStatus::Cancelled,
        "cancelling a finished instance reports its status"
    );

    let (_, done) = finished_instance(store, Transition::Complete { output: vec![9] }).await;
    assert_eq!(
        store.request_cancel(&done).await.expect("request_cancel"),
        InstanceStatus::Completed
    );
    let r = get(store, &done).await;
    assert!(
        !r.cancel_requested,
        "a finished instance must be left as it is"
    );
    assert_eq!(r.status, InstanceStatus::Completed);
}

/// Renewal extends the owner's leases on the listed instances and reports
/// those with a cancel request.
pub async fn renew_leases_extends_and_reports_cancel(store: &dyn Store) {
    let wf = unique("wf");
    let owner = unique("owner");
    let a = create(store, &wf, 1).await;
    let b = create(store, &wf, 1).await;
    let batch = claim(store, &owner, &wf, 10, EXPIRED).await;
    assert_eq!(batch.claimed.len(), 2);
    assert_eq!(
        store.request_cancel(&b).await.expect("request_cancel"),
        InstanceStatus::Running
    );

    let both = [a.clone(), b.clone()];
    let cancelled = store
        .renew_leases(&owner, &both, LONG)
        .await
        .expect("renew_leases");
    assert_eq!(
        cancelled,
        vec![b.clone()],
        "renewal reports the held instances with a cancel request"
    );
    assert_not_claimable(store, &wf, "renewed leases are live again").await;
    for c in &batch.claimed {
        assert_eq!(
            apply(store, commit(c, vec![], Transition::None)).await,
            applied(c.record.id == b),
            "the renewed lease is still the same lease"
        );
    }
    let none = store
        .renew_leases(&unique("owner"), &both, LONG)
        .await
        .expect("renew_leases");
    assert!(
        none.is_empty(),
        "an owner without those leases renews nothing"
    );

    let mine = batch
        .claimed
        .iter()
        .find(|c| c.record.id == a)
        .expect("claimed a");
    assert_eq!(
        apply(store, commit(mine, vec![], Transition::Release)).await,
        applied(false)
    );
    let cancelled = store
        .renew_leases(&owner, &both, LONG)
        .await
        .expect("renew_leases");
    assert_eq!(
        cancelled,
        vec![b],
        "a released instance is no longer renewed"
    );
    claim_one(store, &a, &wf, LONG).await;
}

/// A renewal extends the listed leases only. A lease the owner holds on an
/// instance it does not list (one a claim whose answer was lost left it)
/// runs out, and another worker claims that instance; listing it after
/// that does not take it back.
pub async fn renewal_extends_only_the_listed_leases(store: &dyn Store) {
    let wf = unique("wf");
    let owner = unique("owner");
    let a = create(store, &wf, 1).await;
    let b = create(store, &wf, 1).await;
    let batch = claim(store, &owner, &wf, 10, EXPIRED).await;
    assert_eq!(batch.claimed.len(), 2);
    store
        .renew_leases(&owner, std::slice::from_ref(&a), LONG)
        .await
        .expect("renew_leases");
    let other = claim(store, &unique("owner"), &wf, 10, EXPIRED).await;
    assert_eq!(
        ids(&other),
        vec![b.as_str()],
        "only the lease not listed ran out"
    );
    // `b` is the other owner's now, under a lease that has run out: the
    // first owner's renewal must not extend it.
    assert!(store
        .renew_leases(&owner, &[a.clone(), b.clone()], LONG)
        .await
        .expect("renew_leases")
        .is_empty());
    assert!(store
        .renew_leases(&owner, &[], LONG)
        .await
        .expect("renew_leases")
        .is_empty());
    let third = claim(store, &unique("owner"), &wf, 10, LONG).await;
    assert_eq!(
        ids(&third),
        vec![b.as_str()],
        "a renewal extends its owner's leases only"
    );
    assert_eq!(
        apply(store, commit(&other.claimed[0], vec![], Transition::None)).await,
        CommitOutcome::LeaseLost,
        "the second holder is fenced off"
    );
    assert_not_claimable(store, &wf, "one renewed lease, one new").await;
}

/// Ending an owner's leases lets another worker claim the instances at
/// once under newer tokens, and the old holder is fenced off. Other
/// owners' leases are untouched.
pub async fn end_leases_lets_any_worker_claim_at_once(store: &dyn Store) {
    let wf = unique("wf");
    let dead = unique("owner");
    create(store, &wf, 1).await;
    create(store, &wf, 1).await;
    let held = claim(store, &dead, &wf, 1, LONG).await;
    assert_eq!(held.claimed.len(), 1);
    let other = claim(store, &unique("owner"), &wf, 1, LONG).await;
    assert_eq!(other.claimed.len(), 1);
    assert_not_claimable(store, &wf, "both leases are long").await;

    store.end_leases(&dead).await.expect("end_leases");
    let again = claim(store, &unique("owner"), &wf, 10, LONG).await;
    let ids: Vec<&str> = ids(&again);
    assert_eq!(
        ids,
        vec![held.claimed[0].record.id.as_str()],
        "only the ended lease's instance is claimable"
    );
    assert!(again.claimed[0].lease_token > held.claimed[0].lease_token);
    assert_eq!(
        apply(
            store,
            commit(
                &held.claimed[0],
                vec![event(0, 0, "late")],
                Transition::None
            )
        )
        .await,
        CommitOutcome::LeaseLost,
        "the old holder is fenced off"
    );
}

/// A released instance is runnable again at once, under a new token.
pub async fn release_makes_instance_runnable(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let c = claim_one(store, &id, &wf, LONG).await;
    assert_eq!(
        apply(
            store,
            commit(&c, vec![event(0, 0, "a")], Transition::Release)
        )
        .await,
        applied(false)
    );
    let again = claim_one(store, &id, &wf, LONG).await;
    assert!(again.lease_token > c.lease_token);
    assert_eq!(again.next_event_id, 1);
    assert_eq!(get(store, &id).await.status, InstanceStatus::Running);
}

/// Complete, Fail and Cancel finish the instance with their payload, release
/// it and empty its inbox.
pub async fn finishing_transitions(store: &dyn Store) {
    for (transition, status) in [
        (
            Transition::Complete {
                output: b"out".to_vec(),
            },
            InstanceStatus::Completed,
        ),
        (
            Transition::Fail {
                failure: b"bad".to_vec(),
            },
            InstanceStatus::Failed,
        ),
        (
            Transition::Cancel {
                failure: b"stop".to_vec(),
            },
            InstanceStatus::Cancelled,
        ),
    ] {
        let wf = unique("wf");
        let id = create(store, &wf, 1).await;
        send(store, &id, "pending", "never read").await;
        let c = claim_one(store, &id, &wf, LONG).await;
        assert_eq!(
            apply(
                store,
                commit(&c, vec![event(0, 0, "last")], transition.clone())
            )
            .await,
            applied(false)
        );
        let r = get(store, &id).await;
        assert_eq!(r.status, status);
        match transition {
            Transition::Complete { output } => {
                assert_eq!(r.output, Some(output));
                assert_eq!(r.failure, None);
            }
            Transition::Fail { failure } | Transition::Cancel { failure } => {
                assert_eq!(r.failure, Some(failure));
                assert_eq!(r.output, None);
            }
            _ => {}
        }
        assert!(r.updated_at >= r.created_at);
        assert_eq!(history(store, &id).await, vec![event(0, 0, "last")]);
        let batch = assert_not_claimable(store, &wf, "a finished instance never runs again").await;
        assert_eq!(batch.next_wake, None);
        assert_eq!(
            apply(
                store,
                commit(&c, vec![event(1, 1, "after")], Transition::None)
            )
            .await,
            CommitOutcome::LeaseLost,
            "a finished instance takes no more commits"
        );
        let (signal, _) = next_signal(store, &id, "pending").await;
        assert!(signal.is_none(), "a finished instance has an empty inbox");
    }
}

/// Child instances created by a commit wake their parent when they finish.
pub async fn child_creation_and_parent_wake(store: &dyn Store) {
    let wf = unique("wf-parent");
    let child_wf = unique("wf-child");
    let parent = create(store, &wf, 1).await;
    let existing = create(store, &unique("wf-existing"), 1).await;
    let p = claim_one(store, &parent, &wf, LONG).await;

    let mut child = new_instance(&child_wf, 3);
    child.parent_id = Some(parent.clone());
    child.input = b"child input".to_vec();
    let child_id = child.id.clone();
    let mut clash = new_instance(&child_wf, 3);
    clash.id = existing.clone();
    clash.parent_id = Some(parent.clone());
    let mut c = commit(
        &p,
        vec![event(0, 0, "child_started")],
        Transition::Park {
            wake_at: None,
            seen_inbox: p.inbox_seq,
        },
    );
    c.new_instances = vec![child, clash];
    assert_eq!(apply(store, c).await, applied(false));

    let r = get(store, &child_id).await;
    assert_eq!(r.status, InstanceStatus::Running);
    assert_eq!(r.parent_id.as_deref(), Some(parent.as_str()));
    assert_eq!(r.workflow, child_wf);
    assert_eq!(r.version, 3);
    assert_eq!(r.input, b"child input".to_vec());
    let e = get(store, &existing).await;
    assert_eq!(
        e.parent_id, None,
        "an existing id in new_instances is left as it is"
    );
    assert_ne!(e.workflow, child_wf);
    assert_not_claimable(store, &wf, "the parent waits for its child").await;

    let batch = store
        .claim(&request(&unique("owner"), &[(&child_wf, 3)], 10, LONG))
        .await
        .expect("claim");
    assert_eq!(
        ids(&batch),
        vec![child_id.as_str()],
        "a child is runnable at once"
    );
    let ch = &batch.claimed[0];
    assert_eq!(
        apply(
            store,
            commit(
                ch,
                vec![],
                Transition::Complete {
                    output: b"42".to_vec()
                }
            )
        )
        .await,
        applied(false)
    );
    let woken = claim_one(store, &parent, &wf, LONG).await;
    assert!(
        woken.inbox_seq > p.inbox_seq,
        "a finishing child moves the parent's inbox"
    );

    // A child finishing after its parent leaves the parent alone.
    let mut late = new_instance(&child_wf, 3);
    late.parent_id = Some(parent.clone());
    let late_id = late.id.clone();
    let mut c = commit(
        &woken,
        vec![event(1, 1, "done")],
        Transition::Complete { output: vec![] },
    );
    c.new_instances = vec![late];
    assert_eq!(apply(store, c).await, applied(false));
    let parent_done = get(store, &parent).await;
    let batch = store
        .claim(&request(&unique("owner"), &[(&child_wf, 3)], 10, LONG))
        .await
        .expect("claim");
    assert_eq!(ids(&batch), vec![late_id.as_str()]);
    assert_eq!(
        apply(
            store,
            commit(
                &batch.claimed[0],
                vec![],
                Transition::Fail { failure: vec![] }
            )
        )
        .await,
        applied(false)
    );
    let after = get(store, &parent).await;
    assert_eq!(
        after.status,
        InstanceStatus::Completed,
        "a finished parent stays finished"
    );
    assert_eq!(after.output, parent_done.output);
    assert_not_claimable(store, &wf, "a finished parent is not woken").await;
}

/// `cancel_instances` requests cancellation of running instances and skips
/// finished and unknown ones.
pub async fn cancel_instances_in_commit(store: &dyn Store) {
    let wf = unique("wf");
    let child_wf = unique("wf-child");
    let parent = create(store, &wf, 1).await;
    let child = create(store, &child_wf, 1).await;
    let ch = claim_one(store, &child, &child_wf, LONG).await;
    let park = Transition::Park {
        wake_at: None,
        seen_inbox: ch.inbox_seq,
    };
    assert_eq!(
        apply(store, commit(&ch, vec![], park)).await,
        applied(false)
    );
    let (_, done) = finished_instance(store, Transition::Complete { output: vec![] }).await;

    let p = claim_one(store, &parent, &wf, LONG).await;
    let mut c = commit(&p, vec![event(0, 0, "cancelling")], Transition::None);
    c.cancel_instances = vec![child.clone(), unique("missing"), done.clone()];
    assert_eq!(apply(store, c).await, applied(false));

    assert!(
        get(store, &child).await.cancel_requested,
        "the running child must get the request"
    );
    let woken = claim_one(store, &child, &child_wf, LONG).await;
    assert!(
        woken.inbox_seq > ch.inbox_seq,
        "the cancel request wakes the child"
    );
    let d = get(store, &done).await;
    assert!(!d.cancel_requested, "a finished instance is left as it is");
    assert_eq!(d.status, InstanceStatus::Completed);
    assert!(!get(store, &parent).await.cancel_requested);
}

/// In a batch every commit is fenced on its own: a fenced-out or conflicting
/// commit does not stop the others.
pub async fn commit_batch_fences_each_commit(store: &dyn Store) {
    assert!(
        store.commit_batch(vec![]).await.is_empty(),
        "an empty batch has no results"
    );
    let (wa, wb, wc) = (unique("wf-a"), unique("wf-b"), unique("wf-c"));
    let a = create(store, &wa, 1).await;
    let b = create(store, &wb, 1).await;
    let c = create(store, &wc, 1).await;
    let ca = claim_one(store, &a, &wa, LONG).await;
    let cb_stale = claim_one(store, &b, &wb, EXPIRED).await;
    let cb = claim_one(store, &b, &wb, LONG).await;
    let cc = claim_one(store, &c, &wc, LONG).await;

    let mut child = new_instance(&unique("wf-child"), 1);
    child.parent_id = Some(a.clone());
    let child_id = child.id.clone();
    let mut first = commit(&ca, vec![event(0, 0, "a0")], Transition::None);
    first.new_instances = vec![child];
    let results = store
        .commit_batch(vec![
            first,
            commit(
                &cb_stale,
                vec![event(0, 0, "stale")],
                Transition::Complete { output: vec![] },
            ),
            commit(&cc, vec![event(5, 5, "gap")], Transition::None),
            commit(
                &ca,
                vec![event(1, 1, "a1")],
                Transition::Complete {
                    output: b"a".to_vec(),
                },
            ),
            commit(&cb, vec![event(0, 0, "b0")], Transition::Release),
        ])
        .await;
    assert_eq!(results.len(), 5, "one result per commit");
    assert!(
        matches!(results[0], Ok(CommitOutcome::Applied { .. })),
        "first: {:?}",
        results[0]
    );
    assert!(
        matches!(results[1], Ok(CommitOutcome::LeaseLost)),
        "stale: {:?}",
        results[1]
    );
    assert!(
        matches!(results[2], Err(StoreError::Conflict(_))),
        "gap: {:?}",
        results[2]
    );
    assert!(
        matches!(results[3], Ok(CommitOutcome::Applied { .. })),
        "a later commit to the same instance sees the earlier one: {:?}",
        results[3]
    );
    assert!(
        matches!(results[4], Ok(CommitOutcome::Applied { .. })),
        "b: {:?}",
        results[4]
    );

    assert_eq!(
        history(store, &a).await,
        vec![event(0, 0, "a0"), event(1, 1, "a1")]
    );
    assert_eq!(get(store, &a).await.status, InstanceStatus::Completed);
    assert!(store
        .get_instance(&child_id)
        .await
        .expect("get_instance")
        .is_some());
    assert_eq!(
        history(store, &b).await,
        vec![event(0, 0, "b0")],
        "only the current holder wrote"
    );
    assert_eq!(get(store, &b).await.status, InstanceStatus::Running);
    assert!(
        history(store, &c).await.is_empty(),
        "the conflicting commit wrote nothing"
    );
    assert_eq!(
        apply(
            store,
            commit(&cc, vec![event(0, 0, "c0")], Transition::None)
        )
        .await,
        applied(false),
        "the conflicting commit's lease is intact"
    );
    claim_one(store, &b, &wb, LONG).await;
}

/// Listing is newest first and honours the workflow, status and limit filters.
pub async fn list_instances_filters(store: &dyn Store) {
    let x = unique("wf-x");
    let y = unique("wf-y");
    let x1 = create(store, &x, 1).await;
    let x2 = create(store, &x, 1).await;
    let x3 = create(store, &x, 1).await;
    let y1 = create(store, &y, 1).await;
    let batch = claim(store, &unique("owner"), &x, 10, LONG).await;
    let c = batch
        .claimed
        .iter()
        .find(|c| c.record.id == x2)
        .expect("x2 must be claimable");
    let done = Transition::Complete { output: vec![] };
    assert_eq!(apply(store, commit(c, vec![], done)).await, applied(false));

    let list = |workflow: Option<&str>, status: Option<InstanceStatus>, limit: Option<usize>| {
        let filter = ListFilter {
            workflow: workflow.map(str::to_owned),
            status,
            limit,
        };
        async move {
            store
                .list_instances(filter)
                .await
                .unwrap_or_else(|e| panic!("list_instances failed: {e}"))
        }
    };
    let ids = |records: Vec<InstanceRecord>| records.into_iter().map(|r| r.id).collect::<Vec<_>>();

    assert_eq!(
        ids(list(Some(&x), None, None).await),
        vec![x3.clone(), x2.clone(), x1.clone()],
        "newest first, only the workflow asked for"
    );
    assert_eq!(ids(list(Some(&y), None, None).await), vec![y1.clone()]);
    assert_eq!(
        ids(list(Some(&x), None, Some(2)).await),
        vec![x3.clone(), x2.clone()],
        "limit"
    );
    assert!(list(Some(&unique("wf-none")), None, None).await.is_empty());
    assert_eq!(
        ids(list(Some(&x), Some(InstanceStatus::Completed), None).await),
        vec![x2.clone()],
        "workflow and status together"
    );
    assert_eq!(
        ids(list(Some(&x), Some(InstanceStatus::Running), None).await),
        vec![x3.clone(), x1.clone()]
    );
    assert!(list(Some(&x), Some(InstanceStatus::Failed), None)
        .await
        .is_empty());

    let completed = list(None, Some(InstanceStatus::Completed), Some(10_000)).await;
    assert!(
        completed
            .iter()
            .all(|r| r.status == InstanceStatus::Completed),
        "a status filter returns only that status"
    );
    assert!(
        completed.iter().any(|r| r.id == x2),
        "the completed instance is listed"
    );
    assert!(completed.iter().all(|r| r.id != y1));
    assert_eq!(
        list(None, None, Some(1)).await.len(),
        1,
        "limit without filters"
    );
    let everything = list(None, None, None).await;
    assert!(everything.len() <= 100, "the default limit is 100");
    assert!(everything.len() >= 4);
    let mut newest_first = everything.iter().map(|r| r.created_at).collect::<Vec<_>>();
    newest_first.dedup();
    assert!(
        newest_first.windows(2).all(|w| w[0] >= w[1]),
        "listing without filters is newest first"
    );
}

/// Claims running at the same time never hand out the same instance twice.
pub async fn concurrent_claims_never_share_an_instance(store: &dyn Store) {
    let wf = unique("wf");
    let mut all = HashSet::new();
    for _ in 0..20 {
        all.insert(create(store, &wf, 1).await);
    }
    let owners: Vec<String> = (0..4).map(|_| unique("owner")).collect();
    let claims = owners.iter().map(|owner| claim(store, owner, &wf, 8, LONG));
    let batches = futures::future::join_all(claims).await;
    let mut seen = HashSet::new();
    for batch in &batches {
        for c in &batch.claimed {
            assert!(
                seen.insert(c.record.id.clone()),
                "instance {} was claimed twice by concurrent claims",
                c.record.id
            );
        }
    }
    assert_eq!(seen, all, "every instance must be claimed exactly once");
}

/// `cancel_instances` may name a child created by the same commit, or the
/// committing instance itself: both get the request, as if it were made
/// right after the rest of the commit.
pub async fn cancel_instances_written_by_the_same_commit(store: &dyn Store) {
    let wf = unique("wf");
    let child_wf = unique("wf-child");
    let id = create(store, &wf, 1).await;
    let c = claim_one(store, &id, &wf, LONG).await;
    let mut child = new_instance(&child_wf, 1);
    child.parent_id = Some(id.clone());
    let child_id = child.id.clone();
    let mut first = commit(&c, vec![event(0, 0, "started")], Transition::None);
    first.new_instances = vec![child];
    first.cancel_instances = vec![child_id.clone(), id.clone()];
    let outcome = apply(store, first).await;
    assert!(
        matches!(outcome, CommitOutcome::Applied { .. }),
        "expected Applied, got {outcome:?}"
    );
    assert!(
        get(store, &child_id).await.cancel_requested,
        "a child created and cancelled by one commit must get the request"
    );
    assert!(
        get(store, &id).await.cancel_requested,
        "an instance may request its own cancellation"
    );
    assert_eq!(
        apply(store, commit(&c, vec![], Transition::None)).await,
        applied(true),
        "the lease holder sees its own cancel request"
    );
    let batch = store
        .claim(&request(&unique("owner"), &[(&child_wf, 1)], 10, LONG))
        .await
        .expect("claim");
    assert_eq!(ids(&batch), vec![child_id.as_str()]);
    assert!(batch.claimed[0].record.cancel_requested);
}

/// Signal ids keep increasing even after the newest signal was consumed.
pub async fn signal_ids_are_never_reused(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let c = claim_one(store, &id, &wf, LONG).await;
    let first = send(store, &id, "s", "first").await;
    let mut consume = commit(&c, vec![event(0, 0, "got")], Transition::None);
    consume.consume_signal = Some(first);
    assert_eq!(apply(store, consume).await, applied(false));
    let second = send(store, &id, "s", "second").await;
    assert!(
        second > first,
        "signal id {second} after consuming {first}: ids must not be reused"
    );
    let (signal, _) = next_signal(store, &id, "s").await;
    assert_eq!(signal.map(|s| s.signal_id), Some(second));
}

/// Continue-as-new is fenced like a commit, empties the journal, keeps the
/// id, inbox and cancel request, and makes the instance runnable at once;
/// the next run's journal starts at 0 under a newer lease.
pub async fn continue_as_new_restarts_with_an_empty_journal(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let c = claim_one(store, &id, &wf, LONG).await;
    let events: Vec<_> = (0..3).map(|i| event(i, i, "old")).collect();
    assert_eq!(
        apply(store, commit(&c, events, Transition::None)).await,
        applied(false)
    );
    let kept = send(store, &id, "s", "kept").await;

    // A stale lease writes nothing.
    assert_eq!(
        store
            .continue_as_new(&id, c.lease_token + 1, b"stale".to_vec())
            .await
            .expect("continue-as-new"),
        CommitOutcome::LeaseLost
    );
    assert_eq!(history(store, &id).await.len(), 3);

    assert_eq!(
        store
            .continue_as_new(&id, c.lease_token, b"next".to_vec())
            .await
            .expect("continue-as-new"),
        applied(false)
    );
    let record = get(store, &id).await;
    assert_eq!(record.status, InstanceStatus::Running);
    assert_eq!(record.input, b"next".to_vec());
    assert!(history(store, &id).await.is_empty());
    let (signal, _) = next_signal(store, &id, "s").await;
    assert_eq!(signal.map(|s| s.signal_id), Some(kept), "the inbox is kept");

    // The old lease is gone; the instance is claimable at once.
    assert_eq!(
        apply(
            store,
            commit(&c, vec![event(0, 0, "late")], Transition::None)
        )
        .await,
        CommitOutcome::LeaseLost
    );
    let again = claim_one(store, &id, &wf, LONG).await;
    assert!(again.lease_token > c.lease_token);
    assert_eq!(again.next_event_id, 0);
    assert_eq!(again.record.input, b"next".to_vec());
    assert_eq!(
        apply(
            store,
            commit(&again, vec![event(0, 0, "new")], Transition::None)
        )
        .await,
        applied(false)
    );
    let journal = history(store, &id).await;
    assert_eq!(journal.len(), 1);
    assert_eq!(journal[0].kind, "new");

    // Unknown instances are reported, finished ones refuse.
    assert!(matches!(
        store
            .continue_as_new(&unique("missing"), 1, Vec::new())
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(
        apply(
            store,
            commit(&again, vec![], Transition::Complete { output: Vec::new() })
        )
        .await,
        applied(false)
    );
    assert_eq!(
        store
            .continue_as_new(&id, again.lease_token, Vec::new())
            .await
            .expect("continue-as-new"),
        CommitOutcome::LeaseLost
    );
}

#[cfg(all(test, feature = "memory"))]
mod memory_store {
    crate::store_conformance_tests!(async {
        std::sync::Arc::new(crate::store::memory::MemoryStore::new())
    });

    #[tokio::test]
    async fn whole_suite_on_one_store() {
        let store = crate::store::memory::MemoryStore::new();
        crate::store::conformance::run_all(&store).await;
    }
}

/// `get_if_finished` tells an unknown id and an unfinished instance apart,
/// and hands over the same record as `get_instance` once it finished.
pub async fn get_if_finished_reads_only_finished_instances(store: &dyn Store) {
    let lookup = |id: String| async move {
        store
            .get_if_finished(&id)
            .await
            .unwrap_or_else(|e| panic!("get_if_finished({id}) failed: {e}"))
    };
    match lookup(unique("missing")).await {
        FinishedLookup::NotFound => {}
        other => panic!("an unknown id is NotFound, got {other:?}"),
    }
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    match lookup(id.clone()).await {
        FinishedLookup::Unfinished => {}
        other => panic!("a new instance is Unfinished, got {other:?}"),
    }
    let c = claim_one(store, &id, &wf, LONG).await;
    let park = Transition::Park {
        wake_at: None,
        seen_inbox: c.inbox_seq,
    };
    assert_eq!(apply(store, commit(&c, vec![], park)).await, applied(false));
    match lookup(id.clone()).await {
        FinishedLookup::Unfinished => {}
        other => panic!("a parked instance is Unfinished, got {other:?}"),
    }
    for transition in [
        Transition::Complete {
            output: b"out".to_vec(),
        },
        Transition::Fail {
            failure: b"bad".to_vec(),
        },
        Transition::Cancel {
            failure: b"stop".to_vec(),
        },
    ] {
        let (_, id) = finished_instance(store, transition).await;
        let expected = get(store, &id).await;
        match lookup(id.clone()).await {
            FinishedLookup::Finished(r) => {
                assert_eq!(r.id, expected.id);
                assert_eq!(r.status, expected.status);
                assert_eq!(r.output, expected.output);
                assert_eq!(r.failure, expected.failure);
                assert_eq!(r.input, expected.input);
            }
            other => panic!(
                "a {:?} instance is Finished, got {other:?}",
                expected.status
            ),
        }
    }
}

/// [`Store::commit_now`] either hands the commit back untouched, writing
/// nothing, or answers what [`Store::commit`] would have: applied, fenced
/// out, or a conflict, with the same effects.
pub async fn commit_now_commits_as_commit_does_or_hands_back(store: &dyn Store) {
    let wf = unique("wf");
    let id = create(store, &wf, 1).await;
    let stale = claim_one(store, &id, &wf, EXPIRED).await;
    let current = claim_one(store, &id, &wf, LONG).await;

    let first = commit(&current, vec![event(0, 0, "first")], Transition::None);
    assert_eq!(
        commit_now(store, first).await.expect("commit_now"),
        applied(false),
        "a fenced commit under the current lease applies"
    );
    assert_eq!(history(store, &id).await, vec![event(0, 0, "first")]);

    let fenced = commit(
        &stale,
        vec![event(1, 1, "stale")],
        Transition::Complete {
            output: b"stale".to_vec(),
        },
    );
    assert_eq!(
        commit_now(store, fenced).await.expect("commit_now"),
        CommitOutcome::LeaseLost,
        "a stale token is fenced out"
    );
    let gap = commit(&current, vec![event(5, 5, "gap")], Transition::None);
    assert!(
        matches!(commit_now(store, gap).await, Err(StoreError::Conflict(_))),
        "an entry past the journal's end is a conflict"
    );
    assert_eq!(
        history(store, &id).await,
        vec![event(0, 0, "first")],
        "neither the fenced-out nor the conflicting commit wrote"
    );
    assert_eq!(get(store, &id).await.status, InstanceStatus::Running);

    let last = commit(
        &current,
        vec![event(1, 1, "last")],
        Transition::Complete {
            output: b"done".to_vec(),
        },
    );
    assert_eq!(
        commit_now(store, last).await.expect("commit_now"),
        applied(false)
    );
    let r = get(store, &id).await;
    assert_eq!(r.status, InstanceStatus::Completed);
    assert_eq!(r.output.as_deref(), Some(&b"done"[..]));
}

/// `c` through [`Store::commit_now`], and through [`Store::commit`] if that
/// hands it back, which it must do unchanged.
async fn commit_now(store: &dyn Store, c: Commit) -> StoreResult<CommitOutcome> {
    let sent = format!("{c:?}");
    match store.commit_now(c) {
        CommitNow::Done(outcome) => outcome,
        CommitNow::Later(back) => {
            assert_eq!(format!("{back:?}"), sent, "a commit handed back unchanged");
            store.commit(back).await
        }
    }
}
