//! The DAG API (`fluxo::dag`) on every backend, build-time checks, and
//! property tests over random DAGs (in-memory backend). Adding a backend
//! means adding one line to `backend_tests!` in `tests/common/mod.rs`.

#[macro_use]
mod common;
#[path = "flow/helpers.rs"]
mod helpers;
#[path = "dag/suite.rs"]
mod suite;

use std::collections::BTreeSet;
use std::sync::OnceLock;
use std::time::Duration;

use fluxo::dag::{Dag, DagError, DagOutput, NodeCtx};
use fluxo::prelude::*;
use fluxo::Error;
use proptest::prelude::*;
use serde_json::{json, Value};

backend_tests!(
    dependency_order_and_outputs,
    concurrency_limit,
    retry_and_timeout,
    choice_and_bypass,
    continue_on_error,
    shared_data,
    compensation_in_reverse_order,
    cancellation_stops_unstarted_nodes,
    middleware_on_nodes,
    level_resumes_after_eviction,
    level_resumes_after_worker_stop,
);

fn ok_node(_n: NodeCtx) -> std::future::Ready<Result<Value, StepError>> {
    std::future::ready(Ok(Value::Null))
}

#[test]
fn build_rejects_invalid_graphs_with_typed_errors() {
    let cycle = Dag::builder("c")
        .node("a", ok_node)
        .depends_on(["c"])
        .node("b", ok_node)
        .depends_on(["a"])
        .node("c", ok_node)
        .depends_on(["b"])
        .build()
        .unwrap_err();
    assert_eq!(
        cycle,
        DagError::Cycle {
            path: vec!["a".into(), "b".into(), "c".into(), "a".into()]
        }
    );
    assert_eq!(cycle.to_string(), "dependency cycle: a -> b -> c -> a");

    let own = Dag::builder("own")
        .node("a", ok_node)
        .depends_on(["a"])
        .build();
    assert_eq!(own.unwrap_err().to_string(), "dependency cycle: a -> a");

    let unknown = Dag::builder("u")
        .node("a", ok_node)
        .depends_on(["ghost"])
        .build()
        .unwrap_err();
    assert_eq!(
        unknown,
        DagError::UnknownDependency {
            node: "a".into(),
            dependency: "ghost".into()
        }
    );
    assert!(unknown.to_string().contains("unknown node \"ghost\""));

    let dup = Dag::builder("d")
        .node("a", ok_node)
        .node("a", ok_node)
        .build()
        .unwrap_err();
    assert_eq!(dup, DagError::DuplicateNode { name: "a".into() });

    let target = Dag::builder("t")
        .choice("route")
        .branch("nowhere", |_| true)
        .build()
        .unwrap_err();
    assert!(
        matches!(target, DagError::UnknownBranchTarget { .. }),
        "{target}"
    );

    let misuse = Dag::builder("m")
        .depends_on(["a"])
        .node("a", ok_node)
        .build();
    assert!(matches!(
        misuse,
        Err(DagError::Misuse {
            method: "depends_on",
            ..
        })
    ));
    let not_choice = Dag::builder("m")
        .node("a", ok_node)
        .branch("a", |_| true)
        .build();
    assert!(matches!(
        not_choice,
        Err(DagError::Misuse {
            method: "branch",
            ..
        })
    ));
    let bad_name = Dag::builder("n").node("a#b", ok_node).build();
    assert!(matches!(bad_name, Err(DagError::InvalidName { .. })));
    let zero = Dag::builder("z").node("a", ok_node).concurrency(0).build();
    assert!(matches!(zero, Err(DagError::Misuse { .. })));
}

// ----- property tests ---------------------------------------------------------

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A random acyclic graph: node `j` may depend on any node `i < j`.
#[derive(Debug, Clone)]
struct Spec {
    deps: Vec<Vec<usize>>,
    delays: Vec<u64>,
    concurrency: usize,
}

fn spec() -> impl Strategy<Value = Spec> {
    (1usize..8).prop_flat_map(|n| {
        (
            proptest::collection::vec(proptest::collection::vec(any::<bool>(), n), n),
            proptest::collection::vec(0u64..4, n),
            1usize..4,
        )
            .prop_map(move |(bits, delays, concurrency)| Spec {
                deps: (0..n)
                    .map(|j| (0..j).filter(|&i| bits[j][i]).collect())
                    .collect(),
                delays,
                concurrency,
            })
    })
}

fn name(i: usize) -> String {
    format!("n{i}")
}

/// Node `j` outputs `input + j + sum of its dependencies' outputs`, logging
/// its start and end; `blocker` waits until the workflow is cancelled.
fn build(spec: &Spec, dag: &str, blocker: Option<usize>) -> Dag {
    let mut b = Dag::builder(dag).concurrency(spec.concurrency);
    for (j, deps) in spec.deps.iter().enumerate() {
        let deps = deps.clone();
        let delay = spec.delays[j];
        let block = blocker == Some(j);
        let dep_names: Vec<String> = deps.iter().map(|&d| name(d)).collect();
        b = b
            .node(name(j), move |n: NodeCtx| {
                let deps = deps.clone();
                async move {
                    let s = StepContext::current().unwrap();
                    let id = s.workflow_id().to_owned();
                    common::bump(format!("{id}/{}", name(j)));
                    common::push_log(&id, &format!("start {j}"));
                    if block {
                        s.cancelled().await;
                        return Err(StepError::fatal("cancelled"));
                    }
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    let mut v = n.input().as_i64().unwrap_or_default() + j as i64;
                    for d in deps {
                        v += n.output_as::<i64>(&name(d))?;
                    }
                    common::push_log(&id, &format!("end {j}"));
                    Ok(json!(v))
                }
            })
            .retry(RetryPolicy::none())
            .depends_on(dep_names);
    }
    b.build().unwrap()
}

fn model(spec: &Spec, input: i64) -> Vec<i64> {
    let mut out: Vec<i64> = Vec::new();
    for (j, deps) in spec.deps.iter().enumerate() {
        out.push(input + j as i64 + deps.iter().map(|&d| out[d]).sum::<i64>());
    }
    out
}

async fn check_random_dag(spec: Spec, input: i64) {
    let fluxo = Fluxo::in_memory();
    let dag = build(&spec, "random", None);
    dag.register(&fluxo).unwrap();
    let w = helpers::worker(&fluxo);
    let expected = model(&spec, input);
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let h = dag.start(&fluxo, input).await.unwrap();
        let out: DagOutput = h.result_timeout(helpers::WAIT).await.unwrap();
        let log = common::log_of(h.id());
        let at = |what: String| log.iter().position(|l| *l == what).unwrap();
        for (j, deps) in spec.deps.iter().enumerate() {
            assert_eq!(common::count(&format!("{}/{}", h.id(), name(j))), 1);
            assert_eq!(out.output(&name(j)), Some(&json!(expected[j])));
            for &d in deps {
                assert!(
                    at(format!("end {d}")) < at(format!("start {j}")),
                    "{j} started before its dependency {d} ended: {log:?}"
                );
            }
        }
        outputs.push(out);
    }
    assert_eq!(outputs[0], outputs[1], "same input, same output");
    w.shutdown().await;
}

async fn check_cancellation(spec: Spec, blocker: usize) {
    let fluxo = Fluxo::in_memory();
    let dag = build(&spec, "cancelled", Some(blocker));
    dag.register(&fluxo).unwrap();
    // A running instance learns of a cancel request when its lease is
    // renewed (every third of the lease): keep it short.
    let w = fluxo
        .worker()
        .lease(Duration::from_millis(600))
        .poll_interval(Duration::from_millis(10))
        .spawn();
    let h = dag.start(&fluxo, 1).await.unwrap();
    let key = format!("{}/{}", h.id(), name(blocker));
    helpers::until("the blocker started", || common::count(&key) == 1).await;
    h.cancel().await.unwrap();
    assert!(matches!(
        h.result_timeout::<DagOutput>(helpers::WAIT).await,
        Err(Error::Cancelled { .. })
    ));
    let started = common::log_of(h.id()).len();
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(
        common::log_of(h.id()).len(),
        started,
        "nothing starts after"
    );
    // Nodes downstream of the blocker had not started, and never do.
    let mut downstream = BTreeSet::from([blocker]);
    for (j, deps) in spec.deps.iter().enumerate() {
        if deps.iter().any(|d| downstream.contains(d)) {
            downstream.insert(j);
        }
    }
    for j in downstream.into_iter().filter(|&j| j != blocker) {
        assert_eq!(common::count(&format!("{}/{}", h.id(), name(j))), 0, "{j}");
    }
    w.shutdown().await;
}

/// A graph with a cycle through `cycle` (each node depending on the one
/// before it, the first on the last) and random forward edges.
fn cyclic() -> impl Strategy<Value = (Vec<Vec<usize>>, Vec<usize>)> {
    (2usize..8).prop_flat_map(|n| {
        (
            proptest::collection::vec(proptest::collection::vec(any::<bool>(), n), n),
            Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
            1usize..=n,
        )
            .prop_map(move |(bits, order, k)| {
                let mut deps: Vec<Vec<usize>> = (0..n)
                    .map(|j| (0..j).filter(|&i| bits[j][i]).collect())
                    .collect();
                let cycle: Vec<usize> = order[..k].to_vec();
                for w in 0..k {
                    let (from, to) = (cycle[w], cycle[(w + 1) % k]);
                    if !deps[to].contains(&from) {
                        deps[to].push(from);
                    }
                }
                (deps, cycle)
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn random_dags_respect_dependencies_and_are_deterministic(spec in spec(), input in -50i64..50) {
        rt().block_on(check_random_dag(spec, input));
    }

    #[test]
    fn cancellation_stops_nodes_that_have_not_started(spec in spec(), pick in any::<prop::sample::Index>()) {
        let blocker = pick.index(spec.deps.len());
        rt().block_on(check_cancellation(spec, blocker));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn build_always_detects_cycles((deps, _cycle) in cyclic()) {
        let mut b = Dag::builder("cyclic");
        for (j, ds) in deps.iter().enumerate() {
            b = b.node(name(j), ok_node).depends_on(ds.iter().map(|&d| name(d)));
        }
        match b.build() {
            Err(DagError::Cycle { path }) => {
                prop_assert!(path.len() >= 2);
                prop_assert_eq!(path.first(), path.last());
                for pair in path.windows(2) {
                    let from: usize = pair[0][1..].parse().unwrap();
                    let to: usize = pair[1][1..].parse().unwrap();
                    prop_assert!(deps[to].contains(&from), "{:?} is not an edge", pair);
                }
            }
            other => prop_assert!(false, "expected a cycle, got {:?}", other.map(|d| d.name().to_owned())),
        }
    }

    #[test]
    fn acyclic_graphs_build_in_dependency_order(spec in spec()) {
        let dag = build(&spec, "acyclic", None);
        let order = dag.topological_order();
        let pos = |n: &str| order.iter().position(|o| *o == n).unwrap();
        for (j, deps) in spec.deps.iter().enumerate() {
            for &d in deps {
                prop_assert!(pos(&name(d)) < pos(&name(j)));
            }
        }
    }
}
