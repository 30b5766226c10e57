//! xenapinfs: block-storage volumes on an NFS share behind a XenServer/XCP-ng host.
//!
//! The daemon (`xenapinfsd`) talks XenAPI to the host ([`xenapi`]) and serves a local control
//! API ([`api`]) that the CLI ([`cli`]) and other programs use. [`sim`] is a XenAPI simulator
//! backed by real files, for machines without XenServer; [`vhd`] reads and writes the VHD files
//! the share holds.
pub mod api;
pub mod cli;
pub mod config;
pub mod image;
pub mod jobs;
pub mod journal;
pub mod metrics;
pub mod service;
pub mod sim;
pub mod vhd;
pub mod volume;
pub mod xenapi;
