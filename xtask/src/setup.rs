//! Installs what veil needs on a fresh Debian machine, idempotently: each
//! step checks first and costs milliseconds when there is nothing to do.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::util::{as_root, exec, output};

/// Debian packages: the tools tests, demo and bench call, by the command
/// that shows each is there.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip"),
    ("bpftool", "bpftool"),
    ("ethtool", "ethtool"),
    ("iptables", "iptables"),
    // veil-client's kill switch (`nft -f -`).
    ("nftables", "nft"),
    ("tcpdump", "tcpdump"),
    ("iperf3", "iperf3"),
    ("util-linux", "nsenter"),
    ("iputils-ping", "ping"),
    // The user-space port forwarders `cargo xtask bench forward` compares
    // veil's forwarding with.
    ("haproxy", "haproxy"),
    ("socat", "socat"),
    // The web servers in front of the gateway (tests/tests/websocket.rs).
    ("nginx", "nginx"),
    ("caddy", "caddy"),
    ("curl", "curl"),
    // Strangers probing the gateway in tests/tests/probe.rs (and curl).
    ("openssl", "openssl"),
    // The loss test's tc BPF program is assembled with llvm-mc.
    ("llvm", "llvm-mc"),
    // shadowsocks is what the SOCKS benchmark compares veil with
    // (`ss-local`, `ss-server`).
    ("shadowsocks-libev", "ss-local"),
];

/// The bpf-linker release that links LLVM 22 (nightly 1.97's).
const BPF_LINKER_VERSION: &str = "0.13";

pub fn run() -> Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    aioquic()
}

/// Where the HTTP/3 interop test (`tests/tests/h3_interop.rs`) finds
/// aioquic, an HTTP/3 implementation independent of veil's: a virtual
/// environment of Debian's Python, from PyPI (Debian has no package).
const AIOQUIC_VENV: &str = "/opt/veil-tests/aioquic";

/// The aioquic release the interop test was written against.
const AIOQUIC_VERSION: &str = "1.7.2";

fn aioquic() -> Result<()> {
    let python = Path::new(AIOQUIC_VENV).join("bin/python3");
    let check =
        format!("import aioquic, sys; sys.exit(aioquic.__version__ != '{AIOQUIC_VERSION}')");
    let ready = Command::new(&python)
        .args(["-c", &check])
        .status()
        .is_ok_and(|s| s.success());
    if ready {
        return Ok(());
    }
    eprintln!(
        "setup: installing aioquic {AIOQUIC_VERSION} in {AIOQUIC_VENV} (for the HTTP/3 interop test)"
    );
    // Under /opt: root's, as the Debian packages are.
    let venv = || {
        as_root("/usr/bin/python3")
            .args(["-m", "venv", AIOQUIC_VENV])
            .status()
    };
    if !venv().is_ok_and(|s| s.success()) {
        // `python3 -m venv` needs ensurepip, which Debian ships apart.
        apt_install_always(&["python3-venv"])?;
        exec(as_root("/usr/bin/python3").args(["-m", "venv", AIOQUIC_VENV]))?;
    }
    let pinned = format!("aioquic=={AIOQUIC_VERSION}");
    exec(
        as_root(python.to_str().context("the venv's path")?)
            .args(["-m", "pip", "install", "-q", &pinned]),
    )
}

/// Installs Debian packages that provide no command to look for.
fn apt_install_always(packages: &[&str]) -> Result<()> {
    exec(as_root("apt-get").args(["update", "-qq"]))?;
    exec(
        as_root("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages),
    )
    .context("installing Debian packages")
}

/// What `cargo xtask bench peers` compares veil with: OpenVPN and
/// WireGuard's tools from Debian, boringtun (userspace WireGuard) from
/// crates.io.
pub fn peers() -> Result<()> {
    apt_install(&[("openvpn", "openvpn"), ("wireguard-tools", "wg")])?;
    let matplotlib = Command::new("python3")
        .args(["-c", "import matplotlib"])
        .status()
        .is_ok_and(|s| s.success());
    if !matplotlib {
        eprintln!("setup: installing matplotlib (for the chart)");
        exec(Command::new("python3").args(["-m", "pip", "install", "-q", "matplotlib"]))?;
    }
    if !have("boringtun-cli") {
        eprintln!("setup: building boringtun-cli (a few minutes, once)");
        exec(Command::new("cargo").args(["install", "--locked", "boringtun-cli"]))?;
    }
    Ok(())
}

/// cargo-fuzz, which `cargo xtask fuzz` and the brief fuzzing in
/// `cargo xtask test` drive (with the nightly toolchain): from crates.io,
/// once (about a minute).
pub fn cargo_fuzz() -> Result<()> {
    if !have("cargo-fuzz") {
        eprintln!("setup: installing cargo-fuzz (about a minute, once)");
        exec(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    }
    Ok(())
}

fn have(cmd: &str) -> bool {
    output(Command::new("sh").args(["-c", &format!("command -v {cmd}")])).is_some()
}

fn apt_packages() -> Result<()> {
    apt_install(PACKAGES)
}

/// Installs the Debian packages (name, command it provides) whose command
/// is missing; nothing, quickly, when all are there.
fn apt_install(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, cmd)| !have(cmd) && !Path::new("/usr/sbin").join(cmd).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    exec(as_root("apt-get").args(["update", "-qq"]))?;
    exec(
        as_root("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing),
    )
    .context("installing Debian packages")
}

fn nightly_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    match installed {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => Ok(()),
        Some(_) => {
            eprintln!("setup: adding rust-src to the nightly toolchain");
            exec(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))
        }
        None => {
            eprintln!("setup: installing the nightly toolchain with rust-src");
            exec(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))
        }
    }
}

/// bpf-linker must load the very LLVM that nightly rustc emits bitcode for:
/// it is built against the toolchain's own libLLVM (see DESIGN.md).
fn bpf_linker() -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("finding the nightly sysroot")?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let lib = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;

    if let Some(v) = output(Command::new("bpf-linker").arg("--version")) {
        if v.contains(&format!("bpf-linker {BPF_LINKER_VERSION}.")) && links(&lib) {
            return Ok(());
        }
    }

    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".cargo"));
    let prefix = cargo_home.join("veil-llvm");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", lib.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&lib), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against {lib} (about a minute)");
    exec(
        Command::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "--force", "--locked", "bpf-linker"])
            .args(["--version", &format!("~{BPF_LINKER_VERSION}")])
            .args(["--no-default-features", "--features", "llvm-22"]),
    )?;
    if output(Command::new("bpf-linker").arg("--version")).is_none() {
        bail!("bpf-linker was installed but does not run: is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

/// Whether the installed bpf-linker loads `lib` (the nightly's libLLVM).
fn links(lib: &str) -> bool {
    let Some(path) = output(Command::new("sh").args(["-c", "command -v bpf-linker"])) else {
        return false;
    };
    output(Command::new("ldd").arg(path.trim())).is_some_and(|ldd| ldd.contains(lib))
}

fn home() -> PathBuf {
    env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}
