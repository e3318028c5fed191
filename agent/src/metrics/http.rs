//! Istio's HTTP metrics: `istio_requests_total` and
//! `istio_request_duration_milliseconds`, with the TCP metrics' label set
//! plus `response_code`, and `request_protocol="http"`.

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
}

impl HttpLabels {
    fn render(&self) -> String {
        let code = self.response_code.to_string();
        let mut pairs: Vec<(&str, &str)> = self
            .base
            .pairs()
            .into_iter()
            .map(|(name, value)| match name {
                "request_protocol" => (name, "http"),
                _ => (name, value),
            })
            .collect();
        pairs.push(("response_code", &code));
        format_labels(&pairs)
    }
}

/// One series: a request count and a duration histogram.
#[derive(Debug, Default)]
pub struct HttpSeries {
    pub requests: AtomicU64,
    /// Counts per bucket (not cumulative); the last is +Inf.
    buckets: [AtomicU64; DURATION_BUCKETS_MS.len() + 1],
    sum_micros: AtomicU64,
}

impl HttpSeries {
    pub fn record(&self, duration: Duration) {
        self.requests.fetch_add(1, Relaxed);
        let millis = duration.as_secs_f64() * 1000.0;
        let bucket = DURATION_BUCKETS_MS
            .iter()
            .position(|&le| millis <= le)
            .unwrap_or(DURATION_BUCKETS_MS.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        let micros = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct HttpMetrics {
    series: Mutex<HashMap<HttpLabels, Arc<HttpSeries>>>,
}

impl HttpMetrics {
    /// Counts one request that got its response after `duration`.
    pub fn record(&self, labels: HttpLabels, duration: Duration) {
        let series = self
            .series
            .lock()
            .unwrap()
            .entry(labels)
            .or_default()
            .clone();
        series.record(duration);
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
        let name = "istio_request_duration_milliseconds";
        header(
            out,
            name,
            "HTTP request durations, until the response headers.",
            "histogram",
        );
        for (labels, s) in &series {
            // `{a="b"}` → `{a="b",le="…"}`
            let open = &labels[..labels.len() - 1];
            let mut cumulative = 0;
            for (i, bucket) in s.buckets.iter().enumerate() {
                cumulative += bucket.load(Relaxed);
                let le = DURATION_BUCKETS_MS
                    .get(i)
                    .map_or_else(|| "+Inf".to_owned(), |le| le.to_string());
                let _ = writeln!(out, "{name}_bucket{open},le=\"{le}\"}} {cumulative}");
            }
            let sum = s.sum_micros.load(Relaxed) as f64 / 1000.0;
            let _ = writeln!(out, "{name}_sum{labels} {sum}");
            let _ = writeln!(out, "{name}_count{labels} {cumulative}");
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
        };
        metrics.record(labels.clone(), Duration::from_millis(3));
        metrics.record(labels, Duration::from_millis(700));
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
    }
}
