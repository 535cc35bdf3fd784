//! An in-kernel packet generator for the forwarding benchmark.
//!
//! A generator that writes one packet per `write()` into the gateway's TUN
//! device pays a system call, a copy and an skb per packet, which costs
//! more than either path under test: the ratio between veil and
//! MASQUERADE then mostly measures the generator. Here a small XDP program
//! is run by `BPF_PROG_TEST_RUN` in live-frames mode
//! (`BPF_F_TEST_XDP_LIVE_FRAMES`, Linux 5.18): the kernel takes each frame
//! from a recycled page, runs the program, and hands what it passed to the
//! stack as if the interface named in the context had received it
//! (`netif_receive_skb_list`, in batches of 64). No system call or
//! allocation per packet is left to the generator.
//!
//! The kernel recycles a page without restoring its bytes, and both paths
//! rewrite the packet in place (source address and port, TTL, checksums):
//! a recycled frame would come back translated already and be dropped. So
//! the program writes the whole frame into the page before passing it, as
//! stores of immediates built from the frame's bytes; it is loaded from
//! those raw instructions (a separate eBPF object for that would be more
//! to build than to read).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
/// Frames per batch the kernel hands to the stack at once (its default).
const BATCH: u32 = 64;

/// `union bpf_attr` for `BPF_PROG_LOAD`, the fields used.
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

/// `union bpf_attr` for `BPF_PROG_TEST_RUN`.
#[repr(C)]
#[derive(Default)]
struct ProgTestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct xdp_md`: where the frame lies, and the interface it arrives on.
#[repr(C)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live `bpf_attr` prefix of the command's layout,
    // and its size is passed with it; the kernel zero-fills the rest.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The generator: its program, which writes one frame, loaded once.
pub(crate) struct LiveFrames {
    prog: OwnedFd,
    frame: Vec<u8>,
}

/// One `struct bpf_insn`: opcode, registers (destination in the low
/// nibble), offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let [o0, o1] = off.to_le_bytes();
    let [i0, i1, i2, i3] = imm.to_le_bytes();
    u64::from_le_bytes([code, dst | src << 4, o0, o1, i0, i1, i2, i3])
}

/// The program: if the frame is `frame.len()` long, write `frame` over it;
/// pass it either way.
fn program(frame: &[u8]) -> Vec<u64> {
    const LDX_W: u8 = 0x61; // dst = *(u32 *)(src + off)
    const MOV64_X: u8 = 0xbf; // dst = src
    const ADD64_K: u8 = 0x07; // dst += imm
    const JGT_X: u8 = 0x2d; // if dst > src goto +off
    const ST_W: u8 = 0x62; // *(u32 *)(dst + off) = imm
    const ST_B: u8 = 0x72; // *(u8 *)(dst + off) = imm
    const MOV64_K: u8 = 0xb7; // dst = imm
    const EXIT: u8 = 0x95;
    const XDP_PASS: i32 = 2;
    let words = frame.chunks(4);
    let stores: Vec<u64> = words
        .enumerate()
        .flat_map(|(i, word)| {
            let at = (i * 4) as i16;
            match <[u8; 4]>::try_from(word) {
                Ok(w) => vec![insn(ST_W, 2, 0, at, i32::from_le_bytes(w))],
                Err(_) => word
                    .iter()
                    .enumerate()
                    .map(|(j, b)| insn(ST_B, 2, 0, at + j as i16, *b as i32))
                    .collect(),
            }
        })
        .collect();
    let mut insns = vec![
        insn(LDX_W, 2, 1, 0, 0), // r2 = ctx->data
        insn(LDX_W, 3, 1, 4, 0), // r3 = ctx->data_end
        insn(MOV64_X, 4, 2, 0, 0),
        insn(ADD64_K, 4, 0, 0, frame.len() as i32),
        insn(JGT_X, 4, 3, stores.len() as i16, 0), // too short: pass as is
    ];
    insns.extend(stores);
    insns.extend([insn(MOV64_K, 0, 0, 0, XDP_PASS), insn(EXIT, 0, 0, 0, 0)]);
    insns
}

impl LiveFrames {
    /// Loads the program that writes `frame` (Ethernet).
    pub(crate) fn load(frame: &[u8]) -> io::Result<Self> {
        let insns = program(frame);
        let license = c"GPL";
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..Default::default()
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr)?;
        // SAFETY: BPF_PROG_LOAD returned a new descriptor, now owned here.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self {
            prog,
            frame: frame.to_vec(),
        })
    }

    /// Hands the frame to the stack `count` times as received on interface
    /// `ifindex` of the calling thread's network namespace.
    pub(crate) fn inject(&self, ifindex: u32, count: u32) -> io::Result<()> {
        let frame = &self.frame;
        let ctx = XdpMd {
            data: 0,
            data_end: frame.len() as u32,
            data_meta: 0,
            ingress_ifindex: ifindex,
            rx_queue_index: 0,
            egress_ifindex: 0,
        };
        let mut attr = ProgTestRun {
            prog_fd: self.prog.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: count,
            ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
            ctx_in: &ctx as *const XdpMd as u64,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size: BATCH,
            ..Default::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr).map(drop)
    }
}
