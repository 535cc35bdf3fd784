//! CONNECT-IP over HTTP/3 with a client veil did not write: aioquic (an
//! independent QUIC and HTTP/3 implementation, Python, from PyPI; `cargo
//! xtask setup` installs it) opens a session to the real gateway with a
//! profile's certificate, takes its address from the capsules and sends a
//! UDP packet in an HTTP datagram; the remote's echo comes back the same
//! way, and the remote saw only the gateway.

use std::process::Command;

use veil_tests::world::{World, PUBLIC};

/// Where `cargo xtask setup` puts aioquic (`xtask/src/setup.rs`).
const PYTHON: &str = "/opt/veil-tests/aioquic/bin/python3";

fn script() -> String {
    format!(
        "{}/interop/connect_ip_aioquic.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn an_aioquic_client_opens_a_connect_ip_session_and_gets_a_reply() {
    let world = World::new(1, &[]);
    let profile = world.add_client("aioquic", 1);
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", world.client(1).name()))
        .arg(PYTHON)
        .arg(script())
        .arg(&profile)
        .args(["10.200.1.1:443", "198.18.0.2:7", "hello from aioquic"])
        .output()
        .expect("running aioquic (cargo xtask setup installs it)");
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
