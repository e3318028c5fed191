//! Authorization: the part of Istio's AuthorizationPolicy that can be decided
//! on a TCP connection (L4), with Istio's semantics.
//!
//! [`istio`] reads the `security.istio.io` resource and translates it as
//! istiod translates a policy for ztunnel, Istio's own L4 proxy. This module
//! holds the result, [`AuthorizationPolicy`], and decides connections with
//! [`evaluate`]. As in Istio:
//!
//! - A policy applies to the workloads of its namespace that its selector
//!   picks, or to all of them when it has none; a policy in the root
//!   namespace does the same in every namespace
//!   ([`Cluster::policies_for`](crate::model::Cluster::policies_for)).
//! - A connection is denied when a DENY policy matches it. Otherwise, when
//!   any ALLOW policy applies to the workload, one of them must match.
//!   Otherwise it is allowed. AUDIT policies never change the outcome.
//! - A policy matches when one of its rules does, so a policy without rules
//!   matches nothing: ALLOW with `spec: {}` allows nothing. A rule matches
//!   when one of its `from` entries, one of its `to` entries and every `when`
//!   condition match; a part that is left out matches anything, so
//!   `rules: [{}]` matches every connection.
//! - Within an entry every field that is set must match. A field matches
//!   when any of its values does; its `not` twin when none does.
//! - A peer's identity is a namespace and a service account, and its
//!   principal `<trust domain>/ns/<namespace>/sa/<service account>`. weir
//!   runs in plaintext mode: the identity is that of the pod that owns the
//!   source IP. A peer without identity matches no `principals` and no
//!   `namespaces` value, so `notPrincipals` and `notNamespaces` match it.

pub mod istio;

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::model::{Cluster, Workload};

/// An AuthorizationPolicy as weir enforces it: only what can be decided at
/// L4, with addresses and ports parsed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuthorizationPolicy {
    pub namespace: String,
    pub name: String,
    /// `spec.selector.matchLabels`: picks the workloads that carry all of
    /// these labels. Empty picks every workload the policy reaches.
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    /// The policy matches when any rule does, so without rules it matches
    /// nothing.
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicy {
    /// `namespace/name`, as verdicts and logs name a policy.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether the selector picks a workload with these labels.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
    }

    fn matches(&self, connection: &Connection) -> bool {
        self.rules.iter().any(|rule| rule.matches(connection))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    /// Reports matching connections and decides nothing.
    Audit,
}

/// One of a policy's rules: Istio's `from`, `to` and `when`, each entry of
/// which is a [`Match`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rule {
    /// `from[].source`: one must match; when empty, any source does.
    pub from: Vec<Match>,
    /// `to[].operation`: one must match; when empty, any destination does.
    pub to: Vec<Match>,
    /// `when[]`: every condition must match.
    pub when: Vec<Match>,
}

impl Rule {
    fn matches(&self, connection: &Connection) -> bool {
        let any = |entries: &[Match]| {
            entries.is_empty() || entries.iter().any(|entry| entry.matches(connection))
        };
        any(&self.from) && any(&self.to) && self.when.iter().all(|m| m.matches(connection))
    }
}

/// Conditions on a connection, as ztunnel has them: every field that is set
/// must match, so a `Match` with no field set matches every connection.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Match {
    /// Of the peer, with Istio's `*` wildcards.
    #[serde(skip_serializing_if = "Condition::is_empty")]
    pub principals: Condition<String>,
    /// Of the peer, with Istio's `*` wildcards.
    #[serde(skip_serializing_if = "Condition::is_empty")]
    pub namespaces: Condition<String>,
    #[serde(skip_serializing_if = "Condition::is_empty")]
    pub source_ips: Condition<IpNet>,
    #[serde(skip_serializing_if = "Condition::is_empty")]
    pub destination_ips: Condition<IpNet>,
    #[serde(skip_serializing_if = "Condition::is_empty")]
    pub destination_ports: Condition<u16>,
}

impl Match {
    fn matches(&self, connection: &Connection) -> bool {
        let Connection {
            source_ip,
            destination_ip,
            destination_port,
            ..
        } = *connection;
        self.principals.holds(|pattern| {
            connection
                .principal()
                .is_some_and(|principal| wildcard_match(pattern, principal))
        }) && self.namespaces.holds(|pattern| {
            connection
                .namespace()
                .is_some_and(|namespace| wildcard_match(pattern, namespace))
        }) && self.source_ips.holds(|net| net.contains(&source_ip))
            && self
                .destination_ips
                .holds(|net| net.contains(&destination_ip))
            && self
                .destination_ports
                .holds(|&port| port == destination_port)
    }
}

/// What one attribute of a connection must be, like Istio's `principals`
/// and `notPrincipals`, or a `when` condition's `values` and `notValues`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Condition<T> {
    /// One must match; when empty, any value does.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<T>,
    /// None may match.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<T>,
}

// Derived, it would require `T: Default`.
impl<T> Default for Condition<T> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            not_values: Vec::new(),
        }
    }
}

impl<T> Condition<T> {
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    /// Whether the attribute meets the condition; `matches` says whether the
    /// attribute matches one value. An attribute that a connection lacks,
    /// such as the principal of a peer without identity, matches no value:
    /// it fails `values` and passes `not_values`.
    fn holds(&self, matches: impl Fn(&T) -> bool) -> bool {
        (self.values.is_empty() || self.values.iter().any(&matches))
            && !self.not_values.iter().any(&matches)
    }
}

/// Istio's string match for principals and namespaces: `*` matches any
/// non-empty value, `*suffix` and `prefix*` match by suffix and by prefix,
/// and anything else matches exactly.
fn wildcard_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

/// Who a peer is: in Istio's terms, its namespace and service account.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn of(workload: &Workload) -> Self {
        Self {
            namespace: workload.namespace.clone(),
            service_account: workload.service_account.clone(),
        }
    }
}

/// The peer that opened a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub ip: IpAddr,
    /// None when the peer is not known to be a pod: it has no principal and
    /// no namespace.
    pub identity: Option<Identity>,
}

impl Source {
    /// The peer at `ip`, with the identity of the pod that owns `ip` in
    /// `cluster`. This is weir's plaintext mode: it trusts the pod network
    /// not to spoof source addresses, where Istio relies on mTLS.
    pub fn at(ip: IpAddr, cluster: &Cluster) -> Self {
        Self {
            ip,
            identity: cluster.workload_by_ip(ip).map(Identity::of),
        }
    }
}

/// Where a connection goes: the workload's own address and port, not a
/// Service's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Destination {
    pub ip: IpAddr,
    pub port: u16,
}

/// The decision on one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The DENY policy that matched, `namespace/name`. None when allowed, and
    /// when denied because no ALLOW policy matched.
    pub deny_policy: Option<String>,
    /// Why, in words for the log.
    pub reason: String,
    /// The AUDIT policies that matched, `namespace/name`, for the caller to
    /// log. They do not change the verdict.
    pub audited: Vec<String>,
}

/// Decides a connection from `source` to `destination` by `policies`, those
/// that apply to the destination workload, with Istio's semantics (see the
/// module documentation). Principals are in `trust_domain`, e.g.
/// `cluster.local`.
///
/// Made for every connection, so it allocates little: the verdict, and the
/// principal only when a policy asks for it.
pub fn evaluate(
    policies: &[&AuthorizationPolicy],
    source: &Source,
    destination: &Destination,
    trust_domain: &str,
) -> Verdict {
    let connection = Connection::new(source, destination, trust_domain);
    let with_action = |action: Action| {
        policies
            .iter()
            .copied()
            .filter(move |policy| policy.action == action)
    };
    let audited = with_action(Action::Audit)
        .filter(|policy| policy.matches(&connection))
        .map(AuthorizationPolicy::key)
        .collect();

    if let Some(policy) = with_action(Action::Deny).find(|policy| policy.matches(&connection)) {
        let key = policy.key();
        return Verdict {
            allowed: false,
            reason: format!("DENY policy {key} matched"),
            deny_policy: Some(key),
            audited,
        };
    }
    let mut allow = with_action(Action::Allow).peekable();
    let (allowed, reason) = if allow.peek().is_none() {
        (true, "no ALLOW policy applies".to_owned())
    } else if let Some(policy) = allow.find(|policy| policy.matches(&connection)) {
        (true, format!("ALLOW policy {} matched", policy.key()))
    } else {
        // Name the ALLOW policies that apply: an operator wants to know which
        // one to widen. Denials are rare enough for the allocation.
        let applied: Vec<String> = with_action(Action::Allow).map(|p| p.key()).collect();
        (
            false,
            format!("no ALLOW policy matched ({} apply)", applied.join(", ")),
        )
    };
    Verdict {
        allowed,
        deny_policy: None,
        reason,
        audited,
    }
}

/// A connection as rules see it.
struct Connection<'a> {
    source: &'a Source,
    trust_domain: &'a str,
    // Canonical, so that an IPv4-mapped IPv6 address, as dual-stack sockets
    // report IPv4 peers, meets IPv4 ipBlocks.
    source_ip: IpAddr,
    destination_ip: IpAddr,
    destination_port: u16,
    /// Made when a rule first asks for it.
    principal: OnceCell<Option<String>>,
}

impl<'a> Connection<'a> {
    fn new(source: &'a Source, destination: &Destination, trust_domain: &'a str) -> Self {
        Self {
            source,
            trust_domain,
            source_ip: source.ip.to_canonical(),
            destination_ip: destination.ip.to_canonical(),
            destination_port: destination.port,
            principal: OnceCell::new(),
        }
    }

    fn namespace(&self) -> Option<&str> {
        let identity = self.source.identity.as_ref()?;
        Some(&identity.namespace)
    }

    fn principal(&self) -> Option<&str> {
        self.principal
            .get_or_init(|| {
                let identity = self.source.identity.as_ref()?;
                Some(format!(
                    "{}/ns/{}/sa/{}",
                    self.trust_domain, identity.namespace, identity.service_account
                ))
            })
            .as_deref()
    }
}

#[cfg(test)]
mod tests;
