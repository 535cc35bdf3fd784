//! Sizes in bytes as people write them: `4MiB`, `512KiB`, `65536`.

use std::{fmt, str::FromStr};

/// A number of bytes, parsed with an optional binary suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub usize);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a size: expected bytes, or a number with KiB or MiB, such as 4MiB")]
pub struct ByteSizeError(String);

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ByteSizeError(s.to_owned());
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: usize = digits.parse().map_err(|_| err())?;
        let scale = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            _ => return Err(err()),
        };
        n.checked_mul(scale).map(ByteSize).ok_or_else(err)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            n if n >= 1 << 20 && n % (1 << 20) == 0 => write!(f, "{}MiB", n >> 20),
            n if n >= 1 << 10 && n % (1 << 10) == 0 => write!(f, "{}KiB", n >> 10),
            n => write!(f, "{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print_back() {
        for (text, bytes, shown) in [
            ("4MiB", 4 << 20, "4MiB"),
            ("512KiB", 512 << 10, "512KiB"),
            ("512k", 512 << 10, "512KiB"),
            ("65536", 65536, "64KiB"),
            ("1000", 1000, "1000"),
            (" 2 M ", 2 << 20, "2MiB"),
        ] {
            let size: ByteSize = text.parse().unwrap();
            assert_eq!(size.0, bytes, "{text}");
            assert_eq!(size.to_string(), shown);
        }
        for bad in ["", "MiB", "4TB", "-1", "1.5MiB", "99999999999999999999G"] {
            let e = bad.parse::<ByteSize>().unwrap_err();
            assert!(e.to_string().contains("such as 4MiB"), "{bad}: {e}");
        }
    }
}
