//! `flows`: the memory of a million concurrent flows: the flow maps sized
//! at load (`--max-flows`, `Datapath::load_sized`), filled through the
//! same flow API the daemon uses, so that the user-space index is the
//! daemon's too.

#[allow(unused_imports, reason = "one import list for the benchmark's modules")]
use super::*;

/// Bytes the kernel accounts to each BPF map this process holds, by
/// name (`/proc/self/fdinfo`'s `memlock`, named through bpftool).
fn own_maps() -> Vec<(String, u64, u64)> {
    let mut maps = Vec::new();
    let Ok(fds) = std::fs::read_dir("/proc/self/fdinfo") else {
        return maps;
    };
    for fd in fds.flatten() {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let (Some(id), Some(memlock), Some(entries)) =
            (field("map_id:"), field("memlock:"), field("max_entries:"))
        else {
            continue;
        };
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "id", &id.to_string()])
            .output();
        let name = out
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["name"].as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("id {id}"));
        maps.push((name, memlock, entries));
    }
    maps.sort();
    maps.dedup();
    maps
}

/// The flow table of `dp`, configured as a gateway's (nothing attached):
/// the table takes its public addresses from the configuration.
pub(crate) fn gateway_flow_table(dp: &mut Datapath) -> veil_user::FlowTable {
    dp.configure(&DatapathConfig {
        public_addrs: vec![PUBLIC],
        vip_pool: "10.77.0.0/16".parse::<Ipv4Net>().unwrap(),
        nat_ports: PortRange::DEFAULT,
        wan_ifindex: 4242,
        tun_ifindex: 4343,
        tun_l2_len: 0,
        wan_filter: veil_user::datapath::WanFilter::Xdp,
        gro_stage: None,
        fwd_per_source: 0,
    })
    .unwrap();
    dp.flow_table(PortRange::DEFAULT, Timeouts::default())
        .unwrap()
}

/// `n` distinct flows as a busy gateway holds them: 65,534 clients (a /16
/// pool), each with `n / 65,534` connections spread over 1,024 remote
/// endpoints (about a thousand flows each, inside the 4,536 NAT ports an
/// endpoint has).
fn keys(n: u32) -> Vec<FlowKey> {
    (0..n)
        .map(|i| {
            let client = Ipv4Addr::from_bits(0x0a4d_0000 + 2 + i % 65_534);
            let sport = 1024 + (i / 65_534) as u16;
            let r = i % 1024;
            let remote = Ipv4Addr::new(198, 18, 4 + (r / 256) as u8, (r % 256) as u8);
            FlowKey::new(proto::TCP, client, sport, remote, 443)
        })
        .collect()
}

pub(crate) fn million_flows(quick: bool) {
    let n: u32 = if quick { 1 << 18 } else { 1 << 20 };
    println!("## {n} flows (`--max-flows {n}`)\n");
    println!(
        "kernel {}, {} CPUs. The flow maps sized at load, filled through the daemon's flow API (egress and reverse map entry and NAT index per flow).\n",
        kernel(),
        num_cpus()
    );
    let me = std::process::id();
    let rss_start = rss_bytes(me);
    let mut dp = Datapath::load_sized(n).expect("loading the datapath sized for the flows");
    let mut flows = gateway_flow_table(&mut dp).with_capacity(n as usize);
    let maps = own_maps();
    let flow_maps: u64 = maps
        .iter()
        .filter(|(name, _, entries)| *entries == u64::from(n) && name.contains("VEIL_"))
        .map(|(_, memlock, _)| memlock)
        .sum();
    let all_maps: u64 = maps.iter().map(|(_, m, _)| m).sum();
    let keys = keys(n);
    let rss_empty = rss_bytes(me);
    let now = monotonic_ns();
    let start = Instant::now();
    for k in &keys {
        flows.create(*k, now).expect("creating a flow");
    }
    let took = start.elapsed();
    let rss_full = rss_bytes(me);
    assert_eq!(flows.len(), n as usize, "every flow held");
    // One more is refused: the table is full at --max-flows.
    let extra = FlowKey::new(proto::UDP, Ipv4Addr::new(10, 77, 0, 2), 9, REMOTE, 9);
    let full = flows.create(extra, now).is_err();

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!("| what | memory |");
    println!("|---|---:|");
    println!(
        "| flow maps (egress + reverse, kernel, allocated at load) | {:.0} MiB |",
        mib(flow_maps)
    );
    println!("| every map of the datapath | {:.0} MiB |", mib(all_maps));
    println!(
        "| user-space flow index (RSS with {n} flows − RSS empty) | {:.0} MiB |",
        mib(rss_full.saturating_sub(rss_empty))
    );
    println!(
        "| total per flow (maps + index) | {:.0} bytes |",
        (flow_maps + rss_full.saturating_sub(rss_empty)) as f64 / f64::from(n)
    );
    println!(
        "\n{n} flows created in {:.2} s ({:.0}/s); one more refused: {full}; process RSS {:.0} MiB at start, {:.0} MiB with the maps, {:.0} MiB full.",
        took.as_secs_f64(),
        f64::from(n) / took.as_secs_f64(),
        mib(rss_start),
        mib(rss_empty),
        mib(rss_full)
    );
    println!(
        "\nmaps held: {}",
        maps.iter()
            .map(|(name, m, e)| format!("{name} {e} entries {:.1} MiB", mib(*m)))
            .collect::<Vec<_>>()
            .join(", ")
    );
}
