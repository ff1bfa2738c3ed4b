//! `--profile`: runs each cell's child process under a profiler, for finding
//! where a missed target's time goes. `perf` samples with call stacks and
//! leaves a flame graph (SVG) beside its data; `callgrind` counts
//! instructions, repeatably whatever else the machine does, for
//! `callgrind_annotate`.
//!
//! Numbers measured under a profiler carry its overhead (callgrind runs the
//! cell some fifty times slower): profile a run, do not report it.

use std::ffi::OsString;
use std::io::{BufReader, BufWriter};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use inferno::collapse::Collapse as _;

/// A profiler to run the cells under.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profiler {
    /// `perf record` with DWARF call stacks (8 KiB of stack a sample: some
    /// 8 MB a second for each busy thread at 999 Hz), then a flame graph
    /// of them.
    Perf,
    /// `valgrind --tool=callgrind`: instruction counts per function.
    Callgrind,
}

impl Profiler {
    /// The name `--profile` takes.
    pub fn name(self) -> &'static str {
        match self {
            Profiler::Perf => "perf",
            Profiler::Callgrind => "callgrind",
        }
    }
}

/// Where and how the cells are profiled.
#[derive(Debug)]
pub struct Profiling {
    /// The profiler.
    pub tool: Profiler,
    /// Where its files go.
    pub dir: PathBuf,
    /// `perf`'s samples per second.
    frequency: u32,
    /// The files written so far, in order; `perf`'s are drawn as flame
    /// graphs once the run is over, so that drawing one never falls inside
    /// a timed part of a cell (a recovery cell times its second process
    /// from the first one's death).
    recorded: Mutex<Vec<PathBuf>>,
}

/// How long a profiler may take to write what it recorded once its cell
/// has ended or was asked to stop.
const WRITE_GRACE: Duration = Duration::from_secs(60);

impl Profiling {
    /// Checks that the tool is installed and allowed to record, and
    /// creates the output directory.
    pub fn new(tool: Profiler, dir: PathBuf, frequency: u32) -> Result<Self> {
        let (program, check): (&str, &[&str]) = match tool {
            Profiler::Perf => ("perf", &["record", "-q", "-o", "/dev/null", "--", "true"]),
            Profiler::Callgrind => ("valgrind", &["--version"]),
        };
        let ok = Command::new(program)
            .args(check)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            bail!(
                "--profile {} needs `{program}` installed (Debian: linux-perf or valgrind) \
                 and allowed to record (`{program} {}` failed; for perf, see \
                 /proc/sys/kernel/perf_event_paranoid)",
                tool.name(),
                check.join(" ")
            );
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the profile directory {}", dir.display()))?;
        Ok(Profiling {
            tool,
            dir,
            frequency,
            recorded: Mutex::new(Vec::new()),
        })
    }

    /// The command that runs `exe` under the profiler, its output in a file
    /// named for `cell`, and that file.
    pub fn command(&self, exe: &Path, cell: &str) -> (Command, PathBuf) {
        let (mut cmd, out) = match self.tool {
            Profiler::Perf => {
                let out = self.dir.join(format!("{cell}.perf.data"));
                let mut cmd = Command::new("perf");
                cmd.args(["record", "--quiet", "--call-graph", "dwarf,8192", "-F"])
                    .arg(self.frequency.to_string())
                    .arg("-o")
                    .arg(&out)
                    .arg("--");
                (cmd, out)
            }
            Profiler::Callgrind => {
                let out = self.dir.join(format!("{cell}.callgrind.out"));
                let mut file = OsString::from("--callgrind-out-file=");
                file.push(&out);
                let mut cmd = Command::new("valgrind");
                cmd.args(["--tool=callgrind", "--quiet"]).arg(file);
                (cmd, out)
            }
        };
        cmd.arg(exe);
        (cmd, out)
    }

    /// Notes that the child writing `out` has exited.
    pub fn recorded(&self, out: PathBuf) {
        self.recorded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(out);
    }

    /// Once the run is over: draws the flame graph of every `perf` file and
    /// prints what to look at.
    pub fn finish(&self) {
        let recorded =
            std::mem::take(&mut *self.recorded.lock().unwrap_or_else(|e| e.into_inner()));
        eprintln!("profiles ({}):", self.dir.display());
        for out in recorded {
            match self.tool {
                Profiler::Callgrind => eprintln!("  callgrind_annotate {}", out.display()),
                Profiler::Perf => {
                    let svg = out.with_extension("svg");
                    match flame_graph(&out, &svg) {
                        Ok(()) => {
                            eprintln!("  {} (perf report -i {})", svg.display(), out.display())
                        }
                        Err(e) => eprintln!("  {}: no flame graph: {e:#}", out.display()),
                    }
                }
            }
        }
    }
}

/// Folds the stacks `perf script` prints for `data` and draws them to `svg`.
fn flame_graph(data: &Path, svg: &Path) -> Result<()> {
    // Inlined frames are left out: expanding them runs addr2line on every
    // address, which takes minutes on DWARF stacks.
    let mut script = Command::new("perf")
        .args(["script", "--no-inline", "-i"])
        .arg(data)
        .stdout(Stdio::piped())
        .spawn()
        .context("running perf script")?;
    let stacks = BufReader::new(script.stdout.take().context("perf script's output")?);
    let mut folded = Vec::new();
    let collapsed = inferno::collapse::perf::Folder::default().collapse(stacks, &mut folded);
    let status = script.wait()?;
    collapsed.context("folding perf script's stacks")?;
    if !status.success() {
        bail!("perf script -i {} failed ({status})", data.display());
    }
    let file = std::fs::File::create(svg).with_context(|| format!("creating {}", svg.display()))?;
    let mut options = inferno::flamegraph::Options::default();
    options.title = data
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    inferno::flamegraph::from_reader(&mut options, folded.as_slice(), BufWriter::new(file))
        .context("drawing the flame graph")?;
    Ok(())
}

/// Stops a profiled child so that its profiler still writes what it
/// recorded: SIGINT, which `perf record` answers by ending its cell with
/// SIGTERM and writing its data, and a cell under valgrind by ending with
/// callgrind's output written; SIGKILL if it has not exited within
/// [`WRITE_GRACE`]. (Killed then, `perf` would leave its cell running.)
pub fn stop(child: &mut Child) {
    // SAFETY: `kill` only sends a signal, to a child not yet waited for,
    // so its pid is still its own.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    if !exits_within(child, WRITE_GRACE) {
        let _ = child.kill();
    }
}

/// Waits up to `limit` for `child` to exit; whether it did.
fn exits_within(child: &mut Child, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => return false,
        }
    }
}

/// After a profiled cell's RESULT: waits for its profiler to write what it
/// recorded, and stops it if that takes longer than [`WRITE_GRACE`].
pub fn wait_for_writes(child: &mut Child) {
    if !exits_within(child, WRITE_GRACE) {
        stop(child);
    }
}
