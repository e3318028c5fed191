//! The outbound HTTP path: connections to a Service port that Istio's rules
//! declare HTTP (see [`routing::is_http_port`]) are served here with hyper
//! (HTTP/1.1 with keep-alive, or HTTP/2 with prior knowledge, h2c, as gRPC
//! uses it; told apart by the connection's first bytes) instead of being
//! copied at L4. Each request
//! takes a route of the service's VirtualService, or the service itself,
//! and goes to an endpoint over a pooled upstream connection made in the
//! source pod's namespace, with Istio's timeouts, retries and faults, and
//! is counted in Istio's HTTP metrics.
//!
//! Each upstream endpoint is checked against the destination's
//! AuthorizationPolicy as on the L4 path. A request body of known length up
//! to [`MAX_BUFFERED`] is read whole before forwarding, so that a retry can
//! send it again; any other body streams, and its request is tried once.
//! Responses stream through. Requests go upstream in the protocol they came
//! in, as Istio's sidecar does.

mod balance;
mod breaker;
mod cors;
mod fault;
mod mirror;
mod outlier;
mod pool;
mod retry;
mod route;

use std::cell::Cell;
use std::collections::HashSet;
use std::convert::Infallible;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::debug;

use super::destination::ServiceName;
use super::{PodProxy, ProxyContext, labels};
use crate::metrics::Reporter;
use crate::metrics::http::HttpLabels;
use crate::model::{Cluster, Workload, WorkloadKey};
use crate::routing::{self, HashKey, LoadBalancer, RetryPolicy};
use retry::Outcome;

type Body = BoxBody<Bytes, hyper::Error>;

/// The largest request body kept for retries, as Envoy's default buffer.
pub const MAX_BUFFERED: u64 = 1 << 20;

/// The service port a connection to `orig` is for, when `orig` is a
/// ClusterIP and the port is HTTP: its hostname and port.
pub fn http_service(cluster: &Cluster, orig: SocketAddr) -> Option<(String, u16)> {
    let (service, port) = cluster.service_by_ip_port(orig.ip(), orig.port())?;
    routing::is_http_port(port).then(|| (service.hostname(), port.port))
}

/// Serves one app connection to the HTTP service `host`:`port`, request by
/// request, until the app closes it.
pub async fn serve(
    client: TcpStream,
    pod: Arc<PodProxy>,
    ctx: Arc<ProxyContext>,
    host: String,
    port: u16,
) {
    let _ = client.set_nodelay(true);
    let connection = Arc::new(Connection {
        pod,
        ctx,
        host,
        port,
    });
    let service = {
        let connection = connection.clone();
        hyper::service::service_fn(move |request| {
            let connection = connection.clone();
            async move { Ok::<_, Infallible>(connection.request(request).await) }
        })
    };
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let served = builder.serve_connection(TokioIo::new(client), service);
    tokio::pin!(served);
    let mut draining = DRAINING.subscribe();
    let drained = async move {
        loop {
            if *draining.borrow_and_update() {
                return;
            }
            if draining.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let result = tokio::select! {
        result = served.as_mut() => result,
        () = drained => {
            // Finish the request in flight, if any, then close; an idle
            // keep-alive connection closes at once.
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(error) = result {
        debug!(pod = %connection.pod.key, %error, "HTTP connection ended");
    }
}

/// Set once the agent drains.
static DRAINING: LazyLock<tokio::sync::watch::Sender<bool>> =
    LazyLock::new(|| tokio::sync::watch::Sender::new(false));

/// Forgets the pools, balancers, breakers and outlier detectors of pods
/// that are no longer enrolled (`enrolled`: netns cookies), so that their
/// state does not outlive them.
pub fn forget_other_pods(enrolled: &HashSet<u64>) {
    pool::forget_other_pods(enrolled);
    balance::forget_other_pods(enrolled);
    breaker::forget_other_pods(enrolled);
    outlier::forget_other_pods(enrolled);
}

/// Tells every HTTP connection to finish its request in flight and close,
/// so that idle keep-alive connections do not hold a draining agent up.
pub fn drain() {
    DRAINING.send_replace(true);
}

struct Connection {
    pod: Arc<PodProxy>,
    ctx: Arc<ProxyContext>,
    /// The service the app connected to, and its port.
    host: String,
    port: u16,
}

/// What the proxy answers itself, as Envoy words it.
struct MadeUp {
    status: u16,
    flags: &'static str,
    body: &'static str,
}

const NO_ROUTE: MadeUp = MadeUp {
    status: 404,
    flags: "NR",
    body: "",
};
const NO_CLUSTER: MadeUp = MadeUp {
    status: 503,
    flags: "NR",
    body: "no healthy upstream",
};
const NO_HEALTHY_UPSTREAM: MadeUp = MadeUp {
    status: 503,
    flags: "UH",
    body: "no healthy upstream",
};
const OVERFLOW: MadeUp = MadeUp {
    status: 503,
    flags: "UO",
    body: "upstream connect error or disconnect/reset before headers. reset reason: overflow",
};
const TIMEOUT: MadeUp = MadeUp {
    status: 504,
    flags: "UT",
    body: "upstream request timeout",
};
const DENIED: MadeUp = MadeUp {
    status: 403,
    flags: "DENY",
    body: "RBAC: access denied",
};
const BAD_REQUEST: MadeUp = MadeUp {
    status: 400,
    flags: "DPE",
    body: "",
};

impl Connection {
    async fn request(&self, mut request: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let cluster = self.ctx.cluster.borrow().clone();
        let request_id = HeaderName::from_static("x-request-id");
        if !request.headers().contains_key(&request_id) {
            request
                .headers_mut()
                .insert(request_id.clone(), new_request_id());
        }
        let request_bytes =
            head_size(request.headers()) + request.body().size_hint().exact().unwrap_or(0);
        let grpc = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("application/grpc"));
        // Read only when the access log is on.
        let access = tracing::enabled!(target: ACCESS_LOG, tracing::Level::DEBUG).then(|| {
            let header = |name: &str| {
                request
                    .headers()
                    .get(name)
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("-")
                    .to_owned()
            };
            AccessEntry {
                method: request.method().to_string(),
                path: request
                    .uri()
                    .path_and_query()
                    .map_or_else(|| "/".to_owned(), ToString::to_string),
                protocol: format!("{:?}", request.version()),
                authority: request
                    .uri()
                    .authority()
                    .map_or_else(|| header("host"), ToString::to_string),
                user_agent: header("user-agent"),
                request_id: header("x-request-id"),
                bytes_received: request_bytes,
                start,
                ..AccessEntry::default()
            }
        });
        let (response, flags, destination, service) = self.forward(&cluster, request).await;
        let base = labels(
            Reporter::Source,
            &cluster,
            Some(&self.pod.key),
            destination.as_ref(),
            service.as_ref(),
            flags,
        );
        let labels = HttpLabels {
            base,
            response_code: response.status().as_u16(),
            grpc,
        };
        let access = access.map(|entry| AccessEntry {
            response_code: labels.response_code,
            response_flags: flags,
            source: self.pod.key.to_string(),
            destination_service: labels.base.destination_service[0].clone(),
            destination_workload: labels.base.destination.workload.clone(),
            ..entry
        });
        let series = self.ctx.metrics.http.series(labels);
        series.record(start.elapsed(), request_bytes);
        // The response's size is counted once its body has gone, or failed.
        let (parts, body) = response.into_parts();
        let body = Counted {
            bytes: head_size(&parts.headers),
            body,
            series,
            access,
        };
        Response::from_parts(parts, body.boxed())
    }

    /// The response, its Envoy response flags, the endpoint's pod and the
    /// service it belongs to.
    async fn forward(
        &self,
        cluster: &Cluster,
        request: Request<Incoming>,
    ) -> (
        Response<Body>,
        &'static str,
        Option<WorkloadKey>,
        Option<ServiceName>,
    ) {
        let source = cluster.workload(&self.pod.key);
        let (mut parts, body) = request.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let request_id = HeaderName::from_static("x-request-id");
        if !parts.headers.contains_key(&request_id) {
            parts.headers.insert(request_id, new_request_id());
        }
        let target_service = cluster
            .service_by_hostname(&self.host)
            .map(|service| ServiceName {
                hostname: service.hostname(),
                name: service.name.clone(),
                namespace: service.namespace.clone(),
            });

        // The route: the VirtualService's first matching rule, or the
        // service itself with Istio's default retries.
        let vs = cluster.virtual_service_for(&self.host);
        let authority = parts
            .headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
            .or(parts.uri.authority().map(|authority| authority.as_str()))
            .unwrap_or_default()
            .to_owned();
        let view = route::RequestView {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            query: parts.uri.query(),
            scheme: "http",
            authority: &authority,
            headers: &parts.headers,
            port: self.port,
            source_labels: source.map(|source| &source.labels),
            source_namespace: source.map(|source| source.namespace.as_str()),
        };
        let (rule, matched) = match vs {
            Some(vs) => match route::select(vs, &view) {
                Some((rule, matched)) => (Some(rule), matched),
                None => return (made_up(&NO_ROUTE), NO_ROUTE.flags, None, target_service),
            },
            None => (None, None),
        };
        let mut authority = authority;
        let cors = rule.and_then(|rule| rule.cors.as_ref());
        if let Some(cors) = cors
            && let Some(response) = cors::preflight(cors, &parts.method, &parts.headers)
        {
            return (response, "-", None, target_service);
        }
        let cors_origin =
            cors.and_then(|cors| Some((cors, cors::allowed_origin(cors, &parts.headers)?)));
        if let Some(rule) = rule {
            if let Some(direct) = &rule.direct_response {
                let mut response = made_up(&MadeUp {
                    status: direct.status,
                    flags: "-",
                    body: "",
                });
                *response.body_mut() = Full::new(Bytes::from(direct.body.clone()))
                    .map_err(|never| match never {})
                    .boxed();
                rule.headers.response.apply(response.headers_mut());
                return (response, "-", None, target_service);
            }
            if let Some(redirect) = &rule.redirect {
                let mut response = redirect_to(redirect, &parts.uri, &authority, self.port);
                rule.headers.response.apply(response.headers_mut());
                return (response, "-", None, target_service);
            }
            if let Some(rewrite) = &rule.rewrite {
                rewrite_request(rewrite, matched, &mut parts, &mut authority);
            }
            rule.headers.request.apply(&mut parts.headers);
        }
        let destination = rule.and_then(|rule| route::weighted(&rule.routes, random()));
        if let Some(destination) = destination {
            destination.headers.request.apply(&mut parts.headers);
        }
        let (host, subset, port) = match destination {
            Some(destination) => (
                destination.host.clone(),
                destination.subset.clone(),
                destination.port,
            ),
            None => (self.host.clone(), None, None),
        };
        let Some(service) = cluster.service_by_hostname(&host) else {
            return (made_up(&NO_CLUSTER), NO_CLUSTER.flags, None, target_service);
        };
        let service_name = Some(ServiceName {
            hostname: service.hostname(),
            name: service.name.clone(),
            namespace: service.namespace.clone(),
        });
        let service_port = match port {
            Some(port) => service.ports.iter().find(|p| p.port == port),
            None if host == self.host => service.ports.iter().find(|p| p.port == self.port),
            None => service
                .ports
                .iter()
                .find(|p| p.port == self.port)
                .or(service.ports.first().filter(|_| service.ports.len() == 1)),
        };
        let Some(service_port) = service_port else {
            return (made_up(&NO_CLUSTER), NO_CLUSTER.flags, None, service_name);
        };
        let namespace = source.map_or("", |source| source.namespace.as_str());
        let rule_set = cluster.destination_rule_for(&host, namespace);
        let subset_rule = match &subset {
            Some(name) => match rule_set.and_then(|dr| dr.subset(name)) {
                Some(subset) => Some(subset),
                None => return (made_up(&NO_CLUSTER), NO_CLUSTER.flags, None, service_name),
            },
            None => None,
        };
        let endpoints: Vec<(SocketAddr, Option<WorkloadKey>)> = service_port
            .endpoints
            .iter()
            .filter(|endpoint| endpoint.ready)
            .filter(|endpoint| {
                subset_rule.is_none_or(|subset| {
                    endpoint
                        .workload
                        .as_ref()
                        .and_then(|key| cluster.workload(key))
                        .is_some_and(|workload| {
                            subset
                                .labels
                                .iter()
                                .all(|(key, value)| workload.labels.get(key) == Some(value))
                        })
                })
            })
            .map(|endpoint| {
                (
                    SocketAddr::new(endpoint.ip, endpoint.port),
                    endpoint.workload.clone(),
                )
            })
            .collect();
        if endpoints.is_empty() {
            return (
                made_up(&NO_HEALTHY_UPSTREAM),
                NO_HEALTHY_UPSTREAM.flags,
                None,
                service_name,
            );
        }
        let load_balancer = subset_rule
            .and_then(|subset| subset.load_balancer.clone())
            .or(rule_set.and_then(|dr| dr.load_balancer.clone()))
            .unwrap_or_default();
        let hash = match &load_balancer {
            LoadBalancer::ConsistentHash(key) => hash_key(key, &parts, source),
            _ => None,
        };
        let breaker = subset_rule
            .and_then(|subset| subset.connection_pool.as_ref())
            .or(rule_set.and_then(|dr| dr.connection_pool.as_ref()))
            .map(|pool| {
                let cookie = self.pod.factory.netns_cookie();
                let subset = subset.as_deref().unwrap_or_default();
                breaker::breaker(cookie, &host, subset, service_port.port, pool)
            });
        let outliers = subset_rule
            .and_then(|subset| subset.outlier_detection.as_ref())
            .or(rule_set.and_then(|dr| dr.outlier_detection.as_ref()))
            .map(|config| {
                let cookie = self.pod.factory.netns_cookie();
                let subset = subset.as_deref().unwrap_or_default();
                outlier::detector(cookie, &host, subset, service_port.port, config)
            });

        // Faults first; a route with faults has no timeout nor retries.
        let fault = rule.and_then(|rule| rule.fault.as_ref());
        let injected =
            fault.map(|fault| fault::decide(fault, [random() * 100.0, random() * 100.0]));
        let mut fault_flags = None;
        if let Some(delay) = injected.as_ref().and_then(|injected| injected.delay) {
            tokio::time::sleep(delay).await;
            fault_flags = Some("DI");
        }
        if let Some(status) = injected.as_ref().and_then(|injected| injected.abort) {
            let abort = MadeUp {
                status,
                flags: "FI",
                body: "fault filter abort",
            };
            let flags = if fault_flags.is_some() { "DI,FI" } else { "FI" };
            return (made_up(&abort), flags, None, service_name);
        }
        let (timeout, mut retries) = match (fault, rule) {
            (Some(_), _) => (
                None,
                RetryPolicy {
                    attempts: 0,
                    ..RetryPolicy::istio_default()
                },
            ),
            (None, Some(rule)) => (
                rule.timeout,
                rule.retries
                    .clone()
                    .unwrap_or_else(RetryPolicy::istio_default),
            ),
            (None, None) => (None, RetryPolicy::istio_default()),
        };

        let known = body
            .size_hint()
            .exact()
            .is_some_and(|size| size <= MAX_BUFFERED);
        let body = if known {
            match body.collect().await {
                Ok(collected) => RequestBody::Buffered(collected.to_bytes()),
                Err(error) => {
                    debug!(pod = %self.pod.key, %error, "reading the request body");
                    return (made_up(&BAD_REQUEST), BAD_REQUEST.flags, None, service_name);
                }
            }
        } else {
            // Streams (gRPC streams, chunked uploads) cannot be sent twice.
            retries.attempts = 0;
            RequestBody::Streaming(Mutex::new(Some(body)))
        };
        // Mirrors get a copy of a body that was read whole; a streamed one
        // cannot be copied.
        if let (Some(rule), RequestBody::Buffered(bytes)) = (rule, &body) {
            for mirror in &rule.mirrors {
                if random() * 100.0 < mirror.percentage {
                    tokio::spawn(mirror::shadow(
                        self.pod.clone(),
                        self.ctx.clone(),
                        mirror.clone(),
                        mirror::Copy {
                            method: parts.method.clone(),
                            uri: parts.uri.clone(),
                            version: parts.version,
                            headers: parts.headers.clone(),
                            authority: authority.clone(),
                            body: bytes.clone(),
                            port: self.port,
                        },
                    ));
                }
            }
        }
        let tries = Tries {
            connection: self,
            authority: &authority,
            cluster,
            source,
            parts: &parts,
            body,
            endpoints: &endpoints,
            policy: &retries,
            load_balancer,
            hash,
            breaker,
            outliers,
            group: (&host, subset.as_deref().unwrap_or_default()),
        };
        let (mut response, flags, endpoint) = match timeout {
            Some(timeout) => match tokio::time::timeout(timeout, tries.run()).await {
                Ok(result) => result,
                Err(_) => (made_up(&TIMEOUT), TIMEOUT.flags, None),
            },
            None => tries.run().await,
        };
        let flags = match (fault_flags, flags) {
            (Some(_), "-") => "DI",
            (_, flags) => flags,
        };
        if let Some(rule) = rule {
            rule.headers.response.apply(response.headers_mut());
        }
        if let Some(destination) = destination {
            destination.headers.response.apply(response.headers_mut());
        }
        if let Some((cors, origin)) = cors_origin {
            cors::decorate(cors, origin, response.headers_mut());
        }
        (response, flags, endpoint, service_name)
    }
}

/// The destination's own verdict on `source`, when the destination is an
/// enrolled pod, as on the L4 path; its node's inbound check stays
/// authoritative.
fn endpoint_allowed(
    ctx: &ProxyContext,
    cluster: &Cluster,
    source: Option<&Workload>,
    addr: SocketAddr,
    workload: Option<&WorkloadKey>,
) -> bool {
    let (Some(source), Some(destination)) =
        (source, workload.and_then(|key| cluster.workload(key)))
    else {
        return true;
    };
    if !destination.enrolled {
        return true;
    }
    let source_ip = source
        .ips
        .first()
        .copied()
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let verdict = ctx.authorizer.check(cluster, source_ip, destination, addr);
    if !verdict.allowed {
        ctx.authorizer
            .record("outbound", &verdict, source_ip, destination, addr);
    }
    verdict.allowed
}

/// The size of a message's headers as they go on the wire in HTTP/1.1
/// (`name: value` and CRLF each), which Istio counts into message sizes.
fn head_size(headers: &HeaderMap) -> u64 {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().len() + value.len() + 4) as u64)
        .sum()
}

/// A response body that counts its bytes into the series' response size
/// when it is done with.
struct Counted {
    body: Body,
    bytes: u64,
    series: Arc<crate::metrics::http::HttpSeries>,
    /// The access log's line, when it is on.
    access: Option<AccessEntry>,
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes += data.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.series.record_response(self.bytes);
        if let Some(entry) = &self.access {
            tracing::debug!(
                target: ACCESS_LOG,
                method = %entry.method,
                path = %entry.path,
                protocol = %entry.protocol,
                response_code = entry.response_code,
                response_flags = entry.response_flags,
                bytes_received = entry.bytes_received,
                bytes_sent = self.bytes,
                duration_ms = entry.start.elapsed().as_millis() as u64,
                authority = %entry.authority,
                user_agent = %entry.user_agent,
                request_id = %entry.request_id,
                source = %entry.source,
                destination_service = %entry.destination_service,
                destination_workload = %entry.destination_workload,
                "access"
            );
        }
    }
}

/// The tracing target of the access log: one line per request, at debug
/// level, so `RUST_LOG=info,access=debug` turns it on; JSON with
/// `--log-format json`.
pub const ACCESS_LOG: &str = "access";

/// What the access log says of a request, in the spirit of Envoy's
/// default format.
#[derive(Debug)]
struct AccessEntry {
    method: String,
    path: String,
    protocol: String,
    authority: String,
    user_agent: String,
    request_id: String,
    bytes_received: u64,
    response_code: u16,
    response_flags: &'static str,
    source: String,
    destination_service: String,
    destination_workload: String,
    start: Instant,
}

impl Default for AccessEntry {
    fn default() -> Self {
        Self {
            method: String::new(),
            path: String::new(),
            protocol: String::new(),
            authority: String::new(),
            user_agent: String::new(),
            request_id: String::new(),
            bytes_received: 0,
            response_code: 0,
            response_flags: "-",
            source: String::new(),
            destination_service: String::new(),
            destination_workload: String::new(),
            start: Instant::now(),
        }
    }
}

/// A redirect as Envoy makes it: the request's URL with what `redirect`
/// replaces; the query stays.
fn redirect_to(
    redirect: &routing::Redirect,
    uri: &Uri,
    authority: &str,
    request_port: u16,
) -> Response<Body> {
    let (request_host, authority_port) = match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => (host, port.parse().ok()),
        _ => (authority, None),
    };
    let host = redirect.authority.as_deref().unwrap_or(request_host);
    let port = redirect.port.or(redirect
        .port_from_request
        .then(|| authority_port.unwrap_or(request_port)));
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let path = redirect.uri.as_deref().unwrap_or(uri.path());
    let mut location = format!("{scheme}://{host}");
    if let Some(port) = port {
        location.push_str(&format!(":{port}"));
    }
    location.push_str(path);
    if let Some(query) = uri.query() {
        location.push_str(&format!("?{query}"));
    }
    let mut response = made_up(&MadeUp {
        status: redirect.code,
        flags: "-",
        body: "",
    });
    if let Ok(location) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// Applies `rewrite` to the request: the matched prefix of the path (or the
/// whole path when the match was not by prefix), or every match of a regex;
/// the authority.
fn rewrite_request(
    rewrite: &routing::Rewrite,
    matched: Option<&routing::RequestMatch>,
    parts: &mut hyper::http::request::Parts,
    authority: &mut String,
) {
    let path = parts.uri.path();
    let new_path = if let Some(uri) = &rewrite.uri {
        match matched.and_then(|m| m.uri.as_ref()) {
            Some(routing::StringMatcher::Prefix(prefix)) if path.starts_with(prefix.as_str()) => {
                Some(format!("{uri}{}", &path[prefix.len()..]))
            }
            _ => Some(uri.clone()),
        }
    } else {
        rewrite.uri_regex.as_ref().map(|(pattern, replacement)| {
            pattern
                .regex
                .replace_all(path, replacement.as_str())
                .into_owned()
        })
    };
    if let Some(new_path) = new_path {
        let with_query = match parts.uri.query() {
            Some(query) => format!("{new_path}?{query}"),
            None => new_path,
        };
        if let Ok(uri) = with_query.parse() {
            parts.uri = uri;
        }
    }
    if let Some(new_authority) = &rewrite.authority
        && let Ok(value) = HeaderValue::from_str(new_authority)
    {
        parts.headers.insert(header::HOST, value);
        new_authority.clone_into(authority);
    }
}

enum RequestBody {
    Buffered(Bytes),
    /// Taken by the one try.
    Streaming(Mutex<Option<Incoming>>),
}

/// The tries of one request: the first and its retries.
struct Tries<'a> {
    connection: &'a Connection,
    authority: &'a str,
    cluster: &'a Cluster,
    source: Option<&'a Workload>,
    parts: &'a hyper::http::request::Parts,
    body: RequestBody,
    endpoints: &'a [(SocketAddr, Option<WorkloadKey>)],
    policy: &'a RetryPolicy,
    load_balancer: LoadBalancer,
    /// The request's consistent-hash key, hashed.
    hash: Option<u64>,
    breaker: Option<Arc<breaker::Breaker>>,
    outliers: Option<Arc<outlier::Detector>>,
    group: (&'a str, &'a str),
}

impl Tries<'_> {
    async fn run(&self) -> (Response<Body>, &'static str, Option<WorkloadKey>) {
        let cookie = self.connection.pod.factory.netns_cookie();
        let addrs: Vec<SocketAddr> = self.endpoints.iter().map(|(addr, _)| *addr).collect();
        let mut tried = Vec::new();
        let mut try_number = 0;
        let http2 = self.parts.version == Version::HTTP_2;
        // Retries running, counted against `maxRetries` while this lives.
        let mut retrying = None;
        loop {
            let admission = match &self.breaker {
                Some(breaker) => match breaker.admit(http2).await {
                    Ok(admission) => admission,
                    Err(breaker::Overflow) => return (made_up(&OVERFLOW), OVERFLOW.flags, None),
                },
                None => breaker::Admission::default(),
            };
            let healthy = match &self.outliers {
                Some(outliers) => outliers.healthy(&addrs, Instant::now()),
                None => addrs.clone(),
            };
            let addr = balance::choose(
                &healthy,
                &tried,
                &self.load_balancer,
                cookie,
                self.group,
                self.hash,
            );
            tried.push(addr);
            let workload = self
                .endpoints
                .iter()
                .find(|(a, _)| *a == addr)
                .and_then(|(_, workload)| workload.clone());
            if !self.allowed(addr, workload.as_ref()) {
                return (made_up(&DENIED), DENIED.flags, workload);
            }
            let result = {
                let _in_flight = balance::in_flight(cookie, addr);
                let once = self.once(cookie, addr, admission);
                match self.policy.per_try_timeout {
                    Some(limit) => tokio::time::timeout(limit, once)
                        .await
                        .unwrap_or(Err(Outcome::PerTryTimeout)),
                    None => once.await,
                }
            };
            let outcome = match &result {
                Ok(response) => Outcome::Response {
                    status: response.status().as_u16(),
                    grpc_status: response
                        .headers()
                        .get("grpc-status")
                        .and_then(|value| value.to_str().ok())
                        .and_then(|value| value.parse().ok()),
                },
                Err(outcome) => *outcome,
            };
            if let Some(outliers) = &self.outliers
                && outliers.report(addr, outcome, addrs.len(), Instant::now())
            {
                debug!(%addr, "endpoint ejected by outlier detection");
            }
            let retriable = retry::should_retry(&self.policy.retry_on, outcome);
            let may_retry = retriable
                && try_number < self.policy.attempts
                && (retrying.is_some()
                    || self.breaker.as_ref().is_none_or(|breaker| {
                        retrying = breaker.retry();
                        retrying.is_some()
                    }));
            if may_retry {
                try_number += 1;
                tokio::time::sleep(backoff(try_number)).await;
                continue;
            }
            // Retries were wanted but none is left.
            let exhausted = retriable && self.policy.attempts > 0;
            return match result {
                Ok(response) => {
                    let flags = if exhausted { "URX" } else { "-" };
                    (response, flags, workload)
                }
                Err(outcome) => {
                    let (status, flags, body) = match (outcome, exhausted) {
                        (Outcome::PerTryTimeout, false) => (504, "UT", "upstream request timeout"),
                        (Outcome::PerTryTimeout, true) => {
                            (504, "UT,URX", "upstream request timeout")
                        }
                        (Outcome::ConnectFailure, false) => (503, "UF", CONNECT_FAILURE),
                        (Outcome::ConnectFailure, true) => (503, "UF,URX", CONNECT_FAILURE),
                        (_, false) => (503, "UC", CONNECTION_TERMINATION),
                        (_, true) => (503, "UC,URX", CONNECTION_TERMINATION),
                    };
                    let made = MadeUp {
                        status,
                        flags,
                        body,
                    };
                    (made_up(&made), flags, workload)
                }
            };
        }
    }

    /// The destination's own verdict, when it is an enrolled pod, as on the
    /// L4 path; its node's inbound check stays authoritative.
    fn allowed(&self, addr: SocketAddr, workload: Option<&WorkloadKey>) -> bool {
        endpoint_allowed(
            &self.connection.ctx,
            self.cluster,
            self.source,
            addr,
            workload,
        )
    }

    /// One try on a pooled connection, or a new one; a pooled connection
    /// that turns out closed before the request went out is replaced.
    async fn once(
        &self,
        cookie: u64,
        addr: SocketAddr,
        admission: breaker::Admission,
    ) -> Result<Response<Body>, Outcome> {
        let http2 = self.parts.version == Version::HTTP_2;
        let limits = self.breaker.as_ref().map(|breaker| &breaker.pool);
        let mut request = Some(self.request());
        let mut pooled = pool::take(cookie, addr, http2);
        // At the connection limit, wait for a busy connection rather than
        // open one more.
        let at_limit = limits
            .and_then(|limits| limits.max_connections)
            .is_some_and(|max| pool::live(cookie, addr, false) >= max as usize);
        if pooled.is_none()
            && !http2
            && at_limit
            && let Some(mut busy) = pool::take_busy(cookie, addr)
            && busy.ready().await
        {
            pooled = Some(busy);
        }
        let mut admission = Some(admission);
        loop {
            let fresh = pooled.is_none();
            let connect_timeout = limits.and_then(|limits| limits.connect_timeout);
            let mut sender = match pooled.take() {
                Some(sender) => sender,
                None => pool::connect(&self.connection.pod.factory, addr, http2, connect_timeout)
                    .await
                    .map_err(|error| {
                        debug!(%addr, %error, "upstream connect failed");
                        Outcome::ConnectFailure
                    })?,
            };
            match sender
                .send(request.take().expect("a request to send"))
                .await
            {
                Ok(response) => {
                    let per_connection = limits.and_then(|l| l.max_requests_per_connection);
                    pool::put(cookie, addr, sender, per_connection);
                    let (mut parts, body) = response.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    let body = breaker::Admitted {
                        body,
                        admission: admission.take().unwrap_or_default(),
                    };
                    return Ok(Response::from_parts(parts, body.boxed()));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) if !fresh => request = Some(unsent),
                    _ => {
                        let error = error.into_error();
                        debug!(%addr, %error, "upstream request failed");
                        // hyper does not expose h2's reason code; its
                        // debug form names it.
                        let refused = format!("{error:?}").contains("REFUSED_STREAM");
                        return Err(if refused {
                            Outcome::RefusedStream
                        } else {
                            Outcome::Reset
                        });
                    }
                },
            }
        }
    }

    fn request(&self) -> Request<Body> {
        let body = match &self.body {
            RequestBody::Buffered(bytes) => Full::new(bytes.clone())
                .map_err(|never| match never {})
                .boxed(),
            RequestBody::Streaming(body) => match body.lock().unwrap().take() {
                Some(body) => body.boxed(),
                None => Full::new(Bytes::new())
                    .map_err(|never| match never {})
                    .boxed(),
            },
        };
        let mut request = Request::new(body);
        *request.method_mut() = self.parts.method.clone();
        *request.version_mut() = self.parts.version;
        let path = self
            .parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str());
        // HTTP/2 carries the authority in the URI, HTTP/1.1 in Host.
        let uri = if self.parts.version == Version::HTTP_2 {
            format!("http://{}{path}", self.authority)
        } else {
            path.to_owned()
        };
        *request.uri_mut() = uri.parse().unwrap_or_else(|_| Uri::from_static("/"));
        *request.headers_mut() = self.parts.headers.clone();
        request
    }
}

/// The hash of what `key` names in the request, if it has it.
fn hash_key(
    key: &HashKey,
    parts: &hyper::http::request::Parts,
    source: Option<&Workload>,
) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let value: String = match key {
        HashKey::Header(name) => parts.headers.get(name.as_str())?.to_str().ok()?.to_owned(),
        HashKey::Cookie(name) => parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .find_map(|pair| {
                let (key, value) = pair.trim().split_once('=')?;
                (key == name).then(|| value.to_owned())
            })?,
        HashKey::SourceIp => source?.ips.first()?.to_string(),
        HashKey::QueryParameter(name) => parts.uri.query()?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then(|| value.to_owned())
        })?,
    };
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    Some(hasher.finish())
}

const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
const CONNECTION_TERMINATION: &str = "upstream connect error or disconnect/reset before headers. reset reason: connection termination";

/// Envoy's: fully jittered, from a 25 ms base, doubling, at most 250 ms.
fn backoff(retry: u32) -> Duration {
    let ceiling = (25u64 << retry.min(4)).min(250);
    Duration::from_millis((random() * ceiling as f64) as u64)
}

fn made_up(made: &MadeUp) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(made.body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = StatusCode::from_u16(made.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = response.headers_mut();
    headers.insert(header::SERVER, HeaderValue::from_static("weir"));
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// Removes the headers that concern one connection only (RFC 9110 7.6.1):
/// those that `Connection` names, and Connection, Proxy-Connection,
/// Keep-Alive, TE (but `te: trailers`), Transfer-Encoding and Upgrade.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    for name in named {
        if name != "te" {
            headers.remove(name.as_str());
        }
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("proxy-connection"),
        HeaderName::from_static("keep-alive"),
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    let trailers = headers
        .get(header::TE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(',')
                .any(|v| v.trim().eq_ignore_ascii_case("trailers"))
        });
    headers.remove(header::TE);
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// A random UUID (version 4), as Envoy generates for `x-request-id`.
fn new_request_id() -> HeaderValue {
    let high = random_u64();
    let low = random_u64();
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&high.to_be_bytes());
    bytes[8..].copy_from_slice(&low.to_be_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let id = format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    );
    HeaderValue::from_str(&id).expect("hex and dashes")
}

thread_local! {
    static RNG: Cell<u64> = Cell::new(RandomState::new().hash_one(std::thread::current().id()) | 1);
}

/// xorshift64*: good enough for load balancing, weights and faults.
fn random_u64() -> u64 {
    RNG.with(|state| {
        let mut x = state.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// Uniform in `[0, 1)`.
fn random() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("te", "trailers, deflate"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("x-b3-traceid", "abc"),
            ("traceparent", "00-abc-def-01"),
        ] {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["te", "traceparent", "x-b3-traceid"]);
        assert_eq!(headers["te"], "trailers");
    }

    #[test]
    fn request_ids_are_uuids_and_differ() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        let a = a.to_str().unwrap();
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
        assert!((0..1000).map(|_| random()).all(|r| (0.0..1.0).contains(&r)));
    }
}
