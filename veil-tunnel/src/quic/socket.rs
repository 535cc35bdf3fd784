//! The QUIC endpoint's UDP socket, watched for reading only.
//!
//! tokio registers a socket for both directions, and a UDP socket turns
//! writable again each time the kernel frees a datagram it sent: over a
//! veth, inside the `sendmsg` itself. Each datagram sent then ends the
//! next `epoll_wait` early, or wakes the worker blocked in it, for
//! nothing: a send waits only when the socket's buffer is full. This
//! socket is registered for reading; its writability is watched, through
//! a duplicate descriptor, only after a send found no room. (quinn asks
//! whether the socket is writable before every send: the answer is yes
//! without a system call until one found it full.)

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::{unix::AsyncFd, Interest};

#[derive(Debug)]
pub(super) struct Socket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// A send found the buffer full, and no room was seen since.
    full: AtomicBool,
}

impl Socket {
    pub(super) fn new(socket: std::net::UdpSocket) -> io::Result<Socket> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        Ok(Socket {
            io: register(socket, Interest::READABLE)?,
            state,
            full: AtomicBool::new(false),
        })
    }
}

fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    // SAFETY: the socket owns its descriptor, open until the AsyncFd
    // drops it.
    unsafe { AsyncFd::register_with_interest(socket, interest) }.map_err(io::Error::from)
}

impl quinn::AsyncUdpSocket for Socket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(Writable {
            socket: self,
            watch: None,
        })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if sent
            .as_ref()
            .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
        {
            self.full.store(true, Ordering::Relaxed);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [io::IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut ready = ready!(self.io.poll_read_ready(cx))?;
            if let Ok(received) =
                ready.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta))
            {
                return Poll::Ready(received);
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

/// Waits for room in the socket's send buffer, after a send found none.
#[derive(Debug)]
struct Writable {
    socket: Arc<Socket>,
    /// A duplicate of the socket, registered for writability while a send
    /// waits.
    watch: Option<AsyncFd<std::net::UdpSocket>>,
}

impl quinn::UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.socket.full.load(Ordering::Relaxed) {
            // A send that finds it full marks it, and comes back here.
            return Poll::Ready(Ok(()));
        }
        let watch = match &mut this.watch {
            Some(watch) => watch,
            // Registered now, epoll reports at once if room came meanwhile.
            none => none.insert(register(
                this.socket.io.get_ref().try_clone()?,
                Interest::WRITABLE,
            )?),
        };
        drop(ready!(watch.poll_write_ready(cx))?);
        // Unregistered again: no wake-up per datagram sent.
        this.watch = None;
        this.socket.full.store(false, Ordering::Relaxed);
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::{AsyncUdpSocket, UdpPoller};
    use std::{future::poll_fn, net::Ipv4Addr};

    fn transmit<'a>(to: SocketAddr, contents: &'a [u8]) -> Transmit<'a> {
        Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        }
    }

    #[tokio::test]
    async fn sends_receives_and_watches_writability_only_when_asked() {
        let local = || std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let a = Arc::new(Socket::new(local()).expect("socket"));
        let b = Arc::new(Socket::new(local()).expect("socket"));
        let to_b = b.local_addr().expect("address");

        a.try_send(&transmit(to_b, b"hello")).expect("sent");
        let mut buf = [0u8; 1500];
        let mut meta = [RecvMeta::default()];
        let n = poll_fn(|cx| {
            let mut bufs = [io::IoSliceMut::new(&mut buf)];
            b.poll_recv(cx, &mut bufs, &mut meta)
        })
        .await
        .expect("received");
        assert_eq!((n, meta[0].len), (1, 5));
        assert_eq!(&buf[..5], b"hello");

        // Writable without a system call while no send found it full.
        let mut poller = writable(&a);
        poll_fn(|cx| Pin::new(&mut poller).poll_writable(cx))
            .await
            .expect("writable");
        assert!(poller.watch.is_none());
        // After one did, room is watched for: epoll reports the new
        // registration at once (there is room), and it is gone after.
        a.full.store(true, Ordering::Relaxed);
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            poll_fn(|cx| Pin::new(&mut poller).poll_writable(cx)),
        )
        .await
        .expect("room at once")
        .expect("no error");
        assert!(poller.watch.is_none());
        assert!(!a.full.load(Ordering::Relaxed));
    }

    /// A send buffer that fills: loopback behind a 1 Mbit/s token bucket,
    /// in a network namespace of the test thread's own (gone with it).
    #[test]
    fn a_full_buffer_is_waited_for_then_no_longer_watched() {
        // SAFETY: plain system calls.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: a network namespace needs root");
            return;
        }
        std::thread::spawn(|| {
            // SAFETY: this thread alone moves to a new network namespace.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            // SAFETY: plain system call.
            let tid = unsafe { libc::gettid() };
            let ns = format!("--net=/proc/{}/task/{tid}/ns/net", std::process::id());
            let run = |args: &[&str]| {
                let ok = std::process::Command::new("nsenter")
                    .arg(&ns)
                    .args(args)
                    .status()
                    .expect("nsenter")
                    .success();
                assert!(ok, "{args:?}");
            };
            run(&["ip", "link", "set", "lo", "up"]);
            run(&[
                "tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1mbit", "burst", "4kb",
                "limit", "1mb",
            ]);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let local = || std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
                let (sender, receiver) = (local(), local());
                socket2::SockRef::from(&sender)
                    .set_send_buffer_size(4096)
                    .expect("small send buffer");
                let to = receiver.local_addr().expect("address");
                let a = Arc::new(Socket::new(sender).expect("socket"));
                let payload = [7u8; 1200];
                let filled = (0..10_000).any(|_| {
                    a.try_send(&transmit(to, &payload))
                        .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock)
                });
                assert!(filled, "the token bucket holds what the buffer sent");
                assert!(a.full.load(Ordering::Relaxed));

                let mut poller = writable(&a);
                let mut first = true;
                let waited = poll_fn(|cx| {
                    let r = Pin::new(&mut poller).poll_writable(cx);
                    if first {
                        first = false;
                        assert!(r.is_pending(), "no room yet");
                        assert!(poller.watch.is_some(), "a watch waits for it");
                    }
                    r
                });
                tokio::time::timeout(std::time::Duration::from_secs(10), waited)
                    .await
                    .expect("room as the bucket drains")
                    .expect("no error");
                assert!(poller.watch.is_none());
                assert!(!a.full.load(Ordering::Relaxed));
                a.try_send(&transmit(to, &payload)).expect("sends again");
            });
        })
        .join()
        .expect("the namespace test passed");
    }

    /// What `create_io_poller` makes, with its watch in sight.
    fn writable(socket: &Arc<Socket>) -> Writable {
        Writable {
            socket: socket.clone(),
            watch: None,
        }
    }
}
