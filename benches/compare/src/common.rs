//! What every engine's workloads share: the step probe (which records when
//! each step body ran), process memory, the storage target of a run, and the
//! result a child process reports.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

// ----- step probe --------------------------------------------------------------

static T0: OnceLock<Instant> = OnceLock::new();
static TIMES: OnceLock<Vec<AtomicU64>> = OnceLock::new();
static RECORD: AtomicBool = AtomicBool::new(false);
static STEPS_RUN: AtomicU64 = AtomicU64::new(0);
static KILL_AT: AtomicU64 = AtomicU64::new(0);
static GATE_CLOSED: AtomicBool = AtomicBool::new(false);
static GATE: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Holds step bodies back while closed (a recovery "load" child closes it
/// until every workflow has been started); free when open.
pub async fn gate() {
    while GATE_CLOSED.load(Ordering::Acquire) {
        let notified = GATE.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !GATE_CLOSED.load(Ordering::Acquire) {
            break;
        }
        notified.await;
    }
}

pub fn close_gate() {
    GATE_CLOSED.store(true, Ordering::Release);
}

pub fn open_gate() {
    GATE_CLOSED.store(false, Ordering::Release);
    GATE.notify_waiters();
}

fn t0() -> Instant {
    *T0.get_or_init(Instant::now)
}

/// Nanoseconds since the probe's epoch (never 0 once the probe is set up).
pub fn now_ns() -> u64 {
    t0().elapsed().as_nanos() as u64 + 1
}

/// Prepares the probe to record the time of steps `0..capacity` by index.
pub fn probe_record(capacity: usize) {
    let _ = t0();
    let times = TIMES.get_or_init(|| (0..capacity).map(|_| AtomicU64::new(0)).collect());
    assert!(times.len() >= capacity, "probe already set up smaller");
    for t in times.iter() {
        t.store(0, Ordering::Relaxed);
    }
    RECORD.store(true, Ordering::SeqCst);
}

/// Stops recording step times (counting goes on).
pub fn probe_stop_recording() {
    RECORD.store(false, Ordering::SeqCst);
}

/// The body of every no-op step: counts it and, when recording, notes when
/// step `index` first ran.
#[inline]
pub fn step_body(index: u32) {
    let n = STEPS_RUN.fetch_add(1, Ordering::Relaxed) + 1;
    if n == KILL_AT.load(Ordering::Relaxed) {
        kill_self(n);
    }
    if RECORD.load(Ordering::Relaxed) {
        if let Some(slot) = TIMES.get().and_then(|t| t.get(index as usize)) {
            let _ = slot.compare_exchange(0, now_ns(), Ordering::Relaxed, Ordering::Relaxed);
        }
    }
}

/// Makes the step body that brings the count of steps run to `n` (or the
/// next one, if `n` has passed) SIGKILL this process.
pub fn kill_at(n: u64) {
    let n = n.max(STEPS_RUN.load(Ordering::SeqCst) + 1);
    KILL_AT.store(n, Ordering::SeqCst);
    if STEPS_RUN.load(Ordering::SeqCst) >= n {
        kill_self(STEPS_RUN.load(Ordering::SeqCst));
    }
}

/// Tells the parent how many steps ran, then SIGKILLs this process: no
/// destructor, no flush, no graceful shutdown of anything.
fn kill_self(steps: u64) -> ! {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "KILLED {steps}");
    let _ = out.flush();
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    loop {
        std::thread::park();
    }
}

/// Step bodies run so far in this process.
pub fn steps_run() -> u64 {
    STEPS_RUN.load(Ordering::Relaxed)
}

/// When step `index` first ran (ns since the probe epoch), if it did.
pub fn step_time(index: usize) -> Option<u64> {
    TIMES
        .get()
        .and_then(|t| t.get(index))
        .map(|t| t.load(Ordering::Relaxed))
        .filter(|&t| t != 0)
}

/// Mean gap between consecutive step starts over steps `from..=to`, in µs.
pub fn mean_step_gap_us(from: usize, to: usize) -> Option<f64> {
    let a = step_time(from)?;
    let b = step_time(to)?;
    if to <= from || b < a {
        return None;
    }
    Some((b - a) as f64 / 1e3 / (to - from) as f64)
}

/// Median gap between consecutive step starts over steps `from..=to`, µs.
pub fn median_gap_us(from: usize, to: usize) -> Option<f64> {
    let mut gaps = step_gaps_us(from, to);
    if gaps.len() < to.saturating_sub(from) {
        return None;
    }
    gaps.sort_by(f64::total_cmp);
    gaps.get(gaps.len() / 2).copied()
}

/// The gaps between consecutive step starts over steps `from..=to`, µs,
/// up to the first step not recorded.
pub fn step_gaps_us(from: usize, to: usize) -> Vec<f64> {
    let mut gaps = Vec::new();
    for i in from..to {
        let (Some(a), Some(b)) = (step_time(i), step_time(i + 1)) else {
            break;
        };
        gaps.push(b.saturating_sub(a) as f64 / 1e3);
    }
    gaps
}

/// The highest step index recorded.
pub fn last_recorded_step() -> Option<usize> {
    let times = TIMES.get()?;
    times.iter().rposition(|t| t.load(Ordering::Relaxed) != 0)
}

// ----- process memory ------------------------------------------------------------

/// Resident set size of this process, in KiB (from /proc/self/status).
pub fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until the RSS stops growing (two readings 500 ms apart within 1 %),
/// at most `max`.
pub async fn settle_rss(max: Duration) -> u64 {
    let deadline = Instant::now() + max;
    let mut last = rss_kib();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_kib();
        if (now as f64 - last as f64).abs() <= last as f64 * 0.01 || Instant::now() >= deadline {
            return now;
        }
        last = now;
    }
}

// ----- engines, backends, workloads --------------------------------------------------

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    Fluxo,
    Durare,
    Duroxide,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Fluxo => "fluxo",
            Engine::Durare => "durare",
            Engine::Duroxide => "duroxide",
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// No durability: each engine's in-memory store.
    Memory,
    /// SQLite, WAL, synchronous=FULL.
    SqliteFull,
    /// SQLite, WAL, synchronous=NORMAL.
    SqliteNormal,
    /// Postgres with the server's synchronous_commit (on by default).
    Postgres,
    /// Fluxo only, when built with the `redis` feature.
    Redis,
    /// Fluxo only, when built with the `mongodb` feature.
    Mongodb,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Memory => "memory",
            Backend::SqliteFull => "sqlite-full",
            Backend::SqliteNormal => "sqlite-normal",
            Backend::Postgres => "postgres",
            Backend::Redis => "redis",
            Backend::Mongodb => "mongodb",
        }
    }

    pub fn is_sqlite(self) -> bool {
        matches!(self, Backend::SqliteFull | Backend::SqliteNormal)
    }

    /// The durability a run on this backend asks of every engine.
    pub fn durability(self) -> &'static str {
        match self {
            Backend::Memory => "none (in-process)",
            Backend::SqliteFull => {
                "SQLite WAL, synchronous=FULL (a flush per commit; fdatasync for every engine, see .cargo/config.toml)"
            }
            Backend::SqliteNormal => "SQLite WAL, synchronous=NORMAL (survives a process crash)",
            Backend::Postgres => {
                "Postgres, synchronous_commit=on (server default); every engine connects with \
                 the same URL (the default has sslmode=disable: a local server without TLS)"
            }
            Backend::Redis => "Redis as configured on the server",
            Backend::Mongodb => "MongoDB as configured on the server",
        }
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// One workflow of 100 sequential no-op steps.
    Sequential,
    /// 1,000 workflows of 10 steps, 100 in flight.
    Throughput,
    /// Per-step cost early and late in one long workflow.
    History,
    /// Memory per workflow parked on a signal.
    Parked,
    /// Resuming in-flight workflows in a fresh process after kill -9.
    Recovery,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Sequential => "sequential",
            Workload::Throughput => "throughput",
            Workload::History => "history",
            Workload::Parked => "parked",
            Workload::Recovery => "recovery",
        }
    }
}

/// Where a run keeps its state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub backend: Backend,
    /// SQLite database file.
    pub path: Option<PathBuf>,
    /// Postgres (or Redis, MongoDB) URL of a database of this run's own.
    pub url: Option<String>,
    /// A name unique to this run (schemas, key prefixes).
    pub tag: String,
}

impl Target {
    pub fn path(&self) -> &std::path::Path {
        self.path.as_deref().expect("a SQLite target has a path")
    }
    pub fn url(&self) -> &str {
        self.url.as_deref().expect("a server target has a URL")
    }
    pub fn synchronous_full(&self) -> bool {
        self.backend == Backend::SqliteFull
    }
}

/// What a child is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub engine: Engine,
    pub workload: Workload,
    pub target: Target,
    /// `run`, or for recovery `load` / `resume`.
    pub mode: String,
    pub params: Params,
    /// The variant of the engine's setup (e.g. Fluxo's cache size).
    pub variant: Option<String>,
}

/// Sizes of the workloads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Params {
    pub seq_steps: u32,
    /// Sequential workflows run one after another in a cell; the median counts.
    pub seq_runs: u32,
    pub tp_workflows: u32,
    /// Throughput batches run one after another in a cell; the median counts.
    pub tp_runs: u32,
    pub tp_steps: u32,
    pub tp_in_flight: u32,
    pub hist_steps: u32,
    pub hist_window: u32,
    pub parked: u32,
    pub rec_workflows: u32,
    pub rec_steps: u32,
    /// Seconds a child may spend on its workload before it reports what it
    /// reached.
    pub budget_s: f64,
    /// duroxide's dispatcher_min_poll_interval, ms.
    pub duroxide_poll_ms: u64,
    /// duroxide's orchestration and worker concurrency for the workloads
    /// with many workflows at once.
    pub duroxide_concurrency: usize,
}

/// What a child reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CellResult {
    pub metrics: BTreeMap<String, f64>,
    /// Facts about the run (durability actually in force, limits hit).
    pub notes: Vec<String>,
    /// Set when the workload could not be done at all.
    pub error: Option<String>,
}

impl CellResult {
    pub fn set(&mut self, k: &str, v: f64) {
        self.metrics.insert(k.to_owned(), v);
    }
    pub fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }
}

/// Percentile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Sets each `key` to the median of its values (sorting them), where a run
/// gave any.
fn set_medians<const N: usize>(r: &mut CellResult, series: [(&str, &mut Vec<f64>); N]) {
    for (key, values) in series {
        if !values.is_empty() {
            values.sort_by(f64::total_cmp);
            r.set(key, percentile(values, 50.0));
        }
    }
}

/// The index of the next of a cell's `runs` runs after `done` of them, if
/// one is due: the first always, the others until `end`.
fn next_run(done: usize, runs: u32, end: Instant) -> Option<u32> {
    let done = done as u32;
    (done < runs && (done == 0 || Instant::now() < end)).then_some(done)
}

/// The runs of the sequential workload: one workflow of `seq_steps` steps
/// after another, `seq_runs` of them (fewer if the budget runs out), each
/// timed by the probe. A single short run is moved by one descheduling of
/// the process; the median of several is not.
pub struct SequentialRuns {
    steps: u32,
    runs: u32,
    end: Instant,
    gaps: Vec<f64>,
    e2e: Vec<f64>,
    started: Option<Instant>,
    /// On SQLite `FULL`: the file the disk's flush is probed in right
    /// before each run.
    fsync_probe: Option<FsyncProbe>,
    /// The probe right before the run in progress, µs per flush.
    fsync_now: Option<f64>,
    /// Every run's probe, and its step latency over that probe.
    fsyncs: Vec<f64>,
    over_fsync: Vec<f64>,
    /// Why a probe failed, if one did.
    fsync_error: Option<String>,
}

/// Flushes in the probe right before each sequential run on SQLite `FULL`.
const PAIRED_FSYNCS: usize = 50;

impl SequentialRuns {
    /// On SQLite `FULL`, where a step's commit ends with one flush, this
    /// also creates a probe file next to the database, removed when the
    /// runs are dropped.
    pub fn new(spec: &Spec) -> Self {
        let p = &spec.params;
        let mut fsync_error = None;
        let fsync_probe = if spec.target.synchronous_full() {
            FsyncProbe::create(spec.target.path().with_extension("fsync-pair"))
                .map_err(|e| fsync_error = Some(e.to_string()))
                .ok()
        } else {
            None
        };
        SequentialRuns {
            steps: p.seq_steps,
            runs: p.seq_runs.max(1),
            end: deadline(p.budget_s / 2.0),
            gaps: Vec::new(),
            e2e: Vec::new(),
            started: None,
            fsync_probe,
            fsync_now: None,
            fsyncs: Vec::new(),
            over_fsync: Vec::new(),
            fsync_error,
        }
    }

    /// The index of the next run, if one is due: until `seq_runs` ran, or
    /// after the first once half the budget is spent. On SQLite `FULL`, the
    /// disk's flush is probed first (blocking the thread for a few ms, with
    /// no run in flight), so that the run's latency is read against the
    /// disk's speed of that moment.
    pub fn next(&mut self) -> Option<u32> {
        let done = next_run(self.e2e.len(), self.runs, self.end)?;
        if let Some(probe) = &self.fsync_probe {
            match probe.measure(PAIRED_FSYNCS) {
                Ok(us) => self.fsync_now = Some(us),
                Err(e) => self.fsync_error = Some(e.to_string()),
            }
        }
        probe_record(self.steps as usize);
        self.started = Some(Instant::now());
        Some(done)
    }

    /// Ends the run `next` began: its result is in.
    pub fn finished(&mut self) {
        let e2e = self.started.take().map(|t| t.elapsed()).unwrap_or_default();
        probe_stop_recording();
        let gap = mean_step_gap_us(0, self.steps as usize - 1);
        if let Some(gap) = gap {
            self.gaps.push(gap);
        }
        if let Some(fsync) = self.fsync_now.take() {
            self.fsyncs.push(fsync);
            if let Some(gap) = gap {
                self.over_fsync.push(gap / fsync);
            }
        }
        self.e2e.push(e2e.as_secs_f64() * 1e6 / self.steps as f64);
    }

    /// The medians over the runs: the mean gap between step starts (engine
    /// latency per step) and the end-to-end time per step; on SQLite `FULL`
    /// also the flush probed right before each run, and each run's latency
    /// over its own probe.
    pub fn report(mut self, r: &mut CellResult) {
        let runs = self.e2e.len();
        set_medians(
            r,
            [
                ("step_us", &mut self.gaps),
                ("e2e_step_us", &mut self.e2e),
                ("paired_fsync_us", &mut self.fsyncs),
                ("step_over_paired_fsync", &mut self.over_fsync),
            ],
        );
        r.set("seq_runs", runs as f64);
        if let Some(e) = &self.fsync_error {
            r.note(format!("the flush probe before each run failed: {e}"));
        }
    }
}

/// `n` × (4 KiB write + fdatasync) in a file in `dir`: µs per write.
pub fn fsync_probe(dir: &Path, n: usize) -> std::io::Result<f64> {
    FsyncProbe::create(dir.join("fsync-probe.bin"))?.measure(n)
}

/// A file of one 4 KiB block to time the disk's flush with; removed when
/// dropped.
pub struct FsyncProbe {
    file: std::fs::File,
    path: PathBuf,
    block: Vec<u8>,
}

impl FsyncProbe {
    /// Creates the file and makes its block and size durable, so that the
    /// flushes [`measure`](Self::measure) times overwrite in place.
    pub fn create(path: PathBuf) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        let probe = FsyncProbe {
            file,
            path,
            block: vec![0x5au8; 4096],
        };
        probe.file.write_all_at(&probe.block, 0)?;
        probe.file.sync_all()?;
        Ok(probe)
    }

    /// `n` × (4 KiB write + fdatasync) at the start of the file: µs per
    /// write. Blocks the calling thread for as long.
    pub fn measure(&self, n: usize) -> std::io::Result<f64> {
        let t = Instant::now();
        for _ in 0..n {
            self.file.write_all_at(&self.block, 0)?;
            self.file.sync_data()?;
        }
        Ok(t.elapsed().as_secs_f64() * 1e6 / n as f64)
    }
}

impl Drop for FsyncProbe {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The runs of the throughput workload: a batch of `tp_workflows`
/// workflows, `tp_in_flight` at a time, `tp_runs` batches one after another
/// (fewer if the budget runs out), each timed on its own. A batch on an
/// in-memory store takes milliseconds and is moved by one descheduling of
/// the process; the median of several is not.
pub struct ThroughputRuns {
    runs: u32,
    steps: u32,
    workflows: u32,
    in_flight: usize,
    end: Instant,
    rates: Vec<f64>,
    walls: Vec<f64>,
    p50s: Vec<f64>,
    p99s: Vec<f64>,
    fewest_completed: Option<usize>,
}

impl ThroughputRuns {
    pub fn new(p: &Params) -> Self {
        ThroughputRuns {
            runs: p.tp_runs.max(1),
            steps: p.tp_steps,
            workflows: p.tp_workflows,
            in_flight: p.tp_in_flight as usize,
            end: deadline(p.budget_s / 2.0),
            rates: Vec::new(),
            walls: Vec::new(),
            p50s: Vec::new(),
            p99s: Vec::new(),
            fewest_completed: None,
        }
    }

    /// The index of the next batch, if one is due: until `tp_runs` ran, or
    /// after the first once half the budget is spent.
    pub fn next(&mut self) -> Option<u32> {
        next_run(self.walls.len(), self.runs, self.end)
    }

    /// Runs and records a batch: `tp_workflows` calls of `run_one(i)`, each
    /// a workflow from start to result, at most `tp_in_flight` at a time (a
    /// new one starts when one ends). With `stop`, no workflow starts after
    /// it. Returns how many started.
    pub async fn batch<F, Fut, T, E>(
        &mut self,
        stop: Option<Instant>,
        run_one: F,
    ) -> anyhow::Result<u32>
    where
        F: Fn(u32) -> Fut,
        Fut: std::future::Future<Output = Result<T, E>> + Send + 'static,
        T: Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(self.in_flight));
        let t = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let mut started = 0;
        for i in 0..self.workflows {
            let slot = slots.clone().acquire_owned().await?;
            if stop.is_some_and(|stop| Instant::now() >= stop) {
                break;
            }
            let run = run_one(i);
            tasks.spawn(async move {
                let t = Instant::now();
                run.await?;
                drop(slot);
                Ok::<_, E>(t.elapsed())
            });
            started += 1;
        }
        let mut latencies_ms = Vec::with_capacity(started as usize);
        while let Some(res) = tasks.join_next().await {
            match res? {
                Ok(d) => latencies_ms.push(d.as_secs_f64() * 1e3),
                Err(e) => anyhow::bail!("workflow failed: {e}"),
            }
        }
        latencies_ms.sort_by(f64::total_cmp);
        self.finished(t.elapsed(), &latencies_ms);
        Ok(started)
    }

    /// Records a batch: its wall time and its workflows' latencies in ms,
    /// sorted (one per completed workflow).
    fn finished(&mut self, wall: Duration, latencies_ms: &[f64]) {
        let wall = wall.as_secs_f64();
        self.rates
            .push(latencies_ms.len() as f64 * self.steps as f64 / wall);
        self.walls.push(wall);
        self.p50s.push(percentile(latencies_ms, 50.0));
        self.p99s.push(percentile(latencies_ms, 99.0));
        let fewest = self.fewest_completed.get_or_insert(latencies_ms.len());
        *fewest = (*fewest).min(latencies_ms.len());
    }

    /// The medians over the batches of steps per second, wall time and
    /// latency percentiles, and the fewest workflows any batch completed.
    pub fn report(mut self, r: &mut CellResult) {
        let runs = self.walls.len();
        set_medians(
            r,
            [
                ("steps_per_s", &mut self.rates),
                ("wall_s", &mut self.walls),
                ("p50_ms", &mut self.p50s),
                ("p99_ms", &mut self.p99s),
            ],
        );
        r.set("completed", self.fewest_completed.unwrap_or(0) as f64);
        r.set("tp_runs", runs as f64);
    }
}

/// History metrics from the probe: the per-step cost over the first window
/// and over the last window reached.
pub fn history_metrics(r: &mut CellResult, steps: u32, window: u32) {
    let w = window as usize;
    if let Some(early) = mean_step_gap_us(1, w) {
        r.set("early_us", early);
    }
    let last = last_recorded_step().unwrap_or(0);
    r.set("reached_step", last as f64 + 1.0);
    let end = last.min(steps as usize - 1);
    if end >= 3 * w {
        if let Some(late) = mean_step_gap_us(end - w, end) {
            r.set("late_us", late);
            r.set("late_at", (end - w) as f64 + 1.0);
        }
    }
    if let (Some(e), Some(l)) = (r.metrics.get("early_us"), r.metrics.get("late_us")) {
        r.set("late_over_early", l / e);
    }
    // The same over the first and the last tenth of the steps reached: a
    // window of a thousand steps lasts long enough that one descheduling
    // of the process or one slow commit does not decide it, so a cost that
    // grows with the journal shows here, and noise does not.
    let tenth = end / 10;
    if tenth >= w {
        if let (Some(e), Some(l)) = (
            mean_step_gap_us(1, 1 + tenth),
            mean_step_gap_us(end - tenth, end),
        ) {
            r.set("first_tenth_us", e);
            r.set("last_tenth_us", l);
            r.set("tenths_ratio", l / e);
        }
    }
    // The tail over every step. The slowest gap is what one slow commit
    // (a WAL checkpoint inside a step's commit, a busy disk) costs the
    // workflow waiting on it; such commits are too rare to move the p99.
    let mut gaps = step_gaps_us(0, end);
    if !gaps.is_empty() {
        // What the whole workflow cost per step, slow commits included.
        r.set("mean_gap_us", gaps.iter().sum::<f64>() / gaps.len() as f64);
        gaps.sort_by(f64::total_cmp);
        r.set("gap_p99_us", percentile(&gaps, 99.0));
        r.set("gap_max_ms", gaps[gaps.len() - 1] / 1e3);
    }
    // The same with the median step gap of each window, which one slow
    // commit (a WAL checkpoint, a busy disk) does not move.
    if end >= 3 * w {
        if let (Some(e), Some(l)) = (median_gap_us(1, w), median_gap_us(end - w, end)) {
            r.set("late_over_early_median", l / e);
        }
    }
}

/// The instant `budget_s` seconds from now.
pub fn deadline(budget_s: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64(budget_s)
}

/// Runs `f(0..n)` with up to `concurrency` calls in flight, until `end`.
/// Returns the outputs of the calls that succeeded and the first error.
pub async fn start_concurrently<T, E, Fut>(
    n: u32,
    concurrency: usize,
    end: Instant,
    f: impl Fn(u32) -> Fut,
) -> (Vec<T>, Option<String>)
where
    Fut: std::future::Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut out = Vec::with_capacity(n as usize);
    let mut err: Option<String> = None;
    let mut take =
        |res: Result<Result<T, E>, tokio::task::JoinError>, err: &mut Option<String>| match res {
            Ok(Ok(t)) => out.push(t),
            Ok(Err(e)) => {
                err.get_or_insert(e.to_string());
            }
            Err(e) => {
                err.get_or_insert(e.to_string());
            }
        };
    for i in 0..n {
        if Instant::now() >= end || err.is_some() {
            break;
        }
        while set.len() >= concurrency {
            match set.join_next().await {
                Some(res) => take(res, &mut err),
                None => break,
            }
        }
        set.spawn(f(i));
    }
    while let Some(res) = set.join_next().await {
        take(res, &mut err);
    }
    (out, err)
}

/// Workflows started at once by the parked workload's starter.
pub const STARTERS: usize = 64;

/// Removes a SQLite database file with its WAL and shared-memory files.
pub fn remove_sqlite_files(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}
