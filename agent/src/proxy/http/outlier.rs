//! Outlier detection with a DestinationRule's `outlierDetection`, as
//! Envoy does it: an endpoint that fails `consecutive5xxErrors` times in a
//! row (or `consecutiveGatewayErrors` times with 502, 503, 504), counting
//! failures to get an answer at all, is ejected for `baseEjectionTime`
//! times the number of its ejections, unless `maxEjectionPercent` of the
//! endpoints are out already. State is per source pod and destination.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use super::retry::Outcome;
use crate::routing::OutlierDetection;

type Key = (u64, String, String, u16, OutlierDetection);

static DETECTORS: LazyLock<Mutex<HashMap<Key, Arc<Detector>>>> = LazyLock::new(Mutex::default);

#[derive(Debug)]
pub struct Detector {
    config: OutlierDetection,
    endpoints: Mutex<HashMap<SocketAddr, Health>>,
}

#[derive(Debug, Default)]
struct Health {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// Forgets the detectors of pods not in `pods` (netns cookies).
pub fn forget_other_pods(pods: &HashSet<u64>) {
    DETECTORS
        .lock()
        .unwrap()
        .retain(|key, _| pods.contains(&key.0));
}

/// The detector of this pod's requests to one destination.
pub fn detector(
    cookie: u64,
    host: &str,
    subset: &str,
    port: u16,
    config: &OutlierDetection,
) -> Arc<Detector> {
    let key = (
        cookie,
        host.to_owned(),
        subset.to_owned(),
        port,
        config.clone(),
    );
    let mut detectors = DETECTORS.lock().unwrap();
    detectors
        .entry(key)
        .or_insert_with(|| {
            Arc::new(Detector {
                config: config.clone(),
                endpoints: Mutex::default(),
            })
        })
        .clone()
}

impl Detector {
    /// `endpoints` without the ejected ones; all of them if none is left.
    pub fn healthy(&self, endpoints: &[SocketAddr], now: Instant) -> Vec<SocketAddr> {
        let health = self.endpoints.lock().unwrap();
        let healthy: Vec<SocketAddr> = endpoints
            .iter()
            .copied()
            .filter(|addr| {
                health
                    .get(addr)
                    .and_then(|h| h.ejected_until)
                    .is_none_or(|until| until <= now)
            })
            .collect();
        if healthy.is_empty() {
            endpoints.to_vec()
        } else {
            healthy
        }
    }

    /// Counts how a try to `addr` ended; true when that ejected it.
    pub fn report(&self, addr: SocketAddr, outcome: Outcome, total: usize, now: Instant) -> bool {
        let (five_xx, gateway) = match outcome {
            Outcome::Response { status, .. } => (status >= 500, matches!(status, 502..=504)),
            // No answer at all counts as a gateway error, as in Envoy.
            _ => (true, true),
        };
        let mut health = self.endpoints.lock().unwrap();
        let ejected = health
            .values()
            .filter(|h| h.ejected_until.is_some_and(|until| until > now))
            .count();
        let entry = health.entry(addr).or_default();
        if entry.ejected_until.is_some_and(|until| until <= now) {
            entry.ejected_until = None;
        }
        entry.consecutive_5xx = if five_xx {
            entry.consecutive_5xx + 1
        } else {
            0
        };
        entry.consecutive_gateway = if gateway {
            entry.consecutive_gateway + 1
        } else {
            0
        };
        let config = &self.config;
        let tripped = (config.consecutive_5xx_errors > 0
            && entry.consecutive_5xx >= config.consecutive_5xx_errors)
            || (config.consecutive_gateway_errors > 0
                && entry.consecutive_gateway >= config.consecutive_gateway_errors);
        // Envoy always lets one endpoint be ejected.
        let room =
            ejected == 0 || (ejected + 1) * 100 <= total * config.max_ejection_percent as usize;
        if !tripped || entry.ejected_until.is_some() || !room {
            return false;
        }
        entry.ejections += 1;
        entry.ejected_until = Some(now + config.base_ejection_time * entry.ejections);
        entry.consecutive_5xx = 0;
        entry.consecutive_gateway = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_gone_pod_loses_its_detectors_and_others_keep_theirs() {
        let kept = detector(
            7,
            "reviews.default.svc.cluster.local",
            "v1",
            9080,
            &config(),
        );
        detector(
            8,
            "reviews.default.svc.cluster.local",
            "v1",
            9080,
            &config(),
        );
        forget_other_pods(&HashSet::from([7]));
        let cookies: Vec<u64> = DETECTORS.lock().unwrap().keys().map(|key| key.0).collect();
        assert_eq!(cookies, [7]);
        let again = detector(
            7,
            "reviews.default.svc.cluster.local",
            "v1",
            9080,
            &config(),
        );
        assert!(
            Arc::ptr_eq(&kept, &again),
            "the remaining pod's state was reset"
        );
    }

    fn config() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx_errors: 2,
            consecutive_gateway_errors: 0,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }

    fn status(status: u16) -> Outcome {
        Outcome::Response {
            status,
            grpc_status: None,
        }
    }

    #[test]
    fn consecutive_errors_eject_for_longer_each_time() {
        let detector = detector(7, "h", "", 80, &config());
        let endpoints: Vec<SocketAddr> = (1..=4)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect();
        let now = Instant::now();
        let bad = endpoints[0];
        assert!(!detector.report(bad, status(500), 4, now));
        // A success in between starts the count again.
        assert!(!detector.report(bad, status(200), 4, now));
        assert!(!detector.report(bad, status(503), 4, now));
        assert!(detector.report(bad, Outcome::ConnectFailure, 4, now));
        assert_eq!(detector.healthy(&endpoints, now), endpoints[1..]);
        let later = now + Duration::from_secs(31);
        assert_eq!(detector.healthy(&endpoints, later), endpoints);
        // The second ejection lasts twice as long.
        detector.report(bad, status(500), 4, later);
        assert!(detector.report(bad, status(500), 4, later));
        assert!(
            !detector
                .healthy(&endpoints, later + Duration::from_secs(59))
                .contains(&bad)
        );
        assert!(
            detector
                .healthy(&endpoints, later + Duration::from_secs(61))
                .contains(&bad)
        );
    }

    #[test]
    fn max_ejection_percent_keeps_endpoints() {
        let detector = detector(8, "h", "", 80, &config());
        let endpoints: Vec<SocketAddr> = (1..=4)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect();
        let now = Instant::now();
        for addr in &endpoints {
            detector.report(*addr, status(500), 4, now);
            detector.report(*addr, status(500), 4, now);
        }
        // 50% of 4.
        assert_eq!(detector.healthy(&endpoints, now).len(), 2);
    }
}
