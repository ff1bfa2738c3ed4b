//! `--profile`: runs each cell's child process under a profiler, for finding
//! where a missed target's time goes. `perf` samples with call stacks and
//! leaves a flame graph (SVG) beside its data; `callgrind` counts
//! instructions, repeatably whatever else the machine does, for
//! `callgrind_annotate`.
//!
//! Numbers measured under a profiler carry its overhead (callgrind runs the
//! cell some fifty times slower): profile a run, do not report it.

use std::io::{BufReader, BufWriter};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context as _, Result};
use inferno::collapse::Collapse as _;

/// A profiler to run the cells under.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profiler {
    /// `perf record` with DWARF call stacks (8 KiB of stack a sample, so
    /// some 16 MB a second of a busy cell at 999 Hz), then a flame graph of
    /// them.
    Perf,
    /// `valgrind --tool=callgrind`: instruction counts per function.
    Callgrind,
}

/// Where and how the cells are profiled.
#[derive(Debug, Clone)]
pub struct Profiling {
    pub tool: Profiler,
    pub dir: PathBuf,
    /// `perf`'s samples per second.
    pub frequency: u32,
}

impl Profiling {
    /// Creates the output directory and checks that the tool is installed.
    pub fn new(tool: Profiler, dir: PathBuf, frequency: u32) -> Result<Self> {
        let (program, package) = match tool {
            Profiler::Perf => ("perf", "linux-perf"),
            Profiler::Callgrind => ("valgrind", "valgrind"),
        };
        let found = Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            bail!("--profile needs `{program}` (Debian package {package})");
        }
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the profile directory {}", dir.display()))?;
        Ok(Profiling {
            tool,
            dir,
            frequency,
        })
    }

    /// The command that runs `exe` under the profiler, its output in a file
    /// named for `cell`, and that file. The child gets a process group of
    /// its own, so that [`kill`] stops the profiler and the cell together.
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
                let mut cmd = Command::new("valgrind");
                cmd.args(["--tool=callgrind", "--quiet"])
                    .arg(format!("--callgrind-out-file={}", out.display()));
                (cmd, out)
            }
        };
        cmd.arg(exe).process_group(0);
        (cmd, out)
    }

    /// After the cell's child exited: for `perf`, renders the flame graph
    /// of `out` beside it. Returns what to look at.
    pub fn finish(&self, out: &Path) -> Result<String> {
        match self.tool {
            Profiler::Callgrind => Ok(format!("callgrind_annotate {}", out.display())),
            Profiler::Perf => {
                let svg = out.with_extension("svg");
                flame_graph(out, &svg)?;
                Ok(format!(
                    "{} (perf report -i {})",
                    svg.display(),
                    out.display()
                ))
            }
        }
    }
}

/// Folds the stacks `perf script` prints for `data` and draws them to `svg`.
fn flame_graph(data: &Path, svg: &Path) -> Result<()> {
    let mut script = Command::new("perf")
        .args(["script", "-i"])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("running perf script")?;
    let stacks = BufReader::new(script.stdout.take().context("perf script's output")?);
    let mut folded = Vec::new();
    inferno::collapse::perf::Folder::default()
        .collapse(stacks, &mut folded)
        .context("folding perf script's stacks")?;
    let status = script.wait()?;
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

/// Kills `child` and, when it leads a process group of its own (a profiled
/// cell: the profiler and the cell under it), the whole group.
pub fn kill(child: &mut Child, profiled: bool) {
    if profiled {
        // SAFETY: `killpg` only sends a signal; the group is the child's own.
        unsafe {
            libc::killpg(child.id() as libc::pid_t, libc::SIGKILL);
        }
    } else {
        let _ = child.kill();
    }
}
