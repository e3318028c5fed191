//! `weir-bench [--quick]`, run by `cargo xtask bench`: measures weir against
//! the direct path in one two-node sandbox, and writes the results to
//! `bench/results/`. See bench/README.md for what each number means.
//!
//! One sandbox holds every scenario at once, so that rounds interleave
//! without restarting anything: both agents run, and each scenario has its
//! own client and server pods, enrolled or not by the `weir.dev/mesh` label.
//! Clients are on xuegod63, except the iptables scenario's, on xuegod64,
//! whose agent runs with `--interception iptables` (the mode is node-wide);
//! servers are on the client's node (same node) or the other (cross node).
//! The load generator and the servers are threads of this
//! process; the sockets they make inside the pods go through the sandbox's
//! eBPF programs, since `Sandbox::new` moved this process into the
//! sandbox's pods cgroup.

#[path = "bench/load.rs"]
mod load;
#[path = "bench/meter.rs"]
mod meter;
#[path = "bench/probe.rs"]
mod probe;
#[path = "bench/report.rs"]
mod report;
#[path = "bench/server.rs"]
mod server;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use weir_sandbox::{Agent, NodeId, Pod, PodSpec, Sandbox, SandboxOptions, metric_value};

use crate::load::{Expect, Meters, Window};
use crate::meter::{nofile_limit, open_fds, rss_bytes, slab_bytes};
use crate::probe::Probe;
use crate::report::{ConnectCost, Memory, Report, Run};
use crate::server::{ECHO_PORT, HTTP_PORT, SINK_PORT, Server};

/// Agent log lines shown when a measurement fails.
const LOG_TAIL: usize = 20;
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const ENROLL_TIMEOUT: Duration = Duration::from_secs(15);
/// Concurrency of the connection-per-request workload.
const CONNECTION_WORKERS: usize = 16;
/// Idle proxied connections for the memory figure, if the descriptor
/// limits allow (see `idle_memory`), the first batch to calibrate.
const IDLE_CONNECTIONS: usize = 10_000;
const IDLE_CALIBRATION: usize = 200;
const IDLE_OPENERS: usize = 32;
const IDLE_DEADLINE: Duration = Duration::from_secs(60);
/// The connect probe's listener, inside the probe pod.
const PROBE_PORT: u16 = 9100;
/// Descriptors: 10k idle connections cost this process two each (client
/// and server end) and the agent two each; the agents inherit the limit.
const NOFILE: u64 = 65_536;
/// Descriptors kept free for everything but the idle connections.
const NOFILE_RESERVE: u64 = 1_000;

/// Set by SIGINT or SIGTERM: the run stops after the current measurement
/// and the sandbox is torn down.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Placement {
    SameNode,
    CrossNode,
}

impl Placement {
    pub const ALL: [Placement; 2] = [Placement::SameNode, Placement::CrossNode];

    pub fn label(self) -> &'static str {
        match self {
            Placement::SameNode => "same node",
            Placement::CrossNode => "cross node",
        }
    }

    /// The server's node, for a client on `client`.
    fn server_node(self, client: NodeId) -> NodeId {
        match (self, client) {
            (Placement::SameNode, node) => node,
            (Placement::CrossNode, NodeId::Xuegod63) => NodeId::Xuegod64,
            (Placement::CrossNode, NodeId::Xuegod64) => NodeId::Xuegod63,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Neither pod enrolled: the kernel's path, the physical limit here.
    Direct,
    /// The client enrolled: connect4 redirect and the outbound proxy.
    L4,
    /// Both enrolled: outbound proxy, then sk_lookup and the inbound proxy.
    L4Both,
    /// The client enrolled on xuegod64, whose agent runs with
    /// `--interception iptables`: a REDIRECT in the pod's nat table feeds
    /// the same outbound proxy. The server is not enrolled.
    Iptables,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Direct, Mode::L4, Mode::L4Both, Mode::Iptables];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::L4 => "weir L4",
            Mode::L4Both => "weir L4 both ends",
            Mode::Iptables => "iptables",
        }
    }

    /// connect4 sends the client's connections to the agent's loopback
    /// listener (under iptables NAT the client's socket keeps its own
    /// addresses; `run_one` checks the agent's metrics instead).
    fn connect4_redirected(self) -> bool {
        matches!(self, Mode::L4 | Mode::L4Both)
    }

    fn client_node(self) -> NodeId {
        match self {
            Mode::Iptables => NodeId::Xuegod64,
            _ => NodeId::Xuegod63,
        }
    }

    fn server_enrolled(self) -> bool {
        self == Mode::L4Both
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Workload {
    Rr1,
    Rr16,
    Bulk,
    Connections,
}

impl Workload {
    pub const ALL: [Workload; 4] = [
        Workload::Rr1,
        Workload::Rr16,
        Workload::Bulk,
        Workload::Connections,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Workload::Rr1 => "req/resp c=1",
            Workload::Rr16 => "req/resp c=16",
            Workload::Bulk => "bulk",
            Workload::Connections => "new conn",
        }
    }
}

/// The HTTP scenarios: 1 KiB answers to GETs on 16 kept-alive connections,
/// from the client pods to the servers' HTTP port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HttpMode {
    /// From the plain client to the server pod's address: no mesh.
    Direct,
    /// From the enrolled client to the server pod's address: the outbound
    /// proxy copies the bytes at L4.
    L4,
    /// From the enrolled client to the server's Service, whose port is
    /// named `http`: the outbound proxy serves each request with hyper and
    /// routes it (weir L7).
    L7,
}

impl HttpMode {
    pub const ALL: [HttpMode; 3] = [HttpMode::Direct, HttpMode::L4, HttpMode::L7];

    pub fn label(self) -> &'static str {
        match self {
            HttpMode::Direct => "direct",
            HttpMode::L4 => "weir L4",
            HttpMode::L7 => "weir L7",
        }
    }
}

/// The Host header of the HTTP scenarios' requests.
const HTTP_HOST: &str = "bench-http";
const HTTP_CONNECTIONS: usize = 16;

/// How long and how often; `--quick` shortens everything.
#[derive(Clone, Debug)]
pub struct Settings {
    pub quick: bool,
    pub rounds: usize,
    pub request_response: Window,
    pub connections: Window,
    pub bulk: Duration,
    pub probe_rounds: usize,
    pub probe_time: Duration,
    pub probe_count: u64,
}

impl Settings {
    fn new(quick: bool) -> Settings {
        if quick {
            Settings {
                quick,
                rounds: 3,
                request_response: Window {
                    warmup: Duration::from_millis(200),
                    measure: Duration::from_secs(1),
                },
                connections: Window {
                    warmup: Duration::from_millis(200),
                    measure: Duration::from_secs(1),
                },
                bulk: Duration::from_secs(2),
                probe_rounds: 8,
                probe_time: Duration::from_millis(300),
                probe_count: 100_000,
            }
        } else {
            Settings {
                quick,
                rounds: 5,
                request_response: Window {
                    warmup: Duration::from_millis(300),
                    measure: Duration::from_secs(3),
                },
                connections: Window {
                    warmup: Duration::from_millis(300),
                    measure: Duration::from_secs(2),
                },
                bulk: Duration::from_secs(10),
                probe_rounds: 15,
                probe_time: Duration::from_millis(600),
                probe_count: 500_000,
            }
        }
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(probe::FLAG) {
        return probe::serve();
    }
    let mut quick = false;
    for arg in &args {
        match arg.as_str() {
            "--quick" => quick = true,
            "-h" | "--help" => {
                println!("usage: weir-bench [--quick]   (as root; see bench/README.md)");
                return Ok(());
            }
            other => bail!("unknown argument {other:?}; usage: weir-bench [--quick]"),
        }
    }
    let settings = Settings::new(quick);
    catch_interrupts()?;
    raise_nofile()?;
    let facts = report::Facts::collect();
    let started = Instant::now();
    let measured = measure(&settings)?;
    let report = Report {
        settings,
        facts: facts.finish(started.elapsed()),
        results: measured.results,
        http: measured.http,
        connect: measured.connect,
        memory: measured.memory,
    };
    let (markdown, svg) = (report.markdown(), report.svg());
    let (md_path, svg_path) = report::save(&report.facts, &markdown, &svg)?;
    println!("\n{markdown}");
    println!("saved {} and {}", md_path.display(), svg_path.display());
    Ok(())
}

struct Measured {
    results: BTreeMap<(Placement, Mode, Workload), Vec<Run>>,
    http: BTreeMap<(Placement, HttpMode), Vec<Run>>,
    connect: ConnectCost,
    memory: Memory,
}

/// The pods of one sandbox, by role.
struct Pods {
    client_plain: Pod,
    client_mesh: Pod,
    /// Enrolled, on xuegod64, whose agent intercepts with iptables.
    client_iptables: Pod,
    /// Per node: (not enrolled, enrolled).
    servers: BTreeMap<NodeId, (Pod, Pod)>,
    /// Per node: the ClusterIP of the Service of its plain server, with an
    /// HTTP port.
    http_services: BTreeMap<NodeId, Ipv4Addr>,
    probe: Pod,
}

impl Pods {
    fn client(&self, mode: Mode) -> &Pod {
        match mode {
            Mode::Direct => &self.client_plain,
            Mode::L4 | Mode::L4Both => &self.client_mesh,
            Mode::Iptables => &self.client_iptables,
        }
    }

    fn server(&self, placement: Placement, mode: Mode) -> &Pod {
        let (plain, mesh) = &self.servers[&placement.server_node(mode.client_node())];
        if mode.server_enrolled() { mesh } else { plain }
    }
}

/// Builds the sandbox, measures everything, and tears it down (also on
/// error: every handle's Drop cleans up, in reverse order of creation).
fn measure(settings: &Settings) -> Result<Measured> {
    // Started before the sandbox exists, so it stays outside its cgroup.
    let mut probe_outside = Probe::spawn()?;
    let mut sandbox = Sandbox::new(SandboxOptions::for_test("bench"))?;
    eprintln!("weir-bench: sandbox in {}", sandbox.dir().display());
    // Started after `Sandbox::new`, so it is in the sandbox's pods cgroup.
    let mut probe_inside = Probe::spawn()?;

    let pods = add_pods(&mut sandbox)?;
    let mut servers = BTreeMap::new();
    for (plain, mesh) in pods.servers.values() {
        for pod in [plain, mesh] {
            servers.insert(pod.name().to_owned(), Server::start(pod)?);
        }
    }

    // First one agent: the connect() cost is measured on a node where one
    // agent's programs are attached, as in a cluster. (Both of the
    // sandbox's agents attach to the same cgroup, so with two running a
    // socket passes two sets of programs.)
    let agent63 = start_agent(&mut sandbox, NodeId::Xuegod63, &[])?;
    wait_enrolled(&agent63, 2)?;
    let connect = connect_cost(settings, &pods.probe, &mut probe_outside, &mut probe_inside)?;
    drop(probe_inside);

    // xuegod64's agent intercepts with iptables, for the iptables
    // scenario's client there (and writes no pod into connect4's map).
    let agent64 = start_agent(
        &mut sandbox,
        NodeId::Xuegod64,
        &["--interception", "iptables"],
    )?;
    wait_enrolled(&agent64, 2)?;
    check_nat_redirect(&pods.client_iptables)?;
    let meters = Meters {
        agent_pids: vec![agent63.pid(), agent64.pid()],
    };
    let mut memory = Memory {
        idle_at_start: vec![
            (
                sandbox.node(NodeId::Xuegod63).name().to_owned(),
                rss_bytes(agent63.pid())?,
            ),
            (
                sandbox.node(NodeId::Xuegod64).name().to_owned(),
                rss_bytes(agent64.pid())?,
            ),
        ],
        ..Memory::default()
    };

    let agents = [&agent63, &agent64];
    let results = with_logs(
        &agents,
        rounds(settings, &pods, &servers, &meters, &agent64),
    )?;

    let http = with_logs(&agents, http_rounds(settings, &pods, &meters, &agent63))?;

    memory.idle_after_load = rss_bytes(agent63.pid())?;
    with_logs(&agents, idle_memory(&pods, &agent63, &mut memory))?;
    // Agents first, so that they do not see the sandbox go from under them.
    drop(agent64);
    drop(agent63);
    drop(servers);
    drop(sandbox);
    Ok(Measured {
        results,
        http,
        connect,
        memory,
    })
}

fn add_pods(sandbox: &mut Sandbox) -> Result<Pods> {
    let mut add = |name: &str, node: NodeId, enrolled: bool| -> Result<Pod> {
        let mesh = if enrolled { "enabled" } else { "disabled" };
        let pod = sandbox.add_pod(
            PodSpec::new(name, node)
                .label("app", name)
                .label("weir.dev/mesh", mesh)
                .ports(&[("http", ECHO_PORT), ("sink", SINK_PORT)]),
        )?;
        tune_pod(&pod)?;
        Ok(pod)
    };
    let client_plain = add("client-plain", NodeId::Xuegod63, false)?;
    let client_mesh = add("client-mesh", NodeId::Xuegod63, true)?;
    let client_iptables = add("client-iptables", NodeId::Xuegod64, true)?;
    let probe = add("probe", NodeId::Xuegod63, false)?;
    let mut servers = BTreeMap::new();
    for node in NodeId::ALL {
        let n = node.number();
        servers.insert(
            node,
            (
                add(&format!("server-plain-{n}"), node, false)?,
                add(&format!("server-mesh-{n}"), node, true)?,
            ),
        );
    }
    let mut http_services = BTreeMap::new();
    for (node, (plain, _)) in &servers {
        let n = node.number();
        let cluster_ip = sandbox.addressing().service_ip(u16::from(n));
        sandbox.add_http_service(
            &format!("{HTTP_HOST}-{n}"),
            "default",
            cluster_ip,
            HTTP_PORT,
            HTTP_PORT,
            &[("app", plain.name())],
        )?;
        http_services.insert(*node, cluster_ip);
    }
    Ok(Pods {
        client_plain,
        client_mesh,
        client_iptables,
        servers,
        http_services,
        probe,
    })
}

/// Inside the pod only: a wide ephemeral port range, and reuse of
/// TIME_WAIT ports for new outgoing connections, so that the
/// connection-per-request workload (tens of thousands a second, whose
/// closes leave TIME_WAIT behind in the client pod and, through the
/// proxies, in the server pod) does not run out of ports.
fn tune_pod(pod: &Pod) -> Result<()> {
    pod.netns()
        .run(|| -> std::io::Result<()> {
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "10000 65000")?;
            std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
            Ok(())
        })?
        .with_context(|| format!("cannot set sysctls in pod {}", pod.name()))
}

fn start_agent(sandbox: &mut Sandbox, node: NodeId, args: &[&str]) -> Result<Agent> {
    let agent = sandbox.start_agent(node, args)?;
    agent.wait_ready(READY_TIMEOUT)?;
    eprintln!(
        "weir-bench: agent for {} ready (pid {}, log {}){}",
        sandbox.node(node).name(),
        agent.pid(),
        agent.log_path().display(),
        if args.is_empty() {
            String::new()
        } else {
            format!(", {}", args.join(" "))
        }
    );
    Ok(agent)
}

fn wait_enrolled(agent: &Agent, pods: usize) -> Result<()> {
    let deadline = Instant::now() + ENROLL_TIMEOUT;
    loop {
        let metrics = agent.metrics()?;
        let enrolled = metric_value(&metrics, "weir_enrolled_pods", &[]).unwrap_or(0.0);
        if enrolled as usize == pods {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("agent {} enrolled {enrolled} pods, not {pods}", agent.pid());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The agent has put the REDIRECT into the pod's nat table.
fn check_nat_redirect(pod: &Pod) -> Result<()> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", pod.netns().path().display()))
        .args(["iptables-save", "-t", "nat"])
        .output()
        .context("cannot run iptables-save")?;
    let rules = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !rules.contains("REDIRECT --to-ports") {
        bail!(
            "no REDIRECT in pod {}'s nat table: {rules}{}",
            pod.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Counters of the iptables agent that tell whether a connection went
/// through it: proxied connections from the iptables client, and
/// connect4's outbound redirects, which must stay at zero.
fn iptables_counters(agent: &Agent) -> Result<(f64, f64)> {
    let metrics = agent.metrics()?;
    let opened = metric_value(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("source_workload", "client-iptables"),
        ],
    )
    .unwrap_or(0.0);
    let redirected = metric_value(
        &metrics,
        "weir_decisions_total",
        &[("direction", "outbound"), ("decision", "redirected")],
    )
    .unwrap_or(0.0);
    Ok((opened, redirected))
}

/// Alternates the two probes, each connecting in the same pod.
fn connect_cost(
    settings: &Settings,
    pod: &Pod,
    outside: &mut Probe,
    inside: &mut Probe,
) -> Result<ConnectCost> {
    let netns = pod.netns().path().to_owned();
    let addr = pod.addr(PROBE_PORT);
    let mut cost = ConnectCost::default();
    // A short unrecorded run each, to warm caches and the code paths.
    for probe in [&mut *outside, &mut *inside] {
        probe.run(&netns, addr, 2_000, Duration::from_millis(200))?;
    }
    for round in 0..settings.probe_rounds {
        check_interrupted()?;
        let mut order = [(false, &mut *outside), (true, &mut *inside)];
        if round % 2 == 1 {
            order.reverse();
        }
        for (attached, probe) in order {
            let result = probe.run(&netns, addr, settings.probe_count, settings.probe_time)?;
            eprintln!(
                "[connect {}/{}] {:<16} {:>9.0} conn/s ({} connections)  connect() p50 {:.1} µs",
                round + 1,
                settings.probe_rounds,
                if attached {
                    "weir attached"
                } else {
                    "no weir program"
                },
                result.per_second,
                result.connections,
                result.connect_p50_ns / 1e3
            );
            if attached {
                cost.with_weir.push(result);
            } else {
                cost.without.push(result);
            }
        }
    }
    Ok(cost)
}

/// Every workload, placement and mode, round after round; the order of
/// the modes rotates each round.
fn rounds(
    settings: &Settings,
    pods: &Pods,
    servers: &BTreeMap<String, Server>,
    meters: &Meters,
    iptables_agent: &Agent,
) -> Result<BTreeMap<(Placement, Mode, Workload), Vec<Run>>> {
    let mut results: BTreeMap<_, Vec<Run>> = BTreeMap::new();
    for round in 0..settings.rounds {
        for workload in Workload::ALL {
            for placement in Placement::ALL {
                let mut modes = Mode::ALL;
                modes.rotate_left(round % Mode::ALL.len());
                for mode in modes {
                    check_interrupted()?;
                    let client = pods.client(mode);
                    let server_pod = pods.server(placement, mode);
                    let server = &servers[server_pod.name()];
                    let run = run_one(
                        settings,
                        workload,
                        mode,
                        (client, server_pod, server),
                        meters,
                        iptables_agent,
                    )
                    .with_context(|| {
                        format!(
                            "{} {} {}, round {}",
                            workload.label(),
                            placement.label(),
                            mode.label(),
                            round + 1
                        )
                    })?;
                    eprintln!(
                        "[round {}/{}] {:<14} {:<10} {:<18} {}",
                        round + 1,
                        settings.rounds,
                        workload.label(),
                        placement.label(),
                        mode.label(),
                        run.describe(workload)
                    );
                    results
                        .entry((placement, mode, workload))
                        .or_default()
                        .push(run);
                }
            }
        }
    }
    Ok(results)
}

fn run_one(
    settings: &Settings,
    workload: Workload,
    mode: Mode,
    (client, server_pod, server): (&Pod, &Pod, &Server),
    meters: &Meters,
    iptables_agent: &Agent,
) -> Result<Run> {
    let expect = Expect {
        redirected: mode.connect4_redirected(),
    };
    let echo = server_pod.addr(ECHO_PORT);
    let before = server.accepted().read();
    let counters_before = iptables_counters(iptables_agent)?;
    let run = match workload {
        Workload::Rr1 | Workload::Rr16 => {
            let connections = if workload == Workload::Rr1 { 1 } else { 16 };
            let window = settings.request_response;
            let measured = load::in_pod(client, || {
                load::request_response(echo, connections, window, meters, expect)
            })?;
            Run::from_measured(&measured)
        }
        Workload::Connections => {
            let window = settings.connections;
            let measured = load::in_pod(client, || {
                load::connection_rate(echo, CONNECTION_WORKERS, window, meters, expect)
            })?;
            Run::from_measured(&measured)
        }
        Workload::Bulk => {
            let sink = server_pod.addr(SINK_PORT);
            let duration = settings.bulk;
            let bulk = load::in_pod(client, || load::bulk(sink, duration, meters, expect))?;
            Run::from_bulk(&bulk)
        }
    };
    let mut after = server.accepted().read();
    let counters_after = iptables_counters(iptables_agent)?;
    if counters_after.1 != 0.0 {
        bail!(
            "xuegod64's agent (iptables interception) counted {} connect4 redirects",
            counters_after.1
        );
    }
    let mut opened = counters_after.0 - counters_before.0;
    if mode == Mode::Iptables {
        // Under NAT the client's socket has its own addresses, so the
        // agent's count of proxied connections from the client says that
        // each went through the proxy. It counts asynchronously: a short,
        // bounded wait for it to agree with what the server accepted.
        let deadline = Instant::now() + Duration::from_secs(3);
        while opened as u64 != after.0 - before.0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            after = server.accepted().read();
            opened = iptables_counters(iptables_agent)?.0 - counters_before.0;
        }
        if opened as u64 != after.0 - before.0 {
            bail!(
                "xuegod64's agent proxied {opened} connections from client-iptables, the server accepted {}",
                after.0 - before.0
            );
        }
    } else if opened != 0.0 {
        bail!(
            "xuegod64's agent proxied {opened} connections from client-iptables in another scenario"
        );
    }
    let (total, via_weir) = (after.0 - before.0, after.1 - before.1);
    if total == 0 {
        bail!("the server accepted no connection");
    }
    if mode.server_enrolled() && via_weir != total {
        bail!("{via_weir} of {total} connections came through weir's inbound proxy, not all");
    }
    if !mode.server_enrolled() && via_weir != 0 {
        bail!("{via_weir} of {total} connections came through weir's inbound proxy, none should");
    }
    Ok(run)
}

/// The HTTP scenarios, round after round, the order of the modes rotating
/// each round, from xuegod63's clients to each node's plain server.
fn http_rounds(
    settings: &Settings,
    pods: &Pods,
    meters: &Meters,
    agent: &Agent,
) -> Result<BTreeMap<(Placement, HttpMode), Vec<Run>>> {
    let mut results: BTreeMap<_, Vec<Run>> = BTreeMap::new();
    for round in 0..settings.rounds {
        for placement in Placement::ALL {
            let node = placement.server_node(NodeId::Xuegod63);
            let mut modes = HttpMode::ALL;
            modes.rotate_left(round % HttpMode::ALL.len());
            for mode in modes {
                check_interrupted()?;
                let run =
                    http_run(settings, pods, meters, agent, mode, node).with_context(|| {
                        format!(
                            "HTTP {} {}, round {}",
                            placement.label(),
                            mode.label(),
                            round + 1
                        )
                    })?;
                eprintln!(
                    "[round {}/{}] {:<14} {:<10} {:<18} {}",
                    round + 1,
                    settings.rounds,
                    "http c=16",
                    placement.label(),
                    mode.label(),
                    run.describe(Workload::Rr16)
                );
                results.entry((placement, mode)).or_default().push(run);
            }
        }
    }
    Ok(results)
}

/// One HTTP measurement; for L7, also checks that the agent served the
/// requests as HTTP.
fn http_run(
    settings: &Settings,
    pods: &Pods,
    meters: &Meters,
    agent: &Agent,
    mode: HttpMode,
    server_node: NodeId,
) -> Result<Run> {
    let (client, target) = match mode {
        HttpMode::Direct => (
            &pods.client_plain,
            pods.servers[&server_node].0.addr(HTTP_PORT),
        ),
        HttpMode::L4 => (
            &pods.client_mesh,
            pods.servers[&server_node].0.addr(HTTP_PORT),
        ),
        HttpMode::L7 => (
            &pods.client_mesh,
            SocketAddr::from((pods.http_services[&server_node], HTTP_PORT)),
        ),
    };
    let expect = Expect {
        redirected: mode != HttpMode::Direct,
    };
    let served = || -> Result<f64> {
        let metrics = agent.metrics()?;
        let labels = [("reporter", "source"), ("source_workload", "client-mesh")];
        Ok(metric_value(&metrics, "istio_requests_total", &labels).unwrap_or(0.0))
    };
    let before = served()?;
    let window = settings.request_response;
    let measured = load::in_pod(client, || {
        load::http_request_response(target, HTTP_HOST, HTTP_CONNECTIONS, window, meters, expect)
    })?;
    let requests = served()? - before;
    match mode {
        HttpMode::L7 if requests < measured.count as f64 => bail!(
            "the agent counted {requests} HTTP requests, the client completed {}",
            measured.count
        ),
        HttpMode::Direct | HttpMode::L4 if requests != 0.0 => {
            bail!("the agent counted {requests} HTTP requests on a path it should not parse")
        }
        _ => Ok(Run::from_measured(&measured)),
    }
}

/// The agent on xuegod63 with up to 10k idle proxied connections (outbound
/// only: enrolled client, server not enrolled, same node), then after they
/// close. A first batch tells how many descriptors a connection costs the
/// agent; the rest is as many as fit under its and this process's
/// RLIMIT_NOFILE.
fn idle_memory(pods: &Pods, agent: &Agent, memory: &mut Memory) -> Result<()> {
    check_interrupted()?;
    let server: SocketAddr = pods.servers[&NodeId::Xuegod63].0.addr(ECHO_PORT);
    let pid = agent.pid();
    let before = rss_bytes(pid)?;
    let slab_before = slab_bytes()?;
    let fds_before = open_fds(pid)?;
    let mut fds_per_connection = 0.0;
    let mut limited_by = None;
    let plan = || -> Result<usize> {
        let fds_now = open_fds(pid)?;
        fds_per_connection = fds_now.saturating_sub(fds_before) as f64 / IDLE_CALIBRATION as f64;
        let per = fds_per_connection.ceil().max(1.0) as u64;
        let agent_limit = nofile_limit(pid)?;
        let agent_room = agent_limit.saturating_sub(fds_now as u64 + NOFILE_RESERVE) / per;
        let own_limit = nofile_limit(std::process::id())?;
        let own_fds = open_fds(std::process::id())? as u64;
        // A client and a server end each.
        let own_room = own_limit.saturating_sub(own_fds + NOFILE_RESERVE) / 2;
        let wanted = (IDLE_CONNECTIONS - IDLE_CALIBRATION) as u64;
        let more = wanted.min(agent_room).min(own_room);
        if more < wanted {
            limited_by = Some(if agent_room <= own_room {
                format!(
                    "the agent's RLIMIT_NOFILE ({agent_limit}) at {fds_per_connection:.1} descriptors per proxied connection"
                )
            } else {
                format!(
                    "this process's RLIMIT_NOFILE ({own_limit}), two descriptors per connection"
                )
            });
        }
        Ok(more as usize)
    };
    let (count, with_open, slab_with) = load::in_pod(&pods.client_mesh, || {
        load::idle_connections(
            server,
            IDLE_CALIBRATION,
            IDLE_OPENERS,
            IDLE_DEADLINE,
            Expect { redirected: true },
            plan,
            |count| Ok((count, rss_bytes(pid)?, slab_bytes()?)),
        )
    })?;
    // The proxy notices the closes asynchronously.
    std::thread::sleep(Duration::from_secs(2));
    memory.before_idle_connections = before;
    memory.with_idle_connections = with_open;
    memory.slab_before = slab_before;
    memory.slab_with = slab_with;
    memory.after_idle_connections = rss_bytes(pid)?;
    memory.idle_connections = count;
    memory.fds_per_connection = fds_per_connection;
    memory.limited_by = limited_by;
    let metrics = agent.metrics()?;
    let source = [("reporter", "source")];
    let opened = metric_value(&metrics, "istio_tcp_connections_opened_total", &source);
    let closed = metric_value(&metrics, "istio_tcp_connections_closed_total", &source);
    memory.still_open = opened.zip(closed).map(|(o, c)| (o - c).max(0.0) as u64);
    eprintln!(
        "[memory] agent RSS {:.1} MiB before, {:.1} MiB with {count} idle proxied connections \
         ({fds_per_connection:.1} descriptors each), {:.1} MiB after they closed",
        before as f64 / 1048576.0,
        with_open as f64 / 1048576.0,
        memory.after_idle_connections as f64 / 1048576.0
    );
    Ok(())
}

/// On error, prints the end of each agent's log, which the sandbox removes
/// when it goes.
fn with_logs<T>(agents: &[&Agent], result: Result<T>) -> Result<T> {
    if result.is_err() {
        for agent in agents {
            let log = agent.log().unwrap_or_else(|e| format!("{e:#}"));
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "weir-bench: last lines of {}:\n{}",
                agent.log_path().display(),
                lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
            );
        }
    }
    result
}

/// Lets this process hold the descriptors of the idle connections, and the
/// agents (which inherit the limit) theirs. Raising the hard limit needs
/// CAP_SYS_RESOURCE; without it the soft limit goes up to the hard one, and
/// the idle-connection figure uses fewer connections.
fn raise_nofile() -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= NOFILE || setrlimit(Resource::RLIMIT_NOFILE, NOFILE, hard.max(NOFILE)).is_ok() {
        return Ok(());
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("cannot raise RLIMIT_NOFILE")
}

fn catch_interrupts() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    extern "C" fn interrupted(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::Relaxed);
    }
    let action = SigAction::new(
        SigHandler::Handler(interrupted),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(signal, &action) }?;
    }
    Ok(())
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::Relaxed) {
        bail!("interrupted; tearing the sandbox down");
    }
    Ok(())
}
