//! `cargo xtask test`: every check, in the order that fails fastest.

use std::process::Command;

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
    test.args(["test", "--workspace"]);
    if !is_root() {
        bail!("the kernel tests need root: run `sudo -E cargo xtask test`");
    }
    test.arg("--").arg("--test-threads=1");
    if let Some(f) = &opts.filter {
        test.arg(f);
    }
    exec(&mut test)?;
    // Every fuzz target for a few seconds, from its seeds.
    match fuzz::smoke()? {
        (_, 0) => Ok(()),
        (_, failed) => bail!("{failed} fuzz target(s) failed"),
    }
}
