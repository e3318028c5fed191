//! The agent's HTTP endpoints, each on its own address:
//! `/metrics` (Prometheus), `/healthz/ready` (readiness), `/healthz/live`
//! (liveness) and, on localhost
//! only, `/config_dump` (what the agent knows and has enrolled).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tracing::{debug, info};

/// What the endpoints read from the running agent.
pub trait AgentView: Send + Sync + 'static {
    fn metrics(&self) -> String;
    fn ready(&self) -> bool;
    fn config_dump(&self) -> serde_json::Value;
}

#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    Metrics,
    Health,
    Admin,
}

impl Endpoint {
    fn answer(self, path: &str, view: &dyn AgentView) -> (StatusCode, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        match (self, path) {
            (Endpoint::Metrics, "/metrics") => (
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                view.metrics(),
            ),
            // Probes may target either port, as with Istio's 15020/15021.
            (Endpoint::Metrics | Endpoint::Health, "/healthz/ready") => {
                if view.ready() {
                    (StatusCode::OK, TEXT, "ready\n".into())
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".into())
                }
            }
            // Answering at all is the proof of life: it needs neither the
            // API server nor a synced model.
            (Endpoint::Metrics | Endpoint::Health, "/healthz/live") => {
                (StatusCode::OK, TEXT, "live\n".into())
            }
            (Endpoint::Admin, "/config_dump") => (
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&view.config_dump()).unwrap_or_default(),
            ),
            _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
        }
    }
}

/// Binds an endpoint's address. SO_REUSEPORT lets a DaemonSet's surge pod
/// start while the agent it replaces still serves: both run in the host's
/// network namespace. A port held by anything else fails the start.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// Serves `endpoint` on `listener` until the task is dropped.
pub async fn serve(
    endpoint: Endpoint,
    listener: TcpListener,
    view: Arc<dyn AgentView>,
) -> std::io::Result<()> {
    info!(?endpoint, addr = %listener.local_addr()?, "listening");
    loop {
        let (stream, _) = listener.accept().await?;
        let view = view.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let (status, content_type, body) =
                    endpoint.answer(request.uri().path(), view.as_ref());
                let response = Response::builder()
                    .status(status)
                    .header("content-type", content_type)
                    .body(Full::new(Bytes::from(body)));
                async move { Ok::<_, Infallible>(response.expect("static headers are valid")) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "admin connection ended");
            }
        });
    }
}
