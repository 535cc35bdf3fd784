//! Network namespaces for tests: created with iproute2, entered per thread
//! with setns(2), deleted on drop (also when the test panics).

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

/// Runs a command and panics with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A network namespace that exists as long as this value does.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// A new namespace named `veil-{tag}-{pid}-{n}`, with loopback up.
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "veil-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Runs `cmd` inside the namespace (network only: the host's mounts,
    /// including /sys/fs/bpf, stay visible).
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Output {
        let netns = format!("--net=/var/run/netns/{}", self.name);
        let mut all = vec![netns.as_str(), cmd];
        all.extend_from_slice(args);
        run("nsenter", &all)
    }

    /// Gives the namespace its own `/etc/resolv.conf`, as `ip netns exec`
    /// shows it to what it runs (`/etc/netns/NAME/resolv.conf`, removed
    /// with the namespace). Returns its path.
    pub fn set_resolv_conf(&self, text: &str) -> std::path::PathBuf {
        let dir = std::path::Path::new("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).expect("creating /etc/netns/NAME");
        let path = dir.join("resolv.conf");
        std::fs::write(&path, text).expect("writing the namespace's resolv.conf");
        path
    }

    /// Runs a command as `ip netns exec` does (with the namespace's own
    /// `/etc` files); its output, whatever its status.
    pub fn netns_exec(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets, TUN
    /// devices and BPF links made there stay in it when used elsewhere.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(format!("/var/run/netns/{}", self.name)).expect("open netns");
        thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: a valid namespace fd; only this thread moves.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in namespace panicked")
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Only this namespace's own directory, if a test made one.
        let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(&self.name));
        // And /etc/netns itself if that left it empty (it fails otherwise).
        let _ = std::fs::remove_dir("/etc/netns");
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Joins two namespaces with a veth pair and addresses both ends.
pub fn veth(a: &NetNs, a_if: &str, a_addr: &str, b: &NetNs, b_if: &str, b_addr: &str) {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    a.ip(&["addr", "add", a_addr, "dev", a_if]);
    b.ip(&["addr", "add", b_addr, "dev", b_if]);
    a.ip(&["link", "set", a_if, "up"]);
    b.ip(&["link", "set", b_if, "up"]);
}

/// Waits up to `timeout` for `fd` to become readable.
pub fn readable(fd: std::os::fd::RawFd, timeout: std::time::Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
    n > 0 && pfd.revents & libc::POLLIN != 0
}

/// A gateway and a remote namespace, joined by a veth pair: the gateway's
/// `wan0` (198.18.0.1/24) and the remote's `eth0` (198.18.0.2/24), the
/// test bed's "internet" (198.18.0.0/15 is reserved for test beds).
pub fn gateway_and_remote(gw: &str, remote: &str) -> (NetNs, NetNs) {
    let (gw, remote) = (NetNs::new(gw), NetNs::new(remote));
    veth(
        &gw,
        "wan0",
        "198.18.0.1/24",
        &remote,
        "eth0",
        "198.18.0.2/24",
    );
    // GRO on the WAN side, as NIC drivers default to. veth leaves it off
    // because it normally passes whole GSO packets; with an XDP program on
    // wan0 its peer may no longer send those, and without GRO the replies
    // would reach the gateway one MTU-sized packet at a time.
    gw.exec("ethtool", &["-K", "wan0", "gro", "on"]);
    (gw, remote)
}
