//! Buffers for the largest replies, used again rather than freed. A reply
//! is copied off the TUN device's read buffer into a buffer of its own, to
//! wait in its client's queue. With the allocator's mmap threshold fixed
//! at 64 KiB ([`super::trim`]), every super-packet's copy was pages mapped,
//! faulted in as the copy wrote them and unmapped once sent: 13–95 page
//! faults per MB downloaded, 6 % of the gateway's time. A few dozen such
//! buffers, kept, serve a download at any rate.

use std::sync::Mutex;

use veil_proto::gso::VNET_HDR_LEN;

/// A reply this long or longer gets a kept buffer: shorter ones come from
/// the allocator's arenas, which reuse memory anyway. Near the capacity, so
/// that a kept buffer holds little more than the queue counts for it.
const LARGE: usize = 60 * 1024;

/// Every kept buffer's capacity: an offload header and the largest packet.
const CAPACITY: usize = VNET_HDR_LEN + 65_535;

/// Buffers kept at most (4 MiB): a client's reply queue holds 4 MiB by
/// default, so one download's worth. A buffer holds at most 7 % more than
/// its reply, which is what a client's queue counts.
const KEPT: usize = 64;

#[derive(Default)]
pub(super) struct BigBuffers {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BigBuffers {
    /// `bytes`, copied into a buffer of its own: a kept one if it is large.
    pub(super) fn copy_of(&self, bytes: &[u8]) -> Vec<u8> {
        if bytes.len() < LARGE || bytes.len() > CAPACITY {
            return bytes.to_vec();
        }
        let kept = self.free.lock().expect("big buffers lock").pop();
        let mut buf = kept.unwrap_or_else(|| Vec::with_capacity(CAPACITY));
        buf.extend_from_slice(bytes);
        buf
    }

    /// A reply's buffer, done with: kept if it is one of ours and there
    /// is room.
    pub(super) fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() != CAPACITY {
            return;
        }
        let mut free = self.free.lock().expect("big buffers lock");
        if free.len() < KEPT {
            buf.clear();
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_replies_reuse_a_kept_buffer_and_small_ones_do_not() {
        let pool = BigBuffers::default();
        let big = vec![7u8; 64_000];
        let first = pool.copy_of(&big);
        assert_eq!(first, big);
        let at = first.as_ptr();
        pool.give_back(first);
        let again = pool.copy_of(&[9u8; 62_000]);
        assert_eq!(again.as_ptr(), at, "the same buffer");
        assert_eq!(again, vec![9u8; 62_000], "holding only the new bytes");
        let small = pool.copy_of(b"tiny");
        assert_eq!(small.capacity(), 4);
        pool.give_back(small);
        assert!(pool.free.lock().unwrap().is_empty(), "not kept");
    }

    #[test]
    fn no_more_than_kept_are_kept() {
        let pool = BigBuffers::default();
        let bufs: Vec<_> = (0..KEPT + 5).map(|_| pool.copy_of(&[1u8; LARGE])).collect();
        for buf in bufs {
            pool.give_back(buf);
        }
        assert_eq!(pool.free.lock().unwrap().len(), KEPT);
    }
}
