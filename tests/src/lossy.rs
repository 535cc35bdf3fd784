//! A worse path than a veth pair: random loss and a round trip, for the
//! tests and the loss benchmark. This kernel has neither netem nor fq (so
//! no `tc ... netem loss/delay`, nor EDT delays from BPF): loss is a tc
//! BPF program ([`Loss`], which sees offload super-packets whole) or, per
//! packet and with a delay, a user-space line through a TUN device
//! ([`DelayLine`]).

use std::{
    io::Read,
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::netns::{readable, NetNs};

/// A tc BPF program on `dev` (both directions) that drops `percent` % of
/// packets at random (`bpf_get_prandom_u32`). Assembled with llvm-mc;
/// removed (with the clsact qdisc) on drop.
pub struct Loss<'a> {
    ns: &'a NetNs,
    dev: String,
}

impl<'a> Loss<'a> {
    pub fn new(ns: &'a NetNs, dev: &str, dir: &Path, percent: u32) -> Self {
        // A 64-bit constant compared with a register: an immediate
        // operand is a sign-extended 32-bit one, which would read any
        // threshold from 50 % up as negative (every packet dropped).
        let threshold = (u64::from(percent) << 32) / 100;
        let asm = format!(
            "\t.section classifier,\"ax\",@progbits\n\t.globl drop\n\t.type drop,@function\n\
             drop:\n\tcall 7\n\tr1 = {threshold} ll\n\tif r0 < r1 goto shot\n\tr0 = 0\n\texit\n\
             shot:\n\tr0 = 2\n\texit\n.Lend:\n\t.size drop, .Lend-drop\n\
             \t.section license,\"aw\",@progbits\n\t.globl _license\n_license:\n\t.asciz \"GPL\"\n"
        );
        let src = dir.join(format!("drop{percent}.s"));
        let obj = dir.join(format!("drop{percent}.o"));
        std::fs::write(&src, asm).unwrap();
        let built = std::process::Command::new("llvm-mc")
            .args(["-triple", "bpf", "-filetype=obj", "-o"])
            .arg(&obj)
            .arg(&src)
            .status()
            .expect("llvm-mc (xtask setup installs llvm)");
        assert!(built.success());
        ns.exec("tc", &["qdisc", "add", "dev", dev, "clsact"]);
        for hook in ["egress", "ingress"] {
            let out = ns.exec(
                "tc",
                &[
                    "filter",
                    "add",
                    "dev",
                    dev,
                    hook,
                    "bpf",
                    "da",
                    "obj",
                    obj.to_str().unwrap(),
                    "sec",
                    "classifier",
                ],
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Loss {
            ns,
            dev: dev.to_owned(),
        }
    }
}

impl Drop for Loss<'_> {
    fn drop(&mut self) {
        self.ns
            .exec("tc", &["qdisc", "del", "dev", &self.dev, "clsact"]);
    }
}

/// A slower, lossier link on the way to one address: in namespace `ns`,
/// packets to `to` are routed into a TUN device (which has no offloads,
/// so the kernel hands it single packets, never TSO or UDP GSO
/// super-packets); its reader drops a chosen fraction at random
/// ([`DelayLine::set_loss`]), holds the rest for `delay` and sends them
/// out of `uplink` (an `AF_PACKET` socket). One way only: a line at each
/// end makes a round trip of both delays, with loss per packet each way.
/// Removed (device and route, threads) on drop.
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    /// Packets dropped: a `u32` below this, of a uniform random one.
    loss: Arc<AtomicU32>,
    threads: Vec<JoinHandle<()>>,
}

/// The delay line's TUN device.
const DEVICE: &str = "dly0";

impl DelayLine {
    /// `uplink` in `ns` has address `from`; `next_hop_mac` is the MAC
    /// address of `to`'s end of the link. `route` adds attributes to the
    /// route to `to` (say `congctl cubic`).
    pub fn new(
        ns: &NetNs,
        uplink: &str,
        (from, to): (Ipv4Addr, Ipv4Addr),
        next_hop_mac: [u8; 6],
        delay: Duration,
        route: &[&str],
    ) -> Self {
        let own_mac = mac_of(ns, uplink);
        let (tun, packet) = ns.enter(|| {
            let mut cfg = tun::Configuration::default();
            cfg.tun_name(DEVICE).mtu(1500).up();
            let tun = tun::create(&cfg).expect("creating the delay line's TUN device");
            (tun, PacketSocket::bound(uplink))
        });
        // The replies arrive on the uplink, not on the device the route
        // points at: no reverse-path filter.
        for conf in ["all", "default", uplink, DEVICE] {
            ns.exec(
                "sysctl",
                &["-qw", &format!("net.ipv4.conf.{conf}.rp_filter=0")],
            );
        }
        let (to_net, from_addr) = (format!("{to}/32"), from.to_string());
        let mut args = vec!["route", "add", &to_net, "dev", DEVICE, "src", &from_addr];
        args.extend_from_slice(route);
        let added = ns.ip(&args);
        assert!(
            added.status.success(),
            "{}",
            String::from_utf8_lossy(&added.stderr)
        );
        let stop = Arc::new(AtomicBool::new(false));
        let loss = Arc::new(AtomicU32::new(0));
        // The packets on the line (at 1 Gbit/s and 50 ms, 4,200 of them);
        // beyond that the line drops, as a full queue would.
        let (tx, rx) = mpsc::sync_channel::<(Instant, Vec<u8>)>(20_000);
        let reader = {
            let (stop, loss) = (stop.clone(), loss.clone());
            std::thread::spawn(move || {
                let mut tun = tun;
                let mut buf = vec![0u8; 65536];
                let mut random = XorShift(0x9e37_79b9_7f4a_7c15 ^ u64::from(u32::from(to)));
                while !stop.load(Ordering::Relaxed) {
                    if !readable(tun.as_raw_fd(), Duration::from_millis(100)) {
                        continue;
                    }
                    let Ok(n) = tun.read(&mut buf) else { continue };
                    if random.next() < loss.load(Ordering::Relaxed) {
                        continue;
                    }
                    // An Ethernet header in front, for the uplink.
                    let mut frame = Vec::with_capacity(14 + n);
                    frame.extend_from_slice(&next_hop_mac);
                    frame.extend_from_slice(&own_mac);
                    frame.extend_from_slice(&[0x08, 0x00]);
                    frame.extend_from_slice(&buf[..n]);
                    match tx.try_send((Instant::now() + delay, frame)) {
                        Ok(()) | Err(mpsc::TrySendError::Full(_)) => {}
                        Err(mpsc::TrySendError::Disconnected(_)) => return,
                    }
                }
            })
        };
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((due, frame)) = rx.recv_timeout(Duration::from_millis(100)) else {
                        continue;
                    };
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    packet.send(&frame);
                }
            })
        };
        DelayLine {
            stop,
            loss,
            threads: vec![reader, writer],
        }
    }

    /// Drops `percent` % of the packets from now on.
    pub fn set_loss(&self, percent: f64) {
        let threshold = (percent / 100.0 * f64::from(u32::MAX)).clamp(0.0, f64::from(u32::MAX));
        self.loss.store(threshold as u32, Ordering::Relaxed);
    }
}

/// A small, fast pseudo-random generator (xorshift64*): loss needs no
/// more, and a fixed seed makes runs alike.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        // The device went with its descriptor, and its route with it.
    }
}

/// An interface's MAC address, from `ip -j link`.
pub fn mac_of(ns: &NetNs, dev: &str) -> [u8; 6] {
    let out = ns.ip(&["-j", "link", "show", "dev", dev]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j link");
    let text = v[0]["address"].as_str().expect("a MAC address");
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.split(':')) {
        *b = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

/// A raw `AF_PACKET` socket that sends whole frames out of one interface.
struct PacketSocket(std::os::fd::OwnedFd);

impl PacketSocket {
    fn bound(dev: &str) -> Self {
        use std::os::fd::FromRawFd;
        let name = std::ffi::CString::new(dev).unwrap();
        // SAFETY: plain libc calls on a socket we own; the address is a
        // zeroed sockaddr_ll with its fields set.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr());
            assert!(ifindex > 0, "no interface {dev}");
            // Protocol 0: sends only, receives nothing.
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_ifindex = ifindex as i32;
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            PacketSocket(fd)
        }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: a valid socket and buffer. A full queue loses the
        // frame, as a link would.
        unsafe {
            libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0);
        }
    }
}
