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

/// A reply this long or longer leaves in the read buffer: shorter ones are
/// copied into an allocation of their size (from the allocator's arenas,
/// which reuse memory anyway). Near the capacity, so that a kept buffer
/// holds little more than the queue counts for it.
const LARGE: usize = 60 * 1024;

/// Every kept buffer's capacity, and its length while it waits: the
/// largest read.
const CAPACITY: usize = MAX_READ;

/// Buffers kept at most (4 MiB): a client's reply queue holds 4 MiB by
/// default, so one download's worth. A buffer holds at most 7 % more than
/// its reply, which is what a client's queue counts.
const KEPT: usize = 64;

#[derive(Default)]
pub(super) struct BigBuffers {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BigBuffers {
    /// A buffer to read a reply into, [`CAPACITY`] bytes long.
    pub(super) fn read_buffer(&self) -> Vec<u8> {
        let kept = self.free.lock().expect("big buffers lock").pop();
        kept.unwrap_or_else(|| vec![0; CAPACITY])
    }

    /// The reply in `buf[..n]` as a buffer of its own: a large one is
    /// `buf` itself, and `buf` becomes another read buffer; a small one is
    /// copied.
    pub(super) fn take(&self, buf: &mut Vec<u8>, n: usize) -> Vec<u8> {
        if n < LARGE || buf.capacity() != CAPACITY {
            return buf[..n].to_vec();
        }
        let mut reply = std::mem::replace(buf, self.read_buffer());
        reply.truncate(n);
        reply
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_reply_leaves_in_the_read_buffer_and_a_small_one_is_copied() {
        let pool = BigBuffers::default();
        let mut buf = pool.read_buffer();
        assert_eq!(buf.len(), CAPACITY);
        buf[..64_000].fill(7);
        let at = buf.as_ptr();
        let reply = pool.take(&mut buf, 64_000);
        assert_eq!(reply.as_ptr(), at, "not copied");
        assert_eq!(reply, vec![7u8; 64_000]);
        assert_ne!(buf.as_ptr(), at, "another buffer to read into");
        assert_eq!(buf.len(), CAPACITY);

        pool.give_back(reply);
        let again = pool.read_buffer();
        assert_eq!(again.as_ptr(), at, "the same buffer, kept");
        assert_eq!(again.len(), CAPACITY, "ready for a read");

        buf[..4].copy_from_slice(b"tiny");
        let before = buf.as_ptr();
        let small = pool.take(&mut buf, 4);
        assert_eq!((small.as_slice(), small.capacity()), (&b"tiny"[..], 4));
        assert_eq!(buf.as_ptr(), before, "the read buffer stays");
        pool.give_back(small);
        assert!(pool.free.lock().unwrap().is_empty(), "not kept");
    }

    #[test]
    fn no_more_than_kept_are_kept() {
        let pool = BigBuffers::default();
        let mut buf = pool.read_buffer();
        let replies: Vec<_> = (0..KEPT + 5).map(|_| pool.take(&mut buf, LARGE)).collect();
        for reply in replies {
            pool.give_back(reply);
        }
        assert_eq!(pool.free.lock().unwrap().len(), KEPT);
    }
}
