//! Istio's HTTP metrics: `istio_requests_total`,
//! `istio_request_duration_milliseconds`, `istio_request_bytes` and
//! `istio_response_bytes`, with the TCP metrics' label set plus
//! `response_code`, and `request_protocol="http"`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{TcpLabels, format_labels, header};

/// Istio's default buckets for request durations, in milliseconds.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HttpLabels {
    /// Everything but the protocol and the response code, as for TCP.
    pub base: TcpLabels,
    pub response_code: u16,
    /// A gRPC request (`content-type: application/grpc…`): Istio says
    /// `request_protocol="grpc"`.
    pub grpc: bool,
}

impl HttpLabels {
    fn render(&self) -> String {
        let code = self.response_code.to_string();
        let mut pairs: Vec<(&str, &str)> = self
            .base
            .pairs()
            .into_iter()
            .map(|(name, value)| match name {
                "request_protocol" => (name, if self.grpc { "grpc" } else { "http" }),
                _ => (name, value),
            })
            .collect();
        pairs.push(("response_code", &code));
        format_labels(&pairs)
    }
}

/// Istio's buckets for request and response sizes, in bytes.
pub const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// A histogram; `sum` is kept in thousandths of the unit.
#[derive(Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Counts per bucket (not cumulative); the last is +Inf.
    counts: Vec<AtomicU64>,
    sum_milli: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_milli: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: f64) {
        let bucket = self
            .bounds
            .iter()
            .position(|&le| value <= le)
            .unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum_milli.fetch_add((value * 1000.0) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        // `{a="b"}` → `{a="b",le="…"}`
        let open = &labels[..labels.len() - 1];
        let mut cumulative = 0;
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Relaxed);
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), |le| le.to_string());
            let _ = writeln!(out, "{name}_bucket{open},le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_milli.load(Relaxed) as f64 / 1000.0;
        let _ = writeln!(out, "{name}_sum{labels} {sum}");
        let _ = writeln!(out, "{name}_count{labels} {cumulative}");
    }
}

/// One series: a request count and histograms of durations and sizes.
#[derive(Debug)]
pub struct HttpSeries {
    pub requests: AtomicU64,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Default for HttpSeries {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            duration: Histogram::new(&DURATION_BUCKETS_MS),
            request_bytes: Histogram::new(&SIZE_BUCKETS),
            response_bytes: Histogram::new(&SIZE_BUCKETS),
        }
    }
}

impl HttpSeries {
    /// Counts one request of `request_bytes` that got its response
    /// headers after `duration`.
    pub fn record(&self, duration: Duration, request_bytes: u64) {
        self.requests.fetch_add(1, Relaxed);
        self.duration.observe(duration.as_secs_f64() * 1000.0);
        self.request_bytes.observe(request_bytes as f64);
    }

    /// Once the response has been sent, or given up on.
    pub fn record_response(&self, bytes: u64) {
        self.response_bytes.observe(bytes as f64);
    }
}

#[derive(Debug, Default)]
pub struct HttpMetrics {
    series: Mutex<HashMap<HttpLabels, Arc<HttpSeries>>>,
}

impl HttpMetrics {
    /// The series of `labels`, created on first use.
    pub fn series(&self, labels: HttpLabels) -> Arc<HttpSeries> {
        self.series
            .lock()
            .unwrap()
            .entry(labels)
            .or_default()
            .clone()
    }

    pub fn render(&self, out: &mut String) {
        let series = self.series.lock().unwrap();
        let mut series: Vec<(String, &Arc<HttpSeries>)> = series
            .iter()
            .map(|(labels, series)| (labels.render(), series))
            .collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        header(
            out,
            "istio_requests_total",
            "Total HTTP requests.",
            "counter",
        );
        for (labels, s) in &series {
            let _ = writeln!(
                out,
                "istio_requests_total{labels} {}",
                s.requests.load(Relaxed)
            );
        }
        type Pick = fn(&HttpSeries) -> &Histogram;
        let histograms: [(&str, &str, Pick); 3] = [
            (
                "istio_request_duration_milliseconds",
                "HTTP request durations, until the response headers.",
                |s| &s.duration,
            ),
            (
                "istio_request_bytes",
                "HTTP request sizes: headers, and a body of known length.",
                |s| &s.request_bytes,
            ),
            (
                "istio_response_bytes",
                "HTTP response sizes: headers and body.",
                |s| &s.response_bytes,
            ),
        ];
        for (name, help, pick) in histograms {
            header(out, name, help, "histogram");
            for (labels, s) in &series {
                pick(s).render(out, name, labels);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Peer, Reporter};

    #[test]
    fn renders_a_cumulative_histogram_with_the_response_code() {
        let metrics = HttpMetrics::default();
        let labels = HttpLabels {
            base: TcpLabels {
                reporter: Reporter::Source,
                source: Peer::unknown(),
                destination: Peer::unknown(),
                destination_service: ["a".into(), "b".into(), "c".into()],
                response_flags: "-",
            },
            response_code: 503,
            grpc: false,
        };
        let series = metrics.series(labels.clone());
        series.record(Duration::from_millis(3), 50);
        series.record(Duration::from_millis(700), 5000);
        series.record_response(20);
        let mut out = String::new();
        metrics.render(&mut out);
        let line = |prefix: &str| {
            out.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap()
                .to_owned()
        };
        assert!(line("istio_requests_total{").ends_with(" 2"), "{out}");
        assert!(line("istio_requests_total{").contains("response_code=\"503\""));
        assert!(line("istio_requests_total{").contains("request_protocol=\"http\""));
        let bucket = |le: &str| {
            out.lines()
                .find(|l| l.contains(&format!("le=\"{le}\"")))
                .unwrap()
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(bucket("1"), "0");
        assert_eq!(bucket("5"), "1");
        assert_eq!(bucket("1000"), "2");
        assert_eq!(bucket("+Inf"), "2");
        assert!(out.contains("istio_request_duration_milliseconds_sum{"));
        let size = |name: &str, le: &str| {
            out.lines()
                .find(|l| l.starts_with(name) && l.contains(&format!("le=\"{le}\"")))
                .unwrap()
                .rsplit(' ')
                .next()
                .unwrap()
                .to_owned()
        };
        assert_eq!(size("istio_request_bytes_bucket", "100"), "1");
        assert_eq!(size("istio_request_bytes_bucket", "10000"), "2");
        assert_eq!(size("istio_response_bytes_bucket", "100"), "1");
        assert!(out.contains("istio_request_bytes_sum{"));
        assert!(out.contains("# TYPE istio_response_bytes histogram"));
    }
}
