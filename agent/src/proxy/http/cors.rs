//! `corsPolicy`, as Envoy's CORS filter applies it: a preflight from an
//! allowed origin is answered by the proxy itself; an actual request from
//! one gets the CORS headers added to its response. A preflight from any
//! other origin goes to the upstream (`unmatchedPreflights: FORWARD`), or is
//! answered without CORS headers (`IGNORE`).

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode};

use super::Body;
use crate::routing::Cors;

/// The request's `Origin`, when `cors` allows it.
pub fn allowed_origin(cors: &Cors, headers: &HeaderMap) -> Option<HeaderValue> {
    let origin = headers.get(header::ORIGIN)?;
    let text = origin.to_str().ok()?;
    cors.allow_origins
        .iter()
        .any(|matcher| matcher.matches(text))
        .then(|| origin.clone())
}

/// The proxy's own answer to a preflight, if it gives one.
pub fn preflight(cors: &Cors, method: &Method, headers: &HeaderMap) -> Option<Response<Body>> {
    if method != Method::OPTIONS
        || !headers.contains_key(header::ORIGIN)
        || !headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return None;
    }
    let mut response = super::made_up(&super::MadeUp {
        status: StatusCode::OK.as_u16(),
        flags: "-",
        body: "",
    });
    let Some(origin) = allowed_origin(cors, headers) else {
        return (!cors.forward_unmatched_preflights).then_some(response);
    };
    let out = response.headers_mut();
    out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    let mut list = |name: HeaderName, items: &[String]| {
        if let Ok(value) = HeaderValue::from_str(&items.join(","))
            && !items.is_empty()
        {
            out.insert(name, value);
        }
    };
    list(header::ACCESS_CONTROL_ALLOW_METHODS, &cors.allow_methods);
    list(header::ACCESS_CONTROL_ALLOW_HEADERS, &cors.allow_headers);
    if let Some(max_age) = cors.max_age {
        out.insert(header::ACCESS_CONTROL_MAX_AGE, max_age.as_secs().into());
    }
    if cors.allow_credentials {
        out.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    Some(response)
}

/// Adds the CORS headers to the response of an actual request from an
/// allowed origin.
pub fn decorate(cors: &Cors, origin: HeaderValue, headers: &mut HeaderMap) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    if !cors.expose_headers.is_empty()
        && let Ok(value) = HeaderValue::from_str(&cors.expose_headers.join(","))
    {
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, value);
    }
    if cors.allow_credentials {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
}
