//! The connect() cost of a pod that is not enrolled, with and without
//! weir's programs on its way.
//!
//! cgroup programs apply to processes by cgroup, and a process is in one
//! cgroup. So two copies of this binary do the measuring, as child
//! processes (`weir-bench --connect-probe`) that take commands on stdin: one
//! started before the sandbox exists, which stays in this process's
//! original cgroup where no weir program runs, and one started after
//! `Sandbox::new` moved this process into the sandbox's pods cgroup, where
//! the agent's connect4 and sock_ops programs run for every socket. Both
//! connect the same way, inside the same pod, to a listener on the pod's
//! own address.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weir_sandbox::NetNs;

pub const FLAG: &str = "--connect-probe";
/// A probe that has not answered by then is broken.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// One probe run: connections made, and how long they took.
#[derive(Clone, Copy, Debug)]
pub struct ProbeResult {
    pub connections: u64,
    /// socket() + connect() + accept() + close, per second.
    pub per_second: f64,
    /// The median time spent inside connect() alone.
    pub connect_p50_ns: f64,
}

/// A probe child process. Dropping it closes its stdin, which ends it.
pub struct Probe {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Probe {
    /// Starts this binary as a probe, in this process's current cgroup.
    pub fn spawn() -> Result<Probe> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        let mut child = Command::new(exe)
            .arg(FLAG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the connect probe")?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("no probe stdout")?);
        Ok(Probe {
            child,
            stdin,
            stdout,
        })
    }

    /// Connects to `addr` inside the namespace at `netns` up to `count`
    /// times, stopping after `max` in any case.
    pub fn run(
        &mut self,
        netns: &Path,
        addr: SocketAddr,
        count: u64,
        max: Duration,
    ) -> Result<ProbeResult> {
        let stdin = self.stdin.as_mut().context("probe closed")?;
        writeln!(
            stdin,
            "{} {addr} {count} {}",
            netns.display(),
            max.as_millis()
        )?;
        stdin.flush()?;
        // The probe itself stops after `max`; a line must follow soon.
        if !readable(self.stdout.get_ref(), max + ANSWER_TIMEOUT)? {
            bail!("the connect probe did not answer");
        }
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["ok", connections, elapsed_ns, p50] => {
                let connections: u64 = connections.parse()?;
                let elapsed_ns: f64 = elapsed_ns.parse()?;
                Ok(ProbeResult {
                    connections,
                    per_second: connections as f64 / (elapsed_ns / 1e9),
                    connect_p50_ns: p50.parse()?,
                })
            }
            _ => bail!("connect probe: {}", line.trim()),
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `pipe` has something to read (or its writer closed it).
fn readable(pipe: &ChildStdout, timeout: Duration) -> Result<bool> {
    let mut poll = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let rc = unsafe { libc::poll(&raw mut poll, 1, millis) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("poll");
    }
    Ok(rc > 0)
}

/// The child's side: one command per line until stdin closes.
pub fn serve() -> Result<()> {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    for line in stdin.lock().lines() {
        let line = line?;
        let answer = match run_command(&line) {
            Ok((connections, elapsed, p50)) => {
                format!("ok {connections} {} {p50}", elapsed.as_nanos())
            }
            Err(error) => format!("error {error:#}").replace('\n', " "),
        };
        writeln!(stdout, "{answer}")?;
        stdout.flush()?;
    }
    Ok(())
}

fn run_command(line: &str) -> Result<(u64, Duration, u64)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [netns, addr, count, max_ms] = fields.as_slice() else {
        bail!("bad command {line:?}");
    };
    let netns = NetNs::open(netns).with_context(|| format!("cannot open {netns}"))?;
    let addr: SocketAddr = addr.parse()?;
    let count: u64 = count.parse()?;
    let max = Duration::from_millis(max_ms.parse()?);
    netns.run(|| connect_loop(addr, count, max))?
}

/// Listens on `addr`, then connects, accepts and closes (with a reset, so
/// that no TIME_WAIT piles up) until `count` or `max`. Both probes run on
/// the same CPU, the last: unpinned, the rate jumps by a third between runs
/// with where the scheduler puts the thread.
fn connect_loop(addr: SocketAddr, count: u64, max: Duration) -> Result<(u64, Duration, u64)> {
    pin_to_last_cpu()?;
    let listener = TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
    let mut connect_ns = Vec::with_capacity(count.min(1_000_000) as usize);
    let start = Instant::now();
    let mut done = 0;
    while done < count && start.elapsed() < max {
        let before = Instant::now();
        let client = TcpStream::connect(addr)?;
        connect_ns.push(before.elapsed().as_nanos() as u64);
        let (server, _) = listener.accept()?;
        reset_on_close(&client)?;
        drop(client);
        drop(server);
        done += 1;
    }
    let elapsed = start.elapsed();
    connect_ns.sort_unstable();
    let p50 = connect_ns.get(connect_ns.len() / 2).copied().unwrap_or(0);
    Ok((done, elapsed, p50))
}

/// Pins the calling thread.
fn pin_to_last_cpu() -> Result<()> {
    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut set = CpuSet::new();
    set.set(cpus - 1)?;
    sched_setaffinity(Pid::from_raw(0), &set).context("sched_setaffinity")
}

fn reset_on_close(stream: &TcpStream) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the option value is a valid `linger` of the given size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_LINGER");
    }
    Ok(())
}
