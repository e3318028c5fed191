//! Loads, pins and attaches the eBPF programs, and hands out the maps.
//!
//! Everything lives under `/sys/fs/bpf/weir/<node>/`:
//! - `maps-v<LAYOUT_VERSION>/<MAP>`: the maps, versioned by layout;
//! - `progs/<program>`: the programs;
//! - `links/<program>`: the cgroup links, which keep the programs attached
//!   while no agent runs;
//! - `links/inbound/<netns cookie>`: one sk_lookup link per enrolled pod.
//!
//! An agent that finds the links of the same build reuses them as they are,
//! so program ids and links survive restarts. An agent of another build, or
//! one that finds an older map layout, loads its programs and swaps them into
//! the existing links with `BPF_LINK_UPDATE`, never detaching in between.

mod link_update;
pub mod maps;

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use aya::programs::{
    CgroupAttachMode, Program, ProgramError, SkLookup, SkSkb,
    links::{FdLink, LinkError},
};
use aya::{Ebpf, EbpfError, EbpfLoader, maps::MapError, pin::PinError};
use tracing::{info, warn};
use weir_common::{LAYOUT_VERSION, Settings};

pub use maps::Maps;

/// The eBPF object built from `ebpf/` by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir"));

/// Every program of the object; each is attached to the node's cgroup.
pub const PROGRAMS: [&str; 5] = [
    "redirect_connect4",
    "redirect_connect6",
    "restore_peer4",
    "restore_peer6",
    "track_connect",
];

/// The sk_lookup program, attached to each enrolled pod's namespace.
pub const INBOUND_PROGRAM: &str = "steer_inbound";

/// The stream verdict of kernel-carried flows, attached to `FLOW_SOCKETS`
/// by every agent start. The attachment belongs to the map, not to a
/// cgroup, and only this agent's sockets are in the map, so it is neither
/// pinned nor kept across restarts: the next agent attaches its own, which
/// replaces it.
pub const FLOW_PROGRAM: &str = "carry_flow";

pub const PIN_ROOT: &str = "/sys/fs/bpf/weir";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("link of program {name}: {source}")]
    Link {
        name: &'static str,
        source: LinkError,
    },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: PinError },
    #[error("map: {0}")]
    Map(#[from] MapError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DatapathError {
    let path = path.to_path_buf();
    move |source| DatapathError::Io { what, path, source }
}

/// Where one node's pins live.
#[derive(Clone, Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn for_node(node: &str) -> PinDir {
        PinDir(Path::new(PIN_ROOT).join(node))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    fn maps(&self, version: u32) -> PathBuf {
        self.0.join(format!("maps-v{version}"))
    }

    fn program(&self, name: &str) -> PathBuf {
        self.0.join("progs").join(name)
    }

    fn link(&self, name: &str) -> PathBuf {
        self.0.join("links").join(name)
    }

    fn inbound_links(&self) -> PathBuf {
        self.0.join("links").join("inbound")
    }

    /// Map directories of older layouts, left by an earlier agent.
    fn stale_map_dirs(&self) -> Vec<PathBuf> {
        let current = self.maps(LAYOUT_VERSION);
        let Ok(entries) = fs::read_dir(&self.0) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| {
                path.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.starts_with("maps-v"))
                    && *path != current
            })
            .collect()
    }
}

/// The attached programs of one node and their maps.
pub struct Datapath {
    pub maps: Maps,
    pub inbound: InboundHook,
    /// Kept so that the programs stay loaded while the agent runs; the pins
    /// keep them after it exits.
    _ebpf: Ebpf,
}

/// How this start found the node: fresh, reusing pins, or upgrading them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    Fresh,
    Reused,
    Upgraded,
}

impl Datapath {
    /// Attaches to `cgroup`, or takes over the pins an earlier agent left.
    pub fn open(
        pins: &PinDir,
        cgroup: &Path,
        settings: Settings,
    ) -> Result<(Datapath, Start), DatapathError> {
        mount_bpffs()?;
        let maps_dir = pins.maps(LAYOUT_VERSION);
        for dir in [maps_dir.clone(), pins.0.join("progs"), pins.inbound_links()] {
            fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(OBJECT)?;
        let mut maps = Maps::take(&mut ebpf)?;
        attach_flow_program(&mut ebpf, &maps)?;

        let build = build_id();
        let previous = maps.settings.get()?;
        let stale = pins.stale_map_dirs();
        let linked = PROGRAMS.iter().all(|name| pins.link(name).exists())
            && pins.program(INBOUND_PROGRAM).exists();
        let start = if linked && stale.is_empty() && previous.build_id == build {
            Start::Reused
        } else if linked || !stale.is_empty() {
            Start::Upgraded
        } else {
            Start::Fresh
        };
        if start != Start::Reused {
            let cgroup_file = File::open(cgroup).map_err(io_err("opening cgroup", cgroup))?;
            for name in PROGRAMS {
                install_program(&mut ebpf, pins, name, &cgroup_file)?;
            }
            install_inbound_program(&mut ebpf, pins)?;
        }
        for dir in stale {
            fs::remove_dir_all(&dir).map_err(io_err("removing old maps", &dir))?;
        }
        maps.settings.set(Settings {
            build_id: build,
            ..settings
        })?;
        let path = pins.program(INBOUND_PROGRAM);
        let inbound = InboundHook {
            program: SkLookup::from_pin(&path).map_err(|source| DatapathError::Program {
                name: INBOUND_PROGRAM,
                source,
            })?,
            dir: pins.inbound_links(),
        };
        info!(pins = %pins.0.display(), ?start, "datapath ready");
        Ok((
            Datapath {
                maps,
                inbound,
                _ebpf: ebpf,
            },
            start,
        ))
    }
}

/// Loads one program and attaches it: through the existing pinned link when
/// there is one, so that the cgroup never runs without it, or else through a
/// new link that is then pinned.
fn install_program(
    ebpf: &mut Ebpf,
    pins: &PinDir,
    name: &'static str,
    cgroup: &File,
) -> Result<(), DatapathError> {
    let program_err = |source| DatapathError::Program { name, source };
    let program = ebpf
        .program_mut(name)
        .ok_or(ProgramError::UnexpectedProgramType)
        .map_err(program_err)?;
    let link_path = pins.link(name);
    // The two program kinds share no trait for load/attach/take_link.
    macro_rules! load_and_link {
        ($program:expr) => {{
            $program.load().map_err(program_err)?;
            if link_path.exists() {
                None
            } else {
                let id = $program
                    .attach(cgroup, CgroupAttachMode::Single)
                    .map_err(program_err)?;
                let link = $program.take_link(id).map_err(program_err)?;
                Some(
                    FdLink::try_from(link)
                        .map_err(|source| DatapathError::Link { name, source })?,
                )
            }
        }};
    }
    let new_link = match program {
        Program::CgroupSockAddr(p) => load_and_link!(p),
        Program::SockOps(p) => load_and_link!(p),
        _ => return Err(program_err(ProgramError::UnexpectedProgramType)),
    };
    let program = ebpf
        .program_mut(name)
        .ok_or(ProgramError::UnexpectedProgramType)
        .map_err(program_err)?;
    match new_link {
        Some(link) => {
            link.pin(&link_path).map_err(|source| DatapathError::Pin {
                path: link_path.clone(),
                source,
            })?;
        }
        None => {
            let fd = program.fd().map_err(program_err)?;
            link_update::replace_program(&link_path, fd)
                .map_err(io_err("updating link", &link_path))?;
        }
    }
    let prog_path = pins.program(name);
    if prog_path.exists() {
        fs::remove_file(&prog_path).map_err(io_err("unpinning", &prog_path))?;
    }
    program
        .pin(&prog_path)
        .map_err(|source| DatapathError::Pin {
            path: prog_path,
            source,
        })?;
    Ok(())
}

/// Loads and pins the sk_lookup program, and swaps it into every pod link
/// an earlier agent left.
fn install_inbound_program(ebpf: &mut Ebpf, pins: &PinDir) -> Result<(), DatapathError> {
    let name = INBOUND_PROGRAM;
    let program_err = |source| DatapathError::Program { name, source };
    let program: &mut SkLookup = ebpf
        .program_mut(name)
        .ok_or(ProgramError::UnexpectedProgramType)
        .and_then(TryInto::try_into)
        .map_err(program_err)?;
    program.load().map_err(program_err)?;
    let fd = program.fd().map_err(program_err)?;
    for link in pinned_files(&pins.inbound_links()) {
        link_update::replace_program(&link, fd).map_err(io_err("updating link", &link))?;
    }
    let path = pins.program(name);
    if path.exists() {
        fs::remove_file(&path).map_err(io_err("unpinning", &path))?;
    }
    program
        .pin(&path)
        .map_err(|source| DatapathError::Pin { path, source })
}

fn attach_flow_program(ebpf: &mut Ebpf, maps: &Maps) -> Result<(), DatapathError> {
    let name = FLOW_PROGRAM;
    let program_err = |source| DatapathError::Program { name, source };
    let program: &mut SkSkb = ebpf
        .program_mut(name)
        .ok_or(ProgramError::UnexpectedProgramType)
        .and_then(TryInto::try_into)
        .map_err(program_err)?;
    program.load().map_err(program_err)?;
    program
        .attach(maps.flow_sockets.fd())
        .map_err(program_err)?;
    Ok(())
}

fn pinned_files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The sk_lookup program and its per-pod links. A link is pinned as
/// `links/inbound/<netns cookie>`, so that it outlives the agent: while no
/// agent runs, the pod's inbound fail mode still applies.
pub struct InboundHook {
    program: SkLookup,
    dir: PathBuf,
}

impl InboundHook {
    /// Attaches to a pod's namespace, unless an earlier agent already did.
    pub fn attach(&mut self, netns: &File, netns_cookie: u64) -> Result<(), DatapathError> {
        let path = self.dir.join(netns_cookie.to_string());
        if path.exists() {
            return Ok(());
        }
        let name = INBOUND_PROGRAM;
        let program_err = |source| DatapathError::Program { name, source };
        let id = self.program.attach(netns).map_err(program_err)?;
        let link = self.program.take_link(id).map_err(program_err)?;
        FdLink::from(link)
            .pin(&path)
            .map_err(|source| DatapathError::Pin { path, source })?;
        Ok(())
    }

    /// Detaches from a pod's namespace.
    pub fn detach(&self, netns_cookie: u64) {
        let _ = fs::remove_file(self.dir.join(netns_cookie.to_string()));
    }

    /// The namespaces with a link, live or left by an earlier agent.
    pub fn attached(&self) -> Vec<u64> {
        pinned_files(&self.dir)
            .iter()
            .filter_map(|path| path.file_name()?.to_str()?.parse().ok())
            .collect()
    }
}

/// Removes every pin of a node: links (which detaches the programs), programs
/// and maps. The only full teardown; SIGTERM and crashes keep the pins.
pub fn uninstall(pins: &PinDir) -> Result<bool, DatapathError> {
    match fs::remove_dir_all(&pins.0) {
        Ok(()) => {
            // The shared root goes with its last node; it stays while others remain.
            let _ = fs::remove_dir(PIN_ROOT);
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("removing", &pins.0)(e)),
    }
}

/// Identifies the embedded programs, so that a restart of the same build
/// reuses its pins and a different build replaces them.
fn build_id() -> u64 {
    // FNV-1a: stable across runs and builds, unlike std's hasher.
    OBJECT.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Mounts bpffs on /sys/fs/bpf unless something already is there.
fn mount_bpffs() -> Result<(), DatapathError> {
    let mounts = fs::read_to_string("/proc/self/mounts")
        .map_err(io_err("reading", Path::new("/proc/self/mounts")))?;
    // The last mount on the path is the one in effect. A container's
    // hostPath of a host without bpffs shows sysfs there: not good enough.
    let fs_type = mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(' ').skip(1);
            (fields.next() == Some("/sys/fs/bpf")).then(|| fields.next())
        })
        .next_back()
        .flatten();
    if fs_type == Some("bpf") {
        return Ok(());
    }
    warn!("bpffs is not mounted on /sys/fs/bpf; mounting it");
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| io_err("mounting bpffs on", Path::new("/sys/fs/bpf"))(e.into()))
}
