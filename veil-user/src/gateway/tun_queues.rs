//! The gateway's TUN device as several queues (`IFF_MULTI_QUEUE`), one
//! reader task each ([`super::packets::tun_reader`]).
//!
//! Which queue a packet goes through:
//! - Into the datapath (a client's packet, written by its session): the
//!   client's queue, [`TunQueues::of_client`], fixed by its address, so
//!   that every flow of one client is written on one queue.
//! - Out of it (a reply, read by a reader): the kernel chooses
//!   (`tun_select_queue`): it hashes the packet's flow (symmetric: the
//!   reply's 5-tuple hashes as the client's packet did) and looks the hash
//!   up in the device's flow table, which records the queue each flow was
//!   last written on. A reply therefore comes back on the queue of its
//!   client, read by one reader in order. That table holds 4,096 flows and
//!   forgets one not written for 3 s (a download over UDP that the client
//!   never answers); such a flow's replies go to a queue chosen by the
//!   hash alone: still one queue per flow, in order, but maybe not its
//!   client's.

use std::{io, net::Ipv4Addr};

use veil_proto::gso::VnetHdr;

use crate::tun::Tun;

/// The kernel's limit on a TUN device's queues (`MAX_TAP_QUEUES`).
pub const MAX_QUEUES: usize = 256;

pub(super) struct TunQueues {
    queues: Vec<Tun>,
}

impl TunQueues {
    /// Creates TUN device `name` with `queues` queues (capped at
    /// [`MAX_QUEUES`]; one: a plain single-queue device, as before
    /// multi-queue).
    pub fn create(name: &str, mtu: u16, queues: usize) -> io::Result<Self> {
        let queues = Tun::create_queues(name, mtu, queues.clamp(1, MAX_QUEUES))?;
        Ok(Self { queues })
    }

    pub fn name(&self) -> &str {
        self.queues[0].name()
    }

    pub fn len(&self) -> usize {
        self.queues.len()
    }

    /// Whether UDP super-packets may be written (see
    /// [`Tun::takes_udp_gso`]); every queue was set up alike.
    pub fn takes_udp_gso(&self) -> bool {
        self.queues[0].takes_udp_gso()
    }

    /// Queue `i` (`i < len()`).
    pub fn queue(&self, i: usize) -> &Tun {
        &self.queues[i]
    }

    /// The queue every packet of the client at `vip` is written on.
    pub fn of_client(&self, vip: Ipv4Addr) -> &Tun {
        &self.queues[queue_of(vip, self.queues.len())]
    }

    /// Writes a packet of the client at `vip` on its queue.
    pub fn send(&self, vip: Ipv4Addr, hdr: &VnetHdr, packet: &[u8]) -> io::Result<()> {
        self.of_client(vip).send(hdr, packet)
    }

    /// Sets the transmit queue length of the device (every queue's).
    pub fn set_queue_len(&self, packets: u32) -> io::Result<()> {
        self.queues[0].set_queue_len(packets)
    }

    /// Packets the kernel dropped because a queue was full (the device's
    /// `tx_dropped`, over every queue).
    pub fn queue_drops(&self) -> u64 {
        self.queues[0].queue_drops()
    }
}

/// A client's queue: its address modulo the queue count. Leases are
/// handed out in order, so consecutive clients take consecutive queues.
fn queue_of(vip: Ipv4Addr, queues: usize) -> usize {
    vip.to_bits() as usize % queues.max(1)
}

/// The queues to create when none are asked for: one per worker of the
/// runtime the gateway runs on (`--threads`, default one per CPU), so that
/// every worker can be reading replies at once.
pub(super) fn default_queues() -> usize {
    tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_workers())
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_clients_take_consecutive_queues_and_keep_them() {
        let vip = |last| Ipv4Addr::new(10, 77, 0, last);
        let queues: Vec<usize> = (2..10).map(|i| queue_of(vip(i), 4)).collect();
        assert_eq!(queues, [2, 3, 0, 1, 2, 3, 0, 1]);
        assert_eq!(queue_of(vip(7), 4), queue_of(vip(7), 4));
        assert_eq!(queue_of(vip(7), 1), 0);
        assert_eq!(queue_of(vip(7), 0), 0, "no division by zero");
    }
}
