//! TLS 1.3 with mutual authentication against the gateway's own CA, for
//! both ends of the tunnel.

use std::sync::Arc;

use rustls::{
    crypto::ring as provider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig,
};

use crate::state::Profile;

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

fn certs(pem: &str, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Pem { what, source })
}

fn key(pem: &str, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| TlsError::Pem { what, source })
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca_pem, "CA certificate")? {
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
            certs(cert_pem, "server certificate")?,
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
            certs(&profile.cert, "client certificate")?,
            key(&profile.key, "client key")?,
        )?;
    let name = ServerName::try_from(profile.server_name.clone())
        .map_err(|_| TlsError::ServerName(profile.server_name.clone()))?;
    Ok((config, name))
}

/// A tunnel's socket as its TLS stream sees it: reads go through a 64 KiB
/// buffer. rustls asks for 4 KiB at a time, and one `recv` per 4 KiB was
/// most of the tunnel's system calls at gigabit rates.
pub type BufferedTcp = tokio::io::BufReader<tokio::net::TcpStream>;

/// Wraps a tunnel socket for [`BufferedTcp`] reads.
pub fn buffered(tcp: tokio::net::TcpStream) -> BufferedTcp {
    tokio::io::BufReader::with_capacity(64 * 1024, tcp)
}
