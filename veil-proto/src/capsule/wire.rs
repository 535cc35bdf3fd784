//! Field-level reading and writing shared by the capsule codecs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::{varint, ProtoError};

/// A cursor over one capsule's value. Every read names the field it reads,
/// so a short value is reported as "ADDRESS_ASSIGN capsule ends inside its
/// IP Address field" rather than a bare "unexpected end".
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    capsule: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], capsule: &'static str) -> Self {
        Reader { buf, capsule }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn truncated(&self, field: &'static str) -> ProtoError {
        ProtoError::Truncated {
            capsule: self.capsule,
            field,
        }
    }

    pub(crate) fn varint(&mut self, field: &'static str) -> Result<u64, ProtoError> {
        let (value, n) = varint::decode(self.buf).ok_or_else(|| self.truncated(field))?;
        self.buf = &self.buf[n..];
        Ok(value)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, ProtoError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or_else(|| self.truncated(field))?;
        self.buf = rest;
        Ok(b)
    }

    pub(crate) fn bytes<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], ProtoError> {
        let (head, rest) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or_else(|| self.truncated(field))?;
        self.buf = rest;
        Ok(*head)
    }

    /// The next `len` bytes, for a field whose length came before it.
    pub(crate) fn slice(&mut self, len: u64, field: &'static str) -> Result<&'a [u8], ProtoError> {
        let len = usize::try_from(len)
            .ok()
            .filter(|&n| n <= self.buf.len())
            .ok_or_else(|| self.truncated(field))?;
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }

    /// Everything left, for fields that run to the end of the value.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// An IP Version field: 4 or 6, anything else is malformed.
    pub(crate) fn ip_version(&mut self) -> Result<u8, ProtoError> {
        match self.u8("IP Version")? {
            v @ (4 | 6) => Ok(v),
            version => Err(ProtoError::BadIpVersion {
                capsule: self.capsule,
                version,
            }),
        }
    }

    /// An address of the given (already validated) version.
    pub(crate) fn ip(&mut self, version: u8, field: &'static str) -> Result<IpAddr, ProtoError> {
        Ok(if version == 4 {
            IpAddr::V4(Ipv4Addr::from(self.bytes::<4>(field)?))
        } else {
            IpAddr::V6(Ipv6Addr::from(self.bytes::<16>(field)?))
        })
    }

    /// Ends the value: any byte left over is malformed (RFC 9297 §3.3).
    pub(crate) fn finish(self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::TrailingBytes {
                capsule: self.capsule,
                extra: self.buf.len(),
            })
        }
    }
}

/// The IP Version field value for an address.
pub(crate) fn ip_version(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 6,
    }
}

/// Length of the address field for an address: 4 or 16 bytes.
pub(crate) fn ip_len(ip: IpAddr) -> usize {
    match ip {
        IpAddr::V4(_) => 4,
        IpAddr::V6(_) => 16,
    }
}

pub(crate) fn write_ip(ip: IpAddr, out: &mut Vec<u8>) {
    match ip {
        IpAddr::V4(a) => out.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => out.extend_from_slice(&a.octets()),
    }
}

/// An address as an unsigned integer, for ordering and masking within one
/// family.
pub(crate) fn ip_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Address width in bits: 32 or 128.
pub(crate) fn ip_width(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}
