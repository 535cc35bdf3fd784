//! `cargo xtask test`: every check, in the order that fails fastest.

use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{
    ebpf, fuzz, setup,
    util::{exec, is_root, root},
};

#[derive(Args)]
pub struct Options {
    /// Skip rustfmt and clippy.
    #[arg(long)]
    pub no_lint: bool,
    /// Only tests whose name contains this.
    pub filter: Option<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run()?;
    ebpf::build(&ebpf::Options::default())?;
    let cargo = || {
        let mut c = Command::new("cargo");
        c.current_dir(root());
        c
    };
    if !opts.no_lint {
        exec(cargo().args(["fmt", "--all", "--", "--check"]))
            .context("rustfmt: run `cargo fmt --all`")?;
        // The crates the workspace leaves out (their own targets and
        // toolchains) are held to the same format.
        for dir in ["veil-ebpf", "fuzz"] {
            exec(
                cargo()
                    .current_dir(root().join(dir))
                    .args(["fmt", "--", "--check"]),
            )
            .with_context(|| format!("rustfmt: run `cargo fmt` in {dir}"))?;
        }
        exec(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // The end-to-end tests run the real binaries.
    exec(cargo().args(["build", "--workspace", "--bins"]))?;
    // The kernel tests create namespaces, load programs and mount a private
    // bpffs: root, and one test at a time (2 cores; shared kernel state).
    let mut test = cargo();
    // Every suite runs even when one fails: the closing line counts them all.
    test.args(["test", "--workspace", "--no-fail-fast"]);
    if !is_root() {
        bail!("the kernel tests need root: run `sudo -E cargo xtask test`");
    }
    test.arg("--").arg("--test-threads=1");
    if let Some(f) = &opts.filter {
        test.arg(f);
    }
    let mut tally = run_counted(&mut test)?;
    // The clients above take HTTP/3 (`--transport auto`); the tunnel and
    // IPv6 suites again over TLS over TCP, so both transports pass them.
    let mut tcp = cargo();
    tcp.args([
        "test",
        "-p",
        "veil-tests",
        "--test",
        "tunnel",
        "--test",
        "ipv6",
        "--no-fail-fast",
    ])
    .env("VEIL_TEST_TRANSPORT", "tcp")
    .arg("--")
    .arg("--test-threads=1");
    if let Some(f) = &opts.filter {
        tcp.arg(f);
    }
    let over_tcp = run_counted(&mut tcp)?;
    tally.passed += over_tcp.passed;
    tally.failed += over_tcp.failed;
    // Every fuzz target for a few seconds, from its seeds (a filtered run
    // is for one test: it skips them).
    if opts.filter.is_none() {
        // A fuzz build that fails is one failure: the closing line comes.
        let (passed, failed) = fuzz::smoke().unwrap_or_else(|e| {
            eprintln!("fuzz: {e:#}");
            (0, 1)
        });
        tally.passed += passed;
        tally.failed += failed;
    }
    // The closing line, last whatever happened: CI reads it.
    println!("{} passed, {} failed", tally.passed, tally.failed);
    if tally.failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Tests passed and failed, summed over every suite.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub passed: usize,
    pub failed: usize,
}

impl Tally {
    /// Adds what one of libtest's closing lines reports
    /// (`test result: ok. 12 passed; 0 failed; ...`).
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            match (what, n.parse::<usize>()) {
                ("passed", Ok(n)) => self.passed += n,
                ("failed", Ok(n)) => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Runs `cargo test`, passing its output through, and sums its suites'
/// closing lines. A run that fails without a failing test (a build error, a
/// crashed test binary) counts as one failure.
fn run_counted(cmd: &mut Command) -> Result<Tally> {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let mut tally = Tally::default();
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's output")?;
        println!("{line}");
        tally.add_line(&line);
    }
    let status = child.wait()?;
    if !status.success() && tally.failed == 0 {
        tally.failed = 1;
    }
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_lines_are_summed() {
        let mut t = Tally::default();
        for line in [
            "test result: ok. 12 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.5s",
            "running 3 tests",
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out",
            "test a_test_named_test_result ... ok",
        ] {
            t.add_line(line);
        }
        assert_eq!(
            t,
            Tally {
                passed: 14,
                failed: 1
            }
        );
    }
}
