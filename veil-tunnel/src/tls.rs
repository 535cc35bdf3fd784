//! TLS 1.3 with mutual authentication against the gateway's own CA, for
//! both ends of the tunnel.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use rustls::{
    crypto::ring as provider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::profile::Profile;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the {what} is not valid PEM")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("`{0}` is not a valid server name")]
    ServerName(String),
}

/// The certificates of a PEM text; `what` names it in the error.
pub fn certificates(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem { what, source })
}

fn key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| TlsError::Pem { what, source })
}

/// The certificates of a PEM text as the only trusted roots.
pub fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_pem, "CA certificate")? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The gateway's side: TLS 1.3 only, client certificates required and
/// checked against the CA. (Revocation is checked by the gateway after the
/// handshake, against its client registry.)
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(provider::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider.clone())
            .build()?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certificates(cert_pem, "server certificate")?,
            key(key_pem, "server key")?,
        )?;
    Ok(config)
}

/// The client's side: trusts only the CA pinned in its profile.
pub fn client_config(profile: &Profile) -> Result<(ClientConfig, ServerName<'static>), TlsError> {
    let provider = Arc::new(provider::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&profile.ca)?)
        .with_client_auth_cert(
            certificates(&profile.cert, "client certificate")?,
            key(&profile.key, "client key")?,
        )?;
    let name = ServerName::try_from(profile.server_name.clone())
        .map_err(|_| TlsError::ServerName(profile.server_name.clone()))?;
    Ok((config, name))
}

/// A tunnel's socket as its TLS stream sees it: reads go through a buffer
/// of our own. rustls asks for 4 KiB at a time, and one `recv` per 4 KiB was
/// most of the tunnel's system calls at gigabit rates, so an authenticated
/// tunnel reads 64 KiB at once ([`BufferedTcp::grow`]). Before that the
/// buffer is empty: a stranger's handshake costs no 64 KiB.
pub struct BufferedTcp {
    tcp: TcpStream,
    buf: Box<[u8]>,
    /// `buf[pos..filled]` is read from the socket, not yet by the caller.
    pos: usize,
    filled: usize,
}

/// The read buffer of an authenticated tunnel.
pub const TUNNEL_READ_BUFFER: usize = 64 * 1024;

impl BufferedTcp {
    pub fn get_ref(&self) -> &TcpStream {
        &self.tcp
    }

    /// Reads through a `capacity`-byte buffer from now on (never shrinks
    /// what is buffered).
    pub fn grow(&mut self, capacity: usize) {
        if capacity > self.buf.len() {
            let mut buf = vec![0; capacity].into_boxed_slice();
            let pending = self.filled - self.pos;
            buf[..pending].copy_from_slice(&self.buf[self.pos..self.filled]);
            (self.buf, self.pos, self.filled) = (buf, 0, pending);
        }
    }
}

/// Wraps a tunnel socket, unbuffered until [`BufferedTcp::grow`].
pub fn buffered(tcp: TcpStream) -> BufferedTcp {
    BufferedTcp {
        tcp,
        buf: Box::default(),
        pos: 0,
        filled: 0,
    }
}

impl AsyncRead for BufferedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.filled {
            // Nothing buffered: a caller asking for as much as the buffer
            // holds reads directly (and so does everyone before `grow`).
            if out.remaining() >= this.buf.len() {
                return Pin::new(&mut this.tcp).poll_read(cx, out);
            }
            let mut fill = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut fill))?;
            (this.pos, this.filled) = (0, fill.filled().len());
        }
        let n = out.remaining().min(this.filled - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for BufferedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn reads_are_direct_until_grown_then_buffered_and_lose_nothing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            tcp.write_all(&data).await.unwrap();
            data
        });
        let mut r = buffered(TcpStream::connect(addr).await.unwrap());
        assert_eq!(r.buf.len(), 0, "no buffer before authentication");
        let mut got = vec![0u8; 100];
        r.read_exact(&mut got).await.unwrap();
        r.grow(TUNNEL_READ_BUFFER);
        assert_eq!(r.buf.len(), TUNNEL_READ_BUFFER);
        let mut small = [0u8; 7];
        loop {
            match r.read(&mut small).await.unwrap() {
                0 => break,
                n => got.extend_from_slice(&small[..n]),
            }
        }
        assert_eq!(got, writer.await.unwrap());
    }
}
