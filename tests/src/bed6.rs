//! The BPF_PROG_TEST_RUN bed of [`crate::bed`] with IPv6 turned on: NAT66
//! to 2001:2::1 (the benchmarking range, RFC 5180), clients in
//! fd00:7665:696c::/64 (the `--pool6` default: a client's address is its
//! IPv4 lease in the low 32 bits).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use aya::programs::SchedClassifier;
use veil_common::{FlowKey6, Reason, PROG_TUN_TC};
use veil_user::{
    flows::{FlowTable, Timeouts},
    flows6::{Flow6, FlowTable6},
    net::Ipv4Net,
    Datapath, DatapathConfig,
};

use crate::{
    bed::{run, Wan, PORTS, PUBLIC},
    bpffs::BpfFs,
    packet::ETH_LEN,
};

pub const PUBLIC6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
pub const REMOTE6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 7, 0, 0, 0, 7);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const VIP2: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7665, 0x696c, 0, 0, 0, 0x0a4d, 2);
pub const CLIENT6_2: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x7665, 0x696c, 0, 0, 0, 0x0a4d, 3);
pub const POOL6: &str = "fd00:7665:696c::/64";

pub struct Bed6 {
    pub dp: Datapath,
    pub flows: FlowTable,
    pub flows6: FlowTable6,
}

impl Default for Bed6 {
    fn default() -> Self {
        Self::new()
    }
}

impl Bed6 {
    pub fn new() -> Self {
        Self::build(None)
    }

    /// A bed whose maps are also pinned (on a BPF filesystem of its own),
    /// for `bpftool`.
    pub fn pinned() -> (Self, PathBuf, BpfFs) {
        let fs = BpfFs::new();
        let mut dir = PathBuf::new();
        let bed = Self::build(Some((&fs.path().join("veil"), &mut dir)));
        (bed, dir, fs)
    }

    fn build(pin: Option<(&Path, &mut PathBuf)>) -> Self {
        let mut dp = Datapath::load().expect("loading the datapath (are you root?)");
        dp.configure(&DatapathConfig {
            public_addrs: vec![PUBLIC],
            vip_pool: "10.77.0.0/16".parse::<Ipv4Net>().unwrap(),
            nat_ports: PORTS,
            wan_ifindex: 4242,
            tun_ifindex: 4343,
            tun_l2_len: ETH_LEN as u32,
            wan_filter: veil_user::datapath::WanFilter::Xdp,
            gro_stage: None,
            fwd_per_source: 0,
        })
        .unwrap();
        dp.configure6(PUBLIC6, POOL6.parse().unwrap()).unwrap();
        if let Some((root, dir)) = pin {
            *dir = dp.pin(root).expect("pinning maps");
        }
        let flows = dp.flow_table(PORTS, Timeouts::default()).unwrap();
        let flows6 = dp.flow_table6(PORTS, Timeouts::default()).unwrap();
        Self { dp, flows, flows6 }
    }

    /// The bed with IPv6 flows mapped as `mapping` says.
    pub fn with_mapping(self, mapping: veil_user::nat::Mapping) -> Self {
        Self {
            flows6: self.flows6.with_mapping(mapping),
            ..self
        }
    }

    /// A flow of the first client toward [`REMOTE6`].
    pub fn flow(&mut self, proto: u8, client_port: u16, remote_port: u16) -> (FlowKey6, u16) {
        self.flow_of(VIP, CLIENT6, proto, client_port, remote_port)
    }

    pub fn flow_of(
        &mut self,
        vip: Ipv4Addr,
        client: Ipv6Addr,
        proto: u8,
        client_port: u16,
        remote_port: u16,
    ) -> (FlowKey6, u16) {
        let key = FlowKey6::new(proto, client, client_port, REMOTE6, remote_port);
        let nat = self.flows6.create(key, vip, 1).expect("creating a flow");
        assert!(PORTS.contains(nat), "NAT port {nat} outside {PORTS}");
        (key, nat)
    }

    pub fn tun(&mut self, input: &[u8]) -> (i32, Vec<u8>) {
        let prog: &mut SchedClassifier = self.dp.program(PROG_TUN_TC).unwrap();
        let (rc, out) = run(prog, input);
        (rc as i32, out)
    }

    /// XDP, then TC if XDP passed it (see [`crate::bed::Bed::wan`]).
    pub fn wan(&mut self, input: &[u8]) -> Wan {
        crate::bed::wan(&mut self.dp, input)
    }

    pub fn count(&self, reason: Reason) -> u64 {
        let stats = self.dp.stats().unwrap();
        stats.iter().find(|(r, _)| *r == reason).unwrap().1.packets
    }

    pub fn listed(&self, key: &FlowKey6) -> Flow6 {
        self.flows6
            .list()
            .unwrap()
            .into_iter()
            .find(|f| f.key == *key)
            .expect("flow listed")
    }
}
