//! Volume ids: Cinder's provider location, `"<sr_uuid>/<vdi_uuid>"`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// A volume: one SR holding one VDI (its leaf VHD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId {
    pub sr: Uuid,
    pub vdi: Uuid,
}

/// Caller input quoted for an error message: escaped, and cut short when it is long (a
/// hostile id may be hundreds of kilobytes).
pub fn quoted(text: &str) -> String {
    const SHOWN: usize = 64;
    match text.char_indices().nth(SHOWN) {
        None => format!("{text:?}"),
        Some((end, _)) => format!("{:?}... ({} bytes)", &text[..end], text.len()),
    }
}

impl VolumeId {
    /// Parses both halves strictly: exactly two hyphenated UUIDs and nothing else, so no caller
    /// input can ever name a path outside the share.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (sr, vdi) = text.split_once('/').ok_or_else(|| {
            format!(
                "volume id {} is not of the form <sr_uuid>/<vdi_uuid>",
                quoted(text)
            )
        })?;
        Ok(VolumeId {
            sr: parse_uuid(sr, "SR")?,
            vdi: parse_uuid(vdi, "VDI")?,
        })
    }
}

/// A hyphenated UUID (36 characters), the only form xapi uses.
pub fn parse_uuid(text: &str, what: &str) -> Result<Uuid, String> {
    let refused = || format!("{what} uuid {} is not a UUID", quoted(text));
    if text.len() != 36 {
        return Err(refused());
    }
    Uuid::parse_str(text).map_err(|_| refused())
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.sr, self.vdi)
    }
}

impl FromStr for VolumeId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        VolumeId::parse(s)
    }
}

impl Serialize for VolumeId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VolumeId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        VolumeId::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_provider_locations_and_prints_them_back() {
        let text = "3f1c2a8e-0a51-4f0e-9a4f-7b2f1d1e6c01/9b0e2f3a-6c7d-4e8f-a1b2-c3d4e5f60718";
        assert_eq!(VolumeId::parse(text).unwrap().to_string(), text);
    }

    #[test]
    fn refuses_anything_that_is_not_two_uuids() {
        for bad in [
            "",
            "abc",
            "3f1c2a8e-0a51-4f0e-9a4f-7b2f1d1e6c01",
            "../../etc/passwd",
            "3f1c2a8e-0a51-4f0e-9a4f-7b2f1d1e6c01/../x",
            "3f1c2a8e-0a51-4f0e-9a4f-7b2f1d1e6c01/9b0e2f3a-6c7d-4e8f-a1b2-c3d4e5f60718/x",
            "3f1c2a8e0a514f0e9a4f7b2f1d1e6c01/9b0e2f3a6c7d4e8fa1b2c3d4e5f60718",
            "{3f1c2a8e-0a51-4f0e-9a4f-7b2f1d1e6c}/9b0e2f3a-6c7d-4e8f-a1b2-c3d4e5f60718",
        ] {
            assert!(VolumeId::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn long_input_is_cut_short_in_messages() {
        let long = format!("{}/x", "\u{e9}".repeat(10_000));
        let message = VolumeId::parse(&long).unwrap_err();
        assert!(message.len() < 200, "{message}");
        assert!(message.contains("(20000 bytes)"), "{message}");
        assert_eq!(quoted("a\nb"), "\"a\\nb\"");
    }
}
