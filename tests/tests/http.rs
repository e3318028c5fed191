//! HTTP traffic management end to end: Istio's VirtualService and
//! DestinationRule, in Istio's Bookinfo shapes, applied by a real agent to
//! a meshed client's requests.
//!
//! The apps are small HTTP/1.1 servers written here; each answers with its
//! app and version. They run in pods that are not enrolled, so only the
//! client's side is meshed, as in `outbound.rs`.

mod common;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::thread;
use std::time::{Duration, Instant};

use common::{IO_TIMEOUT, accept_loop, echo, meshed, metric, redirected, serve_echo, wait_until};
use weir_sandbox::{Agent, NodeId, Pod, PodSpec, Sandbox, SandboxOptions};

const PORT: u16 = 9080;

/// What an app answers: status, body and how long it takes.
/// Gets the request's path and headers (names lowercase).
type Handler = Arc<dyn Fn(&str, &Headers) -> (u16, String, Duration) + Send + Sync>;

/// Serves HTTP/1.1 with keep-alive on `PORT` in `pod`; `handle` gets the
/// request's path.
/// A pod of `app` at `version`, labelled as Bookinfo's Deployments label
/// theirs.
fn versioned(name: &str, app: &str, version: &str, node: NodeId) -> PodSpec {
    PodSpec::new(name, node)
        .label("app", app)
        .label("version", version)
}

fn serve_http(pod: &Pod, handle: Handler) {
    accept_loop(pod.listen(PORT).unwrap(), move |stream, _| {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut stream = stream;
        loop {
            let Some((path, headers, _body)) = read_request(&mut reader)? else {
                return Ok(());
            };
            let (status, body, delay) = handle(&path, &headers);
            thread::sleep(delay);
            write!(
                stream,
                "HTTP/1.1 {status} Whatever\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )?;
        }
    });
}

/// An app that says its name and version.
fn app(name: &str, version: &str) -> Handler {
    let answer = format!("{name} {version}");
    Arc::new(move |_, _| (200, answer.clone(), Duration::ZERO))
}

type Headers = Vec<(String, String)>;
type Head = (String, Headers, Vec<u8>);

/// One request: its path, headers and body; None at the end of the stream.
fn read_request(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Head>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
    let (headers, body) = read_rest(reader)?;
    Ok(Some((path, headers, body)))
}

fn read_rest(reader: &mut BufReader<TcpStream>) -> io::Result<(Headers, Vec<u8>)> {
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim(), 16).map_err(io::Error::other)?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk)?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = header("content-length") {
        body = vec![0; length.parse().map_err(io::Error::other)?];
        reader.read_exact(&mut body)?;
    }
    Ok((headers, body))
}

struct Response {
    status: u16,
    headers: Headers,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive HTTP/1.1 client connection from a pod.
struct Client {
    reader: BufReader<TcpStream>,
    host: String,
}

impl Client {
    fn connect(pod: &Pod, addr: SocketAddr, host: &str) -> Client {
        let stream = pod.connect(addr).unwrap();
        assert!(redirected(&stream), "the client went direct");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        Client {
            reader: BufReader::new(stream),
            host: host.to_owned(),
        }
    }

    fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.try_get(path, headers).unwrap()
    }

    fn try_get(&mut self, path: &str, headers: &[(&str, &str)]) -> io::Result<Response> {
        self.request("GET", path, headers)
    }

    fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> io::Result<Response> {
        let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {}\r\n", self.host);
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        self.reader.get_mut().write_all(request.as_bytes())?;
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line)?;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let (headers, body) = read_rest(&mut self.reader)?;
        Ok(Response {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// One request on a new connection, for polling until a change applies;
/// None when the connection fails (the service is not known yet, say).
fn poll(pod: &Pod, addr: SocketAddr, host: &str, headers: &[(&str, &str)]) -> Option<Response> {
    let stream = pod.connect(addr).ok()?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    let mut client = Client {
        reader: BufReader::new(stream),
        host: host.to_owned(),
    };
    client.try_get("/", headers).ok()
}

struct Bookinfo {
    sb: Sandbox,
    agent: Agent,
    client: Pod,
    reviews: SocketAddr,
}

impl Bookinfo {
    fn client(&self, host: &str, addr: SocketAddr) -> Client {
        Client::connect(&self.client, addr, host)
    }

    /// Writes a manifest, then waits until the agent applies it: until
    /// `check` holds for a new connection's request.
    fn apply(&self, file: &str, yaml: &str, mut check: impl FnMut(&mut Client) -> bool) {
        self.sb.write_manifest(file, yaml).unwrap();
        wait_until(&format!("{file} applies"), || {
            check(&mut self.client("reviews", self.reviews))
        });
    }
}

/// reviews v1, v2 and v3 on both nodes, behind an HTTP service; a meshed
/// client on xuegod63.
fn bookinfo(test: &str) -> Bookinfo {
    let mut sb = Sandbox::new(SandboxOptions::for_test(test)).unwrap();
    let client = sb
        .add_pod(
            PodSpec::new("productpage-v1", NodeId::Xuegod63)
                .label("weir.dev/mesh", "enabled")
                .label("app", "productpage")
                .label("version", "v1"),
        )
        .unwrap();
    for (version, node) in [
        ("v1", NodeId::Xuegod63),
        ("v2", NodeId::Xuegod64),
        ("v3", NodeId::Xuegod64),
    ] {
        let pod = sb
            .add_pod(versioned(
                &format!("reviews-{version}"),
                "reviews",
                version,
                node,
            ))
            .unwrap();
        serve_http(&pod, app("reviews", version));
    }
    let vip = sb.addressing().service_ip(20);
    sb.add_http_service("reviews", "default", vip, PORT, PORT, &[("app", "reviews")])
        .unwrap();
    let agent = sb.start_agent(NodeId::Xuegod63, &[]).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    Bookinfo {
        sb,
        agent,
        client,
        reviews: SocketAddr::from((vip, PORT)),
    }
}

// Istio's samples/bookinfo/networking files, unchanged but for leaving out
// the hosts these tests do not run.
const DESTINATION_RULE_ALL: &str = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
  - name: v3
    labels:
      version: v3
";

const VIRTUAL_SERVICE_ALL_V1: &str = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
";

const VIRTUAL_SERVICE_REVIEWS_50_V3: &str = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 50
    - destination:
        host: reviews
        subset: v3
      weight: 50
";

const VIRTUAL_SERVICE_REVIEWS_TEST_V2: &str = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
";

#[test]
fn request_routing_and_traffic_shifting() {
    let b = bookinfo("http-routing");

    // Without rules, every version serves.
    let mut client = b.client("reviews", b.reviews);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let response = client.get("/reviews/0", &[]);
        assert_eq!(response.status, 200);
        seen.insert(response.body);
    }
    assert_eq!(seen.len(), 3, "{seen:?}");

    // All traffic to v1.
    b.sb.write_manifest("destination-rule-all.yaml", DESTINATION_RULE_ALL)
        .unwrap();
    b.apply("virtual-service.yaml", VIRTUAL_SERVICE_ALL_V1, |client| {
        (0..5).all(|_| client.get("/", &[]).body == "reviews v1")
    });
    let mut client = b.client("reviews", b.reviews);
    for _ in 0..50 {
        let response = client.get("/reviews/0", &[]);
        assert_eq!(
            (response.status, response.body.as_str()),
            (200, "reviews v1")
        );
        assert!(
            response.header("server").is_none(),
            "not made up by the proxy"
        );
    }

    // 50/50 between v1 and v3: each share within 5 standard deviations.
    b.apply(
        "virtual-service.yaml",
        VIRTUAL_SERVICE_REVIEWS_50_V3,
        |client| (0..40).any(|_| client.get("/", &[]).body == "reviews v3"),
    );
    let mut client = b.client("reviews", b.reviews);
    let started = Instant::now();
    let (mut v1, mut v3) = (0, 0);
    for _ in 0..1000 {
        match client.get("/reviews/0", &[]).body.as_str() {
            "reviews v1" => v1 += 1,
            "reviews v3" => v3 += 1,
            other => panic!("{other:?} is neither v1 nor v3"),
        }
        assert!(started.elapsed() < Duration::from_secs(60), "too slow");
    }
    let deviation = 5.0 * (1000.0f64 * 0.5 * 0.5).sqrt();
    assert!(
        (f64::from(v1) - 500.0).abs() <= deviation,
        "v1 {v1}, v3 {v3}"
    );

    // end-user: jason goes to v2, everyone else to v1.
    b.apply(
        "virtual-service.yaml",
        VIRTUAL_SERVICE_REVIEWS_TEST_V2,
        |client| client.get("/", &[("end-user", "jason")]).body == "reviews v2",
    );
    let mut client = b.client("reviews", b.reviews);
    for _ in 0..20 {
        assert_eq!(client.get("/", &[("end-user", "jason")]).body, "reviews v2");
        assert_eq!(client.get("/", &[("end-user", "mike")]).body, "reviews v1");
        assert_eq!(client.get("/", &[]).body, "reviews v1");
    }

    // Istio's HTTP metrics, by destination version.
    let requests = |version: &str| {
        metric(
            &b.agent,
            "istio_requests_total",
            &[
                ("reporter", "source"),
                ("source_workload", "productpage-v1"),
                ("destination_version", version),
                ("destination_service", "reviews.default.svc.cluster.local"),
                ("request_protocol", "http"),
                ("response_code", "200"),
                ("response_flags", "-"),
            ],
        )
    };
    assert!(requests("v2") >= 21.0, "{}", b.agent.metrics().unwrap());
    assert!(requests("v3") >= f64::from(v3));
    let text = b.agent.metrics().unwrap();
    assert!(text.contains("istio_request_duration_milliseconds_bucket{"));
    assert!(text.contains("le=\"0.5\""));
    for family in ["istio_request_bytes", "istio_response_bytes"] {
        let count = metric(
            &b.agent,
            &format!("{family}_count"),
            &[("destination_version", "v2"), ("response_code", "200")],
        );
        assert_eq!(count, requests("v2"), "{family}");
        let sum = metric(
            &b.agent,
            &format!("{family}_sum"),
            &[("destination_version", "v2"), ("response_code", "200")],
        );
        // Each answer has at least its body, "reviews v2".
        assert!(sum >= 10.0 * count, "{family}: {sum}");
    }
    // Valid, but for promtool's advice against Istio's own metric name.
    let checked = common::promtool_check(&text);
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let istio_name = "istio_request_duration_milliseconds use base unit \"seconds\"";
    assert!(
        complaints
            .lines()
            .all(|line| line.trim().is_empty() || line.contains(istio_name)),
        "{complaints}"
    );
    // Consistent hashing on a header: each user stays on one version.
    b.sb.write_manifest(
        "destination-rule-all.yaml",
        &format!(
            "{DESTINATION_RULE_ALL}  trafficPolicy:\n    loadBalancer:\n      consistentHash:\n        httpHeaderName: x-user\n"
        ),
    )
    .unwrap();
    b.apply(
        "virtual-service.yaml",
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}}]
",
        |client| {
            (0..10).all(|_| {
                client.get("/", &[("x-user", "u1")]).body
                    == client.get("/", &[("x-user", "u1")]).body
            }) && (0..20).any(|_| client.get("/", &[]).body != "reviews v1")
        },
    );
    let mut client = b.client("reviews", b.reviews);
    let mut versions = std::collections::BTreeSet::new();
    for user in 0..12 {
        let user = format!("user-{user}");
        let first = client.get("/", &[("x-user", &user)]).body;
        for _ in 0..5 {
            assert_eq!(
                client.get("/", &[("x-user", &user)]).body,
                first,
                "{user} moved"
            );
        }
        versions.insert(first);
    }
    assert!(versions.len() >= 2, "{versions:?}");

    let dump = b.agent.config_dump().unwrap();
    assert_eq!(
        dump["cluster"]["virtual_services"][0]["name"], "reviews",
        "{dump}"
    );
}

/// A service of one app, behind an HTTP service, in the bookinfo sandbox.
fn add_app(b: &mut Bookinfo, name: &str, ip: u16, handler: Handler) -> SocketAddr {
    let pod =
        b.sb.add_pod(versioned(
            &format!("{name}-v1"),
            name,
            "v1",
            NodeId::Xuegod64,
        ))
        .unwrap();
    serve_http(&pod, handler);
    let vip = b.sb.addressing().service_ip(ip);
    b.sb.add_http_service(name, "default", vip, PORT, PORT, &[("app", name)])
        .unwrap();
    SocketAddr::from((vip, PORT))
}

#[test]
fn timeouts_retries_and_faults() {
    let mut b = bookinfo("http-resilience");
    let slow = add_app(
        &mut b,
        "slow",
        21,
        Arc::new(|_, _| (200, "slow v1".into(), Duration::from_secs(2))),
    );
    let tries = Arc::new(AtomicUsize::new(0));
    let counted = tries.clone();
    let flaky = add_app(
        &mut b,
        "flaky",
        22,
        Arc::new(move |_, _| {
            counted.fetch_add(1, SeqCst);
            (503, "flaky v1".into(), Duration::ZERO)
        }),
    );
    let ratings = add_app(&mut b, "ratings", 23, app("ratings", "v1"));
    wait_until("the services are known", || {
        poll(&b.client, ratings, "ratings", &[]).is_some_and(|r| r.body == "ratings v1")
    });

    // Istio's default retry policy: a 503 is tried 3 times in all.
    let mut client = Client::connect(&b.client, flaky, "flaky");
    let before = tries.load(SeqCst);
    let response = client.get("/", &[]);
    assert_eq!(response.status, 503);
    assert_eq!(tries.load(SeqCst) - before, 3, "default policy: 2 retries");
    assert_eq!(response.body, "flaky v1", "the upstream's own answer");

    // attempts: 3 on 5xx: 4 tries.
    b.sb.write_manifest(
        "flaky.yaml",
        "
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: flaky}
spec:
  hosts: [flaky.default.svc.cluster.local]
  http:
  - route: [{destination: {host: flaky}}]
    retries: {attempts: 3, retryOn: 5xx}
",
    )
    .unwrap();
    wait_until("the retry policy applies", || {
        let before = tries.load(SeqCst);
        poll(&b.client, flaky, "flaky", &[]);
        tries.load(SeqCst) - before == 4
    });
    let before = tries.load(SeqCst);
    assert_eq!(client.get("/", &[]).status, 503);
    assert_eq!(tries.load(SeqCst) - before, 4, "attempts counts retries");
    let exhausted = metric(
        &b.agent,
        "istio_requests_total",
        &[
            ("destination_service_name", "flaky"),
            ("response_code", "503"),
            ("response_flags", "URX"),
        ],
    );
    assert!(exhausted >= 2.0, "{}", b.agent.metrics().unwrap());

    // A 0.5 s timeout on a service that takes 2 s: 504 after about 0.5 s.
    b.sb.write_manifest(
        "slow.yaml",
        "
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: slow}
spec:
  hosts: [slow]
  http:
  - route: [{destination: {host: slow}}]
    timeout: 0.5s
",
    )
    .unwrap();
    wait_until("the timeout applies", || {
        poll(&b.client, slow, "slow", &[]).is_some_and(|r| r.status == 504)
    });
    let mut client = Client::connect(&b.client, slow, "slow");
    let started = Instant::now();
    let response = client.get("/", &[]);
    let took = started.elapsed();
    assert_eq!(response.status, 504);
    assert_eq!(response.body, "upstream request timeout");
    assert_eq!(response.header("server"), Some("weir"));
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    let timed_out = metric(
        &b.agent,
        "istio_requests_total",
        &[
            ("destination_service_name", "slow"),
            ("response_code", "504"),
            ("response_flags", "UT"),
        ],
    );
    assert!(timed_out >= 1.0);

    // Istio's ratings-test-abort and -delay, for one user; at a percentage.
    b.sb.write_manifest(
        "ratings.yaml",
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      abort:
        percentage:
          value: 100.0
        httpStatus: 500
    route:
    - destination:
        host: ratings
  - match:
    - headers:
        end-user:
          exact: mike
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 300ms
    route:
    - destination:
        host: ratings
  - fault:
      abort:
        percentage:
          value: 50
        httpStatus: 503
    route:
    - destination:
        host: ratings
",
    )
    .unwrap();
    wait_until("the faults apply", || {
        poll(&b.client, ratings, "ratings", &[("end-user", "jason")])
            .is_some_and(|r| r.status == 500)
    });
    let mut client = Client::connect(&b.client, ratings, "ratings");
    let response = client.get("/", &[("end-user", "jason")]);
    assert_eq!(
        (response.status, response.body.as_str()),
        (500, "fault filter abort")
    );
    assert_eq!(response.header("server"), Some("weir"));
    let started = Instant::now();
    let response = client.get("/", &[("end-user", "mike")]);
    assert_eq!(
        (response.status, response.body.as_str()),
        (200, "ratings v1")
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    let aborted = (0..400)
        .filter(|_| {
            let response = client.get("/", &[]);
            assert!(matches!(response.status, 200 | 503), "{}", response.status);
            response.status == 503
        })
        .count();
    let deviation = 5.0 * (400.0f64 * 0.25).sqrt();
    assert!(
        (aborted as f64 - 200.0).abs() <= deviation,
        "{aborted} of 400 aborted"
    );
    let injected = metric(
        &b.agent,
        "istio_requests_total",
        &[
            ("destination_service_name", "ratings"),
            ("response_code", "503"),
            ("response_flags", "FI"),
        ],
    );
    assert_eq!(injected, aborted as f64);
}

#[test]
fn tcp_service_stays_l4_and_http_rules_for_it_are_reported() {
    let mut sb = Sandbox::new(SandboxOptions::for_test("http-tcp")).unwrap();
    let client = sb.add_pod(meshed("client", NodeId::Xuegod63)).unwrap();
    let server = sb
        .add_pod(PodSpec::new("echo", NodeId::Xuegod64).label("app", "echo"))
        .unwrap();
    serve_echo(&server);
    let vip: Ipv4Addr = sb.addressing().service_ip(30);
    sb.add_service("echo", "default", vip, 80, common::ECHO, &[("app", "echo")])
        .unwrap();
    sb.write_manifest(
        "echo-vs.yaml",
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: [echo]
  http:
  - route: [{destination: {host: echo}}]
    timeout: 1s
",
    )
    .unwrap();
    let agent = sb.start_agent(NodeId::Xuegod63, &[]).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();

    let mut stream = client.connect(SocketAddr::from((vip, 80))).unwrap();
    assert!(redirected(&stream));
    assert_eq!(
        echo(&mut stream, b"not http at all").unwrap().server,
        "echo"
    );
    wait_until("the connection is counted at L4", || {
        metric(
            &agent,
            "istio_tcp_connections_closed_total",
            &[("destination_service_name", "echo")],
        ) == 1.0
    });
    assert_eq!(metric(&agent, "istio_requests_total", &[]), 0.0);
    let dump = agent.config_dump().unwrap();
    let warning = dump["cluster"]["routing_warnings"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(warning.contains("not declared HTTP"), "{dump}");
    let log = agent.log().unwrap();
    assert!(log.contains("not declared HTTP"), "{log}");
}

/// An h2c server in `pod`, shaped like gRPC: each answer says the path and
/// how many request bytes came, and ends with the trailer `grpc-status: 0`.
fn serve_h2c(pod: &Pod) {
    use http_body_util::BodyExt;
    use hyper::body::Frame;

    let listener = pod.listen(PORT).unwrap();
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(
                    |request: hyper::Request<hyper::body::Incoming>| async move {
                        let path = request.uri().path().to_owned();
                        let te = request.headers().get("te").cloned();
                        let body = request.into_body().collect().await?.to_bytes();
                        let mut trailers = hyper::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        let answer = format!("grpc v1 {path} {} te={te:?}", body.len());
                        let frames = [Frame::data(answer.into()), Frame::trailers(trailers)];
                        Ok::<_, hyper::Error>(hyper::Response::new(Frames(frames.into())))
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
                );
            }
        });
    });
}

/// A body of frames that are all there, whose length is not told.
struct Frames(std::collections::VecDeque<hyper::body::Frame<bytes::Bytes>>);

impl hyper::body::Body for Frames {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, hyper::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

#[test]
fn h2c_and_grpc_pass_through_with_trailers() {
    use http_body_util::{BodyExt, Full};

    let mut sb = Sandbox::new(SandboxOptions::for_test("http-h2c")).unwrap();
    let client = sb.add_pod(meshed("client", NodeId::Xuegod63)).unwrap();
    let server = sb
        .add_pod(versioned("greeter-v1", "greeter", "v1", NodeId::Xuegod64))
        .unwrap();
    serve_h2c(&server);
    let vip = sb.addressing().service_ip(40);
    sb.write_manifest(
        "greeter.yaml",
        &format!(
            "
apiVersion: v1
kind: Service
metadata: {{name: greeter, namespace: default}}
spec:
  clusterIP: {vip}
  selector: {{app: greeter}}
  ports: [{{name: api, port: {PORT}, appProtocol: grpc}}]
"
        ),
    )
    .unwrap();
    let agent = sb.start_agent(NodeId::Xuegod63, &[]).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stream = client.connect(SocketAddr::from((vip, PORT))).unwrap();
    assert!(redirected(&stream));
    stream.set_nonblocking(true).unwrap();
    runtime.block_on(async move {
        let stream = tokio::net::TcpStream::from_std(stream).unwrap();
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        // Several calls on one connection; the last with a body of unknown
        // length, which the proxy streams.
        for (i, streamed) in [(0, false), (1, false), (2, true)] {
            let payload = bytes::Bytes::from(vec![b'x'; 100 + i]);
            let body = if streamed {
                Frames([hyper::body::Frame::data(payload)].into()).boxed()
            } else {
                Full::new(payload).map_err(|never| match never {}).boxed()
            };
            let request =
                hyper::Request::post(format!("http://greeter:{PORT}/helloworld.Greeter/SayHello"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(body)
                    .unwrap();
            let response = tokio::time::timeout(IO_TIMEOUT, sender.send_request(request))
                .await
                .expect("an answer in time")
                .unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.version(), hyper::Version::HTTP_2);
            let collected = response.into_body().collect().await.unwrap();
            let trailers = collected.trailers().cloned().expect("trailers");
            assert_eq!(trailers["grpc-status"], "0");
            let body = String::from_utf8(collected.to_bytes().to_vec()).unwrap();
            assert_eq!(
                body,
                format!(
                    "grpc v1 /helloworld.Greeter/SayHello {} te=Some(\"trailers\")",
                    100 + i
                )
            );
        }
    });
    let requests = metric(
        &agent,
        "istio_requests_total",
        &[
            ("destination_service_name", "greeter"),
            ("destination_version", "v1"),
            ("response_code", "200"),
            ("request_protocol", "grpc"),
        ],
    );
    assert_eq!(requests, 3.0, "{}", agent.metrics().unwrap());
}

/// Istio's timeout task: a delay injected on ratings (seen by reviews'
/// proxy) and a timeout on reviews (applied by productpage's): the client
/// gets 504 after the timeout, not the ratings answer after the delay.
#[test]
fn bookinfo_timeout_with_a_delay_on_ratings() {
    let mut sb = Sandbox::new(SandboxOptions::for_test("http-bookinfo-timeout")).unwrap();
    let meshed = |name: &str, app: &str| {
        PodSpec::new(name, NodeId::Xuegod63)
            .label("weir.dev/mesh", "enabled")
            .label("app", app)
            .label("version", "v1")
    };
    let productpage = sb.add_pod(meshed("productpage-v1", "productpage")).unwrap();
    let reviews = sb.add_pod(meshed("reviews-v2", "reviews")).unwrap();
    let ratings = sb
        .add_pod(versioned("ratings-v1", "ratings", "v1", NodeId::Xuegod64))
        .unwrap();
    serve_http(&ratings, app("ratings", "v1"));
    let ratings_vip = SocketAddr::from((sb.addressing().service_ip(51), PORT));
    // reviews calls ratings, through its own node proxy, for each request.
    let caller = reviews.clone();
    serve_http(
        &reviews,
        Arc::new(move |_, _| {
            let answer = poll(&caller, ratings_vip, "ratings", &[]);
            let body = match answer {
                Some(r) => format!("reviews v2, ratings said {} {}", r.status, r.body),
                None => "reviews v2, ratings unreachable".to_owned(),
            };
            (200, body, Duration::ZERO)
        }),
    );
    let reviews_vip = SocketAddr::from((sb.addressing().service_ip(50), PORT));
    for (name, vip) in [("reviews", reviews_vip), ("ratings", ratings_vip)] {
        let SocketAddr::V4(vip) = vip else {
            unreachable!()
        };
        sb.add_http_service(name, "default", *vip.ip(), PORT, PORT, &[("app", name)])
            .unwrap();
    }
    let agent = sb.start_agent(NodeId::Xuegod63, &[]).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    wait_until("reviews answers with ratings", || {
        poll(&productpage, reviews_vip, "reviews", &[])
            .is_some_and(|r| r.body == "reviews v2, ratings said 200 ratings v1")
    });

    // As in Istio's task, with its times shortened: a 1 s delay for jason
    // on ratings, a 0.5 s timeout on reviews.
    sb.write_manifest(
        "ratings-delay.yaml",
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 1s
    route:
    - destination:
        host: ratings
        subset: v1
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
spec:
  host: ratings
  subsets:
  - name: v1
    labels:
      version: v1
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
    - reviews
  http:
  - route:
    - destination:
        host: reviews
    timeout: 0.5s
",
    )
    .unwrap();
    wait_until("the delay and the timeout apply", || {
        poll(&productpage, reviews_vip, "reviews", &[]).is_some_and(|r| r.status == 504)
    });
    let started = Instant::now();
    let response = poll(&productpage, reviews_vip, "reviews", &[]).unwrap();
    let took = started.elapsed();
    assert_eq!(
        (response.status, response.body.as_str()),
        (504, "upstream request timeout")
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1000),
        "{took:?}"
    );
    // reviews itself got its answer from ratings, a second late.
    wait_until("the delayed ratings call is counted", || {
        metric(
            &agent,
            "istio_requests_total",
            &[
                ("source_workload", "reviews-v2"),
                ("destination_service_name", "ratings"),
                ("response_flags", "DI"),
            ],
        ) >= 1.0
    });
}

/// Istio's circuit-breaking task, in its shape: `maxConnections: 1` and
/// `http1MaxPendingRequests: 1` under 20 requests at once.
#[test]
fn circuit_breaker_overflows_with_uo() {
    let mut sb = Sandbox::new(SandboxOptions::for_test("http-breaker")).unwrap();
    let client = sb.add_pod(meshed("fortio", NodeId::Xuegod63)).unwrap();
    let server = sb
        .add_pod(versioned("httpbin-v1", "httpbin", "v1", NodeId::Xuegod64))
        .unwrap();
    // Counts the connections open at once, as the server sees them.
    let (open, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    {
        let (open, most) = (open.clone(), most.clone());
        accept_loop(server.listen(PORT).unwrap(), move |stream, _| {
            let now = open.fetch_add(1, SeqCst) + 1;
            most.fetch_max(now, SeqCst);
            let mut reader = BufReader::new(stream.try_clone()?);
            let mut stream = stream;
            let served = (|| -> io::Result<()> {
                while read_request(&mut reader)?.is_some() {
                    thread::sleep(Duration::from_millis(500));
                    stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nhttpbin")?;
                }
                Ok(())
            })();
            open.fetch_sub(1, SeqCst);
            served
        });
    }
    let vip = sb.addressing().service_ip(60);
    sb.add_http_service("httpbin", "default", vip, PORT, PORT, &[("app", "httpbin")])
        .unwrap();
    sb.write_manifest(
        "httpbin-breaker.yaml",
        "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
",
    )
    .unwrap();
    let agent = sb.start_agent(NodeId::Xuegod63, &[]).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let addr = SocketAddr::from((vip, PORT));
    wait_until("httpbin answers", || {
        poll(&client, addr, "httpbin", &[]).is_some_and(|r| r.body == "httpbin")
    });

    let start = Arc::new(std::sync::Barrier::new(20));
    let callers: Vec<_> = (0..20)
        .map(|_| {
            let (client, start) = (client.clone(), start.clone());
            thread::spawn(move || {
                let mut connection = Client::connect(&client, addr, "httpbin");
                start.wait();
                connection.get("/get", &[])
            })
        })
        .collect();
    let responses: Vec<Response> = callers.into_iter().map(|c| c.join().unwrap()).collect();
    let overflowed = responses
        .iter()
        .filter(|r| {
            r.status == 503
                && r.header("server") == Some("weir")
                && r.body.ends_with("reset reason: overflow")
        })
        .count();
    let served = responses.iter().filter(|r| r.status == 200).count();
    assert_eq!(overflowed + served, 20);
    assert!(overflowed >= 5, "{overflowed} overflowed");
    assert!(served >= 2, "one active and one pending are served");
    assert_eq!(
        most.load(SeqCst),
        1,
        "the server saw more than one connection at a time"
    );
    let counted = metric(
        &agent,
        "istio_requests_total",
        &[
            ("destination_service_name", "httpbin"),
            ("response_code", "503"),
            ("response_flags", "UO"),
        ],
    );
    assert_eq!(counted, overflowed as f64);
}

/// Redirect, direct response, rewrite and header changes, on one
/// VirtualService.
#[test]
fn redirect_rewrite_direct_response_and_headers() {
    // The access log, on at debug level for its target, as JSON.
    // SAFETY: nextest runs each test in a process of its own, and nothing
    // else in it reads the environment yet; the agent inherits it.
    unsafe { std::env::set_var("RUST_LOG", "info,access=debug") };
    let mut sb = Sandbox::new(SandboxOptions::for_test("http-rewrite")).unwrap();
    let client = sb.add_pod(meshed("client", NodeId::Xuegod63)).unwrap();
    let web = sb
        .add_pod(PodSpec::new("web-v1", NodeId::Xuegod64).label("app", "web"))
        .unwrap();
    // Answers with the path and the headers the test looks at.
    serve_http(
        &web,
        Arc::new(|path, headers| {
            let header = |name: &str| {
                headers
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|(_, v)| v.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let body = format!(
                "{path} rewritten={} secret={} dest={} host={}",
                header("x-rewritten"),
                header("x-secret"),
                header("x-dest"),
                header("host")
            );
            (200, body, Duration::ZERO)
        }),
    );
    let vip = sb.addressing().service_ip(70);
    sb.add_http_service("web", "default", vip, PORT, PORT, &[("app", "web")])
        .unwrap();
    // Gets copies of the default route's requests.
    let shadow = sb
        .add_pod(PodSpec::new("shadow-v1", NodeId::Xuegod64).label("app", "shadow"))
        .unwrap();
    let copies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = copies.clone();
    serve_http(
        &shadow,
        Arc::new(move |path, headers| {
            let host = headers
                .iter()
                .find(|(n, _)| n == "host")
                .map(|(_, v)| v.clone());
            seen.lock()
                .unwrap()
                .push(format!("{path} {}", host.unwrap_or_default()));
            (500, "ignored".into(), Duration::ZERO)
        }),
    );
    let shadow_vip = sb.addressing().service_ip(71);
    sb.add_http_service(
        "shadow",
        "default",
        shadow_vip,
        PORT,
        PORT,
        &[("app", "shadow")],
    )
    .unwrap();
    sb.write_manifest(
        "web.yaml",
        "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - match: [{uri: {prefix: /old/}}]
    redirect: {uri: /new, authority: web.example}
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: short and stout}}
  - match: [{uri: {prefix: /cors/}}]
    corsPolicy:
      allowOrigins: [{exact: 'https://example.com'}]
      allowMethods: [GET, POST]
      allowHeaders: [x-custom]
      exposeHeaders: [x-served]
      maxAge: 24h
      allowCredentials: true
    route: [{destination: {host: web}}]
  - match: [{uri: {prefix: /api/v1/}}]
    rewrite: {uri: /v2/, authority: web.internal}
    headers:
      request: {set: {x-rewritten: 'yes'}, remove: [x-secret]}
      response: {add: {x-served-by: weir-test}}
    route: [{destination: {host: web}}]
  - route:
    - destination: {host: web}
      headers: {request: {add: {x-dest: web}}}
    mirror: {host: shadow}
    mirrorPercentage: {value: 100.0}
",
    )
    .unwrap();
    let agent = sb
        .start_agent(NodeId::Xuegod63, &["--log-format", "json"])
        .unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let addr = SocketAddr::from((vip, PORT));
    wait_until("the rules apply", || {
        poll(&client, addr, "web", &[]).is_some_and(|r| r.body.contains("dest=web"))
    });
    let mut web = Client::connect(&client, addr, "web:9080");

    let moved = web.get("/old/page?q=1", &[]);
    assert_eq!(moved.status, 301);
    assert_eq!(moved.header("location"), Some("http://web.example/new?q=1"));
    assert_eq!(moved.header("server"), Some("weir"));

    let teapot = web.get("/teapot", &[]);
    assert_eq!(
        (teapot.status, teapot.body.as_str()),
        (418, "short and stout")
    );

    let api = web.get("/api/v1/items?x=1", &[("x-secret", "s3cret")]);
    assert_eq!(api.status, 200);
    assert_eq!(
        api.body,
        "/v2/items?x=1 rewritten=yes secret= dest= host=web.internal"
    );
    assert_eq!(api.header("x-served-by"), Some("weir-test"));

    // CORS: a preflight from an allowed origin is answered by the proxy.
    let origin = ("origin", "https://example.com");
    let preflight = web
        .request(
            "OPTIONS",
            "/cors/x",
            &[origin, ("access-control-request-method", "POST")],
        )
        .unwrap();
    assert_eq!((preflight.status, preflight.body.as_str()), (200, ""));
    assert_eq!(preflight.header("server"), Some("weir"));
    for (name, value) in [
        ("access-control-allow-origin", "https://example.com"),
        ("access-control-allow-methods", "GET,POST"),
        ("access-control-allow-headers", "x-custom"),
        ("access-control-max-age", "86400"),
        ("access-control-allow-credentials", "true"),
    ] {
        assert_eq!(preflight.header(name), Some(value), "{name}");
    }
    let actual = web.get("/cors/x", &[origin]);
    assert!(actual.body.starts_with("/cors/x "), "{}", actual.body);
    assert_eq!(
        actual.header("access-control-allow-origin"),
        Some("https://example.com")
    );
    assert_eq!(
        actual.header("access-control-expose-headers"),
        Some("x-served")
    );
    // Another origin's preflight goes to the app, which answers it.
    let other_origin = web
        .request(
            "OPTIONS",
            "/cors/x",
            &[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "POST"),
            ],
        )
        .unwrap();
    assert!(
        other_origin.body.starts_with("/cors/x "),
        "{}",
        other_origin.body
    );
    assert_eq!(other_origin.header("access-control-allow-origin"), None);

    copies.lock().unwrap().clear();
    let other = web.get("/other", &[("x-secret", "kept")]);
    assert_eq!(
        other.body,
        "/other rewritten= secret=kept dest=web host=web:9080"
    );
    // The copy went to the mirror, which the client never hears from.
    wait_until("the mirror got its copy", || {
        !copies.lock().unwrap().is_empty()
    });
    assert_eq!(*copies.lock().unwrap(), ["/other web-shadow:9080"]);

    // One JSON line per request in the agent's log.
    let teapot_line = |log: &str| {
        log.lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .find(|line| line["target"] == "access" && line["fields"]["path"] == "/teapot")
    };
    wait_until("the access log has the teapot", || {
        agent.log().is_ok_and(|log| teapot_line(&log).is_some())
    });
    let line = teapot_line(&agent.log().unwrap()).unwrap();
    let fields = &line["fields"];
    assert_eq!(fields["method"], "GET", "{line}");
    assert_eq!(fields["response_code"], 418);
    assert_eq!(fields["response_flags"], "-");
    assert_eq!(fields["protocol"], "HTTP/1.1");
    assert_eq!(fields["source"], "default/client");
    assert_eq!(fields["authority"], "web:9080");
    assert_eq!(fields["request_id"].as_str().unwrap().len(), 36);
    assert!(fields["bytes_sent"].as_u64().unwrap() >= "short and stout".len() as u64);
}

/// Istio's outlier detection shape: a pod that answers 500 is ejected
/// after its first failure and gets no more requests.
#[test]
fn outlier_detection_ejects_a_failing_pod() {
    let mut sb = Sandbox::new(SandboxOptions::for_test("http-outlier")).unwrap();
    let client = sb.add_pod(meshed("client", NodeId::Xuegod63)).unwrap();
    let good = sb
        .add_pod(versioned("httpbin-v1", "httpbin", "v1", NodeId::Xuegod64))
        .unwrap();
    serve_http(&good, app("httpbin", "v1"));
    let bad = sb
        .add_pod(versioned("httpbin-v2", "httpbin", "v2", NodeId::Xuegod64))
        .unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    serve_http(
        &bad,
        Arc::new(move |_, _| {
            counted.fetch_add(1, SeqCst);
            (500, "httpbin v2 broken".into(), Duration::ZERO)
        }),
    );
    let vip = sb.addressing().service_ip(80);
    sb.add_http_service("httpbin", "default", vip, PORT, PORT, &[("app", "httpbin")])
        .unwrap();
    sb.write_manifest(
        "httpbin-outlier.yaml",
        "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
",
    )
    .unwrap();
    let agent = sb.start_agent(NodeId::Xuegod63, &[]).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let addr = SocketAddr::from((vip, PORT));
    wait_until("the rule is loaded", || {
        agent
            .config_dump()
            .is_ok_and(|dump| dump.to_string().contains("consecutive_5xx_errors"))
    });
    let mut client = Client::connect(&client, addr, "httpbin");
    let statuses: Vec<u16> = (0..40).map(|_| client.get("/", &[]).status).collect();
    let failed = statuses.iter().filter(|&&status| status == 500).count();
    assert_eq!(failed, 1, "{statuses:?}");
    assert_eq!(hits.load(SeqCst), 1, "the ejected pod got no more requests");
    assert_eq!(statuses.iter().filter(|&&status| status == 200).count(), 39);
}

/// A draining agent closes idle keep-alive connections rather than wait
/// for them until its drain time is up.
#[test]
fn drain_closes_idle_keep_alive_connections() {
    let mut sb = Sandbox::new(SandboxOptions::for_test("http-drain")).unwrap();
    let client = sb.add_pod(meshed("client", NodeId::Xuegod63)).unwrap();
    let web = sb
        .add_pod(PodSpec::new("web-v1", NodeId::Xuegod64).label("app", "web"))
        .unwrap();
    serve_http(&web, app("web", "v1"));
    let vip = sb.addressing().service_ip(90);
    sb.add_http_service("web", "default", vip, PORT, PORT, &[("app", "web")])
        .unwrap();
    // A drain time far longer than the test waits.
    let agent = sb
        .start_agent(NodeId::Xuegod63, &["--drain-seconds", "60"])
        .unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let addr = SocketAddr::from((vip, PORT));
    let mut idle = Client::connect(&client, addr, "web");
    assert_eq!(idle.get("/", &[]).body, "web v1");

    let started = Instant::now();
    agent.sigterm().unwrap();
    let status = agent.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    // The proxy closed the idle connection.
    let mut rest = Vec::new();
    let read = idle.reader.read_to_end(&mut rest);
    assert!(read.is_ok_and(|n| n == 0) || rest.is_empty(), "{rest:?}");
}
