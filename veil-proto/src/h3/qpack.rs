//! QPACK field sections without a dynamic table (RFC 9204 §4.5): both ends
//! announce a capacity of 0, so every field line is a static-table
//! reference or a literal. Literals are written without Huffman coding
//! (optional for an encoder); a peer's Huffman-coded strings are decoded
//! (other HTTP/3 stacks, aioquic's among them, use it wherever shorter).

use crate::ProtoError;

/// One header field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

impl Field {
    pub fn new(name: &str, value: &str) -> Self {
        Field {
            name: name.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        }
    }
}

/// RFC 9204 Appendix A.
const STATIC: [(&str, &str); 99] = [
    (":authority", ""),
    (":path", "/"),
    ("age", "0"),
    ("content-disposition", ""),
    ("content-length", "0"),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("referer", ""),
    ("set-cookie", ""),
    (":method", "CONNECT"),
    (":method", "DELETE"),
    (":method", "GET"),
    (":method", "HEAD"),
    (":method", "OPTIONS"),
    (":method", "POST"),
    (":method", "PUT"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "103"),
    (":status", "200"),
    (":status", "304"),
    (":status", "404"),
    (":status", "503"),
    ("accept", "*/*"),
    ("accept", "application/dns-message"),
    ("accept-encoding", "gzip, deflate, br"),
    ("accept-ranges", "bytes"),
    ("access-control-allow-headers", "cache-control"),
    ("access-control-allow-headers", "content-type"),
    ("access-control-allow-origin", "*"),
    ("cache-control", "max-age=0"),
    ("cache-control", "max-age=2592000"),
    ("cache-control", "max-age=604800"),
    ("cache-control", "no-cache"),
    ("cache-control", "no-store"),
    ("cache-control", "public, max-age=31536000"),
    ("content-encoding", "br"),
    ("content-encoding", "gzip"),
    ("content-type", "application/dns-message"),
    ("content-type", "application/javascript"),
    ("content-type", "application/json"),
    ("content-type", "application/x-www-form-urlencoded"),
    ("content-type", "image/gif"),
    ("content-type", "image/jpeg"),
    ("content-type", "image/png"),
    ("content-type", "text/css"),
    ("content-type", "text/html; charset=utf-8"),
    ("content-type", "text/plain"),
    ("content-type", "text/plain;charset=utf-8"),
    ("range", "bytes=0-"),
    ("strict-transport-security", "max-age=31536000"),
    (
        "strict-transport-security",
        "max-age=31536000; includesubdomains",
    ),
    (
        "strict-transport-security",
        "max-age=31536000; includesubdomains; preload",
    ),
    ("vary", "accept-encoding"),
    ("vary", "origin"),
    ("x-content-type-options", "nosniff"),
    ("x-xss-protection", "1; mode=block"),
    (":status", "100"),
    (":status", "204"),
    (":status", "206"),
    (":status", "302"),
    (":status", "400"),
    (":status", "403"),
    (":status", "421"),
    (":status", "425"),
    (":status", "500"),
    ("accept-language", ""),
    ("access-control-allow-credentials", "FALSE"),
    ("access-control-allow-credentials", "TRUE"),
    ("access-control-allow-headers", "*"),
    ("access-control-allow-methods", "get"),
    ("access-control-allow-methods", "get, post, options"),
    ("access-control-allow-methods", "options"),
    ("access-control-expose-headers", "content-length"),
    ("access-control-request-headers", "content-type"),
    ("access-control-request-method", "get"),
    ("access-control-request-method", "post"),
    ("alt-svc", "clear"),
    ("authorization", ""),
    (
        "content-security-policy",
        "script-src 'none'; object-src 'none'; base-uri 'none'",
    ),
    ("early-data", "1"),
    ("expect-ct", ""),
    ("forwarded", ""),
    ("if-range", ""),
    ("origin", ""),
    ("purpose", "prefetch"),
    ("server", ""),
    ("timing-allow-origin", "*"),
    ("upgrade-insecure-requests", "1"),
    ("user-agent", ""),
    ("x-forwarded-for", ""),
    ("x-frame-options", "deny"),
    ("x-frame-options", "sameorigin"),
];

/// Appends the field section for `fields`: Required Insert Count 0, Base 0,
/// then for each field an indexed line if the static table has it whole,
/// a literal with a static name reference if it has the name, otherwise a
/// literal name and value.
pub fn encode_fields(fields: &[Field], out: &mut Vec<u8>) {
    out.extend_from_slice(&[0, 0]);
    for f in fields {
        let name_at = STATIC.iter().position(|(n, _)| n.as_bytes() == f.name);
        let whole_at = STATIC
            .iter()
            .position(|(n, v)| n.as_bytes() == f.name && v.as_bytes() == f.value);
        match (whole_at, name_at) {
            // 1 T=1 index(6)
            (Some(i), _) => int(0xc0, 6, i as u64, out),
            // 0 1 N=0 T=1 index(4), H=0 length(7), value
            (None, Some(i)) => {
                int(0x50, 4, i as u64, out);
                string(&f.value, out);
            }
            // 0 0 1 N=0 H=0 length(3), name, H=0 length(7), value
            (None, None) => {
                int(0x20, 3, f.name.len() as u64, out);
                out.extend_from_slice(&f.name);
                string(&f.value, out);
            }
        }
    }
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    int(0, 7, s.len() as u64, out);
    out.extend_from_slice(s);
}

/// A prefixed integer (RFC 7541 §5.1) with `flags` in the bits above the
/// `bits`-bit prefix.
fn int(flags: u8, bits: u32, value: u64, out: &mut Vec<u8>) {
    let max = (1u64 << bits) - 1;
    if value < max {
        out.push(flags | value as u8);
        return;
    }
    out.push(flags | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

fn qpack(problem: &'static str) -> ProtoError {
    ProtoError::Qpack { problem }
}

struct Reader<'a> {
    buf: &'a [u8],
    /// Built on the first Huffman-coded string (its tables take 257
    /// symbols) and kept for the rest of the section: a peer's section of
    /// thousands of tiny Huffman strings costs one build, not thousands.
    huffman: Option<loona_hpack::huffman::HuffmanDecoder>,
}

impl Reader<'_> {
    fn byte(&self) -> Result<u8, ProtoError> {
        self.buf
            .first()
            .copied()
            .ok_or_else(|| qpack("ends inside a field line"))
    }

    fn int(&mut self, bits: u32) -> Result<u64, ProtoError> {
        let max = (1u64 << bits) - 1;
        let first = u64::from(self.byte()?) & max;
        self.buf = &self.buf[1..];
        if first < max {
            return Ok(first);
        }
        let mut value = max;
        for shift in (0..63).step_by(7) {
            let b = self.byte()?;
            self.buf = &self.buf[1..];
            value = value
                .checked_add(u64::from(b & 0x7f) << shift)
                .ok_or_else(|| qpack("has an integer too large"))?;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(qpack("has an integer too large"))
    }

    /// A string whose Huffman flag is the bit above its `bits`-bit length.
    fn string(&mut self, bits: u32) -> Result<Vec<u8>, ProtoError> {
        let huffman = self.byte()? & (1 << bits) != 0;
        let len = self.int(bits)?;
        let len = usize::try_from(len).map_err(|_| qpack("has a string too long"))?;
        let s = self
            .buf
            .get(..len)
            .ok_or_else(|| qpack("ends inside a string"))?;
        self.buf = &self.buf[len..];
        if huffman && !s.is_empty() {
            // At most 8 symbols per 5 bytes (the shortest code is 5 bits):
            // bounded by the field section, which is bounded by the frame.
            return self
                .huffman
                .get_or_insert_with(loona_hpack::huffman::HuffmanDecoder::new)
                .decode(s)
                .map_err(|_| qpack("has a malformed Huffman-coded string"));
        }
        Ok(s.to_vec())
    }
}

fn static_entry(index: u64) -> Result<(&'static str, &'static str), ProtoError> {
    usize::try_from(index)
        .ok()
        .and_then(|i| STATIC.get(i))
        .copied()
        .ok_or_else(|| qpack("refers past the static table"))
}

/// Decodes a field section that refers to no dynamic table.
pub fn decode_fields(block: &[u8]) -> Result<Vec<Field>, ProtoError> {
    let mut r = Reader {
        buf: block,
        huffman: None,
    };
    if r.int(8)? != 0 {
        return Err(qpack(
            "refers to a dynamic table, which is announced as empty",
        ));
    }
    r.int(7)?; // Sign and Delta Base: meaningless without a dynamic table.
    let mut fields = Vec::new();
    while !r.buf.is_empty() {
        let b = r.byte()?;
        let field = if b & 0x80 != 0 {
            if b & 0x40 == 0 {
                return Err(qpack("refers to a dynamic table entry"));
            }
            let (n, v) = static_entry(r.int(6)?)?;
            Field::new(n, v)
        } else if b & 0x40 != 0 {
            if b & 0x10 == 0 {
                return Err(qpack("refers to a dynamic table entry"));
            }
            let (n, _) = static_entry(r.int(4)?)?;
            Field {
                name: n.as_bytes().to_vec(),
                value: r.string(7)?,
            }
        } else if b & 0x20 != 0 {
            let name = r.string(3)?;
            Field {
                name,
                value: r.string(7)?,
            }
        } else {
            return Err(qpack("refers to a dynamic table entry"));
        };
        if field.name.iter().any(|c| c.is_ascii_uppercase()) {
            return Err(qpack("has an upper-case field name"));
        }
        fields.push(field);
    }
    Ok(fields)
}
