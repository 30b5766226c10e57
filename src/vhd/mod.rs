//! vhd
