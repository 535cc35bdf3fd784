//! CONNECT-IP over HTTP/3 with a client veil did not write: aioquic (an
//! independent QUIC and HTTP/3 implementation, Python, from PyPI; `cargo
//! xtask setup` installs it) opens a session to the real gateway with a
//! profile's certificate, takes its address from the capsules and sends a
//! UDP packet in an HTTP datagram; the remote's echo comes back the same
//! way, and the remote saw only the gateway. Then the same client turns
//! hostile within HTTP/3's rules.

use std::{
    io::{BufRead, BufReader},
    process::{Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use veil_tests::{
    interop::{script, NOT_INSTALLED},
    proc::rss_bytes,
    world::{World, PUBLIC},
};

/// The aioquic client in client 1's namespace, toward the remote's echo
/// port; `extra` are arguments after the message.
fn aioquic(world: &World, profile: &std::path::Path, extra: &[&str]) -> Command {
    let profile = profile.to_str().expect("a UTF-8 path");
    let args = [
        profile,
        "10.200.1.1:443",
        "198.18.0.2:7",
        "hello from aioquic",
    ];
    let mut cmd = script(world.client(1), "connect_ip_aioquic.py", &args);
    cmd.args(extra);
    cmd
}

/// Runs `cmd`, handing each line it prints to `on_line` as it comes (the
/// test measures the gateway between the script's steps); its exit status
/// and everything it printed.
fn run_lines(mut cmd: Command, mut on_line: impl FnMut(&str)) -> (ExitStatus, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect(NOT_INSTALLED);
    let mut out = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.expect("the script's output");
        on_line(&line);
        out.push_str(&line);
        out.push('\n');
    }
    (child.wait().expect("the script ends"), out)
}

/// The figure the script printed after `prefix` (its first word), on the
/// first line that starts so.
fn said<T: std::str::FromStr>(out: &str, prefix: &str) -> Option<T> {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|word| word.parse().ok())
}

/// The aioquic client in `mode` with `profile`; its exit status and
/// output, the gateway's RSS when the script printed `ready`, and the
/// most it reached after.
fn memory_around(
    world: &mut World,
    profile: &std::path::Path,
    mode: &str,
    ready: &str,
) -> (ExitStatus, String, u64, u64) {
    let pid = world.gateway().pid();
    let peak = PeakRss::sample(pid);
    let mut rss_ready = 0;
    let (status, out) = run_lines(aioquic(world, profile, &[mode]), |line| {
        if line == ready {
            rss_ready = rss_bytes(pid);
            peak.restart();
        }
    });
    (status, out, rss_ready, peak.stop())
}

/// The largest resident memory of a process, sampled every 100 ms by a
/// thread of its own until [`PeakRss::stop`].
struct PeakRss {
    peak: Arc<AtomicU64>,
    done: Arc<AtomicBool>,
    sampler: thread::JoinHandle<()>,
}

impl PeakRss {
    fn sample(pid: u32) -> Self {
        let (peak, done) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let sampler = {
            let (peak, done) = (peak.clone(), done.clone());
            thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(100));
                }
            })
        };
        Self {
            peak,
            done,
            sampler,
        }
    }

    /// Forgets what was seen so far.
    fn restart(&self) {
        self.peak.store(0, Ordering::Relaxed);
    }

    fn stop(self) -> u64 {
        self.done.store(true, Ordering::Relaxed);
        self.sampler.join().expect("sampler");
        self.peak.load(Ordering::Relaxed)
    }
}

#[test]
fn an_aioquic_client_opens_a_connect_ip_session_and_gets_a_reply() {
    let world = World::new(1, &[]);
    let profile = world.add_client("aioquic", 1);
    let out = aioquic(&world, &profile, &[])
        .output()
        .expect(NOT_INSTALLED);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut world = world;
    let gateway = world.gateway().log();
    assert!(
        out.status.success(),
        "aioquic's session failed:\n{stdout}\n{stderr}\ngateway:\n{gateway}"
    );
    assert!(stdout.contains("response: 200"), "{stdout}");
    assert!(
        stdout.contains("capsule: ADDRESS_ASSIGN 10.77."),
        "{stdout}"
    );
    assert!(
        stdout.contains("UDP reply from 198.18.0.2: hello from aioquic"),
        "{stdout}"
    );
    let seen = world.servers.seen();
    assert!(!seen.is_empty());
    assert!(
        seen.iter().all(|a| *a == PUBLIC),
        "the remote saw only the gateway: {seen:?}"
    );
    // One session, over HTTP/3 (its end is logged by the HTTP/3 side).
    assert_eq!(gateway.matches("session started").count(), 1, "{gateway}");
    assert!(gateway.contains("gateway::h3"), "{gateway}");
}

/// A client with a valid certificate writes 8 MiB on each of three streams
/// the gateway never reads again, all within HTTP/3's rules: its control
/// stream after SETTINGS, and two unidirectional streams of a reserved
/// type (which get no stream credit while its first three are open). The
/// gateway takes no more than its receive window of it, its memory does
/// not grow by what was sent, and the session still carries packets.
#[test]
fn a_client_cannot_park_megabytes_on_streams_the_gateway_does_not_read() {
    const PARK: usize = 8 << 20;
    let mut world = World::new(1, &[]);
    let profile = world.add_client("parker", 1);
    let pid = world.gateway().pid();
    let (mut rss_ready, mut rss_parked, mut taken) = (0, 0, None);
    let (status, out) = run_lines(
        aioquic(&world, &profile, &[&format!("park:{PARK}")]),
        |line| {
            if line == "parking: ready" {
                rss_ready = rss_bytes(pid);
            }
            if let Some(n) = line
                .strip_prefix("parked: ")
                .and_then(|rest| rest.strip_suffix(" bytes taken"))
            {
                rss_parked = rss_bytes(pid);
                taken = n.parse::<u64>().ok();
            }
        },
    );
    let gateway = world.gateway().log();
    eprintln!("{out}gateway RSS {rss_ready} bytes when ready, {rss_parked} after parking");
    assert!(
        status.success(),
        "the session failed:\n{out}\ngateway:\n{gateway}"
    );
    assert_eq!(
        out.matches("UDP reply from 198.18.0.2").count(),
        2,
        "a reply before and after parking:\n{out}"
    );
    let taken = taken.expect("the script says what the gateway took");
    let window = u64::from(veil_tunnel::quic::RECEIVE_WINDOW);
    assert!(
        taken <= window,
        "the gateway took {taken} of {} bytes on unread streams (window {window})",
        3 * PARK
    );
    assert!(
        rss_parked <= rss_ready + 2 * window,
        "the gateway grew from {rss_ready} to {rss_parked} bytes"
    );
    assert!(world.gateway().is_running());
}

/// A client that acknowledges nothing the gateway sends, while it sends
/// datagrams the remote's echo service answers (the gateway's own answers,
/// ICMP errors, are rate-limited). The answers cannot leave, and wait in a bounded queue: the
/// gateway's memory stays flat, the client is let go as one that reads
/// nothing (15 s), and another client is served meanwhile.
#[test]
fn a_client_that_acknowledges_nothing_cannot_grow_the_gateway() {
    let mut world = World::new(2, &[]);
    let deaf = world.add_client("deaf", 1);
    let steady = world.add_client("steady", 2);
    let _steady = world.start_client(2, &steady, true);
    // 25 s of it: the session must end within, 15 s after the last ACK.
    let (status, out, rss_ready, peak) =
        memory_around(&mut world, &deaf, "deaf:25", "flood: ready");
    let gateway = world.gateway().log();
    eprintln!("{out}gateway RSS {rss_ready} bytes when the flood began, at most {peak} during it");
    assert!(status.success(), "{out}\ngateway:\n{gateway}");
    let sent: u64 = said(&out, "flood: sent ").expect("the flood's count");
    assert!(sent > 10_000, "the flood sent {sent} packets");
    assert!(
        gateway.contains("session ended: client read nothing for 15s client=deaf"),
        "let go within the flood:\n{gateway}"
    );
    // Bounded, not flat: the allocator keeps some of what up to a million
    // packets and their answers passed through (0.9 to 9.5 MB measured
    // mostly, 23 MB once in 4 runs, cause not yet known: see
    // docs/performance.md). Without the outbox's bound it grows with the
    // flood, hundreds of MB.
    assert!(
        peak <= rss_ready + (32 << 20),
        "the gateway grew from {rss_ready} to {peak} bytes"
    );
    assert!(world.ping(2, "198.18.0.2"), "the other client is served");
    assert!(world.gateway().is_running());
    // What the gateway could not queue for it is counted, not silent: in
    // its reply queue, or in the session's datagram outbox behind it.
    let status = world.status();
    let counted = |name: &str| status["counters"][name].as_u64().unwrap();
    let dropped = counted("client_queue_full") + counted("datagram_queue_full");
    assert!(dropped > 0, "no reply counted as dropped");
}

/// A revoked client that completes the QUIC handshake and then sends no
/// request is closed at once, counted and logged as revoked, rather than
/// holding its handshake place for the 10 s setup time.
#[test]
fn a_revoked_client_is_closed_right_after_its_quic_handshake() {
    let mut world = World::new(1, &[]);
    let doomed = world.add_client("doomed", 1);
    world.veil_user(&["client", "revoke", "doomed"]);
    let (status, out) = run_lines(aioquic(&world, &doomed, &["silent"]), |_| {});
    let gateway = world.gateway().log();
    eprintln!("{out}");
    assert!(status.success(), "{out}\ngateway:\n{gateway}");
    let after: f64 = said(&out, "closed by the gateway after ").expect("when the gateway closed");
    assert!(after < 2.0, "closed after {after} s");
    assert!(out.contains("error 0x10b"), "H3_REQUEST_REJECTED: {out}");
    assert!(gateway.contains("client `doomed` is revoked"), "{gateway}");
    assert_eq!(world.status()["refused"]["revoked"].as_u64(), Some(1));
}

/// A client that takes only tiny DATAGRAM frames (its QUIC
/// `max_datagram_frame_size`) is refused at the HTTP/3 setup: every reply
/// toward it would be cut into IPv4 fragments of a few bytes (a 1,400-byte
/// packet into some 170 datagrams), work it could make the gateway do for
/// every byte it downloads. Before, the session opened.
#[test]
fn a_client_that_takes_only_tiny_datagrams_is_refused() {
    let mut world = World::new(1, &[]);
    let tiny = world.add_client("tiny", 1);
    let (status, out) = run_lines(aioquic(&world, &tiny, &["tiny:100"]), |_| {});
    let gateway = world.gateway().log();
    eprintln!("{out}");
    assert!(status.success(), "{out}\ngateway:\n{gateway}");
    let after: f64 = said(&out, "closed by the gateway after ").expect("when the gateway closed");
    assert!(after < 2.0, "closed after {after} s");
    assert!(
        gateway.contains("fewer than the 584 a tunnel needs"),
        "{gateway}"
    );
    let (status, out) = run_lines(aioquic(&world, &tiny, &[]), |_| {});
    assert!(status.success(), "the same client, as usual: {out}");
}

/// A client that completes the QUIC handshake, sends its SETTINGS, never
/// opens its request, and sends datagrams meanwhile: nothing reads them
/// before a session exists, so the gateway discards them rather than let
/// quinn keep them (up to 4 MiB as quinn counts, more as memory goes). It
/// is closed when the setup time (10 s) runs out.
#[test]
fn datagrams_before_the_request_are_not_kept() {
    let mut world = World::new(1, &[]);
    let mute = world.add_client("mute", 1);
    let (status, out, rss_ready, peak) =
        memory_around(&mut world, &mute, "silent:8", "silent: connected");
    let gateway = world.gateway().log();
    eprintln!("{out}gateway RSS {rss_ready} bytes at the handshake, at most {peak} after");
    assert!(
        status.success(),
        "closed by the gateway:\n{out}\ngateway:\n{gateway}"
    );
    let sent: u64 = said(&out, "silent: sent ").expect("the datagrams' count");
    assert!(sent > 100_000, "{sent} datagrams sent");
    assert!(
        peak <= rss_ready + (2 << 20),
        "the gateway grew from {rss_ready} to {peak} bytes"
    );
}
