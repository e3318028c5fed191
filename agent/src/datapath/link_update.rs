//! `BPF_LINK_UPDATE` on a pinned link, which aya 0.14 does not expose: it
//! swaps the program behind a cgroup link atomically, so that no connect()
//! ever runs without one.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

// Commands of `enum bpf_cmd` in linux/bpf.h.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_UPDATE: libc::c_long = 29;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a bpf_attr prefix of the right size for the command.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Points the link pinned at `link` to `program`.
pub fn replace_program(link: &Path, program: impl AsFd) -> io::Result<()> {
    let path = CString::new(link.as_os_str().as_bytes())?;
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        ..Default::default()
    };
    let fd = bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that we now own.
    let link_fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut update = LinkUpdateAttr {
        link_fd: link_fd.as_raw_fd() as u32,
        new_prog_fd: program.as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut update).map(drop)
}
