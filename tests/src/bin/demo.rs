//! `weir-demo [--keep]`, run by `cargo xtask demo`: a two-node Bookinfo sandbox whose enrolled
//! pods have their connections taken over by weir, shown from both ends.
//!
//! The pods' apps are small HTTP servers on threads of this process, each
//! answering with who it is and which client address it saw. With `--keep`
//! the sandbox and the agents stay, the apps are replaced by detached
//! `python3` processes that answer the same way, and the demo prints
//! commands to look around with and to tear everything down.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use weir_sandbox::{Agent, NodeId, Pod, PodSpec, Sandbox, SandboxOptions, agent_binary, samples};

/// Bookinfo's port, for every app and service.
const PORT: u16 = 9080;
/// Where `ip netns add` puts namespace files.
const NETNS_DIR: &str = "/var/run/netns";
/// Where the sandbox library keeps the demo's directory.
const DEMO_DIR: &str = "/run/weir-sandbox/demo";
const NAMESPACE: &str = "default";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// For every read and write of the demo's own HTTP clients and servers.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Request heads and responses are tiny; anything bigger is a mistake.
const MAX_MESSAGE: u64 = 64 * 1024;
/// The in-process apps stop by themselves after this, whatever happens.
const APP_LIFETIME: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(20);
/// How often reviews is called, to show round robin over v1, v2 and v3.
const REVIEWS_CALLS: usize = 6;

/// A Bookinfo pod: name, app, version, node.
struct App {
    pod: &'static str,
    app: &'static str,
    version: &'static str,
    node: NodeId,
}

const BOOKINFO: [App; 6] = [
    App::new("productpage-v1", "productpage", "v1", NodeId::Xuegod63),
    App::new("details-v1", "details", "v1", NodeId::Xuegod63),
    App::new("reviews-v1", "reviews", "v1", NodeId::Xuegod63),
    App::new("reviews-v2", "reviews", "v2", NodeId::Xuegod64),
    App::new("reviews-v3", "reviews", "v3", NodeId::Xuegod64),
    App::new("ratings-v1", "ratings", "v1", NodeId::Xuegod64),
];

/// The non-enrolled pod, for contrast.
const LEGACY: App = App::new("legacy-client", "legacy-client", "v1", NodeId::Xuegod63);

/// Services, with the `n` of their ClusterIP `Addressing::service_ip(n)`.
const SERVICES: [(&str, u16); 4] = [
    ("productpage", 10),
    ("details", 11),
    ("reviews", 12),
    ("ratings", 13),
];

impl App {
    const fn new(pod: &'static str, app: &'static str, version: &'static str, node: NodeId) -> App {
        App {
            pod,
            app,
            version,
            node,
        }
    }
}

fn main() -> Result<()> {
    let keep = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("--keep") => true,
        Some(other) => bail!("unknown argument {other}; usage: weir-demo [--keep]"),
    };
    run(keep)
}

fn run(keep: bool) -> Result<()> {
    let bin = agent_binary()?;
    check_no_leftover_demo(&bin)?;
    if keep && python3().is_none() {
        bail!("--keep runs the pod apps with python3, which is not on PATH");
    }

    heading("weir demo: a two-node Bookinfo sandbox");
    let mut sb = Sandbox::new(SandboxOptions::demo()).context("cannot build the sandbox")?;
    sb.add_namespace(NAMESPACE, &[("weir.dev/mesh", "enabled")])?;
    let mut pods = BTreeMap::new();
    for app in BOOKINFO.iter().chain([&LEGACY]) {
        let mut spec = PodSpec::new(app.pod, app.node)
            .service_account(&format!("bookinfo-{}", app.app))
            .label("app", app.app)
            .label("version", app.version);
        if app.pod == LEGACY.pod {
            spec = spec
                .service_account("default")
                .label("weir.dev/mesh", "disabled");
        }
        let pod = sb
            .add_pod(spec)
            .with_context(|| format!("cannot create pod {}", app.pod))?;
        pods.insert(app.pod, pod);
    }
    let mut cluster_ips = BTreeMap::new();
    for (name, n) in SERVICES {
        let ip = sb.addressing().service_ip(n);
        sb.add_service(name, NAMESPACE, ip, PORT, PORT, &[("app", name)])?;
        cluster_ips.insert(name, ip);
    }
    // Dropped before the sandbox, so the apps stop before the pods go.
    let mut apps = InProcessApps::start(&pods)?;
    print_sandbox(&sb, &pods, &cluster_ips);

    section("Agents (one `weir run` per node)");
    let mut agents = Vec::new();
    for id in NodeId::ALL {
        let started = Instant::now();
        let agent = sb
            .start_agent(id, &[])
            .with_context(|| format!("cannot start the agent for {}", id.base_name()))?;
        agent.wait_ready(READY_TIMEOUT)?;
        let metrics = agent.metrics()?;
        let enrolled = weir_sandbox::metric_value(&metrics, "weir_enrolled_pods", &[]);
        println!(
            "  {:<9} pid {:<7} ready in {:>4} ms, {} pods enrolled, log {}",
            id.base_name(),
            agent.pid(),
            started.elapsed().as_millis(),
            enrolled.map_or_else(|| "?".to_owned(), |n| n.to_string()),
            agent.log_path().display(),
        );
        agents.push((id, agent));
    }
    println!("  binary {}", bin.display());

    let mut surprises = Vec::new();
    let replies = productpage_requests(&pods, &cluster_ips, &mut surprises)?;
    legacy_contrast(&pods, &replies, &cluster_ips, &mut surprises)?;
    print_metrics(&agents)?;

    if keep {
        apps.stop();
        let python = python3().context("python3 went away")?;
        let pids = PythonApps::start(&sb, &pods, &python)?;
        let agent_pids: Vec<u32> = agents.iter().map(|(_, agent)| agent.pid()).collect();
        let teardown =
            teardown_commands(kill_pids(&agent_pids, &pids.pids()), &bin, sb.cgroup_path());
        let script = sb.dir().join("teardown.sh");
        std::fs::write(&script, teardown_script(&teardown))
            .with_context(|| format!("cannot write {}", script.display()))?;
        print_keep_help(&sb, &pods, &cluster_ips, &script, &teardown)?;
        if !surprises.is_empty() {
            bail!(
                "the demo saw something unexpected:\n  {}",
                surprises.join("\n  ")
            );
        }
        pids.detach();
        for (_, agent) in agents {
            agent.keep();
        }
        sb.keep();
        return Ok(());
    }

    section("Teardown");
    apps.stop();
    let agent_pids: Vec<String> = agents.iter().map(|(_, a)| a.pid().to_string()).collect();
    let netns = demo_netns();
    let cgroup = sb.cgroup_path().to_owned();
    drop(agents);
    drop(sb);
    println!(
        "  killed the agents (pids {}), ran `weir uninstall` for both nodes,",
        agent_pids.join(", ")
    );
    println!(
        "  deleted {} network namespaces, the cgroup {} and {DEMO_DIR}.",
        netns.len(),
        cgroup.display()
    );
    let left = leftovers(&cgroup, &netns);
    if left.is_empty() {
        println!("  Nothing is left. `cargo xtask demo --keep` leaves it all running to explore.");
    } else {
        surprises.push(format!("left behind: {}", left.join(", ")));
    }
    if !surprises.is_empty() {
        bail!(
            "the demo saw something unexpected:\n  {}",
            surprises.join("\n  ")
        );
    }
    Ok(())
}

// ----------------------------------------------------------------------
// Output

fn heading(title: &str) {
    println!("\n{title}\n{}", "=".repeat(title.chars().count()));
}

fn section(title: &str) {
    println!("\n{title}\n{}", "-".repeat(title.chars().count()));
}

/// Columns two spaces apart, indented by `indent`; columns of numbers are
/// right-aligned.
fn table(indent: usize, headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let numeric: Vec<bool> = (0..headers.len())
        .map(|i| {
            !rows.is_empty()
                && rows
                    .iter()
                    .all(|row| row.get(i).is_some_and(|c| c.parse::<f64>().is_ok()))
        })
        .collect();
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = " ".repeat(indent);
        for ((cell, width), right) in cells.zip(&widths).zip(&numeric) {
            if *right {
                let _ = write!(out, "{cell:>width$}  ");
            } else {
                let _ = write!(out, "{cell:<width$}  ");
            }
        }
        println!("{}", out.trim_end());
    };
    line(&mut headers.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
}

fn print_sandbox(sb: &Sandbox, pods: &BTreeMap<&str, Pod>, cluster_ips: &BTreeMap<&str, Ipv4Addr>) {
    section("Sandbox (network namespaces on this machine, nothing in the root namespace)");
    for id in NodeId::ALL {
        let node = sb.node(id);
        println!(
            "  node {:<9} {:<11} pods {:<15} netns {}",
            node.name(),
            node.ip(),
            sb.addressing().pod_cidr(id),
            node.netns_name()
        );
    }
    println!(
        "  cgroup {} (this process is in pods/), files {}",
        sb.cgroup_path().display(),
        sb.dir().display()
    );
    println!("  namespace {NAMESPACE}: weir.dev/mesh=enabled\n");
    let rows: Vec<Vec<String>> = BOOKINFO
        .iter()
        .chain([&LEGACY])
        .map(|app| {
            let pod = &pods[app.pod];
            let mesh = if app.pod == LEGACY.pod {
                "no (pod label weir.dev/mesh=disabled)"
            } else {
                "yes"
            };
            vec![
                app.pod.to_owned(),
                app.node.base_name().to_owned(),
                pod.ip().to_string(),
                format!("app={} version={}", app.app, app.version),
                mesh.to_owned(),
            ]
        })
        .collect();
    table(2, &["pod", "node", "pod IP", "labels", "enrolled"], &rows);
    println!();
    let rows: Vec<Vec<String>> = SERVICES
        .iter()
        .map(|(name, _)| {
            let endpoints: Vec<&str> = BOOKINFO
                .iter()
                .filter(|app| app.app == *name)
                .map(|app| app.pod)
                .collect();
            vec![
                name.to_string(),
                format!("{}:{PORT}", cluster_ips[name]),
                format!("app={name}"),
                endpoints.join(", "),
            ]
        })
        .collect();
    table(2, &["service", "ClusterIP", "selector", "endpoints"], &rows);
    println!("  Every pod runs a tiny HTTP app on :{PORT} that answers with its name and the");
    println!(
        "  client address it saw. There is no kube-proxy and no DNS: Host headers are sent by hand."
    );
}

// ----------------------------------------------------------------------
// Traffic

/// What one request showed.
struct Reply {
    /// Which pod answered, from the body.
    pod: String,
    /// The client address the server saw, from the body.
    server_saw: String,
    /// `getpeername()` on the client's socket.
    peer_addr: SocketAddr,
    /// `getsockname()` on the client's socket.
    local_addr: SocketAddr,
}

fn productpage_requests(
    pods: &BTreeMap<&str, Pod>,
    cluster_ips: &BTreeMap<&str, Ipv4Addr>,
    surprises: &mut Vec<String>,
) -> Result<BTreeMap<String, Reply>> {
    let productpage = &pods["productpage-v1"];
    section(&format!(
        "Requests from productpage-v1 ({}, enrolled, on xuegod63)",
        productpage.ip()
    ));
    let mut targets: Vec<(String, SocketAddr, String)> = Vec::new();
    let service = |name: &str| {
        (
            format!("{name} (ClusterIP)"),
            SocketAddr::from((cluster_ips[name], PORT)),
            format!("{name}.{NAMESPACE}.svc.cluster.local:{PORT}"),
        )
    };
    targets.push(service("details"));
    for _ in 0..REVIEWS_CALLS {
        targets.push(service("reviews"));
    }
    targets.push(service("ratings"));
    for (name, note) in [("ratings-v1", "other node"), ("details-v1", "same node")] {
        let addr = pods[name].addr(PORT);
        targets.push((format!("{name} (pod IP, {note})"), addr, addr.to_string()));
    }

    let mut rows = Vec::new();
    let mut replies = BTreeMap::new();
    let mut reviews_seen: BTreeMap<String, usize> = BTreeMap::new();
    for (label, addr, host) in &targets {
        let reply = http_get(productpage, *addr, host)
            .with_context(|| format!("productpage-v1 → {label} {addr} failed"))?;
        if label.starts_with("reviews") {
            *reviews_seen.entry(reply.pod.clone()).or_default() += 1;
        }
        let answered = BOOKINFO
            .iter()
            .find(|app| app.pod == reply.pod)
            .map_or_else(
                || reply.pod.clone(),
                |app| format!("{} ({})", app.pod, app.node.base_name()),
            );
        rows.push(vec![
            label.clone(),
            addr.to_string(),
            answered,
            reply.server_saw.clone(),
            reply.peer_addr.to_string(),
        ]);
        if !reply
            .server_saw
            .starts_with(&format!("{}:", productpage.ip()))
        {
            surprises.push(format!(
                "{label}: the server saw {} instead of productpage's own IP",
                reply.server_saw
            ));
        }
        if reply.peer_addr != *addr {
            surprises.push(format!(
                "{label}: getpeername() said {} instead of {addr}",
                reply.peer_addr
            ));
        }
        if !reply.local_addr.ip().is_loopback() {
            surprises.push(format!(
                "{label}: not redirected (getsockname() {})",
                reply.local_addr
            ));
        }
        replies.insert(label.clone(), reply);
    }
    table(
        2,
        &[
            "to",
            "address dialled",
            "answered by",
            "server saw client",
            "client getpeername()",
        ],
        &rows,
    );
    let spread: Vec<String> = reviews_seen
        .iter()
        .map(|(pod, n)| format!("{pod} ×{n}"))
        .collect();
    println!();
    println!(
        "  • reviews, {REVIEWS_CALLS} calls: {}; the agent's round robin.",
        spread.join(", ")
    );
    println!(
        "  • The servers saw {}, productpage's own pod IP: the agent dials from inside the pod.",
        productpage.ip()
    );
    println!("  • getpeername() gives the address the app dialled, although every one of these");
    println!("    sockets is connected to the agent's listener on 127.0.0.1:15001 in the pod.");
    if reviews_seen.len() < 3 {
        surprises.push(format!(
            "reviews was answered by only {}",
            spread.join(", ")
        ));
    }
    Ok(replies)
}

fn legacy_contrast(
    pods: &BTreeMap<&str, Pod>,
    replies: &BTreeMap<String, Reply>,
    cluster_ips: &BTreeMap<&str, Ipv4Addr>,
    surprises: &mut Vec<String>,
) -> Result<()> {
    let legacy = &pods[LEGACY.pod];
    let details = &pods["details-v1"];
    section(&format!(
        "Not enrolled: legacy-client ({}, weir.dev/mesh=disabled)",
        legacy.ip()
    ));
    let addr = details.addr(PORT);
    let reply = http_get(legacy, addr, &addr.to_string())
        .with_context(|| format!("legacy-client → details-v1 {addr} failed"))?;
    println!(
        "  legacy-client → details-v1 {addr}: answered by {}, which saw {}.",
        reply.pod, reply.server_saw
    );
    println!("  The same destination from both pods, as the client sockets see it:\n");
    let mut rows = vec![vec![
        "legacy-client".to_owned(),
        reply.local_addr.to_string(),
        reply.peer_addr.to_string(),
        "direct, untouched".to_owned(),
    ]];
    if reply.local_addr.ip() != IpAddr::V4(legacy.ip()) {
        surprises.push(format!(
            "legacy-client's socket was redirected (getsockname() {})",
            reply.local_addr
        ));
    }
    if let Some(pp) = replies.get("details-v1 (pod IP, same node)") {
        rows.push(vec![
            "productpage-v1".to_owned(),
            pp.local_addr.to_string(),
            pp.peer_addr.to_string(),
            "redirected to 127.0.0.1:15001 by connect4".to_owned(),
        ]);
    }
    table(
        2,
        &["client", "getsockname()", "getpeername()", "connection"],
        &rows,
    );
    println!();
    println!(
        "  legacy-client cannot use ClusterIPs (reviews is {}): the sandbox has no",
        cluster_ips["reviews"]
    );
    println!("  kube-proxy; only enrolled pods have Services resolved, by the agent. Not tried.");
    Ok(())
}

/// `GET /` to `addr` from inside `pod`, with `Host: host`.
fn http_get(pod: &Pod, addr: SocketAddr, host: &str) -> Result<Reply> {
    let mut stream = pod
        .connect(addr)
        .with_context(|| format!("cannot connect from {}", pod.name()))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let peer_addr = stream.peer_addr()?;
    let local_addr = stream.local_addr()?;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: weir-demo\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    (&mut stream)
        .take(MAX_MESSAGE)
        .read_to_end(&mut raw)
        .context("cannot read the response")?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("incomplete response: {text:?}"))?;
    let status = head.split(' ').nth(1).unwrap_or_default();
    if status != "200" {
        bail!("answered {:?}", head.lines().next().unwrap_or_default());
    }
    let body: serde_json::Value =
        serde_json::from_str(body.trim()).with_context(|| format!("body is not JSON: {body:?}"))?;
    let field = |name: &str| body[name].as_str().unwrap_or("?").to_owned();
    Ok(Reply {
        pod: field("pod"),
        server_saw: field("peer"),
        peer_addr,
        local_addr,
    })
}

// ----------------------------------------------------------------------
// The pods' apps

/// The JSON body every app answers with.
fn app_body(app: &App, peer: SocketAddr) -> String {
    format!(
        r#"{{"service":"{}","version":"{}","pod":"{}","peer":"{peer}"}}"#,
        app.app, app.version, app.pod
    )
}

/// One thread per pod, serving on the pod's `:9080` until stopped.
struct InProcessApps {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl InProcessApps {
    fn start(pods: &BTreeMap<&str, Pod>) -> Result<InProcessApps> {
        let mut apps = InProcessApps {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        };
        for app in BOOKINFO.iter().chain([&LEGACY]) {
            let listener = pods[app.pod]
                .listen(PORT)
                .with_context(|| format!("cannot listen on :{PORT} in {}", app.pod))?;
            listener.set_nonblocking(true)?;
            let stop = Arc::clone(&apps.stop);
            let thread = thread::Builder::new()
                .name(format!("app-{}", app.pod))
                .spawn(move || serve(listener, app, &stop))?;
            apps.threads.push(thread);
        }
        Ok(apps)
    }

    /// Stops every app and closes its listener.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for InProcessApps {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Accepts until `stop` or `APP_LIFETIME`, answering one request per
/// connection. The demo's requests come one at a time, so one at a time
/// is enough.
fn serve(listener: TcpListener, app: &App, stop: &AtomicBool) {
    let deadline = Instant::now() + APP_LIFETIME;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, peer)) => {
                if let Err(error) = answer(stream, peer, app) {
                    eprintln!("{}: {peer}: {error}", app.pod);
                }
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(error) => {
                eprintln!("{}: accept: {error}", app.pod);
                thread::sleep(POLL);
            }
        }
    }
}

/// Reads the request head, answers with [`app_body`], and closes.
fn answer(mut stream: TcpStream, peer: SocketAddr, app: &App) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut head = Vec::new();
    let mut buf = [0; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() as u64 > MAX_MESSAGE {
            return Err(std::io::Error::other("request head too long"));
        }
        match stream.read(&mut buf)? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let body = app_body(app, peer) + "\n";
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// `--keep`: the same apps as detached `python3` processes inside the pods'
/// namespaces, since this process and its threads end. They are killed
/// again if the demo fails before it detaches them.
struct PythonApps {
    children: Vec<(&'static str, Child)>,
}

/// The Python version of [`app_body`]'s app.
const PYTHON_APP: &str = r#"# A Bookinfo stand-in for `cargo xtask demo --keep`: answers every GET
# with the pod's name and the client address it saw.
import http.server, json, sys

service, version, pod, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

class App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        peer = "%s:%d" % self.client_address[:2]
        body = json.dumps({"service": service, "version": version, "pod": pod, "peer": peer},
                          separators=(",", ":")).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("0.0.0.0", port), App).serve_forever()
"#;

impl PythonApps {
    fn start(sb: &Sandbox, pods: &BTreeMap<&str, Pod>, python: &Path) -> Result<PythonApps> {
        let script = sb.dir().join("app.py");
        std::fs::write(&script, PYTHON_APP)
            .with_context(|| format!("cannot write {}", script.display()))?;
        let mut apps = PythonApps {
            children: Vec::new(),
        };
        for app in BOOKINFO.iter().chain([&LEGACY]) {
            let pod = &pods[app.pod];
            let log = sb.dir().join(format!("app-{}.log", app.pod));
            let log = std::fs::File::create(&log)
                .with_context(|| format!("cannot create {}", log.display()))?;
            let child = Command::new("nsenter")
                .arg(format!("--net={NETNS_DIR}/{}", pod.netns_name()))
                .arg(python)
                .arg(&script)
                .args([app.app, app.version, app.pod, &PORT.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                // Its own process group: a Ctrl-C in this terminal later
                // does not reach it.
                .process_group(0)
                .spawn()
                .with_context(|| format!("cannot start python3 in {}", app.pod))?;
            apps.children.push((app.pod, child));
        }
        // Wait until each answers, asked directly (not intercepted) from
        // legacy-client, which is not enrolled.
        let legacy = &pods[LEGACY.pod];
        let deadline = Instant::now() + Duration::from_secs(10);
        for app in BOOKINFO.iter().chain([&LEGACY]) {
            let addr = pods[app.pod].addr(PORT);
            loop {
                match http_get(legacy, addr, &addr.to_string()) {
                    Ok(reply) if reply.pod == app.pod => break,
                    Ok(reply) => bail!("{addr} answered as {}, not {}", reply.pod, app.pod),
                    Err(error) if Instant::now() >= deadline => {
                        return Err(
                            error.context(format!("python3 app in {} never answered", app.pod))
                        );
                    }
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        }
        Ok(apps)
    }

    fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, child)| child.id()).collect()
    }

    /// Leaves the apps running after this process exits.
    fn detach(mut self) {
        self.children.clear();
    }
}

impl Drop for PythonApps {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn python3() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("python3"))
        .find(|candidate| candidate.is_file())
}

// ----------------------------------------------------------------------
// Metrics

/// `[opened, closed, request bytes, response bytes]` per
/// (source, destination, service, response flags).
type Flows = BTreeMap<(String, String, String, String), [f64; 4]>;

fn flows(metrics: &str) -> Flows {
    let families = [
        "istio_tcp_connections_opened_total",
        "istio_tcp_connections_closed_total",
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ];
    let mut flows = Flows::new();
    for sample in samples(metrics) {
        let Some(column) = families.iter().position(|f| *f == sample.name) else {
            continue;
        };
        let label = |key: &str| sample.label(key).to_owned();
        let key = (
            label("source_workload"),
            label("destination_workload"),
            label("destination_service_name"),
            label("response_flags"),
        );
        flows.entry(key).or_default()[column] += sample.value;
    }
    flows
}

fn print_metrics(agents: &[(NodeId, Agent)]) -> Result<()> {
    section("What the agents counted (GET :15020/metrics on each node)");
    for (id, agent) in agents {
        // Closes are counted a moment after the client saw the end.
        let deadline = Instant::now() + Duration::from_secs(3);
        let metrics = loop {
            let metrics = agent.metrics()?;
            let open = flows(&metrics).values().any(|f| f[0] != f[1]);
            if !open || Instant::now() >= deadline {
                break metrics;
            }
            thread::sleep(Duration::from_millis(100));
        };
        println!("  {} (pid {})", id.base_name(), agent.pid());
        let rows: Vec<Vec<String>> = flows(&metrics)
            .into_iter()
            .map(
                |((source, destination, service, flags), [opened, closed, rx, tx])| {
                    vec![
                        format!("{source} → {destination}"),
                        service,
                        format!("{opened}"),
                        format!("{closed}"),
                        format!("{rx}"),
                        format!("{tx}"),
                        flags,
                    ]
                },
            )
            .collect();
        if rows.is_empty() {
            println!("    no proxied connections: no enrolled pod of this node opened one.");
        } else {
            table(
                4,
                &[
                    "source → destination workload",
                    "service",
                    "opened",
                    "closed",
                    "request B",
                    "response B",
                    "flags",
                ],
                &rows,
            );
        }
        let decisions: Vec<String> = samples(&metrics)
            .filter(|s| s.name == "weir_decisions_total" && s.value > 0.0)
            .map(|s| format!("{} {}", s.label("decision"), s.value))
            .collect();
        println!("    weir_decisions_total: {}", decisions.join(", "));
        println!();
    }
    println!(
        "  redirected    an enrolled pod's connect(), sent to the agent's listener in the pod"
    );
    println!(
        "  own_socket    the agent's own upstream connect(), from inside the pod, let through"
    );
    println!("  not_enrolled  everything else: legacy-client, the demo's scrapes, and the other");
    println!("                node's pods (both nodes' programs watch the sandbox's one cgroup)");
    println!(
        "  istio_tcp_* are reported at the client's node (reporter=source), with Istio's labels;"
    );
    println!(
        "  request B = istio_tcp_received_bytes_total, response B = istio_tcp_sent_bytes_total."
    );
    println!("  service unknown: dialled by pod IP, not through a Service.");
    Ok(())
}

// ----------------------------------------------------------------------
// --keep and leftovers

fn netns_path(name: &str) -> String {
    format!("{NETNS_DIR}/{name}")
}

/// Every namespace of the demo's sandbox, pods first, as the sandbox
/// library names them for the untagged demo sandbox.
fn demo_netns() -> Vec<String> {
    let mut names: Vec<String> = BOOKINFO
        .iter()
        .chain([&LEGACY])
        .map(|app| format!("weir-{}.{NAMESPACE}", app.pod))
        .collect();
    for id in NodeId::ALL {
        names.push(format!("weir-{}", id.base_name()));
    }
    names.push("weir-switch".to_owned());
    names
}

/// `<cgroup2>/weir-demo`, found as the sandbox library finds it.
fn demo_cgroup() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| Path::new(fields[1]).join("weir-demo"))
        })
        .context("no cgroup2 file system is mounted")
}

/// Stops the processes a kept demo left: the agents (SIGTERM: they drain
/// and exit, keeping the pins for `uninstall`) and the python3 apps.
fn kill_pids(agent_pids: &[u32], app_pids: &[u32]) -> Vec<String> {
    let join = |pids: &[u32]| {
        pids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    };
    vec![
        format!("kill {}    # the agents", join(agent_pids)),
        format!("kill {}    # the python3 pod apps", join(app_pids)),
        format!(
            "for pid in {}; do timeout 10 tail --pid=$pid -f /dev/null; done",
            join(&[agent_pids, app_pids].concat())
        ),
    ]
}

/// `kill`, then uninstall both nodes, delete the namespaces, the cgroups
/// and the sandbox's directory.
fn teardown_commands(kill: Vec<String>, bin: &Path, cgroup: &Path) -> Vec<String> {
    let cgroup = cgroup.display();
    let mut commands = kill;
    for id in NodeId::ALL {
        commands.push(format!(
            "{} uninstall --node {}",
            bin.display(),
            id.base_name()
        ));
    }
    commands.push(format!(
        "for ns in {}; do ip netns del $ns; done",
        demo_netns().join(" ")
    ));
    commands.push(format!(
        "rmdir {cgroup}/pods {cgroup}/agent-xuegod63 {cgroup}/agent-xuegod64 {cgroup}"
    ));
    commands.push(format!("rm -r {DEMO_DIR}"));
    commands
}

fn teardown_script(commands: &[String]) -> String {
    let mut script =
        String::from("#!/bin/sh\n# Removes what `cargo xtask demo --keep` left running.\nset -x\n");
    for command in commands {
        script.push_str(command);
        script.push('\n');
    }
    script
}

/// Prints what to look at and how to tear down, after trying the commands
/// that enter a pod, so that what is printed is known to work.
fn print_keep_help(
    sb: &Sandbox,
    pods: &BTreeMap<&str, Pod>,
    cluster_ips: &BTreeMap<&str, Ipv4Addr>,
    script: &Path,
    teardown: &[String],
) -> Result<()> {
    section("Kept running (--keep)");
    let cgroup = sb.cgroup_path().display().to_string();
    println!("  The agents and the sandbox stay. The pod apps are now python3 processes");
    println!("  (same answers), since this process ends.");
    println!();
    println!("  Only processes in the sandbox's cgroup are intercepted, and `ip netns exec`");
    println!("  hides /sys/fs; so enter a pod with this shell function, which joins pods/ and");
    println!("  then only the pod's network namespace:");
    println!();
    let inpod = format!(
        "inpod() {{ sh -c 'echo $$ > {cgroup}/pods/cgroup.procs && exec nsenter --net={NETNS_DIR}/weir-$0.{NAMESPACE} \"$@\"' \"$@\"; }}"
    );
    println!("  {inpod}");
    println!();
    let reviews = cluster_ips["reviews"];
    let ratings = pods["ratings-v1"].ip();
    let details = pods["details-v1"].ip();
    let node63 = netns_path(sb.node(NodeId::Xuegod63).netns_name());
    // (command, comment, whether to run it here first)
    let lines = [
        (
            format!(
                "inpod productpage-v1 curl -s -H 'Host: reviews.{NAMESPACE}.svc.cluster.local:{PORT}' http://{reviews}:{PORT}/"
            ),
            "reviews by ClusterIP; repeat for round robin",
            true,
        ),
        (
            format!("inpod productpage-v1 curl -s http://{ratings}:{PORT}/"),
            "ratings-v1 by pod IP, across nodes",
            true,
        ),
        (
            format!("inpod legacy-client curl -s http://{details}:{PORT}/"),
            "not enrolled: direct, not intercepted",
            true,
        ),
        (
            format!("inpod legacy-client curl -sS http://{reviews}:{PORT}/"),
            "fails at once: no kube-proxy for pods that are not enrolled",
            false,
        ),
        (
            format!("nsenter --net={node63} curl -s 127.0.0.1:15020/metrics | grep -v '^#'"),
            "xuegod63's metrics",
            false,
        ),
        (
            format!("nsenter --net={node63} curl -s 127.0.0.1:15000/config_dump"),
            "what xuegod63's agent knows and enrolled",
            false,
        ),
        (
            format!("bpftool cgroup show {cgroup}"),
            "both nodes' programs on the sandbox's cgroup",
            false,
        ),
        (
            "ls -R /sys/fs/bpf/weir/xuegod63".to_owned(),
            "pinned programs, links, maps",
            false,
        ),
        (
            format!("tail {}/agent-xuegod63.log", sb.dir().display()),
            "agent log",
            false,
        ),
    ];
    for (command, comment, try_it) in &lines {
        println!("  {command}\n      # {comment}");
        if *try_it {
            let answer = try_shell(&format!("{inpod}\n{command}"))
                .with_context(|| format!("the printed command `{command}` does not work"))?;
            println!("      # just now: {}", answer.trim());
        }
    }
    println!();
    println!("  While this runs, `cargo xtask test` reports it as left-over state.");
    println!(
        "  To tear it all down, run `sh {}`, which does:",
        script.display()
    );
    println!();
    for command in teardown {
        println!("  {command}");
    }
    Ok(())
}

/// Runs `script` with `sh`, for at most 10 seconds, and returns its stdout.
fn try_shell(script: &str) -> Result<String> {
    let output = Command::new("timeout")
        .args(["10", "sh", "-c", script])
        .stdin(Stdio::null())
        .output()
        .context("cannot run sh")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() || stdout.trim().is_empty() {
        bail!(
            "{}: {}{}",
            output.status,
            stdout.trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(stdout)
}

/// Refuses to start over an earlier `--keep` sandbox (or the remains of a
/// demo that was killed), and says how to remove it.
fn check_no_leftover_demo(bin: &Path) -> Result<()> {
    let cgroup = demo_cgroup()?;
    let netns = demo_netns();
    let left = leftovers(&cgroup, &netns);
    if left.is_empty() {
        return Ok(());
    }
    let script = Path::new(DEMO_DIR).join("teardown.sh");
    if script.is_file() {
        bail!(
            "a demo sandbox is still running (from `cargo xtask demo --keep`); remove it with\n  sh {}",
            script.display()
        );
    }
    // Whatever still runs in the demo's cgroups is the demo's.
    let procs = |dir: &str| format!("{}/{dir}/cgroup.procs", cgroup.display());
    let kill = vec![format!(
        "for pid in $(cat {} {} {} 2>/dev/null); do kill $pid; timeout 10 tail --pid=$pid -f /dev/null; done",
        procs("agent-xuegod63"),
        procs("agent-xuegod64"),
        procs("pods"),
    )];
    bail!(
        "the remains of an earlier demo are in the way: {}.\nRemove them with (errors about what is already gone are fine):\n  {}",
        left.join(", "),
        teardown_commands(kill, bin, &cgroup).join("\n  ")
    )
}

/// What the demo's teardown should have removed, if anything is left.
fn leftovers(cgroup: &Path, netns: &[String]) -> Vec<String> {
    let mut left: Vec<String> = [
        Path::new(DEMO_DIR),
        cgroup,
        Path::new("/sys/fs/bpf/weir/xuegod63"),
        Path::new("/sys/fs/bpf/weir/xuegod64"),
    ]
    .into_iter()
    .filter(|path| path.exists())
    .map(|path| path.display().to_string())
    .collect();
    let namespaces = netns_list()
        .into_iter()
        .filter(|name| netns.contains(name))
        .count();
    if namespaces > 0 {
        left.push(format!("{namespaces} of its network namespaces"));
    }
    left
}

/// The names `ip netns list` shows.
fn netns_list() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|line| line.split_whitespace().next())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}
