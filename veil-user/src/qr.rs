//! A profile as a QR code: for the terminal (`client add --qr`) and as a
//! PNG (`--qr-png FILE`). The content is the profile's compact text
//! ([`Profile::to_compact`]), about 1,000 characters in a version 21 code
//! (101 modules: 55 columns of a terminal). The TOML profile itself (about
//! 1.5 KiB) would need a version 32 code (145 modules), too wide for an
//! 80-column terminal and hard on a phone's camera.

use qrcode::{render::unicode::Dense1x2, EcLevel, QrCode};

use crate::state::Profile;

/// Pixels per module in the PNG, and the quiet zone in modules (ISO/IEC
/// 18004 asks for 4).
const PNG_SCALE: usize = 8;
const QUIET: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum QrError {
    #[error("the profile cannot be made compact: {0}")]
    Compact(String),
    #[error("the profile does not fit in a QR code: {0}")]
    TooLarge(#[from] qrcode::types::QrError),
    #[error("encoding the PNG")]
    Png(#[from] png::EncodingError),
}

/// The QR code of a profile. Error correction M (15% of the code may be
/// damaged or covered), the usual choice for a code shown on a screen.
pub fn code(profile: &Profile) -> Result<QrCode, QrError> {
    let text = profile.to_compact().map_err(QrError::Compact)?;
    Ok(QrCode::with_error_correction_level(
        text.as_bytes(),
        EcLevel::M,
    )?)
}

/// The code in Unicode half blocks, two modules a line, light modules
/// drawn: readable on a dark terminal and a light one alike.
pub fn terminal(code: &QrCode) -> String {
    code.render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .quiet_zone(true)
        .build()
}

/// The code as a grayscale PNG, black on white, with its quiet zone.
pub fn png(code: &QrCode) -> Result<Vec<u8>, QrError> {
    let modules = code.width();
    let side = (modules + 2 * QUIET) * PNG_SCALE;
    let colors = code.to_colors();
    let mut pixels = vec![0xffu8; side * side];
    for (i, color) in colors.iter().enumerate() {
        if *color != qrcode::Color::Dark {
            continue;
        }
        let (x, y) = (i % modules + QUIET, i / modules + QUIET);
        for row in y * PNG_SCALE..(y + 1) * PNG_SCALE {
            pixels[row * side + x * PNG_SCALE..row * side + (x + 1) * PNG_SCALE].fill(0);
        }
    }
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, side as u32, side as u32);
        encoder.set_color(png::ColorType::Grayscale);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&pixels)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateDir;

    fn profile(endpoints: &[&str]) -> (Profile, std::path::PathBuf) {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("veil-qr-{}-{n}", std::process::id()));
        let state = StateDir::open(&root).unwrap();
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
        (state.add_client("alice", &endpoints).unwrap(), root)
    }

    /// Decodes a PNG with rqrr, as a phone would the screen.
    fn decode(png_bytes: &[u8]) -> String {
        let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        let (w, h) = (info.width as usize, info.height as usize);
        let mut img = rqrr::PreparedImage::prepare_from_greyscale(w, h, |x, y| buf[y * w + x]);
        let grids = img.detect_grids();
        assert_eq!(grids.len(), 1, "one code");
        grids[0].decode().unwrap().1
    }

    #[test]
    fn the_png_decodes_to_the_same_profile() {
        let (p, root) = profile(&["198.51.100.1:443", "gw2.example:8443"]);
        let png_bytes = png(&code(&p).unwrap()).unwrap();
        assert_eq!(&png_bytes[1..4], b"PNG");
        let text = decode(&png_bytes);
        assert!(text.starts_with("VEIL1:"), "{text}");
        assert_eq!(Profile::parse(&text).unwrap(), p, "byte for byte");
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn a_websocket_profile_with_its_proxy_ca_reads_back_from_the_code() {
        let (mut p, root) = profile(&["wss://proxy.example/veil", "198.51.100.1:443"]);
        // Any certificate will do as the proxy's CA: the gateway's own.
        p.endpoint_ca = Some(p.ca.clone());
        let png_bytes = png(&code(&p).unwrap()).unwrap();
        assert_eq!(Profile::parse(&decode(&png_bytes)).unwrap(), p);
        let without = Profile {
            endpoint_ca: None,
            ..p.clone()
        };
        assert_eq!(
            Profile::parse(&without.to_compact().unwrap()).unwrap(),
            without
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn the_compact_text_is_small_enough_for_a_modest_code() {
        let (p, root) = profile(&["198.51.100.1:443"]);
        let toml = p.to_toml();
        let compact = p.to_compact().unwrap();
        let c = code(&p).unwrap();
        let qrcode::Version::Normal(version) = c.version() else {
            panic!("a normal QR code")
        };
        // Measured: the TOML ~1.5 KiB would take a version 32 code; the
        // compact text ~1,000 characters, a version 21 one.
        let whole = QrCode::with_error_correction_level(toml.as_bytes(), EcLevel::M).unwrap();
        eprintln!(
            "TOML {} B (QR {:?}, {} modules), compact {} chars, QR version {version} ({} modules)",
            toml.len(),
            whole.version(),
            whole.width(),
            compact.len(),
            c.width()
        );
        assert!(compact.len() * 10 < toml.len() * 7, "{}", compact.len());
        assert!(version <= 23, "version {version}");
        let text = terminal(&c);
        assert_eq!(text.lines().count(), (c.width() + 8).div_ceil(2));
        assert!(text.contains('▀') || text.contains('▄'));
        std::fs::remove_dir_all(root).unwrap();
    }
}
