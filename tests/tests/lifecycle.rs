//! The agent's life cycle, as README.md and DESIGN.md ("Lifecycle") promise
//! it: pods enrolled and released while the agent runs, broken manifests
//! that keep the last good state, fail open and fail closed while no agent
//! runs, restarts that reuse the pinned programs and links, `weir
//! uninstall`, and two agents side by side.
//!
//! Every test builds its own sandbox and needs root, the kernel's eBPF
//! support, `bpftool`, and the agent binary (`cargo build -p weir`).
//!
//! Whether a connection was redirected is read where a user would see it:
//! a redirected socket is connected to the agent's listener on
//! 127.0.0.1:15001, so its local address is 127.0.0.1, while `getpeername()`
//! still gives the original destination; a direct one has the pod's own
//! address. Tests that need more also look at the agent's metrics.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use weir::datapath::{PROGRAMS, PinDir};
use weir_sandbox::{Agent, NodeId, Pod, PodSpec, Sandbox, SandboxOptions, metric_value};

/// How long an agent may take to attach and apply the manifests.
const READY: Duration = Duration::from_secs(10);
/// How long a manifest change may take to reach the data path; README says
/// "within about a second", the rest is slack for a loaded machine.
const SETTLE: Duration = Duration::from_secs(10);
/// How long an agent may take to exit once it has nothing left to drain.
const EXIT: Duration = Duration::from_secs(10);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);
const SERVER_PORT: u16 = 9080;
const MESH: (&str, &str) = ("weir.dev/mesh", "enabled");
const OPENED: &str = "istio_tcp_connections_opened_total";
const DECISIONS: &str = "weir_decisions_total";

#[test]
fn pod_added_and_removed_at_run_time() {
    let mut sb = sandbox("pod_added_and_removed_at_run_time");
    let server = Server::start(&mut sb, NodeId::Xuegod64);
    let agent = start_agent(&mut sb, NodeId::Xuegod63, &[]);
    assert_eq!(
        enrolled(&agent),
        Vec::<String>::new(),
        "nothing to enroll yet"
    );

    let client = sb.add_pod(mesh_pod("client", NodeId::Xuegod63)).unwrap();
    wait_for_route(&agent, &client, &server, Route::Redirected);
    assert_eq!(enrolled(&agent), ["default/client"]);
    assert!(
        metric(&agent, OPENED, &[("source_workload", "client")]) >= 1.0,
        "the proxy did not count the client's connection\n{}",
        agent_log(&agent)
    );

    // Opting the pod out releases it, though it keeps running.
    edit_pod_manifest(&sb, &client, |pod| {
        pod["metadata"]["labels"]["weir.dev/mesh"] = "disabled".into();
    });
    wait_for_route(&agent, &client, &server, Route::Direct);
    assert_eq!(enrolled(&agent), Vec::<String>::new());
    wait_for_listener_gone(&agent, &client);

    // And opting back in takes it over again.
    edit_pod_manifest(&sb, &client, |pod| {
        pod["metadata"]["labels"]["weir.dev/mesh"] = "enabled".into();
    });
    wait_for_route(&agent, &client, &server, Route::Redirected);
    assert_eq!(enrolled(&agent), ["default/client"]);

    // A deleted pod is forgotten: its map entry, its listener (which would
    // keep the namespace alive) and, its connections being closed, its
    // metric series. `client` still holds the namespace open.
    sb.remove_pod(&client).unwrap();
    wait_until(&agent, SETTLE, "the removed pod to be forgotten", || {
        Ok(enrolled(&agent).is_empty()
            && metric(&agent, "weir_enrolled_pods", &[]) == 0.0
            && metric(&agent, "weir_map_entries", &[("map", "ENROLLED")]) == 0.0)
    });
    wait_for_listener_gone(&agent, &client);
    wait_until(&agent, SETTLE, "the removed pod's series to go", || {
        let text = agent.metrics()?;
        Ok(metric_value(&text, OPENED, &[("source_workload", "client")]).is_none())
    });
}

#[test]
fn malformed_manifest_is_rejected_while_traffic_flows() {
    let mut sb = sandbox("malformed_manifest_is_rejected_while_traffic_flows");
    let server = Server::start(&mut sb, NodeId::Xuegod64);
    let client = sb.add_pod(mesh_pod("client", NodeId::Xuegod63)).unwrap();
    let agent = start_agent(&mut sb, NodeId::Xuegod63, &[]);
    assert_route(&agent, &client, &server, Route::Redirected);

    let file = pod_manifest_path(&sb, &client);
    // Only what the agent logs from now on counts.
    let logged_before = agent.log().unwrap().len();
    let good = edit_pod_manifest(&sb, &client, |pod| {
        pod["status"]["podIP"] = "not-an-ip".into();
    });
    let expected = [
        file.display().to_string(),
        "Pod default/client".to_owned(),
        "status.podIP".to_owned(),
    ];
    wait_until(
        &agent,
        SETTLE,
        "the agent to report the broken file",
        || {
            let log = agent.log()?;
            Ok(log
                .get(logged_before..)
                .unwrap_or_default()
                .lines()
                .any(|line| expected.iter().all(|part| line.contains(part.as_str()))))
        },
    );

    // The last good version stays in force.
    assert_route(&agent, &client, &server, Route::Redirected);
    assert_eq!(enrolled(&agent), ["default/client"]);

    let (ok, report) = validate(sb.manifests_dir());
    assert!(!ok, "weir validate accepted a broken file:\n{report}");
    assert!(
        report.lines().any(|line| line.starts_with("error:")
            && expected.iter().all(|part| line.contains(part.as_str()))),
        "weir validate does not name file, object and field {expected:?}:\n{report}"
    );

    // The fixed file is applied again: its new label shows up in the metrics.
    edit_pod_manifest(&sb, &client, |pod| {
        *pod = serde_yaml::from_str(&good).unwrap();
        pod["metadata"]["labels"]["version"] = "v2".into();
    });
    let (ok, report) = validate(sb.manifests_dir());
    assert!(ok, "weir validate rejects the fixed file:\n{report}");
    wait_until(&agent, SETTLE, "the fixed manifest to be applied", || {
        ensure!(
            route(&client, &server)? == Route::Redirected,
            "not redirected"
        );
        Ok(metric(&agent, OPENED, &[("source_version", "v2")]) >= 1.0)
    });
    assert_eq!(enrolled(&agent), ["default/client"]);
}

#[test]
fn sigkill_fails_open_and_next_agent_reads_the_count() {
    let mut sb = sandbox("sigkill_fails_open_and_next_agent_reads_the_count");
    let server = Server::start(&mut sb, NodeId::Xuegod64);
    let client = sb.add_pod(mesh_pod("client", NodeId::Xuegod63)).unwrap();
    let agent = start_agent(&mut sb, NodeId::Xuegod63, &[]);
    assert_route(&agent, &client, &server, Route::Redirected);
    let redirected = metric(&agent, DECISIONS, &[("decision", "redirected")]);
    let failed_open = metric(&agent, DECISIONS, &[("decision", "fail_open")]);

    kill(&agent);
    // At once, not after a grace period: the listener died with the agent.
    assert_route(&agent, &client, &server, Route::Direct);

    let next = start_agent(&mut sb, NodeId::Xuegod63, &[]);
    // The counters live in a pinned map, so the new agent sees what happened
    // while no agent ran, and everything before.
    assert!(
        metric(&next, DECISIONS, &[("decision", "fail_open")]) > failed_open,
        "fail_open was not counted\n{}",
        agent_log(&next)
    );
    assert!(
        metric(&next, DECISIONS, &[("decision", "redirected")]) >= redirected,
        "the redirect count went back\n{}",
        agent_log(&next)
    );
    // Ready means the pods are taken over again.
    assert_route(&next, &client, &server, Route::Redirected);
}

#[test]
fn fail_closed_refuses_while_no_agent_runs() {
    let mut sb = sandbox("fail_closed_refuses_while_no_agent_runs");
    let server = Server::start(&mut sb, NodeId::Xuegod64);
    let client = sb.add_pod(mesh_pod("client", NodeId::Xuegod63)).unwrap();
    let bystander = sb
        .add_pod(PodSpec::new("bystander", NodeId::Xuegod63))
        .unwrap();
    let closed = ["--fail-mode", "closed"];
    let agent = start_agent(&mut sb, NodeId::Xuegod63, &closed);
    assert_route(&agent, &client, &server, Route::Redirected);
    assert_route(&agent, &bystander, &server, Route::Direct);

    kill(&agent);
    match client.connect(server.addr()) {
        Err(error) => assert_eq!(
            error.kind(),
            io::ErrorKind::PermissionDenied,
            "refused, but not by the fail mode: {error}"
        ),
        Ok(stream) => panic!(
            "an enrolled pod connected while no agent ran (local address {:?})",
            stream.local_addr()
        ),
    }
    // Only enrolled pods are affected.
    assert_route(&agent, &bystander, &server, Route::Direct);

    let next = start_agent(&mut sb, NodeId::Xuegod63, &closed);
    assert_route(&next, &client, &server, Route::Redirected);
    assert!(
        metric(&next, DECISIONS, &[("decision", "fail_closed")]) >= 1.0,
        "fail_closed was not counted\n{}",
        agent_log(&next)
    );
}

#[test]
fn sigterm_restart_reuses_programs_and_links() {
    let mut sb = sandbox("sigterm_restart_reuses_programs_and_links");
    let server = Server::start(&mut sb, NodeId::Xuegod64);
    let client = sb.add_pod(mesh_pod("client", NodeId::Xuegod63)).unwrap();
    let node = sb.node(NodeId::Xuegod63).name().to_owned();
    let cgroup = sb.cgroup_path().to_owned();
    // Long enough that an exit well before it shows the agent waited for
    // the connection, not for the clock.
    let args = ["--drain-seconds", "30"];
    let agent = start_agent(&mut sb, NodeId::Xuegod63, &args);
    let installed = Installed::read(&node, &cgroup).or_log(&agent);
    installed.check().or_log(&agent);
    let mut open = connect(&client, &server).or_log(&agent);
    assert_eq!(open.route, Route::Redirected, "{}", agent_log(&agent));

    agent.sigterm().unwrap();
    // Draining: the open connection keeps working, and holds the agent up.
    thread::sleep(Duration::from_millis(500));
    assert!(
        agent.wait_timeout(Duration::ZERO).is_err(),
        "the agent exited with a connection still open\n{}",
        agent_log(&agent)
    );
    open.exchange(b"still there").or_log(&agent);
    // New connections still get through while the agent drains.
    route(&client, &server).or_log(&agent);
    drop(open);
    let status = agent.wait_timeout(EXIT).or_log(&agent);
    assert!(
        status.success(),
        "agent exited with {status}\n{}",
        agent_log(&agent)
    );

    // No agent runs, and everything stays in place.
    assert_eq!(
        Installed::read(&node, &cgroup).or_log(&agent),
        installed,
        "SIGTERM changed the pins or the attachments"
    );

    let next = start_agent(&mut sb, NodeId::Xuegod63, &args);
    assert_eq!(
        Installed::read(&node, &cgroup).or_log(&next),
        installed,
        "the restarted agent did not reuse the programs and links\n{}",
        agent_log(&next)
    );
    assert_route(&next, &client, &server, Route::Redirected);
}

#[test]
fn uninstall_removes_everything() {
    let mut sb = sandbox("uninstall_removes_everything");
    let server = Server::start(&mut sb, NodeId::Xuegod64);
    let client = sb.add_pod(mesh_pod("client", NodeId::Xuegod63)).unwrap();
    let node = sb.node(NodeId::Xuegod63).name().to_owned();
    let cgroup = sb.cgroup_path().to_owned();
    // Failing closed, the pod could not connect at all if anything of the
    // agent's were left behind.
    let agent = start_agent(&mut sb, NodeId::Xuegod63, &["--fail-mode", "closed"]);
    assert_route(&agent, &client, &server, Route::Redirected);
    let installed = Installed::read(&node, &cgroup).or_log(&agent);
    agent.sigterm().unwrap();
    let status = agent.wait_timeout(EXIT).or_log(&agent);
    assert!(
        status.success(),
        "agent exited with {status}\n{}",
        agent_log(&agent)
    );

    let output = Command::new(weir_sandbox::agent_binary().unwrap())
        .args(["uninstall", "--node", &node])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "weir uninstall failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    let pins = PinDir::for_node(&node).path().to_path_buf();
    assert!(!pins.exists(), "{} is still there", pins.display());
    let attached = cgroup_attachments(&cgroup).unwrap();
    assert!(attached.is_empty(), "still attached: {attached:?}");
    // With no pin and no link left, the kernel frees the programs.
    wait_until(&agent, SETTLE, "the programs to be unloaded", || {
        Ok(installed
            .programs
            .iter()
            .all(|(_, id)| !program_exists(*id)))
    });
    assert_route(&agent, &client, &server, Route::Direct);
}

#[test]
fn two_agents_do_not_interfere() {
    let mut sb = sandbox("two_agents_do_not_interfere");
    let server = Server::start(&mut sb, NodeId::Xuegod64);
    let pod63 = sb.add_pod(mesh_pod("client-63", NodeId::Xuegod63)).unwrap();
    let pod64 = sb.add_pod(mesh_pod("client-64", NodeId::Xuegod64)).unwrap();
    let agent63 = start_agent(&mut sb, NodeId::Xuegod63, &[]);
    let agent64 = start_agent(&mut sb, NodeId::Xuegod64, &[]);
    assert_eq!(enrolled(&agent63), ["default/client-63"]);
    assert_eq!(enrolled(&agent64), ["default/client-64"]);

    // Two connections from one pod, three from the other, so that a count
    // landing on the wrong agent cannot match by chance.
    for (pod, agent, connections) in [(&pod63, &agent63, 2), (&pod64, &agent64, 3)] {
        for _ in 0..connections {
            assert_route(agent, pod, &server, Route::Redirected);
        }
    }
    let opened = |agent: &Agent, pod: &Pod| {
        let text = agent.metrics().or_log(agent);
        metric_value(&text, OPENED, &[("source_workload", pod.name())])
    };
    assert_eq!(
        opened(&agent63, &pod63),
        Some(2.0),
        "{}",
        agent_log(&agent63)
    );
    assert_eq!(opened(&agent63, &pod64), None, "{}", agent_log(&agent63));
    assert_eq!(
        opened(&agent64, &pod64),
        Some(3.0),
        "{}",
        agent_log(&agent64)
    );
    assert_eq!(opened(&agent64, &pod63), None, "{}", agent_log(&agent64));

    // Losing one node's agent leaves the other node's pods meshed.
    kill(&agent63);
    assert_route(&agent64, &pod64, &server, Route::Redirected);
    assert_eq!(
        opened(&agent64, &pod64),
        Some(4.0),
        "{}",
        agent_log(&agent64)
    );
    assert_route(&agent63, &pod63, &server, Route::Direct);
}

/// Kubernetes hands a deleted pod's address to the next pod soon; the
/// agent must find the new pod's namespace, not remember the old one.
#[test]
fn pod_reusing_an_address_is_enrolled() {
    let mut sb = sandbox("pod_reusing_an_address_is_enrolled");
    let server = Server::start(&mut sb, NodeId::Xuegod64);
    let first = sb.add_pod(mesh_pod("first", NodeId::Xuegod63)).unwrap();
    let agent = start_agent(&mut sb, NodeId::Xuegod63, &[]);
    assert_route(&agent, &first, &server, Route::Redirected);
    sb.remove_pod(&first).unwrap();
    wait_until(&agent, SETTLE, "the first pod to be forgotten", || {
        Ok(enrolled(&agent).is_empty())
    });

    let second = sb.add_pod(mesh_pod("second", NodeId::Xuegod63)).unwrap();
    assert_eq!(
        second.ip(),
        first.ip(),
        "the sandbox hands out the lowest free address"
    );
    wait_for_route(&agent, &second, &server, Route::Redirected);
}

/// Fail closed means closed until the agent has taken the pod over, also
/// when a restarted agent cannot do so at once: here because something in
/// the pod holds the agent's port.
#[test]
fn fail_closed_holds_until_a_restarted_agent_takes_the_pod_over() {
    let mut sb = sandbox("fail_closed_holds_until_a_restarted_agent_takes_the_pod_over");
    let server = Server::start(&mut sb, NodeId::Xuegod63);
    let client = sb.add_pod(mesh_pod("client", NodeId::Xuegod63)).unwrap();
    let closed = ["--fail-mode", "closed"];
    let agent = start_agent(&mut sb, NodeId::Xuegod63, &closed);
    assert_route(&agent, &client, &server, Route::Redirected);
    kill(&agent);

    let squatter = client.listen(15001).unwrap();
    let next = start_agent(&mut sb, NodeId::Xuegod63, &closed);
    match client.connect(server.addr()) {
        Err(error) => assert_eq!(error.kind(), io::ErrorKind::PermissionDenied, "{error}"),
        Ok(stream) => panic!(
            "the pod got out while the agent could not take it over (local address {:?})\n{}",
            stream.local_addr(),
            agent_log(&next)
        ),
    }
    // Once the port is free, the agent's retries take the pod over.
    drop(squatter);
    wait_for_route(&next, &client, &server, Route::Redirected);
}

// ---------------------------------------------------------------------------
// Pods, agents and connections.

fn sandbox(test_name: &str) -> Sandbox {
    Sandbox::new(SandboxOptions::for_test(test_name)).expect("cannot build the sandbox")
}

/// A pod enrolled by its own label.
fn mesh_pod(name: &str, node: NodeId) -> PodSpec {
    PodSpec::new(name, node).label(MESH.0, MESH.1)
}

/// Starts an agent and waits until it says it is ready.
fn start_agent(sb: &mut Sandbox, node: NodeId, args: &[&str]) -> Agent {
    let agent = sb.start_agent(node, args).expect("cannot start the agent");
    agent.wait_ready(READY).or_log(&agent);
    agent
}

/// SIGKILL, and wait until the process is gone, so its sockets are too.
fn kill(agent: &Agent) {
    agent.sigkill().unwrap();
    agent.wait_timeout(EXIT).or_log(agent);
}

/// The end of the agent's log, for failure messages.
fn agent_log(agent: &Agent) -> String {
    const LINES: usize = 60;
    match agent.log() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(LINES)..].join("\n");
            format!("--- {} ---\n{tail}", agent.log_path().display())
        }
        Err(error) => format!("(no agent log: {error:#})"),
    }
}

/// Fails the test with the agent's log.
trait OrLog<T> {
    fn or_log(self, agent: &Agent) -> T;
}

impl<T, E: Into<anyhow::Error>> OrLog<T> for Result<T, E> {
    fn or_log(self, agent: &Agent) -> T {
        self.map_err(Into::into)
            .unwrap_or_else(|error| panic!("{error:#}\n{}", agent_log(agent)))
    }
}

/// Polls `check` until it holds, failing the test after `timeout` with the
/// last answer and the agent's log. A check that fails counts as "not yet".
fn wait_until(
    agent: &Agent,
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<bool>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check() {
            Ok(true) => return,
            Ok(false) => "not yet".to_owned(),
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() >= deadline {
            panic!(
                "waited {timeout:?} for {what}; last check: {last}\n{}",
                agent_log(agent)
            );
        }
        thread::sleep(POLL);
    }
}

fn wait_for_route(agent: &Agent, client: &Pod, server: &Server, want: Route) {
    let what = format!("{} to connect {want:?}", client.name());
    wait_until(agent, SETTLE, &what, || Ok(route(client, server)? == want));
}

fn assert_route(agent: &Agent, client: &Pod, server: &Server, want: Route) {
    let got = route(client, server).or_log(agent);
    assert_eq!(
        got,
        want,
        "connection from {}\n{}",
        client.name(),
        agent_log(agent)
    );
}

/// Waits until nothing listens on the agent's outbound port in the pod.
fn wait_for_listener_gone(agent: &Agent, pod: &Pod) {
    let outbound = SocketAddr::from((Ipv4Addr::LOCALHOST, 15001));
    wait_until(agent, SETTLE, "the pod's listener to close", || {
        // Loopback destinations are never redirected.
        Ok(matches!(pod.connect(outbound), Err(e) if e.kind() == io::ErrorKind::ConnectionRefused))
    });
}

/// The pods the agent reports enrolled, as `namespace/name`.
fn enrolled(agent: &Agent) -> Vec<String> {
    let dump = agent.config_dump().or_log(agent);
    let pods = dump["enrolled"].as_array().cloned().unwrap_or_default();
    pods.iter()
        .map(|pod| format!("{}/{}", str_of(&pod["namespace"]), str_of(&pod["name"])))
        .collect()
}

fn str_of(value: &Value) -> &str {
    value.as_str().unwrap_or("?")
}

/// The sum of the agent's samples of `name` with `labels`; 0 when none.
fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = agent.metrics().or_log(agent);
    metric_value(&text, name, labels).unwrap_or(0.0)
}

/// Where a connection from a pod went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// Through the agent's listener in the pod.
    Redirected,
    /// Straight to the server.
    Direct,
}

/// A listener in an unenrolled pod, taking one connection at a time.
struct Server {
    addr: SocketAddr,
    listener: TcpListener,
}

impl Server {
    fn start(sb: &mut Sandbox, node: NodeId) -> Server {
        let pod = sb.add_pod(PodSpec::new("server", node)).unwrap();
        let listener = pod.listen(SERVER_PORT).unwrap();
        // Polled, so that a connection that never arrives fails the test
        // instead of hanging it.
        listener.set_nonblocking(true).unwrap();
        Server {
            addr: pod.addr(SERVER_PORT),
            listener,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn accept(&self) -> Result<(TcpStream, SocketAddr)> {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    stream.set_nonblocking(false)?;
                    stream.set_read_timeout(Some(IO_TIMEOUT))?;
                    return Ok((stream, peer));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        bail!("the server got no connection within {IO_TIMEOUT:?}");
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e).context("accept"),
            }
        }
    }
}

/// An open connection from a pod to the server, both ends in hand.
struct Connection {
    client: TcpStream,
    server: TcpStream,
    route: Route,
}

impl Connection {
    /// Sends `message` from client to server and back.
    fn exchange(&mut self, message: &[u8]) -> Result<()> {
        let mut buf = vec![0; message.len()];
        self.client.write_all(message).context("client write")?;
        self.server.read_exact(&mut buf).context("server read")?;
        ensure!(buf == message, "the server got {buf:?}");
        self.server.write_all(message).context("server write")?;
        self.client.read_exact(&mut buf).context("client read")?;
        ensure!(buf == message, "the client got {buf:?}");
        Ok(())
    }
}

/// Connects `client` to `server`, checks what both ends see, and exchanges
/// a message each way.
fn connect(client: &Pod, server: &Server) -> Result<Connection> {
    let stream = client
        .connect(server.addr())
        .with_context(|| format!("{} cannot connect to {}", client.name(), server.addr()))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    // Redirected or not, the app sees the address it asked for.
    let peer = stream.peer_addr()?;
    ensure!(peer == server.addr(), "getpeername() says {peer}");
    let (accepted, source) = server.accept()?;
    // Redirected or not, the server sees the pod's own address.
    ensure!(
        source.ip() == IpAddr::V4(client.ip()),
        "the server sees {source}, not {}",
        client.ip()
    );
    let route = match stream.local_addr()?.ip() {
        IpAddr::V4(ip) if ip == Ipv4Addr::LOCALHOST => Route::Redirected,
        IpAddr::V4(ip) if ip == client.ip() => Route::Direct,
        other => bail!("unexpected local address {other}"),
    };
    let mut connection = Connection {
        client: stream,
        server: accepted,
        route,
    };
    connection.exchange(b"ping")?;
    Ok(connection)
}

/// Makes a connection, and says how it went.
fn route(client: &Pod, server: &Server) -> Result<Route> {
    Ok(connect(client, server)?.route)
}

// ---------------------------------------------------------------------------
// Manifests and `weir validate`.

fn pod_manifest_path(sb: &Sandbox, pod: &Pod) -> PathBuf {
    // The sandbox writes one file per object.
    sb.manifests_dir()
        .join(format!("pod-{}-{}.yaml", pod.namespace(), pod.name()))
}

/// Rewrites the pod's manifest through `edit`, and returns what it was.
fn edit_pod_manifest(sb: &Sandbox, pod: &Pod, edit: impl FnOnce(&mut Value)) -> String {
    let path = pod_manifest_path(sb, pod);
    let before = std::fs::read_to_string(&path).unwrap();
    let mut manifest: Value = serde_yaml::from_str(&before).unwrap();
    edit(&mut manifest);
    let file_name = path.file_name().unwrap().to_str().unwrap();
    sb.write_manifest(file_name, &serde_yaml::to_string(&manifest).unwrap())
        .unwrap();
    before
}

/// Runs `weir validate` on `path`: whether it passed, and what it printed.
fn validate(path: &Path) -> (bool, String) {
    let output = Command::new(weir_sandbox::agent_binary().unwrap())
        .arg("validate")
        .arg(path)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), report)
}

// ---------------------------------------------------------------------------
// Pins and attachments, as bpftool shows them.

/// What a node's agent left in the kernel: the pinned programs and links
/// and the programs attached to the cgroup.
#[derive(Debug, PartialEq, Eq)]
struct Installed {
    /// Program name and id, in `PROGRAMS` order.
    programs: Vec<(&'static str, u64)>,
    links: Vec<(&'static str, u64)>,
    /// Ids of the programs attached to the cgroup, sorted.
    attached: Vec<u64>,
}

impl Installed {
    fn read(node: &str, cgroup: &Path) -> Result<Installed> {
        let pins = PinDir::for_node(node).path().to_path_buf();
        let ids = |kind: &str, dir: &str| -> Result<Vec<(&'static str, u64)>> {
            PROGRAMS
                .iter()
                .map(|&name| {
                    let pin = pins.join(dir).join(name);
                    Ok((name, pinned_id(kind, &pin)?))
                })
                .collect()
        };
        Ok(Installed {
            programs: ids("prog", "progs")?,
            links: ids("link", "links")?,
            attached: cgroup_attachments(cgroup)?,
        })
    }

    /// Each program attached once, through its link.
    fn check(&self) -> Result<()> {
        let mut programs: Vec<u64> = self.programs.iter().map(|(_, id)| *id).collect();
        programs.sort_unstable();
        ensure!(
            self.attached == programs,
            "attached {:?}, pinned {:?}",
            self.attached,
            self.programs
        );
        Ok(())
    }
}

/// The id of a pinned program or link.
fn pinned_id(kind: &str, pin: &Path) -> Result<u64> {
    let shown = bpftool(&[kind, "show", "pinned", &pin.to_string_lossy()])?;
    shown["id"]
        .as_u64()
        .with_context(|| format!("no id for {}: {shown}", pin.display()))
}

/// Ids of the programs attached directly to `cgroup`, sorted.
fn cgroup_attachments(cgroup: &Path) -> Result<Vec<u64>> {
    let shown = bpftool(&["cgroup", "show", &cgroup.to_string_lossy()])?;
    let mut ids = shown
        .as_array()
        .with_context(|| format!("bpftool cgroup show: {shown}"))?
        .iter()
        .map(|entry| entry["id"].as_u64().context("attachment without id"))
        .collect::<Result<Vec<u64>>>()?;
    ids.sort_unstable();
    Ok(ids)
}

fn program_exists(id: u64) -> bool {
    bpftool(&["prog", "show", "id", &id.to_string()]).is_ok()
}

fn bpftool(args: &[&str]) -> Result<Value> {
    let output = Command::new("bpftool")
        .arg("--json")
        .args(args)
        .output()
        .context("cannot run bpftool")?;
    if !output.status.success() {
        bail!(
            "bpftool {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    // bpftool prints nothing at all for a cgroup without programs.
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&text).with_context(|| format!("bpftool {}: {text}", args.join(" ")))
}
