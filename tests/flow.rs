//! The builder API (`fluxo::flow`) on every backend: each primitive, and
//! crash/replay in the middle of loops and parallel blocks. Adding a backend
//! means adding one line to `backend_tests!` in `tests/common/mod.rs`.

#[macro_use]
mod common;
#[path = "flow/helpers.rs"]
mod helpers;
#[path = "flow/suite.rs"]
mod suite;

use fluxo::flow::{step, Flow, FlowError};
use serde_json::Value;

backend_tests!(
    steps_chain,
    step_with_retry,
    if_and_switch,
    parallel_runs_branches_concurrently,
    parallel_first_error_stops_the_others,
    parallel_map_respects_width,
    loops,
    signals,
    sleeps,
    typed_helpers,
    middleware,
    nested_blocks,
    loop_resumes_after_eviction,
    parallel_resumes_after_eviction,
    loop_resumes_after_worker_stop,
    parallel_resumes_after_worker_stop,
    parallel_branches_advance_while_another_waits,
    nested_blocks_resume_after_eviction,
);

fn noop() -> Flow {
    step("x", |v: Value| async move { Ok(v) })
}

#[test]
fn invalid_flows_are_rejected_with_typed_errors() {
    let dup = Flow::new("dup")
        .step("a", |v: Value| async move { Ok(v) })
        .step("a", |v: Value| async move { Ok(v) });
    assert!(matches!(
        dup.validate(),
        Err(FlowError::DuplicateName { ref name, ref scope, .. }) if name == "a" && scope == "<top>"
    ));
    let nested = Flow::new("nested").if_(
        "c",
        |_| true,
        noop().step("x", |v: Value| async move { Ok(v) }),
        Flow::empty(),
    );
    let err = nested.validate().unwrap_err();
    assert!(
        matches!(err, FlowError::DuplicateName { ref scope, .. } if scope == "c/then"),
        "{err}"
    );
    let bad_name = Flow::new("bad").step("a/b", |v: Value| async move { Ok(v) });
    let err = bad_name.validate().unwrap_err();
    assert!(matches!(err, FlowError::InvalidName { .. }), "{err}");
    assert!(err.to_string().contains("\"a/b\""), "{err}");
    assert!(matches!(
        Flow::new("").validate(),
        Err(FlowError::InvalidName { .. })
    ));
    let zero = Flow::new("zero").parallel_map("each", 0, noop());
    assert!(matches!(
        zero.validate(),
        Err(FlowError::InvalidNode { .. })
    ));
    let no_signals = Flow::new("none").wait_for_any("w", Vec::<String>::new());
    assert!(matches!(
        no_signals.validate(),
        Err(FlowError::InvalidNode { .. })
    ));
    let fluxo = fluxo::Fluxo::in_memory();
    assert!(dup.register(&fluxo).is_err(), "register validates too");
    assert!(noop().validate().is_err(), "a top-level flow needs a name");
}
