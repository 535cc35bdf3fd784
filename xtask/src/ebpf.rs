//! Builds veil-ebpf for the BPF target with nightly and bpf-linker, with BTF
//! so the maps carry their field names (what `bpftool map dump` prints).

use std::process::Command;

use anyhow::{Context, Result};
use clap::Args;

use crate::util::{exec, root};

#[derive(Args, Default)]
pub struct Options {
    /// Build without optimisation (the verifier may then refuse it).
    #[arg(long)]
    pub debug: bool,
}

pub fn build(opts: &Options) -> Result<()> {
    let dir = root().join("veil-ebpf");
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&dir)
        // Variables from the outer `cargo xtask` must not leak into the
        // nightly build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env("RUSTFLAGS", "-C debuginfo=2 -C link-arg=--btf")
        .args([
            "+nightly",
            "build",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
    if !opts.debug {
        cmd.arg("--release");
    }
    exec(&mut cmd).context("building the eBPF object (veil-ebpf)")
}
