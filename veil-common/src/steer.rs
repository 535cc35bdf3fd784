//! Which queue of the gateway's multi-queue TUN device carries a client's
//! packets and its replies: the client's own, from its IPv4 address, on
//! both sides. The daemon writes a client's packets on it; the kernel hands
//! the replies to it through veil's steering program (`veil_tun_steer`,
//! `TUNSETSTEERINGEBPF`), whose answer is the client's address.
//!
//! Without a steering program the kernel hashes every packet written and
//! every reply (`tun_automq_select_queue`) and looks the hash up in a
//! table that holds 4,096 flows and forgets a flow after 3 s: beyond that
//! a reply goes to a queue chosen by its hash, maybe not its client's.

// A kernel series under review (2025) would have an answer of -1 fall back
// to the kernel's hashing: only 255.255.255.255 (or an IPv6 destination
// ending in ffff:ffff) answers that, and no client has such an address.

/// The queue of the client at `vip` (its IPv4 address's bits) among
/// `queues`. The kernel keeps the low 16 bits of the steering program's
/// answer (`tun_ebpf_select_queue` returns a `u16`) and takes them modulo
/// the queue count: the same arithmetic here. Leases are handed out in
/// order, so consecutive clients take consecutive queues.
pub const fn queue_of(vip: u32, queues: usize) -> usize {
    let queues = if queues == 0 { 1 } else { queues };
    (vip as u16) as usize % queues
}

/// Where a reply holds its client's IPv4 address: an IPv4 packet's
/// destination.
pub const V4_CLIENT_AT: usize = 16;

/// An IPv6 reply's destination ends with its client's IPv4 address: the
/// pool's low 32 bits are the client's lease (`--pool6`).
pub const V6_CLIENT_AT: usize = 36;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_clients_take_consecutive_queues_and_keep_them() {
        let vip = |last: u32| 0x0a4d_0000 | last;
        let queues: [usize; 8] = core::array::from_fn(|i| queue_of(vip(i as u32 + 2), 4));
        assert_eq!(queues, [2, 3, 0, 1, 2, 3, 0, 1]);
        assert_eq!(queue_of(vip(7), 1), 0);
        assert_eq!(queue_of(vip(7), 0), 0, "no division by zero");
        // Only the low 16 bits count, as in the kernel: 10.77.1.0 is
        // 0x0100 = 256, not 0x0a4d0100.
        assert_eq!(queue_of(0x0a4d_0100, 3), 256 % 3);
    }
}
