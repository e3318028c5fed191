//! Prometheus metrics: Istio's standard TCP metrics with its full label set,
//! so that Istio dashboards and Kiali work unchanged, and weir's own
//! data-path counters.
//!
//! Series are plain atomics behind `Arc`s: a connection holds its series and
//! bumps byte counters as the bytes move, so long connections show progress
//! at every scrape, not only at close.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::model::{Cluster, Workload};

pub mod http;

const UNKNOWN: &str = "unknown";

/// One peer's half of the label set.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    pub app: String,
    pub version: String,
    pub canonical_service: String,
    pub canonical_revision: String,
}

impl Peer {
    pub fn unknown() -> Peer {
        Peer {
            workload: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            principal: UNKNOWN.into(),
            app: UNKNOWN.into(),
            version: UNKNOWN.into(),
            canonical_service: UNKNOWN.into(),
            canonical_revision: UNKNOWN.into(),
        }
    }

    /// In plaintext mode no peer has a proven identity, so the principal is
    /// `unknown`, as Istio reports it without mTLS.
    pub fn of(workload: &Workload) -> Peer {
        Peer {
            workload: workload.workload_name.clone(),
            namespace: workload.namespace.clone(),
            principal: UNKNOWN.into(),
            app: workload.app.clone().unwrap_or_else(|| UNKNOWN.into()),
            version: workload.version.clone().unwrap_or_else(|| UNKNOWN.into()),
            canonical_service: workload.canonical_service.clone(),
            canonical_revision: workload.canonical_revision.clone(),
        }
    }
}

/// Which end of the connection reports: the client's proxy (outbound) or
/// the server's (inbound).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    fn name(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    /// As Istio reports it: the server's side knows the connection was
    /// plaintext; the client's side cannot know the server's mode.
    fn security_policy(self) -> &'static str {
        match self {
            Reporter::Source => UNKNOWN,
            Reporter::Destination => "none",
        }
    }
}

/// Istio's standard label set for TCP metrics.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TcpLabels {
    pub reporter: Reporter,
    pub source: Peer,
    pub destination: Peer,
    /// FQDN, short name and namespace of the destination service.
    pub destination_service: [String; 3],
    pub response_flags: &'static str,
}

impl TcpLabels {
    fn pairs(&self) -> [(&'static str, &str); 21] {
        let (s, d) = (&self.source, &self.destination);
        [
            ("reporter", self.reporter.name()),
            ("source_workload", &s.workload),
            ("source_workload_namespace", &s.namespace),
            ("source_principal", &s.principal),
            ("source_app", &s.app),
            ("source_version", &s.version),
            ("source_canonical_service", &s.canonical_service),
            ("source_canonical_revision", &s.canonical_revision),
            ("destination_workload", &d.workload),
            ("destination_workload_namespace", &d.namespace),
            ("destination_principal", &d.principal),
            ("destination_app", &d.app),
            ("destination_version", &d.version),
            ("destination_canonical_service", &d.canonical_service),
            ("destination_canonical_revision", &d.canonical_revision),
            ("destination_service", &self.destination_service[0]),
            ("destination_service_name", &self.destination_service[1]),
            (
                "destination_service_namespace",
                &self.destination_service[2],
            ),
            ("request_protocol", "tcp"),
            ("response_flags", self.response_flags),
            (
                "connection_security_policy",
                self.reporter.security_policy(),
            ),
        ]
    }
}

/// The counters of one series.
#[derive(Debug, Default)]
pub struct TcpCounters {
    pub opened: AtomicU64,
    pub closed: AtomicU64,
    /// Istio's meaning: bytes of the response, from server to client.
    pub sent: AtomicU64,
    /// Bytes of the request, from client to server.
    pub received: AtomicU64,
}

/// Data-path gauges and counters read from the kernel at scrape time.
#[derive(Debug, Default)]
pub struct DatapathStats {
    /// (direction, decision, count)
    pub decisions: Vec<(&'static str, &'static str, u64)>,
    /// (map name, entries, capacity)
    pub maps: Vec<(&'static str, usize, u32)>,
    pub enrolled_pods: usize,
    /// (direction, policy, count) of policy denials.
    pub policy_denials: Vec<(&'static str, String, u64)>,
    /// Objects or files the manifest source rejected, over all loads.
    pub config_rejected: u64,
}

#[derive(Debug, Default)]
pub struct Metrics {
    tcp: Mutex<HashMap<TcpLabels, Arc<TcpCounters>>>,
    /// Requests on HTTP ports (`proxy::http`).
    pub http: http::HttpMetrics,
    /// Bytes of proxied connections that the kernel carried from socket to
    /// socket (sockmap fast path), both directions, as of the last scrape
    /// or close; also in the Istio byte counters.
    pub kernel_bytes: AtomicU64,
}

impl Metrics {
    /// The series for `labels`, created on first use.
    pub fn tcp(&self, labels: TcpLabels) -> Arc<TcpCounters> {
        let mut tcp = self.tcp.lock().unwrap();
        tcp.entry(labels).or_default().clone()
    }

    /// Drops the series of workloads that no pod backs any more, unless a
    /// live connection still holds them.
    pub fn retain_known(&self, cluster: &Cluster) {
        let mut tcp = self.tcp.lock().unwrap();
        let known = |peer: &Peer| {
            peer.workload == UNKNOWN
                || cluster
                    .workloads()
                    .iter()
                    .any(|w| w.namespace == peer.namespace && w.workload_name == peer.workload)
        };
        tcp.retain(|labels, counters| {
            Arc::strong_count(counters) > 1 || (known(&labels.source) && known(&labels.destination))
        });
    }

    /// Everything in Prometheus' text exposition format.
    pub fn render(&self, stats: &DatapathStats) -> String {
        let mut out = String::new();
        let tcp = self.tcp.lock().unwrap();
        let mut series: Vec<_> = tcp.iter().collect();
        series.sort_by_cached_key(|(labels, _)| format_labels(&labels.pairs()));
        type Pick = fn(&TcpCounters) -> &AtomicU64;
        let families: [(&str, &str, Pick); 4] = [
            (
                "istio_tcp_connections_opened_total",
                "Total TCP connections opened.",
                |c| &c.opened,
            ),
            (
                "istio_tcp_connections_closed_total",
                "Total TCP connections closed.",
                |c| &c.closed,
            ),
            (
                "istio_tcp_sent_bytes_total",
                "Bytes sent during response (server to client).",
                |c| &c.sent,
            ),
            (
                "istio_tcp_received_bytes_total",
                "Bytes received during request (client to server).",
                |c| &c.received,
            ),
        ];
        for (name, help, pick) in families {
            header(&mut out, name, help, "counter");
            for (labels, counters) in &series {
                let value = pick(counters).load(Relaxed);
                let _ = writeln!(out, "{name}{} {value}", format_labels(&labels.pairs()));
            }
        }
        drop(tcp);
        self.http.render(&mut out);

        header(
            &mut out,
            "weir_decisions_total",
            "Decisions of the eBPF programs on this node, per direction.",
            "counter",
        );
        for (direction, decision, count) in &stats.decisions {
            let _ = writeln!(
                out,
                "weir_decisions_total{{direction=\"{direction}\",decision=\"{decision}\"}} {count}"
            );
        }
        header(
            &mut out,
            "weir_map_entries",
            "Entries in each eBPF map.",
            "gauge",
        );
        for (map, entries, _) in &stats.maps {
            let _ = writeln!(out, "weir_map_entries{{map=\"{map}\"}} {entries}");
        }
        header(
            &mut out,
            "weir_map_capacity",
            "Maximum entries of each eBPF map.",
            "gauge",
        );
        for (map, _, capacity) in &stats.maps {
            let _ = writeln!(out, "weir_map_capacity{{map=\"{map}\"}} {capacity}");
        }
        header(
            &mut out,
            "weir_kernel_carried_bytes_total",
            "Bytes of proxied connections that the kernel moved between their sockets (sockmap fast path).",
            "counter",
        );
        let _ = writeln!(
            out,
            "weir_kernel_carried_bytes_total {}",
            self.kernel_bytes.load(Relaxed)
        );
        header(
            &mut out,
            "weir_enrolled_pods",
            "Pods whose traffic this agent takes over.",
            "gauge",
        );
        let _ = writeln!(out, "weir_enrolled_pods {}", stats.enrolled_pods);
        header(
            &mut out,
            "weir_policy_denied_total",
            "Connections denied by AuthorizationPolicy, by policy (none: no ALLOW policy matched).",
            "counter",
        );
        for (direction, policy, count) in &stats.policy_denials {
            let labels = format_labels(&[("direction", direction), ("policy", policy)]);
            let _ = writeln!(out, "weir_policy_denied_total{labels} {count}");
        }
        header(
            &mut out,
            "weir_config_rejected_total",
            "Manifest objects or files rejected; the last good version stays in force.",
            "counter",
        );
        let _ = writeln!(out, "weir_config_rejected_total {}", stats.config_rejected);
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn format_labels(pairs: &[(&str, &str)]) -> String {
    let mut out = String::from("{");
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{name}=\"");
        for c in value.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(source: &str, flags: &'static str) -> TcpLabels {
        TcpLabels {
            reporter: Reporter::Source,
            source: Peer {
                workload: source.into(),
                namespace: "default".into(),
                ..Peer::unknown()
            },
            destination: Peer::unknown(),
            destination_service: [
                "details.default.svc.cluster.local".into(),
                "details".into(),
                "default".into(),
            ],
            response_flags: flags,
        }
    }

    #[test]
    fn renders_every_istio_label_and_escapes_values() {
        let metrics = Metrics::default();
        let series = metrics.tcp(labels("product\"page", "-"));
        series.opened.fetch_add(2, Relaxed);
        series.received.fetch_add(10, Relaxed);
        let text = metrics.render(&DatapathStats::default());
        let line = text
            .lines()
            .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .unwrap();
        assert!(line.ends_with("} 2"), "{line}");
        assert!(
            line.contains(r#"source_workload="product\"page""#),
            "{line}"
        );
        for name in [
            "reporter",
            "source_workload_namespace",
            "source_principal",
            "source_app",
            "source_version",
            "source_canonical_service",
            "source_canonical_revision",
            "destination_workload",
            "destination_workload_namespace",
            "destination_principal",
            "destination_app",
            "destination_version",
            "destination_canonical_service",
            "destination_canonical_revision",
            "destination_service",
            "destination_service_name",
            "destination_service_namespace",
            "request_protocol",
            "response_flags",
            "connection_security_policy",
        ] {
            assert!(
                line.contains(&format!("{name}=\"")),
                "{name} missing in {line}"
            );
        }
        assert!(text.contains("# TYPE istio_tcp_received_bytes_total counter"));
    }

    #[test]
    fn same_labels_share_one_series() {
        let metrics = Metrics::default();
        metrics.tcp(labels("a", "-")).opened.fetch_add(1, Relaxed);
        metrics.tcp(labels("a", "-")).opened.fetch_add(1, Relaxed);
        metrics.tcp(labels("a", "UF")).opened.fetch_add(1, Relaxed);
        let text = metrics.render(&DatapathStats::default());
        let opened: Vec<_> = text
            .lines()
            .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
            .collect();
        assert_eq!(opened.len(), 2, "{opened:?}");
    }

    #[test]
    fn series_of_gone_workloads_are_dropped_unless_in_use() {
        let metrics = Metrics::default();
        drop(metrics.tcp(labels("gone", "-")));
        let held = metrics.tcp(labels("busy", "-"));
        metrics.retain_known(&Cluster::default());
        let text = metrics.render(&DatapathStats::default());
        assert!(!text.contains("source_workload=\"gone\""));
        assert!(text.contains("source_workload=\"busy\""));
        drop(held);
    }
}
