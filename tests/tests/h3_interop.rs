//! CONNECT-IP over HTTP/3 with a client veil did not write: aioquic (an
//! independent QUIC and HTTP/3 implementation, Python, from PyPI; `cargo
//! xtask setup` installs it) opens a session to the real gateway with a
//! profile's certificate, takes its address from the capsules and sends a
//! UDP packet in an HTTP datagram; the remote's echo comes back the same
//! way, and the remote saw only the gateway. Then the same client turns
//! hostile within HTTP/3's rules.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
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
    let mut child = aioquic(&world, &profile, &[&PARK.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(NOT_INSTALLED);
    let (mut out, mut rss_ready, mut rss_parked, mut taken) = (String::new(), 0, 0, None);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.expect("the script's output");
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
        out.push_str(&line);
        out.push('\n');
    }
    let status = child.wait().expect("the script ends");
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
