//! Inbound interception end to end: sk_lookup hands connections for an
//! enrolled pod's address, on any port, to the agent's listener on
//! 127.0.0.1:15006 in the pod, and the proxy delivers them to the app from
//! 127.0.0.6. The app therefore sees 127.0.0.6 as its peer when the
//! connection went through the proxy, and the client's own address when it
//! did not.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr};
use std::time::Duration;

use common::{ECHO, STREAM, echo, echo_in_order, metric, serve_echo, wait_until};
use weir_sandbox::{Agent, NodeId, Pod, PodSpec, Sandbox, SandboxOptions};

const DELIVERY: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));

struct Cluster {
    sb: Sandbox,
    agent: Agent,
    /// Enrolled, on xuegod64, with echo servers.
    server: Pod,
    /// Not enrolled, on xuegod63.
    client: Pod,
}

fn cluster(test: &str, server: PodSpec, agent_args: &[&str]) -> Cluster {
    let mut sb = Sandbox::new(SandboxOptions::for_test(test)).unwrap();
    let server = sb.add_pod(server).unwrap();
    serve_echo(&server);
    let client = sb
        .add_pod(PodSpec::new("client", NodeId::Xuegod63))
        .unwrap();
    let agent = sb.start_agent(NodeId::Xuegod64, agent_args).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    Cluster {
        sb,
        agent,
        server,
        client,
    }
}

fn enrolled_server() -> PodSpec {
    PodSpec::new("server", NodeId::Xuegod64)
        .label("weir.dev/mesh", "enabled")
        .label("app", "server")
        .ports(&[("echo", ECHO)])
}

fn inbound(agent: &Agent, decision: &str) -> f64 {
    metric(
        agent,
        "weir_decisions_total",
        &[("direction", "inbound"), ("decision", decision)],
    )
}

/// What the app in the server pod saw as its peer.
fn app_peer(client: &Pod, target: SocketAddr) -> IpAddr {
    let mut stream = client.connect(target).unwrap();
    echo(&mut stream, b"hello").unwrap().peer.ip()
}

#[test]
fn connections_to_an_enrolled_pod_go_through_its_proxy() {
    let c = cluster("inbound", enrolled_server(), &[]);
    assert_eq!(app_peer(&c.client, c.server.addr(ECHO)), DELIVERY);
    assert_eq!(inbound(&c.agent, "redirected"), 1.0);
    let labels = [
        ("reporter", "destination"),
        ("destination_workload", "server"),
        ("source_workload", "client"),
        ("connection_security_policy", "none"),
    ];
    wait_until("the inbound connection is counted closed", || {
        metric(&c.agent, "istio_tcp_connections_closed_total", &labels) == 1.0
    });
    assert_eq!(
        metric(&c.agent, "istio_tcp_connections_opened_total", &labels),
        1.0
    );
    assert_eq!(
        metric(&c.agent, "istio_tcp_received_bytes_total", &labels),
        5.0
    );
}

/// The sockmap fast path on the inbound proxy (`--fast-path true`), and
/// the default without it: 10 MiB each way come back in order, every byte
/// is counted once, and the kernel carried most of them only when it may.
#[test]
fn inbound_flow_through_the_kernel_stays_in_order_and_counted() {
    const SIZE: usize = 10 << 20;
    for (args, kernel) in [(&["--fast-path", "true"][..], true), (&[][..], false)] {
        let c = cluster("fastpath-in", enrolled_server(), args);
        let stream = c.client.connect(c.server.addr(STREAM)).unwrap();
        echo_in_order(stream, SIZE);
        let labels = [
            ("reporter", "destination"),
            ("destination_workload", "server"),
        ];
        wait_until("the connection is counted closed", || {
            metric(&c.agent, "istio_tcp_connections_closed_total", &labels) == 1.0
        });
        let bytes = |name| metric(&c.agent, name, &labels);
        assert_eq!(bytes("istio_tcp_received_bytes_total"), SIZE as f64);
        assert_eq!(bytes("istio_tcp_sent_bytes_total"), SIZE as f64);
        let carried = metric(&c.agent, "weir_kernel_carried_bytes_total", &[]);
        if kernel {
            assert!(carried > SIZE as f64, "the kernel carried only {carried}");
        } else {
            assert_eq!(carried, 0.0);
        }
    }
}

#[test]
fn a_port_the_pod_never_declared_is_intercepted_too() {
    let c = cluster("undeclared", enrolled_server(), &[]);
    // The manifest declares only ECHO; this listener is the app's secret.
    let listener = c.server.listen(7300).unwrap();
    let app = std::thread::spawn(move || {
        let (mut stream, peer) = listener.accept().unwrap();
        stream.write_all(b"hi").unwrap();
        peer.ip()
    });
    let mut stream = c.client.connect(c.server.addr(7300)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).unwrap();
    assert_eq!(greeting, b"hi");
    assert_eq!(app.join().unwrap(), DELIVERY);
}

#[test]
fn excluded_inbound_port_and_loopback_reach_the_app_directly() {
    let server = enrolled_server().annotation("weir.dev/exclude-inbound-ports", "7000");
    let c = cluster("inexclude", server, &[]);
    assert_eq!(
        app_peer(&c.client, c.server.addr(ECHO)),
        IpAddr::V4(c.client.ip())
    );
    assert_eq!(inbound(&c.agent, "excluded"), 1.0);
    // Inside the pod, loopback is the pod's own business.
    let local = SocketAddr::from(([127, 0, 0, 1], ECHO));
    assert_eq!(app_peer(&c.server, local), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(inbound(&c.agent, "redirected"), 0.0);
}

#[test]
fn fail_open_and_fail_closed_while_no_agent_runs() {
    let open = cluster("infailopen", enrolled_server(), &[]);
    open.agent.sigkill().unwrap();
    open.agent.wait().unwrap();
    // Nobody listens on 15006 now: the app gets the client directly.
    assert_eq!(
        app_peer(&open.client, open.server.addr(ECHO)),
        IpAddr::V4(open.client.ip())
    );
    drop(open);

    let mut closed = cluster(
        "infailclosed",
        enrolled_server(),
        &["--fail-mode", "closed"],
    );
    closed.agent.sigkill().unwrap();
    closed.agent.wait().unwrap();
    // sk_lookup drops the lookup: no socket takes the SYN, and the kernel
    // answers with a reset.
    let refused = closed.client.connect(closed.server.addr(ECHO));
    assert_eq!(
        refused.map(drop).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused,
        "fail-closed let a connection in"
    );
    let agent = closed
        .sb
        .start_agent(NodeId::Xuegod64, &["--fail-mode", "closed"])
        .unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    assert!(inbound(&agent, "fail_closed") >= 1.0);
    wait_until("the pod is served again", || {
        closed
            .client
            .connect(closed.server.addr(ECHO))
            .and_then(|mut s| {
                s.shutdown(Shutdown::Write)?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)?;
                Ok(answer.contains("127.0.0.6"))
            })
            .unwrap_or(false)
    });
}
