//! Builds the BPF object (crate `ebpf-prog`, binary `weft`) with the nightly
//! toolchain for bpfel-unknown-none and leaves it in OUT_DIR, where
//! `src/ebpf.rs` embeds it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "ebpf-prog")
        .ok_or_else(|| anyhow!("package ebpf-prog not in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("ebpf-prog manifest has no parent"))?;
    // The shared map types change the object too.
    println!("cargo:rerun-if-changed={}/../common/src", root_dir);
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ebpf-prog",
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
