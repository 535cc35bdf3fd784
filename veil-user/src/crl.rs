//! The revocation list that several gateways share: an X.509 CRL (RFC 5280)
//! signed by the CA that issues every client certificate, listing the
//! serial numbers of the revoked ones.
//!
//! `veil-user client revoke` writes it (`revocations.crl` in the state
//! directory, DER); each gateway started with `--revocations FILE|URL`
//! re-reads it every second or two and checks its signature against its own
//! CA, so any channel may carry it (a shared directory, rsync, a web
//! server): a list that does not verify, or that is older than the one in
//! force (by its CRL number), is refused and the one in force stays.
//! `openssl crl -inform DER -in revocations.crl -text` reads it too.

use std::{collections::HashSet, time::Duration};

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use x509_parser::prelude::{FromDer, X509Certificate};

/// How long a list is valid for, as written in it (`nextUpdate`): a
/// gateway warns once it has passed without a newer list.
pub const VALIDITY: Duration = Duration::from_secs(365 * 86_400);

/// A revoked certificate, as the list names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Revoked {
    /// The certificate's serial number, lowercase hex ([`serial_hex`]).
    pub serial: String,
    /// Seconds since the epoch.
    pub at: u64,
}

/// A list whose signature verified against the CA.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RevocationList {
    /// The CRL number: a newer list has a higher one.
    pub number: u64,
    /// When it was issued and when the next is due, seconds since the epoch.
    pub issued: u64,
    pub next_update: Option<u64>,
    /// Serial numbers ([`serial_hex`]) of the revoked certificates.
    pub serials: HashSet<String>,
}

impl RevocationList {
    pub fn revokes(&self, serial: &str) -> bool {
        self.serials.contains(serial)
    }
}

/// Why a list was refused.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    #[error("not a certificate revocation list (DER or PEM): {0}")]
    Malformed(String),
    #[error("the CA certificate does not parse: {0}")]
    BadCa(String),
    #[error("not issued by this gateway's CA (its issuer is `{0}`)")]
    OtherIssuer(String),
    #[error("its signature does not verify against this gateway's CA")]
    BadSignature,
    #[error("it carries no CRL number, or one above 2^64")]
    NoNumber,
    #[error("signing the list: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A serial number as compared: lowercase hex of its big-endian bytes
/// without leading zeros (DER adds one before a high bit).
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    raw[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh serial number for a client certificate: 16 random bytes, the
/// first in 0x01..=0x7f so that its DER encoding is exactly these bytes.
pub fn new_serial() -> Vec<u8> {
    let mut serial: [u8; 16] = rand::random();
    serial[0] = (serial[0] & 0x7f).max(1);
    serial.to_vec()
}

/// The serial number ([`serial_hex`]) and the common name of a
/// certificate (DER).
pub fn serial_and_name(cert_der: &[u8]) -> Result<(String, Option<String>), CrlError> {
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| CrlError::Malformed(e.to_string()))?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned);
    Ok((serial_hex(cert.raw_serial()), name))
}

/// Signs a list of `revoked` certificates, numbered `number`, at `now`
/// (seconds since the epoch); DER.
pub fn sign(
    issuer: &rcgen::Issuer<'_, impl rcgen::SigningKey>,
    revoked: &[Revoked],
    number: u64,
    now: u64,
) -> Result<Vec<u8>, CrlError> {
    let time = |secs: u64| {
        time::OffsetDateTime::from_unix_timestamp(secs.min(i64::MAX as u64) as i64)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    let params = CertificateRevocationListParams {
        this_update: time(now),
        next_update: time(now + VALIDITY.as_secs()),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .filter_map(|r| {
                let bytes = hex_bytes(&r.serial)?;
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from(bytes),
                    revocation_time: time(r.at),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(issuer)?.der().to_vec())
}

/// Parses a list (DER, or PEM `X509 CRL`) and checks that `ca_pem` issued
/// and signed it.
pub fn verify(list: &[u8], ca_pem: &str) -> Result<RevocationList, CrlError> {
    let der = match list.starts_with(b"-----BEGIN") {
        true => {
            let (_, pem) = x509_parser::pem::parse_x509_pem(list)
                .map_err(|e| CrlError::Malformed(e.to_string()))?;
            pem.contents
        }
        false => list.to_vec(),
    };
    let (_, crl) =
        x509_parser::parse_x509_crl(&der).map_err(|e| CrlError::Malformed(e.to_string()))?;
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes())
        .map_err(|e| CrlError::BadCa(e.to_string()))?;
    let ca = ca_pem
        .parse_x509()
        .map_err(|e| CrlError::BadCa(e.to_string()))?;
    if crl.issuer() != ca.subject() {
        return Err(CrlError::OtherIssuer(crl.issuer().to_string()));
    }
    crl.verify_signature(ca.public_key())
        .map_err(|_| CrlError::BadSignature)?;
    let number = crl
        .crl_number()
        .map(|n| n.to_bytes_be())
        .filter(|b| b.len() <= 8)
        .map(|b| b.iter().fold(0u64, |n, byte| n << 8 | u64::from(*byte)))
        .ok_or(CrlError::NoNumber)?;
    let secs = |t: x509_parser::time::ASN1Time| t.timestamp().max(0) as u64;
    Ok(RevocationList {
        number,
        issued: secs(crl.last_update()),
        next_update: crl.next_update().map(secs),
        serials: crl
            .iter_revoked_certificates()
            .map(|r| serial_hex(r.raw_serial()))
            .collect(),
    })
}

fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

    fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        (params, key, pem)
    }

    fn revoked(serial: &str) -> Revoked {
        Revoked {
            serial: serial.into(),
            at: 1_700_000_000,
        }
    }

    #[test]
    fn a_signed_list_verifies_against_its_ca_only() {
        let (params, key, pem) = ca("veil gateway CA");
        let issuer = rcgen::Issuer::new(params, &key);
        let list = sign(
            &issuer,
            &[revoked("7f01"), revoked("0a")],
            42,
            1_700_000_100,
        )
        .unwrap();
        let found = verify(&list, &pem).unwrap();
        assert_eq!(found.number, 42);
        assert_eq!(found.issued, 1_700_000_100);
        assert!(found.revokes("7f01") && found.revokes("0a"));
        assert!(!found.revokes("01"));

        // Another CA of the same name: the signature does not verify.
        let (_, _, other) = ca("veil gateway CA");
        assert!(matches!(verify(&list, &other), Err(CrlError::BadSignature)));
        let (_, _, renamed) = ca("someone else");
        assert!(matches!(
            verify(&list, &renamed),
            Err(CrlError::OtherIssuer(_))
        ));
        // One flipped byte anywhere: refused.
        for i in [list.len() / 2, list.len() - 3] {
            let mut bad = list.clone();
            bad[i] ^= 1;
            assert!(verify(&bad, &pem).is_err(), "byte {i}");
        }
        assert!(matches!(
            verify(b"not a list", &pem),
            Err(CrlError::Malformed(_))
        ));
    }

    #[test]
    fn serials_compare_without_leading_zeros() {
        assert_eq!(serial_hex(&[0, 0x80, 1]), "8001");
        assert_eq!(serial_hex(&[0x7f]), "7f");
        let s = new_serial();
        assert!(s[0] >= 1 && s[0] <= 0x7f);
        assert_eq!(hex_bytes(&serial_hex(&s)).unwrap(), s);
        assert_eq!(hex_bytes("abc"), None);
        assert_eq!(hex_bytes("zz"), None);
    }

    #[test]
    fn a_certificates_serial_and_name_are_read() {
        let (params, key, _) = ca("veil gateway CA");
        let issuer = rcgen::Issuer::new(params, &key);
        let mut leaf = CertificateParams::default();
        leaf.distinguished_name.push(DnType::CommonName, "alice");
        let serial = new_serial();
        leaf.serial_number = Some(SerialNumber::from(serial.clone()));
        let cert = leaf
            .signed_by(&KeyPair::generate().unwrap(), &issuer)
            .unwrap();
        let (found, name) = serial_and_name(cert.der()).unwrap();
        assert_eq!(found, serial_hex(&serial));
        assert_eq!(name.as_deref(), Some("alice"));
    }
}
