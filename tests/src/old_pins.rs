//! Maps pinned in the layout of another weft version, made with bpftool
//! as any other tool would make them: what an upgrade finds under
//! `--pin-path`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};

/// One map definition as an older (or newer) weft pinned it.
#[derive(Clone, Copy, Debug)]
pub struct OldMap {
    pub name: &'static str,
    /// bpftool's type name: `array`, `percpu_array`, `hash`, `lpm_trie`.
    pub kind: &'static str,
    pub key: u32,
    pub value: u32,
    pub entries: u32,
    pub flags: u32,
}

/// NODE_CONFIG before `slow_path_ifindex` was appended: one 48-byte value.
pub const NODE_CONFIG_48: OldMap = OldMap {
    name: weft_common::MAP_NODE_CONFIG,
    kind: "array",
    key: 4,
    value: 48,
    entries: 1,
    flags: 0,
};

impl OldMap {
    /// Creates the map and pins it as `dir/<name>`; returns the pin's path.
    pub fn pin(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(self.name);
        let path_s = path.to_string_lossy();
        let (key, value, entries, flags) = (
            self.key.to_string(),
            self.value.to_string(),
            self.entries.to_string(),
            self.flags.to_string(),
        );
        bpftool(&[
            "map", "create", &path_s, "type", self.kind, "key", &key, "value", &value, "entries",
            &entries, "name", self.name, "flags", &flags,
        ])?;
        Ok(path)
    }
}

/// Sets `key` to `value` (raw bytes) in the map pinned at `path`.
pub fn update(path: &Path, key: &[u8], value: &[u8]) -> Result<()> {
    let path_s = path.to_string_lossy();
    let bytes = |b: &[u8]| b.iter().map(u8::to_string).collect::<Vec<_>>();
    let (key, value) = (bytes(key), bytes(value));
    let mut args = vec!["map", "update", "pinned", &path_s, "key"];
    args.extend(key.iter().map(String::as_str));
    args.push("value");
    args.extend(value.iter().map(String::as_str));
    bpftool(&args)
}

fn bpftool(args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("bpftool")
        .args(args)
        .output()
        .context("running bpftool (needed to make an old-layout map)")?;
    ensure!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
