//! What the fuzz targets share: the agent's flannel parsers and the checks every target makes.
//!
//! The parsers are compiled from node-agent's own files, so the targets exercise exactly the
//! agent's code without building node-agent itself (its build script builds the BPF programs,
//! and none of its other dependencies are the parsers' business). `src/flannel` depends only
//! on the crates listed in this package's Cargo.toml; a new dependency there fails this build,
//! which `cargo xtask test` runs.

#[path = "../../src/flannel/mod.rs"]
pub mod flannel;

use std::error::Error;

/// Fails (panics, which libFuzzer reports as a crash with the input) if `error`'s text,
/// including its source chain, is longer than `flannel::MAX_ERROR_TEXT`: every such error
/// ends up in a log line or a CNI error result.
pub fn check_error(error: &dyn Error) {
    flannel::echo::assert_bounded(error);
}

/// Fuzz input as text. Every input is used: etcd values and files are bytes, and the agent
/// itself rejects invalid UTF-8 before parsing, so invalid sequences are replaced rather than
/// the input skipped, which would waste the fuzzer's mutations.
pub fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}
