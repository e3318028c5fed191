//! Istio's AuthorizationPolicy resource (`security.istio.io/v1` and
//! `v1beta1`) as weir reads it, checked as istiod's validation checks it, and
//! translated into [`policy::AuthorizationPolicy`] as istiod translates a
//! policy for ztunnel.
//!
//! Fields that weir does not know are errors, so that nothing a policy says
//! is silently ignored. Fields that weir knows but cannot enforce at L4 are
//! warnings that say what weir does instead.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::model::FieldError;
use crate::policy;

/// The resource, field for field as Istio defines it.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: AuthorizationPolicySpec,
    /// Written by istiod, and kept by `kubectl get -o yaml`; not
    /// configuration.
    #[serde(default, rename = "status")]
    _status: IgnoredAny,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    pub selector: Option<WorkloadSelector>,
    pub target_ref: Option<PolicyTargetReference>,
    #[serde(default)]
    pub target_refs: Vec<PolicyTargetReference>,
    #[serde(default)]
    pub action: Action,
    /// For action CUSTOM.
    pub provider: Option<ExtensionProvider>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// A Gateway, Service or waypoint that a policy is attached to instead of
/// workloads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    #[serde(default)]
    pub group: String,
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub namespace: String,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtensionProvider {
    pub name: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    /// External authorization; weir does not support it.
    Custom,
}

/// `from` and `to` are Options because an empty list, unlike a missing one,
/// is an error.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    pub from: Option<Vec<RuleFrom>>,
    pub to: Option<Vec<RuleTo>>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFrom {
    pub source: Option<Source>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleTo {
    pub operation: Option<Operation>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub request_principals: Vec<String>,
    #[serde(default)]
    pub not_request_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    #[serde(default)]
    pub remote_ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_remote_ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
}

/// A `when` condition.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// What weir makes of a valid policy.
#[derive(Clone, Debug, PartialEq)]
pub struct Translation {
    /// None when the policy is attached to a Gateway, Service or waypoint
    /// (`targetRef`), so that it applies to no workload.
    pub policy: Option<policy::AuthorizationPolicy>,
    /// What weir enforces differently from what the policy says.
    pub warnings: Vec<FieldError>,
}

impl AuthorizationPolicy {
    /// Checks the policy as istiod does before accepting it, and translates
    /// it for L4 as istiod does for ztunnel. Every error is returned, not only
    /// the first.
    pub fn translate(&self) -> Result<Translation, Vec<FieldError>> {
        let spec = &self.spec;
        let action = match spec.action {
            Action::Allow => policy::Action::Allow,
            Action::Deny => policy::Action::Deny,
            Action::Audit => policy::Action::Audit,
            Action::Custom => {
                let message = "CUSTOM (external authorization) is not supported";
                return Err(vec![FieldError::new("spec.action", message)]);
            }
        };
        let mut translator = Translator {
            action,
            errors: Vec::new(),
            warnings: Vec::new(),
        };
        let targeted = translator.selection(spec);
        if spec.provider.is_some() {
            translator.error("spec.provider", "is only for action CUSTOM");
        }
        if action == policy::Action::Deny && spec.rules.is_empty() {
            translator.error(
                "spec.rules",
                "a DENY policy without rules never matches; \
                 add an empty rule `{}` to deny every connection",
            );
        }
        let rules = spec
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, rule)| translator.rule(&format!("spec.rules[{i}]"), rule))
            .collect();
        if !translator.errors.is_empty() {
            return Err(translator.errors);
        }
        let policy = (!targeted).then(|| policy::AuthorizationPolicy {
            namespace: self.metadata.namespace.clone().unwrap_or_default(),
            name: self.metadata.name.clone().unwrap_or_default(),
            selector: spec
                .selector
                .as_ref()
                .map(|selector| selector.match_labels.clone())
                .unwrap_or_default(),
            action,
            rules,
        });
        Ok(Translation {
            policy,
            warnings: translator.warnings,
        })
    }
}

struct Translator {
    action: policy::Action,
    errors: Vec<FieldError>,
    warnings: Vec<FieldError>,
}

/// A field of a rule that needs L7: its path, and its name or `when` key.
type L7Field = (String, String);

impl Translator {
    fn error(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    fn warn(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(FieldError::new(field, message));
    }

    /// Checks how the policy picks what it applies to: a selector, or target
    /// references. True when it is attached to targets rather than to
    /// workloads.
    fn selection(&mut self, spec: &AuthorizationPolicySpec) -> bool {
        let target_field = if spec.target_ref.is_some() {
            Some("spec.targetRef")
        } else if !spec.target_refs.is_empty() {
            Some("spec.targetRefs")
        } else {
            None
        };
        let set = [
            spec.selector.is_some(),
            spec.target_ref.is_some(),
            !spec.target_refs.is_empty(),
        ];
        if set.iter().filter(|&&set| set).count() > 1 {
            self.error(
                "spec",
                "only one of selector, targetRef and targetRefs may be set",
            );
        }
        if let Some(selector) = &spec.selector {
            if selector.match_labels.is_empty() {
                self.warn(
                    "spec.selector",
                    "has no matchLabels, so it selects every workload",
                );
            }
            for (key, value) in &selector.match_labels {
                let field = format!("spec.selector.matchLabels[{key:?}]");
                if key.is_empty() {
                    self.error(&field, "the label name must not be empty");
                }
                if key.contains('*') || value.contains('*') {
                    self.error(field, "wildcards are not supported in a selector");
                }
            }
        }
        if let Some(field) = target_field {
            self.warn(
                field,
                "the policy is for a Gateway, Service or waypoint, not for workloads: \
                 weir ignores it, as Istio's ztunnel does",
            );
        }
        target_field.is_some()
    }

    /// Translates the rule at `path`; None when it can never match.
    ///
    /// A rule that needs L7 attributes cannot be decided at L4. As istiod
    /// does for ztunnel, an ALLOW rule that needs them is left out, so it
    /// allows nothing, and a DENY rule keeps its L4 conditions only, so it
    /// denies more. Either way weir is stricter than the policy, never
    /// laxer. An AUDIT rule keeps its L4 conditions too: audits more.
    fn rule(&mut self, path: &str, rule: &Rule) -> Option<policy::Rule> {
        let mut l7 = Vec::new();
        let mut translated = policy::Rule::default();
        if let Some(from) = &rule.from {
            if from.is_empty() {
                let message = "must not be empty; leave it out to match every source";
                self.error(format!("{path}.from"), message);
            }
            for (i, from) in from.iter().enumerate() {
                let path = format!("{path}.from[{i}].source");
                match &from.source {
                    Some(source) => translated.from.push(self.source(&path, source, &mut l7)),
                    None => self.error(path, "missing"),
                }
            }
        }
        if let Some(to) = &rule.to {
            if to.is_empty() {
                let message = "must not be empty; leave it out to match every destination";
                self.error(format!("{path}.to"), message);
            }
            for (i, to) in to.iter().enumerate() {
                let path = format!("{path}.to[{i}].operation");
                match &to.operation {
                    Some(operation) => {
                        translated
                            .to
                            .push(self.operation(&path, operation, &mut l7));
                    }
                    None => self.error(path, "missing"),
                }
            }
        }
        for (i, condition) in rule.when.iter().enumerate() {
            let path = format!("{path}.when[{i}]");
            // An L7 condition adds nothing, which makes it match everything.
            translated
                .when
                .extend(self.condition(&path, condition, &mut l7));
        }

        let outcome = match self.action {
            policy::Action::Allow => {
                "as in Istio's ztunnel, this ALLOW rule never matches (allows less than written)"
            }
            policy::Action::Deny => {
                "as in Istio's ztunnel, this DENY rule applies without it (denies more than written)"
            }
            policy::Action::Audit => {
                "this AUDIT rule applies without it (audits more than written)"
            }
        };
        for (field, name) in &l7 {
            let message = format!("{name} is an L7 attribute, which weir cannot check: {outcome}");
            self.warn(field, message);
        }
        (l7.is_empty() || self.action != policy::Action::Allow).then_some(translated)
    }

    fn source(&mut self, path: &str, source: &Source, l7: &mut Vec<L7Field>) -> policy::Match {
        // Request principals come from a JWT, which only HTTP carries.
        let l7_fields = [
            ("requestPrincipals", &source.request_principals),
            ("notRequestPrincipals", &source.not_request_principals),
        ];
        let l4_fields = [
            ("principals", &source.principals),
            ("notPrincipals", &source.not_principals),
            ("namespaces", &source.namespaces),
            ("notNamespaces", &source.not_namespaces),
            ("ipBlocks", &source.ip_blocks),
            ("notIpBlocks", &source.not_ip_blocks),
            ("remoteIpBlocks", &source.remote_ip_blocks),
            ("notRemoteIpBlocks", &source.not_remote_ip_blocks),
        ];
        self.check_lists(path, &[&l4_fields[..], &l7_fields[..]].concat());
        l7.extend(set_fields(path, &l7_fields));
        // The remote IP is the client address from X-Forwarded-For or the
        // PROXY protocol when a proxy sets them. At L4 nothing does, so it is
        // the source IP, as it is for TCP in Istio's sidecars (unlike
        // ztunnel, which leaves remoteIpBlocks to waypoints).
        let mut ips = |name: &str, values: &[String]| self.ip_blocks(path, name, values);
        let source_ips = policy::Condition {
            values: [
                ips("ipBlocks", &source.ip_blocks),
                ips("remoteIpBlocks", &source.remote_ip_blocks),
            ]
            .concat(),
            not_values: [
                ips("notIpBlocks", &source.not_ip_blocks),
                ips("notRemoteIpBlocks", &source.not_remote_ip_blocks),
            ]
            .concat(),
        };
        policy::Match {
            principals: policy::Condition {
                values: source.principals.clone(),
                not_values: source.not_principals.clone(),
            },
            namespaces: policy::Condition {
                values: source.namespaces.clone(),
                not_values: source.not_namespaces.clone(),
            },
            source_ips,
            ..policy::Match::default()
        }
    }

    fn operation(
        &mut self,
        path: &str,
        operation: &Operation,
        l7: &mut Vec<L7Field>,
    ) -> policy::Match {
        // Hosts, methods and paths are HTTP's.
        let l7_fields = [
            ("hosts", &operation.hosts),
            ("notHosts", &operation.not_hosts),
            ("methods", &operation.methods),
            ("notMethods", &operation.not_methods),
            ("paths", &operation.paths),
            ("notPaths", &operation.not_paths),
        ];
        let l4_fields = [
            ("ports", &operation.ports),
            ("notPorts", &operation.not_ports),
        ];
        self.check_lists(path, &[&l4_fields[..], &l7_fields[..]].concat());
        l7.extend(set_fields(path, &l7_fields));
        policy::Match {
            destination_ports: policy::Condition {
                values: self.ports(path, "ports", &operation.ports),
                not_values: self.ports(path, "notPorts", &operation.not_ports),
            },
            ..policy::Match::default()
        }
    }

    /// The checks that istiod makes of the lists of a source or an
    /// operation: at least one is set, and no value is empty.
    fn check_lists(&mut self, path: &str, fields: &[(&str, &Vec<String>)]) {
        if fields.iter().all(|(_, values)| values.is_empty()) {
            self.error(path, "must not be empty");
        }
        self.check_values(path, fields);
    }

    fn check_values(&mut self, path: &str, fields: &[(&str, &Vec<String>)]) {
        for (name, values) in fields {
            for (i, value) in values.iter().enumerate() {
                if value.is_empty() {
                    self.error(format!("{path}.{name}[{i}]"), "must not be empty");
                }
            }
        }
    }

    /// Translates the `when` condition at `path`; None when it needs L7 or
    /// is invalid.
    fn condition(
        &mut self,
        path: &str,
        condition: &Condition,
        l7: &mut Vec<L7Field>,
    ) -> Option<policy::Match> {
        let Condition {
            key,
            values,
            not_values,
        } = condition;
        if values.is_empty() && not_values.is_empty() {
            self.error(path, "needs values or notValues");
        }
        self.check_values(path, &[("values", values), ("notValues", not_values)]);
        let attribute = match Attribute::of(key) {
            Ok(attribute) => attribute,
            Err(message) => {
                self.error(format!("{path}.key"), message);
                return None;
            }
        };
        let strings = || policy::Condition {
            values: values.clone(),
            not_values: not_values.clone(),
        };
        let mut translated = policy::Match::default();
        match attribute {
            Attribute::L7 => {
                l7.push((format!("{path}.key"), key.clone()));
                return None;
            }
            Attribute::SourceIp => {
                translated.source_ips = policy::Condition {
                    values: self.ip_blocks(path, "values", values),
                    not_values: self.ip_blocks(path, "notValues", not_values),
                };
            }
            Attribute::SourceNamespace => translated.namespaces = strings(),
            Attribute::SourcePrincipal => translated.principals = strings(),
            Attribute::DestinationIp => {
                translated.destination_ips = policy::Condition {
                    values: self.ip_blocks(path, "values", values),
                    not_values: self.ip_blocks(path, "notValues", not_values),
                };
            }
            Attribute::DestinationPort => {
                translated.destination_ports = policy::Condition {
                    values: self.ports(path, "values", values),
                    not_values: self.ports(path, "notValues", not_values),
                };
            }
        }
        Some(translated)
    }

    /// The addresses and networks of the list `name` at `path`: a host
    /// address stands for its own /32 or /128.
    fn ip_blocks(&mut self, path: &str, name: &str, values: &[String]) -> Vec<IpNet> {
        let mut blocks = Vec::new();
        // Empty values are reported by check_values.
        for (i, value) in values.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
            let block = if value.contains('/') {
                value.parse::<IpNet>().ok().map(|net| net.trunc())
            } else {
                value.parse::<IpAddr>().ok().map(IpNet::from)
            };
            match block {
                Some(block) => blocks.push(block),
                None => self.error(
                    format!("{path}.{name}[{i}]"),
                    format!("{value:?} is not an IP address or a CIDR"),
                ),
            }
        }
        blocks
    }

    fn ports(&mut self, path: &str, name: &str, values: &[String]) -> Vec<u16> {
        let mut ports = Vec::new();
        for (i, value) in values.iter().enumerate().filter(|(_, v)| !v.is_empty()) {
            match value.parse::<u16>() {
                Ok(port) if port != 0 => ports.push(port),
                _ => self.error(
                    format!("{path}.{name}[{i}]"),
                    format!("{value:?} is not a port number (1-65535)"),
                ),
            }
        }
        ports
    }
}

/// The L7 fields of a rule that are set, for the warnings.
fn set_fields(path: &str, fields: &[(&str, &Vec<String>)]) -> Vec<L7Field> {
    fields
        .iter()
        .filter(|(_, values)| !values.is_empty())
        .map(|(name, _)| (format!("{path}.{name}"), (*name).to_owned()))
        .collect()
}

/// What a `when` key is about.
enum Attribute {
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    /// A key that Istio knows and that needs more than L4: HTTP headers, JWT
    /// claims, the TLS server name, and `source.serviceAccount`, which
    /// istiod leaves to waypoints.
    L7,
}

impl Attribute {
    /// The attribute of `key`, or why it is not a key.
    fn of(key: &str) -> Result<Self, String> {
        let map_key = |prefix: &str| {
            key.strip_prefix(prefix)
                .and_then(|rest| rest.strip_prefix('['))
                .and_then(|rest| rest.strip_suffix(']'))
                .is_some_and(|name| !name.is_empty())
        };
        Ok(match key {
            "" => return Err("must not be empty".to_owned()),
            // As ipBlocks and remoteIpBlocks, see Translator::source.
            "source.ip" | "remote.ip" => Self::SourceIp,
            "source.namespace" => Self::SourceNamespace,
            "source.principal" => Self::SourcePrincipal,
            "destination.ip" => Self::DestinationIp,
            "destination.port" => Self::DestinationPort,
            "source.serviceAccount"
            | "request.auth.principal"
            | "request.auth.audiences"
            | "request.auth.presenter"
            | "connection.sni" => Self::L7,
            _ if map_key("request.headers")
                || map_key("request.experimental.inline.headers")
                || map_key("request.auth.claims")
                || key.starts_with("experimental.envoy.filters.") =>
            {
                Self::L7
            }
            _ => return Err(format!("{key:?} is not a key that Istio knows")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(spec: &str) -> Result<Translation, Vec<FieldError>> {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: p, namespace: foo}}\nspec: {spec}\n"
        );
        serde_yaml::from_str::<AuthorizationPolicy>(&text)
            .unwrap()
            .translate()
    }

    /// The fields and messages of the errors that `spec` gives.
    fn errors(spec: &str) -> Vec<(String, String)> {
        let errors = translate(spec).expect_err("expected errors");
        errors
            .into_iter()
            .map(|error| (error.field, error.message))
            .collect()
    }

    fn warnings(spec: &str) -> Vec<String> {
        let translation = translate(spec).unwrap();
        translation
            .warnings
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn translates_l4_fields() {
        let spec = "
  selector: {matchLabels: {app: reviews}}
  action: DENY
  rules:
  - from:
    - source: {principals: [\"cluster.local/ns/foo/sa/*\"], notNamespaces: [bar]}
    - source: {ipBlocks: [10.1.2.3/8, \"fd00::1\"], remoteIpBlocks: [192.168.0.0/16], notIpBlocks: [10.0.0.1]}
    to:
    - operation: {ports: [\"8080\"], notPorts: [\"9090\"]}
    when:
    - {key: destination.ip, values: [10.96.0.0/12]}
    - {key: source.namespace, notValues: [baz]}
";
        let policy = translate(spec).unwrap().policy.unwrap();
        assert_eq!(
            (policy.key(), policy.action),
            ("foo/p".to_owned(), policy::Action::Deny)
        );
        assert_eq!(policy.selector["app"], "reviews");
        let [rule] = policy.rules.as_slice() else {
            panic!("{policy:?}")
        };
        let nets =
            |nets: &[&str]| -> Vec<IpNet> { nets.iter().map(|n| n.parse().unwrap()).collect() };
        assert_eq!(
            rule.from[0].principals.values,
            ["cluster.local/ns/foo/sa/*"]
        );
        assert_eq!(rule.from[0].namespaces.not_values, ["bar"]);
        assert_eq!(
            rule.from[1].source_ips.values,
            nets(&["10.0.0.0/8", "fd00::1/128", "192.168.0.0/16"])
        );
        assert_eq!(rule.from[1].source_ips.not_values, nets(&["10.0.0.1/32"]));
        assert_eq!(rule.to[0].destination_ports.values, [8080]);
        assert_eq!(rule.to[0].destination_ports.not_values, [9090]);
        assert_eq!(rule.when[0].destination_ips.values, nets(&["10.96.0.0/12"]));
        assert_eq!(rule.when[1].namespaces.not_values, ["baz"]);
    }

    #[test]
    fn l7_allow_rule_is_left_out_with_a_warning() {
        let spec = "
  rules:
  - to: [{operation: {methods: [GET], ports: [\"8080\"]}}]
  - from: [{source: {requestPrincipals: [\"*\"]}}]
  - when: [{key: \"request.headers[x-user]\", values: [admin]}]
  - from: [{source: {namespaces: [foo]}}]
";
        let translation = translate(spec).unwrap();
        let policy = translation.policy.unwrap();
        assert_eq!(policy.rules.len(), 1, "only the L4 rule is left");
        assert_eq!(policy.rules[0].from[0].namespaces.values, ["foo"]);
        let warnings: Vec<String> = translation
            .warnings
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            warnings,
            [
                "spec.rules[0].to[0].operation.methods: methods is an L7 attribute, which weir \
                 cannot check: as in Istio's ztunnel, this ALLOW rule never matches (allows less than written)",
                "spec.rules[1].from[0].source.requestPrincipals: requestPrincipals is an L7 attribute, \
                 which weir cannot check: as in Istio's ztunnel, this ALLOW rule never matches (allows less than written)",
                "spec.rules[2].when[0].key: request.headers[x-user] is an L7 attribute, which weir \
                 cannot check: as in Istio's ztunnel, this ALLOW rule never matches (allows less than written)",
            ]
        );
    }

    #[test]
    fn l7_deny_rule_keeps_its_l4_conditions() {
        let spec = "
  action: DENY
  rules:
  - from: [{source: {namespaces: [bar]}}]
    to: [{operation: {paths: [/admin]}}, {operation: {methods: [POST], ports: [\"9090\"]}}]
    when: [{key: connection.sni, values: [x.example.com]}, {key: destination.port, values: [\"9090\"]}]
";
        let translation = translate(spec).unwrap();
        let rule = &translation.policy.unwrap().rules[0];
        assert_eq!(rule.from[0].namespaces.values, ["bar"]);
        // `to[0]` only had a path: it now matches everything.
        assert_eq!(rule.to[0], policy::Match::default());
        assert_eq!(rule.to[1].destination_ports.values, [9090]);
        // The SNI condition is gone, the port condition stays.
        assert_eq!(rule.when.len(), 1);
        assert_eq!(rule.when[0].destination_ports.values, [9090]);
        assert_eq!(translation.warnings.len(), 3);
        assert!(
            translation.warnings[0]
                .message
                .ends_with("this DENY rule applies without it (denies more than written)"),
            "{:?}",
            translation.warnings
        );
    }

    #[test]
    fn target_ref_policy_is_ignored_with_a_warning() {
        let spec = "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}], \
                    rules: [{}]}";
        assert_eq!(translate(spec).unwrap().policy, None);
        assert_eq!(
            warnings(spec),
            [
                "spec.targetRefs: the policy is for a Gateway, Service or waypoint, not for \
              workloads: weir ignores it, as Istio's ztunnel does"
            ]
        );
    }

    #[test]
    fn selector_without_labels_is_a_warning() {
        assert_eq!(
            warnings("{selector: {}}"),
            ["spec.selector: has no matchLabels, so it selects every workload"]
        );
    }

    #[test]
    fn invalid_policies_name_every_field() {
        let spec = "
  selector: {matchLabels: {app: \"*\"}}
  targetRef: {kind: Service, name: reviews}
  rules:
  - from: []
    to: [{}, {operation: {}}, {operation: {ports: [\"0\", \"http\", \"\"]}}]
  - from: [{source: {ipBlocks: [10.0.0.0/8, 10.0.0.0/33, \"fd00::zz\"]}}]
    when:
    - {key: source.ip}
    - {key: destination.port, notValues: [\"65536\"]}
    - {key: \"destination.labels[app]\", values: [x]}
    - {key: \"request.headers\", values: [x]}
";
        let field = |(field, _): &(String, String)| field.clone();
        assert_eq!(
            errors(spec).iter().map(field).collect::<Vec<_>>(),
            [
                "spec",
                "spec.selector.matchLabels[\"app\"]",
                "spec.rules[0].from",
                "spec.rules[0].to[0].operation",
                "spec.rules[0].to[1].operation",
                "spec.rules[0].to[2].operation.ports[2]",
                "spec.rules[0].to[2].operation.ports[0]",
                "spec.rules[0].to[2].operation.ports[1]",
                "spec.rules[1].from[0].source.ipBlocks[1]",
                "spec.rules[1].from[0].source.ipBlocks[2]",
                "spec.rules[1].when[0]",
                "spec.rules[1].when[1].notValues[0]",
                "spec.rules[1].when[2].key",
                "spec.rules[1].when[3].key",
            ]
        );
        let messages = errors(spec);
        assert!(messages.contains(&(
            "spec.rules[1].from[0].source.ipBlocks[1]".to_owned(),
            "\"10.0.0.0/33\" is not an IP address or a CIDR".to_owned()
        )));
        assert!(messages.contains(&(
            "spec.rules[0].to[2].operation.ports[1]".to_owned(),
            "\"http\" is not a port number (1-65535)".to_owned()
        )));
        assert!(messages.contains(&(
            "spec.rules[1].when[2].key".to_owned(),
            "\"destination.labels[app]\" is not a key that Istio knows".to_owned()
        )));
    }

    #[test]
    fn custom_deny_without_rules_and_stray_provider_are_errors() {
        assert_eq!(
            errors("{action: CUSTOM, provider: {name: ext-authz}, rules: [{}]}"),
            [(
                "spec.action".to_owned(),
                "CUSTOM (external authorization) is not supported".to_owned()
            )]
        );
        assert_eq!(
            errors("{action: DENY}")[0].0,
            "spec.rules",
            "a DENY policy without rules is meaningless, and istiod rejects it"
        );
        assert_eq!(
            errors("{provider: {name: x}, rules: [{}]}")[0].0,
            "spec.provider"
        );
    }
}
