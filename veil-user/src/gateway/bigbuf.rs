//! Buffers for the largest replies, used again rather than freed. The TUN
//! reader reads into one; a large reply leaves in it for its client's
//! queue, and a kept buffer takes its place. With the allocator's mmap
//! threshold fixed at 64 KiB ([`super::trim`]), a fresh buffer per
//! super-packet was pages mapped, faulted in as they were written and
//! unmapped once sent: 13–95 page faults per MB downloaded, 6 % of the
//! gateway's time. A few dozen such buffers, kept, serve a download at any
//! rate, and a large reply is not copied at all.

use std::sync::Mutex;

use veil_tunnel::tun::MAX_READ;

use crate::queue::{Replies, REPLY_PREFIX};

/// A reply this long or longer leaves in the read buffer: shorter ones are
/// copied into their client's batch ([`Replies`]). Near the capacity, so
/// that a kept buffer holds little more than the queue counts for it.
const LARGE: usize = 60 * 1024;

/// Every kept buffer's capacity, and its length while it waits: the
/// largest read, behind the length a queue entry starts with.
const CAPACITY: usize = REPLY_PREFIX + MAX_READ;

/// Buffers kept at most (4 MiB): a client's reply queue holds 4 MiB by
/// default, so one download's worth. A buffer holds at most 7 % more than
/// its reply, which is what a client's queue counts.
const KEPT: usize = 64;

#[derive(Default)]
pub(super) struct BigBuffers {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BigBuffers {
    /// A buffer to read a reply into, [`CAPACITY`] bytes long; the read
    /// goes to [`read_area`].
    pub(super) fn read_buffer(&self) -> Vec<u8> {
        let kept = self.free.lock().expect("big buffers lock").pop();
        kept.unwrap_or_else(|| vec![0; CAPACITY])
    }

    /// A large reply in `buf` (read into its [`read_area`], `n` bytes) as
    /// a queue entry of its own, and another buffer in `buf` for the next
    /// read; `None` for a small one, which the caller copies.
    pub(super) fn take(&self, buf: &mut Vec<u8>, n: usize) -> Option<Replies> {
        if n < LARGE || buf.capacity() != CAPACITY {
            return None;
        }
        let reply = std::mem::replace(buf, self.read_buffer());
        Some(Replies::in_place(reply, n))
    }

    /// A reply's buffer, done with: kept if it is one of ours and there
    /// is room.
    pub(super) fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() != CAPACITY {
            return;
        }
        let mut free = self.free.lock().expect("big buffers lock");
        if free.len() < KEPT {
            // Back to a read buffer's length: at most the few KiB past a
            // large reply are written.
            buf.resize(CAPACITY, 0);
            free.push(buf);
        }
    }
}

/// Where a read into `buf` goes: behind the room for a queue entry's
/// length, so that a large reply is an entry without a copy.
pub(super) fn read_area(buf: &mut [u8]) -> &mut [u8] {
    &mut buf[REPLY_PREFIX..]
}

/// The reply a read of `n` bytes left in `buf`.
pub(super) fn read_reply(buf: &[u8], n: usize) -> &[u8] {
    &buf[REPLY_PREFIX..REPLY_PREFIX + n]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_reply_leaves_in_the_read_buffer_and_a_small_one_stays() {
        let pool = BigBuffers::default();
        let mut buf = pool.read_buffer();
        assert_eq!(buf.len(), CAPACITY);
        read_area(&mut buf)[..64_000].fill(7);
        let at = buf.as_ptr();
        let reply = pool.take(&mut buf, 64_000).expect("large");
        assert_eq!(reply.iter().collect::<Vec<_>>(), [&[7u8; 64_000][..]]);
        assert_ne!(buf.as_ptr(), at, "another buffer to read into");
        assert_eq!(buf.len(), CAPACITY);

        let reply = reply.into_buffer();
        assert_eq!(reply.as_ptr(), at, "not copied");
        pool.give_back(reply);
        let again = pool.read_buffer();
        assert_eq!(again.as_ptr(), at, "the same buffer, kept");
        assert_eq!(again.len(), CAPACITY, "ready for a read");

        read_area(&mut buf)[..4].copy_from_slice(b"tiny");
        let before = buf.as_ptr();
        assert!(pool.take(&mut buf, 4).is_none(), "small: the caller copies");
        assert_eq!(read_reply(&buf, 4), b"tiny");
        assert_eq!(buf.as_ptr(), before, "the read buffer stays");
        pool.give_back(Replies::one(b"tiny").into_buffer());
        assert!(pool.free.lock().unwrap().is_empty(), "not kept");
    }

    #[test]
    fn no_more_than_kept_are_kept() {
        let pool = BigBuffers::default();
        let mut buf = pool.read_buffer();
        let replies: Vec<_> = (0..KEPT + 5)
            .map(|_| pool.take(&mut buf, LARGE).expect("large"))
            .collect();
        for reply in replies {
            pool.give_back(reply.into_buffer());
        }
        assert_eq!(pool.free.lock().unwrap().len(), KEPT);
    }
}
