//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is built separately (nightly, build-std, bpf-linker). A
//! release build without it stops with the command that makes it. Any
//! other build (`cargo check`, clippy, the unit tests, the client's
//! workspace) goes on with an empty object and a warning: everything
//! compiles on stable alone, and such a daemon refuses to start
//! (`DatapathError::NoObject`) instead of running without a datapath.

use std::{env, fs, path::PathBuf};

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    let object = env::var_os("VEIL_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("veil-ebpf/target/bpfel-unknown-none/release/veil"));
    println!("cargo::rerun-if-env-changed=VEIL_EBPF_OBJECT");
    println!("cargo::rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("veil.bpf.o");
    if let Err(e) = fs::copy(&object, &out) {
        let missing = format!(
            "the eBPF object {} is missing ({e}): run `cargo xtask build-ebpf` first",
            object.display()
        );
        if env::var("PROFILE").as_deref() == Ok("release") {
            println!("cargo::error={missing}");
        } else {
            println!("cargo::warning={missing}; this build's daemon will refuse to start");
            fs::write(&out, []).expect("writing an empty object");
        }
    }
}
