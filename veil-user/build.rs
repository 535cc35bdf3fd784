//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is built separately (nightly, build-std, bpf-linker), so a
//! plain `cargo build` finds it or stops with the command that makes it.

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
        println!(
            "cargo::error=the eBPF object {} is missing ({e}): run `cargo xtask build-ebpf` first",
            object.display()
        );
    }
}
