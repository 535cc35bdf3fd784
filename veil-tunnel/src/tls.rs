//! TLS 1.3 with mutual authentication against the gateway's own CA, for
//! both ends of the tunnel.
//!
//! Probe resistance: the gateway asks for a client certificate but does
//! not require one, so that a stranger's handshake completes as with any
//! HTTPS site (and meets the fallback site); its certificate may be an
//! operator's (e.g. from ACME), which clients check by a pinned key or the
//! system's roots ([`ServerTrust`]).

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use base64::Engine as _;
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        WebPkiServerVerifier,
    },
    crypto::{ring as provider, WebPkiSupportedAlgorithms},
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime},
    server::WebPkiClientVerifier,
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};

use crate::profile::{Profile, ServerTrust};

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
    #[error("server_pin `{0}` is not `sha256/` and the base64 of 32 bytes")]
    Pin(String),
    #[error("no usable root certificate on this system ({0}): install ca-certificates, or set SSL_CERT_FILE to a PEM bundle")]
    NoSystemRoots(String),
    #[error("server certificate verifier")]
    ServerVerifier(#[source] rustls::server::VerifierBuilderError),
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

/// ring's cipher suites, AES-128-GCM with SHA-256 first. rustls lists
/// AES-256-GCM with SHA-384 first; a handshake hashes its transcript and
/// derives its keys with the suite's hash, and SHA-384 took 6 % of the
/// gateway's CPU in a wave of new sessions (SHA-256 has instructions of
/// its own on current x86 and ARM CPUs). A veil client proposes this order and the
/// gateway follows the client's, as web servers do.
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    let mut provider = provider::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

/// The certificates of a PEM text as the only trusted roots.
pub fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_pem, "CA certificate")? {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The gateway's side: client certificates requested, checked against the
/// CA when given, but not required, as an ordinary HTTPS site's handshake
/// goes: the gateway sends whoever has none to its fallback site. The
/// request names no CA (a list naming veil's would give it away). TLS 1.2
/// is offered for the same reason; sessions take only TLS 1.3 (see
/// [`is_tunnel_grade`]). Revocation is checked by the gateway after the
/// handshake, against its client registry.
pub fn server_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(crypto_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider.clone())
            .allow_unauthenticated()
            .clear_root_hint_subjects()
            .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certificates(cert_pem, "server certificate")?,
            key(key_pem, "server key")?,
        )?;
    // As a web server answers a browser that offers h2 and http/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Returning clients resume (no certificate signed or verified again)
    // from stateless tickets: rustls's session cache holds 256 sessions, so
    // with thousands of clients most came back to a full handshake. The
    // ticket keys rotate every 6 hours and never leave the process. A
    // resumed connection still names the client's certificate
    // (`peer_certificates`, from the ticket), which the gateway checks
    // against its registry and revocation list as after a full handshake.
    config.ticketer = provider::Ticketer::new()?;
    Ok(config)
}

/// Whether a server connection may carry a session: TLS 1.3 with a client
/// certificate (the CA's, as the handshake checked). Anything else is a
/// stranger, for the fallback site.
pub fn is_tunnel_grade(conn: &rustls::ServerConnection) -> bool {
    conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3)
        && conn.peer_certificates().is_some_and(|c| !c.is_empty())
}

/// The pin of a certificate: `sha256/` and the base64 of the SHA-256 of its
/// SubjectPublicKeyInfo, as `curl --pinnedpubkey` and HPKP spell it.
pub fn spki_pin(cert_der: &[u8]) -> Result<String, TlsError> {
    let der = CertificateDer::from(cert_der);
    let cert = webpki::EndEntityCert::try_from(&der).map_err(|_| {
        TlsError::Rustls(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ))
    })?;
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        cert.subject_public_key_info().as_ref(),
    );
    Ok(format!(
        "sha256/{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    ))
}

/// The pin of the first certificate of a PEM chain.
pub fn spki_pin_pem(cert_pem: &str) -> Result<String, TlsError> {
    let chain = certificates(cert_pem, "server certificate")?;
    let first = chain
        .first()
        .ok_or(TlsError::Rustls(rustls::Error::NoCertificatesPresented))?;
    spki_pin(first)
}

/// The DNS names the first certificate of a PEM chain is valid for.
pub fn dns_names_pem(cert_pem: &str) -> Result<Vec<String>, TlsError> {
    let chain = certificates(cert_pem, "server certificate")?;
    let first = chain
        .first()
        .ok_or(TlsError::Rustls(rustls::Error::NoCertificatesPresented))?;
    let cert = webpki::EndEntityCert::try_from(first).map_err(|_| {
        TlsError::Rustls(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ))
    })?;
    Ok(cert.valid_dns_names().map(str::to_owned).collect())
}

fn parse_pin(pin: &str) -> Result<[u8; 32], TlsError> {
    pin.strip_prefix("sha256/")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|d| <[u8; 32]>::try_from(d).ok())
        .ok_or_else(|| TlsError::Pin(pin.to_owned()))
}

/// The system's root CAs, as OpenSSL finds them (`SSL_CERT_FILE`, or the
/// distribution's bundle: Debian's ca-certificates). Certificates webpki
/// cannot use are skipped; none at all is an error.
pub fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = match found.errors.first() {
            Some(e) => e.to_string(),
            None => "none found".into(),
        };
        return Err(TlsError::NoSystemRoots(why));
    }
    Ok(roots)
}

/// The client's check of an operator's certificate: the pinned key, or a
/// chain to the system's roots for the profile's name, or (so that a
/// profile keeps working while its gateway still has veil's own) the CA.
#[derive(Debug)]
struct OperatorCert {
    pin: Option<[u8; 32]>,
    chains: Vec<Arc<WebPkiServerVerifier>>,
    algs: WebPkiSupportedAlgorithms,
}

impl OperatorCert {
    fn new(trust: &ServerTrust, ca: RootCertStore) -> Result<Self, TlsError> {
        let provider = Arc::new(provider::default_provider());
        let verifier = |roots: RootCertStore| {
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(TlsError::ServerVerifier)
        };
        let mut chains = vec![verifier(ca)?];
        if trust.system_roots {
            chains.push(verifier(system_roots()?)?);
        }
        Ok(Self {
            pin: trust.pin.as_deref().map(parse_pin).transpose()?,
            chains,
            algs: provider.signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for OperatorCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(pin) = &self.pin {
            if spki_pin(end_entity).ok().and_then(|p| parse_pin(&p).ok()) == Some(*pin) {
                return Ok(ServerCertVerified::assertion());
            }
        }
        let mut last = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        for chain in &self.chains {
            match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
                Ok(ok) => return Ok(ok),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The client's side: trusts the CA in its profile, and where the profile
/// says so an operator's certificate ([`ServerTrust`]).
pub fn client_config(profile: &Profile) -> Result<(ClientConfig, ServerName<'static>), TlsError> {
    let provider = Arc::new(crypto_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = if profile.server_trust.is_empty() {
        builder.with_root_certificates(roots(&profile.ca)?)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(OperatorCert::new(
                &profile.server_trust,
                roots(&profile.ca)?,
            )?))
    };
    let config = builder.with_client_auth_cert(
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
