//! Fault injection: whether a request is delayed or aborted, each at its
//! percentage, drawn independently as Envoy's fault filter does.

use std::time::Duration;

use crate::routing::Fault;

#[derive(Debug, Default, PartialEq)]
pub struct Injected {
    pub delay: Option<Duration>,
    pub abort: Option<u16>,
}

/// What `fault` does to one request; `rolls` are two draws in `[0, 100)`.
pub fn decide(fault: &Fault, rolls: [f64; 2]) -> Injected {
    Injected {
        delay: fault
            .delay
            .as_ref()
            .filter(|delay| rolls[0] < delay.percentage)
            .map(|delay| delay.fixed_delay),
        abort: fault
            .abort
            .as_ref()
            .filter(|abort| rolls[1] < abort.percentage)
            .map(|abort| abort.http_status),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{FaultAbort, FaultDelay};

    #[test]
    fn each_fault_applies_at_its_percentage() {
        let fault = Fault {
            delay: Some(FaultDelay {
                fixed_delay: Duration::from_secs(7),
                percentage: 10.0,
            }),
            abort: Some(FaultAbort {
                http_status: 500,
                percentage: 100.0,
            }),
        };
        assert_eq!(
            decide(&fault, [5.0, 99.9]),
            Injected {
                delay: Some(Duration::from_secs(7)),
                abort: Some(500)
            }
        );
        assert_eq!(decide(&fault, [10.0, 0.0]).delay, None);
        let none = Fault {
            delay: None,
            abort: Some(FaultAbort {
                http_status: 503,
                percentage: 0.0,
            }),
        };
        assert_eq!(decide(&none, [0.0, 0.0]), Injected::default());
    }
}
