//! xenapinfs: block-storage volumes on an NFS share behind a XenServer/XCP-ng host.
pub mod config;
pub mod sim;
pub mod vhd;
pub mod xenapi;
