//! Istio AuthorizationPolicy at L4, end to end: policies written into the
//! sandbox's manifests directory, agents enforcing them on both nodes, and
//! clients that see what a user would see.
//!
//! Clients run on xuegod63 and servers on xuegod64. Unless a test says
//! otherwise only the server's node runs an agent, so the server's inbound
//! check, which is authoritative, is what decides. A denied connection is
//! accepted and then reset before the app sees it; an allowed one reaches
//! the app from 127.0.0.6.

mod common;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{
    ECHO, Echoed, STREAM, accept_loop, decisions, echo, metric, promtool_check, redirected,
    serve_echo, wait_until,
};
use weir_sandbox::{Agent, NetNs, NodeId, Pod, PodSpec, Sandbox, SandboxOptions};

/// Where the inbound proxy delivers connections from.
const DELIVERY: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));
/// A third echo port, the "8080" of Istio's examples.
const HTTP: u16 = 8080;
/// A denial is a reset that comes at once; waiting longer means it did not.
const SHORT: Duration = Duration::from_secs(5);

fn sandbox(test: &str) -> Sandbox {
    Sandbox::new(SandboxOptions::for_test(test)).unwrap()
}

/// An enrolled server on xuegod64 with label `app`, and ports HTTP, ECHO and
/// STREAM declared.
fn server_spec(name: &str, namespace: &str, app: &str) -> PodSpec {
    PodSpec::new(name, NodeId::Xuegod64)
        .namespace(namespace)
        .label("weir.dev/mesh", "enabled")
        .label("app", app)
        .ports(&[("http", HTTP), ("echo", ECHO), ("stream", STREAM)])
}

/// Adds the pod and starts its echo servers on HTTP, ECHO and STREAM.
fn add_server(sb: &mut Sandbox, spec: PodSpec) -> Pod {
    let pod = sb.add_pod(spec).unwrap();
    serve_echo(&pod);
    serve_echo_on(&pod, HTTP);
    pod
}

/// A client on xuegod63 that is not enrolled, so only the server's side
/// judges its connections.
fn client_spec(name: &str, namespace: &str, service_account: &str) -> PodSpec {
    PodSpec::new(name, NodeId::Xuegod63)
        .namespace(namespace)
        .service_account(service_account)
        .label("app", name)
}

fn start_agent(sb: &mut Sandbox, node: NodeId, args: &[&str]) -> Agent {
    let agent = sb.start_agent(node, args).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    agent
}

/// An ECHO-style server on any port: reads until the client half-closes,
/// then answers "<pod> <peer>\n" and the bytes.
fn serve_echo_on(pod: &Pod, port: u16) {
    let name = pod.name().to_owned();
    accept_loop(pod.listen(port).unwrap(), move |mut stream, peer| {
        let mut request = Vec::new();
        stream.read_to_end(&mut request)?;
        stream.write_all(format!("{name} {peer}\n").as_bytes())?;
        stream.write_all(&request)
    });
}

/// One echo exchange from `client` to `target`; any failure, a denial
/// included, is an error.
fn try_echo(client: &Pod, target: SocketAddr) -> io::Result<Echoed> {
    let mut stream = client.connect(target)?;
    stream.set_write_timeout(Some(SHORT))?;
    echo(&mut stream, b"may I?")
}

/// The connection reached the app in `server`, through its inbound proxy.
#[track_caller]
fn assert_served(client: &Pod, server: &Pod, port: u16) {
    let echoed = try_echo(client, server.addr(port)).unwrap_or_else(|e| {
        panic!(
            "{} to {}:{port} was not served: {e}",
            client.name(),
            server.name()
        )
    });
    assert_eq!(echoed.server, server.name());
    assert_eq!(
        echoed.peer.ip(),
        DELIVERY,
        "{} to {}:{port} did not go through the inbound proxy",
        client.name(),
        server.name()
    );
}

/// The connection was denied: accepted and reset, before any byte of the
/// app came back.
#[track_caller]
fn assert_denied(client: &Pod, server: &Pod, port: u16) {
    assert_reset(
        client.connect(server.addr(port)),
        &format!("{} to {}:{port}", client.name(), server.name()),
    );
}

/// The proxy accepts and then resets. The reset may already have arrived
/// when connect() returns, and then connect() itself reports it.
#[track_caller]
fn assert_reset(connected: io::Result<TcpStream>, what: &str) {
    let mut stream = match connected {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return,
        Err(e) => panic!("{what}: expected a reset, connect failed with {e}"),
        Ok(stream) => stream,
    };
    stream.set_read_timeout(Some(SHORT)).unwrap();
    // Only read: a write racing the RST would consume the error, and the
    // read after it would see a plain end of stream.
    let mut buf = [0; 16];
    match stream.read(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: expected a reset, got {other:?}"),
    }
}

/// Connects from a node's own network namespace, as the kubelet does.
fn connect_from(netns: &NetNs, target: SocketAddr) -> io::Result<TcpStream> {
    netns.run(|| TcpStream::connect_timeout(&target, SHORT))?
}

fn denied_total(agent: &Agent, direction: &str, policy: &str) -> f64 {
    metric(
        agent,
        "weir_policy_denied_total",
        &[("direction", direction), ("policy", policy)],
    )
}

fn inbound_redirected(agent: &Agent) -> f64 {
    metric(
        agent,
        "weir_decisions_total",
        &[("direction", "inbound"), ("decision", "redirected")],
    )
}

fn outbound_denied(agent: &Agent) -> f64 {
    metric(
        agent,
        "weir_decisions_total",
        &[("direction", "outbound"), ("decision", "denied")],
    )
}

/// Istio's "allow from namespace foo to port 8080" (the README's example),
/// unchanged but for the workload's name.
#[test]
fn allow_by_namespace_and_port() {
    let mut sb = sandbox("allow_by_namespace_and_port");
    let server = add_server(&mut sb, server_spec("httpbin", "bar", "httpbin"));
    let from_foo = sb.add_pod(client_spec("curl", "foo", "curl")).unwrap();
    let from_bar = sb.add_pod(client_spec("curl", "bar", "curl")).unwrap();
    sb.write_manifest(
        "policy-httpbin.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: bar
spec:
  selector:
    matchLabels:
      app: httpbin
  action: ALLOW
  rules:
  - from:
    - source:
        namespaces: ["foo"]
    to:
    - operation:
        ports: ["8080"]
"#,
    )
    .unwrap();
    let agent = start_agent(&mut sb, NodeId::Xuegod64, &[]);

    assert_served(&from_foo, &server, HTTP);
    // Same workload name and service account, other namespace.
    assert_denied(&from_bar, &server, HTTP);
    // The right namespace, another port.
    assert_denied(&from_foo, &server, ECHO);
    assert_eq!(denied_total(&agent, "inbound", "none"), 2.0);
}

#[test]
fn deny_by_principal() {
    let mut sb = sandbox("deny_by_principal");
    let server = add_server(&mut sb, server_spec("server", "default", "server"));
    let sleep = sb
        .add_pod(client_spec("sleep", "default", "sleep"))
        .unwrap();
    let curl = sb.add_pod(client_spec("curl", "default", "curl")).unwrap();
    // The same service account name in another namespace is another
    // principal.
    let other_sleep = sb.add_pod(client_spec("sleep", "legacy", "sleep")).unwrap();
    sb.write_manifest(
        "policy-deny-sleep.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-sleep
  namespace: default
spec:
  selector:
    matchLabels:
      app: server
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
"#,
    )
    .unwrap();
    let agent = start_agent(&mut sb, NodeId::Xuegod64, &[]);

    assert_denied(&sleep, &server, ECHO);
    assert_denied(&sleep, &server, HTTP);
    assert_served(&curl, &server, ECHO);
    assert_served(&other_sleep, &server, ECHO);
    assert_eq!(denied_total(&agent, "inbound", "default/deny-sleep"), 2.0);
}

/// `spec: {}` in the namespace allows nothing; one more ALLOW opens one
/// port, and only that one, including against ports the pod never declared.
#[test]
fn default_deny_namespace_with_one_allowed_port() {
    let mut sb = sandbox("default_deny_namespace_with_one_port");
    // The whole namespace is enrolled by its label.
    sb.add_namespace("shop", &[("weir.dev/mesh", "enabled")])
        .unwrap();
    let spec = PodSpec::new("cart", NodeId::Xuegod64)
        .namespace("shop")
        .label("app", "cart")
        .ports(&[("http", HTTP), ("echo", ECHO)]);
    let server = add_server(&mut sb, spec);
    // Not in the manifest: an app's secret port is judged like the others.
    serve_echo_on(&server, 7002);
    let client = sb
        .add_pod(client_spec("client", "default", "default"))
        .unwrap();
    sb.write_manifest(
        "policy-shop-allow-nothing.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: shop
spec: {}
"#,
    )
    .unwrap();
    sb.write_manifest(
        "policy-shop-http.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-http
  namespace: shop
spec:
  action: ALLOW
  rules:
  - to:
    - operation:
        ports: ["8080"]
"#,
    )
    .unwrap();
    let _agent = start_agent(&mut sb, NodeId::Xuegod64, &[]);

    assert_served(&client, &server, HTTP);
    assert_denied(&client, &server, ECHO);
    assert_denied(&client, &server, STREAM);
    assert_denied(&client, &server, 7002);

    // Without the ALLOW, the namespace allows nothing at all.
    sb.remove_manifest("policy-shop-http.yaml").unwrap();
    wait_until("port 8080 is closed too", || {
        try_echo(&client, server.addr(HTTP)).is_err()
    });
    assert_denied(&client, &server, HTTP);
}

#[test]
fn ip_blocks() {
    let mut sb = sandbox("ip_blocks");
    let server = add_server(&mut sb, server_spec("httpbin", "foo", "httpbin"));
    let trusted = sb
        .add_pod(client_spec("trusted", "default", "default"))
        .unwrap();
    let stranger = sb
        .add_pod(client_spec("stranger", "default", "default"))
        .unwrap();
    sb.write_manifest(
        "policy-ingress.yaml",
        &format!(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ingress
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  action: ALLOW
  rules:
  - from:
    - source:
        ipBlocks: ["{}/32"]
"#,
            trusted.ip()
        ),
    )
    .unwrap();
    let _agent = start_agent(&mut sb, NodeId::Xuegod64, &[]);

    assert_served(&trusted, &server, ECHO);
    assert_served(&trusted, &server, HTTP);
    // Same namespace and service account: only the address differs.
    assert_denied(&stranger, &server, ECHO);
    assert_denied(&stranger, &server, HTTP);
}

/// A policy in the root namespace applies in every namespace, by its
/// selector; the same policy in an ordinary namespace stays there.
#[test]
fn root_namespace_policy_applies_mesh_wide() {
    let mut sb = sandbox("root_namespace_policy");
    let server = add_server(&mut sb, server_spec("server", "default", "server"));
    let prod = add_server(&mut sb, server_spec("server", "prod", "server"));
    let other = add_server(&mut sb, server_spec("other", "default", "other"));
    let client = sb
        .add_pod(client_spec("client", "default", "default"))
        .unwrap();
    let deny = |namespace: &str| {
        format!(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-server
  namespace: {namespace}
spec:
  selector:
    matchLabels:
      app: server
  action: DENY
  rules:
  - {{}}
"#
        )
    };
    // Not the root namespace: reaches only its own workloads, and it has
    // none.
    sb.write_manifest("policy-elsewhere.yaml", &deny("elsewhere"))
        .unwrap();
    let agent = start_agent(&mut sb, NodeId::Xuegod64, &[]);
    assert_served(&client, &server, ECHO);
    assert_served(&client, &prod, ECHO);

    sb.write_manifest("policy-root.yaml", &deny("istio-system"))
        .unwrap();
    wait_until("the root namespace's policy applies", || {
        try_echo(&client, server.addr(ECHO)).is_err()
    });
    assert_denied(&client, &server, ECHO);
    assert_denied(&client, &prod, ECHO);
    // The selector still picks: another app is not concerned.
    assert_served(&client, &other, ECHO);
    assert!(denied_total(&agent, "inbound", "istio-system/deny-server") >= 2.0);
    assert_eq!(
        denied_total(&agent, "inbound", "elsewhere/deny-server"),
        0.0
    );
}

/// With `--root-namespace`, that namespace is the mesh-wide one instead.
#[test]
fn root_namespace_flag_moves_the_root() {
    let mut sb = sandbox("root_namespace_flag");
    let server = add_server(&mut sb, server_spec("server", "default", "server"));
    let client = sb
        .add_pod(client_spec("client", "default", "default"))
        .unwrap();
    let deny = |namespace: &str| {
        format!(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: {namespace}
spec:
  action: DENY
  rules:
  - {{}}
"#
        )
    };
    sb.write_manifest("policy-istio-system.yaml", &deny("istio-system"))
        .unwrap();
    let _agent = start_agent(
        &mut sb,
        NodeId::Xuegod64,
        &["--root-namespace", "mesh-root"],
    );
    // istio-system is an ordinary namespace now.
    assert_served(&client, &server, ECHO);
    sb.write_manifest("policy-mesh-root.yaml", &deny("mesh-root"))
        .unwrap();
    wait_until("the new root namespace's policy applies", || {
        try_echo(&client, server.addr(ECHO)).is_err()
    });
    assert_denied(&client, &server, ECHO);
}

#[test]
fn deny_takes_precedence_over_allow() {
    let mut sb = sandbox("deny_precedence");
    let server = add_server(&mut sb, server_spec("server", "default", "server"));
    let sleep = sb
        .add_pod(client_spec("sleep", "default", "sleep"))
        .unwrap();
    let curl = sb.add_pod(client_spec("curl", "default", "curl")).unwrap();
    sb.write_manifest(
        "policy-allow-all.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-all
  namespace: default
spec:
  selector:
    matchLabels:
      app: server
  action: ALLOW
  rules:
  - {}
"#,
    )
    .unwrap();
    sb.write_manifest(
        "policy-deny-sleep.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-sleep
  namespace: default
spec:
  selector:
    matchLabels:
      app: server
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
"#,
    )
    .unwrap();
    let agent = start_agent(&mut sb, NodeId::Xuegod64, &[]);

    assert_denied(&sleep, &server, ECHO);
    assert_served(&curl, &server, ECHO);
    assert_eq!(denied_total(&agent, "inbound", "default/deny-sleep"), 1.0);
}

#[test]
fn audit_only_logs() {
    let mut sb = sandbox("audit_only_logs");
    let server = add_server(&mut sb, server_spec("server", "default", "server"));
    let sleep = sb
        .add_pod(client_spec("sleep", "default", "sleep"))
        .unwrap();
    sb.write_manifest(
        "policy-audit.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: audit-sleep
  namespace: default
spec:
  selector:
    matchLabels:
      app: server
  action: AUDIT
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
"#,
    )
    .unwrap();
    let agent = start_agent(&mut sb, NodeId::Xuegod64, &[]);

    assert_served(&sleep, &server, ECHO);
    let source = sleep.ip().to_string();
    let audit_line = || {
        agent.log().unwrap().lines().any(|line| {
            line.to_lowercase().contains("audit")
                && line.contains("default/audit-sleep")
                && line.contains(&source)
        })
    };
    wait_until("the audit is logged", audit_line);
    let text = agent.metrics().unwrap();
    assert_eq!(
        weir_sandbox::metric_value(&text, "weir_policy_denied_total", &[]).unwrap_or(0.0),
        0.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &agent,
            "istio_tcp_connections_opened_total",
            &[("response_flags", "DENY")]
        ),
        0.0
    );
}

/// A new policy closes the live connections it denies, leaves the others
/// alone, and decides new connections; removing it allows them again.
#[test]
fn policy_change_applies_to_live_connections() {
    let mut sb = sandbox("policy_change_live");
    let server = add_server(&mut sb, server_spec("server", "default", "server"));
    let sleep = sb
        .add_pod(client_spec("sleep", "default", "sleep"))
        .unwrap();
    let curl = sb.add_pod(client_spec("curl", "default", "curl")).unwrap();
    let agent = start_agent(&mut sb, NodeId::Xuegod64, &[]);

    let open = |client: &Pod| {
        let mut stream = client.connect(server.addr(STREAM)).unwrap();
        stream.set_read_timeout(Some(SHORT)).unwrap();
        round_trip(&mut stream, b"hello").unwrap();
        stream
    };
    let mut doomed = open(&sleep);
    let mut spared = open(&curl);

    sb.write_manifest(
        "policy-deny-sleep.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-sleep
  namespace: default
spec:
  selector:
    matchLabels:
      app: server
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
"#,
    )
    .unwrap();
    // Only read, so that the reset is not consumed by a write; the policy
    // loads within about a second.
    doomed
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0; 16];
    match doomed.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("the denied live connection stayed open: {other:?}"),
    }
    // Another client's live connection is not concerned.
    round_trip(&mut spared, b"still here").unwrap();
    assert_denied(&sleep, &server, STREAM);
    assert_denied(&sleep, &server, ECHO);
    assert_served(&curl, &server, ECHO);
    assert!(denied_total(&agent, "inbound", "default/deny-sleep") >= 2.0);

    sb.remove_manifest("policy-deny-sleep.yaml").unwrap();
    wait_until("sleep is allowed again", || {
        try_echo(&sleep, server.addr(ECHO)).is_ok()
    });
    assert_served(&sleep, &server, ECHO);
    round_trip(&mut spared, b"and still").unwrap();
}

/// Writes `bytes` to a STREAM connection and reads them back.
fn round_trip(stream: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes)?;
    let mut back = vec![0; bytes.len()];
    stream.read_exact(&mut back)?;
    assert_eq!(back, bytes);
    Ok(())
}

const DENY_SLEEP_FROM_SERVER: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: sleep
  namespace: default
spec:
  selector:
    matchLabels:
      app: server
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
"#;

/// The enrolled client's agent checks the destination's policy first,
/// resets, and caches the denial: the next connect() fails with EPERM in
/// the kernel, and no proxy sees it. A policy change invalidates the cache.
#[test]
fn fast_deny_in_the_kernel() {
    let mut sb = sandbox("fast_deny_in_the_kernel");
    let server = add_server(&mut sb, server_spec("server", "default", "server"));
    let sleep = sb
        .add_pod(client_spec("sleep", "default", "sleep").label("weir.dev/mesh", "enabled"))
        .unwrap();
    sb.write_manifest("policy-sleep.yaml", DENY_SLEEP_FROM_SERVER)
        .unwrap();
    let client_agent = start_agent(&mut sb, NodeId::Xuegod63, &[]);
    let server_agent = start_agent(&mut sb, NodeId::Xuegod64, &[]);
    let target = server.addr(ECHO);
    let proxied_denials = || {
        metric(
            &client_agent,
            "istio_tcp_connections_opened_total",
            &[("reporter", "source"), ("response_flags", "DENY")],
        )
    };
    let server_side = || {
        (
            inbound_redirected(&server_agent),
            metric(
                &server_agent,
                "istio_tcp_connections_opened_total",
                &[("reporter", "destination")],
            ),
        )
    };
    assert_eq!(outbound_denied(&client_agent), 0.0);

    // First: the outbound proxy accepts, judges, resets.
    let first = sleep.connect(target);
    if let Ok(stream) = &first {
        assert!(redirected(stream), "the enrolled client went direct");
    }
    assert_reset(first, "first connection");
    assert_eq!(proxied_denials(), 1.0);
    assert_eq!(
        denied_total(&client_agent, "outbound", "default/sleep"),
        1.0
    );
    let before = server_side();
    assert_eq!(before, (0.0, 0.0), "the denied connection left the node");

    // Second: refused by connect4 before any packet.
    let started = Instant::now();
    let second = sleep.connect(target);
    let took = started.elapsed();
    match second {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
        other => panic!("expected EPERM from connect(), got {other:?}"),
    }
    assert!(took < Duration::from_secs(1), "EPERM took {took:?}");
    assert!(outbound_denied(&client_agent) >= 1.0);
    assert_eq!(proxied_denials(), 1.0, "the proxy saw the cached denial");
    assert_eq!(server_side(), before, "the server's node saw it");

    // The policy now allows: the cached denial no longer counts.
    sb.write_manifest(
        "policy-sleep.yaml",
        &DENY_SLEEP_FROM_SERVER.replace("DENY", "ALLOW"),
    )
    .unwrap();
    wait_until("the cached denial is dropped", || {
        try_echo(&sleep, target).is_ok()
    });
    let echoed = try_echo(&sleep, target).unwrap();
    assert_eq!(echoed.server, "server");
    assert_eq!(echoed.peer.ip(), DELIVERY);
    assert!(server_side().1 > before.1);

    // And denied again: reset first, then cached anew.
    sb.write_manifest("policy-sleep.yaml", DENY_SLEEP_FROM_SERVER)
        .unwrap();
    wait_until("connect() fails with EPERM again", || {
        matches!(
            sleep.connect(target),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied
        )
    });
}

/// A ClusterIP whose endpoints are judged differently is never cached as
/// denied; one whose endpoints all deny is.
#[test]
fn cluster_ip_is_cached_only_when_every_endpoint_denies() {
    let mut sb = sandbox("cluster_ip_fast_deny");
    let web_a = add_server(
        &mut sb,
        server_spec("web-a", "default", "web").label("version", "a"),
    );
    let web_b = add_server(
        &mut sb,
        server_spec("web-b", "default", "web").label("version", "b"),
    );
    let sleep = sb
        .add_pod(client_spec("sleep", "default", "sleep").label("weir.dev/mesh", "enabled"))
        .unwrap();
    let vip = sb.addressing().service_ip(7);
    sb.add_service("web", "default", vip, 80, ECHO, &[("app", "web")])
        .unwrap();
    let deny = |selector: &str| {
        format!(
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: sleep
  namespace: default
spec:
  selector:
    matchLabels:
      {selector}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
"#
        )
    };
    sb.write_manifest("policy-sleep.yaml", &deny("version: a"))
        .unwrap();
    let client_agent = start_agent(&mut sb, NodeId::Xuegod63, &[]);
    let _server_agent = start_agent(&mut sb, NodeId::Xuegod64, &[]);
    let service = SocketAddr::from((vip, 80));

    let (mut served, mut reset) = (Vec::new(), 0);
    for _ in 0..8 {
        match sleep.connect(service) {
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                panic!("a ClusterIP with an allowing endpoint was cached as denied")
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => reset += 1,
            Err(e) => panic!("connect to the ClusterIP failed: {e}"),
            // A write or shutdown racing the reset fails in other ways.
            Ok(mut stream) => match echo(&mut stream, b"which one?") {
                Ok(echoed) => served.push(echoed.server),
                Err(_) => reset += 1,
            },
        }
    }
    assert!(served.iter().all(|s| s == web_b.name()), "{served:?}");
    assert!(
        !served.is_empty() && reset > 0,
        "{served:?}, {reset} resets"
    );
    assert_eq!(outbound_denied(&client_agent), 0.0);
    // The denying endpoint itself, by its own address, is cached.
    assert_reset(sleep.connect(web_a.addr(ECHO)), "web-a directly");
    assert_eq!(
        sleep
            .connect(web_a.addr(ECHO))
            .map(drop)
            .unwrap_err()
            .kind(),
        io::ErrorKind::PermissionDenied
    );

    // Every endpoint denies now: the ClusterIP is cached too.
    sb.write_manifest("policy-sleep.yaml", &deny("app: web"))
        .unwrap();
    wait_until("connect() to the ClusterIP fails with EPERM", || {
        matches!(
            sleep.connect(service),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied
        )
    });
}

/// Writes the pod's manifest again with probes added to its container,
/// everything else as the sandbox wrote it.
fn add_probes(sb: &Sandbox, pod: &Pod, probes: serde_json::Value) {
    let file = format!("pod-{}-{}.yaml", pod.namespace(), pod.name());
    let text = std::fs::read_to_string(sb.manifests_dir().join(&file)).unwrap();
    let mut manifest: serde_json::Value = serde_yaml::from_str(&text).unwrap();
    let container = &mut manifest["spec"]["containers"][0];
    for (kind, probe) in probes.as_object().unwrap() {
        container[kind] = probe.clone();
    }
    sb.write_manifest(&file, &serde_yaml::to_string(&manifest).unwrap())
        .unwrap();
}

/// Under deny-all the kubelet, from the node's own address, still reaches
/// the probe port; nobody else does, and the node reaches nothing else.
#[test]
fn probes_from_the_node_pass_under_deny_all() {
    let mut sb = sandbox("probes_pass_under_deny_all");
    let server = add_server(&mut sb, server_spec("server", "default", "server"));
    // A readiness probe by number, a liveness probe by port name (STREAM).
    add_probes(
        &sb,
        &server,
        serde_json::json!({
            "readinessProbe": { "tcpSocket": { "port": HTTP }, "periodSeconds": 10 },
            "livenessProbe": { "httpGet": { "path": "/healthz", "port": "stream" } },
        }),
    );
    let client = sb
        .add_pod(client_spec("client", "default", "default"))
        .unwrap();
    sb.write_manifest(
        "policy-allow-nothing.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: default
spec: {}
"#,
    )
    .unwrap();
    let _agent = start_agent(&mut sb, NodeId::Xuegod64, &[]);
    let node = sb.node(NodeId::Xuegod64).netns();
    let kubelet = IpAddr::V4(sb.addressing().pod_gateway(NodeId::Xuegod64));

    let mut probe = connect_from(node, server.addr(HTTP)).unwrap();
    assert_eq!(probe.local_addr().unwrap().ip(), kubelet);
    let echoed = echo(&mut probe, b"ready?").unwrap();
    assert_eq!(echoed.server, "server");
    assert_eq!(echoed.peer.ip(), DELIVERY);

    let mut probe = connect_from(node, server.addr(STREAM)).unwrap();
    probe.set_read_timeout(Some(SHORT)).unwrap();
    round_trip(&mut probe, b"alive?").unwrap();

    // The node on a port that is not a probe's.
    assert_reset(
        connect_from(node, server.addr(ECHO)),
        "the node to a non-probe port",
    );
    // Another pod on the probe port.
    assert_denied(&client, &server, HTTP);
    // The other node is not this pod's kubelet.
    assert_reset(
        connect_from(sb.node(NodeId::Xuegod63).netns(), server.addr(HTTP)),
        "the other node to the probe port",
    );
}

/// Denials show in Istio's metrics on the side that denied them, in weir's
/// per-policy counter and in the log, and the scrape stays valid.
#[test]
fn denials_show_in_metrics_and_log() {
    let mut sb = sandbox("denials_in_metrics");
    let server = add_server(&mut sb, server_spec("server", "default", "server"));
    // Enrolled: its own agent denies it on the way out.
    let sleep = sb
        .add_pod(client_spec("sleep", "default", "sleep").label("weir.dev/mesh", "enabled"))
        .unwrap();
    // Not enrolled: the server's agent denies it on the way in.
    let curl = sb.add_pod(client_spec("curl", "default", "curl")).unwrap();
    let other = sb
        .add_pod(client_spec("other", "default", "other"))
        .unwrap();
    sb.write_manifest(
        "policy-deny-listed.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-listed
  namespace: default
spec:
  selector:
    matchLabels:
      app: server
  action: DENY
  rules:
  - from:
    - source:
        principals:
        - cluster.local/ns/default/sa/sleep
        - cluster.local/ns/default/sa/curl
"#,
    )
    .unwrap();
    sb.write_manifest(
        "policy-only-http.yaml",
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: only-http
  namespace: default
spec:
  selector:
    matchLabels:
      app: server
  action: ALLOW
  rules:
  - to:
    - operation:
        ports: ["8080"]
"#,
    )
    .unwrap();
    let client_agent = start_agent(&mut sb, NodeId::Xuegod63, &[]);
    let server_agent = start_agent(&mut sb, NodeId::Xuegod64, &[]);

    assert_denied(&curl, &server, HTTP);
    assert_denied(&other, &server, ECHO);
    assert_served(&other, &server, HTTP);
    assert_reset(sleep.connect(server.addr(HTTP)), "sleep to server:8080");

    let inbound = |source: &str, flags: &str| {
        metric(
            &server_agent,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "destination"),
                ("source_workload", source),
                ("destination_workload", "server"),
                ("response_flags", flags),
            ],
        )
    };
    assert_eq!(inbound("curl", "DENY"), 1.0);
    assert_eq!(inbound("other", "DENY"), 1.0);
    assert_eq!(inbound("other", "-"), 1.0);
    assert_eq!(
        inbound("sleep", "DENY"),
        0.0,
        "the denial left sleep's node"
    );
    assert_eq!(
        metric(
            &client_agent,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("source_workload", "sleep"),
                ("destination_workload", "server"),
                ("response_flags", "DENY"),
            ],
        ),
        1.0
    );
    assert_eq!(
        denied_total(&server_agent, "inbound", "default/deny-listed"),
        1.0
    );
    assert_eq!(denied_total(&server_agent, "inbound", "none"), 1.0);
    assert_eq!(
        denied_total(&client_agent, "outbound", "default/deny-listed"),
        1.0
    );

    let log = server_agent.log().unwrap();
    let curl_ip = curl.ip().to_string();
    assert!(
        log.lines().any(|line| line.contains("denied")
            && line.contains("default/deny-listed")
            && line.contains(&curl_ip)),
        "no denial with the policy's name in the log:\n{log}"
    );

    for agent in [&client_agent, &server_agent] {
        let text = agent.metrics().unwrap();
        let out = promtool_check(&text);
        assert!(
            out.status.success(),
            "promtool check metrics failed:\n{}{}\n{text}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(decisions(&server_agent, "redirected") >= 3.0);
}

/// Istio's "deny all" and "allow nothing" examples, exactly as its docs
/// have them, on a namespace enrolled by its label.
#[test]
fn istio_deny_all_and_allow_nothing_examples() {
    const DENY_ALL: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: foo
spec:
  action: DENY
  # the rules field has an empty rule, the policy will always match.
  rules:
  - {}
"#;
    const ALLOW_NOTHING: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: foo
spec:
  {}
"#;
    let mut sb = sandbox("istio_deny_all_allow_nothing");
    sb.add_namespace("foo", &[("weir.dev/mesh", "enabled")])
        .unwrap();
    let spec = PodSpec::new("httpbin", NodeId::Xuegod64)
        .namespace("foo")
        .label("app", "httpbin")
        .ports(&[("http", HTTP)]);
    let server = add_server(&mut sb, spec);
    let client = sb.add_pod(client_spec("curl", "default", "curl")).unwrap();
    let neighbour = sb.add_pod(client_spec("curl", "foo", "curl")).unwrap();
    let agent = start_agent(&mut sb, NodeId::Xuegod64, &[]);
    assert_served(&client, &server, HTTP);

    for (file, yaml, policy) in [
        ("policy-deny-all.yaml", DENY_ALL, "foo/deny-all"),
        ("policy-allow-nothing.yaml", ALLOW_NOTHING, "none"),
    ] {
        sb.write_manifest(file, yaml).unwrap();
        wait_until(&format!("{file} applies"), || {
            try_echo(&client, server.addr(HTTP)).is_err()
        });
        let before = denied_total(&agent, "inbound", policy);
        assert_denied(&client, &server, HTTP);
        assert_denied(&client, &server, ECHO);
        // Its own namespace is no exception.
        assert_denied(&neighbour, &server, HTTP);
        assert_eq!(denied_total(&agent, "inbound", policy), before + 3.0);

        sb.remove_manifest(file).unwrap();
        wait_until(&format!("{file} is gone"), || {
            try_echo(&client, server.addr(HTTP)).is_ok()
        });
        assert_served(&client, &server, HTTP);
        assert_served(&neighbour, &server, ECHO);
    }
}
