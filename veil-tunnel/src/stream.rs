//! A tunnel's byte stream as both ends' pumps use it: reading and writing
//! make progress together in one future, so a pump can wait on its control
//! signals (revocation, replacement, shutdown) while a write is stuck, and
//! a peer that stops reading is noticed and let go of.
//!
//! The pump awaits [`Stream::next`] inside its `select!`. Writes are never
//! awaited anywhere else, so nothing the peer does (or does not do) can
//! pin the pump: a write that makes no progress for a while is reported by
//! [`Stream::stalled_since`], and [`Stream::close`] gives up after its
//! deadline.

use std::{
    future::poll_fn,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

/// The write buffer is dropped once emptied if it grew past this: one burst
/// does not pin a large allocation for the session's lifetime.
const KEEP_CAPACITY: usize = 512 * 1024;

/// What [`Stream::next`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// `n` bytes were read into the caller's buffer; 0 is the peer's end of
    /// stream.
    Read(usize),
    /// Queued bytes went out (possibly not all of them): room may have
    /// opened for more.
    Wrote,
    /// An HTTP datagram arrived (HTTP/3 only).
    Datagram(bytes::Bytes),
}

pub struct Stream<S> {
    io: S,
    /// Bytes for the peer; `out[sent..]` is not yet written.
    out: Vec<u8>,
    sent: usize,
    /// Everything was written; the writer (TLS) may still hold records.
    flushing: bool,
    /// Since when a write has been waiting without progress.
    stalled_since: Option<Instant>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream<S> {
    pub fn new(io: S) -> Self {
        Self {
            io,
            // Grows with use (or is swapped whole for the session's send
            // buffer): a connection that never authenticates costs none.
            out: Vec::new(),
            sent: 0,
            flushing: false,
            stalled_since: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// The bytes waiting to be written, to append to (or to swap whole
    /// with `veil_proto::session::coalesce`).
    pub fn out_mut(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.out.len() - self.sent
    }

    /// Since when queued bytes have been waiting for the peer to read them;
    /// `None` while writes make progress or nothing waits.
    pub fn stalled_since(&self) -> Option<Instant> {
        self.stalled_since
    }

    /// Writes what is queued while waiting for bytes to read into `buf`
    /// (if `read`); returns when either happened. Cancel-safe: nothing read
    /// or written is lost if another `select!` branch wins.
    pub async fn next(&mut self, buf: &mut [u8], read: bool) -> io::Result<Event> {
        poll_fn(|cx| {
            let wrote = self.poll_write_queued(cx)?;
            if read {
                let mut rb = ReadBuf::new(buf);
                if let Poll::Ready(r) = Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                    r?;
                    return Poll::Ready(Ok(Event::Read(rb.filled().len())));
                }
            }
            if wrote {
                Poll::Ready(Ok(Event::Wrote))
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Pushes queued bytes as far as the socket takes them; whether any
    /// progress was made. Registers for wake-up when blocked.
    fn poll_write_queued(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let mut progress = false;
        while self.sent < self.out.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.out[self.sent..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.sent += n;
                    self.flushing = true;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => break,
            }
        }
        if self.sent == self.out.len() && self.flushing {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    self.flushing = false;
                    self.sent = 0;
                    self.out.clear();
                    if self.out.capacity() > KEEP_CAPACITY {
                        self.out = Vec::new();
                    }
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        let waiting = self.sent < self.out.len() || self.flushing;
        if progress || !waiting {
            self.stalled_since = None;
        } else if self.stalled_since.is_none() {
            self.stalled_since = Some(Instant::now());
        }
        Ok(progress)
    }

    /// Forgets the bytes not yet handed to the writer: for a peer that
    /// will not read them (it stalled, was replaced or revoked). What TLS
    /// already framed still goes out whole.
    pub fn discard(&mut self) {
        self.out.drain(self.sent..);
        self.out.shrink_to(64 * 1024);
    }

    /// Writes what is queued and closes the stream (TLS close_notify),
    /// giving up after `timeout`: a peer that stopped reading cannot hold
    /// the connection open.
    pub async fn close(&mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, async {
            poll_fn(|cx| {
                self.poll_write_queued(cx)?;
                if self.pending() > 0 || self.flushing {
                    return Poll::Pending;
                }
                Pin::new(&mut self.io).poll_shutdown(cx)
            })
            .await
        })
        .await;
    }
}

/// How a session's bytes travel, as [`crate::pump::run`] uses it. A
/// reliable byte stream ([`Stream`] over TLS over TCP) is one; a new
/// transport (HTTP/3 datagrams, WebSocket) is another implementation.
pub trait Transport {
    /// Where bytes for the peer are queued.
    fn out_mut(&mut self) -> &mut Vec<u8>;
    /// Bytes queued and not yet written.
    fn pending(&self) -> usize;
    /// Since when queued bytes have waited for the peer without progress.
    fn stalled_since(&self) -> Option<Instant>;
    /// Writes what is queued while waiting for bytes to read into `buf`
    /// (if `read`); cancel-safe.
    #[expect(
        async_fn_in_trait,
        reason = "implemented and called with concrete types, whose futures' Send-ness the compiler sees"
    )]
    async fn next(&mut self, buf: &mut [u8], read: bool) -> io::Result<Event>;
    /// Queues an HTTP datagram (HTTP/3 only: a byte stream has none to
    /// carry, and its sessions never emit them).
    fn send_datagram(&mut self, datagram: Vec<u8>) {
        let _ = datagram;
    }
    /// A datagram that has already arrived, without waiting (HTTP/3 only):
    /// after [`Event::Datagram`] the pump takes what else is there in the
    /// same turn.
    fn try_datagram(&mut self) -> Option<bytes::Bytes> {
        None
    }
    /// The largest datagram the path takes now (HTTP/3 only).
    fn max_datagram(&self) -> Option<usize> {
        None
    }
    /// Forgets the bytes not yet handed to the writer.
    fn discard(&mut self);
    /// Writes what is queued and closes, giving up after `timeout`.
    #[expect(
        async_fn_in_trait,
        reason = "implemented and called with concrete types, whose futures' Send-ness the compiler sees"
    )]
    async fn close(&mut self, timeout: Duration);
}

impl<S: AsyncRead + AsyncWrite + Unpin> Transport for Stream<S> {
    fn out_mut(&mut self) -> &mut Vec<u8> {
        Stream::out_mut(self)
    }

    fn pending(&self) -> usize {
        Stream::pending(self)
    }

    fn stalled_since(&self) -> Option<Instant> {
        Stream::stalled_since(self)
    }

    async fn next(&mut self, buf: &mut [u8], read: bool) -> io::Result<Event> {
        Stream::next(self, buf, read).await
    }

    fn discard(&mut self) {
        Stream::discard(self)
    }

    async fn close(&mut self, timeout: Duration) {
        Stream::close(self, timeout).await
    }
}

/// Sleeps until `at`, or forever without one: a `select!` branch for a
/// deadline that may not be set (such as [`Stream::stalled_since`]'s).
pub async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn writes_progress_while_waiting_to_read() {
        let (a, mut b) = duplex(1024);
        let mut s = Stream::new(a);
        s.out_mut().extend_from_slice(&[7; 3000]);
        let reader = tokio::spawn(async move {
            let mut got = vec![0; 3000];
            b.read_exact(&mut got).await.unwrap();
            b.write_all(b"hi").await.unwrap();
            (got, b)
        });
        let mut buf = [0u8; 16];
        loop {
            match s.next(&mut buf, true).await.unwrap() {
                Event::Read(n) => {
                    assert_eq!(&buf[..n], b"hi");
                    break;
                }
                Event::Wrote => {}
                Event::Datagram(_) => unreachable!("a byte stream has no datagrams"),
            }
        }
        let (got, _b) = reader.await.unwrap();
        assert_eq!(got, vec![7; 3000]);
        assert_eq!(s.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_stops_reading_shows_as_a_stall_and_cannot_hold_close() {
        let (a, _b) = duplex(1024);
        let mut s = Stream::new(a);
        s.out_mut().extend_from_slice(&[1; 4096]);
        let mut buf = [0u8; 16];
        assert_eq!(s.next(&mut buf, false).await.unwrap(), Event::Wrote);
        assert!(s.pending() > 0);
        let waited = tokio::time::timeout(Duration::from_secs(5), s.next(&mut buf, false)).await;
        assert!(waited.is_err(), "no progress, no event");
        let since = s.stalled_since().expect("stalled");
        assert!(Instant::now() - since >= Duration::from_secs(5));
        let started = Instant::now();
        s.close(Duration::from_secs(1)).await;
        assert_eq!(Instant::now() - started, Duration::from_secs(1));
    }
}
