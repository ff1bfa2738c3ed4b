//! The DAG API's tests; each takes a fresh store of the backend under test.

use std::sync::Arc;
use std::time::Duration;

use fluxo::dag::{Dag, DagOutput, Key, NodeCtx};
use fluxo::history::Event;
use fluxo::middleware::MiddlewareStack;
use fluxo::middleware_builtin::{MiddlewareStackExt, ValidationMiddleware};
use fluxo::prelude::*;
use fluxo::store::Store;
use fluxo::Error;
use serde_json::{json, Value};

use crate::common;
use crate::helpers::*;

fn id() -> String {
    StepContext::current().unwrap().workflow_id().to_owned()
}

/// Logs `what` in the instance's ordered log.
fn log(what: String) {
    common::push_log(&id(), &what);
}

fn position(log: &[String], what: &str) -> usize {
    log.iter()
        .position(|l| l == what)
        .unwrap_or_else(|| panic!("{what:?} not in {log:?}"))
}

/// A node that logs its start and end and returns its name.
fn logged(name: &'static str) -> impl Fn(NodeCtx) -> futures_like::Ready + Send + Sync {
    move |_n: NodeCtx| {
        ran();
        log(format!("start {name}"));
        log(format!("end {name}"));
        futures_like::ready(Ok(json!(name)))
    }
}

mod futures_like {
    use fluxo::StepError;
    use serde_json::Value;

    pub type Ready = std::future::Ready<Result<Value, StepError>>;

    pub fn ready(v: Result<Value, StepError>) -> Ready {
        std::future::ready(v)
    }
}

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(attempts)
        .initial_interval(Duration::from_millis(10))
        .jitter(0.0)
}

fn expect_failure(result: Result<DagOutput, Error>) -> WorkflowError {
    match result {
        Err(Error::WorkflowFailed { error, .. }) => *error,
        other => panic!("expected WorkflowFailed, got {other:?}"),
    }
}

pub async fn dependency_order_and_outputs(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let dag = Dag::builder("diamond")
        .node("validate", |n: NodeCtx| async move {
            ran();
            log("start validate".into());
            tokio::time::sleep(Duration::from_millis(20)).await;
            log("end validate".into());
            Ok(n.input()["order"].clone())
        })
        .node("pay", |n: NodeCtx| async move {
            ran();
            log("start pay".into());
            // Only finishes if `reserve` runs at the same time.
            tokio::time::timeout(
                Duration::from_secs(10),
                common::wait_gate(&format!("{}/reserve", id())),
            )
            .await
            .map_err(|_| StepError::fatal("pay and reserve did not run concurrently"))?;
            log("end pay".into());
            Ok(json!(format!("paid {}", n.output("validate").unwrap())))
        })
        .depends_on(["validate"])
        .node("reserve", |_n: NodeCtx| async move {
            ran();
            log("start reserve".into());
            common::open_gate(&format!("{}/reserve", id()));
            log("end reserve".into());
            Ok(json!("reserved"))
        })
        .depends_on(["validate"])
        .node("ship", |n: NodeCtx| async move {
            ran();
            log("start ship".into());
            log("end ship".into());
            Ok(json!([n.output("pay"), n.output("reserve")]))
        })
        .depends_on(["pay", "reserve"])
        .build()
        .unwrap();
    dag.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = dag.start(&fluxo, json!({ "order": 42 })).await.unwrap();
    let out: DagOutput = h.result_timeout(WAIT).await.unwrap();
    assert_eq!(out.output("ship"), Some(&json!(["paid 42", "reserved"])));
    assert_eq!(out.outputs.len(), 4);
    assert!(out.bypassed.is_empty() && out.failed.is_empty());
    let log = common::log_of(h.id());
    for (before, after) in [
        ("end validate", "start pay"),
        ("end validate", "start reserve"),
        ("end pay", "start ship"),
        ("end reserve", "start ship"),
    ] {
        assert!(position(&log, before) < position(&log, after), "{log:?}");
    }
    for n in ["validate", "pay", "reserve", "ship"] {
        assert_eq!(runs(h.id(), n), 1);
    }
    assert_journal_sound(&fluxo, h.id()).await;
    w.shutdown().await;
}

pub async fn concurrency_limit(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let mut b = Dag::builder("limited").concurrency(2);
    for i in 0..6 {
        b = b.node(format!("n{i}"), move |_n: NodeCtx| async move {
            let id = id();
            enter(&id);
            tokio::time::sleep(Duration::from_millis(30)).await;
            leave(&id);
            Ok(json!(i))
        });
    }
    let dag = b.build().unwrap();
    dag.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = dag.start(&fluxo, ()).await.unwrap();
    let out: DagOutput = h.result_timeout(WAIT).await.unwrap();
    assert_eq!(out.outputs.len(), 6);
    assert_eq!(max_in_flight(h.id()), 2);
    w.shutdown().await;
}

pub async fn retry_and_timeout(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let dag = Dag::builder("retries")
        .node("flaky", |_n: NodeCtx| async move {
            if ran() < 3 {
                return Err(StepError::retryable("blip"));
            }
            Ok(json!("ok"))
        })
        .retry(fast_retry(3))
        .build()
        .unwrap();
    let slow = Dag::builder("slow")
        .node("sleepy", |_n: NodeCtx| async move {
            ran();
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(json!("late"))
        })
        .timeout(Duration::from_millis(50))
        .retry(RetryPolicy::none())
        .node("after", logged("after"))
        .depends_on(["sleepy"])
        .build()
        .unwrap();
    dag.register(&fluxo).unwrap();
    slow.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = dag.start(&fluxo, ()).await.unwrap();
    let out: DagOutput = h.result_timeout(WAIT).await.unwrap();
    assert_eq!(out.output("flaky"), Some(&json!("ok")));
    assert_eq!(runs(h.id(), "flaky"), 3);
    let h = slow.start(&fluxo, ()).await.unwrap();
    let error = expect_failure(h.result_timeout(WAIT).await);
    assert_eq!(error.kind(), "NodeFailed");
    assert!(error.message().contains("sleepy") && error.message().contains("Timeout"));
    assert_eq!(runs(h.id(), "after"), 0);
    w.shutdown().await;
}

fn payment_dag() -> Dag {
    Dag::builder("payment")
        .node("start", logged("start"))
        .choice("route")
        .depends_on(["start"])
        .branch("card", |n| n.input()["method"] == "card")
        .branch("invoice", |n| n.input()["method"] == "invoice")
        .otherwise("manual")
        .node("card", logged("card"))
        .node("invoice", logged("invoice"))
        .node("manual", logged("manual"))
        .node("card_receipt", logged("card_receipt"))
        .depends_on(["card"])
        .node("notify", logged("notify"))
        .depends_on(["card_receipt", "invoice"])
        .node("archive", logged("archive"))
        .depends_on(["card_receipt"])
        .node("done", logged("done"))
        .depends_on(["start"])
        .build()
        .unwrap()
}

pub async fn choice_and_bypass(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let dag = payment_dag();
    assert_eq!(dag.dependencies("card"), Some(vec!["route"]));
    dag.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    for (method, route, bypassed) in [
        ("card", json!("card"), vec!["invoice", "manual"]),
        (
            "invoice",
            json!("invoice"),
            vec!["card", "manual", "card_receipt", "archive"],
        ),
        (
            "cash",
            json!("manual"),
            vec!["card", "invoice", "card_receipt", "notify", "archive"],
        ),
    ] {
        let h = dag
            .start(&fluxo, json!({ "method": method }))
            .await
            .unwrap();
        let out: DagOutput = h.result_timeout(WAIT).await.unwrap();
        assert_eq!(out.output("route"), Some(&route), "{method}");
        assert_eq!(out.bypassed, bypassed, "{method}");
        for node in &bypassed {
            assert_eq!(runs(h.id(), node), 0, "{node} was bypassed");
            assert!(out.output(node).is_none());
        }
        assert_eq!(runs(h.id(), "done"), 1);
        // The choice is journaled under the node's name.
        assert!(step_names(&fluxo, h.id())
            .await
            .contains(&"route".to_owned()));
    }
    w.shutdown().await;
}

pub async fn continue_on_error(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let dag = Dag::builder("tolerant")
        .node("optional", |_n: NodeCtx| async move {
            ran();
            Err(StepError::fatal("not today").with_kind("Nope"))
        })
        .continue_on_error()
        .node("after", |n: NodeCtx| async move {
            ran();
            Ok(json!(n.output("optional").is_none()))
        })
        .depends_on(["optional"])
        .build()
        .unwrap();
    dag.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = dag.start(&fluxo, ()).await.unwrap();
    let out: DagOutput = h.result_timeout(WAIT).await.unwrap();
    assert_eq!(out.output("after"), Some(&json!(true)));
    assert!(out.failed["optional"].contains("not today"));
    assert_eq!(h.status().await.unwrap(), WorkflowStatus::Completed);
    w.shutdown().await;
}

const TOTAL: Key<u64> = Key::new("total");
const NOTE: Key<String> = Key::new("note");
const MISSING: Key<u32> = Key::new("missing");

pub async fn shared_data(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let dag = Dag::builder("data")
        .node("a", |n: NodeCtx| async move {
            n.set(&TOTAL, 10);
            assert_eq!(n.get(&TOTAL), Some(10), "own writes are visible");
            Ok(json!(1))
        })
        .node("b", |n: NodeCtx| async move {
            let t = n.get(&TOTAL).unwrap_or_default();
            n.set(&TOTAL, t * 2);
            Ok(json!(n.output_as::<u64>("a")? + 1))
        })
        .depends_on(["a"])
        .node("c", |n: NodeCtx| async move {
            // Not downstream of `a`: its writes are not visible here.
            n.set(&NOTE, "from c".to_owned());
            Ok(json!(n.get(&TOTAL)))
        })
        .node("d", |n: NodeCtx| async move {
            Ok(json!({
                "total": n.get(&TOTAL),
                "note": n.data().get(&NOTE),
                "missing": n.get_or(&MISSING, 5),
                "missing_output": n.output_as::<u64>("zzz").is_err(),
            }))
        })
        .depends_on(["b", "c"])
        .build()
        .unwrap();
    dag.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = dag.start(&fluxo, ()).await.unwrap();
    let out: DagOutput = h.result_timeout(WAIT).await.unwrap();
    assert_eq!(out.output("b"), Some(&json!(2)));
    assert_eq!(out.output("c"), Some(&Value::Null));
    assert_eq!(
        out.output("d"),
        Some(&json!({ "total": 20, "note": "from c", "missing": 5, "missing_output": true }))
    );
    assert_eq!(out.get(&TOTAL), Some(20));
    assert_eq!(out.data.get(&NOTE).as_deref(), Some("from c"));
    w.shutdown().await;
}

pub async fn compensation_in_reverse_order(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let undo = |name: &'static str| {
        move |c: fluxo::dag::Compensation| async move {
            let s = StepContext::current().unwrap();
            common::push_log(s.workflow_id(), &format!("undo {name} {}", c.output()));
            assert_eq!(c.node(), name);
            Ok(())
        }
    };
    let dag = Dag::builder("saga")
        .node("reserve", logged("reserve"))
        .compensate(undo("reserve"))
        .node("charge", logged("charge"))
        .depends_on(["reserve"])
        .compensate(undo("charge"))
        .node("ship", |_n: NodeCtx| async move {
            ran();
            Err(StepError::fatal("truck on fire"))
        })
        .depends_on(["charge"])
        .node("email", logged("email"))
        .depends_on(["reserve"])
        .compensate(undo("email"))
        .node("never", logged("never"))
        .depends_on(["ship"])
        .compensate(undo("never"))
        .build()
        .unwrap();
    assert_eq!(
        dag.topological_order(),
        ["reserve", "charge", "ship", "email", "never"]
    );
    dag.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = dag.start(&fluxo, ()).await.unwrap();
    let error = expect_failure(h.result_timeout(WAIT).await);
    assert_eq!(error.kind(), "NodeFailed");
    assert!(error.message().contains("ship"), "{error}");
    let undone: Vec<String> = common::log_of(h.id())
        .into_iter()
        .filter(|l| l.starts_with("undo"))
        .collect();
    assert_eq!(
        undone,
        [
            "undo email \"email\"",
            "undo charge \"charge\"",
            "undo reserve \"reserve\""
        ]
    );
    assert_eq!(runs(h.id(), "never"), 0);
    let names = step_names(&fluxo, h.id()).await;
    assert!(names.ends_with(&[
        "compensate email".to_owned(),
        "compensate charge".to_owned(),
        "compensate reserve".to_owned()
    ]));
    w.shutdown().await;
}

pub async fn cancellation_stops_unstarted_nodes(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let dag = Dag::builder("cancellable")
        .node("a", logged("a"))
        .compensate(|c: fluxo::dag::Compensation| async move {
            let s = StepContext::current().unwrap();
            common::push_log(s.workflow_id(), &format!("undo {}", c.node()));
            Ok(())
        })
        .node("b", |_n: NodeCtx| async move {
            ran();
            let s = StepContext::current().unwrap();
            tokio::select! {
                _ = s.cancelled() => Err(StepError::fatal("cancelled")),
                _ = tokio::time::sleep(Duration::from_secs(60)) => Ok(json!("b")),
            }
        })
        .depends_on(["a"])
        .node("c", logged("c"))
        .depends_on(["b"])
        .build()
        .unwrap();
    dag.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = dag.start(&fluxo, ()).await.unwrap();
    until("b started", || runs(h.id(), "b") == 1).await;
    h.cancel().await.unwrap();
    assert!(matches!(
        h.result_timeout::<DagOutput>(WAIT).await,
        Err(Error::Cancelled { .. })
    ));
    assert_eq!(h.status().await.unwrap(), WorkflowStatus::Cancelled);
    assert_eq!(runs(h.id(), "c"), 0, "c had not started: it never does");
    assert!(common::log_of(h.id()).contains(&"undo a".to_owned()));
    w.shutdown().await;
}

pub async fn middleware_on_nodes(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let strict = MiddlewareStack::new().with(ValidationMiddleware::new().output(|v| {
        if v.is_string() {
            Ok(())
        } else {
            Err("outputs must be strings".into())
        }
    }));
    let checked = MiddlewareStack::new()
        .with(ValidationMiddleware::new().input(|v| {
            if v["user"].is_string() {
                Ok(())
            } else {
                Err("no user".into())
            }
        }))
        .apply(|n: NodeCtx| async move { Ok(json!(format!("hi {}", n.input()["user"]))) });
    let dag = Dag::builder("validated")
        .middleware(strict)
        .node("greet", checked)
        .node("count", |_n: NodeCtx| async move {
            ran();
            Ok(json!(3))
        })
        .continue_on_error()
        .build()
        .unwrap();
    dag.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = dag.start(&fluxo, json!({ "user": "ana" })).await.unwrap();
    let out: DagOutput = h.result_timeout(WAIT).await.unwrap();
    assert_eq!(out.output("greet"), Some(&json!("hi \"ana\"")));
    assert!(out.failed["count"].contains("outputs must be strings"));
    assert_eq!(
        runs(h.id(), "count"),
        1,
        "validation failures are not retried"
    );
    let h = dag.start(&fluxo, json!({})).await.unwrap();
    let error = expect_failure(h.result_timeout(WAIT).await);
    assert!(error.message().contains("no user"), "{error}");
    w.shutdown().await;
}

// ----- crash and replay -----------------------------------------------------

pub async fn level_resumes_after_eviction(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let dag = Dag::builder("evicted")
        .node("start", logged("start"))
        .node("x", logged("x"))
        .depends_on(["start"])
        .node("y", logged("y"))
        .depends_on(["start"])
        .node("flaky", |_n: NodeCtx| async move {
            if ran() == 1 {
                return Err(StepError::retryable("first attempt fails"));
            }
            Ok(json!("flaky"))
        })
        .depends_on(["start"])
        // A back-off over a second is a durable timer: the instance parks
        // and, with no cache, is evicted and later replayed. Long enough
        // that a slow server's park commit still leaves it parked a while.
        .retry(
            RetryPolicy::default()
                .max_attempts(2)
                .initial_interval(Duration::from_millis(3_000))
                .jitter(0.0),
        )
        .node("end", logged("end"))
        .depends_on(["x", "y", "flaky"])
        .build()
        .unwrap();
    dag.register(&fluxo).unwrap();
    let w = evicting_worker(&fluxo);
    let h = dag.start(&fluxo, ()).await.unwrap();
    until_async("the instance is parked and evicted", || async {
        runs(h.id(), "flaky") == 1 && w.live_instances() == 0
    })
    .await;
    let out: DagOutput = h.result_timeout(WAIT).await.unwrap();
    assert_eq!(out.outputs.len(), 5);
    for n in ["start", "x", "y", "end"] {
        assert_eq!(runs(h.id(), n), 1, "{n} ran once");
    }
    assert_eq!(runs(h.id(), "flaky"), 2);
    assert_journal_sound(&fluxo, h.id()).await;
    w.shutdown().await;
}

pub async fn level_resumes_after_worker_stop(store: Arc<dyn Store>) {
    let hanging = |name: &'static str, hang: bool| {
        move |_n: NodeCtx| async move {
            if ran() == 1 && hang {
                std::future::pending::<()>().await;
            }
            completed();
            Ok(json!(name))
        }
    };
    let dag = Dag::builder("stopped")
        .node("start", hanging("start", false))
        .node("p", hanging("p", false))
        .depends_on(["start"])
        .node("q", hanging("q", true))
        .depends_on(["start"])
        .node("r", hanging("r", false))
        .depends_on(["start"])
        .node("end", hanging("end", false))
        .depends_on(["p", "q", "r"])
        .build()
        .unwrap();
    let fluxo = fluxo_on(&store);
    dag.register(&fluxo).unwrap();
    let w = stoppable_worker(&fluxo);
    let h = dag.start(&fluxo, ()).await.unwrap();
    until("p and r finished while q hangs", || {
        runs(h.id(), "q") == 1 && completions(h.id(), "p") == 1 && completions(h.id(), "r") == 1
    })
    .await;
    // Give the completions time to be committed before the crash.
    until_async("p and r are journaled", || async {
        let names = step_names(&fluxo, h.id()).await;
        names.contains(&"p".to_owned()) && names.contains(&"r".to_owned())
    })
    .await;
    w.shutdown().await;
    let fluxo = fluxo_on(&store);
    dag.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = fluxo::flow::FlowHandle::new(&fluxo, "stopped", h.id());
    let out: DagOutput = h.result_timeout(WAIT).await.unwrap();
    assert_eq!(out.output("end"), Some(&json!("end")));
    for n in ["start", "p", "r", "end"] {
        assert_eq!(runs(h.id(), n), 1, "{n} ran once");
    }
    assert_eq!(runs(h.id(), "q"), 2, "its entry was not committed");
    assert_eq!(completions(h.id(), "q"), 1);
    let decisions = count_events(
        &fluxo,
        h.id(),
        |e| matches!(e, Event::StepCompleted { name, .. } if name.starts_with("stopped#next")),
    )
    .await;
    assert!(decisions >= 2, "scheduling decisions are journaled");
    assert_journal_sound(&fluxo, h.id()).await;
    w.shutdown().await;
}
