//! The iptables fallback for outbound interception, as Istio's sidecar
//! injection does it: a REDIRECT to 15001 in the pod's nat table, with the
//! original destination read back with SO_ORIGINAL_DST.
//!
//! It serves kernels without the cgroup hooks, and it is the benchmark's
//! comparison. It costs a conntrack entry and a NAT lookup per connection,
//! and while no agent runs the pod's connections are refused: there is no
//! fail-open. The agent's own sockets are recognised by its cgroup, as in
//! the eBPF path. Inbound interception stays with sk_lookup.

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use weir_common::OUTBOUND_PORT;

use crate::model::Workload;

/// `SO_ORIGINAL_DST` from linux/netfilter_ipv4.h.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// Replaces the pod's nat table with the redirect of its outbound TCP.
/// Loopback, the agent's own sockets and the pod's exclusions are let be.
pub fn redirect_outbound(netns: &Path, agent_cgroup: &Path, workload: &Workload) -> io::Result<()> {
    let mut rules = String::from("*nat\n:WEIR_OUTPUT - [0:0]\n-A OUTPUT -p tcp -j WEIR_OUTPUT\n");
    rules.push_str("-A WEIR_OUTPUT -d 127.0.0.0/8 -j RETURN\n");
    rules.push_str(&format!(
        "-A WEIR_OUTPUT -m cgroup --path /{} -j RETURN\n",
        agent_cgroup.display()
    ));
    for port in &workload.excluded_ports {
        rules.push_str(&format!("-A WEIR_OUTPUT -p tcp --dport {port} -j RETURN\n"));
    }
    for cidr in workload
        .excluded_cidrs
        .iter()
        .filter(|c| c.addr().is_ipv4())
    {
        rules.push_str(&format!("-A WEIR_OUTPUT -d {cidr} -j RETURN\n"));
    }
    rules.push_str(&format!(
        "-A WEIR_OUTPUT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}\nCOMMIT\n"
    ));
    restore(netns, &rules)
}

/// Empties the pod's nat table again.
pub fn remove(netns: &Path) -> io::Result<()> {
    restore(netns, "*nat\nCOMMIT\n")
}

/// Loads `rules` into the namespace at `netns`, replacing its nat table as a
/// whole, so that running it twice leaves the same rules.
fn restore(netns: &Path, rules: &str) -> io::Result<()> {
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["iptables-restore", "--wait"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| io::Error::other("no stdin"))?
        .write_all(rules.as_bytes())?;
    let output = child.wait_with_output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "iptables-restore in {}: {}",
            netns.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// The destination a REDIRECTed connection was meant for.
pub fn original_dst(socket: &impl AsRawFd) -> io::Result<SocketAddr> {
    // SAFETY: zeroed sockaddr_in is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe a valid sockaddr_in.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&raw mut addr).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    )))
}
