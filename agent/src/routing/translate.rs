//! Checks a VirtualService or DestinationRule as istiod does, and turns it
//! into weir's routing types. Every error is returned, each naming its
//! field; what weir does not implement yet is a warning naming its field.

use std::collections::BTreeMap;

use super::istio;
use super::{
    ConnectionPool, Cors, DestinationRule, DirectResponse, Fault, FaultAbort, FaultDelay, HashKey,
    HeaderOps, Headers, HttpRule, LoadBalancer, Mirror, OutlierDetection, Pattern, Redirect,
    RequestMatch, RetryOn, RetryPolicy, Rewrite, StringMatcher, Subset, VirtualService,
    WeightedDestination, parse_duration,
};
use crate::model::FieldError;

/// A usable object, and what weir does differently from what it says.
#[derive(Clone, Debug, PartialEq)]
pub struct Translation<T> {
    pub value: T,
    pub warnings: Vec<FieldError>,
}

#[derive(Default)]
struct Checker {
    errors: Vec<FieldError>,
    warnings: Vec<FieldError>,
}

impl Checker {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(FieldError::new(field, message));
    }

    fn unimplemented(
        &mut self,
        path: &str,
        fields: &[(&str, &istio::Unimplemented)],
        outcome: &str,
    ) {
        for (name, value) in fields {
            if value.is_some() {
                self.warn(
                    format!("{path}.{name}"),
                    format!("not implemented in weir yet: {outcome}"),
                );
            }
        }
    }

    fn finish<T>(self, value: T) -> Result<Translation<T>, Vec<FieldError>> {
        if self.errors.is_empty() {
            Ok(Translation {
                value,
                warnings: self.warnings,
            })
        } else {
            Err(self.errors)
        }
    }

    fn duration(&mut self, field: String, text: &str) -> Option<std::time::Duration> {
        let duration = parse_duration(text);
        if duration.is_none() {
            self.error(
                field,
                format!("{text:?} is not a duration such as 1s or 100ms"),
            );
        }
        duration
    }

    fn string_match(
        &mut self,
        field: String,
        matcher: &istio::StringMatch,
    ) -> Option<StringMatcher> {
        let set = [&matcher.exact, &matcher.prefix, &matcher.regex]
            .iter()
            .filter(|value| value.is_some())
            .count();
        if set != 1 {
            self.error(field, "exactly one of exact, prefix and regex must be set");
            return None;
        }
        if let Some(exact) = &matcher.exact {
            return Some(StringMatcher::Exact(exact.clone()));
        }
        if let Some(prefix) = &matcher.prefix {
            return Some(StringMatcher::Prefix(prefix.clone()));
        }
        let source = matcher.regex.clone().unwrap_or_default();
        match regex::Regex::new(&format!("^(?:{source})$")) {
            Ok(regex) => Some(StringMatcher::Regex(Pattern { source, regex })),
            Err(error) => {
                self.error(
                    format!("{field}.regex"),
                    format!("not a valid regex: {error}"),
                );
                None
            }
        }
    }

    fn string_matches(
        &mut self,
        path: &str,
        name: &str,
        map: &BTreeMap<String, istio::StringMatch>,
        lowercase_keys: bool,
    ) -> BTreeMap<String, StringMatcher> {
        map.iter()
            .filter_map(|(key, matcher)| {
                let matcher = self.string_match(format!("{path}.{name}[{key:?}]"), matcher)?;
                let key = if lowercase_keys {
                    key.to_ascii_lowercase()
                } else {
                    key.clone()
                };
                Some((key, matcher))
            })
            .collect()
    }

    fn percentage(
        &mut self,
        field: String,
        percentage: Option<&istio::Percent>,
        percent: Option<i32>,
    ) -> f64 {
        let value = match (percentage, percent) {
            (Some(percentage), _) => percentage.value,
            (None, Some(percent)) => f64::from(percent),
            // Istio: without a percentage, every request.
            (None, None) => 100.0,
        };
        if !(0.0..=100.0).contains(&value) {
            self.error(field, format!("{value} is not a percentage (0 to 100)"));
        }
        value
    }

    fn load_balancer(
        &mut self,
        path: &str,
        policy: Option<&istio::TrafficPolicy>,
    ) -> Option<LoadBalancer> {
        let policy = policy?;
        self.unimplemented(
            path,
            &[
                ("portLevelSettings", &policy.port_level_settings),
                ("tunnel", &policy.tunnel),
                ("proxyProtocol", &policy.proxy_protocol),
                ("retryBudget", &policy.retry_budget),
            ],
            "ignored",
        );
        if let Some(tls) = &policy.tls
            && !matches!(tls.mode.as_deref(), None | Some("DISABLE"))
        {
            self.warn(
                format!("{path}.tls.mode"),
                "weir does not originate TLS: connections stay plaintext (see the README's security model)",
            );
        }
        let load_balancer = policy.load_balancer.as_ref()?;
        let path = format!("{path}.loadBalancer");
        self.unimplemented(
            &path,
            &[
                ("localityLbSetting", &load_balancer.locality_lb_setting),
                ("warmupDurationSecs", &load_balancer.warmup_duration_secs),
                ("warmup", &load_balancer.warmup),
            ],
            "the default, LEAST_REQUEST, is used",
        );
        if let Some(hash) = &load_balancer.consistent_hash {
            if load_balancer.simple.is_some() {
                self.error(path, "only one of simple and consistentHash may be set");
                return None;
            }
            return self.consistent_hash(&format!("{path}.consistentHash"), hash);
        }
        match load_balancer.simple.as_deref()? {
            "ROUND_ROBIN" => Some(LoadBalancer::RoundRobin),
            "LEAST_REQUEST" | "LEAST_CONN" | "UNSPECIFIED" => Some(LoadBalancer::LeastRequest),
            "RANDOM" => Some(LoadBalancer::Random),
            "PASSTHROUGH" => {
                self.warn(
                    format!("{path}.simple"),
                    "PASSTHROUGH is not implemented in weir yet: LEAST_REQUEST is used",
                );
                None
            }
            other => {
                self.error(
                    format!("{path}.simple"),
                    format!("{other:?} is not ROUND_ROBIN, LEAST_REQUEST, RANDOM or PASSTHROUGH"),
                );
                None
            }
        }
    }
}

impl Checker {
    fn outlier_detection(
        &mut self,
        path: &str,
        policy: Option<&istio::TrafficPolicy>,
    ) -> Option<OutlierDetection> {
        let settings = policy?.outlier_detection.as_ref()?;
        let path = format!("{path}.outlierDetection");
        self.unimplemented(
            &path,
            &[
                ("minHealthPercent", &settings.min_health_percent),
                (
                    "splitExternalLocalOriginErrors",
                    &settings.split_external_local_origin_errors,
                ),
                (
                    "consecutiveLocalOriginFailures",
                    &settings.consecutive_local_origin_failures,
                ),
            ],
            "ignored",
        );
        let mut count = |field: &str, value: Option<i64>, default: u32| match value {
            None => Some(default),
            Some(value) => u32::try_from(value).ok().or_else(|| {
                self.error(format!("{path}.{field}"), "must not be negative");
                None
            }),
        };
        // Envoy's defaults, which Istio keeps.
        let consecutive_5xx_errors = count(
            "consecutive5xxErrors",
            settings
                .consecutive_5xx_errors
                .or(settings.consecutive_errors.map(i64::from)),
            5,
        )?;
        let consecutive_gateway_errors = count(
            "consecutiveGatewayErrors",
            settings.consecutive_gateway_errors,
            0,
        )?;
        let max_ejection_percent = count(
            "maxEjectionPercent",
            settings.max_ejection_percent.map(i64::from),
            10,
        )?;
        if max_ejection_percent > 100 {
            self.error(format!("{path}.maxEjectionPercent"), "must be at most 100");
        }
        let mut duration = |field: &str, value: &Option<String>, default: u64| match value {
            None => Some(std::time::Duration::from_secs(default)),
            Some(text) => self.duration(format!("{path}.{field}"), text),
        };
        Some(OutlierDetection {
            consecutive_5xx_errors,
            consecutive_gateway_errors,
            interval: duration("interval", &settings.interval, 10)?,
            base_ejection_time: duration("baseEjectionTime", &settings.base_ejection_time, 30)?,
            max_ejection_percent,
        })
    }

    fn connection_pool(
        &mut self,
        path: &str,
        policy: Option<&istio::TrafficPolicy>,
    ) -> Option<ConnectionPool> {
        let settings = policy?.connection_pool.as_ref()?;
        let path = format!("{path}.connectionPool");
        let mut limit = |field: &str, value: Option<i32>| match value {
            // 0 is Istio's default: no limit.
            None | Some(0) => None,
            Some(value) => match u32::try_from(value) {
                Ok(value) => Some(value),
                Err(_) => {
                    self.error(format!("{path}.{field}"), "must not be negative");
                    None
                }
            },
        };
        let tcp = settings.tcp.clone().unwrap_or_default();
        let http = settings.http.clone().unwrap_or_default();
        let pool = ConnectionPool {
            max_connections: limit("tcp.maxConnections", tcp.max_connections),
            max_pending_requests: limit(
                "http.http1MaxPendingRequests",
                http.http1_max_pending_requests,
            ),
            max_requests: limit("http.http2MaxRequests", http.http2_max_requests),
            max_requests_per_connection: limit(
                "http.maxRequestsPerConnection",
                http.max_requests_per_connection,
            ),
            max_retries: limit("http.maxRetries", http.max_retries),
            connect_timeout: tcp
                .connect_timeout
                .as_ref()
                .and_then(|text| self.duration(format!("{path}.tcp.connectTimeout"), text)),
        };
        self.unimplemented(
            &format!("{path}.tcp"),
            &[
                ("tcpKeepalive", &tcp.tcp_keepalive),
                ("maxConnectionDuration", &tcp.max_connection_duration),
                ("idleTimeout", &tcp.idle_timeout),
            ],
            "ignored",
        );
        self.unimplemented(
            &format!("{path}.http"),
            &[
                ("idleTimeout", &http.idle_timeout),
                ("h2UpgradePolicy", &http.h2_upgrade_policy),
                ("useClientProtocol", &http.use_client_protocol),
                ("maxConcurrentStreams", &http.max_concurrent_streams),
            ],
            "ignored",
        );
        Some(pool)
    }

    fn consistent_hash(
        &mut self,
        path: &str,
        hash: &istio::ConsistentHashLb,
    ) -> Option<LoadBalancer> {
        self.unimplemented(
            path,
            &[
                ("ringHash", &hash.ring_hash),
                ("maglev", &hash.maglev),
                ("minimumRingSize", &hash.minimum_ring_size),
            ],
            "weir hashes by rendezvous, which needs no table: ignored",
        );
        let mut keys = Vec::new();
        if let Some(header) = &hash.http_header_name {
            keys.push(HashKey::Header(header.to_ascii_lowercase()));
        }
        if let Some(cookie) = &hash.http_cookie {
            if cookie.ttl.is_some() || cookie.path.is_some() || cookie.attributes.is_some() {
                self.warn(
                    format!("{path}.httpCookie"),
                    "weir does not set the cookie yet: requests without it go to a random endpoint",
                );
            }
            keys.push(HashKey::Cookie(cookie.name.clone()));
        }
        if hash.use_source_ip == Some(true) {
            keys.push(HashKey::SourceIp);
        }
        if let Some(name) = &hash.http_query_parameter_name {
            keys.push(HashKey::QueryParameter(name.clone()));
        }
        if keys.len() != 1 {
            self.error(
                path,
                "exactly one of httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName must be set",
            );
            return None;
        }
        keys.pop().map(LoadBalancer::ConsistentHash)
    }
}

/// `host` as a fully qualified service name, resolved in `namespace` as
/// Istio resolves the short names of a VirtualService or DestinationRule:
/// a name without dots is a service of that namespace; `name.namespace`
/// gets `.svc.cluster.local`; anything else is taken as it is.
pub fn qualify(host: &str, namespace: &str) -> String {
    match host.matches('.').count() {
        0 => format!("{host}.{namespace}.svc.cluster.local"),
        1 => format!("{host}.svc.cluster.local"),
        _ => host.to_owned(),
    }
}

impl istio::VirtualService {
    pub fn translate(&self) -> Result<Translation<VirtualService>, Vec<FieldError>> {
        let mut checker = Checker::default();
        let namespace = self.metadata.namespace.clone().unwrap_or_default();
        let spec = &self.spec;
        if spec.hosts.is_empty() {
            checker.error("spec.hosts", "at least one host is required");
        }
        for (i, host) in spec.hosts.iter().enumerate() {
            if host.is_empty() {
                checker.error(format!("spec.hosts[{i}]"), "must not be empty");
            } else if host.contains('*') {
                checker.warn(
                    format!("spec.hosts[{i}]"),
                    "wildcard hosts are not implemented in weir yet: this host matches no service",
                );
            }
        }
        checker.unimplemented(
            "spec",
            &[("tls", &spec.tls), ("tcp", &spec.tcp)],
            "these routes are ignored, the traffic is forwarded at L4",
        );
        if spec.export_to.iter().any(|to| to != "*") {
            checker.warn(
                "spec.exportTo",
                "not implemented in weir yet: the VirtualService applies to every namespace",
            );
        }
        let mesh = spec.gateways.is_empty() || spec.gateways.iter().any(|g| g == "mesh");
        let http = spec
            .http
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| {
                http_rule(&mut checker, &format!("spec.http[{i}]"), rule, &namespace)
            })
            .collect();
        let value = VirtualService {
            hosts: spec
                .hosts
                .iter()
                .map(|host| qualify(host, &namespace))
                .collect(),
            mesh,
            http,
            name: self.metadata.name.clone().unwrap_or_default(),
            namespace,
        };
        checker.finish(value)
    }
}

fn http_rule(
    checker: &mut Checker,
    path: &str,
    rule: &istio::HttpRoute,
    namespace: &str,
) -> Option<HttpRule> {
    let skipped = rule.route.is_empty() && rule.delegate.is_some();
    checker.unimplemented(
        path,
        &[("delegate", &rule.delegate)],
        if skipped {
            "this rule is skipped, as if it were not there"
        } else {
            "ignored"
        },
    );
    let cors = rule.cors_policy.as_ref().map(|cors| {
        let path = format!("{path}.corsPolicy");
        let mut allow_origins: Vec<StringMatcher> = cors
            .allow_origins
            .iter()
            .enumerate()
            .filter_map(|(i, m)| checker.string_match(format!("{path}.allowOrigins[{i}]"), m))
            .collect();
        allow_origins.extend(cors.allow_origin.iter().cloned().map(StringMatcher::Exact));
        let forward_unmatched_preflights = match cors.unmatched_preflights.as_deref() {
            None | Some("UNSPECIFIED" | "FORWARD") => true,
            Some("IGNORE") => false,
            Some(other) => {
                checker.error(
                    format!("{path}.unmatchedPreflights"),
                    format!("{other:?} is not FORWARD or IGNORE"),
                );
                true
            }
        };
        Cors {
            allow_origins,
            allow_methods: cors.allow_methods.clone(),
            allow_headers: cors.allow_headers.clone(),
            expose_headers: cors.expose_headers.clone(),
            max_age: cors
                .max_age
                .as_ref()
                .and_then(|text| checker.duration(format!("{path}.maxAge"), text)),
            allow_credentials: cors.allow_credentials == Some(true),
            forward_unmatched_preflights,
        }
    });
    let mut mirrors = Vec::new();
    if let Some(mirror) = &rule.mirror {
        if !rule.mirrors.is_empty() {
            checker.error(path, "only one of mirror and mirrors may be set");
        }
        let percentage = checker.percentage(
            format!("{path}.mirrorPercentage.value"),
            rule.mirror_percentage.as_ref(),
            rule.mirror_percent,
        );
        mirrors.extend(mirror_of(
            checker,
            &format!("{path}.mirror"),
            mirror,
            percentage,
            namespace,
        ));
    }
    for (i, policy) in rule.mirrors.iter().enumerate() {
        let field = format!("{path}.mirrors[{i}]");
        let percentage = checker.percentage(
            format!("{field}.percentage.value"),
            policy.percentage.as_ref(),
            None,
        );
        mirrors.extend(mirror_of(
            checker,
            &format!("{field}.destination"),
            &policy.destination,
            percentage,
            namespace,
        ));
    }
    let actions = [
        !rule.route.is_empty(),
        rule.redirect.is_some(),
        rule.direct_response.is_some(),
    ];
    match actions.iter().filter(|&&set| set).count() {
        0 if !skipped => checker.error(
            format!("{path}.route"),
            "required: at least one destination (or a redirect or directResponse)",
        ),
        0 | 1 => {}
        _ => checker.error(
            path,
            "only one of route, redirect and directResponse may be set",
        ),
    }
    let redirect = rule
        .redirect
        .as_ref()
        .and_then(|redirect| self::redirect(checker, &format!("{path}.redirect"), redirect));
    let direct_response = rule.direct_response.as_ref().and_then(|direct| {
        let path = format!("{path}.directResponse");
        let body = direct.body.clone().unwrap_or_default();
        checker.unimplemented(
            &format!("{path}.body"),
            &[("bytes", &body.bytes)],
            "an empty body is sent",
        );
        match u16::try_from(direct.status) {
            Ok(status) if (200..=599).contains(&status) => Some(DirectResponse {
                status,
                body: body.string.unwrap_or_default(),
            }),
            _ => {
                checker.error(
                    format!("{path}.status"),
                    format!("{} is not an HTTP status (200-599)", direct.status),
                );
                None
            }
        }
    });
    let rewrite = rule.rewrite.as_ref().map(|rewrite| {
        let path = format!("{path}.rewrite");
        if rewrite.uri.is_some() && rewrite.uri_regex_rewrite.is_some() {
            checker.error(&path, "only one of uri and uriRegexRewrite may be set");
        }
        let uri_regex =
            rewrite.uri_regex_rewrite.as_ref().and_then(|regex| {
                match regex::Regex::new(&regex.pattern) {
                    Ok(compiled) => Some((
                        Pattern {
                            source: regex.pattern.clone(),
                            regex: compiled,
                        },
                        regex.rewrite.replace("\\", "$"),
                    )),
                    Err(error) => {
                        checker.error(
                            format!("{path}.uriRegexRewrite.match"),
                            format!("not a valid regex: {error}"),
                        );
                        None
                    }
                }
            });
        Rewrite {
            uri: rewrite.uri.clone(),
            authority: rewrite.authority.clone(),
            uri_regex,
        }
    });
    let headers = header_changes(checker, &format!("{path}.headers"), rule.headers.as_ref());
    let matches = rule
        .matches
        .iter()
        .enumerate()
        .filter_map(|(i, m)| request_match(checker, &format!("{path}.match[{i}]"), m))
        .collect();
    let several = rule.route.len() > 1;
    let mut routes = Vec::new();
    for (i, route) in rule.route.iter().enumerate() {
        let field = format!("{path}.route[{i}]");
        let headers = header_changes(checker, &format!("{field}.headers"), route.headers.as_ref());
        let Some(destination) = &route.destination else {
            checker.error(format!("{field}.destination"), "missing");
            continue;
        };
        if destination.host.is_empty() {
            checker.error(format!("{field}.destination.host"), "must not be empty");
        }
        let port = match &destination.port {
            Some(port) => match u16::try_from(port.number) {
                Ok(number) if number != 0 => Some(number),
                _ => {
                    checker.error(
                        format!("{field}.destination.port.number"),
                        format!("{} is not a port number (1-65535)", port.number),
                    );
                    None
                }
            },
            None => None,
        };
        let weight = match u32::try_from(route.weight) {
            Ok(weight) => weight,
            Err(_) => {
                checker.error(format!("{field}.weight"), "must not be negative");
                0
            }
        };
        routes.push(WeightedDestination {
            host: qualify(&destination.host, namespace),
            subset: destination
                .subset
                .clone()
                .filter(|subset| !subset.is_empty()),
            port,
            // A single destination takes all traffic whatever its weight.
            weight: if several { weight } else { 100 },
            headers,
        });
    }
    if several && routes.iter().all(|route| route.weight == 0) {
        checker.error(format!("{path}.route"), "the weights add up to 0");
    }
    let timeout = rule
        .timeout
        .as_ref()
        .and_then(|timeout| checker.duration(format!("{path}.timeout"), timeout))
        .filter(|timeout| !timeout.is_zero());
    let retries = rule
        .retries
        .as_ref()
        .and_then(|retries| retry_policy(checker, &format!("{path}.retries"), retries));
    let retries = match (&rule.retries, retries) {
        // Set but invalid: errors are reported, the value does not matter.
        (Some(_), None) => Some(RetryPolicy {
            attempts: 0,
            per_try_timeout: None,
            retry_on: RetryOn::default(),
        }),
        (_, retries) => retries,
    };
    let fault = rule.fault.as_ref().map(|fault| {
        let path = format!("{path}.fault");
        let delay = fault.delay.as_ref().and_then(|delay| {
            checker.unimplemented(
                &format!("{path}.delay"),
                &[("exponentialDelay", &delay.exponential_delay)],
                "ignored",
            );
            let Some(text) = &delay.fixed_delay else {
                checker.error(format!("{path}.delay.fixedDelay"), "required");
                return None;
            };
            let fixed_delay = checker.duration(format!("{path}.delay.fixedDelay"), text)?;
            let percentage = checker.percentage(
                format!("{path}.delay.percentage.value"),
                delay.percentage.as_ref(),
                delay.percent,
            );
            Some(FaultDelay {
                fixed_delay,
                percentage,
            })
        });
        let abort = fault.abort.as_ref().and_then(|abort| {
            checker.unimplemented(
                &format!("{path}.abort"),
                &[
                    ("grpcStatus", &abort.grpc_status),
                    ("http2Error", &abort.http2_error),
                ],
                "this abort is ignored",
            );
            let status = abort.http_status?;
            let http_status = match u16::try_from(status) {
                Ok(code) if (200..=599).contains(&code) => code,
                _ => {
                    checker.error(
                        format!("{path}.abort.httpStatus"),
                        format!("{status} is not an HTTP status (200-599)"),
                    );
                    return None;
                }
            };
            let percentage = checker.percentage(
                format!("{path}.abort.percentage.value"),
                abort.percentage.as_ref(),
                None,
            );
            Some(FaultAbort {
                http_status,
                percentage,
            })
        });
        if rule.timeout.is_some() || rule.retries.is_some() {
            checker.warn(
                path.clone(),
                "as in Istio, timeout and retries are not applied on a route with fault injection",
            );
        }
        Fault { delay, abort }
    });
    if skipped {
        return None;
    }
    Some(HttpRule {
        name: rule.name.clone(),
        matches,
        routes,
        timeout,
        retries,
        fault,
        redirect,
        direct_response,
        rewrite,
        headers,
        mirrors,
        cors,
    })
}

fn mirror_of(
    checker: &mut Checker,
    path: &str,
    destination: &istio::Destination,
    percentage: f64,
    namespace: &str,
) -> Option<Mirror> {
    if destination.host.is_empty() {
        checker.error(format!("{path}.host"), "must not be empty");
        return None;
    }
    let port = match &destination.port {
        Some(port) => match u16::try_from(port.number) {
            Ok(number) if number != 0 => Some(number),
            _ => {
                checker.error(
                    format!("{path}.port.number"),
                    format!("{} is not a port number (1-65535)", port.number),
                );
                return None;
            }
        },
        None => None,
    };
    Some(Mirror {
        host: qualify(&destination.host, namespace),
        subset: destination
            .subset
            .clone()
            .filter(|subset| !subset.is_empty()),
        port,
        percentage,
    })
}

fn redirect(checker: &mut Checker, path: &str, redirect: &istio::HttpRedirect) -> Option<Redirect> {
    let code = match redirect.redirect_code {
        None => 301,
        Some(code) => match u16::try_from(code) {
            Ok(code) if (300..=399).contains(&code) => code,
            _ => {
                checker.error(
                    format!("{path}.redirectCode"),
                    format!("{code} is not a redirect status (300-399)"),
                );
                return None;
            }
        },
    };
    let port = match redirect.port {
        None => None,
        Some(port) => match u16::try_from(port) {
            Ok(port) if port != 0 => Some(port),
            _ => {
                checker.error(
                    format!("{path}.port"),
                    format!("{port} is not a port number (1-65535)"),
                );
                return None;
            }
        },
    };
    let port_from_request = match redirect.derive_port.as_deref() {
        None | Some("FROM_PROTOCOL_DEFAULT") => false,
        Some("FROM_REQUEST_PORT") => true,
        Some(other) => {
            checker.error(
                format!("{path}.derivePort"),
                format!("{other:?} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"),
            );
            return None;
        }
    };
    Some(Redirect {
        uri: redirect.uri.clone(),
        authority: redirect.authority.clone(),
        port,
        port_from_request,
        scheme: redirect.scheme.clone(),
        code,
    })
}

fn header_changes(checker: &mut Checker, path: &str, headers: Option<&istio::Headers>) -> Headers {
    let mut ops = |name: &str, operations: Option<&istio::HeaderOperations>| {
        let Some(operations) = operations else {
            return HeaderOps::default();
        };
        let mut valid = |kind: &str, (header, value): (&String, &String)| {
            let field = format!("{path}.{name}.{kind}[{header:?}]");
            if hyper::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
                checker.error(field, "not a valid header name");
                return None;
            }
            if hyper::header::HeaderValue::from_str(value).is_err() {
                checker.error(field, format!("{value:?} is not a valid header value"));
                return None;
            }
            Some((header.to_ascii_lowercase(), value.clone()))
        };
        HeaderOps {
            set: operations
                .set
                .iter()
                .filter_map(|pair| valid("set", pair))
                .collect(),
            add: operations
                .add
                .iter()
                .filter_map(|pair| valid("add", pair))
                .collect(),
            remove: operations
                .remove
                .iter()
                .map(|name| name.to_ascii_lowercase())
                .collect(),
        }
    };
    let Some(headers) = headers else {
        return Headers::default();
    };
    Headers {
        request: ops("request", headers.request.as_ref()),
        response: ops("response", headers.response.as_ref()),
    }
}

fn request_match(
    checker: &mut Checker,
    path: &str,
    m: &istio::HttpMatchRequest,
) -> Option<RequestMatch> {
    let mut one = |name: &str, matcher: &Option<istio::StringMatch>| {
        matcher
            .as_ref()
            .and_then(|matcher| checker.string_match(format!("{path}.{name}"), matcher))
    };
    let uri = one("uri", &m.uri);
    let scheme = one("scheme", &m.scheme);
    let method = one("method", &m.method);
    let authority = one("authority", &m.authority);
    let port = match m.port {
        Some(port) => match u16::try_from(port) {
            Ok(number) if number != 0 => Some(number),
            _ => {
                checker.error(
                    format!("{path}.port"),
                    format!("{port} is not a port number (1-65535)"),
                );
                None
            }
        },
        None => None,
    };
    if let Some(prefix) = &m.stat_prefix {
        let _ = prefix;
        checker.warn(
            format!("{path}.statPrefix"),
            "not implemented in weir yet: ignored",
        );
    }
    // A match for gateways only never matches mesh traffic.
    if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == "mesh") {
        return None;
    }
    Some(RequestMatch {
        uri,
        ignore_uri_case: m.ignore_uri_case,
        scheme,
        method,
        authority,
        headers: checker.string_matches(path, "headers", &m.headers, true),
        without_headers: checker.string_matches(path, "withoutHeaders", &m.without_headers, true),
        query_params: checker.string_matches(path, "queryParams", &m.query_params, false),
        port,
        source_labels: m.source_labels.clone(),
        source_namespace: m.source_namespace.clone(),
    })
}

fn retry_policy(
    checker: &mut Checker,
    path: &str,
    retries: &istio::HttpRetry,
) -> Option<RetryPolicy> {
    checker.unimplemented(
        path,
        &[("retryRemoteLocalities", &retries.retry_remote_localities)],
        "ignored",
    );
    if retries.backoff.is_some() {
        checker.warn(
            format!("{path}.backoff"),
            "not implemented in weir yet: Envoy's default, 25ms base, is used",
        );
    }
    let Ok(attempts) = u32::try_from(retries.attempts) else {
        checker.error(format!("{path}.attempts"), "must not be negative");
        return None;
    };
    let per_try_timeout = match &retries.per_try_timeout {
        Some(text) => Some(checker.duration(format!("{path}.perTryTimeout"), text)?),
        None => None,
    };
    let retry_on = match &retries.retry_on {
        Some(text) => parse_retry_on(text)
            .map_err(|message| checker.error(format!("{path}.retryOn"), message))
            .ok()?,
        // Istio's default conditions when `retries` leaves them out.
        None => RetryPolicy::istio_default().retry_on,
    };
    Some(RetryPolicy {
        attempts,
        per_try_timeout,
        retry_on,
    })
}

/// Istio's `retryOn`: Envoy's conditions, comma separated, and status codes.
pub fn parse_retry_on(text: &str) -> Result<RetryOn, String> {
    let mut on = RetryOn::default();
    for item in text
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        match item {
            "5xx" => on.five_xx = true,
            "gateway-error" => on.gateway_error = true,
            "reset" => on.reset = true,
            "connect-failure" => on.connect_failure = true,
            "refused-stream" => on.refused_stream = true,
            "retriable-4xx" => on.retriable_4xx = true,
            // The codes come as numbers in the same list.
            "retriable-status-codes" => {}
            "cancelled" => on.cancelled = true,
            "deadline-exceeded" => on.deadline_exceeded = true,
            "internal" => on.internal = true,
            "resource-exhausted" => on.resource_exhausted = true,
            "unavailable" => on.unavailable = true,
            code => match code.parse::<u16>() {
                Ok(code) if (100..=599).contains(&code) => on.retriable_status_codes.push(code),
                _ => {
                    return Err(format!(
                        "{code:?} is not a retry condition that Istio knows, nor a status code"
                    ));
                }
            },
        }
    }
    Ok(on)
}

impl istio::DestinationRule {
    pub fn translate(&self) -> Result<Translation<DestinationRule>, Vec<FieldError>> {
        let mut checker = Checker::default();
        let namespace = self.metadata.namespace.clone().unwrap_or_default();
        let spec = &self.spec;
        if spec.host.is_empty() {
            checker.error("spec.host", "required");
        } else if spec.host.contains('*') {
            checker.warn(
                "spec.host",
                "wildcard hosts are not implemented in weir yet: applies to no service",
            );
        }
        checker.unimplemented(
            "spec",
            &[("workloadSelector", &spec.workload_selector)],
            "applies to every client",
        );
        if spec.export_to.iter().any(|to| to != "*") {
            checker.warn(
                "spec.exportTo",
                "not implemented in weir yet: the rule applies to every namespace",
            );
        }
        let load_balancer =
            checker.load_balancer("spec.trafficPolicy", spec.traffic_policy.as_ref());
        let connection_pool =
            checker.connection_pool("spec.trafficPolicy", spec.traffic_policy.as_ref());
        let outlier_detection =
            checker.outlier_detection("spec.trafficPolicy", spec.traffic_policy.as_ref());
        let mut subsets: Vec<Subset> = Vec::new();
        for (i, subset) in spec.subsets.iter().enumerate() {
            let path = format!("spec.subsets[{i}]");
            if subset.name.is_empty() {
                checker.error(format!("{path}.name"), "must not be empty");
            } else if subsets.iter().any(|s| s.name == subset.name) {
                checker.error(
                    format!("{path}.name"),
                    format!("{:?} is defined twice", subset.name),
                );
            }
            let load_balancer = checker.load_balancer(
                &format!("{path}.trafficPolicy"),
                subset.traffic_policy.as_ref(),
            );
            let connection_pool = checker.connection_pool(
                &format!("{path}.trafficPolicy"),
                subset.traffic_policy.as_ref(),
            );
            let outlier_detection = checker.outlier_detection(
                &format!("{path}.trafficPolicy"),
                subset.traffic_policy.as_ref(),
            );
            subsets.push(Subset {
                name: subset.name.clone(),
                labels: subset.labels.clone(),
                load_balancer,
                connection_pool,
                outlier_detection,
            });
        }
        let value = DestinationRule {
            host: qualify(&spec.host, &namespace),
            name: self.metadata.name.clone().unwrap_or_default(),
            namespace,
            load_balancer,
            connection_pool,
            outlier_detection,
            subsets,
        };
        checker.finish(value)
    }
}
