//! Endpoint choice for one request: the DestinationRule's load balancer
//! over the ready endpoints of the chosen subset. State (round-robin turns,
//! requests in flight) is kept per source pod, as a sidecar keeps it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, LazyLock, Mutex};

use crate::routing::LoadBalancer;

use super::random;

type Shared<K, V> = LazyLock<Mutex<HashMap<K, V>>>;

/// (netns cookie, endpoint) → requests in flight.
static ACTIVE: Shared<(u64, SocketAddr), Arc<AtomicUsize>> = LazyLock::new(Mutex::default);
/// (netns cookie, host, subset) → next round-robin turn.
static TURNS: Shared<(u64, String, String), usize> = LazyLock::new(Mutex::default);

/// Forgets the balancing state of pods not in `pods` (netns cookies).
pub fn forget_other_pods(pods: &HashSet<u64>) {
    ACTIVE
        .lock()
        .unwrap()
        .retain(|key, _| pods.contains(&key.0));
    TURNS.lock().unwrap().retain(|key, _| pods.contains(&key.0));
}

/// Counts a request in flight to an endpoint while it lives.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

pub fn in_flight(cookie: u64, addr: SocketAddr) -> InFlight {
    let counter = ACTIVE
        .lock()
        .unwrap()
        .entry((cookie, addr))
        .or_default()
        .clone();
    counter.fetch_add(1, Relaxed);
    InFlight(counter)
}

fn active(cookie: u64, addr: SocketAddr) -> usize {
    ACTIVE
        .lock()
        .unwrap()
        .get(&(cookie, addr))
        .map_or(0, |counter| counter.load(Relaxed))
}

/// Picks one of `endpoints` (not empty). Endpoints already `tried` for
/// this request are avoided while others remain, as Istio's retry host
/// predicate does.
pub fn choose(
    endpoints: &[SocketAddr],
    tried: &[SocketAddr],
    policy: &LoadBalancer,
    cookie: u64,
    group: (&str, &str),
    hash: Option<u64>,
) -> SocketAddr {
    let fresh: Vec<SocketAddr> = endpoints
        .iter()
        .copied()
        .filter(|addr| !tried.contains(addr))
        .collect();
    let candidates = if fresh.is_empty() {
        endpoints.to_vec()
    } else {
        fresh
    };
    let pick = |roll: f64| {
        candidates[((roll * candidates.len() as f64) as usize).min(candidates.len() - 1)]
    };
    match policy {
        LoadBalancer::Random => pick(random()),
        LoadBalancer::ConsistentHash(_) => match hash {
            // Rendezvous: the endpoint with the highest score for the key.
            Some(hash) => *candidates
                .iter()
                .max_by_key(|addr| score(hash, addr))
                .expect("candidates are never empty"),
            None => pick(random()),
        },
        LoadBalancer::RoundRobin => {
            let mut turns = TURNS.lock().unwrap();
            let turn = turns
                .entry((cookie, group.0.to_owned(), group.1.to_owned()))
                .or_default();
            let chosen = candidates[*turn % candidates.len()];
            *turn = turn.wrapping_add(1);
            chosen
        }
        // Envoy's: the less busy of two picked at random.
        LoadBalancer::LeastRequest => {
            let (a, b) = (pick(random()), pick(random()));
            if active(cookie, b) < active(cookie, a) {
                b
            } else {
                a
            }
        }
    }
}

fn score(hash: u64, addr: &SocketAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (hash, addr).hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect()
    }

    #[test]
    fn round_robin_turns_and_avoids_tried_endpoints() {
        let endpoints = addrs(3);
        let picks: Vec<SocketAddr> = (0..6)
            .map(|_| {
                choose(
                    &endpoints,
                    &[],
                    &LoadBalancer::RoundRobin,
                    1,
                    ("h", ""),
                    None,
                )
            })
            .collect();
        assert_eq!(picks[..3], picks[3..]);
        assert_ne!(picks[0], picks[1]);
        for policy in [
            LoadBalancer::RoundRobin,
            LoadBalancer::Random,
            LoadBalancer::LeastRequest,
        ] {
            let tried = &endpoints[..2];
            assert_eq!(
                choose(&endpoints, tried, &policy, 2, ("h", ""), None),
                endpoints[2]
            );
            // With every endpoint tried, any will do.
            assert!(endpoints.contains(&choose(
                &endpoints,
                &endpoints,
                &policy,
                2,
                ("h", ""),
                None
            )));
        }
    }

    #[test]
    fn consistent_hash_keeps_a_key_on_its_endpoint() {
        let policy = LoadBalancer::ConsistentHash(crate::routing::HashKey::SourceIp);
        let endpoints = addrs(5);
        let pick = |endpoints: &[SocketAddr], key| {
            choose(endpoints, &[], &policy, 4, ("h", ""), Some(key))
        };
        let first: Vec<SocketAddr> = (0..200).map(|key| pick(&endpoints, key)).collect();
        // Stable, and spread over every endpoint.
        assert_eq!(
            first,
            (0..200)
                .map(|key| pick(&endpoints, key))
                .collect::<Vec<_>>()
        );
        for endpoint in &endpoints {
            assert!(first.contains(endpoint), "{endpoint} never chosen");
        }
        // One endpoint gone: only its keys move.
        let fewer = &endpoints[..4];
        for (key, before) in (0..200).zip(&first) {
            if *before != endpoints[4] {
                assert_eq!(pick(fewer, key), *before, "key {key} moved");
            }
        }
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let endpoints = addrs(2);
        let _busy = (0..5)
            .map(|_| in_flight(3, endpoints[0]))
            .collect::<Vec<_>>();
        let idle_picks = (0..100)
            .filter(|_| {
                choose(
                    &endpoints,
                    &[],
                    &LoadBalancer::LeastRequest,
                    3,
                    ("h", ""),
                    None,
                ) == endpoints[1]
            })
            .count();
        // Only when both draws land on the busy one does it win: ~25%.
        assert!(idle_picks > 50, "{idle_picks}");
    }
}
