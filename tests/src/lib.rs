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
