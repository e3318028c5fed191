//! HTTP traffic management: Istio's VirtualService and DestinationRule.
//!
//! [`istio`] mirrors the resources as Istio defines them; [`translate`]
//! checks them as istiod would, resolves their host names in their
//! namespace and turns them into the types of this module, which the
//! [`Cluster`](crate::model::Cluster) snapshot holds and the proxy's HTTP
//! path (`proxy::http`) applies.

pub mod istio;
pub mod translate;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Serialize, Serializer};

use crate::model::ServicePort;

/// Whether a Service port carries HTTP, by Istio's rules: `appProtocol`
/// http, http2 or grpc, else the port's name `http`, `http2`, `grpc` or one
/// starting with `http-`, `http2-` or `grpc-`. Istio's sidecar sniffs the
/// protocol of other ports; weir treats them as TCP.
pub fn is_http_port(port: &ServicePort) -> bool {
    const PROTOCOLS: [&str; 3] = ["http", "http2", "grpc"];
    if let Some(app_protocol) = &port.app_protocol {
        return PROTOCOLS.contains(&app_protocol.to_ascii_lowercase().as_str());
    }
    let name = port
        .name
        .as_deref()
        .unwrap_or_default()
        .to_ascii_lowercase();
    PROTOCOLS
        .iter()
        .any(|protocol| name == *protocol || name.starts_with(&format!("{protocol}-")))
}

/// A VirtualService as weir applies it to mesh traffic.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VirtualService {
    pub namespace: String,
    pub name: String,
    /// Fully qualified: `reviews` in namespace `default` is
    /// `reviews.default.svc.cluster.local`.
    pub hosts: Vec<String>,
    /// False when `gateways` is set without `mesh`: the rules are for a
    /// gateway and do not touch pod-to-pod traffic.
    pub mesh: bool,
    pub http: Vec<HttpRule>,
}

/// One `http[]` entry: the first whose matches fit the request wins.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpRule {
    pub name: Option<String>,
    /// Any one of them (OR); empty matches every request.
    pub matches: Vec<RequestMatch>,
    pub routes: Vec<WeightedDestination>,
    #[serde(serialize_with = "millis")]
    pub timeout: Option<Duration>,
    /// None: Istio's default policy.
    pub retries: Option<RetryPolicy>,
    pub fault: Option<Fault>,
    /// Instead of routes: answer with a redirect.
    pub redirect: Option<Redirect>,
    /// Instead of routes: answer with this.
    pub direct_response: Option<DirectResponse>,
    pub rewrite: Option<Rewrite>,
    pub headers: Headers,
    /// Copies of each request, sent without waiting for their answers.
    pub mirrors: Vec<Mirror>,
    pub cors: Option<Cors>,
}

/// `corsPolicy`, with Envoy's CORS filter's meaning.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cors {
    pub allow_origins: Vec<StringMatcher>,
    pub allow_methods: Vec<String>,
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    #[serde(serialize_with = "millis")]
    pub max_age: Option<Duration>,
    pub allow_credentials: bool,
    /// `unmatchedPreflights: FORWARD` (the default): a preflight from an
    /// origin not allowed goes to the upstream; else it is answered.
    pub forward_unmatched_preflights: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Mirror {
    /// Fully qualified.
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    /// Of requests, 0 to 100.
    pub percentage: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Redirect {
    /// Replaces the path.
    pub uri: Option<String>,
    pub authority: Option<String>,
    pub port: Option<u16>,
    /// `derivePort: FROM_REQUEST_PORT`.
    pub port_from_request: bool,
    pub scheme: Option<String>,
    pub code: u16,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DirectResponse {
    pub status: u16,
    pub body: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Rewrite {
    /// Replaces the matched prefix, or the whole path.
    pub uri: Option<String>,
    pub authority: Option<String>,
    /// `uriRegexRewrite`: every match of the pattern in the path.
    pub uri_regex: Option<(Pattern, String)>,
}

/// Header changes for requests and responses.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Headers {
    pub request: HeaderOps,
    pub response: HeaderOps,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HeaderOps {
    /// Names lowercase.
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

impl HeaderOps {
    /// Applies the changes: remove, then set (replacing), then add.
    pub fn apply(&self, headers: &mut hyper::HeaderMap) {
        use hyper::header::{HeaderName, HeaderValue};
        for name in &self.remove {
            headers.remove(name.as_str());
        }
        let pairs = |pairs: &'_ [(String, String)]| {
            pairs
                .iter()
                .filter_map(|(name, value)| {
                    Some((
                        HeaderName::from_bytes(name.as_bytes()).ok()?,
                        HeaderValue::from_str(value).ok()?,
                    ))
                })
                .collect::<Vec<_>>()
        };
        for (name, value) in pairs(&self.set) {
            headers.insert(name, value);
        }
        for (name, value) in pairs(&self.add) {
            headers.append(name, value);
        }
    }
}

/// Every set field must fit (AND).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RequestMatch {
    pub uri: Option<StringMatcher>,
    pub ignore_uri_case: bool,
    pub scheme: Option<StringMatcher>,
    pub method: Option<StringMatcher>,
    pub authority: Option<StringMatcher>,
    pub headers: BTreeMap<String, StringMatcher>,
    pub without_headers: BTreeMap<String, StringMatcher>,
    pub query_params: BTreeMap<String, StringMatcher>,
    pub port: Option<u16>,
    pub source_labels: BTreeMap<String, String>,
    pub source_namespace: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum StringMatcher {
    Exact(String),
    Prefix(String),
    /// Matches the whole value, as Envoy's RE2 `safe_regex` does.
    Regex(Pattern),
}

impl StringMatcher {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatcher::Exact(exact) => value == exact,
            StringMatcher::Prefix(prefix) => value.starts_with(prefix.as_str()),
            StringMatcher::Regex(pattern) => pattern.regex.is_match(value),
        }
    }

    /// The same match with both sides lowercased, for `ignoreUriCase`.
    pub fn matches_ignoring_case(&self, value: &str) -> bool {
        let value = value.to_lowercase();
        match self {
            StringMatcher::Exact(exact) => value == exact.to_lowercase(),
            StringMatcher::Prefix(prefix) => value.starts_with(&prefix.to_lowercase()),
            StringMatcher::Regex(pattern) => pattern.regex.is_match(&value),
        }
    }
}

/// A compiled regular expression, anchored at both ends; compared and
/// shown by its source.
#[derive(Clone, Debug)]
pub struct Pattern {
    pub source: String,
    pub regex: regex::Regex,
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct WeightedDestination {
    /// Fully qualified.
    pub host: String,
    pub subset: Option<String>,
    pub port: Option<u16>,
    pub weight: u32,
    pub headers: Headers,
}

/// When to try a request again. `attempts` counts retries: the upstream
/// sees at most `attempts + 1` tries.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetryPolicy {
    pub attempts: u32,
    #[serde(serialize_with = "millis")]
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
}

impl RetryPolicy {
    /// What Istio configures on a route without `retries`: 2 retries on
    /// connect-failure, refused-stream, unavailable, cancelled and 503.
    pub fn istio_default() -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                unavailable: true,
                cancelled: true,
                retriable_status_codes: vec![503],
                ..RetryOn::default()
            },
        }
    }
}

/// Envoy's `retry_on` conditions, as Istio's `retryOn` lists them.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RetryOn {
    pub five_xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub retriable_4xx: bool,
    /// `retriable-status-codes` with the numeric codes of `retryOn`.
    pub retriable_status_codes: Vec<u16>,
    // gRPC statuses, read from the `grpc-status` header.
    pub cancelled: bool,
    pub deadline_exceeded: bool,
    pub internal: bool,
    pub resource_exhausted: bool,
    pub unavailable: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultDelay {
    #[serde(serialize_with = "millis_required")]
    pub fixed_delay: Duration,
    /// Of requests, 0 to 100.
    pub percentage: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultAbort {
    pub http_status: u16,
    pub percentage: f64,
}

/// A DestinationRule: subsets and load balancing for one host.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DestinationRule {
    pub namespace: String,
    pub name: String,
    /// Fully qualified.
    pub host: String,
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub subsets: Vec<Subset>,
}

impl DestinationRule {
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|subset| subset.name == name)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Overrides the rule's own.
    pub load_balancer: Option<LoadBalancer>,
    /// Overrides the rule's own.
    pub connection_pool: Option<ConnectionPool>,
    /// Overrides the rule's own.
    pub outlier_detection: Option<OutlierDetection>,
}

/// `trafficPolicy.outlierDetection`: endpoints that fail in a row are
/// ejected (receive no requests) for a while, per source pod and
/// destination, as Envoy does.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct OutlierDetection {
    /// 5xx answers (and failures to get one) in a row; 0 is off.
    pub consecutive_5xx_errors: u32,
    /// 502, 503 and 504 answers (and failures to get one) in a row; 0 is off.
    pub consecutive_gateway_errors: u32,
    #[serde(serialize_with = "millis_required")]
    pub interval: Duration,
    /// Times the number of ejections so far.
    #[serde(serialize_with = "millis_required")]
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

/// `trafficPolicy.connectionPool`: the circuit breaker, with Envoy's
/// meaning, per source pod and destination (host, subset, port). None is
/// no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: HTTP/1.1 connections, so requests at once.
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection;
    /// more are answered 503 `UO`.
    pub max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`: requests at once, of either protocol.
    pub max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: a connection is closed after so many.
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries`: retries at once.
    pub max_retries: Option<u32>,
    #[serde(serialize_with = "millis")]
    pub connect_timeout: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancer {
    RoundRobin,
    /// Istio's default: the less busy of two endpoints picked at random.
    #[default]
    LeastRequest,
    Random,
    /// The same key goes to the same endpoint while the endpoints stay
    /// (rendezvous hashing); a request without the key goes to a random one.
    ConsistentHash(HashKey),
}

/// What `consistentHash` hashes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HashKey {
    /// Lowercase.
    Header(String),
    Cookie(String),
    SourceIp,
    QueryParameter(String),
}

/// A Go duration as Istio's CRDs take it: `10s`, `0.5s`, `100ms`, `1m30s`.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_end..];
        total += number * seconds;
    }
    Some(Duration::from_secs_f64(total))
}

fn millis<S: Serializer>(duration: &Option<Duration>, serializer: S) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => serializer.serialize_some(&duration.as_millis()),
        None => serializer.serialize_none(),
    }
}

fn millis_required<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u128(duration.as_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_go_writes_them() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        for bad in ["", "10", "s", "5 s", "1x"] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn http_ports_follow_istio_naming() {
        let port = |name: Option<&str>, app_protocol: Option<&str>| ServicePort {
            name: name.map(str::to_owned),
            port: 9080,
            protocol: "TCP".to_owned(),
            app_protocol: app_protocol.map(str::to_owned),
            endpoints: Vec::new(),
        };
        for name in ["http", "http2", "grpc", "http-web", "grpc-api", "HTTP"] {
            assert!(is_http_port(&port(Some(name), None)), "{name}");
        }
        for name in ["tcp", "https", "httpx", "web", "mongo"] {
            assert!(!is_http_port(&port(Some(name), None)), "{name}");
        }
        assert!(!is_http_port(&port(None, None)));
        assert!(is_http_port(&port(Some("tcp"), Some("http"))));
        assert!(!is_http_port(&port(Some("http"), Some("tcp"))));
    }
}
