//! Network namespace handles, shared by the agent and the test sandbox.
//!
//! A socket belongs to the network namespace of the thread that created it,
//! for its whole life. So code that needs a socket in a pod's namespace runs
//! on a short-lived or dedicated thread that setns()'d there, and hands the
//! socket back; the socket can then be used from any thread.

use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

/// `SO_NETNS_COOKIE`, not yet exported by libc for every target.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// An open network namespace file, such as `/var/run/netns/<name>`.
#[derive(Debug)]
pub struct NetNs {
    file: File,
    path: PathBuf,
}

impl NetNs {
    pub fn open(path: impl AsRef<Path>) -> io::Result<NetNs> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path)?;
        Ok(NetNs { file, path })
    }

    /// The namespace of the calling thread.
    pub fn current() -> io::Result<NetNs> {
        NetNs::open(format!("/proc/self/task/{}/ns/net", nix::unistd::gettid()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Which namespace this is: two handles with the same id are one
    /// namespace, whatever paths they were opened by.
    pub fn id(&self) -> io::Result<NsId> {
        Ok(NsId::from(&self.file.metadata()?))
    }

    /// Moves the calling thread into this namespace. Only for threads that
    /// stay there for good, such as a pod's socket factory.
    pub fn enter(&self) -> io::Result<()> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
    }

    /// Runs `f` on a fresh thread inside this namespace and returns its
    /// result. The caller's thread never changes namespace.
    pub fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter()?;
                    Ok(f())
                })
                .join()
                .map_err(|_| io::Error::other("thread in network namespace panicked"))?
        })
    }

    /// The kernel's cookie for this namespace, the key eBPF programs see
    /// from `bpf_get_netns_cookie`.
    pub fn cookie(&self) -> io::Result<u64> {
        self.run(|| {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
            netns_cookie(&socket)
        })?
    }
}

/// A namespace's identity: the device and inode of its nsfs file, as
/// `stat` on any path to it (a bind mount, `/proc/<pid>/ns/net`) shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NsId {
    dev: u64,
    ino: u64,
}

impl NsId {
    /// The namespace `path` leads to, without opening it.
    pub fn of(path: impl AsRef<Path>) -> io::Result<NsId> {
        Ok(NsId::from(&std::fs::metadata(path)?))
    }

    pub fn new(dev: u64, ino: u64) -> NsId {
        NsId { dev, ino }
    }
}

impl From<&Metadata> for NsId {
    fn from(meta: &Metadata) -> NsId {
        NsId::new(meta.dev(), meta.ino())
    }
}

/// The netns cookie of the namespace a socket was created in.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe a valid u64.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}
