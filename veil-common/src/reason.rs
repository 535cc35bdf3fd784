//! Why the datapath did what it did with a packet.
//!
//! Every packet the programs see is counted under exactly one reason, in the
//! per-CPU `VEIL_STATS` array indexed by the reason's number. The numbers are
//! part of the pinned-map ABI: append, never renumber.

/// A numbered reason code. Kept apart from the XDP/TC action values: the
/// action says what happened, the reason says why.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A client packet was rewritten to the public address and sent out.
    EgressForwarded = 0,
    /// A reply was rewritten to its client's address and handed to the tunnel.
    IngressForwarded = 1,
    /// An ICMP error about a NATed flow was rewritten (outer and embedded
    /// headers) and handed to the tunnel.
    IcmpErrorForwarded = 2,
    /// Not veil's: left to the host stack (ssh, the tunnel listener, ARP).
    PassToHost = 3,
    /// From the tunnel with no flow in `VEIL_EGRESS`: the daemon did not
    /// create it, or it expired.
    DropNoEgressFlow = 4,
    /// To the NAT port range with no mapping: unsolicited, dropped so the
    /// kernel never answers it.
    DropNoIngressFlow = 5,
    /// Truncated or inconsistent headers.
    DropMalformed = 6,
    /// An IPv4 fragment on a NAT path that is not translated: an ICMP error
    /// in fragments, or one whose first fragment cannot be (IP options).
    DropFragment = 7,
    /// IPv4 options on a NAT path: not rewritten, never mangled.
    DropIpOptions = 8,
    /// A protocol or ICMP type the datapath does not translate.
    DropUnsupported = 9,
    /// A packet from the WAN addressed to a client's virtual address: spoofed.
    DropSpoofedVip = 10,
    /// TTL would reach zero on the way out.
    DropTtlExpired = 11,
    /// A kernel helper (head room, redirect) refused the packet.
    DropHelperFailed = 12,
    /// The datapath has no configuration yet (the daemon writes it before
    /// attaching, so this means something is badly wrong).
    DropNotConfigured = 13,
    /// A later fragment (IPv4 or IPv6) from a client whose first fragment
    /// was not seen, or too long ago: it carries no ports, so nothing says
    /// whose flow it belongs to.
    DropOrphanFragment = 14,
    /// A packet of a forwarded connection (`--forward`) was translated (both
    /// addresses) and sent on toward the target or back to the remote.
    FwdForwarded = 15,
    /// A new forwarded connection found no room: the connection map is
    /// full, or no NAT port toward the target was free in a few tries.
    FwdDropNoRoom = 16,
    /// A TCP packet other than a SYN to a forwarded port, with no
    /// connection: one of a removed rule, or one that expired.
    FwdDropNoFlow = 17,
    /// Over its client's rate (`--rate-limit`): the token bucket of that
    /// direction was empty.
    DropRateLimited = 18,
    /// Over its client's byte quota (`--quota`) for the period.
    DropQuotaExceeded = 19,
    /// An IPv6 extension header (hop-by-hop, routing, destination options,
    /// or one the datapath does not know) on a NAT path: not walked past,
    /// dropped.
    DropIpv6ExtHeader = 20,
    /// An IPv6 fragment on a NAT path that is not translated: a fragment
    /// header after other extension headers, or an ICMPv6 error in
    /// fragments. (Fragments whose fragment header follows the IPv6 header
    /// are translated, as for IPv4.)
    DropIpv6Fragment = 21,
    /// An IPv6 packet from the WAN addressed into the clients' IPv6
    /// prefix: forged.
    DropSpoofedV6 = 22,
    /// An IPv6 packet to the gateway's IPv6 address in the NAT range with
    /// no mapping: unsolicited, dropped so that the kernel never answers.
    DropNoIngressFlow6 = 23,
    /// A new forwarded connection from a remote address that holds
    /// `--max-forward-per-source` connections already.
    FwdDropSourceBusy = 24,
}

impl Reason {
    /// Every reason, in numeric order.
    pub const ALL: [Reason; 25] = [
        Reason::EgressForwarded,
        Reason::IngressForwarded,
        Reason::IcmpErrorForwarded,
        Reason::PassToHost,
        Reason::DropNoEgressFlow,
        Reason::DropNoIngressFlow,
        Reason::DropMalformed,
        Reason::DropFragment,
        Reason::DropIpOptions,
        Reason::DropUnsupported,
        Reason::DropSpoofedVip,
        Reason::DropTtlExpired,
        Reason::DropHelperFailed,
        Reason::DropNotConfigured,
        Reason::DropOrphanFragment,
        Reason::FwdForwarded,
        Reason::FwdDropNoRoom,
        Reason::FwdDropNoFlow,
        Reason::DropRateLimited,
        Reason::DropQuotaExceeded,
        Reason::DropIpv6ExtHeader,
        Reason::DropIpv6Fragment,
        Reason::DropSpoofedV6,
        Reason::DropNoIngressFlow6,
        Reason::FwdDropSourceBusy,
    ];

    /// A stable snake_case name, for logs, `veil-user status` and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::EgressForwarded => "egress_forwarded",
            Reason::IngressForwarded => "ingress_forwarded",
            Reason::IcmpErrorForwarded => "icmp_error_forwarded",
            Reason::PassToHost => "pass_to_host",
            Reason::DropNoEgressFlow => "drop_no_egress_flow",
            Reason::DropNoIngressFlow => "drop_no_ingress_flow",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropFragment => "drop_fragment",
            Reason::DropIpOptions => "drop_ip_options",
            Reason::DropUnsupported => "drop_unsupported",
            Reason::DropSpoofedVip => "drop_spoofed_vip",
            Reason::DropTtlExpired => "drop_ttl_expired",
            Reason::DropHelperFailed => "drop_helper_failed",
            Reason::DropNotConfigured => "drop_not_configured",
            Reason::DropOrphanFragment => "drop_orphan_fragment",
            Reason::FwdForwarded => "fwd_forwarded",
            Reason::FwdDropNoRoom => "fwd_drop_no_room",
            Reason::FwdDropNoFlow => "fwd_drop_no_flow",
            Reason::DropRateLimited => "drop_rate_limited",
            Reason::DropQuotaExceeded => "drop_quota_exceeded",
            Reason::DropIpv6ExtHeader => "drop_ipv6_ext_header",
            Reason::DropIpv6Fragment => "drop_ipv6_fragment",
            Reason::DropSpoofedV6 => "drop_spoofed_v6",
            Reason::DropNoIngressFlow6 => "drop_no_ingress_flow6",
            Reason::FwdDropSourceBusy => "fwd_drop_source_busy",
        }
    }

    /// Whether packets counted under this reason were dropped.
    pub const fn is_drop(self) -> bool {
        !matches!(
            self,
            Reason::EgressForwarded
                | Reason::IngressForwarded
                | Reason::IcmpErrorForwarded
                | Reason::PassToHost
                | Reason::FwdForwarded
        )
    }

    /// The reason with this number, if there is one.
    pub const fn from_u32(n: u32) -> Option<Reason> {
        if (n as usize) < Self::ALL.len() {
            Some(Self::ALL[n as usize])
        } else {
            None
        }
    }
}

/// Slots in `VEIL_STATS`: room to add reasons without resizing the map.
pub const REASON_SLOTS: u32 = 32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_match_positions() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert_eq!(Reason::from_u32(i as u32), Some(*r));
        }
        assert!(Reason::ALL.len() as u32 <= REASON_SLOTS);
        assert_eq!(Reason::from_u32(Reason::ALL.len() as u32), None);
    }
}
