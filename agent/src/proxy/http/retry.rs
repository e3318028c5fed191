//! Retry decisions, with Envoy's meaning of each `retryOn` condition.

use crate::routing::RetryOn;

/// How one try ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers came, with this status and `grpc-status`, if any.
    Response {
        status: u16,
        grpc_status: Option<u32>,
    },
    /// The connection could not be made.
    ConnectFailure,
    /// The connection was reset or closed before the response headers.
    Reset,
    /// The HTTP/2 stream was refused (REFUSED_STREAM). weir's upstream
    /// connections are HTTP/1.1 for now, so this does not happen yet.
    #[cfg_attr(not(test), allow(dead_code))]
    RefusedStream,
    /// `perTryTimeout` passed before the response headers.
    PerTryTimeout,
}

/// Whether `retry_on` asks for another try after `outcome`.
pub fn should_retry(on: &RetryOn, outcome: Outcome) -> bool {
    match outcome {
        Outcome::Response {
            status,
            grpc_status,
        } => {
            (on.five_xx && status >= 500)
                || (on.gateway_error && matches!(status, 502..=504))
                || (on.retriable_4xx && status == 409)
                || on.retriable_status_codes.contains(&status)
                || grpc_status.is_some_and(|code| grpc_retriable(on, code))
        }
        // Envoy's 5xx and reset cover every failure to get a response.
        Outcome::ConnectFailure => on.connect_failure || on.five_xx || on.reset,
        Outcome::Reset => on.five_xx || on.reset,
        Outcome::RefusedStream => on.refused_stream || on.five_xx || on.reset,
        // A per-try timeout counts as a 504 from the upstream.
        Outcome::PerTryTimeout => on.five_xx || on.gateway_error || on.reset,
    }
}

fn grpc_retriable(on: &RetryOn, code: u32) -> bool {
    match code {
        1 => on.cancelled,
        4 => on.deadline_exceeded,
        8 => on.resource_exhausted,
        13 => on.internal,
        14 => on.unavailable,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RetryPolicy;
    use crate::routing::translate::parse_retry_on;

    fn response(status: u16) -> Outcome {
        Outcome::Response {
            status,
            grpc_status: None,
        }
    }

    fn grpc(code: u32) -> Outcome {
        Outcome::Response {
            status: 200,
            grpc_status: Some(code),
        }
    }

    const ALL: [Outcome; 5] = [
        Outcome::ConnectFailure,
        Outcome::Reset,
        Outcome::RefusedStream,
        Outcome::PerTryTimeout,
        Outcome::Response {
            status: 200,
            grpc_status: None,
        },
    ];

    /// (retryOn, outcome, retried)
    #[test]
    fn every_condition_decides_as_envoy() {
        let cases: &[(&str, Outcome, bool)] = &[
            ("5xx", response(500), true),
            ("5xx", response(503), true),
            ("5xx", response(404), false),
            ("5xx", Outcome::ConnectFailure, true),
            ("5xx", Outcome::Reset, true),
            ("5xx", Outcome::RefusedStream, true),
            ("5xx", Outcome::PerTryTimeout, true),
            ("gateway-error", response(500), false),
            ("gateway-error", response(502), true),
            ("gateway-error", response(503), true),
            ("gateway-error", response(504), true),
            ("gateway-error", Outcome::ConnectFailure, false),
            ("gateway-error", Outcome::PerTryTimeout, true),
            ("connect-failure", Outcome::ConnectFailure, true),
            ("connect-failure", Outcome::Reset, false),
            ("connect-failure", response(503), false),
            ("refused-stream", Outcome::RefusedStream, true),
            ("refused-stream", Outcome::Reset, false),
            ("reset", Outcome::Reset, true),
            ("reset", Outcome::ConnectFailure, true),
            ("reset", Outcome::PerTryTimeout, true),
            ("reset", response(503), false),
            ("retriable-4xx", response(409), true),
            ("retriable-4xx", response(404), false),
            ("retriable-status-codes,418", response(418), true),
            ("418", response(418), true),
            ("418", response(503), false),
            ("unavailable", grpc(14), true),
            ("cancelled", grpc(1), true),
            ("deadline-exceeded", grpc(4), true),
            ("resource-exhausted", grpc(8), true),
            ("internal", grpc(13), true),
            ("unavailable", grpc(13), false),
            ("", response(503), false),
        ];
        for &(retry_on, outcome, retried) in cases {
            let on = parse_retry_on(retry_on).unwrap();
            assert_eq!(
                should_retry(&on, outcome),
                retried,
                "{retry_on:?} {outcome:?}"
            );
        }
        for outcome in ALL {
            if outcome != Outcome::ConnectFailure && outcome != Outcome::RefusedStream {
                assert!(!should_retry(
                    &parse_retry_on("connect-failure,refused-stream").unwrap(),
                    outcome
                ));
            }
        }
        assert!(parse_retry_on("5xx,sometimes").is_err());
        assert!(parse_retry_on("5xx,700").is_err());
    }

    #[test]
    fn istio_default_policy() {
        let policy = RetryPolicy::istio_default();
        assert_eq!(policy.attempts, 2);
        let on = &policy.retry_on;
        for (outcome, retried) in [
            (Outcome::ConnectFailure, true),
            (Outcome::RefusedStream, true),
            (response(503), true),
            (grpc(14), true),
            (grpc(1), true),
            (response(500), false),
            (response(502), false),
            (Outcome::Reset, false),
            (Outcome::PerTryTimeout, false),
        ] {
            assert_eq!(should_retry(on, outcome), retried, "{outcome:?}");
        }
    }
}
