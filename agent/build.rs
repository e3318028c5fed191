//! Builds the eBPF programs (ebpf/) for the BPF target and leaves the object
//! in OUT_DIR, where `datapath` embeds it. `cargo xtask build-ebpf` runs this
//! same build through `cargo build -p weir`.

use std::process::Command;

use aya_build::{Package, Toolchain};

fn main() -> aya_build::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    let ebpf = Package {
        name: "weir-ebpf",
        root_dir: root,
        ..Default::default()
    };
    println!("cargo:rerun-if-changed={root}/common");
    aya_build::build_ebpf([ebpf], toolchain())
}

/// Nightly when it is installed; otherwise the stable toolchain, whose
/// `-Z build-std` is unlocked with RUSTC_BOOTSTRAP=1.
fn toolchain() -> Toolchain<'static> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if nightly {
        return Toolchain::Nightly;
    }
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    Toolchain::Custom("stable")
}
