//! Pure packet logic shared by the BPF programs and host unit tests: header
//! construction and checksums, with no kernel helpers and no allocation.
#![no_std]

pub mod checksum;
pub mod encap;
pub mod headers;
pub mod icmp;
pub mod ratelimit;
