//! `weir-demo [--keep]`, run by `cargo xtask demo`: a two-node Bookinfo sandbox whose enrolled
//! pods have their connections taken over by weir, shown from both ends, and an Istio
//! AuthorizationPolicy enforced on them.
//!
//! The pods' apps are small HTTP servers on threads of this process, each
//! answering with who it is and which client address it saw. With `--keep`
//! the sandbox and the agents stay, the apps are replaced by detached
//! `python3` processes that answer the same way, and the demo prints
//! commands to look around with and to tear everything down.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use weir_sandbox::{
    Agent, NodeId, Pod, PodSpec, Sandbox, SandboxOptions, agent_binary, metric_value, samples,
};

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
/// How long a change of the manifests may take to be seen by both agents
/// (they promise about a second), and any change it causes to show.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(3);
/// How often reviews is called, to show round robin over v1, v2 and v3.
const REVIEWS_CALLS: usize = 6;
/// The address the inbound proxy delivers connections from, as Istio's
/// sidecar does.
const INBOUND_DELIVERY: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

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

    /// Bookinfo's service accounts are `bookinfo-<app>`; legacy-client has
    /// its namespace's `default`.
    fn service_account(&self) -> String {
        if self.pod == LEGACY.pod {
            "default".to_owned()
        } else {
            format!("bookinfo-{}", self.app)
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
            .service_account(&app.service_account())
            .label("app", app.app)
            .label("version", app.version);
        if app.pod == LEGACY.pod {
            spec = spec.label("weir.dev/mesh", "disabled");
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
        let enrolled = metric_value(&metrics, "weir_enrolled_pods", &[]);
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
    let replies = productpage_requests(&pods, &cluster_ips, &agents, &mut surprises)?;
    legacy_contrast(&pods, &replies, &cluster_ips, &agents, &mut surprises)?;
    policy(&sb, &pods, &cluster_ips, &agents, &mut surprises)?;
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
                app.service_account(),
                mesh.to_owned(),
            ]
        })
        .collect();
    table(
        2,
        &[
            "pod",
            "node",
            "pod IP",
            "labels",
            "service account",
            "enrolled",
        ],
        &rows,
    );
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

/// The node of a Bookinfo pod, by name.
fn node_of(pod: &str) -> Option<NodeId> {
    BOOKINFO
        .iter()
        .find(|app| app.pod == pod)
        .map(|app| app.node)
}

/// `istio_tcp_connections_opened_total`, summed over the series that carry
/// all of `labels`.
fn opened(metrics: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(metrics, "istio_tcp_connections_opened_total", labels).unwrap_or(0.0)
}

/// The agent of node `id`.
fn agent(agents: &[(NodeId, Agent)], id: NodeId) -> &Agent {
    &agents
        .iter()
        .find(|(node, _)| *node == id)
        .expect("one agent per node")
        .1
}

fn productpage_requests(
    pods: &BTreeMap<&str, Pod>,
    cluster_ips: &BTreeMap<&str, Ipv4Addr>,
    agents: &[(NodeId, Agent)],
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
    // Connections per server node, to compare with what the servers'
    // agents counted.
    let mut per_node: BTreeMap<&str, f64> = BTreeMap::new();
    for (label, addr, host) in &targets {
        let reply = http_get(productpage, *addr, host)
            .with_context(|| format!("productpage-v1 → {label} {addr} failed"))?;
        if label.starts_with("reviews") {
            *reviews_seen.entry(reply.pod.clone()).or_default() += 1;
        }
        let answered = match node_of(&reply.pod) {
            Some(node) => {
                *per_node.entry(node.base_name()).or_default() += 1.0;
                format!("{} ({})", reply.pod, node.base_name())
            }
            None => reply.pod.clone(),
        };
        rows.push(vec![
            label.clone(),
            addr.to_string(),
            answered,
            reply.server_saw.clone(),
            reply.peer_addr.to_string(),
        ]);
        // Every Bookinfo pod is enrolled: its own node's agent delivers.
        if !reply
            .server_saw
            .starts_with(&format!("{INBOUND_DELIVERY}:"))
        {
            surprises.push(format!(
                "{label}: the server saw {} instead of {INBOUND_DELIVERY}, the inbound proxy",
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

    // Both ends' agents, asked what they counted.
    let productpage_source = [("source_workload", "productpage-v1")];
    let mut by_destination = Vec::new();
    let mut by_source = 0.0;
    for (id, agent) in agents {
        let metrics = agent.metrics()?;
        let node = id.base_name();
        let counted = opened(
            &metrics,
            &[productpage_source[0], ("reporter", "destination")],
        );
        let expected = per_node.get(node).copied().unwrap_or(0.0);
        if counted != expected {
            surprises.push(format!(
                "{node}'s agent counted {counted} inbound connections from productpage-v1, not {expected}"
            ));
        }
        by_destination.push(format!("{node} {counted}"));
        by_source += opened(&metrics, &[productpage_source[0], ("reporter", "source")]);
    }
    if by_source != targets.len() as f64 {
        surprises.push(format!(
            "productpage-v1's outbound connections were counted {by_source} times, not {}",
            targets.len()
        ));
    }

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
        "  • Client side, on xuegod63: connect4 sent each connect() to the agent's listener on"
    );
    println!(
        "    127.0.0.1:15001 in productpage's pod. The agent chose the endpoint and dialled it from"
    );
    println!(
        "    inside that pod, so the server's node saw productpage's own IP, {}. getpeername()",
        productpage.ip()
    );
    println!("    still gives the address the app dialled.");
    println!(
        "  • Server side, on the server's node: sk_lookup handed the connection to that node's agent"
    );
    println!(
        "    on 127.0.0.1:15006 in the server's pod, which delivered it to the app from {INBOUND_DELIVERY},"
    );
    println!("    as Istio's sidecar does. So every app saw {INBOUND_DELIVERY} as its client.");
    println!(
        "  • That agent knew the client by its source IP: its series with reporter=\"destination\""
    );
    println!(
        "    say source_workload=\"productpage-v1\" ({}); xuegod63 also",
        by_destination.join(", ")
    );
    println!(
        "    counted all {by_source} with reporter=\"source\". Both ends report, as with Istio's sidecars."
    );
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
    agents: &[(NodeId, Agent)],
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
    println!("  The client's end is left alone; the server's is not: details-v1 is enrolled, so");
    println!("  sk_lookup on xuegod63 took the connection into its agent as it takes any other.");
    println!("  The same destination from both pods, as the client sockets see it:\n");
    let mut rows = vec![vec![
        "legacy-client".to_owned(),
        reply.local_addr.to_string(),
        reply.peer_addr.to_string(),
        "direct: connect4 let it through".to_owned(),
    ]];
    if reply.local_addr.ip() != IpAddr::V4(legacy.ip()) {
        surprises.push(format!(
            "legacy-client's socket was redirected (getsockname() {})",
            reply.local_addr
        ));
    }
    if !reply
        .server_saw
        .starts_with(&format!("{INBOUND_DELIVERY}:"))
    {
        surprises.push(format!(
            "legacy-client → details-v1: details-v1 saw {}, not {INBOUND_DELIVERY}",
            reply.server_saw
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
    let xuegod63 = agent(agents, NodeId::Xuegod63).metrics()?;
    let legacy_source = ("source_workload", LEGACY.pod);
    let inbound = opened(&xuegod63, &[legacy_source, ("reporter", "destination")]);
    let mut outbound = 0.0;
    for (_, agent) in agents {
        outbound += opened(&agent.metrics()?, &[legacy_source, ("reporter", "source")]);
    }
    if inbound != 1.0 || outbound != 0.0 {
        surprises.push(format!(
            "legacy-client's connection was counted {inbound} times inbound and {outbound} times outbound, not once and never"
        ));
    }
    println!();
    println!(
        "  xuegod63 counted it once, with reporter=\"destination\" and source_workload=\"legacy-client\""
    );
    println!(
        "  (its IP belongs to a known pod); no reporter=\"source\" series: no proxy at the client's end."
    );
    println!(
        "  legacy-client cannot use ClusterIPs (reviews is {}): the sandbox has no",
        cluster_ips["reviews"]
    );
    println!("  kube-proxy; only enrolled pods have Services resolved, by the agent. Not tried.");
    Ok(())
}

// ----------------------------------------------------------------------
// Policy

/// Where the demo writes its policies, in the manifests directory.
const POLICY_FILE: &str = "bookinfo-authorization.yaml";

/// Istio's Bookinfo examples `ratings-viewer` and `details-viewer`, less
/// their `to: [{operation: {methods: ["GET"]}}]`, which is HTTP.
const POLICY_YAML: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ratings-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: ratings
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-reviews"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: details-viewer
  namespace: default
spec:
  selector:
    matchLabels:
      app: details
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]
"#;

const POLICY_NAMES: [&str; 2] = ["ratings-viewer", "details-viewer"];

/// The names of the policies in `agent`'s model, from `/config_dump`.
fn policies_known(agent: &Agent) -> Result<Vec<String>> {
    let dump = agent.config_dump()?;
    Ok(dump["cluster"]["policies"]
        .as_array()
        .map(|policies| {
            policies
                .iter()
                .filter_map(|policy| policy["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Calls `done` every [`POLL`] until it holds or `timeout` passes; how long
/// that took, or `None` on timeout.
fn wait_until(
    timeout: Duration,
    mut done: impl FnMut() -> Result<bool>,
) -> Result<Option<Duration>> {
    let start = Instant::now();
    loop {
        if done()? {
            return Ok(Some(start.elapsed()));
        }
        if start.elapsed() >= timeout {
            return Ok(None);
        }
        thread::sleep(POLL);
    }
}

fn policy(
    sb: &Sandbox,
    pods: &BTreeMap<&str, Pod>,
    cluster_ips: &BTreeMap<&str, Ipv4Addr>,
    agents: &[(NodeId, Agent)],
    surprises: &mut Vec<String>,
) -> Result<()> {
    let productpage = &pods["productpage-v1"];
    let reviews = &pods["reviews-v1"];
    let legacy = &pods[LEGACY.pod];
    let ratings_addr = pods["ratings-v1"].addr(PORT);
    let details_addr = pods["details-v1"].addr(PORT);
    let xuegod64 = agent(agents, NodeId::Xuegod64);
    section("Policy: an Istio AuthorizationPolicy, enforced at L4");

    // A connection from before the policy, idle, to see it revoked: it is
    // open once ratings' node has delivered it to the app.
    let held_labels = [
        ("reporter", "destination"),
        ("source_workload", "productpage-v1"),
        ("destination_workload", "ratings-v1"),
    ];
    let before = opened(&xuegod64.metrics()?, &held_labels);
    let mut held = productpage
        .connect(ratings_addr)
        .context("productpage-v1 cannot connect to ratings-v1")?;
    if wait_until(SETTLE_TIMEOUT, || {
        Ok(opened(&xuegod64.metrics()?, &held_labels) > before)
    })?
    .is_none()
    {
        surprises.push("an idle connection to ratings-v1 never reached its app".to_owned());
    }

    println!("  Istio's Bookinfo examples ratings-viewer and details-viewer, without their");
    println!(
        "  `to: [{{operation: {{methods: [\"GET\"]}}}}]`: HTTP methods are beyond L4, where weir"
    );
    println!(
        "  (like ztunnel) decides. Written to {}/{POLICY_FILE}:",
        sb.manifests_dir().display()
    );
    println!();
    for line in POLICY_YAML.lines() {
        println!("    {line}");
    }
    sb.write_manifest(POLICY_FILE, POLICY_YAML)?;
    let applied = wait_until(SETTLE_TIMEOUT, || {
        for (_, agent) in agents {
            let known = policies_known(agent)?;
            if !POLICY_NAMES
                .iter()
                .all(|name| known.iter().any(|k| k == name))
            {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    let Some(applied) = applied else {
        bail!("the agents did not take up {POLICY_FILE} within {SETTLE_TIMEOUT:?}");
    };
    let mut in_force = Vec::new();
    for (id, agent) in agents {
        let dump = agent.config_dump()?;
        if let Some(workloads) = dump["policies_in_force"].as_object() {
            for (workload, policies) in workloads {
                let names: Vec<&str> = policies
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_str())
                    .collect();
                if !names.is_empty() {
                    in_force.push(vec![
                        id.base_name().to_owned(),
                        workload.clone(),
                        names.join(", "),
                    ]);
                }
            }
        }
    }
    let expected = [
        ["xuegod63", "default/details-v1", "default/details-viewer"],
        ["xuegod64", "default/ratings-v1", "default/ratings-viewer"],
    ];
    if in_force != expected.map(|row| row.map(str::to_owned).to_vec()) {
        surprises.push(format!("policies in force: {in_force:?}, not {expected:?}"));
    }
    println!();
    println!(
        "  Both agents had them {} ms later. Their config_dump, policies_in_force:",
        applied.as_millis()
    );
    table(4, &["node", "pod", "policies"], &in_force);
    println!();

    let mut rows = Vec::new();
    let mut row = |client: &str, to: &str, outcome: &Outcome, why: &str| {
        rows.push(vec![
            format!("{client} → {to}"),
            outcome.describe(),
            why.to_owned(),
        ]);
    };

    // The idle connection: the server's agent closed it on the change.
    held.set_read_timeout(Some(SETTLE_TIMEOUT))?;
    let held_outcome = match held.read(&mut [0; 64]) {
        Ok(0) => Outcome::Failed(anyhow::anyhow!("closed, not reset")),
        Ok(_) => Outcome::Failed(anyhow::anyhow!("data, not a reset")),
        Err(error) => Outcome::Failed(anyhow::Error::new(error)),
    };
    drop(held);
    row(
        "productpage-v1",
        "ratings-v1, already open",
        &held_outcome,
        "xuegod64 inbound, on the change",
    );
    let ratings_host = ratings_addr.to_string();
    let first = attempt(productpage, ratings_addr, &ratings_host);
    row(
        "productpage-v1",
        "ratings-v1 (pod IP)",
        &first,
        "xuegod63 outbound, before dialling",
    );
    let second = attempt(productpage, ratings_addr, &ratings_host);
    row(
        "productpage-v1",
        "ratings-v1 again",
        &second,
        "xuegod63's connect4: cached denial",
    );
    let ratings_service = SocketAddr::from((cluster_ips["ratings"], PORT));
    let allowed_ratings = attempt(
        reviews,
        ratings_service,
        &format!("ratings.{NAMESPACE}.svc.cluster.local:{PORT}"),
    );
    row(
        "reviews-v1",
        "ratings (ClusterIP)",
        &allowed_ratings,
        "allowed: sa bookinfo-reviews",
    );
    let details_service = SocketAddr::from((cluster_ips["details"], PORT));
    let allowed_details = attempt(
        productpage,
        details_service,
        &format!("details.{NAMESPACE}.svc.cluster.local:{PORT}"),
    );
    row(
        "productpage-v1",
        "details (ClusterIP)",
        &allowed_details,
        "allowed: sa bookinfo-productpage",
    );
    let details_host = details_addr.to_string();
    let denied_legacy = attempt(legacy, details_addr, &details_host);
    row(
        "legacy-client",
        "details-v1 (pod IP)",
        &denied_legacy,
        "xuegod63 inbound: sa default",
    );
    table(
        2,
        &["client → server", "the client saw", "decided by"],
        &rows,
    );

    for (what, outcome) in [
        ("the idle connection to ratings-v1", &held_outcome),
        ("productpage-v1 → ratings-v1", &first),
        ("legacy-client → details-v1", &denied_legacy),
    ] {
        if !outcome.is_reset() {
            surprises.push(format!("{what}: {}, not a reset", outcome.describe()));
        }
    }
    if !matches!(&second, Outcome::ConnectFailed { error, .. } if error.raw_os_error() == Some(libc::EPERM))
    {
        surprises.push(format!(
            "productpage-v1 → ratings-v1 again: {}, not EPERM at connect()",
            second.describe()
        ));
    }
    for (what, outcome, pod) in [
        ("reviews-v1 → ratings", &allowed_ratings, "ratings-v1"),
        ("productpage-v1 → details", &allowed_details, "details-v1"),
    ] {
        if !matches!(outcome, Outcome::Answered(reply) if reply.pod == pod) {
            surprises.push(format!("{what}: {}", outcome.describe()));
        }
    }

    println!();
    println!(
        "  • productpage's principal, cluster.local/ns/default/sa/bookinfo-productpage, matches no"
    );
    println!(
        "    rule of ratings-viewer. xuegod63's agent asks ratings-v1's policies before dialling,"
    );
    println!(
        "    resets the client, and caches the denial in the kernel: the next connect() from that"
    );
    println!(
        "    pod to {ratings_addr} fails with EPERM in connect4, until the manifests next change."
    );
    println!(
        "    ratings-v1's own node stays authoritative: it closed the connection that was open."
    );
    println!(
        "  • legacy-client is not enrolled, so nothing judges it on its side; details-v1's node"
    );
    println!("    does, inbound. Its IP belongs to a known pod with service account default.");
    println!("  • In plaintext mode a peer's identity is that of the pod owning its source IP");
    println!("    (README: Security model); in the metrics principals stay \"unknown\".");

    // Denials as the agents count and log them.
    let mut counters = Vec::new();
    let mut fast_denied = Vec::new();
    let mut logged = Vec::new();
    let mut denials = BTreeMap::new();
    for (id, agent) in agents {
        let node = id.base_name();
        let metrics = agent.metrics()?;
        for sample in samples(&metrics).filter(|s| s.name == "weir_policy_denied_total") {
            let direction = sample.label("direction").to_owned();
            *denials.entry((node, direction.clone())).or_insert(0.0) += sample.value;
            counters.push(vec![
                node.to_owned(),
                format!(
                    "{{direction=\"{direction}\",policy=\"{}\"}}",
                    sample.label("policy")
                ),
                format!("{}", sample.value),
            ]);
        }
        let denied = metric_value(
            &metrics,
            "weir_decisions_total",
            &[("direction", "outbound"), ("decision", "denied")],
        )
        .unwrap_or(0.0);
        if denied > 0.0 {
            fast_denied.push(format!("{node} {denied}"));
        }
        if (*id == NodeId::Xuegod63) != (denied == 1.0) {
            surprises.push(format!(
                "{node}: weir_decisions_total{{direction=\"outbound\",decision=\"denied\"}} is {denied}"
            ));
        }
        for line in agent.log()?.lines().filter(|l| l.contains("denied")) {
            logged.push(format!("{node}: {}", shorten_log_line(line)));
        }
    }
    for (node, direction, expected) in [
        ("xuegod63", "outbound", 1.0),
        ("xuegod63", "inbound", 1.0),
        ("xuegod64", "inbound", 1.0),
        ("xuegod64", "outbound", 0.0),
    ] {
        let counted = denials
            .get(&(node, direction.to_owned()))
            .copied()
            .unwrap_or(0.0);
        if counted != expected {
            surprises.push(format!(
                "{node}: weir_policy_denied_total{{direction=\"{direction}\"}} is {counted}, not {expected}"
            ));
        }
    }
    println!();
    println!(
        "  weir_policy_denied_total (policy=\"none\": no ALLOW policy matched; a DENY policy is named):"
    );
    table(4, &["node", "labels", "count"], &counters);
    println!(
        "  weir_decisions_total{{direction=\"outbound\",decision=\"denied\"}} (the EPERM): {}",
        fast_denied.join(", ")
    );
    println!("  The agents' logs, lines with \"denied\":");
    for line in &logged {
        println!("    {line}");
    }

    // Removed: access comes back, the kernel's cached denial with it.
    sb.remove_manifest(POLICY_FILE)?;
    let removed = wait_until(SETTLE_TIMEOUT, || {
        for (_, agent) in agents {
            if !policies_known(agent)?.is_empty() {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    let Some(removed) = removed else {
        bail!("the agents still had policies {SETTLE_TIMEOUT:?} after {POLICY_FILE} went");
    };
    // Retried only if the model outruns the kernel's generation by a hair.
    let mut tries = 0;
    let mut answers = Vec::new();
    let restored = wait_until(SETTLE_TIMEOUT, || {
        tries += 1;
        answers.clear();
        for (client, addr, host) in [
            (productpage, ratings_addr, &ratings_host),
            (legacy, details_addr, &details_host),
        ] {
            let outcome = attempt(client, addr, host);
            answers.push(format!(
                "{} → {}: {}",
                client.name(),
                outcome_target(addr, pods),
                outcome.describe()
            ));
            if !matches!(outcome, Outcome::Answered(_)) {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    println!();
    println!(
        "  Then {POLICY_FILE} was removed; both agents had let it go {} ms later.",
        removed.as_millis()
    );
    if restored.is_some() {
        let retried = if tries > 1 {
            format!(" (after {tries} tries)")
        } else {
            String::new()
        };
        println!("  Access is back{retried}, the kernel's cached denial gone with the change:");
        for answer in &answers {
            println!("    {answer}");
        }
    } else {
        surprises.push(format!(
            "access did not come back within {SETTLE_TIMEOUT:?} of removing the policy: {}",
            answers.join("; ")
        ));
    }
    Ok(())
}

/// The pod at `addr`, by name.
fn outcome_target(addr: SocketAddr, pods: &BTreeMap<&str, Pod>) -> String {
    pods.iter()
        .find(|(_, pod)| pod.addr(PORT) == addr)
        .map_or_else(|| addr.to_string(), |(name, _)| name.to_string())
}

/// An agent log line without its timestamp and colours.
fn shorten_log_line(line: &str) -> String {
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... m
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let plain = plain.trim();
    // `2025-01-01T00:00:00.000000Z  WARN target: message`
    match plain.split_once(' ') {
        Some((first, rest)) if first.contains('T') && first.ends_with('Z') => {
            rest.trim_start().to_owned()
        }
        _ => plain.to_owned(),
    }
}

// ----------------------------------------------------------------------
// HTTP from inside a pod

/// How one request went.
enum Outcome {
    Answered(Reply),
    /// `connect()` itself failed, after `took`.
    ConnectFailed {
        error: io::Error,
        took: Duration,
    },
    /// Connected, then the exchange failed.
    Failed(anyhow::Error),
}

impl Outcome {
    fn io_error(&self) -> Option<&io::Error> {
        match self {
            Outcome::Answered(_) => None,
            Outcome::ConnectFailed { error, .. } => Some(error),
            Outcome::Failed(error) => error.chain().find_map(|e| e.downcast_ref::<io::Error>()),
        }
    }

    /// Whether the connection was reset, at connect() or after.
    fn is_reset(&self) -> bool {
        self.io_error()
            .is_some_and(|e| matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe))
    }

    fn describe(&self) -> String {
        let errno = |error: &io::Error| match error.raw_os_error() {
            Some(code) => format!("{:?}", nix::errno::Errno::from_raw(code)),
            None => error.to_string(),
        };
        match self {
            Outcome::Answered(reply) => format!("200 from {}", reply.pod),
            Outcome::ConnectFailed { error, .. } if self.is_reset() => {
                format!("reset at connect() ({})", errno(error))
            }
            Outcome::ConnectFailed { error, took } => format!(
                "connect(): {} in {:.2} ms",
                errno(error),
                took.as_secs_f64() * 1000.0
            ),
            Outcome::Failed(error) => match self.io_error() {
                Some(io) if self.is_reset() => format!("reset ({})", errno(io)),
                _ => format!("{error:#}"),
            },
        }
    }
}

/// `GET /` to `addr` from inside `pod`, with `Host: host`.
fn http_get(pod: &Pod, addr: SocketAddr, host: &str) -> Result<Reply> {
    match attempt(pod, addr, host) {
        Outcome::Answered(reply) => Ok(reply),
        Outcome::ConnectFailed { error, .. } => {
            Err(anyhow::Error::new(error).context(format!("cannot connect from {}", pod.name())))
        }
        Outcome::Failed(error) => Err(error),
    }
}

/// `GET /` to `addr` from inside `pod`, with `Host: host`, however it ends.
fn attempt(pod: &Pod, addr: SocketAddr, host: &str) -> Outcome {
    let started = Instant::now();
    let stream = match pod.connect(addr) {
        Ok(stream) => stream,
        Err(error) => {
            return Outcome::ConnectFailed {
                error,
                took: started.elapsed(),
            };
        }
    };
    match exchange(stream, host) {
        Ok(reply) => Outcome::Answered(reply),
        Err(error) => Outcome::Failed(error),
    }
}

fn exchange(mut stream: TcpStream, host: &str) -> Result<Reply> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    // A connection reset right after the handshake has no peer any more;
    // the reset itself is the socket's pending error.
    let gone = |stream: &TcpStream, error: io::Error| {
        let error = stream.take_error().ok().flatten().unwrap_or(error);
        anyhow::Error::new(error).context("the connection is gone")
    };
    let peer_addr = stream.peer_addr().map_err(|e| gone(&stream, e))?;
    let local_addr = stream.local_addr().map_err(|e| gone(&stream, e))?;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: weir-demo\r\nAccept: application/json\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .context("cannot send the request")?;
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
/// is enough (the Policy section's idle connection holds an app only until
/// the policy arrives).
fn serve(listener: TcpListener, app: &App, stop: &AtomicBool) {
    let deadline = Instant::now() + APP_LIFETIME;
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        match listener.accept() {
            Ok((stream, peer)) => match answer(stream, peer, app) {
                // The Policy section's idle connection, closed by the
                // agent when the policy arrives: expected, not news.
                Err(error) if error.kind() == ErrorKind::ConnectionReset => {}
                Err(error) => eprintln!("{}: {peer}: {error}", app.pod),
                Ok(()) => {}
            },
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

/// `[opened, closed, request bytes, response bytes]` per (reporter,
/// source, destination, service, response flags). Between two enrolled
/// pods both ends report every connection, so the reporter keeps them apart.
type Flows = BTreeMap<(String, String, String, String, String), [f64; 4]>;

const REPORTERS: [&str; 2] = ["source", "destination"];

/// weir's decisions, in the order they are explained.
const DECISIONS: [&str; 8] = [
    "redirected",
    "own_socket",
    "excluded",
    "denied",
    "not_enrolled",
    "fail_open",
    "fail_closed",
    "orig_dst_miss",
];

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
            label("reporter"),
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
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let metrics = loop {
            let metrics = agent.metrics()?;
            let open = flows(&metrics).values().any(|f| f[0] != f[1]);
            if !open || Instant::now() >= deadline {
                break metrics;
            }
            thread::sleep(Duration::from_millis(100));
        };
        println!("  {} (pid {})", id.base_name(), agent.pid());
        let flows = flows(&metrics);
        let mut rows = Vec::new();
        for reporter in REPORTERS {
            for ((by, source, destination, service, flags), [opened, closed, rx, tx]) in &flows {
                if by == reporter {
                    rows.push(vec![
                        by.clone(),
                        format!("{source} → {destination}"),
                        service.clone(),
                        format!("{opened}"),
                        format!("{closed}"),
                        format!("{rx}"),
                        format!("{tx}"),
                        flags.clone(),
                    ]);
                }
            }
        }
        if rows.is_empty() {
            println!("    no proxied connections.");
        } else {
            table(
                4,
                &[
                    "reported by",
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
        for (i, direction) in ["outbound", "inbound"].into_iter().enumerate() {
            let counts: Vec<String> = DECISIONS
                .iter()
                .filter_map(|decision| {
                    let n = metric_value(
                        &metrics,
                        "weir_decisions_total",
                        &[("direction", direction), ("decision", decision)],
                    )?;
                    (n > 0.0).then(|| format!("{decision} {n}"))
                })
                .collect();
            let counts = if counts.is_empty() {
                "none".to_owned()
            } else {
                counts.join(", ")
            };
            let name = if i == 0 { "weir_decisions_total" } else { "" };
            println!("    {name:<20}  {direction:<8}  {counts}");
        }
        println!();
    }
    println!(
        "  reported by   source: the client pod's agent, outbound; destination: the server pod's"
    );
    println!(
        "                agent, inbound. Between enrolled pods each connection is counted by both"
    );
    println!("                ends, on one node or two: do not add the two up.");
    println!(
        "  request B = istio_tcp_received_bytes_total, response B = istio_tcp_sent_bytes_total."
    );
    println!(
        "  service unknown: dialled by pod IP; the destination side names the endpoint's Service."
    );
    println!(
        "  DENY: refused by AuthorizationPolicy (the Policy section): opened, closed, no bytes."
    );
    println!("  weir_decisions_total is counted in the kernel by each node's programs:");
    println!(
        "    outbound, connect4/6 (both nodes' programs see every connect() in the sandbox's cgroup):"
    );
    println!(
        "      redirected    an enrolled pod's connect(), sent to the agent's listener in the pod"
    );
    println!(
        "      own_socket    the agent's own upstream connect(), from inside the pod, let through"
    );
    println!("      denied        refused with EPERM: a policy denial cached in the kernel");
    println!(
        "      not_enrolled  everything else: legacy-client, the demo's scrapes, the other node's"
    );
    println!("                    pods");
    println!("    inbound, sk_lookup (in each enrolled pod's namespace):");
    println!("      redirected    a connection to the pod, handed to the agent's 127.0.0.1:15006");
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
    let manifests = sb.manifests_dir().display();
    // A copy beside the manifests, not in force.
    let policy = sb.dir().join(POLICY_FILE);
    std::fs::write(&policy, POLICY_YAML)
        .with_context(|| format!("cannot write {}", policy.display()))?;
    let policy = policy.display();
    // (command, comment, whether to run it here first)
    let lines = [
        (
            format!(
                "inpod productpage-v1 curl -s -H 'Host: reviews.{NAMESPACE}.svc.cluster.local:{PORT}' http://{reviews}:{PORT}/"
            ),
            "reviews by ClusterIP; repeat for round robin. peer: the inbound proxy",
            true,
        ),
        (
            format!("inpod productpage-v1 curl -s http://{ratings}:{PORT}/"),
            "ratings-v1 by pod IP, across nodes",
            true,
        ),
        (
            format!("inpod legacy-client curl -s http://{details}:{PORT}/"),
            "not enrolled: its end is direct; details-v1's node still takes it inbound",
            true,
        ),
        (
            format!("inpod legacy-client curl -sS http://{reviews}:{PORT}/"),
            "fails at once: no kube-proxy for pods that are not enrolled",
            false,
        ),
        (
            format!("cp {policy} {manifests}/"),
            "the Policy section's policies again: the ratings-v1 curl is reset, then refused at once\n      # (EPERM: curl says (7)); legacy-client's is reset",
            false,
        ),
        (
            format!("rm {manifests}/{POLICY_FILE}"),
            "and gone again",
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
