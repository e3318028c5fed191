//! The sandbox's cgroup2 subtree: `weir-<tag>/` with `pods/`, where the
//! test process itself runs, and one `agent-<node>/` per agent.
//!
//! The agents attach their eBPF programs to `weir-<tag>/`, so only the
//! sandbox's own processes ever pass through them. A process can be in one
//! cgroup only, so a process holds at most one sandbox at a time.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How long removal waits for the kernel to let go of an exited process.
const RMDIR_PATIENCE: Duration = Duration::from_secs(2);

pub(crate) struct SandboxCgroup {
    root: PathBuf,
    /// The cgroup the process was in before, where it returns on drop.
    home: PathBuf,
    /// Every directory made, in creation order.
    created: Vec<PathBuf>,
    _lock: ProcessLock,
}

impl SandboxCgroup {
    /// Makes `<cgroup2>/<name>/pods/` and moves the calling process into it,
    /// after waiting for any other sandbox of this process to go away.
    pub(crate) fn create(name: &str) -> Result<SandboxCgroup> {
        let lock = ProcessLock::acquire();
        let mount = cgroup2_mount()?;
        let home = mount.join(current_cgroup()?.trim_start_matches('/'));
        let root = mount.join(name);
        let pods = root.join("pods");
        let mut cgroup = SandboxCgroup {
            root: root.clone(),
            home,
            created: Vec::new(),
            _lock: lock,
        };
        cgroup.make_dir(root)?;
        cgroup.make_dir(pods.clone())?;
        move_process(&pods)?;
        Ok(cgroup)
    }

    /// The sandbox's cgroup, which agents attach to.
    pub(crate) fn path(&self) -> &Path {
        &self.root
    }

    /// `agent-<node>/`, made on first use.
    pub(crate) fn agent_cgroup(&mut self, node: &str) -> Result<PathBuf> {
        let dir = self.root.join(format!("agent-{node}"));
        if !self.created.contains(&dir) {
            self.make_dir(dir.clone())?;
        }
        Ok(dir)
    }

    fn make_dir(&mut self, dir: PathBuf) -> Result<()> {
        fs::create_dir(&dir).with_context(|| {
            format!(
                "cannot create cgroup {} (left over from an earlier run?)",
                dir.display()
            )
        })?;
        self.created.push(dir);
        Ok(())
    }
}

impl Drop for SandboxCgroup {
    fn drop(&mut self) {
        if let Err(error) = move_process(&self.home) {
            eprintln!("weir-sandbox: {error:#}");
        }
        for dir in self.created.iter().rev() {
            if let Err(error) = remove_cgroup(dir) {
                eprintln!(
                    "weir-sandbox: cannot remove cgroup {}: {error}",
                    dir.display()
                );
            }
        }
    }
}

/// Where cgroup2 is mounted, from /proc/mounts. On a hybrid host, such as
/// this one, that is not /sys/fs/cgroup.
fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let mount_point = fields.nth(1)?;
            (fields.next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .next()
        .context("no cgroup2 file system is mounted")
}

/// The calling process's cgroup2 path, relative to the mount.
fn current_cgroup() -> Result<String> {
    let cgroups =
        fs::read_to_string("/proc/self/cgroup").context("cannot read /proc/self/cgroup")?;
    cgroups
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
        .context("/proc/self/cgroup has no cgroup2 entry")
}

/// Moves the whole calling process into `cgroup`; "0" means the writer.
fn move_process(cgroup: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    fs::write(&procs, "0")
        .with_context(|| format!("cannot move this process into {}", procs.display()))
}

/// Removes an empty cgroup. A process that just exited can keep it busy
/// for a moment after it was reaped, so EBUSY is retried briefly.
fn remove_cgroup(dir: &Path) -> std::io::Result<()> {
    let deadline = Instant::now() + RMDIR_PATIENCE;
    loop {
        match fs::remove_dir(dir) {
            Err(error)
                if error.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// Allows one sandbox per process. Unlike a `MutexGuard`, it can move
/// between threads, so a `Sandbox` can too.
struct ProcessLock;

static TAKEN: Mutex<bool> = Mutex::new(false);
static RELEASED: Condvar = Condvar::new();

impl ProcessLock {
    fn acquire() -> ProcessLock {
        // A test that panicked while holding a sandbox poisons nothing we
        // care about: the flag is still right.
        let mut taken = TAKEN.lock().unwrap_or_else(PoisonError::into_inner);
        while *taken {
            taken = RELEASED.wait(taken).unwrap_or_else(PoisonError::into_inner);
        }
        *taken = true;
        ProcessLock
    }
}

impl Drop for ProcessLock {
    fn drop(&mut self) {
        *TAKEN.lock().unwrap_or_else(PoisonError::into_inner) = false;
        RELEASED.notify_one();
    }
}
