//! The independent HTTP/3 implementation the tests run against veil:
//! aioquic, in the virtual environment `cargo xtask setup` makes
//! (`xtask/src/setup.rs`), and the scripts in `tests/interop/`.

use std::process::Command;

use crate::netns::NetNs;

/// The virtual environment's Python, with aioquic.
pub const PYTHON: &str = "/opt/veil-tests/aioquic/bin/python3";

/// What a test says when the Python is missing.
pub const NOT_INSTALLED: &str = "running aioquic (cargo xtask setup installs it)";

/// `tests/interop/NAME` run by [`PYTHON`] in `ns`, with `args`.
pub fn script(ns: &NetNs, name: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", ns.name()))
        .arg(PYTHON)
        .arg(format!("{}/interop/{name}", env!("CARGO_MANIFEST_DIR")))
        .args(args);
    cmd
}
