//! The profile `veil-user client add` writes and `veil-client` loads: one
//! file with everything a client needs to reach its gateway. Two spellings
//! of the same content (see `docs/profile.md`):
//!
//! - TOML, what `client add --out` writes;
//! - the compact text of a QR code (`VEIL1:` and base45), what `--qr`
//!   shows: [`Profile::to_compact`], read back by [`Profile::parse`] like
//!   the TOML, so a scanned code saved to a file is a profile.
//!
//! An endpoint is `HOST:PORT` (TLS over TCP straight to the gateway) or
//! `wss://HOST[:PORT]/PATH` (a WebSocket through a web server or CDN in
//! front of it): see [`Endpoint`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Why a profile could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid profile: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Everything a client needs, in one file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(try_from = "ProfileFile", into = "ProfileFile")]
pub struct Profile {
    pub name: String,
    /// HOST:PORT of the gateway's tunnel listeners, in the order the
    /// client tries them; never empty.
    pub endpoints: Vec<String>,
    /// The name the gateway's certificate is checked against.
    pub server_name: String,
    /// The gateway's CA certificate (PEM): the only one trusted.
    pub ca: String,
    /// The client's certificate and key (PEM).
    pub cert: String,
    pub key: String,
    /// The CA of the web server in front of `wss://` endpoints (PEM), for
    /// a self-signed set-up; `None`: the system's roots.
    pub endpoint_ca: Option<String>,
}

/// How a client reaches the gateway, as a profile's endpoint says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `HOST:PORT`: TCP to the gateway's listener, the tunnel's TLS on it.
    Tcp(String),
    /// `wss://HOST[:PORT]/PATH`: TCP to a web server, its TLS (checked
    /// against HOST), a WebSocket on PATH, the tunnel's TLS inside it.
    WebSocket {
        host: String,
        port: u16,
        path: String,
    },
}

impl Endpoint {
    /// Reads an endpoint; the error says what was expected.
    pub fn parse(text: &str) -> Result<Self, String> {
        let expected =
            || format!("`{text}` is not an endpoint: expected HOST:PORT or wss://HOST[:PORT]/PATH");
        if let Some(rest) = text.strip_prefix("wss://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, "/"),
            };
            let (host, port) = match authority.rsplit_once(':') {
                Some((host, port)) if !port.contains(']') => {
                    (host, port.parse().map_err(|_| expected())?)
                }
                _ => (authority, 443),
            };
            if host.is_empty() || port == 0 || path.chars().any(char::is_whitespace) {
                return Err(expected());
            }
            return Ok(Endpoint::WebSocket {
                host: host.to_owned(),
                port,
                path: path.to_owned(),
            });
        }
        if text.contains("://") {
            return Err(format!(
                "`{text}`: only wss:// URLs are endpoints (the web server's TLS is what makes the tunnel one more website)"
            ));
        }
        match text.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                Ok(Endpoint::Tcp(text.to_owned()))
            }
            _ => Err(expected()),
        }
    }

    /// `HOST:PORT` of the first hop: the gateway, or the web server.
    pub fn address(&self) -> String {
        match self {
            Endpoint::Tcp(addr) => addr.clone(),
            Endpoint::WebSocket { host, port, .. } => format!("{host}:{port}"),
        }
    }

    /// The URL of a WebSocket endpoint.
    pub fn url(&self) -> Option<String> {
        match self {
            Endpoint::Tcp(_) => None,
            Endpoint::WebSocket { host, port, path } => Some(format!("wss://{host}:{port}{path}")),
        }
    }
}

/// The TOML layout: `endpoint = "HOST:PORT"` (one, as every profile had
/// before failover) or `endpoints = [...]` (several); both may be read.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    endpoints: Vec<String>,
    server_name: String,
    ca: String,
    cert: String,
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    endpoint_ca: Option<String>,
}

impl TryFrom<ProfileFile> for Profile {
    type Error = String;

    fn try_from(f: ProfileFile) -> Result<Self, String> {
        let mut endpoints: Vec<String> = f.endpoint.into_iter().collect();
        for e in f.endpoints {
            if !endpoints.contains(&e) {
                endpoints.push(e);
            }
        }
        if endpoints.is_empty() {
            return Err("no endpoint (`endpoint = \"HOST:PORT\"` or `endpoints = [...]`)".into());
        }
        Ok(Profile {
            name: f.name,
            endpoints,
            server_name: f.server_name,
            ca: f.ca,
            cert: f.cert,
            key: f.key,
            endpoint_ca: f.endpoint_ca,
        })
    }
}

impl From<Profile> for ProfileFile {
    fn from(p: Profile) -> Self {
        // One endpoint is written as before, so that clients older than
        // failover still read the profiles that do not use it.
        let (endpoint, endpoints) = match <[String; 1]>::try_from(p.endpoints) {
            Ok([one]) => (Some(one), Vec::new()),
            Err(several) => (None, several),
        };
        ProfileFile {
            name: p.name,
            endpoint,
            endpoints,
            server_name: p.server_name,
            ca: p.ca,
            cert: p.cert,
            key: p.key,
            endpoint_ca: p.endpoint_ca,
        }
    }
}

impl Profile {
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ProfileError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    /// A profile from its TOML text or its compact (QR) text; the error
    /// says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(compact) = text.trim().strip_prefix(compact::PREFIX) {
            return compact::decode(compact);
        }
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn to_toml(&self) -> String {
        format!(
            "# veil client profile for `{}`. Keep it secret: it holds the client's key.\n{}",
            self.name,
            toml::to_string(self).expect("a profile serializes")
        )
    }

    /// The compact text for a QR code: `VEIL1:` then base45 (RFC 9285) of
    /// the deflated fields, certificates and key in DER. Fails only if a
    /// PEM field does not parse.
    pub fn to_compact(&self) -> Result<String, String> {
        compact::encode(self)
    }
}

/// The QR spelling. Base45 keeps the text in the QR alphanumeric set (5.5
/// bits a character, where byte mode spends 8), DER instead of PEM drops
/// base64's third and the armour lines, deflate the repeated names and
/// identifiers: about two thirds of the TOML's size, and in the denser QR
/// mode (see `docs/profile.md`).
mod compact {
    use super::Profile;

    pub(super) const PREFIX: &str = "VEIL1:";
    const ALPHABET: &[u8; 45] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:";
    /// A decoded profile larger than this is refused (a real one is ~1 KiB).
    const MAX_INFLATED: usize = 16 * 1024;

    pub(super) fn encode(p: &Profile) -> Result<String, String> {
        let mut body = Vec::new();
        let der = |pem: &str, what: &str| {
            pem::parse(pem)
                .map(pem::Pem::into_contents)
                .map_err(|e| format!("the {what} is not PEM: {e}"))
        };
        let fields: Vec<Vec<u8>> = [
            Ok(p.name.clone().into_bytes()),
            Ok(p.server_name.clone().into_bytes()),
            der(&p.ca, "CA certificate"),
            der(&p.cert, "certificate"),
            der(&p.key, "key"),
        ]
        .into_iter()
        .chain(p.endpoints.iter().map(|e| Ok(e.clone().into_bytes())))
        // What came later: after an empty field (no endpoint is empty), so
        // that a profile without it reads as before.
        .chain(
            p.endpoint_ca
                .as_ref()
                .into_iter()
                .flat_map(|ca| [Ok(Vec::new()), der(ca, "endpoint CA certificate")]),
        )
        .collect::<Result<_, _>>()?;
        for field in &fields {
            let len = u16::try_from(field.len()).map_err(|_| "a field over 64 KiB")?;
            body.extend_from_slice(&len.to_be_bytes());
            body.extend_from_slice(field);
        }
        let deflated = miniz_oxide::deflate::compress_to_vec(&body, 10);
        Ok(format!("{PREFIX}{}", base45(&deflated)))
    }

    pub(super) fn decode(text: &str) -> Result<Profile, String> {
        let deflated = unbase45(text).ok_or("not base45")?;
        let body = miniz_oxide::inflate::decompress_to_vec_with_limit(&deflated, MAX_INFLATED)
            .map_err(|_| "not a deflated profile, or too large")?;
        let mut fields: Vec<&[u8]> = Vec::new();
        let mut rest = &body[..];
        while let Some((len, tail)) = rest.split_first_chunk::<2>() {
            let len = usize::from(u16::from_be_bytes(*len));
            fields.push(tail.get(..len).ok_or("a field runs past the end")?);
            rest = &tail[len..];
        }
        // The endpoints, then (after an empty field) the endpoint CA.
        let (fields, endpoint_ca) = match fields.iter().position(|f| f.is_empty()) {
            Some(i) if i >= 5 && fields.len() == i + 2 => (&fields[..i], Some(fields[i + 1])),
            Some(_) => return Err("an empty field out of place".into()),
            None => (&fields[..], None),
        };
        if !rest.is_empty() || fields.len() < 6 {
            return Err("fields missing or cut short".into());
        }
        let text = |field: &[u8]| {
            String::from_utf8(field.to_vec())
                .map_err(|_| "a name or endpoint is not text".to_owned())
        };
        let pem = |tag: &str, der: &[u8]| {
            pem::encode_config(
                &pem::Pem::new(tag, der.to_vec()),
                pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
            )
        };
        Ok(Profile {
            name: text(fields[0])?,
            server_name: text(fields[1])?,
            ca: pem("CERTIFICATE", fields[2]),
            cert: pem("CERTIFICATE", fields[3]),
            key: pem("PRIVATE KEY", fields[4]),
            endpoints: fields[5..]
                .iter()
                .map(|f| text(f))
                .collect::<Result<_, _>>()?,
            endpoint_ca: endpoint_ca.map(|der| pem("CERTIFICATE", der)),
        })
    }

    /// RFC 9285: two bytes as three characters, a last odd byte as two.
    pub(super) fn base45(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len() * 3 / 2 + 2);
        let push = |out: &mut String, mut n: usize, count: usize| {
            for _ in 0..count {
                out.push(char::from(ALPHABET[n % 45]));
                n /= 45;
            }
        };
        for pair in bytes.chunks(2) {
            match pair {
                [a, b] => push(&mut out, usize::from(*a) * 256 + usize::from(*b), 3),
                [a] => push(&mut out, usize::from(*a), 2),
                _ => unreachable!("chunks of two"),
            }
        }
        out
    }

    pub(super) fn unbase45(text: &str) -> Option<Vec<u8>> {
        let digits: Vec<usize> = text
            .trim()
            .bytes()
            .map(|c| ALPHABET.iter().position(|&a| a == c))
            .collect::<Option<_>>()?;
        let mut out = Vec::with_capacity(digits.len() * 2 / 3 + 1);
        for group in digits.chunks(3) {
            match group {
                [c, d, e] => {
                    let n = c + d * 45 + e * 45 * 45;
                    let n = u16::try_from(n).ok()?;
                    out.extend_from_slice(&n.to_be_bytes());
                }
                [c, d] => out.push(u8::try_from(c + d * 45).ok()?),
                _ => return None,
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice(endpoints: &[&str]) -> Profile {
        Profile {
            name: "alice".into(),
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            server_name: "veil-gateway".into(),
            ca: "CA".into(),
            cert: "CERT".into(),
            key: "KEY".into(),
            endpoint_ca: None,
        }
    }

    #[test]
    fn a_profile_round_trips_and_unknown_keys_are_refused() {
        let p = alice(&["198.51.100.1:443"]);
        let text = p.to_toml();
        assert!(text.starts_with("# veil client profile for `alice`"));
        assert_eq!(Profile::parse(&text).unwrap(), p);
        let err = Profile::parse(&format!("{text}color = \"blue\"\n")).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn one_endpoint_is_written_as_before_several_as_a_list() {
        let one = alice(&["198.51.100.1:443"]).to_toml();
        assert!(one.contains("\nendpoint = \"198.51.100.1:443\"\n"), "{one}");
        assert!(!one.contains("endpoints"));
        let two = alice(&["198.51.100.1:443", "gw2.example:8443"]);
        let text = two.to_toml();
        assert!(
            text.contains("endpoints = [\"198.51.100.1:443\", \"gw2.example:8443\"]"),
            "{text}"
        );
        assert_eq!(Profile::parse(&text).unwrap(), two);
    }

    #[test]
    fn old_profiles_still_read_and_a_profile_without_endpoint_does_not() {
        // As `client add` wrote them before failover.
        let old = "# veil client profile for `alice`. Keep it secret: it holds the client's key.\n\
                   name = \"alice\"\nendpoint = \"198.51.100.1:443\"\nserver_name = \"veil-gateway\"\n\
                   ca = \"CA\"\ncert = \"CERT\"\nkey = \"KEY\"\n";
        assert_eq!(Profile::parse(old).unwrap(), alice(&["198.51.100.1:443"]));
        // Both keys: the single one first, no repeats.
        let both = old.replace(
            "endpoint = \"198.51.100.1:443\"\n",
            "endpoint = \"198.51.100.1:443\"\nendpoints = [\"198.51.100.1:443\", \"gw2:443\"]\n",
        );
        assert_eq!(
            Profile::parse(&both).unwrap().endpoints,
            ["198.51.100.1:443", "gw2:443"]
        );
        let none = old.replace("endpoint = \"198.51.100.1:443\"\n", "");
        let err = Profile::parse(&none).unwrap_err();
        assert!(err.contains("no endpoint"), "{err}");
    }

    #[test]
    fn endpoints_are_a_host_and_port_or_a_wss_url() {
        assert_eq!(
            Endpoint::parse("198.51.100.1:443"),
            Ok(Endpoint::Tcp("198.51.100.1:443".into()))
        );
        let ws = Endpoint::parse("wss://proxy.example/veil").unwrap();
        assert_eq!(
            ws,
            Endpoint::WebSocket {
                host: "proxy.example".into(),
                port: 443,
                path: "/veil".into()
            }
        );
        assert_eq!(ws.address(), "proxy.example:443");
        assert_eq!(ws.url().unwrap(), "wss://proxy.example:443/veil");
        let ws = Endpoint::parse("wss://198.51.100.7:8443").unwrap();
        assert_eq!(ws.address(), "198.51.100.7:8443");
        assert_eq!(ws.url().unwrap(), "wss://198.51.100.7:8443/");
        for bad in [
            "gateway",
            "gateway:0",
            "gateway:https",
            "wss://",
            "wss://:443/veil",
            "wss://proxy:x/veil",
            "wss://proxy/a b",
        ] {
            let err = Endpoint::parse(bad).unwrap_err();
            assert!(err.contains("expected HOST:PORT or wss://"), "{bad}: {err}");
        }
        let err = Endpoint::parse("ws://proxy/veil").unwrap_err();
        assert!(err.contains("only wss://"), "{err}");
    }

    #[test]
    fn the_endpoint_ca_is_kept_and_absent_from_profiles_without_it() {
        let plain = alice(&["198.51.100.1:443"]).to_toml();
        assert!(!plain.contains("endpoint_ca"), "{plain}");
        let p = Profile {
            endpoint_ca: Some("PROXY CA".into()),
            ..alice(&["wss://proxy.example/veil"])
        };
        let text = p.to_toml();
        assert!(text.contains("endpoint_ca = \"PROXY CA\""), "{text}");
        assert_eq!(Profile::parse(&text).unwrap(), p);
    }

    #[test]
    fn base45_matches_rfc_9285() {
        // The RFC's own examples (§4.3).
        assert_eq!(compact::base45(b"AB"), "BB8");
        assert_eq!(compact::base45(b"Hello!!"), "%69 VD92EX0");
        assert_eq!(compact::base45(b"base-45"), "UJCLQE7W581");
        assert_eq!(compact::unbase45("QED8WEX0").unwrap(), b"ietf!");
        assert_eq!(compact::unbase45("GGW"), None, "65536 does not fit");
        assert_eq!(compact::unbase45("a"), None);
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(compact::unbase45(&compact::base45(&all)).unwrap(), all);
    }

    #[test]
    fn junk_is_not_a_compact_profile() {
        for junk in ["VEIL1:", "VEIL1:AB", "VEIL1:%69 VD92EX0", "VEIL1:lower"] {
            assert!(Profile::parse(junk).is_err(), "{junk}");
        }
    }
}
