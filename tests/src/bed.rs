//! A test bed for BPF_PROG_TEST_RUN: veil's programs loaded with fresh
//! maps and configured as a gateway at 198.18.0.1 (and 198.18.0.3 when a
//! test asks for a second public address) with clients in 10.77.0.0/16.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp};
use veil_common::{FlowKey, Reason, PROG_TUN_TC, PROG_WAN_TC, PROG_WAN_XDP};
use veil_user::{
    flows::{Flow, FlowTable, PortRange, Timeouts},
    net::Ipv4Net,
    Datapath, DatapathConfig,
};

use crate::{bpffs::BpfFs, packet::ETH_LEN};

pub const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The second public address of [`Bed::with_public`] beds.
pub const PUBLIC2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 7, 7);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const PORTS: PortRange = PortRange {
    min: 61000,
    max: 61999,
};

/// A port of [`PORTS`] other than `taken`, for a stranger's packet: a flow's
/// NAT port is random and may be any of them, the range's ends included.
pub fn port_besides(taken: u16) -> u16 {
    if taken == PORTS.max {
        taken - 1
    } else {
        taken + 1
    }
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: i32 = 0;
pub const TC_ACT_SHOT: i32 = 2;
pub const TC_ACT_REDIRECT: i32 = 7;

/// What the WAN programs did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub struct Wan {
    pub xdp: u32,
    /// `None` when XDP did not pass it.
    pub tc: Option<i32>,
    pub out: Vec<u8>,
}

impl Wan {
    /// Translated and handed to the TUN device.
    pub fn delivered(&self) -> bool {
        self.xdp == XDP_PASS && self.tc == Some(TC_ACT_REDIRECT)
    }

    /// Left to the host stack, byte for byte.
    pub fn passed_untouched(&self, input: &[u8]) -> bool {
        self.xdp == XDP_PASS && self.tc == Some(TC_ACT_OK) && self.out == input
    }
}

/// The loaded programs with fresh maps, configured as a gateway.
pub struct Bed {
    pub dp: Datapath,
    pub flows: FlowTable,
    config: DatapathConfig,
}

impl Default for Bed {
    fn default() -> Self {
        Self::new()
    }
}

impl Bed {
    pub fn new() -> Self {
        Self::with_ports(PORTS)
    }

    pub fn with_ports(ports: PortRange) -> Self {
        Self::build(&[PUBLIC], ports, None)
    }

    /// A gateway translating to each of `public`.
    pub fn with_public(public: &[Ipv4Addr], ports: PortRange) -> Self {
        Self::build(public, ports, None)
    }

    /// A bed whose maps are also pinned (under a directory of its own), so
    /// tests can read them the way an operator would.
    pub fn pinned() -> (Self, PathBuf, BpfFs) {
        Self::pinned_with(&[PUBLIC], PORTS)
    }

    /// [`Self::pinned`] translating to each of `public` with `ports`.
    pub fn pinned_with(public: &[Ipv4Addr], ports: PortRange) -> (Self, PathBuf, BpfFs) {
        let fs = BpfFs::new();
        let mut dir = PathBuf::new();
        let bed = Self::build(public, ports, Some((&fs.path().join("veil"), &mut dir)));
        (bed, dir, fs)
    }

    fn build(public: &[Ipv4Addr], ports: PortRange, pin: Option<(&Path, &mut PathBuf)>) -> Self {
        let mut dp = Datapath::load().expect("loading the datapath (are you root?)");
        let config = DatapathConfig {
            public_addrs: public.to_vec(),
            vip_pool: "10.77.0.0/16".parse::<Ipv4Net>().unwrap(),
            nat_ports: ports,
            wan_ifindex: 4242,
            tun_ifindex: 4343,
            // BPF_PROG_TEST_RUN gives TC programs an Ethernet header.
            tun_l2_len: ETH_LEN as u32,
            wan_filter: veil_user::datapath::WanFilter::Xdp,
            gro_stage: None,
            fwd_per_source: 0,
        };
        dp.configure(&config).unwrap();
        if let Some((root, dir)) = pin {
            *dir = dp.pin(root).expect("pinning maps");
        }
        let flows = dp.flow_table(ports, Timeouts::default()).unwrap();
        Self { dp, flows, config }
    }

    /// As `veil-user --max-forward-per-source n`.
    pub fn forward_per_source(&mut self, n: u32) {
        self.config.fwd_per_source = n;
        self.dp.configure(&self.config).unwrap();
    }

    /// As `veil-user --wan-filter tc`: TC on the WAN does XDP's checks
    /// too, for a WAN with no XDP program.
    pub fn wan_filter_in_tc(&mut self) {
        self.config.wan_filter = veil_user::datapath::WanFilter::Tc;
        self.dp.configure(&self.config).unwrap();
    }

    pub fn flow(&mut self, proto: u8, client_port: u16, remote_port: u16) -> (FlowKey, u16) {
        self.flow_of(CLIENT, proto, client_port, remote_port)
    }

    /// [`Self::flow`] for another client.
    pub fn flow_of(
        &mut self,
        client: Ipv4Addr,
        proto: u8,
        client_port: u16,
        remote_port: u16,
    ) -> (FlowKey, u16) {
        let key = FlowKey::new(proto, client, client_port, REMOTE, remote_port);
        let nat = self.flows.create(key, 1).expect("creating a flow");
        let ports = self.flows.ports();
        assert!(ports.contains(nat), "NAT port {nat} outside {ports}");
        (key, nat)
    }

    pub fn tun(&mut self, input: &[u8]) -> (i32, Vec<u8>) {
        let prog: &mut SchedClassifier = self.dp.program(PROG_TUN_TC).unwrap();
        let (rc, out) = run(prog, input);
        (rc as i32, out)
    }

    pub fn xdp(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut Xdp = self.dp.program(PROG_WAN_XDP).unwrap();
        run(prog, input)
    }

    /// A frame arriving on the WAN: XDP first (which never rewrites), then,
    /// if it passed, TC. Returns both actions and TC's output.
    pub fn wan(&mut self, input: &[u8]) -> Wan {
        wan(&mut self.dp, input)
    }

    /// TC on the WAN alone: for frames XDP already passed (the kernel runs
    /// XDP on a batch of frames before TC sees the first of them).
    pub fn wan_tc(&mut self, input: &[u8]) -> (i32, Vec<u8>) {
        let prog: &mut SchedClassifier = self.dp.program(PROG_WAN_TC).unwrap();
        let (rc, out) = run(prog, input);
        (rc as i32, out)
    }

    pub fn count(&self, reason: Reason) -> u64 {
        let stats = self.dp.stats().unwrap();
        stats.iter().find(|(r, _)| *r == reason).unwrap().1.packets
    }

    pub fn listed(&self, key: &FlowKey) -> Flow {
        let all = self.flows.list().unwrap();
        all.into_iter()
            .find(|f| f.key == *key)
            .expect("flow listed")
    }
}

/// A frame arriving on the WAN of `dp`: XDP, then TC if XDP passed it.
pub fn wan(dp: &mut Datapath, input: &[u8]) -> Wan {
    let prog: &mut Xdp = dp.program(PROG_WAN_XDP).unwrap();
    let (xdp, out) = run(prog, input);
    assert_eq!(out, input, "XDP filters, it never rewrites");
    if xdp != XDP_PASS {
        return Wan { xdp, tc: None, out };
    }
    let prog: &mut SchedClassifier = dp.program(PROG_WAN_TC).unwrap();
    let (tc, out) = run(prog, input);
    Wan {
        xdp,
        tc: Some(tc as i32),
        out,
    }
}

pub fn run<P>(prog: &P, input: &[u8]) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut out = vec![0u8; input.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// The first client address (from 10.77.0.2 on, skipping `not`) whose
/// flows leave from `want` among `public`.
pub fn client_on(want: Ipv4Addr, public: &[Ipv4Addr], not: &[Ipv4Addr]) -> Ipv4Addr {
    (2..=254u8)
        .map(|i| Ipv4Addr::new(10, 77, 0, i))
        .find(|c| !not.contains(c) && veil_user::nat::public_addr_for(*c, public) == Some(want))
        .expect("some client address lands on it")
}

/// The keys of a pinned hash map, read through the pin as `bpftool` would.
pub fn pinned_keys<K: aya::Pod, V: aya::Pod>(path: &Path) -> Vec<(K, V)> {
    let data = aya::maps::MapData::from_pin(path).expect("opening the pinned map");
    let map = aya::maps::Map::from_map_data(data).expect("a map");
    let hash: aya::maps::HashMap<_, K, V> = aya::maps::HashMap::try_from(map).expect("a hash map");
    hash.iter().map(|r| r.expect("reading the map")).collect()
}
