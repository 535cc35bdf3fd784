//! `cargo xtask fuzz [TARGET] [--seconds N]`: the libFuzzer targets in
//! `fuzz/` (cargo-fuzz, nightly), and the brief run of each that
//! `cargo xtask test` makes ([`smoke`]).
//!
//! libFuzzer grows a working corpus in `fuzz/work/TARGET` (not committed)
//! from the committed seeds in `fuzz/corpus/TARGET`, which it only reads;
//! a crash is saved in `fuzz/artifacts/TARGET/`. The whole output of each
//! run is kept in `fuzz/target/logs/TARGET.log`.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{
    setup,
    util::{exec, root},
};

/// Every target, in the order `cargo xtask fuzz` runs them.
pub const TARGETS: &[&str] = &[
    "capsule_decoder",
    "http_heads",
    "offload",
    "coalescer",
    "session",
    "client_packet",
    "client_packet6",
];

/// How long `cargo xtask test` runs each target.
const SMOKE_SECONDS: u64 = 5;

#[derive(Args)]
pub struct Options {
    /// One target (default: every target in turn).
    pub target: Option<String>,
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Rewrite the seed corpus (fuzz/corpus) from its generator instead.
    #[arg(long)]
    pub seeds: bool,
    /// Only what `cargo xtask test` runs: every target for a few seconds,
    /// from its seeds alone.
    #[arg(long, conflicts_with_all = ["target", "seconds", "seeds"])]
    pub smoke: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    setup::cargo_fuzz()?;
    if opts.seeds {
        return write_seeds();
    }
    if opts.smoke {
        return match smoke()? {
            (passed, 0) => {
                eprintln!("fuzz: {passed} targets passed");
                Ok(())
            }
            (_, failed) => bail!("{failed} fuzz target(s) failed"),
        };
    }
    let targets: Vec<&str> = match &opts.target {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!("no fuzz target {t}; there are {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    build()?;
    let mut failed = Vec::new();
    let mut summaries = Vec::new();
    for target in targets {
        let work = fuzz_dir().join("work").join(target);
        fs::create_dir_all(&work)?;
        let outcome = run_target(target, &work, opts.seconds, true)?;
        summaries.push(format!("{target}: {}", outcome.describe()));
        if !outcome.passed {
            failed.push(target);
        }
    }
    eprintln!("\nfuzz results:");
    for line in &summaries {
        eprintln!("  {line}");
    }
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Builds every target, then runs each for a few seconds from the seed
/// corpus alone. Returns how many passed and how many failed; fails as a
/// whole only if cargo-fuzz cannot be installed or the targets not built.
pub fn smoke() -> Result<(usize, usize)> {
    setup::cargo_fuzz()?;
    build()?;
    let (mut passed, mut failed) = (0, 0);
    for target in TARGETS {
        // A fresh working corpus each time: the smoke run starts from the
        // committed seeds only, so its result does not depend on history.
        let work = fuzz_dir().join("target/smoke").join(target);
        let _ = fs::remove_dir_all(&work);
        fs::create_dir_all(&work)?;
        let outcome = run_target(target, &work, SMOKE_SECONDS, false)?;
        eprintln!("fuzz {target}: {}", outcome.describe());
        if outcome.passed {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    Ok((passed, failed))
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

/// `cargo +nightly fuzz SUBCOMMAND`, in the workspace root, without the
/// outer stable cargo's variables.
fn cargo_fuzz(subcommand: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .args(["+nightly", "fuzz", subcommand])
        // The code under test has no unsafe: a sanitizer would only slow
        // it down. Memory bounds are asserted by the targets themselves.
        .args(["--sanitizer", "none"]);
    cmd
}

fn build() -> Result<()> {
    let started = Instant::now();
    exec(&mut cargo_fuzz("build")).context("building the fuzz targets")?;
    eprintln!(
        "fuzz: targets built in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// libFuzzer options beyond the defaults, per target.
fn target_args(target: &str) -> Vec<String> {
    let dict = fuzz_dir().join("dict/veil.dict");
    let mut args = Vec::new();
    match target {
        // Long enough to reach the 8 KiB head limit.
        "http_heads" | "session" => args.push("-max_len=16384".to_owned()),
        // Super-packets of up to 16 KiB: up to 256 segments.
        "offload" => args.push("-max_len=16384".to_owned()),
        _ => {}
    }
    if matches!(target, "http_heads" | "session" | "capsule_decoder") {
        args.push(format!("-dict={}", dict.display()));
    }
    args
}

struct Outcome {
    passed: bool,
    seconds: f64,
    runs: Option<u64>,
    coverage: Option<String>,
    artifact: Option<String>,
    log: PathBuf,
}

impl Outcome {
    fn describe(&self) -> String {
        let runs = self
            .runs
            .map_or("? runs".to_owned(), |r| format!("{r} runs"));
        let cov = self.coverage.as_deref().unwrap_or("coverage unknown");
        let verdict = if self.passed { "passed" } else { "FAILED" };
        let mut s = format!("{verdict} ({runs} in {:.0} s, {cov})", self.seconds);
        if !self.passed {
            match &self.artifact {
                Some(a) => s.push_str(&format!("; input saved as {a}")),
                None => s.push_str(&format!("; see {}", self.log.display())),
            }
        }
        s
    }
}

/// Runs one target for `seconds`, growing the corpus in `work` from the
/// seeds, its output in `fuzz/target/logs/TARGET.log` (and on the
/// terminal if `echo`).
fn run_target(target: &str, work: &Path, seconds: u64, echo: bool) -> Result<Outcome> {
    let logs = fuzz_dir().join("target/logs");
    fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{target}.log"));
    let mut log = fs::File::create(&log_path)?;
    let seeds = fuzz_dir().join("corpus").join(target);
    let mut cmd = cargo_fuzz("run");
    cmd.arg(target)
        .arg(work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // An input that takes this long is a loop.
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .args(target_args(target))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if echo {
        eprintln!("fuzz: {target} for {seconds} s");
    }
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting cargo fuzz run {target}"))?;
    // libFuzzer reports on stderr; cargo's few lines on stdout go first.
    let stdout = child.stdout.take().expect("piped");
    let out_thread = std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let mut lines = Vec::new();
    for line in BufReader::new(child.stderr.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        writeln!(log, "{line}")?;
        if echo {
            eprintln!("{line}");
        }
        lines.push(line);
    }
    let status = child.wait()?;
    let stdout = out_thread.join().unwrap_or_default();
    log.write_all(stdout.as_bytes())?;
    let mut outcome = summarize(&lines, status.success(), log_path);
    outcome.seconds = started.elapsed().as_secs_f64();
    if !outcome.passed && !echo {
        // What went wrong, without the thousands of lines before it.
        let tail = lines.len().saturating_sub(40);
        for line in &lines[tail..] {
            eprintln!("  | {line}");
        }
    }
    Ok(outcome)
}

/// Reads executions, coverage and any saved input from libFuzzer's output.
fn summarize(lines: &[String], success: bool, log: PathBuf) -> Outcome {
    let after = |line: &str, key: &str| -> Option<String> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next().map(str::to_owned)
    };
    let runs = lines
        .iter()
        .rev()
        .find_map(|l| after(l, "stat::number_of_executed_units:"))
        .and_then(|n| n.parse().ok());
    let coverage = lines.iter().rev().find(|l| l.contains(" cov: ")).map(|l| {
        let field = |k| after(l, k).unwrap_or_default();
        format!(
            "cov {} ft {} corpus {}",
            field(" cov: "),
            field(" ft: "),
            field(" corp: ")
        )
    });
    let artifact = lines.iter().find_map(|l| after(l, "Test unit written to "));
    Outcome {
        passed: success,
        seconds: 0.0,
        runs,
        coverage,
        artifact,
        log,
    }
}

/// Regenerates `fuzz/corpus` with the `seeds` example (veil's own encoders).
fn write_seeds() -> Result<()> {
    let corpus = fuzz_dir().join("corpus");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(fuzz_dir())
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("CARGO_TARGET_DIR")
        .args(["+nightly", "run", "--quiet", "--example", "seeds", "--"])
        .arg(&corpus);
    exec(&mut cmd).context("generating the seed corpus")
}
