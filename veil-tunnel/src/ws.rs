//! The WebSocket binding: the tunnel's byte stream (its mutual TLS, then
//! CONNECT-IP inside it) carried in binary WebSocket messages, so that a
//! gateway can sit behind an ordinary web server or CDN on one path of a
//! website (see `docs/protocol.md`).
//!
//! [`WsStream`] makes a WebSocket (tokio-tungstenite) a byte stream again,
//! as TLS expects one: what is written goes out in one binary message per
//! flush, up to [`MAX_FRAME`] bytes, so the cost of framing (and of the
//! client's masking) is paid per 64 KiB rather than per TLS record;
//! messages read are handed out as bytes, their boundaries meaning nothing.
//! Pings are answered by tungstenite; a close, or the end of the
//! connection, is the end of the stream.

use std::{
    io,
    net::IpAddr,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use futures_core::Stream as _;
use futures_sink::Sink;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::{
    tungstenite::{
        self,
        handshake::server::{ErrorResponse, Request, Response},
        protocol::WebSocketConfig,
        Message,
    },
    WebSocketStream,
};

pub use tokio_tungstenite::tungstenite::Error as WsError;

/// The most bytes sent in one message: four TLS records' worth, so that
/// framing costs little, and small enough that the receiver (which sees a
/// message only once it is whole) is not kept waiting for a large one.
pub const MAX_FRAME: usize = 64 * 1024;

/// The largest message or frame taken from the peer. Ours are at most
/// [`MAX_FRAME`], and an intermediary may split a message but never merge
/// two (RFC 6455, 5.4); twice that is slack. It bounds what one
/// connection, authenticated or not, makes us buffer: the read buffer, a
/// frame and a message in pieces, about 320 KiB (1 MiB each allowed 2 MiB
/// to anyone who reached the proxy).
const MAX_INCOMING: usize = 2 * MAX_FRAME;

fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        // Read in large pieces: one system call per 64 KiB, not per 4 KiB.
        .read_buffer_size(64 * 1024)
        // Messages are already as large as they should be: written at once.
        .write_buffer_size(0)
        .max_message_size(Some(MAX_INCOMING))
        .max_frame_size(Some(MAX_INCOMING))
}

/// A WebSocket as a byte stream (see the module's documentation).
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// What is left of the last message read.
    rx: Bytes,
    /// Bytes written, not yet handed to the WebSocket as a message.
    tx: BytesMut,
    /// A ping came: its pong is written before anything more is read.
    pong_due: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    fn new(ws: WebSocketStream<S>) -> Self {
        Self {
            ws,
            rx: Bytes::new(),
            tx: BytesMut::new(),
            pong_due: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        self.ws.get_ref()
    }

    /// Hands what is buffered to the WebSocket as one binary message.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.tx.is_empty() {
            return Poll::Ready(Ok(()));
        }
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(into_io)?;
        let message = Message::Binary(self.tx.split().freeze());
        Pin::new(&mut self.ws)
            .start_send(message)
            .map_err(into_io)?;
        Poll::Ready(Ok(()))
    }

    /// Takes as much of `buf` as the message being built has room for,
    /// sending the message first if it is full.
    fn poll_buffer(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.tx.len() >= MAX_FRAME {
            ready!(self.poll_send(cx))?;
        }
        let n = buf.len().min(MAX_FRAME - self.tx.len());
        if self.tx.capacity() - self.tx.len() < n {
            // Room for a whole message (the last one's buffer, if it was
            // sent and dropped, is taken back).
            self.tx.reserve(MAX_FRAME - self.tx.len());
        }
        self.tx.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }
}

/// tungstenite's errors as I/O errors: its own I/O errors as they were, a
/// closed connection as a broken pipe, the peer's protocol errors (and
/// messages over the size limit) as invalid data.
fn into_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        e => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.rx.is_empty() {
            // tungstenite queues a pong per ping and reads on whether or
            // not the pong could be written: a peer that pings and never
            // reads would grow its buffer without end. It is read no more
            // until its pong is out.
            if this.pong_due {
                ready!(Pin::new(&mut this.ws).poll_flush(cx)).map_err(into_io)?;
                this.pong_due = false;
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.rx = data,
                Some(Ok(Message::Ping(_))) => this.pong_due = true,
                // Meaningless to a byte stream.
                Some(Ok(Message::Pong(_) | Message::Frame(_))) => {}
                // The end of the stream, as TCP's FIN would be.
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text message on a binary tunnel",
                    )))
                }
                Some(Err(e)) => return Poll::Ready(Err(into_io(e))),
            }
        }
        let n = out.remaining().min(this.rx.len());
        out.put_slice(&this.rx[..n]);
        this.rx.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_buffer(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // TLS hands over several records at once: all go in one message
        // where they fit.
        let this = self.get_mut();
        let mut taken = 0;
        for buf in bufs.iter().filter(|b| !b.is_empty()) {
            if taken > 0 && this.tx.len() >= MAX_FRAME {
                break;
            }
            match this.poll_buffer(cx, buf) {
                Poll::Ready(Ok(n)) => {
                    taken += n;
                    if n < buf.len() {
                        break;
                    }
                }
                Poll::Ready(Err(e)) if taken == 0 => return Poll::Ready(Err(e)),
                Poll::Pending if taken == 0 => return Poll::Pending,
                _ => break,
            }
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.ws).poll_flush(cx).map_err(into_io)
    }

    /// Sends what is buffered, then a close message.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.ws).poll_close(cx).map_err(into_io)
    }
}

/// The gateway's side: takes the HTTP upgrade to a WebSocket on `path`
/// (anything after `?` aside); an upgrade on any other path is answered
/// 404, and a request that is not a WebSocket upgrade is refused with the
/// connection closed. With the WebSocket, whom the proxy says it relays
/// ([`relayed_for`]).
pub async fn accept<S>(io: S, path: &str) -> Result<(WsStream<S>, Option<IpAddr>), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = None;
    #[expect(
        clippy::result_large_err,
        reason = "tungstenite's callback signature: the error is the response to send"
    )]
    let on_path = |request: &Request, response: Response| {
        if request.uri().path() == path {
            client = relayed_for(request.headers());
            Ok(response)
        } else {
            let mut not_found = ErrorResponse::new(None);
            *not_found.status_mut() = tungstenite::http::StatusCode::NOT_FOUND;
            Err(not_found)
        }
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(io, on_path, Some(config())).await?;
    Ok((WsStream::new(ws), client))
}

/// The client a proxy relays, as it says: the last address of
/// `X-Forwarded-For` (the one the proxy itself added: those before it
/// came from the client, who can write anything there, even bytes that
/// are not text), else, only when there is no `X-Forwarded-For` at all,
/// `X-Real-IP`. `None` when the one looked at names no address.
pub fn relayed_for(headers: &tungstenite::http::HeaderMap) -> Option<IpAddr> {
    let parse = |b: &[u8]| std::str::from_utf8(b).ok()?.trim().parse::<IpAddr>().ok();
    match headers.get_all("x-forwarded-for").iter().next_back() {
        Some(last) => last
            .as_bytes()
            .rsplit(|b| *b == b',')
            .next()
            .and_then(parse),
        None => headers.get("x-real-ip").and_then(|v| parse(v.as_bytes())),
    }
}

/// The client's side: the upgrade to a WebSocket at `url`
/// (`wss://HOST[:PORT]/PATH`: its host and port become the `Host` header,
/// its path the request's), over `io`, the proxy's TLS already on it.
pub async fn connect<S>(io: S, url: &str) -> Result<WsStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(url, io, Some(config())).await?;
    Ok(WsStream::new(ws))
}

#[cfg(test)]
mod tests {
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair() -> (
        WsStream<tokio::io::DuplexStream>,
        WsStream<tokio::io::DuplexStream>,
    ) {
        let (a, b) = duplex(256 * 1024);
        let server = tokio::spawn(accept(a, "/veil"));
        let client = connect(b, "wss://proxy.example/veil").await.unwrap();
        (server.await.unwrap().unwrap().0, client)
    }

    #[test]
    fn the_relayed_client_is_the_address_the_proxy_added() {
        use tungstenite::http::{HeaderMap, HeaderValue};
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            relayed_for(&h)
        };
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(headers(&[]), None);
        assert_eq!(
            headers(&[("x-forwarded-for", "203.0.113.7")]),
            ip("203.0.113.7")
        );
        // What the client wrote first, the proxy's addition last.
        assert_eq!(
            headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.7")]),
            ip("203.0.113.7")
        );
        assert_eq!(
            headers(&[
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-for", "2001:db8::7")
            ]),
            ip("2001:db8::7")
        );
        assert_eq!(
            headers(&[("x-real-ip", "198.51.100.9")]),
            ip("198.51.100.9")
        );
        assert_eq!(headers(&[("x-forwarded-for", "unknown")]), None);
        // What the client wrote cannot hide what the proxy added, nor
        // bring in its own X-Real-IP instead.
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"\xff\xfe, 203.0.113.7").unwrap(),
        );
        h.append("x-real-ip", HeaderValue::from_static("198.51.100.1"));
        assert_eq!(relayed_for(&h), ip("203.0.113.7"));
        assert_eq!(
            headers(&[
                ("x-forwarded-for", "garbage"),
                ("x-real-ip", "198.51.100.1")
            ]),
            None
        );
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_intact_in_large_messages() {
        let (mut server, mut client) = pair().await;
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.flush().await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data, "a close is the end of the stream");
        let _client = writer.await.unwrap();
        // A WebSocket close ends both directions (no half-close as TCP's).
        assert!(server.write_all(b"late").await.is_err() || server.flush().await.is_err());
    }

    #[tokio::test]
    async fn writes_are_held_until_a_flush_or_a_full_message() {
        let (mut server, mut client) = pair().await;
        client.write_all(b"one").await.unwrap();
        let mut buf = [0u8; 16];
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(50), server.read(&mut buf)).await;
        assert!(early.is_err(), "nothing sent before the flush");
        client.write_all(b" two").await.unwrap();
        client.flush().await.unwrap();
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"one two", "one message for both writes");
        // More than a message's worth goes out without a flush.
        client.write_all(&vec![7; MAX_FRAME + 1]).await.unwrap();
        let mut big = vec![0u8; MAX_FRAME];
        server.read_exact(&mut big).await.unwrap();
        assert!(big.iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn another_path_is_not_found() {
        let (a, b) = duplex(64 * 1024);
        let server = tokio::spawn(accept(a, "/veil"));
        let err = connect(b, "wss://proxy.example/other").await.err().unwrap();
        match err {
            WsError::Http(response) => assert_eq!(response.status(), 404),
            e => panic!("{e}"),
        }
        assert!(server.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_plain_request_is_no_websocket() {
        let (a, mut b) = duplex(64 * 1024);
        let server = tokio::spawn(accept(a, "/veil"));
        b.write_all(b"GET /veil HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        assert!(server.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_text_message_is_an_error() {
        let (a, b) = duplex(64 * 1024);
        let server = tokio::spawn(accept(a, "/veil"));
        let (mut raw, _) = tokio_tungstenite::client_async("ws://x/veil", b)
            .await
            .unwrap();
        let (mut server, _) = server.await.unwrap().unwrap();
        send_raw(&mut raw, Message::text("hello")).await;
        let mut buf = [0u8; 16];
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    async fn send_raw<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>, m: Message) {
        let mut m = Some(m);
        std::future::poll_fn(|cx| {
            ready!(Pin::new(&mut *ws).poll_ready(cx)).unwrap();
            if let Some(m) = m.take() {
                Pin::new(&mut *ws).start_send(m).unwrap();
            }
            Pin::new(&mut *ws).poll_flush(cx)
        })
        .await
        .unwrap();
    }
}
