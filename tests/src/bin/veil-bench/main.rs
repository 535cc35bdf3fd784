//! veil's measurements, run by `cargo xtask bench` (as root).
//!
//! `datapath`:
//! - ns per packet of each path through the real programs
//!   (BPF_PROG_TEST_RUN; the kernel times each run),
//! - packets per second from a generator writing into the gateway's TUN
//!   device to a sink in a remote namespace, through veil's datapath and,
//!   on the same topology, through the kernel's routing + MASQUERADE,
//! - flow creations and deletions per second through the flow API.
//!
//! `forward`: a port forwarded in the datapath beside direct routing,
//! HAProxy and socat.
//! `socks`: the SOCKS5 mode beside the TUN mode and shadowsocks.
//! `ipv6`: TCP through veil over IPv6 beside IPv4.
//! `flows`: the memory of a million flows (`--max-flows`).
//! `scale`: aggregate throughput with 1, 2, 4 and 8 clients, the TUN
//! device multi-queue and single-queue.
//! `loss`: TCP goodput over HTTP/3 and TLS/TCP through loss and delay.
//! `churn`: thousands of real sessions connecting, sending, leaving and
//! coming back.
//! `capsules`: the tunnel's capsule decoder, in memory.

use std::{
    io::Write,
    net::{Ipv4Addr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp};
use veil_common::{proto, FlowKey, PROG_TUN_TC, PROG_WAN_TC, PROG_WAN_XDP};
use veil_tests::{
    bed::{Bed, CLIENT, PORTS, PUBLIC, REMOTE, ROUTER},
    netns::{gateway_and_remote, NetNs},
    packet::{frame, icmp_error, ip_of, L4},
    proc::{fd_count, rss_bytes},
};
use veil_user::{
    flows::{PortRange, Timeouts},
    net::{ifindex, monotonic_ns, Ipv4Net},
    Datapath, DatapathConfig,
};

fn main() {
    let what = std::env::args().nth(1).unwrap_or_else(|| "datapath".into());
    let quick = std::env::args().any(|a| a == "--quick");
    match what.as_str() {
        "datapath" => datapath(quick),
        "tunnel" => tunnel(quick),
        "peers" => peers(quick, only()),
        "forward" => forwarding(quick),
        "socks" => socks(quick),
        "ipv6" => ipv6(quick),
        "flows" => million_flows(quick),
        "churn" => churn(quick),
        "scale" => scale(quick),
        "loss" => loss(quick),
        "capsules" => capsules(quick),
        other => {
            eprintln!(
                "unknown benchmark `{other}`; known: datapath, tunnel, peers, forward, socks, ipv6, flows, churn, scale, loss, capsules"
            );
            std::process::exit(2);
        }
    }
}

mod capsules;
mod churn;
mod datapath;
mod forward;
mod ipv6;
mod livegen;
mod loss;
mod measure;
mod million;
mod peers;
mod scale;
mod socks;
mod tunnel;

#[allow(
    unused_imports,
    reason = "the modules share one import list through `use super::*`"
)]
use self::{
    capsules::*, churn::*, datapath::*, forward::*, ipv6::*, loss::*, measure::*, million::*,
    peers::*, scale::*, socks::*, tunnel::*,
};
