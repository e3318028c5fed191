//! Outbound interception end to end: real agents, real eBPF programs, real
//! sockets in a two-node network-namespace sandbox.
//!
//! Servers run in pods that are not enrolled, so only the client side is
//! meshed. A redirected client socket is recognisable from the app itself:
//! it connected to 127.0.0.1:15001, so its local address is 127.0.0.1, while
//! getpeername() still reports the original destination.

mod common;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::thread;
use std::time::Duration;

use common::{
    ECHO, IO_TIMEOUT, STREAM, decisions, echo, echo_in_order, meshed, metric, promtool_check,
    redirected, serve_echo, wait_until,
};
use weir_sandbox::{Agent, NodeId, Pod, PodSpec, Sandbox, SandboxOptions, metric_value};

struct Mesh {
    sb: Sandbox,
    agent: Agent,
    /// Enrolled, on xuegod63.
    client: Pod,
    /// Opted out, on xuegod63.
    legacy: Pod,
    /// Not enrolled, on xuegod64: across the switch from the clients.
    server: Pod,
    /// Not enrolled, on xuegod63: on the clients' node.
    neighbour: Pod,
}

fn mesh(test: &str) -> Mesh {
    mesh_with(test, &[])
}

fn mesh_with(test: &str, agent_args: &[&str]) -> Mesh {
    let mut sb = Sandbox::new(SandboxOptions::for_test(test)).unwrap();
    let client = sb.add_pod(meshed("client", NodeId::Xuegod63)).unwrap();
    let legacy = sb
        .add_pod(PodSpec::new("legacy", NodeId::Xuegod63).label("weir.dev/mesh", "disabled"))
        .unwrap();
    let server = sb.add_pod(server_spec("server", NodeId::Xuegod64)).unwrap();
    let neighbour = sb
        .add_pod(server_spec("neighbour", NodeId::Xuegod63))
        .unwrap();
    for pod in [&server, &neighbour] {
        serve_echo(pod);
    }
    let agent = sb.start_agent(NodeId::Xuegod63, agent_args).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    Mesh {
        sb,
        agent,
        client,
        legacy,
        server,
        neighbour,
    }
}

fn server_spec(name: &str, node: NodeId) -> PodSpec {
    PodSpec::new(name, node)
        .label("app", name)
        .ports(&[("echo", ECHO), ("stream", STREAM)])
}

#[test]
fn enrolled_pod_is_redirected_and_others_are_not() {
    let m = mesh("redirect");
    let target = m.server.addr(ECHO);

    let mut stream = m.client.connect(target).unwrap();
    assert!(
        redirected(&stream),
        "enrolled pod went direct: {:?}",
        stream.local_addr()
    );
    let seen = echo(&mut stream, b"from the mesh").unwrap().peer;
    assert_eq!(
        seen.ip(),
        IpAddr::V4(m.client.ip()),
        "server must see the pod's own IP"
    );

    let mut stream = m.legacy.connect(target).unwrap();
    assert!(!redirected(&stream), "opted-out pod was redirected");
    assert_eq!(
        echo(&mut stream, b"around it").unwrap().peer.ip(),
        IpAddr::V4(m.legacy.ip())
    );

    let opened = |source| {
        metric(
            &m.agent,
            "istio_tcp_connections_opened_total",
            &[
                ("source_workload", source),
                ("destination_workload", "server"),
            ],
        )
    };
    assert_eq!(opened("client"), 1.0, "{}", m.agent.metrics().unwrap());
    assert_eq!(opened("legacy"), 0.0);
    assert_eq!(decisions(&m.agent, "redirected"), 1.0);
    assert!(decisions(&m.agent, "not_enrolled") >= 1.0);
    // The proxy's own upstream connect went through connect4 and was let be.
    assert!(decisions(&m.agent, "own_socket") >= 1.0);
}

#[test]
fn getpeername_returns_the_original_destination() {
    let m = mesh("getpeername");
    for target in [m.server.addr(ECHO), m.neighbour.addr(ECHO)] {
        let stream = m.client.connect(target).unwrap();
        assert!(redirected(&stream));
        assert_eq!(stream.peer_addr().unwrap(), target);
    }
}

#[test]
fn dual_stack_client_to_ipv4_mapped_address_is_redirected() {
    let m = mesh("mapped");
    let target = SocketAddrV4::new(m.server.ip(), ECHO);
    let mut stream = m.client.connect_v6(target).unwrap();
    assert!(
        redirected(&stream),
        "mapped connect went direct: {:?}",
        stream.local_addr()
    );
    let peer = stream.peer_addr().unwrap();
    assert_eq!(peer.ip().to_canonical(), IpAddr::V4(m.server.ip()));
    assert!(peer.is_ipv6(), "the app must see its own address family");
    assert_eq!(
        echo(&mut stream, b"v6 socket").unwrap().peer.ip(),
        IpAddr::V4(m.client.ip())
    );
}

#[test]
fn pod_that_sets_a_mark_is_still_captured() {
    let m = mesh("mark");
    let target = m.server.addr(ECHO);
    // Any mark: the agent recognises its sockets by cgroup, never by mark.
    let stream = m
        .client
        .netns()
        .run(move || -> io::Result<TcpStream> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            for mark in [0x539, 0xffff_ffff] {
                socket.set_mark(mark)?;
            }
            socket.connect_timeout(&target.into(), IO_TIMEOUT)?;
            Ok(socket.into())
        })
        .unwrap()
        .unwrap();
    assert!(redirected(&stream), "a marked socket escaped the mesh");
}

#[test]
fn direct_connection_to_the_listener_is_refused() {
    let m = mesh("relay");
    let before = decisions(&m.agent, "orig_dst_miss");
    // Loopback is never redirected, so this reaches the listener with no
    // original destination recorded.
    assert_reset(m.client.connect(SocketAddr::from(([127, 0, 0, 1], 15001))));
    assert_eq!(decisions(&m.agent, "orig_dst_miss"), before + 1.0);

    // Redirected, but aimed at an agent port: no relaying into the agent.
    assert_reset(m.client.connect(m.server.addr(15001)));
    assert_eq!(decisions(&m.agent, "redirected"), 1.0);
}

/// The proxy accepts and then resets. The reset may already have arrived
/// when connect() returns, and then connect() itself reports it.
fn assert_reset(connected: io::Result<TcpStream>) {
    let mut stream = match connected {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
        connected => connected.unwrap(),
    };
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    // Only read: a write racing the RST would consume the error, and the
    // read after it would see a plain end of stream.
    let mut buf = [0; 16];
    match stream.read(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("expected a reset, got {other:?}"),
    }
}

#[test]
fn upstream_refusal_reaches_the_client_as_a_reset() {
    let m = mesh("refused");
    // Nothing listens on this port of the server pod.
    assert_reset(m.client.connect(m.server.addr(7999)));
    assert_eq!(decisions(&m.agent, "redirected"), 1.0);
    let failed = metric(
        &m.agent,
        "istio_tcp_connections_opened_total",
        &[("source_workload", "client"), ("response_flags", "UF")],
    );
    assert_eq!(failed, 1.0);
}

#[test]
fn half_close_works_in_both_directions() {
    let m = mesh("halfclose");
    // Client finishes first: the ECHO server answers only after it sees EOF.
    let mut stream = m.client.connect(m.server.addr(ECHO)).unwrap();
    assert!(redirected(&stream));
    echo(&mut stream, b"request, then FIN").unwrap();

    // Server finishes first: it says hello, half-closes, and then still
    // reads what the client sends.
    let listener = m.neighbour.listen(7100).unwrap();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(b"hello").unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        rest
    });
    let mut stream = m.client.connect(m.neighbour.addr(7100)).unwrap();
    assert!(redirected(&stream));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).unwrap();
    assert_eq!(greeting, b"hello");
    stream.write_all(b"still talking").unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    assert_eq!(server.join().unwrap(), b"still talking");
}

#[test]
fn transfers_64_mib_each_way_intact() {
    let m = mesh("bulk");
    const SIZE: usize = 64 << 20;
    let mut stream = m.client.connect(m.server.addr(STREAM)).unwrap();
    assert!(redirected(&stream));
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let sending = thread::spawn(move || {
        let mut sent = Checksum::default();
        let mut block = vec![0u8; 64 << 10];
        for i in 0..SIZE / block.len() {
            fill(&mut block, i);
            sent.update(&block);
            writer.write_all(&block).unwrap();
        }
        writer.shutdown(Shutdown::Write).unwrap();
        sent
    });
    let mut received = Checksum::default();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        received.update(&buf[..n]);
    }
    let sent = sending.join().unwrap();
    assert_eq!(sent.len, SIZE as u64);
    assert_eq!(
        received, sent,
        "the echoed stream differs from what was sent"
    );
    let bytes = |name| metric(&m.agent, name, &[("source_workload", "client")]);
    assert_eq!(bytes("istio_tcp_received_bytes_total"), SIZE as f64);
    assert_eq!(bytes("istio_tcp_sent_bytes_total"), SIZE as f64);
}

/// The sockmap fast path: once the proxy allowed the connection, the kernel
/// moves the bytes between its sockets. The client writes from the first
/// moment after connect(), before the proxy can have connected upstream, so
/// the first bytes go through user space and the rest through the kernel,
/// behind them: the echo must still come back byte for byte in order, and
/// the byte metrics must count every byte once.
#[test]
fn kernel_carried_flow_stays_in_order_and_counted() {
    let m = mesh_with("fastpath", &["--fast-path", "true"]);
    const SIZE: usize = 10 << 20;
    let labels = [("source_workload", "client"), ("reporter", "source")];
    for (round, server) in [&m.server, &m.neighbour].into_iter().enumerate() {
        let stream = m.client.connect(server.addr(STREAM)).unwrap();
        assert!(redirected(&stream));
        echo_in_order(stream, SIZE);
        let done = (round + 1) as f64;
        wait_until("the connection is counted closed", || {
            metric(&m.agent, "istio_tcp_connections_closed_total", &labels) == done
        });
        let bytes = |name| metric(&m.agent, name, &labels);
        assert_eq!(bytes("istio_tcp_received_bytes_total"), done * SIZE as f64);
        assert_eq!(bytes("istio_tcp_sent_bytes_total"), done * SIZE as f64);
    }
    let carried = metric(&m.agent, "weir_kernel_carried_bytes_total", &[]);
    assert!(
        carried > 2.0 * SIZE as f64,
        "the kernel carried only {carried} of {} bytes",
        4 * SIZE
    );
}

/// Deterministic, position-dependent bytes, so reordering or loss shows.
fn fill(block: &mut [u8], index: usize) {
    for (j, byte) in block.iter_mut().enumerate() {
        *byte = (index.wrapping_mul(31) ^ j.wrapping_mul(7)) as u8;
    }
}

/// FNV-1a over the stream, with its length.
#[derive(Debug, PartialEq, Eq)]
struct Checksum {
    hash: u64,
    len: u64,
}

impl Default for Checksum {
    fn default() -> Checksum {
        Checksum {
            hash: 0xcbf2_9ce4_8422_2325,
            len: 0,
        }
    }
}

impl Checksum {
    fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.len += bytes.len() as u64;
    }
}

#[test]
fn concurrent_connections_keep_their_pod_and_destination() {
    let mut m = mesh("concurrent");
    // Three enrolled pods, each opening 100 connections at once, spread over
    // four servers on both nodes.
    let clients: Vec<Pod> = [
        ("c1", NodeId::Xuegod63),
        ("c2", NodeId::Xuegod63),
        ("c3", NodeId::Xuegod63),
    ]
    .into_iter()
    .map(|(name, node)| m.sb.add_pod(meshed(name, node)).unwrap())
    .collect();
    let mut servers = vec![m.server.clone(), m.neighbour.clone()];
    for (name, node) in [("s3", NodeId::Xuegod64), ("s4", NodeId::Xuegod63)] {
        let pod = m.sb.add_pod(server_spec(name, node)).unwrap();
        serve_echo(&pod);
        servers.push(pod);
    }
    wait_until("the new pods are enrolled", || {
        metric(&m.agent, "weir_enrolled_pods", &[]) == 4.0
    });

    let workers: Vec<_> = clients
        .iter()
        .flat_map(|client| (0..100).map(move |i| (client.clone(), i)))
        .map(|(client, i)| {
            let server = servers[i % servers.len()].clone();
            thread::spawn(move || {
                let target = server.addr(ECHO);
                let payload = format!("{} #{i} to {}", client.name(), server.name()).repeat(50);
                let mut stream = client.connect(target).unwrap();
                assert!(redirected(&stream));
                assert_eq!(stream.peer_addr().unwrap(), target);
                let echoed = echo(&mut stream, payload.as_bytes()).unwrap();
                assert_eq!(echoed.server, server.name(), "wrong destination");
                assert_eq!(
                    echoed.peer.ip(),
                    IpAddr::V4(client.ip()),
                    "upstream socket in the wrong pod"
                );
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    for client in ["c1", "c2", "c3"] {
        let opened = metric(
            &m.agent,
            "istio_tcp_connections_opened_total",
            &[("source_workload", client)],
        );
        assert_eq!(opened, 100.0, "{client}");
    }
}

#[test]
fn cluster_ip_is_resolved_to_ready_endpoints() {
    let mut m = mesh("clusterip");
    let vip = m.sb.addressing().service_ip(7);
    // Two ready endpoints on different nodes, one that is not ready.
    for (name, node, ready) in [
        ("web-a", NodeId::Xuegod64, true),
        ("web-b", NodeId::Xuegod63, true),
        ("web-c", NodeId::Xuegod64, false),
    ] {
        let pod =
            m.sb.add_pod(
                PodSpec::new(name, node)
                    .label("app", "web")
                    .ready(ready)
                    .ports(&[("echo", ECHO)]),
            )
            .unwrap();
        serve_echo(&pod);
    }
    m.sb.add_service("web", "default", vip, 80, ECHO, &[("app", "web")])
        .unwrap();
    let service = SocketAddr::from((vip, 80));
    wait_until("the service is known", || {
        m.agent
            .config_dump()
            .unwrap()
            .to_string()
            .contains(&vip.to_string())
    });

    let mut answered_by = Vec::new();
    for i in 0..6 {
        let mut stream = m.client.connect(service).unwrap();
        assert!(redirected(&stream));
        assert_eq!(
            stream.peer_addr().unwrap(),
            service,
            "the app still sees the ClusterIP"
        );
        let echoed = echo(&mut stream, format!("request {i}").as_bytes()).unwrap();
        assert_eq!(echoed.peer.ip(), IpAddr::V4(m.client.ip()));
        answered_by.push(echoed.server);
    }
    let counts = |name: &str| answered_by.iter().filter(|b| b.as_str() == name).count();
    assert_eq!(
        (counts("web-a"), counts("web-b"), counts("web-c")),
        (3, 3, 0),
        "{answered_by:?}"
    );
    let to_service = metric(
        &m.agent,
        "istio_tcp_connections_opened_total",
        &[
            ("destination_service", "web.default.svc.cluster.local"),
            ("destination_service_name", "web"),
        ],
    );
    assert_eq!(to_service, 6.0);
}

#[test]
fn metrics_pass_promtool_and_bytes_advance_while_connected() {
    let m = mesh("metrics");
    let mut stream = m.client.connect(m.server.addr(STREAM)).unwrap();
    assert!(redirected(&stream));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.write_all(&[7; 1000]).unwrap();
    let mut back = [0; 1000];
    stream.read_exact(&mut back).unwrap();
    // The connection is still open: the counters must already show it.
    let labels = [
        ("source_workload", "client"),
        ("destination_workload", "server"),
        ("reporter", "source"),
    ];
    assert_eq!(
        metric(&m.agent, "istio_tcp_received_bytes_total", &labels),
        1000.0
    );
    assert_eq!(
        metric(&m.agent, "istio_tcp_sent_bytes_total", &labels),
        1000.0
    );
    assert_eq!(
        metric(&m.agent, "istio_tcp_connections_closed_total", &labels),
        0.0
    );
    drop(stream);
    wait_until("the close is counted", || {
        metric(&m.agent, "istio_tcp_connections_closed_total", &labels) == 1.0
    });

    let text = m.agent.metrics().unwrap();
    let out = promtool_check(&text);
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["ENROLLED", "LISTENERS", "ORIG_DST", "SOCKETS"] {
        assert!(metric_value(&text, "weir_map_capacity", &[("map", name)]).unwrap() > 0.0);
    }
    assert_eq!(
        metric_value(&text, "weir_map_entries", &[("map", "LISTENERS")]),
        Some(1.0)
    );
}

/// A one-way stream through the fast path, then a FIN on its own (no
/// payload): the kernel must not hand that empty skb to the upstream socket
/// (its psock would take the zero-byte send for a broken pipe and the
/// connection would be reset). The server's answer must arrive, then a
/// clean end of stream.
#[test]
fn fin_after_a_one_way_stream_is_not_a_broken_pipe() {
    let m = mesh_with("fastpath-fin", &["--fast-path", "true"]);
    const SIZE: u64 = 64 << 20;
    let listener = m.neighbour.listen(7200).unwrap();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) => return Err(e),
            }
        }
        stream.write_all(&total.to_le_bytes())?;
        Ok(total)
    });
    let mut stream = m.client.connect(m.neighbour.addr(7200)).unwrap();
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let chunk = vec![7u8; 128 << 10];
    for _ in 0..SIZE / chunk.len() as u64 {
        stream.write_all(&chunk).unwrap();
    }
    // Let the last bytes leave, so that the FIN goes out alone.
    thread::sleep(Duration::from_millis(100));
    stream.shutdown(Shutdown::Write).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    assert_eq!(server.join().unwrap().unwrap(), SIZE);
    assert_eq!(answer, SIZE.to_le_bytes());
    assert!(metric(&m.agent, "weir_kernel_carried_bytes_total", &[]) > 0.0);
}
