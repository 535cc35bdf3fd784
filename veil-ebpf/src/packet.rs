//! Bounds-checked access to packet bytes, the way the verifier wants it.

use veil_common::Reason;

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const ETH_P_IP: u16 = 0x0800;

/// IPv4 "more fragments" flag and fragment offset, in the host-order
/// flags/offset word.
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFSET: u16 = 0x1fff;

#[derive(Clone, Copy)]
pub struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    #[inline(always)]
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// A pointer to a `T` at `offset`, if the packet holds all of it.
    #[inline(always)]
    pub fn at<T>(&self, offset: usize) -> Result<*mut T, Reason> {
        let p = self.start + offset;
        if p + size_of::<T>() > self.end {
            return Err(Reason::DropMalformed);
        }
        Ok(p as *mut T)
    }
}

/// The first four bytes of TCP and UDP headers.
#[repr(C)]
pub struct Ports {
    pub src: [u8; 2],
    pub dst: [u8; 2],
}
