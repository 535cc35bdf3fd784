//! The replies waiting for one client, bounded in bytes.
//!
//! The TUN reader must never wait for a session (one slow client would
//! stall every other), so it drops what does not fit. Counting packets is
//! not enough of a bound: with offload one packet is up to 64 KiB, and a
//! queue of a thousand of them was 64 MiB per client that stopped reading.
//!
//! An entry is [`Replies`]: every reply a batch of TUN reads had for the
//! client, in one buffer. A reply then costs neither an allocation nor a
//! channel operation of its own, which without GRO on the WAN (one read
//! per MTU-sized packet) was a tenth of the gateway's time.

use std::sync::{
    atomic::{AtomicUsize, Ordering::Relaxed},
    Arc,
};

use tokio::sync::mpsc;

/// Entries in one queue at most, whatever their size: a flood of tiny ones
/// is bounded too.
const MAX_ENTRIES: usize = 4096;

/// Bytes before each reply in [`Replies`]: its length.
pub const REPLY_PREFIX: usize = 4;

/// Replies for one client, in order: each an offload header and its packet
/// ("joined", as the TUN device gives them), after its length
/// ([`REPLY_PREFIX`] bytes, native order). Only this module writes the
/// lengths, so reading them back needs no checks beyond staying in bounds.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replies {
    bytes: Vec<u8>,
}

impl Replies {
    /// No replies yet, with room for `bytes` of them (prefixes included).
    pub fn with_capacity(bytes: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
        }
    }

    /// One reply, copied.
    pub fn one(joined: &[u8]) -> Self {
        let mut replies = Self::with_capacity(REPLY_PREFIX + joined.len());
        replies.push(&[joined]);
        replies
    }

    /// The reply a read left in `buf[REPLY_PREFIX..REPLY_PREFIX + n]`, in
    /// that buffer: a large one is not copied.
    pub fn in_place(mut buf: Vec<u8>, n: usize) -> Self {
        buf.truncate(REPLY_PREFIX + n);
        buf[..REPLY_PREFIX].copy_from_slice(&prefix(n));
        Self { bytes: buf }
    }

    /// Appends a reply made of `parts`, and gives its bytes back to be
    /// finished in place.
    pub fn push(&mut self, parts: &[&[u8]]) -> &mut [u8] {
        let len = parts.iter().map(|p| p.len()).sum();
        self.bytes.extend_from_slice(&prefix(len));
        let start = self.bytes.len();
        for part in parts {
            self.bytes.extend_from_slice(part);
        }
        &mut self.bytes[start..]
    }

    /// Whether a reply of `len` bytes fits without growing the buffer.
    pub fn has_room(&self, len: usize) -> bool {
        self.bytes.capacity() - self.bytes.len() >= REPLY_PREFIX + len
    }

    /// Bytes held, prefixes included: what the queue counts.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// No reply in it.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// How many replies.
    pub fn count(&self) -> u64 {
        self.iter().count() as u64
    }

    /// The replies, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = self.bytes.as_slice();
        std::iter::from_fn(move || {
            let (len, after) = rest.split_first_chunk::<REPLY_PREFIX>()?;
            let len = u32::from_ne_bytes(*len) as usize;
            let reply = after.get(..len)?;
            rest = &after[len..];
            Some(reply)
        })
    }

    /// Gives back memory a small batch did not use, so that what waits in
    /// a queue is about what the queue counts.
    pub fn trim(&mut self) {
        if self.bytes.capacity() > 2 * self.bytes.len() {
            self.bytes.shrink_to_fit();
        }
    }

    /// The buffer, done with (to be kept for reads, or freed).
    pub fn into_buffer(self) -> Vec<u8> {
        self.bytes
    }
}

fn prefix(len: usize) -> [u8; REPLY_PREFIX] {
    // A reply is at most a TUN read (64 KiB and a header).
    u32::try_from(len)
        .expect("a reply fits a u32")
        .to_ne_bytes()
}

/// Why replies were not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Dropped {
    /// The client's queue holds its byte or entry limit already.
    Full,
    /// The session is gone.
    Closed,
}

/// Replies that were not queued, given back (their buffer may be reused).
#[derive(Debug)]
pub struct Refused {
    pub why: Dropped,
    pub replies: Replies,
}

/// The TUN reader's end.
#[derive(Clone, Debug)]
pub struct ReplySender {
    tx: mpsc::Sender<Replies>,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

/// The session's end.
#[derive(Debug)]
pub struct ReplyReceiver {
    rx: mpsc::Receiver<Replies>,
    queued: Arc<AtomicUsize>,
}

/// A queue holding at most `limit` bytes of replies.
pub fn reply_queue(limit: usize) -> (ReplySender, ReplyReceiver) {
    let (tx, rx) = mpsc::channel(MAX_ENTRIES);
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
    /// Queues `replies` unless that would pass the limit.
    pub fn push(&self, replies: Replies) -> Result<(), Refused> {
        let len = replies.len();
        // Reserve first: two pushers never both take the last room.
        let before = self.queued.fetch_add(len, Relaxed);
        if before + len > self.limit {
            self.queued.fetch_sub(len, Relaxed);
            return Err(Refused {
                why: Dropped::Full,
                replies,
            });
        }
        self.tx.try_send(replies).map_err(|e| {
            self.queued.fetch_sub(len, Relaxed);
            match e {
                mpsc::error::TrySendError::Full(replies) => Refused {
                    why: Dropped::Full,
                    replies,
                },
                mpsc::error::TrySendError::Closed(replies) => Refused {
                    why: Dropped::Closed,
                    replies,
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
    /// The next entry; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<Replies> {
        let replies = self.rx.recv().await?;
        self.queued.fetch_sub(replies.len(), Relaxed);
        Some(replies)
    }

    /// The next entry if one is waiting.
    pub fn try_recv(&mut self) -> Option<Replies> {
        let replies = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(replies.len(), Relaxed);
        Some(replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One reply, `len` bytes with its prefix.
    fn entry(len: usize) -> Replies {
        Replies::one(&vec![0; len - REPLY_PREFIX])
    }

    #[tokio::test]
    async fn bytes_are_bounded_and_room_returns_as_entries_leave() {
        let (tx, mut rx) = reply_queue(10_000);
        for _ in 0..3 {
            tx.push(entry(3000)).unwrap();
        }
        assert_eq!(tx.push(entry(3000)).map_err(|r| r.why), Err(Dropped::Full));
        tx.push(entry(1000)).unwrap();
        assert_eq!(tx.queued(), 10_000);
        assert_eq!(tx.push(entry(5)).map_err(|r| r.why), Err(Dropped::Full));
        assert_eq!(rx.recv().await.unwrap().len(), 3000);
        tx.push(entry(3000)).unwrap();
        assert_eq!(tx.queued(), 10_000);
    }

    #[tokio::test]
    async fn tiny_entries_are_bounded_by_count() {
        let (tx, mut rx) = reply_queue(usize::MAX / 2);
        for _ in 0..MAX_ENTRIES {
            tx.push(entry(5)).unwrap();
        }
        assert_eq!(tx.push(entry(5)).map_err(|r| r.why), Err(Dropped::Full));
        assert_eq!(
            tx.queued(),
            5 * MAX_ENTRIES,
            "a refused entry is not counted"
        );
        assert!(rx.try_recv().is_some());
        tx.push(entry(5)).unwrap();
    }

    #[test]
    fn a_closed_session_is_told_apart_from_a_full_one() {
        let (tx, rx) = reply_queue(100);
        drop(rx);
        assert_eq!(tx.push(entry(10)).map_err(|r| r.why), Err(Dropped::Closed));
        assert_eq!(tx.queued(), 0);
    }

    #[test]
    fn replies_come_back_in_order_and_whole() {
        let mut replies = Replies::with_capacity(64);
        assert!(replies.is_empty());
        replies.push(&[b"ab", b"cd"]);
        replies.push(&[b""]);
        replies.push(&[b"xyz"])[0] = b'X';
        let got: Vec<&[u8]> = replies.iter().collect();
        assert_eq!(got, [&b"abcd"[..], b"", b"Xyz"]);
        assert_eq!(replies.count(), 3);
        assert_eq!(replies.len(), 3 * REPLY_PREFIX + 7);
    }

    #[test]
    fn a_reply_read_behind_its_prefix_is_not_copied() {
        let mut buf = vec![0u8; 100];
        buf[REPLY_PREFIX..REPLY_PREFIX + 5].copy_from_slice(b"hello");
        let at = buf.as_ptr();
        let replies = Replies::in_place(buf, 5);
        assert_eq!(replies.iter().collect::<Vec<_>>(), [b"hello"]);
        let buf = replies.into_buffer();
        assert_eq!(buf.as_ptr(), at);
    }

    #[test]
    fn room_is_what_the_buffer_holds_without_growing() {
        let mut replies = Replies::with_capacity(2 * REPLY_PREFIX + 10);
        assert!(replies.has_room(REPLY_PREFIX + 10));
        assert!(!replies.has_room(REPLY_PREFIX + 11));
        replies.push(&[&[1; 6]]);
        assert!(replies.has_room(4));
        assert!(!replies.has_room(5));
    }

    #[test]
    fn a_lone_small_reply_does_not_keep_a_large_buffer() {
        let mut replies = Replies::with_capacity(32 * 1024);
        replies.push(&[&[1; 100]]);
        replies.trim();
        let buf = replies.into_buffer();
        assert!(buf.capacity() < 1024);
    }
}
