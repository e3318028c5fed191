//! `cargo xtask setup`: installs what is missing and nothing else, so that it
//! is quick the second time and a fresh machine needs no manual step.

use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// bpf-linker links with this LLVM, which must match rustc's major version.
const LLVM: &str = "22";

/// PyPI's kubernetes-validate, which checks daemonset/ against the API
/// schemas of each Kubernetes version (up to its own).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// Debian packages: LLVM for bpf-linker, iproute2 for the sandbox, iptables
/// for the agent's fallback interception, bpftool and promtool (package
/// prometheus) for checks users also make.
fn packages() -> Vec<String> {
    let mut packages: Vec<String> = [
        "libzstd-dev",
        "zlib1g-dev",
        "bpftool",
        "iproute2",
        "iptables",
        "prometheus",
        "curl",
    ]
    .map(String::from)
    .to_vec();
    packages.push(format!("llvm-{LLVM}-dev"));
    packages.push(format!("libpolly-{LLVM}-dev"));
    packages
}

pub fn run() -> anyhow::Result<()> {
    install_packages()?;
    install_rust_src()?;
    if !succeeds("bpf-linker", &["--version"]) {
        println!("setup: installing bpf-linker against LLVM {LLVM}");
        let features = format!("llvm-{LLVM}");
        let status = Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                "^0.13",
                "--no-default-features",
                "--features",
            ])
            .arg(&features)
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM}"))
            .status()?;
        if !status.success() {
            bail!("cargo install bpf-linker failed: {status}");
        }
    }
    if !succeeds("cargo", &["nextest", "--version"]) {
        println!("setup: installing cargo-nextest");
        let status = Command::new("cargo")
            .args(["install", "cargo-nextest", "--locked"])
            .status()?;
        if !status.success() {
            bail!("cargo install cargo-nextest failed: {status}");
        }
    }
    install_kubernetes_validate()?;
    mount_bpffs()?;
    println!("setup: ready");
    Ok(())
}

fn install_packages() -> anyhow::Result<()> {
    let missing: Vec<String> = packages()
        .into_iter()
        .filter(|p| {
            let status = Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output();
            !status.is_ok_and(|out| {
                String::from_utf8_lossy(&out.stdout).contains("install ok installed")
            })
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("missing Debian packages {missing:?}; run setup as root");
    }
    println!("setup: installing {}", missing.join(" "));
    run_quiet(Command::new("apt-get").arg("update"))?;
    run_quiet(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// rust-src for the toolchain that builds the eBPF crate: nightly when it is
/// installed, else stable (which agent/build.rs runs with RUSTC_BOOTSTRAP=1).
fn install_rust_src() -> anyhow::Result<()> {
    let toolchain = if succeeds("rustup", &["run", "nightly", "rustc", "--version"]) {
        "nightly"
    } else {
        "stable"
    };
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .output()
        .context("running rustup")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        return Ok(());
    }
    println!("setup: adding rust-src to {toolchain}");
    run_quiet(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        toolchain,
    ]))
}

/// kubernetes-validate for `cargo xtask check-manifests`, unless a version
/// that knows Kubernetes 1.33 is already there.
pub fn install_kubernetes_validate() -> anyhow::Result<()> {
    let present = "from kubernetes_validate.version import __version__ as v; \
        import sys; sys.exit(tuple(map(int, v.split('.')[:2])) < (1, 33))";
    if succeeds("python3", &["-c", present]) {
        return Ok(());
    }
    println!("setup: installing {KUBERNETES_VALIDATE}");
    let install = |extra: &[&str]| {
        run_quiet(
            Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(extra)
                .arg(KUBERNETES_VALIDATE),
        )
    };
    // A Debian python3 refuses pip installs outside a venv (PEP 668) unless
    // told otherwise; older pips do not know the flag, so it comes second.
    install(&[]).or_else(|_| install(&["--break-system-packages"]))
}

fn mount_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some("/sys/fs/bpf"))
    {
        return Ok(());
    }
    println!("setup: mounting bpffs on /sys/fs/bpf");
    run_quiet(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run_quiet(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
