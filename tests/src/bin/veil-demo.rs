//! `cargo xtask demo`: veil end to end in a minute, in network namespaces
//! that are gone when it ends (also on Ctrl-C or failure).

use std::{
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use veil_tests::{
    proc::workspace_bin,
    world::{World, PUBLIC},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: i32) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Stops between steps after Ctrl-C; unwinding drops the world, which
/// stops the processes and deletes the namespaces.
fn checkpoint() {
    if INTERRUPTED.load(Ordering::Relaxed) {
        panic!("interrupted: cleaning up");
    }
}

fn say(step: &str, text: &str) {
    println!("\n\x1b[1m{step}\x1b[0m {text}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

fn main() {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let started = Instant::now();
    let ok = std::panic::catch_unwind(demo).is_ok();
    println!(
        "\n{} in {:.1} s. Nothing is left behind: processes stopped, namespaces and pins removed.",
        if ok { "Done" } else { "Stopped" },
        started.elapsed().as_secs_f64()
    );
    if !ok {
        std::process::exit(1);
    }
}

fn demo() {
    println!(
        "veil demo: a client, a gateway and a web server, each in a network namespace of its own."
    );
    println!("The client sends all its traffic through the gateway; the web server only ever sees the gateway.");

    say(
        "1/5",
        "Creating the namespaces and starting the gateway (veil-user) ...",
    );
    let world = World::new(1, &[]);
    println!(
        "    client   {}  10.200.1.2, its way out through the gateway",
        world.client(1).name()
    );
    println!(
        "    gateway  {}  198.18.0.1 toward the internet, 10.200.1.1 toward the client",
        world.gw.name()
    );
    println!(
        "    remote   {}  198.18.0.2, a web server",
        world.remote.name()
    );
    println!("    (the gateway does not route: ip_forward is 0; only veil's eBPF datapath moves packets)");
    checkpoint();

    say(
        "2/5",
        "Issuing a client profile: veil-user client add demo --out demo.veil",
    );
    let profile = world.add_client("demo", 1);
    print!("{}", indent(&world.veil_user(&["client", "list"])));
    checkpoint();

    say(
        "3/5",
        "Starting the client: veil-client --profile demo.veil",
    );
    let client = world.start_client(1, &profile, true);
    let status = world.status();
    let vip = status["clients"][0]["vip"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    println!("    connected; the gateway gave the client the tunnel address {vip}");
    // The tunnel's routes are in a table of their own, consulted before
    // `main` (docs/client.md).
    for (what, args) in [
        ("routing rules", &["rule", "show"][..]),
        (
            "tunnel's routing table",
            &["route", "show", "table", "7670"][..],
        ),
    ] {
        let out = Command::new("ip")
            .args(["-n", world.client(1).name()])
            .args(args)
            .output()
            .unwrap();
        println!("    the client's {what} now:");
        print!("{}", indent(&String::from_utf8_lossy(&out.stdout)));
    }
    checkpoint();

    say(
        "4/5",
        "The client fetches http://198.18.0.2/ — the web server answers with the address it sees:",
    );
    let body = world
        .fetch(1)
        .expect("fetching the page through the tunnel");
    println!("    \"{}\"", body.trim());
    let seen = body.contains(&PUBLIC.to_string());
    println!(
        "    {} the server saw the gateway ({PUBLIC}), never the client (10.200.1.2 / {vip}).",
        if seen { "✓" } else { "✗" }
    );
    assert!(seen, "the web server saw something else: {body}");
    checkpoint();

    say("5/5", "What the gateway holds now.");
    let pins = world
        .pins()
        .join(format!("v{}/egress", veil_common::LAYOUT_VERSION));
    println!(
        "    The flow in the kernel's NAT map (sudo bpftool map dump pinned {}):",
        pins.display()
    );
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&pins)
        .output()
        .expect("running bpftool");
    print!("{}", indent(&String::from_utf8_lossy(&dump.stdout)));
    println!("    veil-user status:");
    let status = Command::new(workspace_bin("veil-user"))
        .args(["status", "--state-dir"])
        .arg(&world.state)
        .output()
        .unwrap();
    print!("{}", indent(&String::from_utf8_lossy(&status.stdout)));
    checkpoint();

    println!("\nTearing down ...");
    let mut client = client;
    client.stop();
    std::thread::sleep(Duration::from_millis(100));
    drop(world);
}
