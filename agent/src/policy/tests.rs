//! The evaluator against Istio's documented examples: each policy set with
//! connections it allows and denies.

use super::*;

/// The policy `namespace/name` with `spec`, a YAML mapping, translated as
/// the manifests source does.
fn policy(key: &str, spec: &str) -> AuthorizationPolicy {
    let (namespace, name) = key.split_once('/').unwrap();
    let text = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    );
    let resource: istio::AuthorizationPolicy = serde_yaml::from_str(&text).unwrap();
    resource.translate().unwrap().policy.unwrap()
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A pod of namespace `namespace` with service account `service_account`.
fn pod(namespace: &str, service_account: &str, address: &str) -> Source {
    Source {
        ip: ip(address),
        identity: Some(Identity {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }),
    }
}

/// A peer that is no known pod.
fn stranger(address: &str) -> Source {
    Source {
        ip: ip(address),
        identity: None,
    }
}

/// Port `port` of the workload being protected, 10.244.2.20.
fn port(port: u16) -> Destination {
    Destination {
        ip: ip("10.244.2.20"),
        port,
    }
}

/// `allow`, `deny <policy>`, or `deny` when no ALLOW policy matched.
fn outcome(verdict: &Verdict) -> String {
    match (verdict.allowed, &verdict.deny_policy) {
        (true, _) => "allow".to_owned(),
        (false, Some(policy)) => format!("deny {policy}"),
        (false, None) => "deny".to_owned(),
    }
}

/// Evaluates every connection against `policies` and compares the outcomes.
fn check(policies: &[AuthorizationPolicy], cases: &[(&str, Source, Destination, &str)]) {
    let policies: Vec<&AuthorizationPolicy> = policies.iter().collect();
    for (case, source, destination, expected) in cases {
        let verdict = evaluate(&policies, source, destination, "cluster.local");
        assert_eq!(outcome(&verdict), *expected, "{case}: {verdict:?}");
    }
}

#[test]
fn no_policy_allows() {
    let verdict = evaluate(&[], &stranger("192.0.2.1"), &port(8080), "cluster.local");
    assert_eq!(
        verdict,
        Verdict {
            allowed: true,
            deny_policy: None,
            reason: "no ALLOW policy applies".to_owned(),
            audited: Vec::new(),
        }
    );
}

#[test]
fn allow_nothing() {
    // Istio's "allow-nothing": an ALLOW policy that matches nothing.
    let policies = [policy("foo/allow-nothing", "{}")];
    check(
        &policies,
        &[
            ("pod", pod("foo", "sleep", "10.244.1.5"), port(8080), "deny"),
            ("stranger", stranger("192.0.2.1"), port(8080), "deny"),
        ],
    );
    let verdict = evaluate(
        &[&policies[0]],
        &stranger("192.0.2.1"),
        &port(8080),
        "cluster.local",
    );
    assert_eq!(
        verdict.reason,
        format!("no ALLOW policy matched ({} apply)", policies[0].key())
    );
}

#[test]
fn deny_all() {
    let policies = [policy("foo/deny-all", "{action: DENY, rules: [{}]}")];
    check(
        &policies,
        &[
            (
                "pod",
                pod("foo", "sleep", "10.244.1.5"),
                port(8080),
                "deny foo/deny-all",
            ),
            (
                "stranger",
                stranger("192.0.2.1"),
                port(22),
                "deny foo/deny-all",
            ),
        ],
    );
    let verdict = evaluate(
        &[&policies[0]],
        &stranger("192.0.2.1"),
        &port(8080),
        "cluster.local",
    );
    assert_eq!(verdict.reason, "DENY policy foo/deny-all matched");
}

#[test]
fn allow_all() {
    // An empty rule matches everything, even a peer without identity.
    let policies = [
        policy("foo/allow-nothing", "{}"),
        policy("foo/allow-all", "{rules: [{}]}"),
    ];
    check(
        &policies,
        &[
            (
                "pod",
                pod("bar", "sleep", "10.244.1.5"),
                port(8080),
                "allow",
            ),
            ("stranger", stranger("192.0.2.1"), port(22), "allow"),
        ],
    );
}

#[test]
fn allow_from_namespace_foo_to_port_8080() {
    let policies = [policy(
        "foo/httpbin",
        "{action: ALLOW, rules: [{from: [{source: {namespaces: [foo]}}], \
          to: [{operation: {ports: [\"8080\"]}}]}]}",
    )];
    check(
        &policies,
        &[
            (
                "foo to 8080",
                pod("foo", "sleep", "10.244.1.5"),
                port(8080),
                "allow",
            ),
            (
                "foo to 9090",
                pod("foo", "sleep", "10.244.1.5"),
                port(9090),
                "deny",
            ),
            (
                "bar to 8080",
                pod("bar", "sleep", "10.244.1.6"),
                port(8080),
                "deny",
            ),
            (
                "stranger to 8080",
                stranger("10.244.1.7"),
                port(8080),
                "deny",
            ),
        ],
    );
}

#[test]
fn ip_blocks() {
    let policies = [policy(
        "foo/ingress",
        "{rules: [{from: [{source: {ipBlocks: [10.244.1.0/24, 192.0.2.9]}}]}]}",
    )];
    check(
        &policies,
        &[
            ("in the /24", stranger("10.244.1.77"), port(80), "allow"),
            (
                "the single address",
                stranger("192.0.2.9"),
                port(80),
                "allow",
            ),
            (
                "IPv4-mapped",
                stranger("::ffff:10.244.1.77"),
                port(80),
                "allow",
            ),
            (
                "elsewhere",
                pod("foo", "sleep", "10.244.3.1"),
                port(80),
                "deny",
            ),
        ],
    );
}

#[test]
fn not_ip_blocks() {
    // Deny whatever does not come from the pod network.
    let policies = [policy(
        "foo/outsiders",
        "{action: DENY, rules: [{from: [{source: {notIpBlocks: [10.244.0.0/16, \"fd00::/8\"]}}]}]}",
    )];
    check(
        &policies,
        &[
            ("pod network", stranger("10.244.9.9"), port(80), "allow"),
            ("IPv6 pod network", stranger("fd00::9"), port(80), "allow"),
            (
                "outside",
                stranger("192.0.2.1"),
                port(80),
                "deny foo/outsiders",
            ),
        ],
    );
}

#[test]
fn principals_with_wildcards() {
    let policies = [policy(
        "foo/principals",
        "{rules: [{from: [{source: {principals: [\"cluster.local/ns/foo/sa/*\", \"*/sa/bookinfo-ratings\"]}}]}]}",
    )];
    check(
        &policies,
        &[
            (
                "prefix",
                pod("foo", "anyone", "10.244.1.5"),
                port(80),
                "allow",
            ),
            (
                "suffix",
                pod("bar", "bookinfo-ratings", "10.244.1.6"),
                port(80),
                "allow",
            ),
            (
                "neither",
                pod("bar", "sleep", "10.244.1.7"),
                port(80),
                "deny",
            ),
            ("no identity", stranger("10.244.1.8"), port(80), "deny"),
        ],
    );
    // The trust domain is part of the principal.
    let verdict = evaluate(
        &[&policies[0]],
        &pod("foo", "sleep", "10.244.1.5"),
        &port(80),
        "example.org",
    );
    assert!(!verdict.allowed);

    // "*" matches any identity, but a peer needs one.
    let policies = [policy(
        "foo/any-identity",
        "{rules: [{from: [{source: {principals: [\"*\"]}}]}]}",
    )];
    check(
        &policies,
        &[
            ("pod", pod("bar", "sleep", "10.244.1.5"), port(80), "allow"),
            ("no identity", stranger("10.244.1.8"), port(80), "deny"),
        ],
    );
}

#[test]
fn not_fields_match_a_peer_without_identity() {
    let policies = [policy(
        "foo/only-foo",
        "{action: DENY, rules: [{from: [{source: {notNamespaces: [foo]}}]}]}",
    )];
    check(
        &policies,
        &[
            ("foo", pod("foo", "sleep", "10.244.1.5"), port(80), "allow"),
            (
                "bar",
                pod("bar", "sleep", "10.244.1.6"),
                port(80),
                "deny foo/only-foo",
            ),
            (
                "no identity",
                stranger("10.244.1.7"),
                port(80),
                "deny foo/only-foo",
            ),
        ],
    );
    // Istio's way of requiring an identity.
    let policies = [policy(
        "foo/require-identity",
        "{action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}",
    )];
    check(
        &policies,
        &[
            ("pod", pod("bar", "sleep", "10.244.1.6"), port(80), "allow"),
            (
                "no identity",
                stranger("10.244.1.7"),
                port(80),
                "deny foo/require-identity",
            ),
        ],
    );
}

#[test]
fn deny_wins_over_allow() {
    let policies = [
        policy("foo/allow-all", "{rules: [{}]}"),
        policy(
            "foo/deny-bar",
            "{action: DENY, rules: [{from: [{source: {namespaces: [bar]}}]}]}",
        ),
    ];
    check(
        &policies,
        &[
            ("foo", pod("foo", "sleep", "10.244.1.5"), port(80), "allow"),
            (
                "bar",
                pod("bar", "sleep", "10.244.1.6"),
                port(80),
                "deny foo/deny-bar",
            ),
        ],
    );
}

#[test]
fn any_allow_policy_may_allow() {
    let policies = [
        policy(
            "foo/from-foo",
            "{rules: [{from: [{source: {namespaces: [foo]}}]}]}",
        ),
        policy(
            "foo/to-9090",
            "{rules: [{to: [{operation: {ports: [\"9090\"]}}]}]}",
        ),
    ];
    check(
        &policies,
        &[
            (
                "first",
                pod("foo", "sleep", "10.244.1.5"),
                port(80),
                "allow",
            ),
            (
                "second",
                pod("bar", "sleep", "10.244.1.6"),
                port(9090),
                "allow",
            ),
            (
                "neither",
                pod("bar", "sleep", "10.244.1.6"),
                port(80),
                "deny",
            ),
        ],
    );
    let policies: Vec<&AuthorizationPolicy> = policies.iter().collect();
    let verdict = evaluate(
        &policies,
        &pod("bar", "sleep", "10.244.1.6"),
        &port(9090),
        "cluster.local",
    );
    assert_eq!(verdict.reason, "ALLOW policy foo/to-9090 matched");
}

#[test]
fn audit_never_changes_the_verdict() {
    let audit = policy(
        "foo/audit-8080",
        "{action: AUDIT, rules: [{to: [{operation: {ports: [\"8080\"]}}]}]}",
    );
    let allow_nothing = policy("foo/allow-nothing", "{}");
    let source = pod("bar", "sleep", "10.244.1.6");

    let verdict = evaluate(&[&audit], &source, &port(8080), "cluster.local");
    assert!(verdict.allowed, "an AUDIT policy is not an ALLOW policy");
    assert_eq!(verdict.audited, ["foo/audit-8080"]);

    let verdict = evaluate(
        &[&audit, &allow_nothing],
        &source,
        &port(8080),
        "cluster.local",
    );
    assert_eq!(outcome(&verdict), "deny");
    assert_eq!(verdict.audited, ["foo/audit-8080"]);

    let verdict = evaluate(&[&audit], &source, &port(9090), "cluster.local");
    assert_eq!(verdict.audited, Vec::<String>::new());
}

#[test]
fn l7_allow_rule_never_matches() {
    let policies = [policy(
        "foo/get-or-bar",
        "{rules: [{to: [{operation: {methods: [GET], ports: [\"8080\"]}}]}, \
                  {from: [{source: {namespaces: [bar]}}]}]}",
    )];
    check(
        &policies,
        &[
            (
                "the L7 rule is gone",
                pod("foo", "sleep", "10.244.1.5"),
                port(8080),
                "deny",
            ),
            (
                "the L4 rule stays",
                pod("bar", "sleep", "10.244.1.6"),
                port(8080),
                "allow",
            ),
        ],
    );
    // With its only rule gone, the policy allows nothing, yet still applies.
    let policies = [policy(
        "foo/get-only",
        "{rules: [{to: [{operation: {methods: [GET]}}]}]}",
    )];
    check(
        &policies,
        &[(
            "anything",
            pod("foo", "sleep", "10.244.1.5"),
            port(8080),
            "deny",
        )],
    );
}

#[test]
fn l7_deny_rule_denies_more() {
    let policies = [policy(
        "foo/no-posts-from-bar",
        "{action: DENY, rules: [{from: [{source: {namespaces: [bar]}}], \
          to: [{operation: {methods: [POST]}}]}]}",
    )];
    check(
        &policies,
        &[
            // The method is dropped: every connection from bar is denied.
            (
                "bar",
                pod("bar", "sleep", "10.244.1.6"),
                port(8080),
                "deny foo/no-posts-from-bar",
            ),
            (
                "foo",
                pod("foo", "sleep", "10.244.1.5"),
                port(8080),
                "allow",
            ),
        ],
    );
    let policies = [policy(
        "foo/no-admin",
        "{action: DENY, rules: [{to: [{operation: {paths: [/admin], ports: [\"9090\"]}}], \
          when: [{key: \"request.headers[x-user]\", values: [guest]}]}]}",
    )];
    check(
        &policies,
        &[
            (
                "the port stays",
                stranger("10.244.1.6"),
                port(9090),
                "deny foo/no-admin",
            ),
            ("other ports", stranger("10.244.1.6"), port(8080), "allow"),
        ],
    );
}

#[test]
fn when_conditions() {
    let policies = [policy(
        "foo/when",
        "{rules: [{when: [{key: source.ip, values: [10.244.1.0/24]}, \
                          {key: destination.port, notValues: [\"9090\"]}, \
                          {key: destination.ip, values: [10.244.2.0/24]}]}]}",
    )];
    check(
        &policies,
        &[
            ("all hold", stranger("10.244.1.5"), port(8080), "allow"),
            ("excluded port", stranger("10.244.1.5"), port(9090), "deny"),
            ("other source", stranger("10.244.3.5"), port(8080), "deny"),
            (
                "other destination",
                stranger("10.244.1.5"),
                Destination {
                    ip: ip("10.244.9.9"),
                    port: 8080,
                },
                "deny",
            ),
        ],
    );

    let policies = [policy(
        "foo/when-identity",
        "{action: DENY, rules: [{when: [{key: source.namespace, notValues: [foo]}, \
                                        {key: source.principal, notValues: [\"*/sa/admin\"]}]}]}",
    )];
    check(
        &policies,
        &[
            ("foo", pod("foo", "sleep", "10.244.1.5"), port(80), "allow"),
            (
                "bar admin",
                pod("bar", "admin", "10.244.1.6"),
                port(80),
                "allow",
            ),
            (
                "bar",
                pod("bar", "sleep", "10.244.1.6"),
                port(80),
                "deny foo/when-identity",
            ),
            (
                "no identity",
                stranger("10.244.1.7"),
                port(80),
                "deny foo/when-identity",
            ),
        ],
    );
}

#[test]
fn a_rule_needs_from_to_and_when() {
    let policies = [policy(
        "foo/all-parts",
        "{rules: [{from: [{source: {namespaces: [foo]}}, {source: {ipBlocks: [192.0.2.0/24]}}], \
                   to: [{operation: {ports: [\"80\"]}}, {operation: {ports: [\"443\"]}}], \
                   when: [{key: destination.port, notValues: [\"443\"]}]}]}",
    )];
    check(
        &policies,
        &[
            (
                "first from",
                pod("foo", "sleep", "10.244.1.5"),
                port(80),
                "allow",
            ),
            ("second from", stranger("192.0.2.7"), port(80), "allow"),
            (
                "second to, but when fails",
                stranger("192.0.2.7"),
                port(443),
                "deny",
            ),
            ("no from", stranger("198.51.100.1"), port(80), "deny"),
            (
                "no to",
                pod("foo", "sleep", "10.244.1.5"),
                port(8080),
                "deny",
            ),
        ],
    );
}

#[test]
fn wildcards() {
    assert!(wildcard_match("*", "foo"));
    assert!(!wildcard_match("*", ""));
    assert!(wildcard_match("foo*", "foo-bar"));
    assert!(wildcard_match("*-bar", "foo-bar"));
    assert!(!wildcard_match("foo", "foo-bar"));
    // Only a leading or a trailing `*` is a wildcard.
    assert!(!wildcard_match("f*o", "foo"));
}
