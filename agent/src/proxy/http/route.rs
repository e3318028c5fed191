//! Route selection: which `http[]` rule of a VirtualService a request
//! takes (the first whose match blocks fit; blocks OR, fields AND), and
//! which of its weighted destinations.

use std::collections::BTreeMap;

use crate::routing::{HttpRule, RequestMatch, VirtualService, WeightedDestination};

/// What a match looks at: the request, and who sent it to which port.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// The path, without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub headers: &'a hyper::HeaderMap,
    pub port: u16,
    pub source_labels: Option<&'a BTreeMap<String, String>>,
    pub source_namespace: Option<&'a str>,
}

/// The first rule of `vs` that the request fits, if any, and the match
/// block that it fit (None when the rule has none).
pub fn select<'v>(
    vs: &'v VirtualService,
    request: &RequestView,
) -> Option<(&'v HttpRule, Option<&'v RequestMatch>)> {
    vs.http.iter().find_map(|rule| {
        if rule.matches.is_empty() {
            return Some((rule, None));
        }
        let matched = rule.matches.iter().find(|m| matches(m, request))?;
        Some((rule, Some(matched)))
    })
}

pub fn matches(m: &RequestMatch, request: &RequestView) -> bool {
    if let Some(uri) = &m.uri {
        let fits = if m.ignore_uri_case {
            uri.matches_ignoring_case(request.path)
        } else {
            uri.matches(request.path)
        };
        if !fits {
            return false;
        }
    }
    let one = |matcher: &Option<crate::routing::StringMatcher>, value: &str| {
        matcher
            .as_ref()
            .is_none_or(|matcher| matcher.matches(value))
    };
    if !one(&m.scheme, request.scheme)
        || !one(&m.method, request.method)
        || !one(&m.authority, request.authority)
    {
        return false;
    }
    if m.port.is_some_and(|port| port != request.port) {
        return false;
    }
    let header = |name: &str| {
        request
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
    };
    let headers_fit = m
        .headers
        .iter()
        .all(|(name, matcher)| header(name).is_some_and(|value| matcher.matches(value)));
    let without_fit = m
        .without_headers
        .iter()
        .all(|(name, matcher)| !header(name).is_some_and(|value| matcher.matches(value)));
    if !headers_fit || !without_fit {
        return false;
    }
    let params: Vec<(&str, &str)> = request
        .query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .collect();
    let params_fit = m.query_params.iter().all(|(name, matcher)| {
        params
            .iter()
            .any(|(key, value)| key == name && matcher.matches(value))
    });
    if !params_fit {
        return false;
    }
    let labels_fit = m.source_labels.iter().all(|(key, value)| {
        request
            .source_labels
            .is_some_and(|labels| labels.get(key) == Some(value))
    });
    let namespace_fits = m
        .source_namespace
        .as_ref()
        .is_none_or(|namespace| request.source_namespace == Some(namespace.as_str()));
    labels_fit && namespace_fits
}

/// The destination that a draw `roll`, uniform in `[0, 1)`, lands on, in
/// proportion to the weights.
pub fn weighted(routes: &[WeightedDestination], roll: f64) -> Option<&WeightedDestination> {
    let total: u64 = routes.iter().map(|route| u64::from(route.weight)).sum();
    if total == 0 {
        return routes.first();
    }
    let mut point = roll * total as f64;
    for route in routes {
        let weight = f64::from(route.weight);
        if point < weight {
            return Some(route);
        }
        point -= weight;
    }
    routes.iter().rev().find(|route| route.weight > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::istio;

    fn vs(yaml: &str) -> VirtualService {
        let vs: istio::VirtualService = serde_yaml::from_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: default}}\n{yaml}"
        ))
        .unwrap();
        vs.translate().unwrap().value
    }

    struct Req {
        method: &'static str,
        path: &'static str,
        query: Option<&'static str>,
        headers: hyper::HeaderMap,
        port: u16,
        labels: BTreeMap<String, String>,
    }

    impl Req {
        fn get(path: &'static str) -> Req {
            Req {
                method: "GET",
                path,
                query: None,
                headers: hyper::HeaderMap::new(),
                port: 9080,
                labels: BTreeMap::new(),
            }
        }

        fn header(mut self, name: &'static str, value: &'static str) -> Req {
            self.headers.insert(name, value.parse().unwrap());
            self
        }

        fn view(&self) -> RequestView<'_> {
            RequestView {
                method: self.method,
                path: self.path,
                query: self.query,
                scheme: "http",
                authority: "reviews:9080",
                headers: &self.headers,
                port: self.port,
                source_labels: Some(&self.labels),
                source_namespace: Some("default"),
            }
        }
    }

    fn chosen(vs: &VirtualService, req: &Req) -> Option<String> {
        select(vs, &req.view()).map(|(rule, _)| rule.name.clone().unwrap_or_default())
    }

    const RULES: &str = "
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers: {end-user: {exact: jason}}
    route: [{destination: {host: reviews, subset: v2}}]
  - name: api
    match:
    - uri: {prefix: /api/}
      method: {exact: POST}
    - uri: {regex: '/v[0-9]+/items'}
    route: [{destination: {host: reviews, subset: v3}}]
  - name: query
    match:
    - queryParams: {debug: {exact: '1'}}
      port: 9080
    route: [{destination: {host: reviews, subset: v3}}]
  - name: labels
    match:
    - sourceLabels: {app: productpage}
    route: [{destination: {host: reviews, subset: v1}}]
";

    #[test]
    fn first_matching_rule_wins_blocks_or_fields_and() {
        let vs = vs(RULES);
        let jason = Req::get("/api/x").header("end-user", "jason");
        assert_eq!(chosen(&vs, &jason).as_deref(), Some("jason"));
        // Header names are case-insensitive, values are not.
        assert_eq!(
            chosen(&vs, &Req::get("/").header("End-User", "Jason")),
            None
        );
        // uri prefix AND method.
        let mut post = Req::get("/api/items");
        post.method = "POST";
        assert_eq!(chosen(&vs, &post).as_deref(), Some("api"));
        assert_eq!(chosen(&vs, &Req::get("/api/items")), None);
        // OR with the second block; regex matches the whole path.
        assert_eq!(chosen(&vs, &Req::get("/v12/items")).as_deref(), Some("api"));
        assert_eq!(chosen(&vs, &Req::get("/v12/items/1")), None);
        let mut debug = Req::get("/");
        debug.query = Some("a=b&debug=1");
        assert_eq!(chosen(&vs, &debug).as_deref(), Some("query"));
        debug.port = 9090;
        assert_eq!(chosen(&vs, &debug), None);
        let mut from_productpage = Req::get("/");
        from_productpage
            .labels
            .insert("app".into(), "productpage".into());
        assert_eq!(chosen(&vs, &from_productpage).as_deref(), Some("labels"));
    }

    #[test]
    fn a_rule_without_match_takes_everything() {
        let vs =
            vs("spec:\n  hosts: [reviews]\n  http:\n  - route: [{destination: {host: reviews}}]\n");
        assert!(select(&vs, &Req::get("/anything").view()).is_some());
        assert_eq!(
            vs.http[0].routes[0].host,
            "reviews.default.svc.cluster.local"
        );
        assert_eq!(vs.http[0].routes[0].weight, 100);
    }

    #[test]
    fn weighted_choice_follows_the_weights() {
        let vs = vs("spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 25}
    - {destination: {host: reviews, subset: v3}, weight: 75}
    - {destination: {host: reviews, subset: v2}, weight: 0}
");
        let routes = &vs.http[0].routes;
        let subset = |roll| weighted(routes, roll).unwrap().subset.clone().unwrap();
        assert_eq!(subset(0.0), "v1");
        assert_eq!(subset(0.2499), "v1");
        assert_eq!(subset(0.25), "v3");
        assert_eq!(subset(0.9999), "v3");
        // Evenly spread rolls give the shares exactly.
        let v1 = (0..1000)
            .filter(|i| subset(f64::from(*i) / 1000.0) == "v1")
            .count();
        assert_eq!(v1, 250);
    }
}
