//! The replies waiting for one client, bounded in bytes.
//!
//! The TUN reader must never wait for a session (one slow client would
//! stall every other), so it drops what does not fit. Counting packets is
//! not enough of a bound: with offload one packet is up to 64 KiB, and a
//! queue of a thousand of them was 64 MiB per client that stopped reading.

use std::sync::{
    atomic::{AtomicUsize, Ordering::Relaxed},
    Arc,
};

use tokio::sync::mpsc;

/// Packets in one queue at most, whatever their size: a flood of tiny ones
/// is bounded too.
const MAX_PACKETS: usize = 4096;

/// Why a reply was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The client's queue holds its byte or packet limit already.
    Full,
    /// The session is gone.
    Closed,
}

/// A reply that was not queued, given back (its buffer may be reused).
#[derive(Debug)]
pub struct Refused {
    pub why: Dropped,
    pub packet: Vec<u8>,
}

/// The TUN reader's end.
#[derive(Clone, Debug)]
pub struct ReplySender {
    tx: mpsc::Sender<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

/// The session's end.
#[derive(Debug)]
pub struct ReplyReceiver {
    rx: mpsc::Receiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
}

/// A queue holding at most `limit` bytes of packets.
pub fn reply_queue(limit: usize) -> (ReplySender, ReplyReceiver) {
    let (tx, rx) = mpsc::channel(MAX_PACKETS);
    let queued = Arc::new(AtomicUsize::new(0));
    (
        ReplySender {
            tx,
            queued: queued.clone(),
            limit,
        },
        ReplyReceiver { rx, queued },
    )
}

impl ReplySender {
    /// Queues `packet` unless that would pass the limit.
    pub fn push(&self, packet: Vec<u8>) -> Result<(), Refused> {
        let len = packet.len();
        // Reserve first: two pushers never both take the last room.
        let before = self.queued.fetch_add(len, Relaxed);
        if before + len > self.limit {
            self.queued.fetch_sub(len, Relaxed);
            return Err(Refused {
                why: Dropped::Full,
                packet,
            });
        }
        self.tx.try_send(packet).map_err(|e| {
            self.queued.fetch_sub(len, Relaxed);
            match e {
                mpsc::error::TrySendError::Full(packet) => Refused {
                    why: Dropped::Full,
                    packet,
                },
                mpsc::error::TrySendError::Closed(packet) => Refused {
                    why: Dropped::Closed,
                    packet,
                },
            }
        })
    }

    /// Bytes waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queued.load(Relaxed)
    }
}

impl ReplyReceiver {
    /// The next packet; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        let packet = self.rx.recv().await?;
        self.queued.fetch_sub(packet.len(), Relaxed);
        Some(packet)
    }

    /// The next packet if one is waiting.
    pub fn try_recv(&mut self) -> Option<Vec<u8>> {
        let packet = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(packet.len(), Relaxed);
        Some(packet)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_are_bounded_and_room_returns_as_packets_leave() {
        let (tx, mut rx) = reply_queue(10_000);
        for _ in 0..3 {
            tx.push(vec![0; 3000]).unwrap();
        }
        assert_eq!(
            tx.push(vec![0; 3000]).map_err(|r| r.why),
            Err(Dropped::Full)
        );
        tx.push(vec![0; 1000]).unwrap();
        assert_eq!(tx.queued(), 10_000);
        assert_eq!(tx.push(vec![0]).map_err(|r| r.why), Err(Dropped::Full));
        assert_eq!(rx.recv().await.unwrap().len(), 3000);
        tx.push(vec![0; 3000]).unwrap();
        assert_eq!(tx.queued(), 10_000);
    }

    #[tokio::test]
    async fn tiny_packets_are_bounded_by_count() {
        let (tx, mut rx) = reply_queue(usize::MAX / 2);
        for _ in 0..MAX_PACKETS {
            tx.push(vec![1]).unwrap();
        }
        assert_eq!(tx.push(vec![1]).map_err(|r| r.why), Err(Dropped::Full));
        assert_eq!(tx.queued(), MAX_PACKETS, "a refused packet is not counted");
        assert!(rx.try_recv().is_some());
        tx.push(vec![1]).unwrap();
    }

    #[test]
    fn a_closed_session_is_told_apart_from_a_full_one() {
        let (tx, rx) = reply_queue(100);
        drop(rx);
        assert_eq!(
            tx.push(vec![0; 10]).map_err(|r| r.why),
            Err(Dropped::Closed)
        );
        assert_eq!(tx.queued(), 0);
    }
}
