//! Images in and out: format inspection (from content, never from names), safety rules, the
//! streaming vhd-tgz importer and exporter, and the qemu-img runner.

mod error;
pub mod formats;
pub mod inspect;
pub mod qemu;
pub mod tgz;
pub mod transfer;

use std::fmt;
use std::str::FromStr;

pub use error::ImageError;

/// The image formats the agent reads and writes, named as on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageFormat {
    /// XenServer's tarball of a VHD chain (`0.vhd` leaf, `1.vhd` its parent, ...), gzipped.
    VhdTgz,
    Vhd,
    Qcow2,
    Vmdk,
    Vdi,
    Vhdx,
    Raw,
}

impl ImageFormat {
    pub const ALL: [ImageFormat; 7] = [
        ImageFormat::VhdTgz,
        ImageFormat::Vhd,
        ImageFormat::Qcow2,
        ImageFormat::Vmdk,
        ImageFormat::Vdi,
        ImageFormat::Vhdx,
        ImageFormat::Raw,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::VhdTgz => "vhd-tgz",
            ImageFormat::Vhd => "vhd",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vdi => "vdi",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Raw => "raw",
        }
    }

    /// qemu's driver name (`-f`/`-O`); `None` for the tarball, which qemu cannot read.
    pub fn qemu_driver(self) -> Option<&'static str> {
        match self {
            ImageFormat::VhdTgz => None,
            ImageFormat::Vhd => Some("vpc"),
            other => Some(other.name()),
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ImageFormat {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ImageFormat::ALL
            .into_iter()
            .find(|format| format.name() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = ImageFormat::ALL.iter().map(|f| f.name()).collect();
                format!("unknown image format {text:?}; one of {}", names.join(", "))
            })
    }
}
