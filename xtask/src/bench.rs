//! `cargo xtask bench [WHAT] [--quick]`: builds the benchmark binary in
//! release mode and runs it as root; the report also lands in
//! `target/bench/WHAT.md`. WHAT defaults to `peers`, the comparison users
//! read first.

use std::{fs, process::Command};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{
    ebpf, setup,
    util::{as_root, exec, root},
};

#[derive(Args)]
pub struct Options {
    /// What to measure.
    #[arg(default_value = "peers", value_parser = ["datapath", "tunnel", "peers", "forward", "socks", "ipv6", "flows", "churn", "scale", "loss", "capsules"])]
    pub what: String,
    /// Shorter runs: a smoke test of the numbers, not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// `peers` only: the paths to measure, comma-separated (direct,
    /// direct-no-offload, masquerade, openvpn-udp, openvpn-tcp, boringtun,
    /// boringtun-threads1, veil, veil-h3, veil-ws).
    #[arg(long, value_name = "PATH,...")]
    pub only: Option<String>,
}

/// Everything the benchmarks and the demo run, in release mode.
fn build_release() -> Result<()> {
    setup::run()?;
    ebpf::build(&ebpf::Options::default())?;
    exec(Command::new("cargo").current_dir(root()).args([
        "build",
        "--release",
        "--quiet",
        "--workspace",
        "--bins",
    ]))
}

/// `cargo xtask demo`.
pub fn demo() -> Result<()> {
    build_release()?;
    let bin = root().join("target/release/veil-demo");
    exec(&mut as_root(bin.to_str().context("non-UTF-8 path")?))
}

pub fn run(opts: &Options) -> Result<()> {
    build_release()?;
    if opts.what == "peers" {
        setup::peers()?;
    }
    let bin = root().join("target/release/veil-bench");
    let mut cmd = as_root(bin.to_str().context("non-UTF-8 path")?);
    cmd.arg(&opts.what);
    if opts.quick {
        cmd.arg("--quick");
    }
    if let Some(only) = &opts.only {
        cmd.args(["--only", only]);
    }
    // Progress goes to the terminal as it happens; the report is kept.
    cmd.current_dir(root())
        .stderr(std::process::Stdio::inherit());
    let out = cmd.output().context("running veil-bench")?;
    let report = String::from_utf8_lossy(&out.stdout);
    print!("{report}");
    if !out.status.success() {
        bail!("veil-bench {} failed ({})", opts.what, out.status);
    }
    let dir = root().join("target/bench");
    fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{}.md", opts.what));
    fs::write(&file, report.as_bytes())?;
    eprintln!("\nreport saved to {}", file.display());
    if opts.what == "peers" {
        let png = dir.join("peers.png");
        exec(
            Command::new("python3")
                .arg(root().join("scripts/chart.py"))
                .arg(dir.join("peers.json"))
                .arg(&png),
        )?;
        eprintln!("chart saved to {}", png.display());
    }
    Ok(())
}
