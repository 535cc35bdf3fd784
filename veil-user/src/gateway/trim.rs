//! Gives the memory of ended sessions back to the kernel. glibc keeps what
//! a thread freed in that thread's arena: after 10,000 clients came and
//! went the gateway's RSS stayed at its peak (1.4 GiB), though nothing
//! used it. `malloc_trim` returns the free pages of every arena.

use std::{sync::Arc, time::Duration};

use super::Shared;

/// Blocks of this size and above get pages of their own (mmap), which go
/// back to the kernel when freed. glibc raises its threshold each time
/// such a block is freed, after which sessions' buffers come from the
/// arenas and stay there: with 10,000 clients churning, the RSS tripled
/// while the number of clients stayed the same. A fixed threshold keeps
/// it flat, at no cost in new sessions per second that a run could tell.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: libc::c_int = 64 * 1024;

/// Fixes the allocator's mmap threshold (see [`MMAP_THRESHOLD`]).
#[cfg(target_env = "gnu")]
pub(super) fn large_blocks_on_their_own_pages() {
    // SAFETY: mallopt only sets a parameter of the allocator.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) } != 1 {
        tracing::debug!("the allocator refused a fixed mmap threshold");
    }
}

/// How often the number of sessions is looked at.
const EVERY: Duration = Duration::from_secs(10);

/// Sessions that must have ended since the last trim for another: a trim
/// walks every arena, not worth it for a few.
const ENDED: u64 = 64;

/// Trims once many sessions ended since the last trim and none started
/// for a while. Not while sessions keep starting: a trim holds each
/// arena's lock while it walks it (with a heap of a gigabyte, every
/// handshake would wait), and a busy gateway reuses what it freed.
pub(super) async fn watch(shared: Arc<Shared>) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut trimmed_at, mut started_before) = (0, 0);
    loop {
        tick.tick().await;
        let (started, ended) = shared
            .clients
            .lock()
            .expect("clients lock")
            .started_and_ended();
        if ended - trimmed_at >= ENDED && started == started_before {
            let _ = tokio::task::spawn_blocking(trim).await;
            trimmed_at = ended;
        }
        started_before = started;
    }
}

#[cfg(target_env = "gnu")]
fn trim() {
    // SAFETY: malloc_trim has no preconditions; it takes the arenas' locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
fn trim() {}

#[cfg(not(target_env = "gnu"))]
pub(super) fn large_blocks_on_their_own_pages() {}
