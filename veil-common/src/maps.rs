//! Map names and the layouts of their keys and values.

use core::net::Ipv4Addr;

/// IP protocol numbers the datapath translates.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
}

/// TCP flag bits as they appear in the header's flags byte; the datapath ORs
/// the ones it sees into [`FlowStats::tcp_flags`].
pub mod tcp_flags {
    pub const FIN: u64 = 0x01;
    pub const SYN: u64 = 0x02;
    pub const RST: u64 = 0x04;
    pub const ACK: u64 = 0x10;
    /// The flags worth remembering for expiry.
    pub const TRACKED: u64 = FIN | SYN | RST | ACK;

    /// Whether the three-way handshake is over, from the flags each side
    /// sent: both sent SYN, and the side that opened also acknowledged
    /// the other's. SYN both ways alone is what a blind SYN flood gets
    /// (the answer goes to a forged source that never acknowledges it),
    /// so it is not enough (RFC 5382 counts a connection established
    /// after the handshake).
    pub const fn handshake_done(opener: u64, answerer: u64) -> bool {
        opener & (SYN | ACK) == SYN | ACK && answerer & SYN != 0
    }
}

/// Egress flows: the client's 5-tuple to its NAT port. Hash, key [`FlowKey`],
/// value [`EgressFlow`].
pub const EGRESS_MAP: &str = "VEIL_EGRESS";
/// Reverse flows: the remote's view to the client. Hash, key [`ReverseKey`],
/// value [`ReverseFlow`].
pub const REVERSE_MAP: &str = "VEIL_REVERSE";
/// One [`Config`] at index 0.
pub const CONFIG_MAP: &str = "VEIL_CONFIG";
/// Per-CPU [`Counter`]s indexed by [`crate::Reason`].
pub const STATS_MAP: &str = "VEIL_STATS";
/// IPv4 fragments: what a datagram's first fragment was translated to, for
/// the fragments after it, which carry no ports. LRU hash, key [`FragKey`],
/// value [`FragEntry`]. The datapath's own (the daemon never writes it):
/// evicting the oldest entry when full is the right policy here.
pub const FRAG_MAP: &str = "VEIL_FRAGS";
/// All maps, in the order the daemon pins them.
pub const ALL_MAPS: [&str; 5] = [EGRESS_MAP, REVERSE_MAP, CONFIG_MAP, STATS_MAP, FRAG_MAP];

/// Program names (the functions in veil-ebpf).
pub const PROG_WAN_XDP: &str = "veil_wan_xdp";
pub const PROG_WAN_TC: &str = "veil_wan_tc";
pub const PROG_TUN_TC: &str = "veil_tun_tc";
/// TC ingress on the far end of the gateway's GRO stage (see
/// [`Config::reply_ifindex`]): replies, merged, into the TUN device.
pub const PROG_GRO_TC: &str = "veil_gro_tc";
/// The gateway TUN device's steering program (see [`crate::steer`]).
pub const PROG_TUN_STEER: &str = "veil_tun_steer";

/// Capacity of each flow map. Two entries a flow (egress and reverse).
pub const MAX_FLOWS: u32 = 262_144;

/// Capacity of the fragment map: datagrams in flight in fragments, two
/// entries each on the way out (translation and IP ID), one on the way in.
pub const MAX_FRAGS: u32 = 16_384;

/// How long a first fragment's entry translates the fragments after it.
/// A datagram's fragments travel back to back; the margin covers a stalled
/// tunnel (TCP retransmissions) between them. Well under the 30 s a Linux
/// receiver keeps an incomplete datagram (`ipfrag_time`).
pub const FRAG_TIMEOUT_NS: u64 = 10_000_000_000;

/// How long an IP ID the gateway gave a fragmented datagram stays reserved
/// toward its remote host: as long as that host may keep an incomplete
/// datagram under it (Linux's `ipfrag_time`, 30 s). Another datagram with
/// the same ID meanwhile would be reassembled with its fragments.
pub const FRAG_ID_HOLD_NS: u64 = 30_000_000_000;

/// Bump when a layout below changes: the pin directory carries it, so a new
/// daemon never reads maps pinned by an older one.
pub const LAYOUT_VERSION: u32 = 8;

/// Most public addresses one gateway translates to ([`Config::public_addrs`]).
/// The datapath compares a packet's address with each in turn: a handful of
/// compares costs less than a map lookup on every WAN packet, and more
/// addresses than this would split clients into crowds too small to hide in.
pub const MAX_PUBLIC_ADDRS: usize = 16;

/// A flow as the client sees it; the egress map's key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// The client's virtual address (VIP).
    pub client_addr: [u8; 4],
    pub remote_addr: [u8; 4],
    /// Source port, or the ICMP echo identifier.
    pub client_port: u16,
    /// Destination port; 0 for ICMP.
    pub remote_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    pub const fn new(
        proto: u8,
        client: Ipv4Addr,
        client_port: u16,
        remote: Ipv4Addr,
        remote_port: u16,
    ) -> Self {
        Self {
            client_addr: client.octets(),
            remote_addr: remote.octets(),
            client_port,
            remote_port,
            proto,
            _pad: [0; 3],
        }
    }

    pub const fn client(&self) -> Ipv4Addr {
        Ipv4Addr::from_octets(self.client_addr)
    }

    pub const fn remote(&self) -> Ipv4Addr {
        Ipv4Addr::from_octets(self.remote_addr)
    }

    /// The reverse map's key for this flow once it owns `nat_port` on the
    /// public address `public`.
    pub const fn reverse(&self, public: Ipv4Addr, nat_port: u16) -> ReverseKey {
        ReverseKey {
            remote_addr: self.remote_addr,
            public_addr: public.octets(),
            remote_port: self.remote_port,
            nat_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// What the datapath keeps about one direction of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the last packet; 0 if none.
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// [`tcp_flags`] seen in this direction, ORed, in the low byte. 64
    /// bits wide because BPF has 64-bit atomic OR on every CPU version.
    /// The high half is a forwarded connection's inbound entry's
    /// [`crate::handshake_ack`] (0 elsewhere).
    pub tcp_flags: u64,
}

/// The egress map's value: where the client's packets are translated to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressFlow {
    /// Client to remote.
    pub stats: FlowStats,
    /// The public address the flow's packets leave from: one of
    /// [`Config::public_addrs`], the same for every flow of a client.
    pub public_addr: [u8; 4],
    pub nat_port: u16,
    /// TCP: [`crate::acked_of`] the client's last acknowledgment number,
    /// what it expects next from the remote (0: nothing yet). A reply's
    /// RST or FIN far from it is no proof of an end
    /// ([`crate::rst_plausible`]): the remote's address can be forged.
    pub acked: u16,
}

/// A flow as the remote sees it; the reverse map's key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReverseKey {
    pub remote_addr: [u8; 4],
    /// The public address the remote answers to: the same NAT port toward
    /// the same remote endpoint may be in use on several public addresses.
    pub public_addr: [u8; 4],
    pub remote_port: u16,
    /// The gateway's port (or ICMP identifier) the remote answers to.
    pub nat_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl ReverseKey {
    /// The key of the client's flow whose replies this key takes, given
    /// its client (the reverse entry's value).
    pub const fn client_flow(&self, client_addr: [u8; 4], client_port: u16) -> FlowKey {
        FlowKey {
            client_addr,
            remote_addr: self.remote_addr,
            client_port,
            remote_port: self.remote_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// The reverse map's value: whom a reply belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReverseFlow {
    /// Remote to client.
    pub stats: FlowStats,
    pub client_addr: [u8; 4],
    pub client_port: u16,
    pub _pad: [u8; 2],
}

/// The datapath's settings, written once by the daemon before it attaches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// The client address pool (network and mask): WAN packets addressed
    /// into it are spoofed, and NATed replies to it go to the tunnel.
    pub vip_net: [u8; 4],
    pub vip_mask: [u8; 4],
    pub wan_ifindex: u32,
    pub tun_ifindex: u32,
    /// The NAT port range, inclusive, host order.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// Link-layer bytes in front of the IP header on the tunnel device: 0 on
    /// TUN (an L3 device), 14 on TAP and under BPF_PROG_TEST_RUN.
    pub tun_l2_len: u32,
    /// How many of [`Self::public_addrs`] are in use; 0 until the daemon
    /// has configured the datapath.
    pub public_count: u32,
    /// The gateway's addresses on the WAN: what remote hosts see. Each
    /// flow leaves from one of them (the egress map says which); replies
    /// to any of them are translated.
    pub public_addrs: [[u8; 4]; MAX_PUBLIC_ADDRS],
    /// [`Config::WAN_FILTER_IN_TC`], or 0.
    pub flags: u32,
    /// Where translated replies go: `tun_ifindex`, or, when the WAN does
    /// no GRO, the near end of the gateway's GRO stage: a veth whose far
    /// end merges each flow's segments (the kernel's GRO) and hands them
    /// to `tun_ifindex` ([`PROG_GRO_TC`]), so that the daemon reads a run
    /// of segments at once rather than one MTU-sized packet per read.
    pub reply_ifindex: u32,
    /// Established forwarded TCP connections (`--forward`) one remote
    /// address may hold at once (`--max-forward-per-source`); a SYN
    /// beyond is dropped (`fwd_drop_source_busy`). 0: no limit (the
    /// datapath alone, under BPF_PROG_TEST_RUN).
    pub fwd_per_source: u32,
}

impl Config {
    /// No XDP program on the WAN: TC there does its admission checks too
    /// (`veil-user --wan-filter tc`).
    pub const WAN_FILTER_IN_TC: u32 = 1;

    #[inline(always)]
    pub const fn wan_filter_in_tc(&self) -> bool {
        self.flags & Self::WAN_FILTER_IN_TC != 0
    }

    /// Whether `addr` is one of the gateway's public addresses.
    #[inline(always)]
    pub fn is_public(&self, addr: [u8; 4]) -> bool {
        let addr = u32::from_ne_bytes(addr);
        // A fixed bound the compiler unrolls and the verifier accepts.
        for i in 0..MAX_PUBLIC_ADDRS {
            if i as u32 >= self.public_count {
                break;
            }
            if u32::from_ne_bytes(self.public_addrs[i]) == addr {
                return true;
            }
        }
        false
    }

    pub const fn in_vip_pool(&self, addr: [u8; 4]) -> bool {
        (u32::from_ne_bytes(addr) & u32::from_ne_bytes(self.vip_mask))
            == u32::from_ne_bytes(self.vip_net)
    }

    pub const fn in_nat_range(&self, port: u16) -> bool {
        port >= self.nat_port_min && port <= self.nat_port_max
    }
}

/// What a [`FragKey`] describes.
pub mod frag_kind {
    /// A client's datagram on its way out: key (client, remote, the
    /// client's IP ID); the entry holds the public address and the IP ID
    /// the datagram carries on the WAN.
    pub const EGRESS: u8 = 1;
    /// A remote's datagram on its way in: key (remote, public address, the
    /// remote's IP ID); the entry holds the client address.
    pub const INGRESS: u8 = 2;
    /// An IP ID the gateway gave one of its clients' datagrams: key
    /// (public address, remote, that ID); the entry holds the client and
    /// its own ID. Reserved until [`super::FRAG_ID_HOLD_NS`] has passed.
    pub const ID: u8 = 3;
}

/// The fragment map's key: what the fragments of one datagram share
/// (RFC 791: source, destination, protocol and identification), and what
/// the entry is for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    /// The IP header's identification field, host order.
    pub id: u16,
    pub proto: u8,
    /// One of [`frag_kind`].
    pub kind: u8,
}

impl FragKey {
    pub const fn new(kind: u8, src: [u8; 4], dst: [u8; 4], id: u16, proto: u8) -> Self {
        Self {
            src_addr: src,
            dst_addr: dst,
            id,
            proto,
            kind,
        }
    }
}

/// The fragment map's value (see [`frag_kind`] for what each field holds).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry {
    /// `bpf_ktime_get_ns()` when the first fragment was seen. An entry
    /// older than [`FRAG_TIMEOUT_NS`] (an ID reservation: older than
    /// [`FRAG_ID_HOLD_NS`]) is ignored and replaced.
    pub first_seen_ns: u64,
    /// The address the fragments are translated to.
    pub addr: [u8; 4],
    /// An IP ID, host order; 0 where unused.
    pub id: u16,
    pub _pad: [u8; 2],
}

impl FragEntry {
    /// Whether the entry is still in force at `now_ns` for an entry kind
    /// that lasts `lifetime_ns`. A timestamp from the future (impossible
    /// on one boot) counts as expired.
    pub const fn is_live(&self, now_ns: u64, lifetime_ns: u64) -> bool {
        now_ns >= self.first_seen_ns && now_ns - self.first_seen_ns <= lifetime_ns
    }
}

/// One reason's tally on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `repr(C)`, made of integers and byte arrays,
    // with every padding byte an explicit field, so any bit pattern is valid.
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowStats {}
    unsafe impl aya::Pod for super::EgressFlow {}
    unsafe impl aya::Pod for super::ReverseKey {}
    unsafe impl aya::Pod for super::ReverseFlow {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragEntry {}
    unsafe impl aya::Pod for crate::ratelimit::RateKey {}
    unsafe impl aya::Pod for crate::normalize::Normalize {}
    unsafe impl aya::Pod for crate::ratelimit::RateLimit {}
}

// The layouts are ABI: the eBPF object, the daemon and BTF must agree.
const _: () = {
    assert!(size_of::<FlowKey>() == 16);
    assert!(size_of::<FlowStats>() == 32);
    assert!(size_of::<EgressFlow>() == 40);
    assert!(size_of::<ReverseKey>() == 16);
    assert!(size_of::<ReverseFlow>() == 40);
    assert!(size_of::<Config>() == 40 + 4 * MAX_PUBLIC_ADDRS);
    assert!(size_of::<Counter>() == 16);
    assert!(size_of::<FragKey>() == 12);
    assert!(size_of::<FragEntry>() == 16);
    assert!(size_of::<crate::ratelimit::RateKey>() == 4);
    assert!(size_of::<crate::normalize::Normalize>() == 8);
    assert!(size_of::<crate::ratelimit::RateLimit>() == 96);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_configured_public_addresses_are_public() {
        let mut cfg = Config {
            public_count: 2,
            ..Default::default()
        };
        cfg.public_addrs[0] = [198, 18, 0, 1];
        cfg.public_addrs[1] = [198, 18, 0, 3];
        // A stale slot past the count is not consulted.
        cfg.public_addrs[2] = [198, 18, 0, 9];
        assert!(cfg.is_public([198, 18, 0, 1]));
        assert!(cfg.is_public([198, 18, 0, 3]));
        assert!(!cfg.is_public([198, 18, 0, 9]));
        assert!(
            !cfg.is_public([0, 0, 0, 0]),
            "empty slots are not addresses"
        );
        cfg.public_count = MAX_PUBLIC_ADDRS as u32;
        cfg.public_addrs[MAX_PUBLIC_ADDRS - 1] = [203, 0, 113, 7];
        assert!(cfg.is_public([203, 0, 113, 7]), "the last slot counts");
    }
}
