//! What the fuzz targets share: a heap meter for "never allocates
//! unboundedly", a deterministic splitter for "bytes arriving in arbitrary
//! pieces", an RFC 1071 checksum written independently of veil's, the
//! properties every emitted IPv4 packet must have, packet builders, and the
//! seed corpus (`cargo xtask fuzz --seeds` writes it with the `seeds`
//! example).
//!
//! Everything here panics on a broken property: in a fuzz target a panic is
//! the finding.

pub mod gro_ops;
pub mod heap;
pub mod ip;
pub mod rng;
pub mod seeds;

// The gateway's pure per-packet verdict (`veil-user/src/gateway/check.rs`)
// and what it uses, compiled from their own source files: depending on
// veil-user would build tokio, rustls, ring and aya into every fresh fuzz
// build. The `client_packet` target reaches them by their veil-user paths.
#[path = "../../veil-user/src/gateway/check.rs"]
pub mod check;
#[path = "../../veil-user/src/gateway/check6.rs"]
pub mod check6;
#[path = "../../veil-tunnel/src/net.rs"]
pub mod net;
#[path = "../../veil-user/src/policy.rs"]
pub mod policy;
#[path = "../../veil-user/src/policy6.rs"]
pub mod policy6;
pub use veil_proto::packet;

pub use rng::Rng;

use veil_proto::capsule::DnsConfiguration;

/// What a client may write into its resolver configuration from a
/// gateway's DNS_ASSIGN: names in presentation format only (letters,
/// digits, `-`, `_`, dots), so that no newline, space or option rides in.
#[track_caller]
pub fn assert_dns_safe(configs: &[DnsConfiguration]) {
    let names = configs.iter().flat_map(|c| {
        c.internal_domains
            .iter()
            .chain(&c.search_domains)
            .chain(c.nameservers.iter().map(|n| &n.auth_domain))
    });
    for name in names {
        let s = name.as_str();
        assert!(s.len() <= 254, "a {}-byte domain name", s.len());
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'),
            "domain name {s:?}"
        );
    }
    for ns in configs.iter().flat_map(|c| &c.nameservers) {
        assert_ne!(ns.priority, 0, "a nameserver in AliasMode");
    }
}

/// The pieces of veil-user the targets check, by their veil-user paths.
pub mod veil_user {
    pub use crate::{check, check6, net, packet, policy, policy6};
}
