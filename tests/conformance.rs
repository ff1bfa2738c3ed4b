//! The behavioural conformance suite: the same workflow tests against every
//! backend. Adding a backend means adding one module in `backend_tests!`.

mod common;
#[path = "conformance/suite.rs"]
mod suite;
#[path = "conformance/workflows.rs"]
mod workflows;

/// One module per backend; each test gets a fresh store from `$make`
/// (`None`: the backend's server is unreachable outside CI, so the test is
/// skipped with a loud message).
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        backend_tests!(@backend memory, crate::common::memory_store; $($name),*);
        #[cfg(feature = "sqlite")]
        backend_tests!(@backend sqlite, crate::common::sqlite_store; $($name),*);
        #[cfg(feature = "postgres")]
        backend_tests!(@backend postgres, crate::common::postgres_store; $($name),*);
        #[cfg(feature = "redis")]
        backend_tests!(@backend redis, crate::common::redis_store; $($name),*);
    };
    (@backend $backend:ident, $make:path; $($name:ident),*) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(store) = $make().await {
                        crate::suite::$name(store).await
                    }
                }
            )*
        }
    };
}

backend_tests!(
    typed_result,
    steps_are_journaled_once,
    retries_until_success,
    exhausted_retries_are_typed_errors,
    workflow_failure_is_typed,
    durable_retry_backoff_parks,
    short_and_long_durable_timers,
    signals_before_and_after_the_wait,
    signal_timeout,
    parallel_steps,
    child_workflows,
    cancellation,
    cancellation_cascades_to_children,
    idempotent_start_by_id,
    non_determinism_is_detected,
    undecodable_input,
    undecodable_signal,
    api_errors,
    eviction_replays_without_rerunning_steps,
    lease_expiry_takeover_and_zombie_fencing,
    handle_from_another_process,
    long_history,
    call_time_step_options,
    incompatible_history_format,
    observers_see_lifecycle_events,
    patched_serves_old_and_new_instances,
    published_events,
    saga_compensates_on_failure,
    saga_compensates_on_cancel,
    cancel_reaches_a_running_step,
    middleware_wraps_steps,
    continue_as_new_keeps_the_id_and_empties_the_journal,
);
