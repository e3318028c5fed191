//! A `weir run` process inside a node's network namespace and its own
//! cgroup, and the HTTP endpoints a test watches it through.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use weir::netns::NetNs;

use crate::http::http_get;
use crate::topology::Node;

/// Istio's ports, which the agent keeps (see DESIGN.md).
const METRICS_PORT: u16 = 15020;
const HEALTH_PORT: u16 = 15021;
const ADMIN_PORT: u16 = 15000;
const LOG_TAIL_LINES: usize = 40;
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The agent binary: `$WEIR_BIN` when set, else `weir` in the nearest
/// directory above the running executable that has one. For a test binary
/// in `target/debug/deps/` that is `target/debug/weir`, so the agent must be
/// built first (`cargo build -p weir`): cargo builds only the agent's
/// library for this crate's tests.
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("WEIR_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    exe.ancestors()
        .skip(1)
        .map(|dir| dir.join("weir"))
        .find(|candidate| candidate.is_file())
        .with_context(|| {
            format!(
                "no `weir` binary in any directory above {}; build it with `cargo build -p weir` or set WEIR_BIN",
                exe.display()
            )
        })
}

/// `weir run` for one node of a sandbox, with the agent's ports on Istio's
/// numbers. `source` are the flags that name the model source; `extra_args`
/// come last, so they can add flags.
pub(crate) fn run_command(
    bin: &Path,
    node: &str,
    source: [&OsStr; 2],
    cgroup: &Path,
    netns_dir: &Path,
    extra_args: &[&str],
) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .args([OsStr::new("--node"), OsStr::new(node)])
        .args(source)
        .args([OsStr::new("--cgroup"), cgroup.as_os_str()])
        .args([OsStr::new("--netns-dir"), netns_dir.as_os_str()])
        .args(["--metrics-addr", &format!("0.0.0.0:{METRICS_PORT}")])
        .args(["--health-addr", &format!("0.0.0.0:{HEALTH_PORT}")])
        .args(["--admin-addr", &format!("127.0.0.1:{ADMIN_PORT}")])
        .args(extra_args);
    cmd
}

/// A running agent. Dropping it kills the process (SIGKILL) and reaps it.
pub struct Agent {
    node: String,
    pid: u32,
    process: Arc<Mutex<Child>>,
    netns: NetNs,
    node_ip: Ipv4Addr,
    log: PathBuf,
    /// The test knows the agent stops or stopped: it signalled or waited for
    /// it, or an error already said so. Drop then stays quiet.
    exit_expected: AtomicBool,
}

impl Agent {
    /// Spawns `cmd` inside `node`'s network namespace and the cgroup
    /// `cgroup_dir`, with stdout and stderr appended to `log`.
    ///
    /// Both moves happen in the child between fork and exec, so the agent
    /// never runs a single instruction elsewhere. `ip netns exec` is no use
    /// here: it remounts /sys, which hides /sys/fs/bpf and the cgroups.
    pub(crate) fn spawn(
        mut cmd: Command,
        node: &Node,
        cgroup_dir: &Path,
        log: PathBuf,
    ) -> Result<Agent> {
        let netns = NetNs::open(node.netns().path())
            .with_context(|| format!("cannot open {}", node.netns().path().display()))?;
        let procs_path = cgroup_dir.join("cgroup.procs");
        let procs = OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .with_context(|| format!("cannot open {}", procs_path.display()))?;
        let output = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output);
        let (netns_fd, procs_fd) = (netns.file().as_raw_fd(), procs.as_raw_fd());
        // SAFETY: between fork and exec the child only makes two system
        // calls on descriptors opened before the fork; both are close-on-exec
        // and `netns` and `procs` outlive `spawn`.
        unsafe {
            cmd.pre_exec(move || enter_netns_and_cgroup(netns_fd, procs_fd));
        }
        let child = cmd.spawn().with_context(|| {
            format!(
                "cannot start {:?} for node {}",
                cmd.get_program(),
                node.name()
            )
        })?;
        drop(procs);
        Ok(Agent {
            node: node.name().to_owned(),
            pid: child.id(),
            process: Arc::new(Mutex::new(child)),
            netns,
            node_ip: node.ip(),
            log,
            exit_expected: AtomicBool::new(false),
        })
    }

    /// The process, shared with the sandbox so that it can kill agents a
    /// test forgot to drop before the sandbox.
    pub(crate) fn process(&self) -> Arc<Mutex<Child>> {
        Arc::clone(&self.process)
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The file the agent's stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> Result<String> {
        std::fs::read_to_string(&self.log)
            .with_context(|| format!("cannot read {}", self.log.display()))
    }

    /// Polls `/healthz/ready` on the node's address until it answers 200.
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let addr = SocketAddr::from((self.node_ip, HEALTH_PORT));
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                self.exit_expected.store(true, Ordering::Relaxed);
                bail!(
                    "agent exited ({status}) before it was ready\n{}",
                    self.describe()
                );
            }
            let last = match http_get(&self.netns, addr, "/healthz/ready") {
                Ok(response) if response.status == 200 => return Ok(()),
                Ok(response) => format!("HTTP {}: {}", response.status, response.body.trim()),
                Err(error) => format!("{error:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "agent not ready after {timeout:?}; last answer: {last}\n{}",
                    self.describe()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// The HTTP status of a probe path (`/healthz/ready`, `/healthz/live`)
    /// on the metrics port, where the DaemonSet's kubelet probes go.
    pub fn probe(&self, path: &str) -> Result<u16> {
        let addr = SocketAddr::from((self.node_ip, METRICS_PORT));
        Ok(http_get(&self.netns, addr, path)?.status)
    }

    /// `GET /metrics` on the node's address, in Prometheus text format.
    pub fn metrics(&self) -> Result<String> {
        self.get_ok(SocketAddr::from((self.node_ip, METRICS_PORT)), "/metrics")
    }

    /// `GET /config_dump` on the admin port, which only listens on the
    /// node's loopback.
    pub fn config_dump(&self) -> Result<serde_json::Value> {
        let body = self.get_ok(
            SocketAddr::from((Ipv4Addr::LOCALHOST, ADMIN_PORT)),
            "/config_dump",
        )?;
        serde_json::from_str(&body).context("config_dump is not JSON")
    }

    pub fn sigterm(&self) -> Result<()> {
        self.exit_expected.store(true, Ordering::Relaxed);
        let mut child = lock(&self.process);
        // The pid is ours only until the child is reaped.
        if child.try_wait()?.is_none() {
            kill(Pid::from_raw(self.pid as i32), Signal::SIGTERM)
                .with_context(|| format!("cannot send SIGTERM to agent {}", self.pid))?;
        }
        Ok(())
    }

    pub fn sigkill(&self) -> Result<()> {
        self.exit_expected.store(true, Ordering::Relaxed);
        lock(&self.process)
            .kill()
            .with_context(|| format!("cannot send SIGKILL to agent {}", self.pid))
    }

    /// Waits for the agent to exit, however long that takes. Until then it
    /// holds the process, so signal the agent before, not during.
    pub fn wait(&self) -> Result<ExitStatus> {
        self.exit_expected.store(true, Ordering::Relaxed);
        Ok(lock(&self.process).wait()?)
    }

    /// Waits for the agent to exit, failing after `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<ExitStatus> {
        self.exit_expected.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!("agent still running after {timeout:?}\n{}", self.describe());
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Leaves the agent running when the handle goes, for the demo's
    /// `--keep` (with [`Sandbox::keep`](crate::Sandbox::keep), or the
    /// sandbox kills it).
    pub fn keep(self) {
        std::mem::forget(self);
    }

    /// The exit status if the agent has exited. The lock is released before
    /// this returns, so callers may lock again (`describe` does).
    fn try_status(&self) -> Result<Option<ExitStatus>> {
        Ok(lock(&self.process).try_wait()?)
    }

    fn get_ok(&self, addr: SocketAddr, path: &str) -> Result<String> {
        let response = http_get(&self.netns, addr, path).with_context(|| self.describe())?;
        if response.status != 200 {
            bail!(
                "GET {path} answered {}: {}\n{}",
                response.status,
                response.body.trim(),
                self.describe()
            );
        }
        Ok(response.body)
    }

    /// Which agent this is, whether it still runs, and the end of its log.
    fn describe(&self) -> String {
        let state = match self.try_status() {
            Ok(None) => "running".to_owned(),
            Ok(Some(status)) => format!("exited ({status})"),
            Err(error) => format!("state unknown ({error})"),
        };
        let tail = match std::fs::read_to_string(&self.log) {
            Ok(text) => {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
            }
            Err(error) => format!("(cannot read the log: {error})"),
        };
        format!(
            "agent for node {} (pid {}) is {state}; last lines of {}:\n{tail}",
            self.node,
            self.pid,
            self.log.display()
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let exited = self.try_status().ok().flatten();
        let unexpected = exited.is_some() && !self.exit_expected.load(Ordering::Relaxed);
        if unexpected || thread::panicking() {
            eprintln!("weir-sandbox: {}", self.describe());
        }
        stop(&self.process);
    }
}

/// Kills the process if it still runs, and reaps it.
pub(crate) fn stop(process: &Mutex<Child>) {
    let mut child = lock(process);
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn lock(process: &Mutex<Child>) -> MutexGuard<'_, Child> {
    // Poisoning means a panic elsewhere; the Child itself is still fine.
    process.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs in the forked child before exec. Writing "0" to `cgroup.procs`
/// moves the writer, so no pid needs formatting here.
fn enter_netns_and_cgroup(netns_fd: RawFd, procs_fd: RawFd) -> io::Result<()> {
    // SAFETY: plain system calls on open descriptors and a static buffer.
    unsafe {
        if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
            return Err(io::Error::last_os_error());
        }
        if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
