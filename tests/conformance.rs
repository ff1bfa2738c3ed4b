//! The behavioural conformance suite: the same workflow tests against every
//! backend. Adding a backend means adding one line to `backend_tests!` in `tests/common/mod.rs`.

#[macro_use]
mod common;
#[path = "conformance/suite.rs"]
mod suite;
#[path = "conformance/workflows.rs"]
mod workflows;

backend_tests!(
    typed_result,
    workflows_registered_after_the_worker_starts_run,
    steps_are_journaled_once,
    retries_until_success,
    exhausted_retries_are_typed_errors,
    workflow_failure_is_typed,
    a_panicking_step_is_a_failed_attempt,
    a_panicking_workflow_fails_and_frees_its_slot,
    durations_too_long_for_the_clock_mean_forever,
    a_panicking_cancellation_handler_lets_the_next_one_run,
    durable_retry_backoff_parks,
    short_and_long_durable_timers,
    signals_before_and_after_the_wait,
    signal_timeout,
    parallel_steps,
    child_workflows,
    cancellation,
    cancellation_cascades_to_children,
    idempotent_start_by_id,
    default_ids_sort_by_start,
    non_determinism_is_detected,
    undecodable_input,
    undecodable_signal,
    api_errors,
    eviction_replays_without_rerunning_steps,
    lease_expiry_takeover_and_zombie_fencing,
    restart_under_the_same_worker_id_takes_over_at_once,
    a_full_worker_claims_again_when_a_slot_frees,
    a_result_awaited_where_the_instance_runs_reads_the_store_seldom,
    a_result_awaited_where_the_instance_runs_is_handed_over,
    a_result_awaited_before_its_instance_runs_here_reads_nothing_once_it_does,
    a_run_whose_end_the_store_missed_runs_again,
    a_run_that_panics_in_the_store_runs_again_and_frees_its_slot,
    a_store_that_panics_in_a_claim_leaves_the_worker_claiming,
    a_claim_whose_answer_is_lost_runs_once_its_lease_runs_out,
    a_worker_whose_handle_is_dropped_keeps_working_at_rest,
    a_store_clock_behind_the_workers_costs_a_few_claims_not_a_loop,
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
    a_step_context_kept_past_its_run_sees_it_end,
    a_step_run_on_another_task_knows_its_workflow,
    middleware_wraps_steps,
    continue_as_new_keeps_the_id_and_empties_the_journal,
    continue_as_new_on_a_store_without_it_fails_typed,
);
