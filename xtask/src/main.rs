//! `cargo xtask`: the project's own commands.

mod manifests;
mod setup;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install every missing prerequisite: Debian packages, rust-src,
    /// bpf-linker, cargo-nextest, and mount bpffs. Safe to run again.
    Setup,
    /// Build the eBPF object (what `cargo build -p weir` also does).
    BuildEbpf,
    /// Show an enrolled pod's traffic taken over, in a sandbox.
    Demo {
        /// Leave the sandbox and agents running to explore.
        #[arg(long)]
        keep: bool,
    },
    /// Run setup, build the agent in release mode, and benchmark it against
    /// the direct path in a sandbox (as root); results go to bench/results/.
    Bench {
        /// Fewer and shorter rounds.
        #[arg(long)]
        quick: bool,
    },
    /// Check daemonset/ offline: schemas for Kubernetes 1.33, the
    /// Kustomization, apply order, and the Containerfile's binaries.
    CheckManifests,
    /// Run setup, check daemonset/, then every unit and integration test
    /// (as root).
    Test {
        /// Extra arguments for cargo nextest, such as a test name filter.
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build_agent(),
        Task::Demo { keep } => {
            setup::run()?;
            build_agent()?;
            // The demo lives with the sandbox library, which needs the eBPF
            // toolchain to build: xtask itself must build without it.
            let keep: &[String] = if keep { &["--keep".into()] } else { &[] };
            cargo(
                &[
                    "run",
                    "--quiet",
                    "--package",
                    "weir-sandbox",
                    "--bin",
                    "weir-demo",
                    "--",
                ],
                keep,
            )
        }
        Task::Bench { quick } => {
            setup::run()?;
            bench(quick)
        }
        Task::CheckManifests => {
            setup::install_kubernetes_validate()?;
            let files = manifests::check(&workspace_root())?;
            println!("check-manifests: {files} manifests valid for Kubernetes 1.33");
            Ok(())
        }
        Task::Test { args } => {
            setup::run()?;
            // Silent when clean, before the tests, whose summary stays last.
            manifests::check(&workspace_root())?;
            build_agent()?;
            let tests = cargo(&["nextest", "run", "--workspace", "--no-fail-fast"], &args);
            // Silent when clean, so that nextest's summary stays the last line.
            let leftovers = leftovers();
            if !leftovers.is_empty() {
                bail!("the tests left state behind:\n{}", leftovers.join("\n"));
            }
            tests
        }
    }
}

/// Builds the agent, whose build script builds and embeds the eBPF object.
fn build_agent() -> anyhow::Result<()> {
    // The CNI tests run weir-cni from beside weir, as a runtime would.
    cargo(
        &[
            "build",
            "--package",
            "weir",
            "--package",
            "weir-cni",
            "--bins",
        ],
        &[],
    )?;
    println!(
        "built {} and weir-cni",
        workspace_root().join("target/debug/weir").display()
    );
    Ok(())
}

/// Builds the agent in release mode and runs `weir-bench` (in the tests
/// crate, which needs the eBPF toolchain) against that binary.
fn bench(quick: bool) -> anyhow::Result<()> {
    cargo(&["build", "--release", "--package", "weir", "--bins"], &[])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from);
    let weir = target.join("release/weir");
    let mut args = vec![
        "run",
        "--release",
        "--quiet",
        "--package",
        "weir-sandbox",
        "--bin",
        "weir-bench",
        "--",
    ];
    if quick {
        args.push("--quick");
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(&args)
        .env("WEIR_BIN", &weir)
        .current_dir(workspace_root())
        .status()
        .context("running weir-bench")?;
    if !status.success() {
        bail!("weir-bench failed: {status}");
    }
    Ok(())
}

/// What a test run must not leave behind: cgroup attachments of weir's
/// programs, pins, or sandbox namespaces.
fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    let output = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default()
    };
    for line in output("bpftool", &["cgroup", "tree"]).lines() {
        if ["redirect_connect", "restore_peer", "track_connect"]
            .iter()
            .any(|p| line.contains(p))
        {
            found.push(format!("bpftool cgroup tree: {}", line.trim()));
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf/weir") {
        for entry in entries.flatten() {
            found.push(format!("pinned: {}", entry.path().display()));
        }
    }
    for line in output("ip", &["netns", "list"]).lines() {
        if line.starts_with("weir-") {
            found.push(format!("network namespace: {line}"));
        }
    }
    found
}

fn cargo(args: &[&str], extra: &[String]) -> anyhow::Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .args(extra)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}
