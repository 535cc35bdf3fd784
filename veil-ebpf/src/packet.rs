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

/// The most header bytes any program reads: Ethernet, IPv4, ICMP, the
/// quoted IPv4 header and 8 bytes of its transport header.
pub const MAX_HEADERS: u32 = (ETH_LEN + IPV4_LEN + 8 + IPV4_LEN + 8) as u32;

/// Makes the packet's headers directly readable. A super-packet (GSO from
/// the TUN device, GRO on the WAN) may keep part of its headers in pages,
/// out of reach of direct access, until pulled into the linear area.
#[inline(always)]
pub fn pull_headers(ctx: &aya_ebpf::programs::TcContext) -> Result<(), Reason> {
    let want = MAX_HEADERS.min(ctx.len());
    if ctx.data() + want as usize > ctx.data_end() {
        ctx.pull_data(want).map_err(|_| Reason::DropHelperFailed)?;
    }
    Ok(())
}

/// The first four bytes of TCP and UDP headers.
#[repr(C)]
pub struct Ports {
    pub src: [u8; 2],
    pub dst: [u8; 2],
}
