//! The gateway's state directory: its CA, its server certificate, the
//! clients it issued profiles to (and revoked), the address each client
//! keeps, and where the gateway serves.
//!
//! ```text
//! /var/lib/veil/
//!   ca.crt  ca.key            the gateway's own CA (clients pin it)
//!   server.crt  server.key    the TLS server certificate, signed by the CA
//!   gateway.toml              the endpoint profiles point at
//!   clients/NAME.toml         one per issued profile: fingerprint, revoked
//!   leases.toml               client name -> virtual address
//!   leases.log                leases made since leases.toml was written,
//!                             one `NAME = "ADDRESS"` line each
//!   revocations.crl           the revoked certificates, signed by the CA,
//!                             for every gateway (`--revocations`, crate::crl)
//! ```
//!
//! The directory is 0700. Keys, client records and leases are written
//! 0600, certificates and `gateway.toml` 0644; every write goes to a fresh
//! temporary file (created exclusively, never through a symlink) that is
//! then renamed into place, so a crash never leaves half a file and a file
//! or link planted at a predictable name never receives a key.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::{self, Write},
    net::Ipv4Addr,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde::{Deserialize, Serialize};

mod records;

/// The name the server certificate carries and clients verify, whatever
/// address they reach the gateway at: the pinned CA is the trust anchor, so
/// re-addressing a gateway never needs new certificates.
pub const SERVER_NAME: &str = "veil-gateway";
const CA_NAME: &str = "veil gateway CA";
/// The signed revocation list, in the state directory.
pub const REVOCATIONS: &str = "revocations.crl";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not valid: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("generating keys or certificates")]
    Crypto(#[from] rcgen::Error),
    #[error("client name `{0}` is not allowed: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'")]
    BadName(String),
    #[error("a client named `{0}` already exists: pick another name, or revoke it first to issue a new profile under this one")]
    ClientExists(String),
    #[error("no client named `{0}`")]
    NoSuchClient(String),
    #[error("no endpoint is recorded in the state directory yet: start the gateway once, or pass --endpoint HOST:PORT")]
    NoEndpoint,
    #[error("{path} already exists (a file or a symlink): pick another --out, remove it, or pass --force to replace it")]
    Exists { path: PathBuf },
}

/// One issued client profile, as recorded by the gateway.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientRecord {
    pub name: String,
    /// SHA-256 of the client certificate (DER), hex.
    pub fingerprint: String,
    /// Seconds since the epoch.
    pub created: u64,
    /// Seconds since the epoch, once revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<u64>,
    /// Fingerprints of the certificates of earlier profiles under this
    /// name, revoked before it was issued again: still refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<String>,
    /// The certificate's serial number (hex), as the revocation list
    /// names it; none for profiles issued before the lists existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// The serial numbers of the retired certificates (those known).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_serials: Vec<String>,
    /// Its own rate limit and quota (`client limit`), over the gateway's.
    #[serde(
        default,
        skip_serializing_if = "crate::ratelimit::ClientLimits::is_empty"
    )]
    pub limits: crate::ratelimit::ClientLimits,
}

impl ClientRecord {
    /// The record, then one revoked record per retired certificate: what
    /// the gateway's registry holds, by fingerprint.
    pub fn with_retired(self) -> Vec<ClientRecord> {
        let revoked = self.revoked.unwrap_or(self.created);
        let mut all: Vec<ClientRecord> = self
            .retired
            .iter()
            .map(|fingerprint| ClientRecord {
                name: self.name.clone(),
                fingerprint: fingerprint.clone(),
                created: self.created,
                revoked: Some(revoked),
                retired: Vec::new(),
                serial: None,
                retired_serials: Vec::new(),
                limits: self.limits,
            })
            .collect();
        all.insert(0, self);
        all
    }
}

pub use veil_tunnel::profile::Profile;

#[derive(Debug, Default, Serialize, Deserialize)]
struct GatewayRecord {
    endpoint: Option<String>,
    /// The operator's certificate (`--cert`), for the profiles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    operator: Option<OperatorIdentity>,
}

/// What profiles need to check an operator's server certificate: the name
/// it is issued for and its key's pin.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorIdentity {
    pub server_name: String,
    pub pin: String,
}

/// What [`StateDir::client_records`] found.
#[derive(Debug)]
pub struct ClientRecords {
    /// The records that read, by name, if a record was added, changed or
    /// removed, or the unreadable files are others, since the previous
    /// [`StateDir::client_records`] (always on the first); `None` when
    /// nothing changed: what the caller had from before is current.
    pub records: Option<Vec<ClientRecord>>,
    /// The files that did not: their clients are unknown to the gateway,
    /// so refused, until the file is fixed or removed.
    pub unreadable: Vec<Unreadable>,
}

/// A client record that could not be read or parsed.
#[derive(Debug)]
pub struct Unreadable {
    pub path: PathBuf,
    /// The client the file is named after (`clients/NAME.toml`).
    pub name: Option<String>,
    pub error: StateError,
    /// Not found unreadable by the previous [`StateDir::client_records`]
    /// on this `StateDir`: a caller that polls warns about a file once,
    /// not at every poll. ([`StateDir::clients`] does not count as a call.)
    pub new: bool,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        let mut source = std::error::Error::source(&self.error);
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        match &self.name {
            Some(name) => write!(
                f,
                "; client `{name}` is refused until the file is fixed or removed (`veil-user client add {name}` issues a new profile once it is removed)"
            ),
            None => f.write_str("; the file is ignored: remove it"),
        }
    }
}

/// The snapshot of the leases, and the log of those made since.
const LEASES: &str = "leases.toml";
const LEASE_LOG: &str = "leases.log";

/// The lease log, open for appending.
struct LeaseLog {
    file: fs::File,
    /// Complete lines in it.
    lines: usize,
}

impl LeaseLog {
    /// Opens (creating it 0600, never through a symlink) the log, cutting
    /// off an incomplete last line.
    fn open(path: &Path) -> Result<Self, StateError> {
        let file = fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io_err("opening", path))?;
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut &file, &mut bytes).map_err(io_err("reading", path))?;
        let complete = complete_lines(&bytes);
        if complete.len() < bytes.len() {
            file.set_len(complete.len() as u64)
                .map_err(io_err("repairing", path))?;
        }
        // A new file's name reaches the disk with its directory.
        if let Some(dir) = path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("writing", dir))?;
        }
        let lines = complete.iter().filter(|&&b| b == b'\n').count();
        Ok(LeaseLog { file, lines })
    }
}

/// A lease log's bytes up to its last newline. What follows is an append
/// a crash cut short, never acknowledged: any bytes at all, not even
/// UTF-8 (a torn block after a power loss), so it is cut before decoding.
fn complete_lines(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)]
}

/// The leases of a lease log, in order: `NAME = "ADDRESS"` lines. An
/// incomplete last line is left out ([`complete_lines`]).
fn lease_lines(bytes: &[u8]) -> Result<Vec<(String, Ipv4Addr)>, String> {
    let complete = std::str::from_utf8(complete_lines(bytes))
        .map_err(|e| format!("not UTF-8 after byte {}", e.valid_up_to()))?;
    complete
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let bad = || format!("line {}: `{line}` is not NAME = \"ADDRESS\"", i + 1);
            let (name, vip) = line.split_once(" = ").ok_or_else(bad)?;
            let vip = vip
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .and_then(|v| v.parse().ok())
                .ok_or_else(bad)?;
            if !valid_name(name) {
                return Err(bad());
            }
            Ok((name.to_owned(), vip))
        })
        .collect()
}

/// A read of `clients/`, and the cache's generation after it.
struct Found {
    unreadable: Vec<Unreadable>,
    generation: u64,
}

pub struct StateDir {
    root: PathBuf,
    /// The client records found unreadable by the last `client_records`.
    unreadable: std::sync::Mutex<std::collections::BTreeSet<PathBuf>>,
    /// The records as last read, and the generation `client_records`
    /// last returned.
    cache: std::sync::Mutex<records::RecordCache>,
    reported: std::sync::atomic::AtomicU64,
    /// The lease log, once opened.
    lease_log: std::sync::Mutex<Option<LeaseLog>>,
}

impl ClientRecords {
    /// Whether anything changed ([`Self::records`]).
    pub fn changed(&self) -> bool {
        self.records.is_some()
    }
}

impl StateDir {
    /// Opens (creating it 0700 if needed) the state directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StateError> {
        let root = root.into();
        for dir in [root.clone(), root.join("clients")] {
            fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        }
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .map_err(io_err("securing", &root))?;
        Ok(Self {
            root,
            unreadable: Default::default(),
            cache: Default::default(),
            reported: std::sync::atomic::AtomicU64::new(u64::MAX),
            lease_log: Default::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The CA, created on first use.
    pub fn ca(&self) -> Result<Ca, StateError> {
        let (cert_path, key_path) = (self.root.join("ca.crt"), self.root.join("ca.key"));
        if !cert_path.exists() {
            let key = KeyPair::generate()?;
            let cert = ca_params().self_signed(&key)?;
            write_secret(&key_path, &key.serialize_pem())?;
            write_file(&cert_path, &cert.pem())?;
        }
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| StateError::Corrupt {
            path: key_path.clone(),
            message: e.to_string(),
        })?;
        Ok(Ca {
            cert_pem: read(&cert_path)?,
            key,
        })
    }

    /// The server certificate and key (PEM), created on first use.
    pub fn server_identity(&self, ca: &Ca) -> Result<(String, String), StateError> {
        let (cert_path, key_path) = (self.root.join("server.crt"), self.root.join("server.key"));
        if !cert_path.exists() {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(vec![SERVER_NAME.to_owned()])?;
            params
                .distinguished_name
                .push(DnType::CommonName, SERVER_NAME);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let cert = params.signed_by(&key, &ca.issuer())?;
            write_secret(&key_path, &key.serialize_pem())?;
            write_file(&cert_path, &cert.pem())?;
        }
        Ok((read(&cert_path)?, read(&key_path)?))
    }

    /// Records the endpoint profiles will point at by default.
    pub fn record_endpoint(&self, endpoint: &str) -> Result<(), StateError> {
        self.record_gateway(endpoint, None)
    }

    /// Records the endpoint and the operator's certificate (none: the
    /// gateway's own) that profiles will be issued for.
    pub fn record_gateway(
        &self,
        endpoint: &str,
        operator: Option<OperatorIdentity>,
    ) -> Result<(), StateError> {
        let record = GatewayRecord {
            endpoint: Some(endpoint.to_owned()),
            operator,
        };
        write_file(
            &self.root.join("gateway.toml"),
            &toml::to_string(&record).expect("serializes"),
        )
    }

    pub fn endpoint(&self) -> Result<Option<String>, StateError> {
        Ok(self.gateway_record()?.endpoint)
    }

    /// The operator's certificate the gateway last ran with, if any.
    pub fn operator(&self) -> Result<Option<OperatorIdentity>, StateError> {
        Ok(self.gateway_record()?.operator)
    }

    fn gateway_record(&self) -> Result<GatewayRecord, StateError> {
        let path = self.root.join("gateway.toml");
        if !path.exists() {
            return Ok(GatewayRecord::default());
        }
        parse(&path)
    }

    /// Issues a profile for a new client, or for a revoked one again (its
    /// earlier certificates stay refused: see [`ClientRecord::retired`]).
    /// `endpoints`: where the client connects, in order; empty: the
    /// recorded one.
    pub fn add_client(&self, name: &str, endpoints: &[String]) -> Result<Profile, StateError> {
        check_name(name)?;
        let record_path = self.client_path(name);
        let (mut retired, mut retired_serials) = (Vec::new(), Vec::new());
        if record_path.exists() {
            let old: ClientRecord = parse(&record_path)?;
            if old.revoked.is_none() {
                return Err(StateError::ClientExists(name.to_owned()));
            }
            retired = old.retired;
            retired.push(old.fingerprint);
            retired_serials = old.retired_serials;
            retired_serials.extend(old.serial);
        }
        let endpoints = match endpoints {
            [] => vec![self.endpoint()?.ok_or(StateError::NoEndpoint)?],
            some => some.to_vec(),
        };
        let ca = self.ca()?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // A serial of our own, recorded: the revocation list names it.
        let serial = crate::crl::new_serial();
        params.serial_number = Some(serial.clone().into());
        let cert = params.signed_by(&key, &ca.issuer())?;
        let record = ClientRecord {
            name: name.to_owned(),
            fingerprint: fingerprint(cert.der()),
            created: now(),
            revoked: None,
            retired,
            serial: Some(crate::crl::serial_hex(&serial)),
            retired_serials,
            limits: Default::default(),
        };
        write_secret(&record_path, &toml::to_string(&record).expect("serializes"))?;
        // With an operator's certificate, the profile names it and pins its
        // key (`client add --system-roots` adds the system's roots).
        let operator = self.operator()?;
        Ok(Profile {
            name: name.to_owned(),
            endpoints,
            server_name: operator
                .as_ref()
                .map_or(SERVER_NAME.to_owned(), |o| o.server_name.clone()),
            ca: ca.cert_pem.clone(),
            cert: cert.pem(),
            key: key.serialize_pem(),
            endpoint_ca: None,
            server_trust: veil_tunnel::profile::ServerTrust {
                pin: operator.map(|o| o.pin),
                system_roots: false,
            },
        })
    }

    /// Every client ever issued whose record reads, revoked ones included,
    /// by name. A record that does not read is left out (see
    /// [`Self::client_records`]).
    pub fn clients(&self) -> Result<Vec<ClientRecord>, StateError> {
        self.read_clients()?;
        Ok(self.cached_records())
    }

    /// Every client record, and the files under `clients/` that do not
    /// read. One bad file never hides the others: a revocation recorded in
    /// a good file must apply whatever else is in the directory. Fails only
    /// if the directory cannot be listed.
    pub fn client_records(&self) -> Result<ClientRecords, StateError> {
        let Found {
            mut unreadable,
            generation,
        } = self.read_clients()?;
        let mut seen = self.unreadable.lock().unwrap_or_else(|e| e.into_inner());
        for u in &mut unreadable {
            u.new = !seen.contains(&u.path);
        }
        let paths: std::collections::BTreeSet<PathBuf> =
            unreadable.iter().map(|u| u.path.clone()).collect();
        let before = self
            .reported
            .swap(generation, std::sync::atomic::Ordering::SeqCst);
        let changed = before != generation || paths != *seen;
        *seen = paths;
        drop(seen);
        Ok(ClientRecords {
            records: changed.then(|| self.cached_records()),
            unreadable,
        })
    }

    /// Every record the last read of `clients/` found, by name.
    fn cached_records(&self) -> Vec<ClientRecord> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .records()
    }

    /// Reads `clients/`, parsing only the files changed since the last
    /// read ([`records`]): the files that do not read, and the cache's
    /// generation after the read.
    fn read_clients(&self) -> Result<Found, StateError> {
        let dir = self.root.join("clients");
        let mut unreadable = Vec::new();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut sweep = cache.begin();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            // Follows a symlink, as reading the file does.
            let stamp = fs::metadata(&path).map(|m| records::Stamp::of(&m));
            if let Ok(stamp) = &stamp {
                if cache.unchanged(&mut sweep, &path, stamp) {
                    continue;
                }
            }
            match stamp
                .map_err(io_err("reading", &path))
                .and_then(|stamp| Ok((stamp, parse::<ClientRecord>(&path)?)))
            {
                Ok((stamp, record)) => cache.found(&mut sweep, path, stamp, record),
                Err(error) => unreadable.push(Unreadable {
                    name: path
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .filter(|s| check_name(s).is_ok())
                        .map(str::to_owned),
                    path,
                    error,
                    new: true,
                }),
            }
        }
        let generation = cache.finish(sweep);
        drop(cache);
        unreadable.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Found {
            unreadable,
            generation,
        })
    }

    /// Marks a client revoked: the gateway refuses it from the next
    /// handshake on and closes its live session.
    pub fn revoke(&self, name: &str) -> Result<ClientRecord, StateError> {
        check_name(name)?;
        let path = self.client_path(name);
        if !path.exists() {
            return Err(StateError::NoSuchClient(name.to_owned()));
        }
        let mut record: ClientRecord = parse(&path)?;
        record.revoked.get_or_insert_with(now);
        write_secret(&path, &toml::to_string(&record).expect("serializes"))?;
        self.write_revocations()?;
        Ok(record)
    }

    /// Where [`Self::write_revocations`] puts the list.
    pub fn revocations_path(&self) -> PathBuf {
        self.root.join(REVOCATIONS)
    }

    /// Signs the list of every revoked certificate (by serial number) with
    /// the CA and writes it to `revocations.crl`, numbered above the one it
    /// replaces: what gateways started with `--revocations` apply. A
    /// revocation is for good: every serial the list it replaces named is
    /// named again, so that a record deleted or made unreadable since does
    /// not let its certificate back in on every gateway.
    pub fn write_revocations(&self) -> Result<crate::crl::RevocationList, StateError> {
        let ca = self.ca()?;
        let mut revoked: Vec<crate::crl::Revoked> = self
            .clients()?
            .iter()
            .flat_map(|r| {
                let at = r.revoked.unwrap_or(r.created);
                let current = r.revoked.and(r.serial.clone());
                current
                    .into_iter()
                    .chain(r.retired_serials.iter().cloned())
                    .map(move |serial| crate::crl::Revoked { serial, at })
            })
            .collect();
        let path = self.revocations_path();
        let previous = fs::read(&path)
            .ok()
            .and_then(|der| crate::crl::verify(&der, &ca.cert_pem).ok())
            .unwrap_or_default();
        let named: HashSet<&str> = revoked.iter().map(|r| r.serial.as_str()).collect();
        let mut kept: Vec<crate::crl::Revoked> = previous
            .serials
            .iter()
            .filter(|s| !named.contains(s.as_str()))
            .map(|serial| crate::crl::Revoked {
                serial: serial.clone(),
                at: previous.issued,
            })
            .collect();
        kept.sort_by(|a, b| a.serial.cmp(&b.serial));
        revoked.extend(kept);
        let now = now();
        let der = crate::crl::sign(&ca.issuer(), &revoked, now.max(previous.number + 1), now)
            .map_err(|e| StateError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?;
        PrivateFile::with_mode(&path, Existing::Replace, 0o644)?.commit(&der)?;
        crate::crl::verify(&der, &ca.cert_pem).map_err(|e| StateError::Corrupt {
            path,
            message: e.to_string(),
        })
    }

    /// Sets a client's own limits (the gateway applies them within a
    /// second, as it does revocations).
    pub fn set_limits(
        &self,
        name: &str,
        limits: crate::ratelimit::ClientLimits,
    ) -> Result<ClientRecord, StateError> {
        check_name(name)?;
        let path = self.client_path(name);
        if !path.exists() {
            return Err(StateError::NoSuchClient(name.to_owned()));
        }
        let mut record: ClientRecord = parse(&path)?;
        record.limits = limits;
        write_secret(&path, &toml::to_string(&record).expect("serializes"))?;
        Ok(record)
    }

    /// Client name -> virtual address, as handed out so far:
    /// `leases.toml`, then what the lease log added since it was written.
    pub fn leases(&self) -> Result<BTreeMap<String, Ipv4Addr>, StateError> {
        let path = self.root.join(LEASES);
        let mut leases = if path.exists() {
            parse(&path)?
        } else {
            BTreeMap::new()
        };
        let log = self.root.join(LEASE_LOG);
        let text = match fs::read(&log) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(leases),
            Err(e) => return Err(io_err("reading", &log)(e)),
        };
        for (name, vip) in lease_lines(&text).map_err(|message| StateError::Corrupt {
            path: log.clone(),
            message,
        })? {
            leases.insert(name, vip);
        }
        Ok(leases)
    }

    /// Appends new leases to the lease log and flushes them to disk; the
    /// lines the log holds now. A line a crash cut short was never
    /// acknowledged: it is cut off before the next append.
    pub fn append_leases(&self, new: &[(String, Ipv4Addr)]) -> Result<usize, StateError> {
        let path = self.root.join(LEASE_LOG);
        let mut log = self.lease_log.lock().unwrap_or_else(|e| e.into_inner());
        if log.is_none() {
            *log = Some(LeaseLog::open(&path)?);
        }
        let open = log.as_mut().expect("opened above");
        use std::fmt::Write as _;
        let mut text = String::new();
        for (name, vip) in new {
            // Names are checked ([`valid_name`]): nothing to quote.
            let _ = writeln!(text, "{name} = \"{vip}\"");
        }
        let written = open
            .file
            .write_all(text.as_bytes())
            .and_then(|()| open.file.sync_data());
        if let Err(e) = written {
            // Whatever half got there is cut off when reopened.
            *log = None;
            return Err(io_err("writing", &path)(e));
        }
        open.lines += new.len();
        Ok(open.lines)
    }

    /// Writes every lease to `leases.toml` (a new file renamed into place)
    /// and empties the lease log, which it holds from then on.
    pub fn save_leases(&self, leases: &BTreeMap<String, Ipv4Addr>) -> Result<(), StateError> {
        let mut log = self.lease_log.lock().unwrap_or_else(|e| e.into_inner());
        write_secret(
            &self.root.join(LEASES),
            &toml::to_string(leases).expect("serializes"),
        )?;
        // The log's lines are all in the file now. A crash before the
        // truncation reaches the disk replays them over it: the same
        // leases, in the same order.
        let path = self.root.join(LEASE_LOG);
        match log.as_mut() {
            Some(open) => {
                open.file
                    .set_len(0)
                    .and_then(|()| open.file.sync_all())
                    .map_err(io_err("emptying", &path))?;
                open.lines = 0;
            }
            None => match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &path)(e)),
            },
        }
        Ok(())
    }

    /// Whether `clients/NAME.toml` is there, readable or not: a gateway
    /// admits a certificate as issued on another host only if this one
    /// holds no record of its name (an unreadable one fails closed).
    pub fn has_record(&self, name: &str) -> bool {
        fs::symlink_metadata(self.client_path(name)).is_ok()
    }

    fn client_path(&self, name: &str) -> PathBuf {
        self.root.join("clients").join(format!("{name}.toml"))
    }
}

/// The gateway's CA, able to sign.
pub struct Ca {
    pub cert_pem: String,
    key: KeyPair,
}

impl Ca {
    pub(crate) fn issuer(&self) -> Issuer<'_, &KeyPair> {
        // The CA's subject and key are all a signature needs: rebuilt from
        // the fixed parameters rather than parsed back from the PEM.
        Issuer::new(ca_params(), &self.key)
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_after = rcgen::date_time_ymd(2099, 12, 31);
    params
}

/// SHA-256 of a certificate's DER, in lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `name` is a client name `client add` would accept.
pub fn valid_name(name: &str) -> bool {
    check_name(name).is_ok()
}

fn check_name(name: &str) -> Result<(), StateError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(StateError::BadName(name.to_owned()))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_owned();
    move |source| StateError::Io { op, path, source }
}

fn read(path: &Path) -> Result<String, StateError> {
    fs::read_to_string(path).map_err(io_err("reading", path))
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StateError> {
    toml::from_str(&read(path)?).map_err(|e| StateError::Corrupt {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Whether [`PrivateFile::create`] may replace what is at its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    /// Refuse with [`StateError::Exists`] if anything (a file, a symlink,
    /// a dangling symlink) is there.
    Refuse,
    /// Write a new file beside it and rename it over: the old file's mode,
    /// owner and other hard links never see the new contents, and a symlink
    /// is replaced, not followed.
    Replace,
}

/// A new file for contents that must stay private (a client profile holds
/// the client's key), mode 0600, written in full by [`Self::commit`] or
/// removed when dropped uncommitted.
///
/// Opened before the contents exist, so that a path that will be refused is
/// refused before anything is issued.
#[derive(Debug)]
pub struct PrivateFile {
    file: fs::File,
    /// Where the contents go: the destination itself for
    /// [`Existing::Refuse`], a temporary beside it for [`Existing::Replace`].
    written: PathBuf,
    /// The destination, when it is reached by a rename.
    rename_to: Option<PathBuf>,
    committed: bool,
}

impl PrivateFile {
    pub fn create(path: &Path, existing: Existing) -> Result<Self, StateError> {
        Self::with_mode(path, existing, 0o600)
    }

    fn with_mode(path: &Path, existing: Existing, mode: u32) -> Result<Self, StateError> {
        match existing {
            Existing::Refuse => {
                let file = create_new(path, mode).map_err(|e| match e.kind() {
                    io::ErrorKind::AlreadyExists => StateError::Exists {
                        path: path.to_owned(),
                    },
                    _ => io_err("creating", path)(e),
                })?;
                Ok(PrivateFile {
                    file,
                    written: path.to_owned(),
                    rename_to: None,
                    committed: false,
                })
            }
            Existing::Replace => {
                let name = path
                    .file_name()
                    .ok_or_else(|| StateError::Io {
                        op: "writing",
                        path: path.to_owned(),
                        source: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
                    })?
                    .to_string_lossy();
                // A random name, created exclusively: a file or link
                // someone planted at a predictable name is never written.
                let mut attempts = 0;
                loop {
                    let tmp =
                        path.with_file_name(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
                    match create_new(&tmp, mode) {
                        Ok(file) => {
                            return Ok(PrivateFile {
                                file,
                                written: tmp,
                                rename_to: Some(path.to_owned()),
                                committed: false,
                            })
                        }
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => {
                            attempts += 1;
                        }
                        Err(e) => return Err(io_err("creating", &tmp)(e)),
                    }
                }
            }
        }
    }

    /// Writes `contents`, flushes them to disk and, for
    /// [`Existing::Replace`], renames the file into place.
    pub fn commit(mut self, contents: &[u8]) -> Result<(), StateError> {
        self.file
            .write_all(contents)
            .and_then(|()| self.file.sync_all())
            .map_err(io_err("writing", &self.written))?;
        if let Some(dest) = &self.rename_to {
            fs::rename(&self.written, dest).map_err(io_err("writing", dest))?;
            // The rename itself survives a crash only once the directory
            // is on disk; a failure here loses nothing already written.
            let dir = match dest.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for PrivateFile {
    fn drop(&mut self) {
        if !self.committed {
            // Created by us (exclusively): nothing of anyone else's.
            let _ = fs::remove_file(&self.written);
        }
    }
}

/// `O_CREAT | O_EXCL | O_NOFOLLOW`: a new file or an error, whatever is at
/// `path` (`O_EXCL` alone already refuses a symlink; `O_NOFOLLOW` says so
/// explicitly and keeps it true should the flags ever change).
fn create_new(path: &Path, mode: u32) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// State files others may read: certificates, the endpoint.
fn write_file(path: &Path, text: &str) -> Result<(), StateError> {
    PrivateFile::with_mode(path, Existing::Replace, 0o644)?.commit(text.as_bytes())
}

/// Keys, and what names clients: written 0600 whatever was there before.
fn write_secret(path: &Path, text: &str) -> Result<(), StateError> {
    PrivateFile::with_mode(path, Existing::Replace, 0o600)?.commit(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn temp() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("veil-state-test-{}-{n}", std::process::id()))
    }

    #[test]
    fn issues_lists_and_revokes_clients() {
        let root = temp();
        let state = StateDir::open(&root).unwrap();
        assert!(matches!(
            state.add_client("alice", &[]),
            Err(StateError::NoEndpoint)
        ));
        state.record_endpoint("198.18.0.1:443").unwrap();
        let alice = state.add_client("alice", &[]).unwrap();
        assert_eq!(alice.endpoints, ["198.18.0.1:443"]);
        assert_eq!(alice.server_name, SERVER_NAME);
        assert!(alice.cert.contains("BEGIN CERTIFICATE"));
        let both = ["gw.example:8443".to_owned(), "gw2.example:443".to_owned()];
        let bob = state.add_client("bob", &both).unwrap();
        assert_eq!(bob.endpoints, both);
        assert_eq!(alice.ca, bob.ca, "one CA");
        assert!(matches!(
            state.add_client("alice", &[]),
            Err(StateError::ClientExists(_))
        ));
        assert!(matches!(
            state.add_client("../x", &[]),
            Err(StateError::BadName(_))
        ));

        let names: Vec<_> = state
            .clients()
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names, ["alice", "bob"]);
        state.revoke("alice").unwrap();
        let alice = &state.clients().unwrap()[0];
        assert!(alice.revoked.is_some());
        assert!(matches!(
            state.revoke("carol"),
            Err(StateError::NoSuchClient(_))
        ));

        let key = fs::metadata(root.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key & 0o777, 0o600, "keys are private");
        let profile_text = Profile::parse(&bob.to_toml()).unwrap();
        assert_eq!(profile_text, bob);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_revoked_name_is_issued_again_and_its_old_certificates_stay_refused() {
        let root = temp();
        let state = StateDir::open(&root).unwrap();
        state.record_endpoint("198.18.0.1:443").unwrap();
        let first = state.add_client("alice", &[]).unwrap();
        state.revoke("alice").unwrap();
        let second = state.add_client("alice", &[]).unwrap();
        assert_ne!(first.cert, second.cert);
        assert!(matches!(
            state.add_client("alice", &[]),
            Err(StateError::ClientExists(_))
        ));
        state.revoke("alice").unwrap();
        state.add_client("alice", &[]).unwrap();
        let record = state.clients().unwrap().remove(0);
        assert!(record.revoked.is_none());
        assert_eq!(record.retired.len(), 2, "both earlier certificates");
        let fingerprint = |p: &Profile| {
            use rustls::pki_types::{pem::PemObject, CertificateDer};
            fingerprint(&CertificateDer::from_pem_slice(p.cert.as_bytes()).unwrap())
        };
        assert_eq!(record.retired, [fingerprint(&first), fingerprint(&second)]);
        // The signed list names both earlier certificates, not the current.
        let list = crate::crl::verify(
            &fs::read(state.revocations_path()).unwrap(),
            &state.ca().unwrap().cert_pem,
        )
        .unwrap();
        assert_eq!(record.retired_serials.len(), 2);
        assert!(record.retired_serials.iter().all(|s| list.revokes(s)));
        assert!(!list.revokes(record.serial.as_deref().unwrap()));
        let again = state.write_revocations().unwrap();
        assert!(
            again.number > list.number,
            "each list numbered above the last"
        );
        assert_eq!(again.serials, list.serials);
        let registry = record.clone().with_retired();
        assert_eq!(registry.len(), 3);
        assert!(registry[0].revoked.is_none());
        assert!(registry[1..]
            .iter()
            .all(|r| r.revoked.is_some() && r.name == "alice"));
        fs::remove_dir_all(root).unwrap();
    }

    /// A revoked client whose record is later deleted, or broken by a bad
    /// hand edit, stays on the signed list: the next list (written for
    /// another revocation) names it still, where before it left it out and
    /// let the certificate back in on every gateway that reads the list.
    #[test]
    fn a_revocation_outlives_its_record() {
        let root = temp();
        let state = StateDir::open(&root).unwrap();
        state.record_endpoint("198.18.0.1:443").unwrap();
        for name in ["alice", "bob", "carol"] {
            state.add_client(name, &[]).unwrap();
        }
        let serial = |name: &str| {
            let record = state.clients().unwrap();
            let r = record.iter().find(|r| r.name == name).unwrap();
            r.serial.clone().unwrap()
        };
        let (alice, bob) = (serial("alice"), serial("bob"));
        state.revoke("alice").unwrap();
        state.revoke("bob").unwrap();
        fs::remove_file(state.client_path("alice")).unwrap();
        fs::write(state.client_path("bob"), "revoked = \"not a date").unwrap();
        state.revoke("carol").unwrap();
        let list = crate::crl::verify(
            &fs::read(state.revocations_path()).unwrap(),
            &state.ca().unwrap().cert_pem,
        )
        .unwrap();
        assert!(list.revokes(&alice), "deleted record's certificate");
        assert!(list.revokes(&bob), "unreadable record's certificate");
        assert_eq!(list.serials.len(), 3);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn the_ca_and_server_identity_survive_a_restart() {
        let root = temp();
        let first = {
            let state = StateDir::open(&root).unwrap();
            let ca = state.ca().unwrap();
            (ca.cert_pem.clone(), state.server_identity(&ca).unwrap())
        };
        let state = StateDir::open(&root).unwrap();
        let ca = state.ca().unwrap();
        assert_eq!(
            first,
            (ca.cert_pem.clone(), state.server_identity(&ca).unwrap())
        );
        fs::remove_dir_all(root).unwrap();
    }

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_profile_never_goes_into_an_existing_file_or_through_a_symlink() {
        let root = temp();
        fs::create_dir_all(&root).unwrap();
        let readable = root.join("readable.veil");
        fs::write(&readable, "old").unwrap();
        fs::set_permissions(&readable, fs::Permissions::from_mode(0o644)).unwrap();
        let err = PrivateFile::create(&readable, Existing::Refuse).unwrap_err();
        assert!(matches!(err, StateError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(fs::read_to_string(&readable).unwrap(), "old");
        assert_eq!(mode(&readable), 0o644);

        // A link to a file the attacker can read, and a dangling one.
        let target = root.join("target");
        fs::write(&target, "").unwrap();
        let link = root.join("link.veil");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            PrivateFile::create(&link, Existing::Refuse),
            Err(StateError::Exists { .. })
        ));
        let dangling = root.join("dangling.veil");
        std::os::unix::fs::symlink(root.join("nowhere"), &dangling).unwrap();
        assert!(matches!(
            PrivateFile::create(&dangling, Existing::Refuse),
            Err(StateError::Exists { .. })
        ));
        assert_eq!(fs::read_to_string(&target).unwrap(), "");
        assert!(!root.join("nowhere").exists());

        let fresh = root.join("fresh.veil");
        PrivateFile::create(&fresh, Existing::Refuse)
            .unwrap()
            .commit(b"key")
            .unwrap();
        assert_eq!(fs::read_to_string(&fresh).unwrap(), "key");
        assert_eq!(mode(&fresh), 0o600);
        // Abandoned before the contents existed: nothing is left.
        let abandoned = root.join("abandoned.veil");
        drop(PrivateFile::create(&abandoned, Existing::Refuse).unwrap());
        assert!(!abandoned.exists());
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn replacing_writes_a_new_0600_file_and_renames_it_over() {
        let root = temp();
        fs::create_dir_all(&root).unwrap();
        let old = root.join("old.veil");
        fs::write(&old, "old").unwrap();
        fs::set_permissions(&old, fs::Permissions::from_mode(0o644)).unwrap();
        // Another name for the old file keeps the old contents only.
        let other_name = root.join("hard-link");
        fs::hard_link(&old, &other_name).unwrap();
        PrivateFile::create(&old, Existing::Replace)
            .unwrap()
            .commit(b"key")
            .unwrap();
        assert_eq!(fs::read_to_string(&old).unwrap(), "key");
        assert_eq!(mode(&old), 0o600);
        assert_eq!(fs::read_to_string(&other_name).unwrap(), "old");

        let target = root.join("target");
        fs::write(&target, "").unwrap();
        let link = root.join("link.veil");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        PrivateFile::create(&link, Existing::Replace)
            .unwrap()
            .commit(b"key")
            .unwrap();
        assert!(
            fs::symlink_metadata(&link).unwrap().is_file(),
            "the link is replaced"
        );
        assert_eq!(fs::read_to_string(&link).unwrap(), "key");
        assert_eq!(fs::read_to_string(&target).unwrap(), "", "not followed");
        // No temporary file is left behind.
        let mut names: Vec<_> = fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["hard-link", "link.veil", "old.veil", "target"]);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn keys_never_go_through_files_planted_in_the_state_directory() {
        let root = temp();
        let state = StateDir::open(&root).unwrap();
        // Where the old code staged its writes: a world-readable leftover
        // kept its mode, and a symlink was followed.
        let leftover = root.join("ca.tmp");
        fs::write(&leftover, "").unwrap();
        fs::set_permissions(&leftover, fs::Permissions::from_mode(0o644)).unwrap();
        let outside = temp();
        fs::write(&outside, "").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("server.tmp")).unwrap();

        let ca = state.ca().unwrap();
        state.server_identity(&ca).unwrap();
        state.record_endpoint("198.18.0.1:443").unwrap();
        state.add_client("alice", &[]).unwrap();
        for secret in ["ca.key", "server.key", "clients/alice.toml"] {
            assert_eq!(mode(&root.join(secret)), 0o600, "{secret}");
        }
        assert_eq!(fs::read_to_string(&outside).unwrap(), "", "not followed");
        fs::remove_file(outside).unwrap();
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_malformed_client_record_hides_no_other_one() {
        let root = temp();
        let state = StateDir::open(&root).unwrap();
        state.record_endpoint("198.18.0.1:443").unwrap();
        for name in ["alice", "bob", "carol"] {
            state.add_client(name, &[]).unwrap();
        }
        fs::write(root.join("clients/carol.toml"), "fingerprint = [").unwrap();
        fs::write(root.join("clients/..toml"), "").unwrap();
        state.revoke("bob").unwrap();

        let names = |records: &[ClientRecord]| -> Vec<String> {
            records.iter().map(|r| r.name.clone()).collect()
        };
        let all = state.clients().expect("the good records, not an error");
        assert_eq!(names(&all), ["alice", "bob"]);
        assert!(all[1].revoked.is_some(), "the revocation applies");

        let found = state.client_records().unwrap();
        assert_eq!(names(found.records.as_deref().unwrap()), ["alice", "bob"]);
        let bad: Vec<_> = found.unreadable.iter().map(|u| u.name.clone()).collect();
        assert_eq!(bad, [None, Some("carol".to_owned())]);
        assert!(found.unreadable.iter().all(|u| u.new));
        let text = found.unreadable[1].to_string();
        assert!(text.contains("carol.toml is not valid"), "{text}");
        assert!(text.contains("client `carol` is refused until"), "{text}");
        // Polling again: the same files are no longer new; one that broke
        // since is.
        fs::write(root.join("clients/alice.toml"), "name = 1").unwrap();
        let again = state.client_records().unwrap();
        let new: Vec<_> = again
            .unreadable
            .iter()
            .map(|u| (u.name.clone(), u.new))
            .collect();
        assert_eq!(
            new,
            [
                (None, false),
                (Some("alice".to_owned()), true),
                (Some("carol".to_owned()), false)
            ]
        );
        fs::remove_dir_all(root).unwrap();
    }

    /// Drives a client and a server connection in memory until neither
    /// has anything to send.
    fn handshake(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) {
        for _ in 0..16 {
            let mut moved = false;
            while client.wants_write() {
                let mut buf = Vec::new();
                client.write_tls(&mut buf).unwrap();
                server.read_tls(&mut buf.as_slice()).unwrap();
                server.process_new_packets().unwrap();
                moved = true;
            }
            while server.wants_write() {
                let mut buf = Vec::new();
                server.write_tls(&mut buf).unwrap();
                client.read_tls(&mut buf.as_slice()).unwrap();
                client.process_new_packets().unwrap();
                moved = true;
            }
            if !moved && !client.is_handshaking() && !server.is_handshaking() {
                return;
            }
        }
        panic!("the handshake did not finish");
    }

    #[test]
    fn a_resumed_tls_session_still_names_the_client_certificate() {
        let root = temp();
        let state = StateDir::open(&root).unwrap();
        state.record_endpoint("198.18.0.1:443").unwrap();
        let ca = state.ca().unwrap();
        let (cert, key) = state.server_identity(&ca).unwrap();
        let server = Arc::new(crate::tls::server_config(&ca.cert_pem, &cert, &key).unwrap());
        let profile = state.add_client("alice", &[]).unwrap();
        let alice = state.clients().unwrap().remove(0);
        let (client, name) = crate::tls::client_config(&profile).unwrap();
        let client = Arc::new(client);
        for round in 0..3 {
            let mut c = rustls::ClientConnection::new(client.clone(), name.clone()).unwrap();
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            handshake(&mut c, &mut s);
            let kind = s.handshake_kind().unwrap();
            assert_eq!(
                kind == rustls::HandshakeKind::Resumed,
                round > 0,
                "round {round}: {kind:?}"
            );
            // What the gateway checks against its registry and the
            // revocation list, after a full handshake or a resumed one.
            let seen = s.peer_certificates().expect("the client's certificate");
            assert_eq!(fingerprint(&seen[0]), alice.fingerprint, "round {round}");
            assert!(crate::tls::is_tunnel_grade(&s));
        }
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn leases_are_appended_to_a_log_read_back_over_the_snapshot_and_folded_in() {
        let root = temp();
        let state = StateDir::open(&root).unwrap();
        let a = |n: u8| Ipv4Addr::new(10, 77, 0, n);
        // A snapshot written by an earlier version: still read.
        state
            .save_leases(&BTreeMap::from([("old".to_owned(), a(2))]))
            .unwrap();
        assert_eq!(
            state
                .append_leases(&[("alice".into(), a(3)), ("bob".into(), a(4))])
                .unwrap(),
            2
        );
        assert_eq!(state.append_leases(&[("carol".into(), a(5))]).unwrap(), 3);
        assert_eq!(mode(&root.join(LEASE_LOG)), 0o600);
        let want = BTreeMap::from([
            ("old".to_owned(), a(2)),
            ("alice".to_owned(), a(3)),
            ("bob".to_owned(), a(4)),
            ("carol".to_owned(), a(5)),
        ]);
        // As a restarted gateway reads them.
        assert_eq!(StateDir::open(&root).unwrap().leases().unwrap(), want);

        // A crash in the middle of an append: the cut line (here with a
        // torn block's bytes, not UTF-8) was never acknowledged, is not
        // read, and is cut off before the next one.
        fs::OpenOptions::new()
            .append(true)
            .open(root.join(LEASE_LOG))
            .unwrap()
            .write_all(b"dave = \"10.77\xff\xfe\x00")
            .unwrap();
        let again = StateDir::open(&root).unwrap();
        assert_eq!(again.leases().unwrap(), want);
        assert_eq!(again.append_leases(&[("erin".into(), a(6))]).unwrap(), 4);
        let mut with_erin = want.clone();
        with_erin.insert("erin".into(), a(6));
        assert_eq!(again.leases().unwrap(), with_erin);

        // Folded into the snapshot: the log starts over, nothing lost.
        again.save_leases(&with_erin).unwrap();
        assert_eq!(fs::metadata(root.join(LEASE_LOG)).unwrap().len(), 0);
        assert_eq!(again.append_leases(&[("frank".into(), a(7))]).unwrap(), 1);
        with_erin.insert("frank".into(), a(7));
        assert_eq!(StateDir::open(&root).unwrap().leases().unwrap(), with_erin);

        // A line that is not a lease is an error that names the file.
        fs::write(root.join(LEASE_LOG), "gina = 10.77.0.8\n").unwrap();
        let err = StateDir::open(&root).unwrap().leases().unwrap_err();
        assert!(err.to_string().contains("leases.log"), "{err}");
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_record_changed_within_a_clock_tick_of_the_last_read_is_read_again() {
        let root = temp();
        let state = StateDir::open(&root).unwrap();
        state.record_endpoint("198.18.0.1:443").unwrap();
        state.add_client("alice", &[]).unwrap();
        assert!(state.client_records().unwrap().changed(), "the first read");
        let again = state.client_records().unwrap();
        assert!(!again.changed(), "nothing changed");
        assert!(again.records.is_none(), "and nothing copied");
        // Rewritten in place, at once and to the same size: the same
        // timestamps on a coarse clock, yet the change is seen.
        let path = root.join("clients/alice.toml");
        let text = fs::read_to_string(&path).unwrap();
        let revoked = text.replacen("created = ", "revoked = 1\ncreated = ", 1);
        fs::write(&path, &revoked).unwrap();
        let found = state.client_records().unwrap();
        assert!(found.changed());
        assert_eq!(found.records.unwrap()[0].revoked, Some(1));
        fs::write(&path, revoked.replace("revoked = 1", "revoked = 2")).unwrap();
        let found = state.client_records().unwrap();
        assert!(found.changed());
        assert_eq!(found.records.unwrap()[0].revoked, Some(2));
        // Removed: gone from the records.
        fs::remove_file(&path).unwrap();
        let found = state.client_records().unwrap();
        assert!(found.changed());
        assert_eq!(found.records, Some(Vec::new()));
        fs::remove_dir_all(root).unwrap();
    }
}
