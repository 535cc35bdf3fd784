//! The configuration file (`--config /etc/veil/veil.toml`): the gateway's
//! flags as TOML keys, same names. A flag given on the command line wins
//! over the file. Unknown keys and bad values are refused at start, naming
//! the file, the key and what was expected.
//!
//! ```toml
//! iface = "eth0"
//! listen = "0.0.0.0:443"
//! pool = "10.77.0.0/16"
//! nat-ports = "61000-65535"
//! max-clients = 1024
//! grace = 30
//! allow = ["10.20.0.0/16"]
//! metrics = 9477                 # 127.0.0.1:9477; "0.0.0.0:9477" to expose it
//! timeout-udp = 120
//! public-addr = ["203.0.113.10", "203.0.113.11"]   # or one: "203.0.113.10"
//! max-ports-per-endpoint = 1134
//! dns = ["192.0.2.53", "192.0.2.54"]   # or one: "192.0.2.53"
//! ```

use std::{
    net::{Ipv4Addr, SocketAddr},
    num::NonZeroU32,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{de, Deserialize, Deserializer};

use crate::{flows::PortRange, net::Ipv4Net, size::ByteSize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Every key is optional: what is missing comes from the flags' defaults.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub iface: Option<String>,
    pub listen: Option<SocketAddr>,
    pub endpoint: Option<String>,
    /// One address or a list (the flag is repeatable).
    #[serde(default, deserialize_with = "one_or_many")]
    pub public_addr: Option<Vec<Ipv4Addr>>,
    pub state_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "parsed")]
    pub pool: Option<Ipv4Net>,
    #[serde(default, deserialize_with = "parsed")]
    pub nat_ports: Option<PortRange>,
    pub tun: Option<String>,
    pub pin_dir: Option<PathBuf>,
    pub max_clients: Option<usize>,
    pub max_handshakes: Option<usize>,
    pub max_handshakes_per_source: Option<usize>,
    #[serde(default, deserialize_with = "parsed")]
    pub client_buffer: Option<ByteSize>,
    pub max_flows: Option<usize>,
    pub max_flows_per_client: Option<usize>,
    pub max_ports_per_endpoint: Option<NonZeroU32>,
    pub grace: Option<u64>,
    #[serde(default, deserialize_with = "parsed_list")]
    pub allow: Option<Vec<Ipv4Net>>,
    #[serde(default, deserialize_with = "parsed_list")]
    pub deny: Option<Vec<Ipv4Net>>,
    pub allow_client_to_client: Option<bool>,
    /// One upstream resolver or a list (`--dns` is repeatable).
    #[serde(default, deserialize_with = "one_or_many")]
    pub dns: Option<Vec<std::net::IpAddr>>,
    /// `9477` (or `"9477"`) is 127.0.0.1:9477; an address is explicit.
    #[serde(default, deserialize_with = "metrics_addr")]
    pub metrics: Option<SocketAddr>,
    pub threads: Option<u16>,
    pub timeout_tcp_established: Option<u64>,
    pub timeout_tcp_transitory: Option<u64>,
    pub timeout_udp: Option<u64>,
    pub timeout_udp_dns: Option<u64>,
    pub timeout_icmp: Option<u64>,
}

pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text).map_err(|message| ConfigError::Invalid {
        path: path.to_owned(),
        message,
    })
}

/// Parses the file's text; the error names the key, the place and what
/// was expected (toml's message, with the offending line).
pub fn parse(text: &str) -> Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
}

fn parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(de::Error::custom)
}

/// `key = "x"` or `key = ["x", "y"]`, each parsed with `FromStr`.
fn one_or_many<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: std::fmt::Display,
{
    struct Visitor<T>(std::marker::PhantomData<T>);

    impl<'de, T> de::Visitor<'de> for Visitor<T>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string or a list of strings")
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            s.parse().map(|v| vec![v]).map_err(E::custom)
        }

        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(s) = seq.next_element::<String>()? {
                out.push(s.parse().map_err(de::Error::custom)?);
            }
            Ok(out)
        }
    }

    d.deserialize_any(Visitor(std::marker::PhantomData))
        .map(Some)
}

/// A port number or a string, as `--metrics` takes them.
fn metrics_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    struct Visitor;
    impl de::Visitor<'_> for Visitor {
        type Value = SocketAddr;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("PORT (served on 127.0.0.1) or \"ADDR:PORT\"")
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<SocketAddr, E> {
            u16::try_from(v)
                .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
                .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<SocketAddr, E> {
            u16::try_from(v)
                .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
                .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<SocketAddr, E> {
            crate::metrics::parse_addr(v).map_err(E::custom)
        }
    }
    d.deserialize_any(Visitor).map(Some)
}

fn parsed_list<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: std::fmt::Display,
{
    let v = Vec::<String>::deserialize(d)?;
    v.iter()
        .map(|s| s.parse().map_err(de::Error::custom))
        .collect::<Result<_, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_key() {
        let c = parse(
            r#"
            iface = "eth0"
            listen = "0.0.0.0:8443"
            pool = "10.90.0.0/16"
            nat-ports = "62000-63000"
            max-clients = 10
            grace = 5
            allow = ["10.20.0.0/16"]
            deny = ["198.51.100.0/24"]
            allow-client-to-client = true
            metrics = "127.0.0.1:9477"
            timeout-udp = 300
            timeout-udp-dns = 10
            public-addr = ["198.18.0.1", "198.18.0.3"]
            max-ports-per-endpoint = 100
            dns = ["198.18.0.2", "2001:db8::53"]
            "#,
        )
        .unwrap();
        assert_eq!(c.iface.as_deref(), Some("eth0"));
        assert_eq!(c.listen, Some("0.0.0.0:8443".parse().unwrap()));
        assert_eq!(c.pool, Some("10.90.0.0/16".parse().unwrap()));
        assert_eq!(
            c.nat_ports,
            Some(PortRange {
                min: 62000,
                max: 63000
            })
        );
        assert_eq!(c.allow.unwrap().len(), 1);
        assert_eq!(c.timeout_udp, Some(300));
        assert_eq!(c.timeout_udp_dns, Some(10));
        assert_eq!(
            c.public_addr,
            Some(vec![
                Ipv4Addr::new(198, 18, 0, 1),
                Ipv4Addr::new(198, 18, 0, 3)
            ])
        );
        assert_eq!(c.max_ports_per_endpoint, NonZeroU32::new(100));
        assert_eq!(c.allow_client_to_client, Some(true));
        assert_eq!(
            c.dns,
            Some(vec![
                "198.18.0.2".parse().unwrap(),
                "2001:db8::53".parse().unwrap()
            ])
        );
        assert_eq!(
            parse("dns = \"192.0.2.53\"\n").unwrap().dns,
            Some(vec!["192.0.2.53".parse().unwrap()])
        );
    }

    #[test]
    fn one_public_address_is_a_list_of_one() {
        let c = parse("public-addr = \"203.0.113.10\"\n").unwrap();
        assert_eq!(c.public_addr, Some(vec![Ipv4Addr::new(203, 0, 113, 10)]));
        let err = parse("public-addr = [\"198.18.0.1\", \"nowhere\"]\n").unwrap_err();
        assert!(err.contains("invalid IPv4 address"), "{err}");
        assert!(
            parse("max-ports-per-endpoint = 0\n").is_err(),
            "0 would refuse every flow"
        );
    }

    #[test]
    fn metrics_alone_is_a_loopback_port() {
        let loopback = Some("127.0.0.1:9477".parse().unwrap());
        assert_eq!(parse("metrics = 9477").unwrap().metrics, loopback);
        assert_eq!(parse("metrics = \"9477\"").unwrap().metrics, loopback);
        assert_eq!(
            parse("metrics = \"0.0.0.0:9477\"").unwrap().metrics,
            Some("0.0.0.0:9477".parse().unwrap())
        );
        let err = parse("metrics = 70000").unwrap_err();
        assert!(err.contains("PORT (served on 127.0.0.1)"), "{err}");
        let err = parse("metrics = \"eth0\"").unwrap_err();
        assert!(err.contains("ADDR:PORT"), "{err}");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let c = parse(include_str!("../../dist/veil.toml")).unwrap();
        assert_eq!(c.iface.as_deref(), Some("eth0"));
        assert_eq!(c.nat_ports, Some(PortRange::DEFAULT));
    }

    #[test]
    fn a_typo_names_the_key_and_what_is_known() {
        let err = parse("ifcae = \"eth0\"\n").unwrap_err();
        assert!(err.contains("unknown field `ifcae`"), "{err}");
        assert!(err.contains("expected one of"), "{err}");
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn a_bad_value_says_what_was_expected() {
        let err = parse("pool = \"10.90.0.0\"\n").unwrap_err();
        assert!(err.contains("expected ADDRESS/PREFIX"), "{err}");
        let err = parse("nat-ports = \"65000-1000\"\n").unwrap_err();
        assert!(err.contains("MIN-MAX"), "{err}");
        let err = parse("max-clients = \"many\"\n").unwrap_err();
        assert!(
            err.contains("max-clients") || err.contains("invalid type"),
            "{err}"
        );
        let err = parse("listen = \"0.0.0.0\"\n").unwrap_err();
        assert!(
            err.contains("listen") || err.contains("socket address"),
            "{err}"
        );
    }
}
