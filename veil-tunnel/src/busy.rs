//! Busy-polling after activity, an option (`--busy-poll MICROS`): CPU
//! for round-trip time.
//!
//! On a virtual machine most of a tunnel's idle round trip is spent
//! waking halted vCPUs: each hop that starts from sleep (`epoll_wait`)
//! costs 60–160 µs here, the work itself a few µs. After a packet, a reply
//! usually follows within a round trip; a task that keeps the runtime
//! polling its descriptors (`epoll_wait` with a zero timeout, through
//! [`tokio::task::yield_now`]) for a while after the last activity catches
//! it without a sleep and a wake-up. Once nothing happened for the
//! window, the task sleeps until the next activity, so an idle tunnel
//! costs nothing. The price is a core kept busy for up to the window
//! after every packet.
//!
//! The poller polls the descriptors of the runtime it runs in, and only
//! while it holds the runtime's I/O driver: on a multi-threaded runtime
//! another idle worker may hold it (asleep in `epoll_wait`), so this
//! works best on a single-threaded runtime (the client's; the gateway's
//! with `--threads 1`).

use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// The process's poller, when one is configured.
static POLLER: OnceLock<Arc<Poller>> = OnceLock::new();

struct Poller {
    window: Duration,
    epoch: Instant,
    /// Nanoseconds since `epoch` of the last activity.
    last: AtomicU64,
    wake: Notify,
}

impl Poller {
    fn since_last(&self) -> Duration {
        let now = self.epoch.elapsed().as_nanos() as u64;
        Duration::from_nanos(now.saturating_sub(self.last.load(Relaxed)))
    }
}

/// Configures busy-polling for `window` after each activity and starts
/// the poller on the current runtime. Once per process; a second call, or
/// a zero window, does nothing.
pub fn start(window: Duration) {
    if window.is_zero() {
        return;
    }
    let poller = Arc::new(Poller {
        window,
        epoch: Instant::now(),
        last: AtomicU64::new(0),
        wake: Notify::new(),
    });
    if POLLER.set(poller.clone()).is_err() {
        return;
    }
    tokio::spawn(async move {
        loop {
            if poller.since_last() < poller.window {
                // Back to the scheduler, which polls the descriptors
                // without sleeping before it runs this task again.
                tokio::task::yield_now().await;
            } else {
                poller.wake.notified().await;
            }
        }
    });
}

/// Marks activity: the poller keeps polling for its window from now.
/// Costs a clock read when busy-polling is configured, nothing otherwise.
pub fn touch() {
    let Some(poller) = POLLER.get() else { return };
    let idle = poller.since_last() >= poller.window;
    let now = poller.epoch.elapsed().as_nanos() as u64;
    poller.last.store(now, Relaxed);
    if idle {
        poller.wake.notify_one();
    }
}
