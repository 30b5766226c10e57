//! xenapi
