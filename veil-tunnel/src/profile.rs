//! The profile `veil-user client add` writes and `veil-client` loads: one
//! TOML file with everything a client needs to reach its gateway.

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

    /// A profile from its TOML text; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    pub fn to_toml(&self) -> String {
        format!(
            "# veil client profile for `{}`. Keep it secret: it holds the client's key.\n{}",
            self.name,
            toml::to_string(self).expect("a profile serializes")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_round_trips_and_unknown_keys_are_refused() {
        let p = Profile {
            name: "alice".into(),
            endpoint: "198.51.100.1:443".into(),
            server_name: "veil-gateway".into(),
            ca: "CA".into(),
            cert: "CERT".into(),
            key: "KEY".into(),
        };
        let text = p.to_toml();
        assert!(text.starts_with("# veil client profile for `alice`"));
        assert_eq!(Profile::parse(&text).unwrap(), p);
        let err = Profile::parse(&format!("{text}color = \"blue\"\n")).unwrap_err();
        assert!(err.contains("unknown field"), "{err}");
    }
}
