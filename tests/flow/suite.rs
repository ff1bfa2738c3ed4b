//! The builder API's tests; each takes a fresh store of the backend under
//! test.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fluxo::flow::{step, Flow};
use fluxo::history::Event;
use fluxo::middleware::{BoxFuture, Middleware, MiddlewareStack, Next, StepInfo};
use fluxo::middleware_builtin::{
    LoggingMiddleware, MiddlewareStackExt, RetryMiddleware, TimeoutMiddleware, ValidationMiddleware,
};
use fluxo::prelude::*;
use fluxo::store::Store;
use fluxo::Error;
use serde_json::{json, Value};

use crate::common;
use crate::helpers::*;

fn num(v: &Value) -> i64 {
    v.as_i64().unwrap_or_default()
}

fn sum(v: &Value) -> i64 {
    v.as_array()
        .map(|a| a.iter().map(num).sum())
        .unwrap_or_default()
}

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(attempts)
        .initial_interval(Duration::from_millis(10))
        .jitter(0.0)
}

fn expect_failure(result: Result<Value, Error>) -> WorkflowError {
    match result {
        Err(Error::WorkflowFailed { error, .. }) => *error,
        other => panic!("expected WorkflowFailed, got {other:?}"),
    }
}

pub async fn steps_chain(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let flow = Flow::new("chain")
        .step("add1", |v: Value| async move {
            ran();
            Ok(json!(num(&v) + 1))
        })
        .step("double", |v: Value| async move {
            ran();
            Ok(json!(num(&v) * 2))
        });
    flow.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = flow.start(&fluxo, 3).await.unwrap();
    assert_eq!(h.result_timeout::<i64>(WAIT).await.unwrap(), 8);
    assert_eq!(step_names(&fluxo, h.id()).await, ["add1", "double"]);
    assert_eq!(runs(h.id(), "add1"), 1);
    assert_eq!(runs(h.id(), "double"), 1);
    assert_eq!(h.status().await.unwrap(), WorkflowStatus::Completed);
    // A typed result that does not decode is a typed error.
    assert!(matches!(h.result::<String>().await, Err(Error::Decode(_))));
    assert_journal_sound(&fluxo, h.id()).await;
    w.shutdown().await;
}

pub async fn step_with_retry(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let flow =
        Flow::new("retrying").step_with_retry("flaky", fast_retry(5), |v: Value| async move {
            if ran() < 3 {
                return Err(StepError::retryable("not yet").with_kind("Flaky"));
            }
            Ok(v)
        });
    flow.register(&fluxo).unwrap();
    let exhausted = Flow::new("exhausted").step_with_retry("always", fast_retry(2), |_| async {
        ran();
        Err(StepError::retryable("no").with_kind("Boom"))
    });
    exhausted.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = flow.start(&fluxo, "ok").await.unwrap();
    assert_eq!(h.result_timeout::<String>(WAIT).await.unwrap(), "ok");
    assert_eq!(runs(h.id(), "flaky"), 3);
    let failed = count_events(&fluxo, h.id(), |e| {
        matches!(e, Event::StepAttemptFailed { .. })
    })
    .await;
    assert_eq!(failed, 2, "each failed attempt is journaled");

    let h = exhausted.start(&fluxo, ()).await.unwrap();
    let error = expect_failure(h.result_value().await);
    assert_eq!(error.kind(), "StepFailed");
    assert_eq!(error.step_error().unwrap().kind(), "Boom");
    assert_eq!(runs(h.id(), "always"), 2);
    w.shutdown().await;
}

pub async fn if_and_switch(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let flow = Flow::new("branches")
        .if_(
            "big",
            |v| num(v) > 10,
            step("mark", |v: Value| async move {
                ran();
                Ok(json!({ "n": v, "size": "big" }))
            }),
            step("mark", |v: Value| async move {
                ran();
                Ok(json!({ "n": v, "size": "small" }))
            }),
        )
        .switch(
            "route",
            |v| v["size"].as_str().unwrap_or_default().to_owned(),
            [
                (
                    "big",
                    step("handle", |v: Value| async move {
                        Ok(json!(format!("B{}", v["n"])))
                    }),
                ),
                (
                    "tiny",
                    step("handle", |v: Value| async move {
                        Ok(json!(format!("T{}", v["n"])))
                    }),
                ),
            ],
            step("fallback", |v: Value| async move {
                Ok(json!(format!("D{}", v["n"])))
            }),
        );
    flow.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let big = flow.start(&fluxo, 20).await.unwrap();
    let small = flow.start(&fluxo, 5).await.unwrap();
    assert_eq!(big.result_timeout::<String>(WAIT).await.unwrap(), "B20");
    assert_eq!(small.result_timeout::<String>(WAIT).await.unwrap(), "D5");
    assert_eq!(
        step_names(&fluxo, big.id()).await,
        [
            "big#choice",
            "big/then/mark",
            "route#choice",
            "route/big/handle"
        ]
    );
    assert_eq!(
        step_names(&fluxo, small.id()).await,
        [
            "big#choice",
            "big/else/mark",
            "route#choice",
            "route/default/fallback"
        ]
    );
    assert_eq!(runs(big.id(), "big/then/mark"), 1);
    assert_eq!(runs(big.id(), "big/else/mark"), 0);
    w.shutdown().await;
}

pub async fn parallel_runs_branches_concurrently(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let branch = |i: i64| {
        Flow::empty()
            .step("a", move |v: Value| async move {
                let s = StepContext::current().unwrap();
                if i == 0 {
                    // Only finishes if branch 2 runs at the same time.
                    let gate = format!("{}/b2", s.workflow_id());
                    tokio::time::timeout(Duration::from_secs(10), common::wait_gate(&gate))
                        .await
                        .map_err(|_| StepError::fatal("branches did not run concurrently"))?;
                }
                if i == 2 {
                    common::open_gate(&format!("{}/b2", s.workflow_id()));
                }
                ran();
                Ok(json!(num(&v) + i))
            })
            .step("b", |v: Value| async move {
                ran();
                Ok(json!(num(&v) * 10))
            })
    };
    let flow = Flow::new("fan")
        .parallel("fan", [branch(0), branch(1), branch(2)])
        .step("sum", |v: Value| async move { Ok(json!(sum(&v))) });
    let echo = Flow::new("fan_out").parallel("fan", [step("x", |v| async move { Ok(v) })]);
    flow.register(&fluxo).unwrap();
    echo.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = flow.start(&fluxo, 1).await.unwrap();
    assert_eq!(h.result_timeout::<i64>(WAIT).await.unwrap(), 10 + 20 + 30);
    for i in 0..3 {
        assert_eq!(runs(h.id(), &format!("fan[{i}]/a")), 1);
        assert_eq!(runs(h.id(), &format!("fan[{i}]/b")), 1);
    }
    let names = step_names(&fluxo, h.id()).await;
    assert!(names.contains(&"fan#next[0]".to_owned()), "{names:?}");
    assert_eq!(names.last().unwrap(), "sum");
    assert_journal_sound(&fluxo, h.id()).await;
    // Results are collected in branch order into an array.
    let h = echo.start(&fluxo, "e").await.unwrap();
    assert_eq!(h.result_timeout::<Value>(WAIT).await.unwrap(), json!(["e"]));
    w.shutdown().await;
}

pub async fn parallel_first_error_stops_the_others(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let flow = Flow::new("fan_fail")
        .parallel(
            "fan",
            [
                step("slow", |v: Value| async move {
                    ran();
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    completed();
                    Ok(v)
                }),
                Flow::empty().step_with_retry("boom", RetryPolicy::none(), |_| async {
                    ran();
                    Err(StepError::fatal("exploded").with_kind("Boom"))
                }),
            ],
        )
        .step("after", |v: Value| async move {
            ran();
            Ok(v)
        });
    flow.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let started = Instant::now();
    let h = flow.start(&fluxo, 1).await.unwrap();
    let error = expect_failure(
        tokio::time::timeout(WAIT, h.result_value())
            .await
            .expect("the failure stops the block at once"),
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(error.step_error().unwrap().kind(), "Boom");
    assert_eq!(runs(h.id(), "fan[1]/boom"), 1);
    assert_eq!(
        completions(h.id(), "fan[0]/slow"),
        0,
        "the slow branch was stopped"
    );
    assert_eq!(runs(h.id(), "after"), 0);
    w.shutdown().await;
}

pub async fn parallel_map_respects_width(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let flow = Flow::new("squares").parallel_map(
        "each",
        2,
        step("square", |v: Value| async move {
            let id = StepContext::current().unwrap().workflow_id().to_owned();
            enter(&id);
            ran();
            tokio::time::sleep(Duration::from_millis(30)).await;
            leave(&id);
            Ok(json!(num(&v) * num(&v)))
        }),
    );
    flow.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = flow.start(&fluxo, [1, 2, 3, 4, 5, 6]).await.unwrap();
    assert_eq!(
        h.result_timeout::<Vec<i64>>(WAIT).await.unwrap(),
        [1, 4, 9, 16, 25, 36]
    );
    assert_eq!(
        max_in_flight(h.id()),
        2,
        "at most (and here exactly) 2 at once"
    );
    for i in 0..6 {
        assert_eq!(runs(h.id(), &format!("each[{i}]/square")), 1);
    }
    // Not an array: a typed failure.
    let h = flow
        .start(&fluxo, json!({"not": "an array"}))
        .await
        .unwrap();
    assert_eq!(expect_failure(h.result_value().await).kind(), "NotAnArray");
    // An empty array maps to an empty array.
    let h = flow.start(&fluxo, json!([])).await.unwrap();
    assert_eq!(h.result_timeout::<Value>(WAIT).await.unwrap(), json!([]));
    w.shutdown().await;
}

pub async fn loops(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let inc = |by: i64| {
        step("add", move |v: Value| async move {
            ran();
            Ok(json!(num(&v) + by))
        })
    };
    let flow =
        Flow::new("loops")
            .loop_("thrice", 3, inc(1))
            .while_("grow", |v| num(v) < 10, inc(3));
    let forever = Flow::new("forever").while_max("spin", 3, |_| true, inc(1));
    flow.register(&fluxo).unwrap();
    forever.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = flow.start(&fluxo, 0).await.unwrap();
    // 0 -> 3 (loop), then 3 -> 6 -> 9 -> 12 (while).
    assert_eq!(h.result_timeout::<i64>(WAIT).await.unwrap(), 12);
    let names = step_names(&fluxo, h.id()).await;
    assert_eq!(
        &names[..4],
        [
            "thrice[0]#iter",
            "thrice[0]/add",
            "thrice[1]#iter",
            "thrice[1]/add"
        ]
    );
    assert!(names.contains(&"grow[2]/add".to_owned()));
    assert_eq!(
        names.last().unwrap(),
        "grow[3]#cond",
        "the last check is journaled"
    );
    for i in 0..3 {
        assert_eq!(runs(h.id(), &format!("thrice[{i}]/add")), 1);
        assert_eq!(runs(h.id(), &format!("grow[{i}]/add")), 1);
    }
    let h = forever.start(&fluxo, 0).await.unwrap();
    assert_eq!(
        expect_failure(h.result_value().await).kind(),
        "MaxIterations"
    );
    assert_eq!(runs(h.id(), "spin[2]/add"), 1);
    assert_eq!(runs(h.id(), "spin[3]/add"), 0);
    w.shutdown().await;
}

pub async fn signals(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let flow = Flow::new("approvals")
        .wait_for_signal("approval", "approved")
        .step(
            "record",
            |v: Value| async move { Ok(json!({ "by": v["by"] })) },
        )
        .wait_for_any("decision", ["yes", "no"]);
    let late =
        Flow::new("late").wait_for_signal_timeout("late", "never", Duration::from_millis(150));
    let late_any =
        Flow::new("late_any").wait_for_any_timeout("late", ["a", "b"], Duration::from_millis(150));
    for f in [&flow, &late, &late_any] {
        f.register(&fluxo).unwrap();
    }
    let w = worker(&fluxo);
    let h = flow.start(&fluxo, ()).await.unwrap();
    // Sent before the flow waits: kept in the durable inbox.
    h.signal("approved", json!({ "by": "ana" })).await.unwrap();
    until_async("the decision wait", || async {
        step_names(&fluxo, h.id())
            .await
            .contains(&"record".to_owned())
    })
    .await;
    h.signal("no", json!({ "reason": "budget" })).await.unwrap();
    assert_eq!(
        h.result_timeout::<Value>(WAIT).await.unwrap(),
        json!({ "signal": "no", "payload": { "reason": "budget" } })
    );
    for f in [&late, &late_any] {
        let h = f.start(&fluxo, ()).await.unwrap();
        assert_eq!(expect_failure(h.result_value().await).kind(), "Timeout");
    }
    w.shutdown().await;
}

pub async fn sleeps(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let flow = Flow::new("sleepy")
        .sleep("nap", Duration::from_millis(50))
        .sleep_until("alarm", SystemTime::now() + Duration::from_millis(200))
        .step("wake", |v: Value| async move { Ok(v) });
    flow.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let started = Instant::now();
    let h = flow.start(&fluxo, "zz").await.unwrap();
    assert_eq!(h.result_timeout::<String>(WAIT).await.unwrap(), "zz");
    assert!(started.elapsed() >= Duration::from_millis(150));
    let timers = count_events(&fluxo, h.id(), |e| matches!(e, Event::TimerFired)).await;
    assert_eq!(timers, 2);
    w.shutdown().await;
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct User {
    name: String,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Account {
    user: String,
    id: u32,
}

pub async fn typed_helpers(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let flow = Flow::new("typed")
        .typed_step("create", |u: User| async move {
            ran();
            Ok(Account {
                user: u.name,
                id: 7,
            })
        })
        .typed_step("id", |a: Account| async move { Ok(a.id) })
        .typed_loop("double", 3, |n: u32| async move { Ok(n * 2) })
        .typed_while(
            "halve",
            |n: &u32| *n > 10,
            |n: u32| async move { Ok(n / 2) },
        );
    flow.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = flow
        .start(&fluxo, User { name: "ana".into() })
        .await
        .unwrap();
    // 7 -> 14 -> 28 -> 56 -> 28 -> 14 -> 7
    assert_eq!(h.result_timeout::<u32>(WAIT).await.unwrap(), 7);
    assert!(step_names(&fluxo, h.id())
        .await
        .contains(&"double[2]/body".to_owned()));
    // An input that does not decode fails the step at once.
    let h = flow.start(&fluxo, json!({ "nom": 1 })).await.unwrap();
    let error = expect_failure(h.result_value().await);
    assert_eq!(error.step_error().unwrap().kind(), "Decode");
    w.shutdown().await;
}

/// What middleware saw: (workflow, step, input).
type Seen = Arc<Mutex<Vec<(String, String, Option<Value>)>>>;

/// Records what middleware sees.
struct Capture(Seen);

impl Middleware for Capture {
    fn handle<'a>(
        &'a self,
        info: &'a StepInfo<'a>,
        next: Next<'a>,
    ) -> BoxFuture<'a, Result<Value, StepError>> {
        self.0.lock().unwrap().push((
            info.workflow.to_owned(),
            info.step.to_owned(),
            info.input.cloned(),
        ));
        next.run(info)
    }
}

pub async fn middleware(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    let stack = MiddlewareStack::new()
        .with(LoggingMiddleware::with_sink(move |l| {
            sink.lock().unwrap().push(l.to_owned())
        }))
        .with(Capture(Arc::clone(&seen)))
        .with(ValidationMiddleware::new().input(|v| {
            v.get("email")
                .map(|_| ())
                .ok_or_else(|| "missing email".to_owned())
        }))
        .with(RetryMiddleware {
            attempts: 3,
            delay: Duration::from_millis(5),
        });
    let flow = Flow::new("guarded").middleware(stack).step_with_retry(
        "flaky",
        RetryPolicy::none(),
        |v: Value| async move {
            if ran() < 3 {
                return Err(StepError::retryable("blip"));
            }
            Ok(v)
        },
    );
    let slow = Flow::new("slow")
        .middleware(MiddlewareStack::new().with(TimeoutMiddleware(Duration::from_millis(50))))
        .step_with_retry("sleepy", RetryPolicy::none(), |v: Value| async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(v)
        });
    let applied_seen = Arc::new(Mutex::new(Vec::new()));
    let one = MiddlewareStack::new()
        .with(Capture(Arc::clone(&applied_seen)))
        .apply(|v: Value| async move { Ok(json!([v])) });
    let applied = Flow::new("applied")
        .step("one", one)
        .step("two", |v: Value| async move { Ok(v) });
    for f in [&flow, &slow, &applied] {
        f.register(&fluxo).unwrap();
    }
    let w = worker(&fluxo);

    let input = json!({ "email": "ana@example.com" });
    let h = flow.start(&fluxo, input.clone()).await.unwrap();
    assert_eq!(h.result_timeout::<Value>(WAIT).await.unwrap(), input);
    assert_eq!(runs(h.id(), "flaky"), 3, "retried in process");
    let attempts = count_events(&fluxo, h.id(), |e| {
        matches!(e, Event::StepAttemptFailed { .. })
    })
    .await;
    assert_eq!(attempts, 0, "in-process retries are not journaled");
    assert!(seen.lock().unwrap().contains(&(
        "guarded".into(),
        "flaky".into(),
        Some(input.clone())
    )));
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("succeeded")),
        "{:?}",
        lines.lock().unwrap()
    );

    // Validation failures are fatal: the step never runs.
    let h = flow.start(&fluxo, json!({ "name": "bo" })).await.unwrap();
    let error = expect_failure(h.result_value().await);
    assert_eq!(error.step_error().unwrap().kind(), "Validation");
    assert_eq!(runs(h.id(), "flaky"), 0);

    let h = slow.start(&fluxo, 1).await.unwrap();
    let error = expect_failure(h.result_value().await);
    assert_eq!(error.step_error().unwrap().kind(), "Timeout");

    let h = applied.start(&fluxo, 5).await.unwrap();
    assert_eq!(h.result_timeout::<Value>(WAIT).await.unwrap(), json!([5]));
    assert_eq!(
        applied_seen.lock().unwrap().as_slice(),
        [("applied".to_owned(), "one".to_owned(), Some(json!(5)))],
        "only the wrapped step"
    );
    w.shutdown().await;
}

pub async fn nested_blocks(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let counted = |name: &'static str, f: fn(&Value) -> Value| {
        step(name, move |v: Value| async move {
            ran();
            Ok(f(&v))
        })
    };
    let body = Flow::empty()
        .parallel(
            "fan",
            [
                Flow::empty().if_(
                    "check",
                    |v| num(v) > 0,
                    counted("pos", |v| json!(num(v) + 1)),
                    counted("neg", |v| json!(num(v) - 1)),
                ),
                counted("plain", |v| json!(num(v) * 10)),
                Flow::empty()
                    .step("explode", |v: Value| async move {
                        Ok(json!([num(&v), num(&v) + 1, num(&v) + 2]))
                    })
                    .parallel_map("each", 2, counted("sq", |v| json!(num(v) * num(v))))
                    .step("total", |v: Value| async move { Ok(json!(sum(&v))) }),
            ],
        )
        .step("merge", |v: Value| async move { Ok(json!(sum(&v))) });
    let flow = Flow::new("nested").loop_("outer", 2, body);
    flow.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = flow.start(&fluxo, 1).await.unwrap();
    // Iteration 0: v = 1 -> [2, 10, 1+4+9 = 14] -> 26.
    // Iteration 1: v = 26 -> [27, 260, 676+729+784 = 2189] -> 2476.
    assert_eq!(h.result_timeout::<i64>(WAIT).await.unwrap(), 2476);
    let names = step_names(&fluxo, h.id()).await;
    for expected in [
        "outer[1]/fan[0]/check#choice",
        "outer[1]/fan[0]/check/then/pos",
        "outer[0]/fan[2]/each[2]/sq",
        "outer[0]/fan#next[0]",
        "outer[1]/merge",
    ] {
        assert!(
            names.contains(&expected.to_owned()),
            "{expected} in {names:?}"
        );
    }
    for i in 0..2 {
        for j in 0..3 {
            assert_eq!(runs(h.id(), &format!("outer[{i}]/fan[2]/each[{j}]/sq")), 1);
        }
    }
    assert_journal_sound(&fluxo, h.id()).await;
    w.shutdown().await;
}

// ----- crash and replay -----------------------------------------------------

pub async fn loop_resumes_after_eviction(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let flow = Flow::new("ticker").loop_(
        "tick",
        4,
        Flow::empty()
            .wait_for_signal("wait", "go")
            .step("work", |v: Value| async move {
                ran();
                Ok(json!(num(&v) * 10))
            }),
    );
    flow.register(&fluxo).unwrap();
    let w = evicting_worker(&fluxo);
    let h = flow.start(&fluxo, 0).await.unwrap();
    for i in 0..4 {
        // Parked on the signal wait, hence evicted: the next wake-up replays
        // the loop from the journal.
        until_async("the instance is evicted", || async {
            w.live_instances() == 0 && h.status().await.unwrap() == WorkflowStatus::Running
        })
        .await;
        h.signal("go", i).await.unwrap();
        until(&format!("iteration {i} ran"), || {
            runs(h.id(), &format!("tick[{i}]/work")) == 1
        })
        .await;
    }
    assert_eq!(h.result_timeout::<i64>(WAIT).await.unwrap(), 30);
    for i in 0..4 {
        assert_eq!(runs(h.id(), &format!("tick[{i}]/work")), 1, "iteration {i}");
    }
    assert_journal_sound(&fluxo, h.id()).await;
    w.shutdown().await;
}

pub async fn parallel_resumes_after_eviction(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let branch = |i: usize| {
        Flow::empty()
            .step("a", |v: Value| async move {
                ran();
                Ok(v)
            })
            .wait_for_signal("wait", format!("go{i}"))
            .step("b", |v: Value| async move {
                ran();
                Ok(v)
            })
    };
    let flow = Flow::new("fan_wait").parallel("fan", (0..3).map(branch));
    flow.register(&fluxo).unwrap();
    let w = evicting_worker(&fluxo);
    let h = flow.start(&fluxo, 0).await.unwrap();
    for i in [2, 0, 1] {
        until_async("the instance is evicted", || async {
            w.live_instances() == 0 && h.status().await.unwrap() == WorkflowStatus::Running
        })
        .await;
        h.signal(&format!("go{i}"), i).await.unwrap();
        until(&format!("branch {i} finished"), || {
            runs(h.id(), &format!("fan[{i}]/b")) == 1
        })
        .await;
    }
    assert_eq!(
        h.result_timeout::<Vec<usize>>(WAIT).await.unwrap(),
        [0, 1, 2]
    );
    for i in 0..3 {
        assert_eq!(runs(h.id(), &format!("fan[{i}]/a")), 1);
        assert_eq!(runs(h.id(), &format!("fan[{i}]/b")), 1);
    }
    assert_journal_sound(&fluxo, h.id()).await;
    w.shutdown().await;
}

/// A step that hangs the first time it runs at `hang_at` (until its worker
/// is stopped) and counts its completions.
fn hanging_step(hang_at: &'static str) -> Flow {
    step("work", move |v: Value| async move {
        let n = ran();
        let name = StepContext::current().unwrap().name().to_owned();
        if n == 1 && name == hang_at {
            std::future::pending::<()>().await;
        }
        completed();
        Ok(json!(num(&v) + 1))
    })
}

pub async fn loop_resumes_after_worker_stop(store: Arc<dyn Store>) {
    let flow = Flow::new("long_loop").loop_("it", 6, hanging_step("it[3]/work"));
    let fluxo = fluxo_on(&store);
    flow.register(&fluxo).unwrap();
    let w = stoppable_worker(&fluxo);
    let h = flow.start(&fluxo, 0).await.unwrap();
    until("iteration 3 started", || runs(h.id(), "it[3]/work") == 1).await;
    // The worker stops mid-step; a new one takes over from the journal.
    w.shutdown().await;
    let fluxo = fluxo_on(&store);
    flow.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = fluxo::flow::FlowHandle::new(&fluxo, "long_loop", h.id());
    assert_eq!(h.result_timeout::<i64>(WAIT).await.unwrap(), 6);
    for i in [0, 1, 2, 4, 5] {
        assert_eq!(runs(h.id(), &format!("it[{i}]/work")), 1, "iteration {i}");
    }
    assert_eq!(runs(h.id(), "it[3]/work"), 2, "its entry was not committed");
    assert_eq!(completions(h.id(), "it[3]/work"), 1);
    assert_journal_sound(&fluxo, h.id()).await;
    w.shutdown().await;
}

pub async fn parallel_resumes_after_worker_stop(store: Arc<dyn Store>) {
    let branch = |i: usize| {
        Flow::empty()
            .step("a", |v: Value| async move {
                ran();
                Ok(v)
            })
            .step("b", move |v: Value| async move {
                let n = ran();
                if i == 1 && n == 1 {
                    std::future::pending::<()>().await;
                }
                completed();
                Ok(json!(num(&v) + i as i64))
            })
    };
    let flow = Flow::new("fan_stop").parallel("fan", (0..3).map(branch));
    let fluxo = fluxo_on(&store);
    flow.register(&fluxo).unwrap();
    let w = stoppable_worker(&fluxo);
    let h = flow.start(&fluxo, 10).await.unwrap();
    until("the other branches finished", || {
        runs(h.id(), "fan[1]/b") == 1
            && completions(h.id(), "fan[0]/b") == 1
            && completions(h.id(), "fan[2]/b") == 1
    })
    .await;
    w.shutdown().await;
    let fluxo = fluxo_on(&store);
    flow.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = fluxo::flow::FlowHandle::new(&fluxo, "fan_stop", h.id());
    assert_eq!(
        h.result_timeout::<Vec<i64>>(WAIT).await.unwrap(),
        [10, 11, 12]
    );
    for i in 0..3 {
        assert_eq!(runs(h.id(), &format!("fan[{i}]/a")), 1);
    }
    assert_eq!(runs(h.id(), "fan[0]/b"), 1);
    assert_eq!(runs(h.id(), "fan[2]/b"), 1);
    assert_eq!(runs(h.id(), "fan[1]/b"), 2, "its entry was not committed");
    assert_eq!(completions(h.id(), "fan[1]/b"), 1);
    assert_journal_sound(&fluxo, h.id()).await;
    w.shutdown().await;
}

pub async fn parallel_branches_advance_while_another_waits(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let mut busy = Flow::empty();
    for i in 0..5 {
        busy = busy.step(format!("s{i}"), |v: Value| async move {
            ran();
            Ok(json!(num(&v) + 1))
        });
    }
    let flow =
        Flow::new("mixed").parallel("fan", [Flow::empty().wait_for_signal("wait", "go"), busy]);
    flow.register(&fluxo).unwrap();
    let w = worker(&fluxo);
    let h = flow.start(&fluxo, 0).await.unwrap();
    // The busy branch finishes although the other one waits (and the
    // instance parks in between).
    until("the busy branch finished", || {
        runs(h.id(), "fan[1]/s4") == 1
    })
    .await;
    h.signal("go", "signal").await.unwrap();
    assert_eq!(
        h.result_timeout::<Value>(WAIT).await.unwrap(),
        json!(["signal", 5])
    );
    w.shutdown().await;
}

pub async fn nested_blocks_resume_after_eviction(store: Arc<dyn Store>) {
    let fluxo = fluxo_on(&store);
    let counted = |name: &'static str| {
        step(name, |v: Value| async move {
            ran();
            Ok(json!(num(&v) * num(&v)))
        })
    };
    let round = Flow::empty().parallel(
        "fan",
        [
            Flow::empty()
                .wait_for_signal("wait", "go")
                .step("got", |v: Value| async move {
                    ran();
                    Ok(v)
                }),
            Flow::empty()
                .step("explode", |_| async { Ok(json!([1, 2, 3])) })
                .parallel_map("each", 2, counted("sq"))
                .step("total", |v: Value| async move { Ok(json!(sum(&v))) }),
        ],
    );
    let flow = Flow::new("nested_wait").loop_("round", 2, round);
    flow.register(&fluxo).unwrap();
    let w = evicting_worker(&fluxo);
    let h = flow.start(&fluxo, 0).await.unwrap();
    for r in 0..2 {
        until(&format!("round {r} mapped"), || {
            runs(h.id(), &format!("round[{r}]/fan[1]/each[2]/sq")) == 1
        })
        .await;
        until_async("the instance is evicted", || async {
            w.live_instances() == 0 && h.status().await.unwrap() == WorkflowStatus::Running
        })
        .await;
        h.signal("go", r * 100).await.unwrap();
        until(&format!("round {r} received"), || {
            runs(h.id(), &format!("round[{r}]/fan[0]/got")) == 1
        })
        .await;
    }
    assert_eq!(
        h.result_timeout::<Value>(WAIT).await.unwrap(),
        json!([100, 14])
    );
    for r in 0..2 {
        assert_eq!(runs(h.id(), &format!("round[{r}]/fan[0]/got")), 1);
        for i in 0..3 {
            assert_eq!(runs(h.id(), &format!("round[{r}]/fan[1]/each[{i}]/sq")), 1);
        }
    }
    assert_journal_sound(&fluxo, h.id()).await;
    w.shutdown().await;
}
