//! Helpers shared by the integration tests: echo servers in pods, reading
//! the agent's metrics, bounded waits.
// Each test binary uses its own subset of these.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use weir_sandbox::{Agent, NodeId, Pod, PodSpec, metric_value};

/// Port of the echo servers: they read until the client half-closes, then
/// answer with a line "<server pod> <peer address it saw>", then the bytes.
pub const ECHO: u16 = 7000;
/// Port of the streaming echo servers: bytes go straight back as they come.
pub const STREAM: u16 = 7001;
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// Starts both echo servers in `pod`; their threads live until the test
/// process exits.
pub fn serve_echo(pod: &Pod) {
    let name = pod.name().to_owned();
    accept_loop(pod.listen(ECHO).unwrap(), move |mut stream, peer| {
        let mut request = Vec::new();
        stream.read_to_end(&mut request)?;
        stream.write_all(format!("{name} {peer}\n").as_bytes())?;
        stream.write_all(&request)
    });
    accept_loop(pod.listen(STREAM).unwrap(), |mut stream, _| {
        let mut reader = stream.try_clone()?;
        io::copy(&mut reader, &mut stream)?;
        stream.shutdown(Shutdown::Write)
    });
}

pub fn accept_loop<F>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> io::Result<()> + Clone + Send + 'static,
{
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            // A connection reset before it is handled (a policy revoked it,
            // say) is simply gone; the server must keep accepting.
            let Ok(peer) = stream.peer_addr() else {
                continue;
            };
            let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
            let handle = handle.clone();
            thread::spawn(move || handle(stream, peer));
        }
    });
}

/// What an ECHO server said about one exchange.
pub struct Echoed {
    pub server: String,
    pub peer: SocketAddr,
}

/// One exchange with an ECHO server, checking that the bytes come back.
pub fn echo(stream: &mut TcpStream, payload: &[u8]) -> io::Result<Echoed> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(payload)?;
    stream.shutdown(Shutdown::Write)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let newline = answer
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| io::Error::other("no peer line in the answer"))?;
    assert_eq!(&answer[newline + 1..], payload, "echoed bytes differ");
    let line = std::str::from_utf8(&answer[..newline]).unwrap();
    let (server, peer) = line.split_once(' ').unwrap();
    Ok(Echoed {
        server: server.to_owned(),
        peer: peer.parse().unwrap(),
    })
}

pub fn redirected(stream: &TcpStream) -> bool {
    stream.local_addr().unwrap().ip().to_canonical() == IpAddr::V4(Ipv4Addr::LOCALHOST)
}

pub fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(&agent.metrics().unwrap(), name, labels).unwrap_or(0.0)
}

pub fn decisions(agent: &Agent, decision: &str) -> f64 {
    metric(agent, "weir_decisions_total", &[("decision", decision)])
}

/// Prometheus' own linter, as a user would run it on a scrape.
pub fn promtool_check(text: &str) -> std::process::Output {
    use std::process::{Command, Stdio};
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by cargo xtask setup");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// An enrolled pod, labelled `app: <name>`.
pub fn meshed(name: &str, node: NodeId) -> PodSpec {
    PodSpec::new(name, node)
        .label("weir.dev/mesh", "enabled")
        .label("app", name)
}

/// The enrolled pod `name` as the agent's `/config_dump` shows it.
pub fn enrolled_pod(agent: &Agent, name: &str) -> Option<serde_json::Value> {
    agent.config_dump().unwrap()["enrolled"]
        .as_array()
        .unwrap()
        .iter()
        .find(|pod| pod["name"] == name)
        .cloned()
}

pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The bytes at stream offsets `start..start + len` of a stream whose every
/// 8-byte word is its own offset, so that any loss, duplication or
/// reordering shows at the first wrong byte.
pub fn offsets(start: usize, len: usize) -> Vec<u8> {
    (start..start + len)
        .map(|p| ((p / 8) as u64).to_le_bytes()[p % 8])
        .collect()
}

/// Sends `size` bytes of `offsets` through a STREAM echo connection, from
/// the first moment after connect(), reads the echo back as it comes and
/// checks every byte of it; half-closes after the last byte and expects the
/// echo to end exactly there.
pub fn echo_in_order(mut stream: TcpStream, size: usize) {
    const BLOCK: usize = 64 << 10;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sending = thread::spawn(move || {
        let mut at = 0;
        while at < size {
            let len = BLOCK.min(size - at);
            writer.write_all(&offsets(at, len)).unwrap();
            at += len;
        }
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut buf = vec![0u8; BLOCK];
    let mut at = 0;
    loop {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        let expected = offsets(at, n);
        if let Some(i) = (0..n).find(|&i| buf[i] != expected[i]) {
            panic!("the echo differs at byte {} of {size}", at + i);
        }
        at += n;
    }
    sending.join().unwrap();
    assert_eq!(at, size, "the echo ended early");
}
