//! The revocation list shared by several gateways (`--revocations FILE|URL`,
//! [`crate::crl`]): re-read every second (a file) or two (a URL), checked
//! against the CA, and applied at once to live sessions and handshakes.
//!
//! With a list in force, a client certificate the CA signed is accepted
//! even if this gateway's own registry does not hold it (it was issued on
//! another host: the CA's signature is the registration, the list the
//! revocation), named by its common name, under the gateway's default
//! limits. Until a list has verified, such clients are refused: a gateway
//! that cannot see the revocations lets in only the clients it knows.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use super::{accept::Refused, Shared};
use crate::{
    crl::{self, RevocationList},
    state::{fingerprint, ClientRecord},
};

/// How often a list on a file is re-read, and one behind a URL fetched.
const FILE_INTERVAL: Duration = Duration::from_secs(1);
const URL_INTERVAL: Duration = Duration::from_secs(2);
/// A fetch that takes longer is abandoned until the next one.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest list taken (a revoked certificate costs ~40 bytes).
const MAX_LIST: usize = 16 << 20;

/// Where the list comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    /// `http://` or `https://` (the signature, not the channel, is what
    /// makes it trusted; https hides which clients are revoked).
    Url(String),
}

impl Source {
    pub fn parse(text: &str) -> Source {
        match text.starts_with("https://") || text.starts_with("http://") {
            true => Source::Url(text.to_owned()),
            false => Source::File(text.into()),
        }
    }

    fn interval(&self) -> Duration {
        match self {
            Source::File(_) => FILE_INTERVAL,
            Source::Url(_) => URL_INTERVAL,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Url(url) => f.write_str(url),
        }
    }
}

/// The list in force and what it let in.
pub(super) struct Revocations {
    source: Source,
    ca_pem: String,
    /// The last list that verified; `None` until one does.
    list: RwLock<Option<RevocationList>>,
    /// The digest of the bytes last fetched: an unchanged list is neither
    /// verified nor warned about again.
    last: Mutex<Option<ring::digest::Digest>>,
    /// The last fetch failure warned about.
    said: Mutex<Option<String>>,
    /// Clients the CA issued on another host, met here, by fingerprint:
    /// so that a revocation closes their sessions too.
    elsewhere: RwLock<HashMap<String, ClientRecord>>,
}

impl Revocations {
    pub(super) fn new(source: Source, ca_pem: String) -> Self {
        Revocations {
            source,
            ca_pem,
            list: RwLock::new(None),
            last: Mutex::new(None),
            said: Mutex::new(None),
            elsewhere: RwLock::new(HashMap::new()),
        }
    }

    /// Fetches and verifies the list; installs it if it is newer. `true`
    /// when a new list came into force. Each failure is warned about once,
    /// not at every poll.
    async fn refresh(&self) -> bool {
        let fetched = match fetch(&self.source).await {
            Ok(bytes) => bytes,
            Err(e) => {
                let why = format!("reading the revocation list {}: {e:#}", self.source);
                let mut said = self.said.lock().expect("said lock");
                if said.as_deref() != Some(why.as_str()) {
                    warn!("{why}; the list in force stays");
                    *said = Some(why);
                }
                return false;
            }
        };
        *self.said.lock().expect("said lock") = None;
        let digest = ring::digest::digest(&ring::digest::SHA256, &fetched);
        {
            let mut last = self.last.lock().expect("last lock");
            if last.as_ref().is_some_and(|d| d.as_ref() == digest.as_ref()) {
                return false;
            }
            *last = Some(digest);
        }
        match self.accept(&fetched) {
            Ok(list) => {
                info!(
                    number = list.number,
                    revoked = list.serials.len(),
                    source = %self.source,
                    "revocation list in force"
                );
                if let Some(next) = list.next_update.filter(|n| *n < now()) {
                    warn!(next_update = next, "the revocation list is past its next update: re-sign it (`veil-user client revocations`)");
                }
                *self.list.write().expect("list lock") = Some(list);
                true
            }
            Err(why) => {
                warn!("{why}: the list in force stays");
                false
            }
        }
    }

    /// A list that verifies and is not older than the one in force.
    fn accept(&self, bytes: &[u8]) -> Result<RevocationList, String> {
        let list = crl::verify(bytes, &self.ca_pem)
            .map_err(|e| format!("revocation list {} refused: {e}", self.source))?;
        if let Some(current) = &*self.list.read().expect("list lock") {
            if list.number <= current.number {
                return Err(format!(
                    "revocation list {} refused: number {} is not above {} in force (an old list replayed?)",
                    self.source, list.number, current.number
                ));
            }
        }
        Ok(list)
    }

    fn revokes(&self, serial: &str) -> bool {
        self.list
            .read()
            .expect("list lock")
            .as_ref()
            .is_some_and(|l| l.revokes(serial))
    }

    fn in_force(&self) -> bool {
        self.list.read().expect("list lock").is_some()
    }
}

impl Shared {
    /// A certificate the CA signed (the handshake checked it) that this
    /// gateway's registry does not hold: a client issued on another host,
    /// if a revocation list is in force and does not name it.
    pub(super) fn issued_elsewhere(
        &self,
        cert: &CertificateDer<'_>,
    ) -> Result<ClientRecord, Refused> {
        let Some(revocations) = &self.revocations else {
            return Err(Refused::UnknownClient);
        };
        if !revocations.in_force() {
            return Err(Refused::UnknownClient);
        }
        let fingerprint = fingerprint(cert);
        if let Some(known) = revocations
            .elsewhere
            .read()
            .expect("elsewhere lock")
            .get(&fingerprint)
        {
            return Ok(known.clone());
        }
        let (serial, name) = crl::serial_and_name(cert).map_err(|_| Refused::UnknownClient)?;
        let name = name
            .filter(|n| crate::state::valid_name(n))
            .ok_or(Refused::UnknownClient)?;
        // A name this registry holds under another certificate: not ours
        // to guess which is current (the registry may be behind). A record
        // of that name that does not read counts as held: its client is
        // refused, not let in under the default limits.
        let local = self
            .registry
            .read()
            .expect("registry lock")
            .values()
            .any(|r| r.name == name);
        if local || self.state.has_record(&name) {
            return Err(Refused::UnknownClient);
        }
        let record = ClientRecord {
            name,
            fingerprint: fingerprint.clone(),
            created: 0,
            revoked: None,
            retired: Vec::new(),
            serial: Some(serial),
            retired_serials: Vec::new(),
            limits: Default::default(),
        };
        revocations
            .elsewhere
            .write()
            .expect("elsewhere lock")
            .insert(fingerprint, record.clone());
        Ok(record)
    }

    /// Whether the certificate `fingerprint` was let in as issued on
    /// another host.
    pub(super) fn admitted_elsewhere(&self, fingerprint: &str) -> bool {
        self.revocations.as_ref().is_some_and(|r| {
            r.elsewhere
                .read()
                .expect("elsewhere lock")
                .contains_key(fingerprint)
        })
    }

    /// Marks `record` revoked if the list in force names its certificate.
    pub(super) fn check_revocation_list(
        &self,
        cert: &CertificateDer<'_>,
        record: &mut ClientRecord,
    ) {
        let Some(revocations) = &self.revocations else {
            return;
        };
        let serial = match &record.serial {
            Some(s) => s.clone(),
            None => match crl::serial_and_name(cert) {
                Ok((s, _)) => s,
                Err(_) => return,
            },
        };
        if revocations.revokes(&serial) {
            record.revoked.get_or_insert_with(now);
        }
    }

    /// The fingerprints of the certificates the list in force revokes,
    /// among those this gateway knows.
    pub(super) fn revoked_by_list(&self) -> HashSet<String> {
        let Some(revocations) = &self.revocations else {
            return HashSet::new();
        };
        let list = revocations.list.read().expect("list lock");
        let Some(list) = list.as_ref() else {
            return HashSet::new();
        };
        let revoked = |r: &ClientRecord| r.serial.as_deref().is_some_and(|s| list.revokes(s));
        let registry = self.registry.read().expect("registry lock");
        let elsewhere = revocations.elsewhere.read().expect("elsewhere lock");
        registry
            .values()
            .chain(elsewhere.values())
            .filter(|r| revoked(r))
            .map(|r| r.fingerprint.clone())
            .collect()
    }
}

/// Reads the list once at start (so that clients issued elsewhere get in
/// from the first handshake), then polls it for ever.
pub(super) async fn watch(shared: Arc<Shared>) -> Result<()> {
    let Some(revocations) = &shared.revocations else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(revocations.source.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if revocations.refresh().await {
            shared.close_revoked();
        }
    }
}

/// The first read, before the listener serves: a warning if it fails.
pub(super) async fn first_read(revocations: &Revocations) {
    if !revocations.refresh().await {
        warn!(
            source = %revocations.source,
            "no revocation list in force yet: only the clients in this gateway's registry are let in until one verifies"
        );
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn fetch(source: &Source) -> Result<Vec<u8>> {
    match source {
        Source::File(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || super::read_bounded(&path, MAX_LIST)).await?
        }
        Source::Url(url) => tokio::time::timeout(FETCH_TIMEOUT, get(url))
            .await
            .context("timed out")?,
    }
}

/// `GET url` (HTTP/1.0: the body runs to the close), the body of a 200.
async fn get(url: &str) -> Result<Vec<u8>> {
    let (tls, rest) = match url.split_once("://") {
        Some(("https", rest)) => (true, rest),
        Some(("http", rest)) => (false, rest),
        _ => bail!("not an http:// or https:// URL"),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse::<u16>().context("the URL's port")?)
        }
        _ => (authority, if tls { 443 } else { 80 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || path.contains(char::is_whitespace) {
        bail!("not a URL this gateway can fetch");
    }
    let tcp = tokio::net::TcpStream::connect((host, port)).await?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: veil-user\r\n\r\n");
    let response = match tls {
        false => exchange(tcp, &request).await?,
        true => {
            let roots = veil_tunnel::tls::system_roots()?;
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(host.to_owned())?;
            let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await?;
            exchange(stream, &request).await?
        }
    };
    body_of(&response)
}

async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> Result<Vec<u8>> {
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    (&mut stream)
        .take(MAX_LIST as u64 + 64 * 1024)
        .read_to_end(&mut response)
        .await?;
    Ok(response)
}

/// The body of a complete HTTP/1.0 response with status 200.
fn body_of(response: &[u8]) -> Result<Vec<u8>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = parsed.parse(response)? else {
        bail!("the response ended in its headers");
    };
    match parsed.code {
        Some(200) => {}
        code => bail!("HTTP status {}", code.unwrap_or(0)),
    }
    let body = &response[head..];
    if body.len() > MAX_LIST {
        bail!("larger than {MAX_LIST} bytes");
    }
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_files_or_urls() {
        assert_eq!(
            Source::parse("/srv/veil/revocations.crl"),
            Source::File("/srv/veil/revocations.crl".into())
        );
        assert_eq!(
            Source::parse("https://ca.example/revocations.crl"),
            Source::Url("https://ca.example/revocations.crl".into())
        );
    }

    #[test]
    fn only_a_200_gives_a_body() {
        assert_eq!(
            body_of(b"HTTP/1.0 200 OK\r\nContent-Type: application/pkix-crl\r\n\r\nLIST").unwrap(),
            b"LIST"
        );
        assert!(body_of(b"HTTP/1.1 404 Not Found\r\n\r\nnope").is_err());
        assert!(body_of(b"HTTP/1.1 200 OK\r\nX: y").is_err());
    }
}
