//! Per-pod socket factories.
//!
//! A socket belongs for life to the network namespace it was created in. So
//! each enrolled pod gets one thread that setns()'d into the pod's namespace
//! once, and makes that pod's sockets on request: its listener, and the
//! proxy's upstream sockets. Tokio workers never change namespace, and no
//! socket can be made in the wrong one.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::mpsc;

use socket2::{Domain, Socket, Type};
use tokio::sync::oneshot;

use crate::netns::{self, NetNs};

type Job = Box<dyn FnOnce() + Send>;

/// A thread living in one pod's network namespace.
#[derive(Debug)]
pub struct SocketFactory {
    jobs: mpsc::Sender<Job>,
    netns_cookie: u64,
}

impl SocketFactory {
    /// Starts the pod's thread; it ends when the factory is dropped.
    pub fn start(netns: &NetNs, pod: &str) -> io::Result<SocketFactory> {
        let file = netns.file().try_clone()?;
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("pod-{pod}"))
            .spawn(move || {
                let entered = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
                    .and_then(|()| {
                        let probe = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
                        netns::netns_cookie(&probe)
                    });
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    for job in queue {
                        job();
                    }
                }
            })?;
        let netns_cookie = ready
            .recv()
            .map_err(|_| io::Error::other("pod thread exited at start"))??;
        Ok(SocketFactory { jobs, netns_cookie })
    }

    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// Runs `make` on the pod's thread and returns what it made.
    async fn make<T, F>(&self, make: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(make());
            }))
            .map_err(|_| io::Error::other("pod thread is gone"))?;
        rx.await
            .map_err(|_| io::Error::other("pod thread dropped a request"))?
    }

    /// An unconnected TCP socket in the pod for a connection to `peer`,
    /// bound to `source` when given.
    pub async fn tcp_socket(
        &self,
        peer: SocketAddr,
        source: Option<IpAddr>,
    ) -> io::Result<tokio::net::TcpSocket> {
        let socket = self
            .make(move || {
                let socket = Socket::new(Domain::for_address(peer), Type::STREAM, None)?;
                if let Some(ip) = source {
                    socket.bind(&SocketAddr::new(ip, 0).into())?;
                }
                socket.set_nonblocking(true)?;
                socket.set_tcp_nodelay(true)?;
                Ok(socket)
            })
            .await?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }

    /// A listener in the pod. SO_REUSEPORT lets a new agent bind before the
    /// old one has let go, so restarts do not refuse connections.
    pub async fn listener(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.make(move || {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            socket.set_nonblocking(true)?;
            Ok(socket.into())
        })
        .await
    }
}

/// Finds pods' network namespaces by IP: every namespace file in a directory
/// is asked for its addresses (one netlink dump each, via getifaddrs).
#[derive(Debug)]
pub struct NetnsFinder {
    dir: PathBuf,
}

impl NetnsFinder {
    pub fn new(dir: PathBuf) -> NetnsFinder {
        NetnsFinder { dir }
    }

    /// Maps each address found to the namespace that holds it. Loopback and
    /// link-local addresses are skipped: every namespace has them.
    pub fn scan(&self) -> io::Result<HashMap<IpAddr, PathBuf>> {
        let mut found = HashMap::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            // A pod may be going away while we look; skip what vanished.
            let Ok(addrs) = NetNs::open(&path).and_then(|netns| netns.run(addresses)?) else {
                continue;
            };
            for ip in addrs {
                if !ip.is_loopback() && !is_link_local(ip) {
                    found.insert(ip, path.clone());
                }
            }
        }
        Ok(found)
    }
}

/// The addresses of the calling thread's network namespace.
pub fn addresses() -> io::Result<Vec<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| ifa.address)
        .filter_map(
            |addr| match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
                (Some(v4), _) => Some(IpAddr::V4(v4.ip())),
                (_, Some(v6)) => Some(IpAddr::V6(v6.ip())),
                _ => None,
            },
        )
        .collect())
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}
