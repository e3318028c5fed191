//! The cgroup v2 facts the agent needs: where the hierarchy is mounted, and
//! the id of the agent's own cgroup, which marks its sockets as its own.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The cgroup2 mount point from /proc/self/mounts. Inside a container this
/// is the container's own view; the DaemonSet therefore passes the host's
/// hierarchy explicitly with `--cgroup`.
pub fn cgroup2_mount() -> io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split(' ');
            let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup2 mount in /proc/self/mounts",
            )
        })
}

/// The cgroup v2 path of this process, relative to the hierarchy's root.
pub fn own_cgroup() -> io::Result<PathBuf> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")?;
    cgroups
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| PathBuf::from(path.trim_start_matches('/')))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no cgroup v2 entry in /proc/self/cgroup",
            )
        })
}

/// The id `bpf_get_current_cgroup_id()` reports for tasks in `dir`: on
/// cgroup v2 it is the inode number of the cgroup's directory.
pub fn cgroup_id(dir: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}
