//! Request mirroring (`mirror`, `mirrors`): a copy of a request goes to
//! another destination, and its answer is dropped, as Envoy's shadowing
//! does. The copy's authority gets `-shadow` after its host name, so that
//! the mirror can tell copies apart. It goes over the source pod's own
//! pooled connections, after the same authorization check.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Uri, Version};
use tracing::debug;

use super::{PodProxy, ProxyContext, endpoint_allowed, pool, random};
use crate::routing::Mirror;

/// What is copied of the request.
pub struct Copy {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub authority: String,
    pub body: Bytes,
    /// The service port the app connected to.
    pub port: u16,
}

/// Sends the copy to one endpoint of `mirror`, and reads its answer away.
pub async fn shadow(pod: Arc<PodProxy>, ctx: Arc<ProxyContext>, mirror: Mirror, copy: Copy) {
    let cluster = ctx.cluster.borrow().clone();
    let Some(service) = cluster.service_by_hostname(&mirror.host) else {
        return debug!(host = %mirror.host, "mirror: no such service");
    };
    let port = match mirror.port {
        Some(port) => service.ports.iter().find(|p| p.port == port),
        None => service
            .ports
            .iter()
            .find(|p| p.port == copy.port)
            .or(service.ports.first().filter(|_| service.ports.len() == 1)),
    };
    let Some(port) = port else {
        return debug!(host = %mirror.host, "mirror: no such port");
    };
    let source = cluster.workload(&pod.key);
    let namespace = source.map_or("", |source| source.namespace.as_str());
    let subset = match &mirror.subset {
        Some(name) => {
            let rule = cluster.destination_rule_for(&mirror.host, namespace);
            match rule.and_then(|rule| rule.subset(name)) {
                Some(subset) => Some(subset),
                None => {
                    return debug!(host = %mirror.host, subset = %name, "mirror: no such subset");
                }
            }
        }
        None => None,
    };
    let endpoints: Vec<_> = port
        .endpoints
        .iter()
        .filter(|endpoint| endpoint.ready)
        .filter(|endpoint| {
            subset.is_none_or(|subset| {
                let workload = endpoint
                    .workload
                    .as_ref()
                    .and_then(|key| cluster.workload(key));
                workload.is_some_and(|workload| {
                    subset
                        .labels
                        .iter()
                        .all(|(key, value)| workload.labels.get(key) == Some(value))
                })
            })
        })
        .collect();
    if endpoints.is_empty() {
        return debug!(host = %mirror.host, "mirror: no ready endpoint");
    }
    let endpoint =
        endpoints[((random() * endpoints.len() as f64) as usize).min(endpoints.len() - 1)];
    let addr = SocketAddr::new(endpoint.ip, endpoint.port);
    if !endpoint_allowed(&ctx, &cluster, source, addr, endpoint.workload.as_ref()) {
        return;
    }
    let request = shadow_request(copy);
    let http2 = request.version() == Version::HTTP_2;
    let cookie = pod.factory.netns_cookie();
    let mut sender = match pool::take(cookie, addr, http2) {
        Some(sender) => sender,
        None => match pool::connect(&pod.factory, addr, http2, None).await {
            Ok(sender) => sender,
            Err(error) => return debug!(%addr, %error, "mirror: connect failed"),
        },
    };
    match sender.send(request).await {
        Ok(response) => {
            pool::put(cookie, addr, sender, None);
            let _ = response.into_body().collect().await;
        }
        Err(error) => debug!(%addr, error = %error.error(), "mirror: request failed"),
    }
}

fn shadow_request(copy: Copy) -> Request<pool::Body> {
    let authority = shadow_authority(&copy.authority);
    let path = copy.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let uri = if copy.version == Version::HTTP_2 {
        format!("http://{authority}{path}")
    } else {
        path.to_owned()
    };
    let mut request = Request::new(Full::new(copy.body).map_err(|never| match never {}).boxed());
    *request.method_mut() = copy.method;
    *request.version_mut() = copy.version;
    *request.uri_mut() = uri.parse().unwrap_or_else(|_| Uri::from_static("/"));
    *request.headers_mut() = copy.headers;
    // HTTP/2 carries the authority in the URI.
    if copy.version != Version::HTTP_2
        && let Ok(value) = HeaderValue::from_str(&authority)
    {
        request.headers_mut().insert(header::HOST, value);
    }
    request
}

/// `web:9080` → `web-shadow:9080`, as Envoy names a shadow's host.
fn shadow_authority(authority: &str) -> String {
    match authority.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => format!("{host}-shadow:{port}"),
        _ => format!("{authority}-shadow"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_authority_keeps_the_port() {
        assert_eq!(shadow_authority("web:9080"), "web-shadow:9080");
        assert_eq!(
            shadow_authority("web.default.svc.cluster.local"),
            "web.default.svc.cluster.local-shadow"
        );
    }
}
