//! veil's developer commands: `cargo xtask <command>`.
//!
//! - `setup`: installs what building and testing need (idempotent, fast when
//!   everything is there). Every other command runs it first.
//! - `build-ebpf`: builds the datapath object that `veil-user` embeds.
//! - `test`: lint, unit tests, then the kernel tests (BPF_PROG_TEST_RUN and
//!   network namespaces) as root, one at a time.
//! - `fuzz`: the libFuzzer targets in `fuzz/` (cargo-fuzz, nightly).
//! - `bench`: measurements, side by side with the kernel's own paths.
//! - `demo`: the whole thing in network namespaces, explained as it runs.

mod bench;
mod ebpf;
mod fuzz;
mod setup;
mod test;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "veil's build, test and benchmark commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// veil end to end in network namespaces: a client, a gateway, a web
    /// server. Installs and builds what is missing first.
    Demo,
    /// Install the packages and toolchain pieces veil needs (idempotent).
    Setup,
    /// Build the eBPF object (nightly + bpf-linker).
    BuildEbpf(ebpf::Options),
    /// Lint, then run every test against the real kernel (needs root).
    Test(test::Options),
    /// Fuzz the parsers and state machines: every target in turn, or one.
    Fuzz(fuzz::Options),
    /// Measure the datapath against the kernel's routing + MASQUERADE.
    Bench(bench::Options),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Demo => bench::demo(),
        Command::Setup => setup::run(),
        Command::BuildEbpf(opts) => {
            setup::run()?;
            ebpf::build(&opts)
        }
        Command::Test(opts) => test::run(&opts),
        Command::Fuzz(opts) => fuzz::run(&opts),
        Command::Bench(opts) => bench::run(&opts),
    }
}
