//! TCP sockets opened inside a network namespace. A socket belongs to the
//! namespace of the thread that created it, for good, so only its creation
//! runs on a thread inside the namespace; the caller then uses it anywhere.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use weir::netns::NetNs;

/// Long enough for a loaded CI machine, short enough that a dropped SYN
/// fails a test instead of hanging it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects from inside `netns`. The socket's family follows `addr`.
pub(crate) fn connect(netns: &NetNs, addr: SocketAddr) -> io::Result<TcpStream> {
    netns.run(|| TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT))?
}

/// Listens inside `netns`.
pub(crate) fn listen(netns: &NetNs, addr: SocketAddr) -> io::Result<TcpListener> {
    netns.run(|| TcpListener::bind(addr))?
}
