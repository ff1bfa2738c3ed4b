//! Side-by-side comparison of Fluxo with the durable workflow engines durare
//! and duroxide: the same workloads, on the same storage with the same
//! durability, interleaved within each repetition.
//!
//! ```sh
//! cargo run --release --manifest-path benches/compare/Cargo.toml -- --quick
//! ```
//!
//! Every (workload, backend, engine) cell runs in a fresh child process (the
//! harness binary itself), so memory figures, background tasks and caches
//! never leak from one engine into the next; the parent only prepares
//! storage, measures the disk, collects the results and prints the table.

mod child;
mod common;
mod durare_engine;
mod duroxide_engine;
mod floor;
mod fluxo_engine;
mod profile;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::Parser;

use common::{Backend, CellResult, Engine, Params, Spec, Target, Workload};

#[derive(Parser, Debug)]
#[command(
    about = "Runs the same workloads on Fluxo, durare and duroxide and prints a markdown table"
)]
struct Args {
    /// Smaller sizes (10,000 parked, 1,000 recovered, a 2,010-step history)
    /// and shorter budgets: checks that everything works.
    #[arg(long)]
    quick: bool,
    /// Repetitions of the sequential, throughput and history workloads.
    #[arg(long)]
    reps: Option<usize>,
    /// Repetitions of the sequential, throughput and history workloads on
    /// the in-memory backend, if more than --reps: its cells take a second
    /// or two, and their figures move by up to a factor of two from one
    /// cell (process) to the next, so their median needs more of them.
    #[arg(long, default_value_t = 5)]
    memory_reps: usize,
    /// Repetitions of the parked and recovery workloads (each is long).
    #[arg(long, default_value_t = 1)]
    heavy_reps: usize,
    /// Workloads to run.
    #[arg(long, value_delimiter = ',', value_enum,
          default_values = ["sequential", "throughput", "history", "parked", "recovery"])]
    workloads: Vec<Workload>,
    /// Engines to run.
    #[arg(long, value_delimiter = ',', value_enum, default_values = ["fluxo", "durare", "duroxide"])]
    engines: Vec<Engine>,
    /// Backends to run (redis and mongodb need the features of the same name).
    #[arg(long, value_delimiter = ',', value_enum,
          default_values = ["memory", "sqlite-full", "sqlite-normal", "postgres"])]
    backends: Vec<Backend>,
    /// Backends for the parked and recovery workloads (default: --backends).
    #[arg(long, value_delimiter = ',', value_enum)]
    heavy_backends: Option<Vec<Backend>>,
    /// Seconds one cell may spend on its workload before it reports what it
    /// reached (default 60 with --quick, else 300).
    #[arg(long)]
    budget: Option<f64>,
    /// duroxide's dispatcher_min_poll_interval in ms (its default is 100).
    #[arg(long, default_value_t = 1)]
    duroxide_poll_ms: u64,
    /// duroxide's orchestration and worker concurrency for the throughput,
    /// parked and recovery workloads (its default is 2).
    #[arg(long, default_value_t = 2)]
    duroxide_concurrency: usize,
    /// Postgres server; every engine and run gets a fresh database on it.
    #[arg(
        long,
        env = "FLUXO_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable"
    )]
    postgres_url: String,
    /// Redis server for Fluxo's Redis backend.
    #[arg(
        long,
        env = "FLUXO_TEST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    /// MongoDB server for Fluxo's MongoDB backend.
    #[arg(
        long,
        env = "FLUXO_TEST_MONGODB_URL",
        default_value = "mongodb://127.0.0.1:27017/?directConnection=true"
    )]
    mongodb_url: String,
    /// Directory for the SQLite files and the fsync probe (default: the
    /// system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write the report (markdown) to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run every cell under a profiler (narrow the run with --engines,
    /// --backends and --workloads): `perf` leaves `<cell>.perf.data`, and a
    /// flame graph `<cell>.perf.svg` drawn once the run is over; `callgrind`
    /// a `<cell>.callgrind.out` (some fifty times slower: give it --quick or
    /// a larger --budget). Files go to --profile-dir. The run's numbers then
    /// carry the profiler's overhead.
    #[arg(long, value_enum)]
    profile: Option<profile::Profiler>,
    /// Where --profile writes its files.
    #[arg(long, default_value = "profiles")]
    profile_dir: PathBuf,
    /// Samples per second for --profile perf (callgrind counts every
    /// instruction).
    #[arg(long, default_value_t = 999)]
    profile_frequency: u32,
    /// Internal: run one cell (JSON spec) and print its result.
    #[arg(long, hide = true)]
    child: Option<String>,
}

fn main() -> Result<()> {
    child::mark_process_start();
    let args = Args::parse();
    if let Some(spec) = &args.child {
        return child::run_child(spec);
    }
    parent(args)
}

// ----- the parent ----------------------------------------------------------------

struct Run {
    args: Args,
    params: Params,
    dir: PathBuf,
    counter: usize,
    admin: tokio::runtime::Runtime,
    /// `--profile`: the profiler every cell runs under.
    profiling: Option<profile::Profiling>,
}

/// One engine's setup in one cell: the engine and, for Fluxo's parked
/// workload, its cache variant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Column {
    engine: &'static str,
    variant: Option<String>,
}

impl Column {
    fn label(&self) -> String {
        match &self.variant {
            None => self.engine.to_owned(),
            Some(v) => format!("{} [{v}]", self.engine),
        }
    }
}

type Key = (Workload, Backend, Column);

fn parent(args: Args) -> Result<()> {
    let quick = args.quick;
    let budget = args.budget.unwrap_or(if quick { 60.0 } else { 300.0 });
    let params = Params {
        seq_steps: 100,
        seq_runs: 9,
        tp_workflows: 1_000,
        tp_runs: 5,
        tp_steps: 10,
        tp_in_flight: 100,
        hist_steps: if quick { 2_010 } else { 10_010 },
        hist_window: 20,
        parked: if quick { 10_000 } else { 100_000 },
        rec_workflows: if quick { 1_000 } else { 10_000 },
        rec_steps: 4,
        budget_s: budget,
        duroxide_poll_ms: args.duroxide_poll_ms,
        duroxide_concurrency: args.duroxide_concurrency,
    };
    // Checked before anything is made: a profiler that cannot run stops
    // the run at once.
    let profiling = args
        .profile
        .map(|tool| profile::Profiling::new(tool, args.profile_dir.clone(), args.profile_frequency))
        .transpose()?;
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("fluxo-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let admin = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut run = Run {
        args,
        params,
        dir,
        counter: 0,
        admin,
        profiling,
    };
    let reps = run.args.reps.unwrap_or(if quick { 1 } else { 3 }).max(1);

    let machine = machine_description();
    eprintln!("{machine}");
    let fsync = common::fsync_probe(&run.dir, 1_000)?;
    eprintln!(
        "raw fsync: {:.0} µs per 4 KiB write + fdatasync ({:.0}/s)",
        fsync,
        1e6 / fsync
    );

    let started = Instant::now();
    let mut results: BTreeMap<Key, Vec<CellResult>> = BTreeMap::new();
    let mut na: BTreeMap<(Workload, Backend, &'static str), String> = BTreeMap::new();
    let workloads = run.args.workloads.clone();
    for &workload in &workloads {
        let heavy = matches!(workload, Workload::Parked | Workload::Recovery);
        let backends: Vec<Backend> = if heavy {
            run.args
                .heavy_backends
                .clone()
                .unwrap_or_else(|| run.args.backends.clone())
        } else {
            run.args.backends.clone()
        };
        let (heavy_reps, memory_reps) = (run.args.heavy_reps, run.args.memory_reps);
        let reps_on = |backend: Backend| {
            if heavy {
                heavy_reps.max(1)
            } else if backend == Backend::Memory {
                reps.max(memory_reps)
            } else {
                reps
            }
        };
        let most = backends.iter().map(|&b| reps_on(b)).max().unwrap_or(0);
        for rep in 0..most {
            for &backend in &backends {
                let reps = reps_on(backend);
                if rep >= reps {
                    continue;
                }
                // Interleave: each repetition starts with the next engine.
                let mut engines = run.args.engines.clone();
                let n = engines.len();
                engines.rotate_left(rep % n.max(1));
                for &engine in &engines {
                    if let Some(reason) = unsupported(engine, backend, workload) {
                        na.insert((workload, backend, engine.name()), reason);
                        continue;
                    }
                    for variant in variants(engine, workload, &run.params) {
                        let column = Column {
                            engine: engine.name(),
                            variant: variant.clone(),
                        };
                        eprint!(
                            "[{:>6.0} s] {} {} {} rep {}/{} ... ",
                            started.elapsed().as_secs_f64(),
                            workload.name(),
                            backend.name(),
                            column.label(),
                            rep + 1,
                            reps
                        );
                        let result =
                            run.cell(engine, backend, workload, variant)
                                .unwrap_or_else(|e| CellResult {
                                    error: Some(format!("{e:#}")),
                                    ..Default::default()
                                });
                        eprintln!("{}", summary(&result));
                        results
                            .entry((workload, backend, column))
                            .or_default()
                            .push(result);
                    }
                }
            }
        }
    }
    let fsync_end = common::fsync_probe(&run.dir, 1_000)?;
    eprintln!(
        "raw fsync at the end: {:.0} µs per 4 KiB write + fdatasync ({:.0}/s)",
        fsync_end,
        1e6 / fsync_end
    );
    let report = report(
        &run,
        &machine,
        (fsync, fsync_end),
        reps,
        &results,
        &na,
        started.elapsed(),
    );
    println!("{report}");
    if let Some(out) = &run.args.out {
        std::fs::write(out, &report).with_context(|| format!("writing {}", out.display()))?;
    }
    let _ = std::fs::remove_dir_all(&run.dir);
    if let Some(prof) = &run.profiling {
        prof.finish();
    }
    Ok(())
}

/// Why `engine` cannot run `workload` on `backend`, if it cannot.
fn unsupported(engine: Engine, backend: Backend, workload: Workload) -> Option<String> {
    match (engine, backend) {
        (Engine::Durare, Backend::Redis | Backend::Mongodb) => {
            return Some(format!("durare has no {} backend", backend.name()))
        }
        (Engine::Duroxide, Backend::Redis | Backend::Mongodb) => {
            return Some(format!("duroxide has no {} provider", backend.name()))
        }
        #[cfg(not(feature = "redis"))]
        (Engine::Fluxo, Backend::Redis) => {
            return Some("harness built without the `redis` feature".into())
        }
        #[cfg(not(feature = "mongodb"))]
        (Engine::Fluxo, Backend::Mongodb) => {
            return Some("harness built without the `mongodb` feature".into())
        }
        _ => {}
    }
    if workload == Workload::Recovery && backend == Backend::Memory {
        return Some("nothing survives kill -9 without a durable store".into());
    }
    None
}

fn variants(engine: Engine, workload: Workload, p: &Params) -> Vec<Option<String>> {
    if engine == Engine::Fluxo && workload == Workload::Parked {
        let mut v = vec![None];
        if p.parked > 10_000 {
            v.push(Some("cache-all".to_owned()));
        }
        v.push(Some("evicted".to_owned()));
        v
    } else if engine == Engine::Fluxo && workload == Workload::Recovery {
        vec![
            None,
            Some("random-id".to_owned()),
            Some("lease-5s".to_owned()),
        ]
    } else {
        vec![None]
    }
}

fn summary(r: &CellResult) -> String {
    if let Some(e) = &r.error {
        return format!("ERROR {e}");
    }
    r.metrics
        .iter()
        .map(|(k, v)| format!("{k}={}", fmt_num(*v)))
        .collect::<Vec<_>>()
        .join(" ")
}

impl Run {
    fn next_tag(&mut self, engine: Engine) -> String {
        self.counter += 1;
        format!(
            "cmp_{}_{}_{}",
            engine.name(),
            std::process::id(),
            self.counter
        )
    }

    /// Prepares fresh storage for one run, runs it, cleans up.
    fn cell(
        &mut self,
        engine: Engine,
        backend: Backend,
        workload: Workload,
        variant: Option<String>,
    ) -> Result<CellResult> {
        let tag = self.next_tag(engine);
        let target = match backend {
            Backend::Memory => Target {
                backend,
                path: None,
                url: None,
                tag,
            },
            Backend::SqliteFull | Backend::SqliteNormal => Target {
                backend,
                path: Some(self.dir.join(format!("{tag}.db"))),
                url: None,
                tag,
            },
            Backend::Postgres => {
                let url = self.create_pg_database(&tag)?;
                Target {
                    backend,
                    path: None,
                    url: Some(url),
                    tag,
                }
            }
            Backend::Redis => Target {
                backend,
                path: None,
                url: Some(self.args.redis_url.clone()),
                tag,
            },
            Backend::Mongodb => Target {
                backend,
                path: None,
                url: Some(self.args.mongodb_url.clone()),
                tag,
            },
        };
        let spec = Spec {
            engine,
            workload,
            target: target.clone(),
            mode: "run".into(),
            params: self.params.clone(),
            variant,
        };
        // The disk of this machine is shared and its speed swings: note
        // what a raw durable write cost right before this cell.
        let fsync_before = if backend.is_sqlite() {
            common::fsync_probe(&self.dir, 200).ok()
        } else {
            None
        };
        // And, before a sequential cell, what the store's own commit of a
        // step costs without any engine.
        // (Postgres: also the least a step whose commit is fenced costs;
        // and before a long-workflow cell too, since no engine's step there
        // can cost less than one commit.)
        let (floor, fenced_floor) = match (workload, backend) {
            (Workload::Sequential, Backend::SqliteFull | Backend::SqliteNormal) => (
                floor::sqlite(&self.dir, backend == Backend::SqliteFull).ok(),
                None,
            ),
            (Workload::Sequential | Workload::History, Backend::Postgres) => {
                // On the runtime every cell runs on (multi-threaded, a
                // worker per core), in a task of its own as an engine's
                // commits are: awaited from the thread that blocks on the
                // runtime, every reply would wait for the worker running
                // the I/O driver to wake that thread, which on these
                // machines costs more than the round trip's own work.
                let url = self.args.postgres_url.clone();
                let probed = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| {
                        rt.block_on(async move {
                            tokio::spawn(async move { floor::postgres(&url).await }).await?
                        })
                    });
                match probed {
                    Ok(f) => (Some(f.insert_us), Some(f.fenced_us)),
                    Err(e) => {
                        eprintln!("Postgres floor probe failed: {e:#}");
                        (None, None)
                    }
                }
            }
            _ => (None, None),
        };
        let result = if workload == Workload::Recovery {
            self.recovery(spec)
        } else {
            let timeout = self.child_timeout();
            run_child(&spec, timeout, self.profiling.as_ref()).map(|(r, _)| r)
        };
        self.cleanup(&target);
        result.map(|mut r| {
            if let Some(us) = fsync_before {
                r.set("fsync_us", us);
            }
            // Each step latency the cell measured, over each probe.
            let ratios: &[(&str, [&str; 2])] = match workload {
                Workload::History => &[
                    (
                        "first_tenth_us",
                        ["first_tenth_over_floor", "first_tenth_over_fenced"],
                    ),
                    (
                        "last_tenth_us",
                        ["last_tenth_over_floor", "last_tenth_over_fenced"],
                    ),
                ],
                _ => &[("step_us", ["step_over_floor", "step_over_fenced"])],
            };
            for (i, (floor, key)) in [(floor, "floor_us"), (fenced_floor, "fenced_floor_us")]
                .into_iter()
                .enumerate()
            {
                let Some(us) = floor else { continue };
                r.set(key, us);
                for (step, over) in ratios {
                    if let Some(step) = r.metrics.get(*step).copied() {
                        r.set(over[i], step / us);
                    }
                }
            }
            r
        })
    }

    fn child_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.params.budget_s * 2.0 + 120.0)
    }

    /// Load child (SIGKILLs itself once all workflows are started and half
    /// of their steps ran), then a fresh resume child, timed until every
    /// workflow finished.
    fn recovery(&self, mut spec: Spec) -> Result<CellResult> {
        spec.mode = "load".into();
        let prof = self.profiling.as_ref();
        let mut load = spawn_child(&spec, prof)?;
        let lines = line_reader(load.process.stdout.take().expect("piped"));
        let deadline = Instant::now() + self.child_timeout();
        let steps_at_kill = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(n) = line.strip_prefix("KILLED ") {
                        break n.trim().parse::<f64>().unwrap_or(f64::NAN);
                    }
                    if let Some(n) = line.strip_prefix("STALLED ") {
                        load.kill();
                        let _ = load.wait();
                        bail!("load child stalled after {n} steps");
                    }
                    if let Some(json) = line.strip_prefix("RESULT ") {
                        load.kill();
                        let _ = load.wait();
                        let r: CellResult = serde_json::from_str(json)?;
                        bail!("load child ended early: {}", r.error.unwrap_or_default());
                    }
                }
                Err(_) => {
                    load.kill();
                    let _ = load.wait();
                    bail!("load child never got its workflows in flight");
                }
            }
        };
        let status = load.wait()?;
        // (`perf record` and valgrind end the same way as their cell.)
        {
            use std::os::unix::process::ExitStatusExt as _;
            if status.signal() != Some(libc::SIGKILL) {
                bail!("load child ended with {status}, not SIGKILL");
            }
        }
        spec.mode = "resume".into();
        let t = Instant::now();
        let (mut r, _) = run_child(&spec, self.child_timeout(), prof)?;
        r.set("wall_s", t.elapsed().as_secs_f64());
        r.set("steps_at_kill", steps_at_kill);
        let left = (spec.params.rec_workflows * spec.params.rec_steps) as f64 - steps_at_kill;
        if let Some(ran) = r.metrics.get("steps_in_resume").copied() {
            r.set("steps_rerun", (ran - left).max(0.0));
        }
        r.set(
            "steps_left",
            (spec.params.rec_workflows * spec.params.rec_steps) as f64 - steps_at_kill,
        );
        Ok(r)
    }

    fn pg_url_with_db(&self, db: &str) -> String {
        let base = &self.args.postgres_url;
        let (head, query) = match base.split_once('?') {
            Some((h, q)) => (h, Some(q)),
            None => (base.as_str(), None),
        };
        let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
        let prefix = match head[scheme_end..].find('/') {
            Some(i) => &head[..scheme_end + i],
            None => head,
        };
        match query {
            Some(q) => format!("{prefix}/{db}?{q}"),
            None => format!("{prefix}/{db}"),
        }
    }

    fn create_pg_database(&self, name: &str) -> Result<String> {
        use sqlx::Connection as _;
        let url = self.args.postgres_url.clone();
        let db = name.to_owned();
        self.admin.block_on(async move {
            let mut conn = sqlx::PgConnection::connect(&url)
                .await
                .with_context(|| format!("connecting to Postgres at {url}"))?;
            sqlx::query(&format!("CREATE DATABASE \"{db}\""))
                .execute(&mut conn)
                .await?;
            conn.close().await?;
            Ok::<_, anyhow::Error>(())
        })?;
        Ok(self.pg_url_with_db(name))
    }

    fn cleanup(&self, target: &Target) {
        if let Some(path) = &target.path {
            common::remove_sqlite_files(path);
        }
        if target.backend == Backend::Redis {
            // Every key of the run is under its prefix, `{tag}:`.
            let script = r#"redis-cli -u "$1" --scan --pattern "{$2}*" | xargs -r -n 500 redis-cli -u "$1" DEL >/dev/null"#;
            let _ = Command::new("sh")
                .args(["-c", script, "sh", target.url(), &target.tag])
                .status();
        }
        if target.backend == Backend::Postgres {
            use sqlx::Connection as _;
            let url = self.args.postgres_url.clone();
            let name = target.tag.clone();
            let dropped = self.admin.block_on(async move {
                let mut conn = sqlx::PgConnection::connect(&url).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .execute(&mut conn)
                    .await?;
                conn.close().await?;
                Ok::<_, anyhow::Error>(())
            });
            if let Err(e) = dropped {
                eprintln!("warning: could not drop database {}: {e:#}", target.tag);
            }
        }
    }
}

/// A cell's child process and, when it runs under a profiler, the
/// profiler and the file it writes.
struct CellChild<'a> {
    /// The child: the harness binary, or the profiler running it.
    process: std::process::Child,
    /// The profiler and its output file, until the child has exited.
    profiled: Option<(&'a profile::Profiling, PathBuf)>,
}

impl CellChild<'_> {
    /// Kills the child; a profiled one is stopped so that its profiler
    /// still writes what it recorded.
    fn kill(&mut self) {
        match self.profiled {
            None => {
                let _ = self.process.kill();
            }
            Some(_) => profile::stop(&mut self.process),
        }
    }

    /// Waits for the child to exit and notes its profile, if any.
    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let status = self.process.wait();
        if let Some((prof, out)) = self.profiled.take() {
            prof.recorded(out);
        }
        status
    }
}

/// Starts the child process of one cell, under the profiler if there is
/// one.
fn spawn_child<'a>(spec: &Spec, prof: Option<&'a profile::Profiling>) -> Result<CellChild<'a>> {
    let exe = std::env::current_exe()?;
    let (mut cmd, profiled) = match prof {
        None => (Command::new(exe), None),
        Some(prof) => {
            let (cmd, out) = prof.command(&exe, &cell_name(spec));
            (cmd, Some((prof, out)))
        }
    };
    let process = cmd
        .arg("--child")
        .arg(serde_json::to_string(spec)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    Ok(CellChild { process, profiled })
}

/// A cell's name in file names: workload, backend, engine (with its run
/// number) and, for the recovery workload, which of its two children.
fn cell_name(spec: &Spec) -> String {
    let mut name = format!(
        "{}-{}-{}",
        spec.workload.name(),
        spec.target.backend.name(),
        spec.target.tag
    );
    if let Some(v) = &spec.variant {
        name.push('-');
        name.push_str(v);
    }
    if spec.mode != "run" {
        name.push('-');
        name.push_str(&spec.mode);
    }
    name
}

fn line_reader(stdout: std::process::ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Runs a child to its RESULT line; kills it after `timeout`.
fn run_child(
    spec: &Spec,
    timeout: Duration,
    prof: Option<&profile::Profiling>,
) -> Result<(CellResult, Duration)> {
    let t = Instant::now();
    let mut child = spawn_child(spec, prof)?;
    let lines = line_reader(child.process.stdout.take().expect("piped"));
    let deadline = t + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                if let Some(json) = line.strip_prefix("RESULT ") {
                    let r: CellResult = match serde_json::from_str(json) {
                        Ok(r) => r,
                        Err(e) => {
                            child.kill();
                            let _ = child.wait();
                            return Err(e.into());
                        }
                    };
                    let took = t.elapsed();
                    // The child exits by itself; make sure. A profiler
                    // gets time to write what it recorded first.
                    if child.profiled.is_some() {
                        profile::wait_for_writes(&mut child.process);
                    } else {
                        std::thread::sleep(Duration::from_millis(50));
                        if child.process.try_wait()?.is_none() {
                            child.kill();
                        }
                    }
                    let _ = child.wait();
                    return Ok((r, took));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                child.kill();
                let _ = child.wait();
                bail!("timed out after {:.0} s", timeout.as_secs_f64());
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait()?;
                bail!("child exited without a result ({status})");
            }
        }
    }
}

// ----- machine and disk --------------------------------------------------------------

fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| format!("{:.1} GiB RAM", kib / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("machine: {cores} cores ({cpu}), {mem}")
}

// ----- the report ------------------------------------------------------------------

struct MetricRow {
    key: &'static str,
    label: &'static str,
    /// Lower is better (latency, memory) or higher (throughput).
    lower_better: bool,
    /// Only for this column variant (Fluxo's parked variants).
    variant: Option<&'static str>,
}

/// The rows the probes fill (the disk, the store's own commits), shown
/// only where a probe ran and not compared between engines.
const PROBE_KEYS: [&str; 11] = [
    "fsync_us",
    "paired_fsync_us",
    "step_over_paired_fsync",
    "floor_us",
    "step_over_floor",
    "fenced_floor_us",
    "step_over_fenced",
    "first_tenth_over_floor",
    "last_tenth_over_floor",
    "first_tenth_over_fenced",
    "last_tenth_over_fenced",
];

fn metric_rows(w: Workload) -> Vec<MetricRow> {
    let mut rows = workload_rows(w);
    if w == Workload::Sequential {
        rows.push(MetricRow {
            key: "floor_us",
            label: "bare store commit just before the engine's cells, no engine (µs; SQLite: a transaction reading the fence and inserting the journal row, Postgres: one INSERT, awaited in a task of a multi-threaded runtime as an engine's commits are)",
            lower_better: true,
            variant: None,
        });
        rows.push(MetricRow {
            key: "step_over_floor",
            label: "per-step latency ÷ bare store commit (1.0 = the store's own cost)",
            lower_better: true,
            variant: None,
        });
        rows.push(MetricRow {
            key: "paired_fsync_us",
            label: "raw fsync right before each run, in the cell's own process (µs; SQLite FULL; median of the runs' probes, 50 × 4 KiB write + fdatasync each)",
            lower_better: true,
            variant: None,
        });
        rows.push(MetricRow {
            key: "step_over_paired_fsync",
            label: "per-step latency ÷ the raw fsync right before the same run (median over runs; 1.0 = one flush per step)",
            lower_better: true,
            variant: None,
        });
        rows.push(MetricRow {
            key: "fenced_floor_us",
            label: "fenced step commit just before the engine's cells, no engine (µs; Postgres: one statement, UPDATE of the run's row under its lease token + INSERT of the journal row, awaited in a task of a multi-threaded runtime as an engine's commits are)",
            lower_better: true,
            variant: None,
        });
        rows.push(MetricRow {
            key: "step_over_fenced",
            label: "per-step latency ÷ fenced step commit (1.0 = the least a fenced step costs this store)",
            lower_better: true,
            variant: None,
        });
    }
    if w == Workload::History {
        let m = |key, label| MetricRow {
            key,
            label,
            lower_better: true,
            variant: None,
        };
        rows.extend([
            m("floor_us", "bare store commit just before the engine's cells, no engine (µs; Postgres: one INSERT, as in the sequential rows)"),
            m("first_tenth_over_floor", "first tenth's µs/step ÷ bare store commit (in a peer's column: how many times faster than the peer an engine whose step costs one such commit would be)"),
            m("last_tenth_over_floor", "last tenth's µs/step ÷ bare store commit"),
            m("fenced_floor_us", "fenced step commit just before the engine's cells, no engine (µs; as in the sequential rows)"),
            m("first_tenth_over_fenced", "first tenth's µs/step ÷ fenced step commit"),
            m("last_tenth_over_fenced", "last tenth's µs/step ÷ fenced step commit"),
        ]);
    }
    rows.push(MetricRow {
        key: "fsync_us",
        label: "raw fsync just before the engine's cells (µs)",
        lower_better: true,
        variant: None,
    });
    rows
}

fn workload_rows(w: Workload) -> Vec<MetricRow> {
    let m = |key, label, lower_better| MetricRow {
        key,
        label,
        lower_better,
        variant: None,
    };
    match w {
        Workload::Sequential => vec![
            m(
                "step_us",
                "per-step latency (µs; gap between step starts, median run)",
                true,
            ),
            m(
                "e2e_step_us",
                "end to end ÷ 100 incl. start and result (µs, median run)",
                true,
            ),
        ],
        Workload::Throughput => vec![
            m(
                "steps_per_s",
                "steps/s (1,000 × 10 steps, 100 in flight)",
                false,
            ),
            m("p50_ms", "workflow latency p50 (ms)", true),
            m("p99_ms", "workflow latency p99 (ms)", true),
        ],
        Workload::History => vec![
            m("early_us", "µs/step at steps 1–20", true),
            m("late_us", "µs/step at the last 20 steps reached", true),
            m("late_at", "… last window starts at step", false),
            m("late_over_early", "late ÷ early (1.0 = flat)", true),
            m(
                "late_over_early_median",
                "late ÷ early, median step gap of each window",
                true,
            ),
            m(
                "first_tenth_us",
                "µs/step over the first tenth of the steps reached",
                true,
            ),
            m(
                "last_tenth_us",
                "µs/step over the last tenth of the steps reached",
                true,
            ),
            m(
                "tenths_ratio",
                "last tenth ÷ first tenth (1.0 = flat)",
                true,
            ),
            m(
                "mean_gap_us",
                "µs/step over the whole workflow (mean gap between step starts)",
                true,
            ),
            m(
                "gap_p99_us",
                "p99 gap between step starts, whole workflow (µs)",
                true,
            ),
            m("gap_max_ms", "slowest gap between step starts (ms)", true),
        ],
        Workload::Parked => vec![
            m("kib_per_wf", "RSS per parked workflow (KiB)", true),
            m("parked", "workflows parked within the budget", false),
            m("park_s", "time to start and park them (s)", true),
            m(
                "wake_all_s",
                "time to signal all and see them finish (s)",
                true,
            ),
            MetricRow {
                key: "kib_per_wf",
                label: "RSS per parked workflow, max_cached = all (KiB)",
                lower_better: true,
                variant: Some("cache-all"),
            },
            MetricRow {
                key: "kib_per_wf",
                label: "RSS per parked workflow, max_cached = 0 (KiB)",
                lower_better: true,
                variant: Some("evicted"),
            },
            MetricRow {
                key: "park_s",
                label: "time to start and park, max_cached = 0 (s)",
                lower_better: true,
                variant: Some("evicted"),
            },
            MetricRow {
                key: "wake_all_s",
                label: "signal all and finish, max_cached = 0 (s)",
                lower_better: true,
                variant: Some("evicted"),
            },
        ],
        Workload::Recovery => vec![
            m(
                "resume_s",
                "fresh process start → all finished (s; Fluxo: same worker id)",
                true,
            ),
            m("steps_left", "steps left at kill -9", false),
            m(
                "steps_rerun",
                "steps run again after the crash (at-least-once)",
                true,
            ),
            MetricRow {
                key: "resume_s",
                label: "fresh process start → all finished, new worker id, lease 30 s (s)",
                lower_better: true,
                variant: Some("random-id"),
            },
            MetricRow {
                key: "resume_s",
                label: "fresh process start → all finished, new worker id, lease 5 s (s)",
                lower_better: true,
                variant: Some("lease-5s"),
            },
        ],
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "–".into()
    } else if a >= 10_000.0 {
        let s = format!("{v:.0}");
        // Thousands separators.
        let (sign, digits) = s.strip_prefix('-').map(|d| ("-", d)).unwrap_or(("", &s));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    run: &Run,
    machine: &str,
    fsync_us: (f64, f64),
    reps: usize,
    results: &BTreeMap<Key, Vec<CellResult>>,
    na: &BTreeMap<(Workload, Backend, &'static str), String>,
    took: Duration,
) -> String {
    let p = &run.params;
    let engines: Vec<&'static str> = run.args.engines.iter().map(|e| e.name()).collect();
    let peers: Vec<&'static str> = engines.iter().copied().filter(|e| *e != "fluxo").collect();
    let mut s = String::new();
    let _ = writeln!(s, "### Setup\n");
    let _ = writeln!(s, "- {machine}");
    let _ = writeln!(
        s,
        "- raw fsync (1,000 × 4 KiB write + fdatasync in the SQLite directory; the floor for one sequential durable step): **{:.0} µs** each (**{:.0}/s**) at the start, **{:.0} µs** ({:.0}/s) at the end; 200 more right before every SQLite cell, their median in the table",
        fsync_us.0,
        1e6 / fsync_us.0,
        fsync_us.1,
        1e6 / fsync_us.1
    );
    let _ = writeln!(
        s,
        "- sizes{}: sequential {} steps (median of {} workflows run one after another in each cell); throughput {} × {} steps, {} in flight (median of {} batches run one after another in each cell); history {} steps (windows of {}); parked {}; recovery {} × {} steps, killed once half the steps ran",
        if run.args.quick { " (--quick)" } else { "" },
        p.seq_steps, p.seq_runs, p.tp_workflows, p.tp_steps, p.tp_in_flight, p.tp_runs, p.hist_steps, p.hist_window,
        p.parked, p.rec_workflows, p.rec_steps
    );
    let _ = writeln!(
        s,
        "- {reps} repetition(s) of sequential/throughput/history ({} on memory, whose cells are short and move the most from one to the next), {} of parked/recovery, engines interleaved in each; medians shown; each cell a fresh process on fresh storage (Postgres: a new database per engine and run, dropped after); budget {:.0} s per cell; total {:.0} s",
        reps.max(run.args.memory_reps), run.args.heavy_reps, p.budget_s, took.as_secs_f64()
    );
    if let Some(prof) = &run.profiling {
        let _ = writeln!(
            s,
            "- **profiled** (`--profile {}`, files in {}): every cell ran under the profiler and its numbers carry its overhead (the fsync and bare-commit probes before each cell ran outside it; the flush probe before each sequential run on SQLite `FULL` ran inside, so its ratio reads high)",
            prof.tool.name(),
            prof.dir.display()
        );
    }
    let _ = writeln!(s, "- Fluxo/peer: the ratio of the medians; for rows marked ↓ below 1 means Fluxo is better, for ↑ above 1 does\n");

    let _ = writeln!(s, "### Durability\n");
    let backends: BTreeSet<Backend> = results.keys().map(|k| k.1).collect();
    for b in &backends {
        let _ = writeln!(s, "- **{}**: {}", b.name(), b.durability());
    }
    let mut notes: BTreeSet<String> = BTreeSet::new();
    for r in results.values().flatten() {
        for n in &r.notes {
            notes.insert(n.clone());
        }
    }
    for n in &notes {
        let _ = writeln!(s, "  - {n}");
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "### Results\n");
    let mut header = String::from("| workload | backend | metric |");
    let mut rule = String::from("|---|---|---|");
    for e in &engines {
        header.push_str(&format!(" {e} |"));
        rule.push_str("---:|");
    }
    if engines.contains(&"fluxo") {
        for peer in &peers {
            header.push_str(&format!(" fluxo/{peer} |"));
            rule.push_str("---:|");
        }
    }
    let _ = writeln!(s, "{header}\n{rule}");
    let mut errors: Vec<String> = Vec::new();
    let workloads: BTreeSet<Workload> = results
        .keys()
        .map(|k| k.0)
        .chain(na.keys().map(|k| k.0))
        .collect();
    for &w in &workloads {
        let wb: BTreeSet<Backend> = results
            .keys()
            .filter(|k| k.0 == w)
            .map(|k| k.1)
            .chain(na.keys().filter(|k| k.0 == w).map(|k| k.1))
            .collect();
        for &b in &wb {
            for row in metric_rows(w) {
                let mut cells: Vec<(Option<f64>, String)> = Vec::new();
                let mut any = false;
                let mut has_value = false;
                for e in &engines {
                    if row.variant.is_some() && *e != "fluxo" {
                        cells.push((None, String::new()));
                        continue;
                    }
                    let col = Column {
                        engine: e,
                        variant: row.variant.map(str::to_owned),
                    };
                    if let Some(reason) = na.get(&(w, b, *e)) {
                        any = true;
                        cells.push((None, format!("n/a: {reason}")));
                        continue;
                    }
                    match results.get(&(w, b, col.clone())) {
                        None => cells.push((None, String::new())),
                        Some(rs) => {
                            any = true;
                            let vals: Vec<f64> = rs
                                .iter()
                                .filter_map(|r| r.metrics.get(row.key).copied())
                                .collect();
                            let failed = rs.iter().filter(|r| r.error.is_some()).count();
                            for r in rs {
                                if let Some(e) = &r.error {
                                    let msg = format!(
                                        "{} / {} / {}: {e}",
                                        w.name(),
                                        b.name(),
                                        col.label()
                                    );
                                    if !errors.contains(&msg) {
                                        errors.push(msg);
                                    }
                                }
                            }
                            let m = median(vals);
                            has_value |= m.is_some();
                            let text = match (m, failed) {
                                (Some(v), 0) => fmt_num(v),
                                (Some(v), f) => format!("{} ({f} failed)", fmt_num(v)),
                                (None, f) if f > 0 => "failed".into(),
                                (None, _) => "–".into(),
                            };
                            cells.push((m, text));
                        }
                    }
                }
                let probe_row = PROBE_KEYS.contains(&row.key);
                if !any || (probe_row && !has_value) {
                    continue;
                }
                let arrow = if row.lower_better { "↓" } else { "↑" };
                let informational = probe_row
                    || matches!(row.key, "late_at" | "parked" | "steps_left" | "steps_rerun");
                let mut line = format!(
                    "| {} | {} | {}{} |",
                    w.name(),
                    b.name(),
                    row.label,
                    if informational {
                        String::new()
                    } else {
                        format!(" {arrow}")
                    }
                );
                for (_, text) in &cells {
                    line.push_str(&format!(" {text} |"));
                }
                if let Some(fi) = engines.iter().position(|e| *e == "fluxo") {
                    for peer in &peers {
                        let pi = engines.iter().position(|e| e == peer).unwrap();
                        let ratio = match (cells[fi].0, cells[pi].0) {
                            (Some(f), Some(q))
                                if q != 0.0 && !informational && row.variant.is_none() =>
                            {
                                format!("{:.2}×", f / q)
                            }
                            _ => String::new(),
                        };
                        line.push_str(&format!(" {ratio} |"));
                    }
                }
                let _ = writeln!(s, "{line}");
            }
        }
    }
    if !errors.is_empty() {
        let _ = writeln!(s, "\nFailures:\n");
        for e in errors {
            let _ = writeln!(s, "- {e}");
        }
    }
    s
}
