//! Support for veil's kernel tests: packets built and checked by code that
//! shares nothing with the datapath, and network namespaces that clean up
//! after themselves.

pub mod bed;
pub mod bed6;
pub mod bpffs;
pub mod dns;
pub mod interop;
pub mod lossy;
pub mod netns;
pub mod packet;
pub mod packet6;
pub mod peers;
pub mod proc;
pub mod raw;
pub mod web;
pub mod world;

/// Polls `f` every 100 ms until it holds; panics naming `what` after
/// `timeout`.
pub fn wait_until(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// Makes `socket` send each buffer as datagrams of `size` bytes cut by the
/// kernel (`UDP_SEGMENT`): one UDP super-packet, as an application using
/// GSO sends.
pub fn udp_segment(socket: &std::net::UdpSocket, size: usize) {
    use std::os::fd::AsRawFd;
    let size = size as libc::c_int;
    // SAFETY: a valid socket, and an int option.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
}
