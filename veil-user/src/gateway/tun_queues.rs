//! The gateway's TUN device as several queues (`IFF_MULTI_QUEUE`), one
//! reader task each ([`super::packets::tun_reader`]).
//!
//! Every packet of a client, both ways, goes through its queue
//! ([`veil_common::steer`]): the daemon writes the client's packets on
//! it ([`TunQueues::of_client`]), and the kernel hands the replies to it
//! through veil's steering program ([`TunQueues::steer`]). A client's
//! replies are therefore read by one reader, in order, however many flows
//! it has and however long a flow was quiet; and the kernel hashes no
//! packet to choose.

use std::{io, net::Ipv4Addr, os::fd::BorrowedFd};

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

    /// Has the kernel hand each reply to its client's queue with
    /// `program` (`veil_tun_steer`). Not needed with one queue.
    pub fn steer(&self, program: BorrowedFd<'_>) -> io::Result<()> {
        self.queues[0].set_steering_program(program)
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

/// A client's queue: as the steering program has the kernel choose it.
fn queue_of(vip: Ipv4Addr, queues: usize) -> usize {
    veil_common::steer::queue_of(vip.to_bits(), queues)
}

/// The queues to create when none are asked for: one per worker of the
/// runtime the gateway runs on (`--threads`, default one per CPU), so that
/// every worker can be reading replies at once.
pub(super) fn default_queues() -> usize {
    tokio::runtime::Handle::try_current()
        .map(|h| h.metrics().num_workers())
        .unwrap_or(1)
}
