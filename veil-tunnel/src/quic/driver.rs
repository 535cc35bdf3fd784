//! quinn's drivers, run in the task that uses them.
//!
//! quinn spawns a task per endpoint (receiving for every connection) and
//! per connection (decrypting what the endpoint sorted to it, encrypting
//! and sending, keeping its timers). Each packet of a tunnel then crosses
//! from task to task to the session's, and on a multi-threaded runtime a
//! crossing can be a wake-up of another worker: a futex, and on a
//! virtual machine an inter-processor interrupt.
//!
//! The worst of it: the endpoint's driver stops after 50 µs of work
//! (quinn's `RECV_TIME_BOUND`, in datagrams it measured to fit) and wakes
//! itself to go on. A task that wakes itself on tokio's multi-threaded
//! runtime goes to the back of the queue and an idle worker is woken to
//! steal it. Early in a connection, when a datagram measured slower than
//! that, this came after every datagram: 8.5 context switches per ping on
//! the gateway against 1.7 over TLS/TCP (docs/performance.md).
//!
//! [`Runtime`] is quinn's tokio runtime except that the code that makes
//! an endpoint or a connection can keep the drivers quinn would spawn
//! ([`Driver::capture`]), and [`Driver::beside`] polls them in the task
//! that uses them. A wake-up among the futures of that task while it runs
//! costs another round of polling, not a trip through the scheduler.

use std::{
    cell::RefCell,
    future::{poll_fn, Future},
    io,
    pin::{pin, Pin},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    task::{Context, Poll, Wake, Waker},
    time::Instant,
};

use futures_util::task::AtomicWaker;

/// What quinn spawns.
type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

thread_local! {
    /// `Some` while [`Driver::capture`] runs: where [`Runtime::spawn`]
    /// leaves drivers instead of spawning them.
    static CAPTURED: RefCell<Option<Vec<Task>>> = const { RefCell::new(None) };
}

/// quinn's tokio runtime, with drivers that can be kept and a UDP socket
/// watched for reading only ([`super::socket`]).
#[derive(Debug)]
pub struct Runtime;

impl quinn::Runtime for Runtime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        quinn::TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Task) {
        let spawn = CAPTURED.with(|slot| match &mut *slot.borrow_mut() {
            Some(captured) => {
                captured.push(future);
                None
            }
            None => Some(future),
        });
        if let Some(future) = spawn {
            tokio::spawn(future);
        }
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        Ok(Arc::new(super::socket::Socket::new(socket)?))
    }

    fn now(&self) -> Instant {
        quinn::TokioRuntime.now()
    }
}

/// Rounds of polling in one turn of the task before it yields to others:
/// a driver wakes itself when it stops with work left, to be fair.
const ROUNDS: usize = 4;

/// quinn's drivers of an endpoint and its connections, polled beside the
/// work that uses them, in that work's task. Between calls of
/// [`Driver::beside`] they do not run, so the gaps must be short; when
/// the `Driver` is dropped, those not finished go on in a task of their
/// own, as quinn would have spawned them, to close connections and drain
/// them.
pub struct Driver(Kept);

impl Driver {
    /// Runs `make`, which makes an endpoint or opens or accepts a
    /// connection, and keeps the drivers quinn spawns there.
    pub fn capture<T>(make: impl FnOnce() -> T) -> (T, Driver) {
        let wakes = Arc::new(Wakes::default());
        let mut driver = Driver(Kept {
            tasks: Vec::new(),
            work: Waker::from(Arc::new(Slot {
                wakes: wakes.clone(),
                bit: WORK,
            })),
            wakes,
        });
        let made = driver.capture_more(make);
        (made, driver)
    }

    /// As [`Driver::capture`], into this driver: a connection of an
    /// endpoint whose driver this is.
    pub fn capture_more<T>(&mut self, make: impl FnOnce() -> T) -> T {
        /// Ends the capture however `make` ends.
        struct Capturing;
        impl Drop for Capturing {
            fn drop(&mut self) {
                CAPTURED.with(|slot| slot.borrow_mut().take());
            }
        }
        CAPTURED.with(|slot| *slot.borrow_mut() = Some(Vec::new()));
        let capturing = Capturing;
        let made = make();
        let tasks = CAPTURED
            .with(|slot| slot.borrow_mut().take())
            .unwrap_or_default();
        drop(capturing);
        for task in tasks {
            self.0.keep(task);
        }
        made
    }

    /// How many drivers are kept and not finished.
    pub fn kept(&self) -> usize {
        self.0.count()
    }

    /// Runs `work` with the drivers polled beside it, in this task.
    pub async fn beside<F: Future>(&mut self, work: F) -> F::Output {
        let mut work = pin!(work);
        // New work: polled on the first turn, whatever woke what before.
        self.0.wakes.state.fetch_or(WORK, Ordering::SeqCst);
        poll_fn(|cx| self.0.poll_with(cx, |cx| work.as_mut().poll(cx))).await
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.kept() == 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // The rest, with the same wakers (quinn kept them), until they
        // finish.
        let mut rest = Kept {
            tasks: std::mem::take(&mut self.0.tasks),
            wakes: self.0.wakes.clone(),
            work: self.0.work.clone(),
        };
        runtime.spawn(poll_fn(move |cx| {
            let _ = rest.poll_with(cx, |_| Poll::<()>::Pending);
            match rest.count() {
                0 => Poll::Ready(()),
                _ => Poll::Pending,
            }
        }));
    }
}

/// The drivers and their wakers. Each driver and the work have a waker of
/// their own: a turn polls only those that were woken (quinn keeps a
/// waker it was given, so each driver's stays the same for its whole
/// life).
struct Kept {
    /// The drivers, `None` once finished. Slot `i` wakes bit `i + 1`.
    tasks: Vec<Option<(Task, Waker)>>,
    wakes: Arc<Wakes>,
    /// The work's waker: bit 0.
    work: Waker,
}

impl Kept {
    fn keep(&mut self, task: Task) {
        let bit = 1 << (self.tasks.len() + 1);
        if bit & POLLING != 0 {
            // Never here: an endpoint and a connection at most.
            tokio::spawn(task);
            return;
        }
        let waker = Waker::from(Arc::new(Slot {
            wakes: self.wakes.clone(),
            bit,
        }));
        self.tasks.push(Some((task, waker)));
        // Polled first on the next turn.
        self.wakes.state.fetch_or(bit, Ordering::SeqCst);
    }

    fn count(&self) -> usize {
        self.tasks.iter().flatten().count()
    }

    /// One turn: the woken drivers and `work`, round after round while
    /// they wake one another.
    fn poll_with<T>(
        &mut self,
        cx: &mut Context,
        mut work: impl FnMut(&mut Context) -> Poll<T>,
    ) -> Poll<T> {
        self.wakes.task.register(cx.waker());
        for _ in 0..ROUNDS {
            // From here, a wake-up only marks its bit for another round.
            self.wakes.state.fetch_or(POLLING, Ordering::SeqCst);
            // Drivers first: what they receive, the work takes in the
            // same round.
            for (i, slot) in self.tasks.iter_mut().enumerate() {
                let Some((task, waker)) = slot else { continue };
                if self.wakes.take(1 << (i + 1)) {
                    let finished = task
                        .as_mut()
                        .poll(&mut Context::from_waker(waker))
                        .is_ready();
                    if finished {
                        *slot = None;
                    }
                }
            }
            if self.wakes.take(WORK) {
                if let Poll::Ready(out) = work(&mut Context::from_waker(&self.work)) {
                    if self.wakes.state.fetch_and(!POLLING, Ordering::SeqCst) & !POLLING != 0 {
                        // A driver was woken meanwhile: that must not wait
                        // for the next call.
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Ready(out);
                }
            }
            if self.wakes.state.fetch_and(!POLLING, Ordering::SeqCst) & !POLLING == 0 {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Set while the task polls: wake-ups only mark their bits.
const POLLING: u32 = 1 << 31;
/// The work's bit; driver `i`'s is `1 << (i + 1)`.
const WORK: u32 = 1;

/// What woke since the last turn, and the task to wake (registered on
/// every turn, without a lock).
#[derive(Default)]
struct Wakes {
    state: AtomicU32,
    task: AtomicWaker,
}

impl Wakes {
    /// Whether `bit` was woken, clearing it.
    fn take(&self, bit: u32) -> bool {
        self.state.fetch_and(!bit, Ordering::SeqCst) & bit != 0
    }

    fn wake(&self, bit: u32) {
        if self.state.fetch_or(bit, Ordering::SeqCst) & POLLING == 0 {
            self.task.wake();
        }
    }
}

/// The waker of one driver, or of the work.
struct Slot {
    wakes: Arc<Wakes>,
    bit: u32,
}

impl Wake for Slot {
    fn wake(self: Arc<Self>) {
        self.wakes.wake(self.bit)
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.wake(self.bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{atomic::AtomicUsize, Mutex};

    /// Runs `test` on a current-thread runtime, as the client does.
    fn run(test: impl Future<Output = ()>) {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
            .block_on(test)
    }

    /// A driver keeping `task`, as if quinn had spawned it.
    fn keeping(task: impl Future<Output = ()> + Send + 'static) -> Driver {
        Driver::capture(|| quinn::Runtime::spawn(&Runtime, Box::pin(task))).1
    }

    /// A future that is ready on its `n`th poll and wakes itself before.
    fn ready_on(n: usize, polls: Arc<AtomicUsize>) -> impl Future<Output = ()> + Send {
        poll_fn(move |cx| {
            if polls.fetch_add(1, Ordering::SeqCst) + 1 >= n {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
    }

    fn counter() -> Arc<AtomicUsize> {
        Arc::new(AtomicUsize::new(0))
    }

    fn count(c: &AtomicUsize) -> usize {
        c.load(Ordering::SeqCst)
    }

    #[test]
    fn capture_takes_one_spawn_and_only_inside() {
        run(async {
            let polls = counter();
            let driver = keeping(ready_on(1, polls.clone()));
            assert_eq!(driver.kept(), 1);
            assert_eq!(count(&polls), 0, "kept, not run");
            // Outside a capture, spawn spawns.
            let spawned = counter();
            quinn::Runtime::spawn(&Runtime, Box::pin(ready_on(1, spawned.clone())));
            tokio::task::yield_now().await;
            assert_eq!(count(&spawned), 1);
            let ((), none) = Driver::capture(|| ());
            assert_eq!(none.kept(), 0);
        });
    }

    #[test]
    fn beside_polls_both_and_self_wakes_stay_in_the_task() {
        run(async {
            let (driver_polls, work_polls) = (counter(), counter());
            let mut driver = keeping(ready_on(100, driver_polls.clone()));
            driver.beside(ready_on(3, work_polls.clone())).await;
            assert_eq!(count(&work_polls), 3);
            // Polled as often as the work: once per round.
            assert_eq!(count(&driver_polls), 3);
            assert_eq!(driver.kept(), 1, "not finished, still kept");
        });
    }

    #[test]
    fn a_turn_polls_only_what_was_woken() {
        run(async {
            let driver_polls = counter();
            let counted = driver_polls.clone();
            let mut driver = keeping(poll_fn(move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
                Poll::<()>::Pending
            }));
            let work_polls = counter();
            driver.beside(ready_on(5, work_polls.clone())).await;
            assert_eq!(count(&work_polls), 5);
            assert_eq!(count(&driver_polls), 1, "polled once, never woken");
        });
    }

    #[test]
    fn dropped_unfinished_it_is_spawned() {
        run(async {
            let polls = counter();
            drop(keeping(ready_on(5, polls.clone())));
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(count(&polls), 5, "ran to the end on its own");
        });
    }

    #[test]
    fn dropped_it_still_hears_the_waker_quinn_kept() {
        run(async {
            // As quinn's endpoint driver: keeps the first waker it gets.
            let kept: Arc<Mutex<Option<Waker>>> = Arc::default();
            let done = counter();
            let (k, d) = (kept.clone(), done.clone());
            let mut driver = keeping(poll_fn(move |cx| {
                k.lock()
                    .expect("lock")
                    .get_or_insert_with(|| cx.waker().clone());
                match count(&d) {
                    0 => Poll::Pending,
                    _ => Poll::Ready(()),
                }
            }));
            driver.beside(async {}).await;
            assert!(kept.lock().expect("lock").is_some());
            drop(driver);
            tokio::task::yield_now().await;
            done.store(1, Ordering::SeqCst);
            kept.lock().expect("lock").take().expect("kept").wake();
            let finished = async {
                while Arc::strong_count(&done) > 1 {
                    tokio::task::yield_now().await;
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(1), finished)
                .await
                .expect("the driver ran to its end and was dropped");
        });
    }

    #[test]
    fn a_wake_from_elsewhere_wakes_the_task() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
            let ((), mut driver) = Driver::capture(|| ());
            let work =
                tokio::spawn(
                    async move { driver.beside(async move { rx.await.expect("sent") }).await },
                );
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(20));
                tx.send(7).expect("receiver waits");
            });
            assert_eq!(work.await.expect("joined"), 7);
        });
    }
}
