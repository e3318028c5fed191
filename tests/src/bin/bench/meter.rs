//! Where the CPU time goes while a workload runs: this process (the load
//! generator and the servers), the load generator's own thread, the agents,
//! and the whole machine, from getrusage(2) and /proc.

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// One reading of every counter, taken on the load generator's thread.
#[derive(Clone, Debug)]
pub struct Snapshot {
    at: Instant,
    process: Duration,
    thread: Duration,
    agents: Duration,
    agents_system: Duration,
    machine: MachineTicks,
}

#[derive(Clone, Copy, Debug, Default)]
struct MachineTicks {
    busy: u64,
    softirq: u64,
    steal: u64,
}

/// CPU time spent between two snapshots.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub wall: Duration,
    /// This whole process: load generator, servers, and the main thread.
    pub process: Duration,
    /// The load generator's thread alone.
    pub thread: Duration,
    /// Every agent of the sandbox (user and system time of all threads).
    pub agents: Duration,
    /// Of `agents`, the time in the kernel: system calls, and the network
    /// processing they do inline (such as delivering over loopback).
    pub agents_system: Duration,
    /// All CPUs, busy (everything but idle and iowait).
    pub machine_busy: Duration,
    /// Of `machine_busy`, time in softirq (network receive processing).
    /// This kernel has no IRQ time accounting, so it is also inside the
    /// time of whichever task it interrupted.
    pub softirq: Duration,
    /// Time the hypervisor gave to others.
    pub steal: Duration,
}

impl Snapshot {
    /// Reads every counter now. Call on the load generator's thread: the
    /// thread time is the caller's.
    pub fn take(agents: &[u32]) -> Result<Snapshot> {
        let (mut agents_cpu, mut agents_system) = (Duration::ZERO, Duration::ZERO);
        for &pid in agents {
            let (user, system) = process_cpu(pid)?;
            agents_cpu += user + system;
            agents_system += system;
        }
        Ok(Snapshot {
            at: Instant::now(),
            process: rusage(libc::RUSAGE_SELF)?,
            thread: rusage(libc::RUSAGE_THREAD)?,
            agents: agents_cpu,
            agents_system,
            machine: machine_ticks()?,
        })
    }

    /// What was spent from `self` until `later`.
    pub fn until(&self, later: &Snapshot) -> Usage {
        let tick = |ticks: u64| Duration::from_secs_f64(ticks as f64 / clock_ticks());
        Usage {
            wall: later.at.duration_since(self.at),
            process: later.process.saturating_sub(self.process),
            thread: later.thread.saturating_sub(self.thread),
            agents: later.agents.saturating_sub(self.agents),
            agents_system: later.agents_system.saturating_sub(self.agents_system),
            machine_busy: tick(later.machine.busy.saturating_sub(self.machine.busy)),
            softirq: tick(later.machine.softirq.saturating_sub(self.machine.softirq)),
            steal: tick(later.machine.steal.saturating_sub(self.machine.steal)),
        }
    }
}

impl Usage {
    /// `cpu` as a number of busy cores over the wall time.
    pub fn cores(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
    }

    /// Busy time of anything but this process and the agents: other
    /// engineers' work, ksoftirqd, the kernel's own threads.
    pub fn others(&self) -> Duration {
        self.machine_busy
            .saturating_sub(self.process)
            .saturating_sub(self.agents)
    }
}

fn rusage(who: libc::c_int) -> Result<Duration> {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(who, &mut usage) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrusage");
        }
        usage
    };
    let timeval = |tv: libc::timeval| {
        Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64)
    };
    Ok(timeval(usage.ru_utime) + timeval(usage.ru_stime))
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// (utime, stime) of a process, all its threads, from /proc/<pid>/stat.
pub fn process_cpu(pid: u32) -> Result<(Duration, Duration)> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The command name may hold spaces and parentheses; fields resume
    // after the last ')'. utime and stime are fields 14 and 15, that is
    // the 12th and 13th after the name.
    let rest = text
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("unexpected {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("unexpected {path}"))
    };
    let seconds = |ticks: u64| Duration::from_secs_f64(ticks as f64 / clock_ticks());
    Ok((seconds(field(11)?), seconds(field(12)?)))
}

/// VmRSS of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    for line in text.lines() {
        if let Some(value) = line.strip_prefix("VmRSS:") {
            let kib: u64 = value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .with_context(|| format!("unexpected VmRSS in {path}: {line}"))?;
            return Ok(kib * 1024);
        }
    }
    bail!("no VmRSS in {path}")
}

/// The first line of /proc/stat: every CPU's time in clock ticks.
fn machine_ticks() -> Result<MachineTicks> {
    let text = fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = text
        .lines()
        .find(|line| line.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if values.len() < 8 {
        bail!("unexpected /proc/stat: {line}");
    }
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let (idle, iowait, softirq, steal) = (values[3], values[4], values[6], values[7]);
    let total: u64 = values.iter().take(8).sum();
    Ok(MachineTicks {
        busy: total - idle - iowait - steal,
        softirq,
        steal,
    })
}

/// How many descriptors a process has open.
pub fn open_fds(pid: u32) -> Result<usize> {
    let dir = format!("/proc/{pid}/fd");
    Ok(fs::read_dir(&dir)
        .with_context(|| format!("cannot list {dir}"))?
        .count())
}

/// A process's soft RLIMIT_NOFILE, from /proc/<pid>/limits.
pub fn nofile_limit(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/limits");
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
        .with_context(|| format!("no open files limit in {path}"))
}

/// The machine's kernel slab memory, bytes (/proc/meminfo Slab).
pub fn slab_bytes() -> Result<u64> {
    let text = fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    text.lines()
        .find_map(|line| line.strip_prefix("Slab:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .context("no Slab in /proc/meminfo")
}
