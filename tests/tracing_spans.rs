//! What a `tracing` subscriber sees of a workflow: an event logged inside a
//! step carries the `workflow` span (workflow, id) and, at `DEBUG`, the
//! `step` span (step, seq, attempt); a subscriber at `INFO` gets no span per
//! step at all.

use std::sync::{Arc, Mutex};

use fluxo::prelude::*;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

#[fluxo::step]
async fn logged(i: u32) -> Result<u32, StepError> {
    tracing::info!(target: "span_test", i, "inside the step");
    Ok(i)
}

#[fluxo::workflow]
async fn two_logged_steps(_ctx: WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
    let a = logged(n).await?;
    let b = logged(n + 1).await?;
    Ok(a + b)
}

/// Spans as `name{field=value ...}` strings.
#[derive(Default)]
struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
}

/// Records every `step` span created, and for each `span_test` event the
/// spans it sits in, root first.
#[derive(Clone, Default)]
struct Capture {
    step_spans: Arc<Mutex<Vec<String>>>,
    event_scopes: Arc<Mutex<Vec<Vec<String>>>>,
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Capture {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields.0.clone());
        }
        if attrs.metadata().name() == "step" {
            self.step_spans.lock().unwrap().push(fields.0);
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        if event.metadata().target() != "span_test" {
            return;
        }
        let scope = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .from_root()
                    .map(|span| {
                        let fields = span.extensions().get::<String>().cloned();
                        format!("{}{{{}}}", span.name(), fields.unwrap_or_default().trim())
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.event_scopes.lock().unwrap().push(scope);
    }
}

/// Runs one workflow under a subscriber at `level` on this thread and
/// returns what it captured, plus the instance id.
async fn run_at(level: LevelFilter) -> (Capture, String) {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::registry().with(capture.clone().with_filter(level));
    let _default = tracing::subscriber::set_default(subscriber);
    let fluxo = Fluxo::in_memory();
    fluxo.register(TwoLoggedSteps).unwrap();
    let worker = fluxo.worker().spawn();
    let handle = TwoLoggedSteps::start(&fluxo, 7).await.unwrap();
    assert_eq!(handle.result().await.unwrap(), 15);
    worker.shutdown().await;
    (capture, handle.id().to_owned())
}

// One runtime thread, so the subscriber set on it sees the worker's tasks.
#[tokio::test(flavor = "current_thread")]
async fn step_spans_are_debug_and_events_in_steps_carry_the_workflow_span() {
    let (debug, id) = run_at(LevelFilter::DEBUG).await;
    let workflow = format!(
        "workflow{{workflow=two_logged_steps id={id} version=1}}",
        id = id
    );
    assert_eq!(
        *debug.event_scopes.lock().unwrap(),
        vec![
            vec![
                workflow.clone(),
                "step{step=\"logged\" seq=0 attempt=1}".to_owned()
            ],
            vec![workflow, "step{step=\"logged\" seq=1 attempt=1}".to_owned()],
        ]
    );

    let (info, id) = run_at(LevelFilter::INFO).await;
    assert!(
        info.step_spans.lock().unwrap().is_empty(),
        "no step span at INFO: {:?}",
        info.step_spans.lock().unwrap()
    );
    let workflow = format!("workflow{{workflow=two_logged_steps id={id} version=1}}");
    assert_eq!(
        *info.event_scopes.lock().unwrap(),
        vec![vec![workflow.clone()], vec![workflow]]
    );
}
