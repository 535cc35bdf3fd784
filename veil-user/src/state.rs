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
//! ```
//!
//! Keys are written 0600 and the directory 0700.

use std::{
    collections::BTreeMap,
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

/// The name the server certificate carries and clients verify, whatever
/// address they reach the gateway at: the pinned CA is the trust anchor, so
/// re-addressing a gateway never needs new certificates.
pub const SERVER_NAME: &str = "veil-gateway";
const CA_NAME: &str = "veil gateway CA";

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
    #[error("a client named `{0}` already exists (revoke it or pick another name)")]
    ClientExists(String),
    #[error("no client named `{0}`")]
    NoSuchClient(String),
    #[error("no endpoint is recorded in the state directory yet: start the gateway once, or pass --endpoint HOST:PORT")]
    NoEndpoint,
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
}

/// Everything a client needs, in one file (`veil-user client add`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    /// HOST:PORT of the gateway's tunnel listener.
    pub endpoint: String,
    /// The name the gateway's certificate is checked against.
    pub server_name: String,
    /// The gateway's CA certificate (PEM): the only one trusted.
    pub ca: String,
    /// The client's certificate and key (PEM).
    pub cert: String,
    pub key: String,
}

impl Profile {
    pub fn load(path: &Path) -> Result<Self, StateError> {
        let text = read(path)?;
        toml::from_str(&text).map_err(|e| StateError::Corrupt {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    pub fn to_toml(&self) -> String {
        format!(
            "# veil client profile for `{}`. Keep it secret: it holds the client's key.\n{}",
            self.name,
            toml::to_string(self).expect("a profile serializes")
        )
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct GatewayRecord {
    endpoint: Option<String>,
}

pub struct StateDir {
    root: PathBuf,
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
        Ok(Self { root })
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
        let record = GatewayRecord {
            endpoint: Some(endpoint.to_owned()),
        };
        write_file(
            &self.root.join("gateway.toml"),
            &toml::to_string(&record).expect("serializes"),
        )
    }

    pub fn endpoint(&self) -> Result<Option<String>, StateError> {
        let path = self.root.join("gateway.toml");
        if !path.exists() {
            return Ok(None);
        }
        let record: GatewayRecord = parse(&path)?;
        Ok(record.endpoint)
    }

    /// Issues a profile for a new client.
    pub fn add_client(&self, name: &str, endpoint: Option<&str>) -> Result<Profile, StateError> {
        check_name(name)?;
        let record_path = self.client_path(name);
        if record_path.exists() {
            return Err(StateError::ClientExists(name.to_owned()));
        }
        let endpoint = match endpoint {
            Some(e) => e.to_owned(),
            None => self.endpoint()?.ok_or(StateError::NoEndpoint)?,
        };
        let ca = self.ca()?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &ca.issuer())?;
        let record = ClientRecord {
            name: name.to_owned(),
            fingerprint: fingerprint(cert.der()),
            created: now(),
            revoked: None,
        };
        write_file(&record_path, &toml::to_string(&record).expect("serializes"))?;
        Ok(Profile {
            name: name.to_owned(),
            endpoint,
            server_name: SERVER_NAME.to_owned(),
            ca: ca.cert_pem.clone(),
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Every client ever issued, revoked ones included, by name.
    pub fn clients(&self) -> Result<Vec<ClientRecord>, StateError> {
        let dir = self.root.join("clients");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let path = entry.map_err(io_err("listing", &dir))?.path();
            if path.extension().is_some_and(|e| e == "toml") {
                out.push(parse::<ClientRecord>(&path)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
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
        write_file(&path, &toml::to_string(&record).expect("serializes"))?;
        Ok(record)
    }

    /// Client name -> virtual address, as handed out so far.
    pub fn leases(&self) -> Result<BTreeMap<String, Ipv4Addr>, StateError> {
        let path = self.root.join("leases.toml");
        if !path.exists() {
            return Ok(BTreeMap::new());
        }
        parse(&path)
    }

    pub fn save_leases(&self, leases: &BTreeMap<String, Ipv4Addr>) -> Result<(), StateError> {
        write_file(
            &self.root.join("leases.toml"),
            &toml::to_string(leases).expect("serializes"),
        )
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
    fn issuer(&self) -> Issuer<'_, &KeyPair> {
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

/// Writes through a temporary file and a rename, so a crash never leaves
/// half a file.
fn write_file(path: &Path, text: &str) -> Result<(), StateError> {
    write_mode(path, text, 0o644)
}

fn write_secret(path: &Path, text: &str) -> Result<(), StateError> {
    write_mode(path, text, 0o600)
}

fn write_mode(path: &Path, text: &str, mode: u32) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("writing", &tmp))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err("writing", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("writing", path))
}

#[cfg(test)]
mod tests {
    use super::*;

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
            state.add_client("alice", None),
            Err(StateError::NoEndpoint)
        ));
        state.record_endpoint("198.18.0.1:443").unwrap();
        let alice = state.add_client("alice", None).unwrap();
        assert_eq!(alice.endpoint, "198.18.0.1:443");
        assert_eq!(alice.server_name, SERVER_NAME);
        assert!(alice.cert.contains("BEGIN CERTIFICATE"));
        let bob = state.add_client("bob", Some("gw.example:8443")).unwrap();
        assert_eq!(bob.endpoint, "gw.example:8443");
        assert_eq!(alice.ca, bob.ca, "one CA");
        assert!(matches!(
            state.add_client("alice", None),
            Err(StateError::ClientExists(_))
        ));
        assert!(matches!(
            state.add_client("../x", None),
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
        let profile_text = Profile::load_text(&bob.to_toml());
        assert_eq!(profile_text, bob);
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

    impl Profile {
        fn load_text(text: &str) -> Profile {
            toml::from_str(text).unwrap()
        }
    }
}
