//! More than one gateway: two gateways share one CA and a revocation list
//! signed by it (`--revocations`), each with its own slice of the pool
//! (`--pool-slice`), and a client whose profile lists both.
//!
//! ```text
//!  client (10.200.1.2) ── gw A (10.200.1.1) ── remote A
//!         (10.201.1.2) ── gw B (10.201.1.1) ── remote B
//! ```
//!
//! Gateway A's state directory is where profiles are issued and revoked
//! (`veil-user client add/revoke`); B holds only a copy of the CA and reads
//! A's `revocations.crl`, from the file (a shared directory) or over
//! HTTP from a server in its namespace.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener},
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use veil_tests::{netns::veth, world::World};

const POOL: &str = "10.77.0.0/16";
const ENDPOINT_A: &str = "10.200.1.1:443";
const ENDPOINT_B: &str = "10.201.1.1:443";

/// Two gateways in front of one client namespace, both running.
struct Pair {
    a: World,
    b: World,
}

impl Pair {
    fn new() -> Self {
        Self::with_list(|a, _| a.state.join("revocations.crl").to_str().unwrap().to_owned())
    }

    /// Two gateways, B reading the list from where `source` says (given
    /// both worlds before either gateway starts).
    fn with_list(source: impl FnOnce(&World, &World) -> String) -> Self {
        let mut a = World::bare(1);
        let mut b = World::bare(0);
        // The issuing state directory: its CA, and a first (empty) list.
        a.veil_user(&["client", "revocations"]);
        std::fs::create_dir_all(&b.state).unwrap();
        for file in ["ca.crt", "ca.key"] {
            std::fs::copy(a.state.join(file), b.state.join(file)).unwrap();
        }
        veth(
            &b.gw,
            "c1",
            "10.201.1.1/24",
            a.client(1),
            "eth1",
            "10.201.1.2/24",
        );
        let list = a.state.join("revocations.crl");
        let list = list.to_str().unwrap();
        let b_list = source(&a, &b);
        a.start_gateway(&["--pool", POOL, "--pool-slice", "0/2", "--revocations", list]);
        b.start_gateway(&[
            "--pool",
            POOL,
            "--pool-slice",
            "1/2",
            "--revocations",
            &b_list,
        ]);
        Pair { a, b }
    }

    /// A profile issued on A, listing `endpoints` in order.
    fn profile(&self, name: &str, endpoints: &[&str]) -> PathBuf {
        let mut extra = Vec::new();
        for e in &endpoints[1..] {
            extra.extend(["--endpoint", e]);
        }
        self.a.add_client_at(name, endpoints[0], &extra)
    }
}

/// Whether gateway `w` lists client `name` as connected.
fn connected(w: &World, name: &str) -> Option<Ipv4Addr> {
    let status = w.status();
    status["clients"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
        .and_then(|c| c["vip"].as_str()?.parse().ok())
}

/// Waits up to `timeout` for `cond`; how long it took.
fn wait_for(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

fn in_slice(vip: Ipv4Addr, slice: &str) -> bool {
    let net: veil_user::net::Ipv4Net = slice.parse().unwrap();
    net.contains(vip)
}

#[test]
fn a_client_fails_over_to_the_other_gateway_when_its_gateway_dies() {
    let mut pair = Pair::new();
    let profile = pair.profile("alice", &[ENDPOINT_A, ENDPOINT_B]);
    let _client = pair.a.start_client(1, &profile, true);

    let vip_a = connected(&pair.a, "alice").expect("alice on gateway A, the first endpoint");
    assert!(in_slice(vip_a, "10.77.0.0/17"), "A's slice: {vip_a}");
    let body = pair.a.fetch(1).expect("a page through gateway A");
    assert!(body.contains("198.18.0.1"), "{body}");
    assert!(
        pair.b.servers.seen().is_empty(),
        "nothing went through B yet"
    );

    // Gateway A dies without a word.
    pair.a.gateway().kill();
    let took = wait_for(Duration::from_secs(30), "alice on gateway B", || {
        connected(&pair.b, "alice").is_some()
    });
    eprintln!("failed over in {took:?}");
    let vip_b = connected(&pair.b, "alice").unwrap();
    assert!(in_slice(vip_b, "10.77.128.0/17"), "B's slice: {vip_b}");

    // Traffic works again, through B: B's remote sees it.
    let body = (0..20)
        .find_map(|_| {
            let got = pair.a.fetch(1).ok();
            if got.is_none() {
                std::thread::sleep(Duration::from_millis(250));
            }
            got
        })
        .expect("a page through gateway B");
    assert!(body.contains("198.18.0.1"), "{body}");
    assert!(
        !pair.b.servers.seen().is_empty(),
        "B's remote saw the client's traffic"
    );
    let sha = pair.a.download(1).expect("a download through gateway B");
    assert_eq!(
        sha,
        veil_tests::world::sha256(&veil_tests::world::download_data())
    );
}

#[test]
fn a_client_revoked_on_one_gateway_is_refused_by_the_other_within_seconds() {
    let pair = Pair::new();
    // Issued on A, connected to B: B's registry never held it.
    let profile = pair.profile("bob", &[ENDPOINT_B]);
    let mut client = pair.a.start_client(1, &profile, true);
    assert!(connected(&pair.b, "bob").is_some());
    pair.a.fetch(1).expect("a page through gateway B");

    pair.a.veil_user(&["client", "revoke", "bob"]);
    let took = wait_for(Duration::from_secs(10), "bob's session closed on B", || {
        connected(&pair.b, "bob").is_none()
    });
    eprintln!("B closed the revoked session {took:?} after the revocation");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // The client keeps trying; B refuses every attempt, by the list.
    let refused = |w: &World| {
        w.status()["refused"]["revoked"]
            .as_u64()
            .unwrap_or_default()
    };
    wait_for(Duration::from_secs(15), "B refused bob's reconnect", || {
        refused(&pair.b) > 0
    });
    assert!(connected(&pair.b, "bob").is_none());
    assert!(pair.a.fetch(1).is_err(), "no traffic after the revocation");
    client.stop();
}

/// A gateway that reads a revocation list still refuses a client whose
/// record there does not read: its name is this gateway's, so its
/// certificate is not taken for one issued on another host (which let it
/// back in, under the default limits, a second after its session was
/// closed).
#[test]
fn an_unreadable_record_is_not_taken_for_a_client_of_another_host() {
    let pair = Pair::new();
    let profile = pair.profile("dave", &[ENDPOINT_A]);
    let mut client = pair.a.start_client(1, &profile, true);
    assert!(connected(&pair.a, "dave").is_some());
    std::fs::write(pair.a.state.join("clients/dave.toml"), "fingerprint = [").unwrap();
    wait_for(Duration::from_secs(10), "dave's session closed", || {
        connected(&pair.a, "dave").is_none()
    });
    let refused = |w: &World| {
        w.status()["refused"]["unknown_client"]
            .as_u64()
            .unwrap_or_default()
    };
    wait_for(
        Duration::from_secs(15),
        "A refused dave's reconnect",
        || refused(&pair.a) > 0,
    );
    assert!(connected(&pair.a, "dave").is_none());
    assert!(pair.a.fetch(1).is_err(), "no traffic");
    client.stop();
}

#[test]
fn a_list_that_does_not_verify_changes_nothing() {
    let pair = Pair::new();
    let profile = pair.profile("carol", &[ENDPOINT_B]);
    let _client = pair.a.start_client(1, &profile, true);
    let list = pair.a.state.join("revocations.crl");
    let good = std::fs::read(&list).unwrap();

    // A list signed by another CA that revokes carol: refused.
    let other = pair.a.dir.join("other-ca");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(veil_tests::proc::workspace_bin("veil-user"))
            .args(args)
            .arg("--state-dir")
            .arg(&other)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    run(&["client", "revocations"]);
    std::fs::write(&list, std::fs::read(other.join("revocations.crl")).unwrap()).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // Garbage: refused too.
    std::fs::write(&list, b"not a list").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        connected(&pair.b, "carol").is_some(),
        "carol stays connected"
    );
    pair.a.fetch(1).expect("traffic still flows");
    let log = pair.b.gateway.as_ref().unwrap().log();
    assert!(
        log.contains("its signature does not verify")
            || log.contains("not issued by this gateway's CA"),
        "{log}"
    );
    assert!(log.contains("not a certificate revocation list"), "{log}");
    std::fs::write(&list, good).unwrap();
}

/// Serves `file` over HTTP/1.0 on 127.0.0.1:8088 in `world`'s gateway
/// namespace, read afresh for each request, until `stop`.
fn serve_list(world: &World, file: PathBuf, stop: Arc<AtomicBool>) {
    let listener = world
        .gw
        .enter(|| TcpListener::bind("127.0.0.1:8088"))
        .unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let body = std::fs::read(&file).unwrap_or_default();
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Type: application/pkix-crl\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(&body);
        }
    });
}

#[test]
fn a_revocation_list_served_over_http_reaches_the_other_gateway() {
    let stop = Arc::new(AtomicBool::new(false));
    let pair = Pair::with_list(|a, b| {
        serve_list(b, a.state.join("revocations.crl"), stop.clone());
        "http://127.0.0.1:8088/veil/revocations.crl".into()
    });
    let profile = pair.profile("dave", &[ENDPOINT_B]);
    let _client = pair.a.start_client(1, &profile, true);
    assert!(
        connected(&pair.b, "dave").is_some(),
        "let in by the list from the URL"
    );

    pair.a.veil_user(&["client", "revoke", "dave"]);
    let took = wait_for(
        Duration::from_secs(10),
        "dave's session closed on B",
        || connected(&pair.b, "dave").is_none(),
    );
    eprintln!("B applied the list from the URL {took:?} after the revocation");
    assert!(took < Duration::from_secs(5), "{took:?}");
    stop.store(true, Ordering::Relaxed);
}
