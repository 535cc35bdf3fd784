//! Port forwarding: the maps of the rules (`--forward FILE`) and of the
//! connections the datapath translates for them.
//!
//! A rule says: TCP or UDP to any public address on `listen_port` goes to
//! `target_addr:target_port`. The datapath translates both addresses of
//! such a connection (as IPVS and Katran do): the remote's packet
//! `R:rp -> PUBLIC:listen` leaves toward the target as
//! `SNAT:nat_port -> T:tp`, where `SNAT` is the gateway's own address on the
//! target's side and `nat_port` one of the NAT range; the target's replies
//! `T:tp -> SNAT:nat_port` go back as `PUBLIC:listen -> R:rp`.
//!
//! Each connection is two entries of [`FWD_FLOWS_MAP`], one per direction,
//! keyed by the packet as it arrives ([`FwdKey`]) and holding what it
//! becomes ([`FwdFlow`]): each entry's translation, reversed, is the other
//! entry's key. The datapath creates them on a connection's first packet
//! (no user space per packet); the daemon expires them.
//!
//! A connection that is not yet *assured* ([`assured`]: a TCP handshake
//! not finished, UDP not answered or not kept up) also takes one of
//! [`FWD_OPENING_SLOTS`] places in [`FWD_OPENING_MAP`], chosen at random;
//! the one that held the place before goes, unless it has since become
//! assured. So a flood of connections that never complete (SYNs from
//! forged sources) holds at most that many, and the rest of the table is
//! left to connections that did, as conntrack's early drop does.

use crate::maps::{tcp_flags, FlowStats, ReverseKey};

/// The rules: [`FwdRuleKey`] -> [`FwdRule`]. Hash, written by the daemon.
pub const FWD_RULES_MAP: &str = "VEIL_FWD_RULES";
/// Forwarded connections, two entries each: [`FwdKey`] -> [`FwdFlow`].
/// Hash: the datapath inserts, the daemon expires (an LRU would evict
/// live connections under load).
pub const FWD_FLOWS_MAP: &str = "VEIL_FWD_FLOWS";
/// Per-rule counters: [`FwdRuleKey`] -> [`FwdCounters`]. Hash, the entry
/// made by the daemon with the rule, added to by the datapath.
pub const FWD_STATS_MAP: &str = "VEIL_FWD_STATS";
/// The places of connections not yet assured: index -> [`FwdOpening`].
/// Array, the datapath's alone.
pub const FWD_OPENING_MAP: &str = "VEIL_FWD_OPENING";
/// Established TCP connections each remote address holds: IPv4 address
/// -> count. LRU: the datapath adds a connection when its handshake is
/// over and takes it away when it ends, the daemon sets each count to what
/// the table holds at every expiry
/// ([`Config::fwd_per_source`](crate::Config::fwd_per_source)).
pub const FWD_SOURCES_MAP: &str = "VEIL_FWD_SOURCES";

/// The forwarding program on the interfaces targets are reached through
/// (TC ingress): the targets' replies.
pub const PROG_FWD_TC: &str = "veil_fwd_tc";

/// Most forward rules.
pub const MAX_FWD_RULES: u32 = 4096;
/// Capacity of [`FWD_FLOWS_MAP`]: two entries a connection.
pub const MAX_FWD_FLOWS: u32 = 131_072;
/// Remote addresses [`FWD_SOURCES_MAP`] tracks at once: as many as
/// connections can be open.
pub const MAX_FWD_SOURCES: u32 = MAX_FWD_FLOWS / 2;
/// Connections not yet assured at most: an eighth of the table's
/// connections, so that a flood of them leaves the rest to those that are.
pub const FWD_OPENING_SLOTS: u32 = MAX_FWD_FLOWS / 2 / 8;
/// How long after its first datagram the remote must still be sending,
/// the target having answered, before UDP is assured (conntrack's
/// "stream" UDP): one datagram and its answer is a lookup, and a forged
/// source can get that far (sending twice, 2 s apart, it gets further:
/// UDP cannot tell).
pub const UDP_ASSURED_AFTER_NS: u64 = 2_000_000_000;
/// How long a connection not assured must have carried nothing either way
/// before its NAT port may go to another: the target's late answers on
/// that port would reach whoever has it next.
pub const FWD_IDLE_BEFORE_TAKEN_NS: u64 = 1_000_000_000;

/// Which packets a rule takes: the protocol and the port on the public
/// addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FwdRuleKey {
    pub listen_port: u16,
    /// [`crate::proto::TCP`] or [`crate::proto::UDP`].
    pub proto: u8,
    pub _pad: u8,
}

impl FwdRuleKey {
    pub const fn new(proto: u8, listen_port: u16) -> Self {
        Self {
            listen_port,
            proto,
            _pad: 0,
        }
    }
}

/// Where a rule sends its connections.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwdRule {
    pub target_addr: [u8; 4],
    /// The gateway's own address toward the target: the connections'
    /// source there, so that the replies come back through the gateway.
    pub snat_addr: [u8; 4],
    /// The interface the target is reached through.
    pub ifindex: u32,
    pub target_port: u16,
    pub _pad: [u8; 2],
}

/// A packet of a forwarded connection as it arrives: the key of one
/// direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FwdKey {
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FwdKey {
    /// The client flow's key ([`crate::REVERSE_MAP`]) that a packet with
    /// this key would also match: a target's reply to a NAT port on the
    /// gateway's address, and a remote's reply to a client's flow, look
    /// alike. The two never both exist: whichever side takes a NAT port
    /// makes its entry, then gives the port back if the other's is there.
    pub const fn as_client_flow(&self) -> ReverseKey {
        ReverseKey {
            remote_addr: self.src_addr,
            public_addr: self.dst_addr,
            remote_port: self.src_port,
            nat_port: self.dst_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

impl ReverseKey {
    /// The forwarded connection's reply key that would take this client
    /// flow's replies ([`FwdKey::as_client_flow`], the other way).
    pub const fn as_forwarded_reply(&self) -> FwdKey {
        FwdKey {
            src_addr: self.remote_addr,
            dst_addr: self.public_addr,
            src_port: self.remote_port,
            dst_port: self.nat_port,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// What one direction of a forwarded connection becomes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwdFlow {
    /// This direction's packets, as the datapath counted them.
    pub stats: FlowStats,
    /// `bpf_ktime_get_ns()` when the connection was made.
    pub created_ns: u64,
    pub src_addr: [u8; 4],
    pub dst_addr: [u8; 4],
    pub src_port: u16,
    pub dst_port: u16,
    /// Where the translated packet leaves.
    pub ifindex: u32,
    /// The rule the connection was made for (its counters).
    pub rule: FwdRuleKey,
    /// [`fwd_dir`]: which way this entry translates.
    pub dir: u16,
    /// TCP, 16 bits of what the target acknowledged or will (the entry
    /// stays 64 bytes, and the datapath's stack holds two; 0: nothing
    /// yet). Reply entries: [`acked_of`] the acknowledgment number of the
    /// target's last packet, the sequence number it expects next from the
    /// remote: a remote's RST or FIN far from it is no proof of an end
    /// ([`rst_plausible`]). Inbound entries: [`handshake_mark`] the
    /// target's SYN-ACK sequence number + 1, which the remote's handshake
    /// ACK must acknowledge (whole: [`handshake_ack`]): a forged source
    /// never saw it; from that ACK
    /// on, [`acked_of`] the remote's acknowledgment number, which the
    /// target's own RST or FIN must be near (its address can be forged
    /// too).
    pub acked: u16,
}

impl FwdFlow {
    /// The key of the other direction's entry: the translated packet's
    /// answer.
    pub const fn partner(&self) -> FwdKey {
        FwdKey {
            src_addr: self.dst_addr,
            dst_addr: self.src_addr,
            src_port: self.dst_port,
            dst_port: self.src_port,
            proto: self.rule.proto,
            _pad: [0; 3],
        }
    }
}

/// Whether a connection, from its two entries, has shown that the remote
/// is real: TCP whose handshake is over (and was not reset), UDP the
/// target answered and the remote went on with for
/// [`UDP_ASSURED_AFTER_NS`].
pub const fn assured(inbound: &FwdFlow, reply: &FwdFlow) -> bool {
    let (out, back) = (inbound.stats.tcp_flags, reply.stats.tcp_flags);
    if inbound.rule.proto == crate::proto::TCP {
        tcp_flags::handshake_done(out, back) && (out | back) & tcp_flags::RST == 0
    } else {
        reply.stats.packets != 0
            && inbound.stats.last_seen_ns >= inbound.created_ns + UDP_ASSURED_AFTER_NS
    }
}

/// Whether a connection not assured may give its NAT port to a newer one
/// at `now_ns` (a flood of them must not keep everyone else out), without
/// the target's packets for it going to the newer one's remote (the reply
/// key, target to NAT port, stays the same): a TCP connection whose
/// remote has not completed its handshake, since the target sends it
/// nothing but its SYN-ACK until then, or any connection that has carried
/// nothing either way for [`FWD_IDLE_BEFORE_TAKEN_NS`].
pub const fn may_take(inbound: &FwdFlow, reply: &FwdFlow, now_ns: u64) -> bool {
    if inbound.rule.proto == crate::proto::TCP && inbound.stats.tcp_flags & tcp_flags::ACK == 0 {
        return true;
    }
    idle_since(reply, now_ns) && idle_since(inbound, now_ns)
}

/// Whether `entry` has seen no packet (nor been made) within
/// [`FWD_IDLE_BEFORE_TAKEN_NS`] of `now_ns`.
pub const fn idle_since(entry: &FwdFlow, now_ns: u64) -> bool {
    let last = if entry.stats.last_seen_ns > entry.created_ns {
        entry.stats.last_seen_ns
    } else {
        entry.created_ns
    };
    now_ns.saturating_sub(last) > FWD_IDLE_BEFORE_TAKEN_NS
}

/// Whether a TCP connection is over, from the flags each way: reset, or
/// closed both ways. (A UDP connection is over only when it expires.)
pub const fn tcp_over(out: u64, back: u64) -> bool {
    (out | back) & tcp_flags::RST != 0 || out & back & tcp_flags::FIN != 0
}

/// Whether a forwarded TCP connection counts against its remote's share
/// (`--max-forward-per-source`), from its inbound (`out`) and reply
/// (`back`) entries' flags: from the remote's handshake ACK, the one that
/// proves it owns its address (the datapath records that ACK only then),
/// until the connection is over. The datapath counts a connection as
/// this turns true and false; the daemon's recount is this, connection
/// by connection.
pub const fn holds_share(out: u64, back: u64) -> bool {
    out & tcp_flags::ACK != 0 && !tcp_over(out, back)
}

/// A connection's place among those not yet assured: its inbound entry's
/// key, and when it was made (a later connection on the same key is
/// another one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwdOpening {
    pub key: FwdKey,
    pub created_ns: u64,
}

/// How far from what one end acknowledged the other's RST (or FIN) may be
/// and still count as the connection's end, in units of 64 KiB (16 MiB):
/// the data the sender may have in flight. A blind attacker who guessed
/// the connection's ports must also land within it, one chance in 256 per
/// try, where without it any RST would do; the receiving end itself
/// checks far more strictly (RFC 5961). Forwarded connections and
/// clients' flows alike.
pub const RST_WINDOW: u16 = 256;

/// What [`FwdFlow::acked`] and [`crate::EgressFlow::acked`] keep of an
/// acknowledgment number.
pub const fn acked_of(ack: u32) -> u16 {
    (ack >> 16) as u16
}

/// What [`FwdFlow::acked`] of an inbound entry keeps of the
/// acknowledgment the handshake's last ACK must carry: its low 16 bits,
/// never 0 (nothing seen). The whole number is checked too
/// ([`handshake_ack`]): a blind guess matches one time in 2^32.
pub const fn handshake_mark(ack: u32) -> u16 {
    ack as u16 | 1
}

/// The acknowledgment number a forwarded connection's handshake ACK must
/// carry, whole, as its inbound entry keeps it: in the high half of the
/// entry's `stats.tcp_flags`, where the datapath notes the latest
/// SYN-ACK's sequence number + 1 from the target (the low half holds the
/// flags; 0: no SYN-ACK seen, or one numbered 0xffff_ffff). With
/// [`handshake_mark`]'s 16 bits alone, a blind guess would match one time
/// in 32,768.
pub const fn handshake_ack(tcp_flags: u64) -> u32 {
    (tcp_flags >> 32) as u32
}

/// Whether an RST (or FIN) with sequence number `seq` may be the end of a
/// connection whose other end last acknowledged `acked` ([`acked_of`]; 0:
/// nothing yet, or too early to tell: any RST may be).
pub const fn rst_plausible(seq: u32, acked: u16) -> bool {
    acked == 0
        || acked_of(seq)
            .wrapping_sub(acked)
            .wrapping_add(RST_WINDOW / 2)
            <= RST_WINDOW
}

/// The TCP flags a packet counts with: an RST or FIN that is no proof of
/// an end ([`rst_plausible`] of its `seq` against what the other end
/// `acked`) is left out. The packet itself still goes on, for the
/// receiving stack to judge.
pub const fn counted_flags(flags: u64, seq: u32, acked: u16) -> u64 {
    let ends = tcp_flags::RST | tcp_flags::FIN;
    if flags & ends != 0 && !rst_plausible(seq, acked) {
        flags & !ends
    } else {
        flags
    }
}

/// Which way an [`FwdFlow`] entry translates.
pub mod fwd_dir {
    /// From the remote to the target.
    pub const INBOUND: u16 = 1;
    /// From the target back to the remote.
    pub const REPLY: u16 = 2;
}

/// One rule's tally, added to atomically from every CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FwdCounters {
    pub connections: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Connections ended unassured to make room for newer ones.
    pub evicted: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: repr(C), integers and byte arrays, every padding byte an
    // explicit field.
    unsafe impl aya::Pod for super::FwdRuleKey {}
    unsafe impl aya::Pod for super::FwdRule {}
    unsafe impl aya::Pod for super::FwdKey {}
    unsafe impl aya::Pod for super::FwdFlow {}
    unsafe impl aya::Pod for super::FwdCounters {}
    unsafe impl aya::Pod for super::FwdOpening {}
}

const _: () = {
    assert!(size_of::<FwdRuleKey>() == 4);
    assert!(size_of::<FwdRule>() == 16);
    assert!(size_of::<FwdKey>() == 16);
    assert!(size_of::<FwdFlow>() == 64);
    assert!(size_of::<FwdCounters>() == 32);
    assert!(size_of::<FwdOpening>() == 24);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_key_and_a_client_flow_key_name_the_same_packets() {
        let reply = FwdKey {
            src_addr: [198, 18, 0, 2],
            dst_addr: [198, 18, 0, 1],
            src_port: 443,
            dst_port: 61000,
            proto: crate::proto::UDP,
            _pad: [0; 3],
        };
        let flow = reply.as_client_flow();
        assert_eq!(
            (
                flow.remote_addr,
                flow.public_addr,
                flow.remote_port,
                flow.nat_port
            ),
            ([198, 18, 0, 2], [198, 18, 0, 1], 443, 61000)
        );
        assert_eq!(flow.as_forwarded_reply(), reply);
    }

    #[test]
    fn each_entry_names_its_partner() {
        let flow = FwdFlow {
            src_addr: [10, 200, 9, 1],
            dst_addr: [10, 200, 9, 2],
            src_port: 61000,
            dst_port: 8080,
            rule: FwdRuleKey::new(crate::proto::TCP, 80),
            ..Default::default()
        };
        assert_eq!(
            flow.partner(),
            FwdKey {
                src_addr: [10, 200, 9, 2],
                dst_addr: [10, 200, 9, 1],
                src_port: 8080,
                dst_port: 61000,
                proto: crate::proto::TCP,
                _pad: [0; 3],
            }
        );
    }

    #[test]
    fn a_tcp_connection_is_over_when_reset_or_closed_both_ways() {
        use tcp_flags::{ACK, FIN, RST, SYN};
        assert!(!tcp_over(SYN | ACK, SYN | ACK));
        assert!(!tcp_over(SYN | ACK | FIN, SYN | ACK), "half closed");
        assert!(tcp_over(SYN | ACK | FIN, SYN | ACK | FIN));
        assert!(tcp_over(SYN, RST));
        assert!(tcp_over(SYN | ACK | RST, SYN | ACK));
        // A share is held from the remote's ACK until the end.
        assert!(!holds_share(SYN, SYN | ACK), "handshake not over");
        assert!(holds_share(SYN | ACK, SYN | ACK));
        assert!(holds_share(SYN | ACK | FIN, SYN | ACK), "half closed");
        assert!(!holds_share(SYN | ACK | FIN, SYN | ACK | FIN));
        assert!(!holds_share(SYN | ACK, SYN | ACK | RST));
        // An inbound entry's high half (the handshake's acknowledgment
        // number) is no flag.
        let noted = 0xffff_ffffu64 << 32;
        assert!(!tcp_over(noted | SYN | ACK, SYN | ACK));
        assert!(tcp_over(noted | SYN | ACK | FIN, SYN | ACK | FIN));
        assert_eq!(handshake_ack(noted | SYN), 0xffff_ffff);
        assert!(tcp_flags::handshake_done(noted | SYN | ACK, SYN | ACK));
        assert!(!tcp_flags::handshake_done(noted | SYN, SYN | ACK));
    }

    fn connection(proto: u8, out: u64, back: u64) -> (FwdFlow, FwdFlow) {
        let entry = |tcp_flags, dir| FwdFlow {
            stats: FlowStats {
                tcp_flags,
                ..Default::default()
            },
            created_ns: 1_000,
            rule: FwdRuleKey::new(proto, 80),
            dir,
            ..Default::default()
        };
        (entry(out, fwd_dir::INBOUND), entry(back, fwd_dir::REPLY))
    }

    #[test]
    fn tcp_is_assured_once_the_opener_acknowledges_and_not_after_a_reset() {
        use tcp_flags::{ACK, FIN, RST, SYN};
        let tcp = |out, back| {
            let (inbound, reply) = connection(crate::proto::TCP, out, back);
            assured(&inbound, &reply)
        };
        assert!(!tcp(SYN, 0), "a SYN");
        assert!(!tcp(SYN, SYN | ACK), "answered, never acknowledged");
        assert!(!tcp(SYN | ACK, ACK), "an ACK to no SYN");
        assert!(tcp(SYN | ACK, SYN | ACK), "the handshake");
        assert!(
            tcp(SYN | ACK | FIN, SYN | ACK),
            "half closed: still carries data"
        );
        assert!(!tcp(SYN | ACK, SYN | ACK | RST), "reset");
    }

    #[test]
    fn udp_is_assured_when_answered_and_kept_up() {
        let (mut inbound, mut reply) = connection(crate::proto::UDP, 0, 0);
        inbound.stats.last_seen_ns = inbound.created_ns + UDP_ASSURED_AFTER_NS;
        assert!(!assured(&inbound, &reply), "never answered");
        reply.stats.packets = 1;
        assert!(assured(&inbound, &reply));
        inbound.stats.last_seen_ns = inbound.created_ns + 1;
        assert!(!assured(&inbound, &reply), "one question and its answer");
    }

    #[test]
    fn an_rst_counts_only_near_what_the_target_acknowledged() {
        let acked = acked_of(0x1234_5678);
        assert!(rst_plausible(12345, 0), "nothing acknowledged yet");
        assert!(rst_plausible(0x1234_5678, acked));
        assert!(rst_plausible(0x1234_5678 + (1 << 23), acked), "in flight");
        assert!(rst_plausible(0x1234_5678 - (1 << 23), acked), "behind");
        assert!(!rst_plausible(0x1234_5678 + (1 << 24), acked));
        assert!(!rst_plausible(0x9234_5678, acked), "a blind guess");
        assert!(rst_plausible(5, acked_of(u32::MAX - 5)), "across the wrap");
    }
}
