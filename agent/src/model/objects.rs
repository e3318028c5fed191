//! Kubernetes objects as weir reads them: YAML or JSON documents decoded into
//! k8s-openapi types (and, for Istio's AuthorizationPolicy, weir's mirror of
//! Istio's type), plus the checks that serde alone does not make.
//!
//! Decoding yields the same types a Kubernetes API watch does, and
//! [`Object::check`] does not care where an object came from, so both sources
//! hand the rest of the model identical, equally checked objects.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::Value;
use weir_common::{MAX_EXCLUDED_CIDRS, MAX_EXCLUDED_PORTS};

use crate::policy::istio;
use crate::routing;

const NETWORKING_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// Label that enrolls a pod, or every pod of a namespace: [`MESH_ENABLED`] or
/// [`MESH_DISABLED`].
pub const MESH_LABEL: &str = "weir.dev/mesh";
pub const MESH_ENABLED: &str = "enabled";
pub const MESH_DISABLED: &str = "disabled";
/// Pod annotation listing destination ports that are never redirected,
/// e.g. `"5432, 6379"`.
pub const EXCLUDE_PORTS_ANNOTATION: &str = "weir.dev/exclude-outbound-ports";
pub const EXCLUDE_INBOUND_PORTS_ANNOTATION: &str = "weir.dev/exclude-inbound-ports";
/// Pod annotation listing destination CIDRs that are never redirected,
/// e.g. `"10.0.0.0/8,fd00::/8"`.
pub const EXCLUDE_CIDRS_ANNOTATION: &str = "weir.dev/exclude-outbound-cidrs";
/// Label by which an EndpointSlice names the Service it belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Kubernetes object of a kind the model uses.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Box<Pod>),
    Service(Box<Service>),
    EndpointSlice(EndpointSlice),
    /// `security.istio.io/v1` or `v1beta1`.
    AuthorizationPolicy(Box<istio::AuthorizationPolicy>),
    /// `networking.istio.io/v1`, `v1beta1` or `v1alpha3`.
    VirtualService(Box<routing::istio::VirtualService>),
    /// `networking.istio.io/v1`, `v1beta1` or `v1alpha3`.
    DestinationRule(Box<routing::istio::DestinationRule>),
}

/// Kind, namespace and name: what identifies an object in a cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: String,
    /// None for cluster-scoped kinds such as Namespace.
    pub namespace: Option<String>,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    /// `Pod default/productpage-v1`, or `Namespace default`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{} {namespace}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// What is wrong with one field of an object, wherever the object came from;
/// as a warning, what weir does differently from what the field says.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field's path in the object, e.g. `status.podIP`.
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// An object in a manifest file that cannot be used.
///
/// `object` is empty when the problem concerns the whole file (it cannot be
/// read), and `field` is empty when it concerns the whole document (a YAML
/// syntax error); Display then leaves them out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: PathBuf,
    /// e.g. `Pod default/productpage-v1`, or `document 3` when it has no name.
    pub object: String,
    /// e.g. `spec.containers[0].ports[0].containerPort`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_located(f, &self.file, &[&self.object, &self.field, &self.message])
    }
}

impl std::error::Error for ManifestError {}

/// Something in a manifest file that weir ignores or handles differently
/// from Kubernetes or Istio, such as a kind it does not support yet, or the
/// L7 rules of an AuthorizationPolicy. `object` is empty when it concerns the
/// whole file, `field` when it concerns the whole object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestWarning {
    pub file: PathBuf,
    pub object: String,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ManifestWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_located(f, &self.file, &[&self.object, &self.field, &self.message])
    }
}

/// Writes `file: part: part`, skipping empty parts.
fn write_located(f: &mut fmt::Formatter<'_>, file: &Path, parts: &[&str]) -> fmt::Result {
    write!(f, "{}", file.display())?;
    for part in parts.iter().filter(|part| !part.is_empty()) {
        write!(f, ": {part}")?;
    }
    Ok(())
}

/// The usable content of one manifest file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedFile {
    pub objects: Vec<Object>,
    pub warnings: Vec<ManifestWarning>,
}

/// Parses and checks the text of one manifest file: YAML documents separated
/// by `---`, or JSON, each an object or a `kind: List` of them.
///
/// `file` only names the file in errors and warnings. Any error rejects the
/// whole file, and every error found is returned, not only the first.
pub fn parse_file(file: &Path, text: &str) -> Result<ParsedFile, Vec<ManifestError>> {
    let mut parser = FileParser {
        file,
        parsed: ParsedFile::default(),
        errors: Vec::new(),
    };
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let unnamed = format!("document {}", index + 1);
        match Value::deserialize(document) {
            Ok(value) => parser.document(value, unnamed),
            Err(error) => {
                // After a syntax error the deserializer repeats that same
                // error for ever instead of resuming at the next document.
                parser.error(unnamed, FieldError::new("", error.to_string()));
                break;
            }
        }
    }
    if parser.errors.is_empty() {
        Ok(parser.parsed)
    } else {
        Err(parser.errors)
    }
}

struct FileParser<'a> {
    file: &'a Path,
    parsed: ParsedFile,
    errors: Vec<ManifestError>,
}

impl FileParser<'_> {
    /// Takes one document; `unnamed` names it until its own name is known.
    fn document(&mut self, mut value: Value, unnamed: String) {
        // An empty document, e.g. after a trailing `---`.
        if value.is_null() {
            return;
        }
        // YAML merge keys (`<<: *defaults`) work in kubectl, so here too.
        if let Err(error) = value.apply_merge() {
            return self.error(unnamed, FieldError::new("", error.to_string()));
        }
        let header = match Header::read(&value) {
            Ok(header) => header,
            Err(error) => return self.error(unnamed, error),
        };
        if header.api_version == "v1" && header.kind == "List" {
            let items = value.get_mut("items").map(std::mem::take);
            return self.list(items, &unnamed);
        }
        let Some(name) = header.name else {
            let error = FieldError::new("metadata.name", "must be a non-empty string");
            return self.error(unnamed, error);
        };
        let label = ObjectKey {
            kind: header.kind.clone(),
            namespace: header.namespace,
            name,
        }
        .to_string();
        match Object::decode(&header.api_version, &header.kind, value) {
            Ok(Some(object)) => {
                let problems = object.check();
                if problems.is_empty() {
                    for warning in object.warnings() {
                        self.warning(label.clone(), warning);
                    }
                    self.parsed.objects.push(object);
                }
                for problem in problems {
                    self.error(label.clone(), problem);
                }
            }
            Ok(None) => self.parsed.warnings.push(ManifestWarning {
                file: self.file.to_owned(),
                object: label,
                field: String::new(),
                message: format!(
                    "kind {} ({}) is not supported yet, ignored",
                    header.kind, header.api_version
                ),
            }),
            Err(error) => self.error(label, error),
        }
    }

    /// Takes the items of a `kind: List`, as `kubectl get -o yaml` writes.
    fn list(&mut self, items: Option<Value>, unnamed: &str) {
        match items {
            Some(Value::Sequence(items)) => {
                for (index, item) in items.into_iter().enumerate() {
                    self.document(item, format!("{unnamed} items[{index}]"));
                }
            }
            None | Some(Value::Null) => {}
            Some(_) => self.error(
                unnamed.to_owned(),
                FieldError::new("items", "must be a list"),
            ),
        }
    }

    fn error(&mut self, object: String, error: FieldError) {
        self.errors.push(ManifestError {
            file: self.file.to_owned(),
            object,
            field: error.field,
            message: error.message,
        });
    }

    fn warning(&mut self, object: String, warning: FieldError) {
        self.parsed.warnings.push(ManifestWarning {
            file: self.file.to_owned(),
            object,
            field: warning.field,
            message: warning.message,
        });
    }
}

/// The fields read before a document can be decoded into its type.
struct Header {
    api_version: String,
    kind: String,
    name: Option<String>,
    namespace: Option<String>,
}

impl Header {
    fn read(value: &Value) -> Result<Self, FieldError> {
        if !value.is_mapping() {
            return Err(FieldError::new(
                "",
                "expected a Kubernetes object (a mapping)",
            ));
        }
        let metadata = |field: &str| {
            value
                .get("metadata")
                .and_then(|metadata| metadata.get(field))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        Ok(Self {
            api_version: required_str(value, "apiVersion")?,
            kind: required_str(value, "kind")?,
            name: metadata("name").filter(|name| !name.is_empty()),
            namespace: metadata("namespace"),
        })
    }
}

fn required_str(value: &Value, field: &str) -> Result<String, FieldError> {
    match value.get(field) {
        None | Some(Value::Null) => Err(FieldError::new(field, "missing")),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(_) => Err(FieldError::new(field, "must be a string")),
    }
}

impl Object {
    /// Decodes a document of the given apiVersion and kind, or returns None
    /// when weir does not handle that kind.
    pub(crate) fn decode(
        api_version: &str,
        kind: &str,
        value: Value,
    ) -> Result<Option<Self>, FieldError> {
        let mut object = match (api_version, kind) {
            ("v1", "Namespace") => Object::Namespace(from_value(value)?),
            ("v1", "Pod") => Object::Pod(from_value(value)?),
            ("v1", "Service") => Object::Service(from_value(value)?),
            ("discovery.k8s.io/v1", "EndpointSlice") => Object::EndpointSlice(from_value(value)?),
            ("security.istio.io/v1" | "security.istio.io/v1beta1", "AuthorizationPolicy") => {
                Object::AuthorizationPolicy(from_value(value)?)
            }
            (version, "VirtualService") if NETWORKING_VERSIONS.contains(&version) => {
                Object::VirtualService(from_value(value)?)
            }
            (version, "DestinationRule") if NETWORKING_VERSIONS.contains(&version) => {
                Object::DestinationRule(from_value(value)?)
            }
            _ => return Ok(None),
        };
        if !matches!(object, Object::Namespace(_)) {
            // As `kubectl apply` does for a manifest without a namespace.
            object
                .metadata_mut()
                .namespace
                .get_or_insert_with(|| "default".to_owned());
        }
        Ok(Some(object))
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Object::Namespace(_) => "Namespace",
            Object::Pod(_) => "Pod",
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Object::VirtualService(_) => "VirtualService",
            Object::DestinationRule(_) => "DestinationRule",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Namespace(namespace) => &namespace.metadata,
            Object::Pod(pod) => &pod.metadata,
            Object::Service(service) => &service.metadata,
            Object::EndpointSlice(slice) => &slice.metadata,
            Object::AuthorizationPolicy(policy) => &policy.metadata,
            Object::VirtualService(service) => &service.metadata,
            Object::DestinationRule(rule) => &rule.metadata,
        }
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Object::Namespace(namespace) => &mut namespace.metadata,
            Object::Pod(pod) => &mut pod.metadata,
            Object::Service(service) => &mut service.metadata,
            Object::EndpointSlice(slice) => &mut slice.metadata,
            Object::AuthorizationPolicy(policy) => &mut policy.metadata,
            Object::VirtualService(service) => &mut service.metadata,
            Object::DestinationRule(rule) => &mut rule.metadata,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let metadata = self.metadata();
        ObjectKey {
            kind: self.kind().to_owned(),
            namespace: metadata.namespace.clone(),
            name: metadata.name.clone().unwrap_or_default(),
        }
    }

    /// The checks beyond the types: addresses, ports, weir's own labels and
    /// annotations, and what istiod checks of a policy. Empty when the object
    /// is usable.
    pub fn check(&self) -> Vec<FieldError> {
        let mut problems = Vec::new();
        match self {
            Object::Namespace(namespace) => check_mesh_label(&namespace.metadata, &mut problems),
            Object::Pod(pod) => check_pod(pod, &mut problems),
            Object::Service(service) => check_service(service, &mut problems),
            Object::EndpointSlice(slice) => check_endpoint_slice(slice, &mut problems),
            Object::AuthorizationPolicy(policy) => {
                problems.extend(policy.translate().err().into_iter().flatten());
            }
            Object::VirtualService(service) => {
                problems.extend(service.translate().err().into_iter().flatten());
            }
            Object::DestinationRule(rule) => {
                problems.extend(rule.translate().err().into_iter().flatten());
            }
        }
        problems
    }

    /// What weir enforces differently from what a usable object says, such
    /// as the L7 rules of an AuthorizationPolicy.
    pub fn warnings(&self) -> Vec<FieldError> {
        match self {
            Object::AuthorizationPolicy(policy) => policy
                .translate()
                .map(|translation| translation.warnings)
                .unwrap_or_default(),
            Object::VirtualService(service) => service
                .translate()
                .map(|translation| translation.warnings)
                .unwrap_or_default(),
            Object::DestinationRule(rule) => rule
                .translate()
                .map(|translation| translation.warnings)
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

/// Decodes through serde_path_to_error so that errors name the field.
fn from_value<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value)
        .map_err(|error| FieldError::new(error.path().to_string(), error.inner().to_string()))
}

fn check_pod(pod: &Pod, problems: &mut Vec<FieldError>) {
    check_mesh_label(&pod.metadata, problems);
    for annotation in [EXCLUDE_PORTS_ANNOTATION, EXCLUDE_INBOUND_PORTS_ANNOTATION] {
        problems.extend(excluded_ports(&pod.metadata, annotation).err());
    }
    problems.extend(excluded_cidrs(&pod.metadata).err());
    for (i, container) in pod
        .spec
        .iter()
        .flat_map(|spec| &spec.containers)
        .enumerate()
    {
        for (j, port) in container.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{i}].ports[{j}].containerPort");
            check_port(field, port.container_port, problems);
        }
    }
    if let Some(status) = &pod.status {
        if let Some(ip) = &status.pod_ip {
            check_ip("status.podIP".to_owned(), ip, problems);
        }
        for (i, ip) in status.pod_ips.iter().flatten().enumerate() {
            check_ip(format!("status.podIPs[{i}].ip"), &ip.ip, problems);
        }
    }
}

fn check_service(service: &Service, problems: &mut Vec<FieldError>) {
    let Some(spec) = &service.spec else { return };
    // "None" makes a headless Service; empty means not allocated yet.
    let allocated = |ip: &&String| !ip.is_empty() && *ip != "None";
    if let Some(ip) = spec.cluster_ip.as_ref().filter(allocated) {
        check_ip("spec.clusterIP".to_owned(), ip, problems);
    }
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        if allocated(&ip) {
            check_ip(format!("spec.clusterIPs[{i}]"), ip, problems);
        }
    }
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        check_port(format!("spec.ports[{i}].port"), port.port, problems);
        if let Some(IntOrString::Int(target)) = port.target_port {
            check_port(format!("spec.ports[{i}].targetPort"), target, problems);
        }
    }
}

fn check_endpoint_slice(slice: &EndpointSlice, problems: &mut Vec<FieldError>) {
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        if let Some(number) = port.port {
            check_port(format!("ports[{i}].port"), number, problems);
        }
    }
    let wants_ipv4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        // FQDN slices hold host names, which weir does not resolve.
        _ => return,
    };
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        for (j, address) in endpoint.addresses.iter().enumerate() {
            if !matches!(address.parse::<IpAddr>(), Ok(ip) if ip.is_ipv4() == wants_ipv4) {
                problems.push(FieldError::new(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{address:?} is not an {} address", slice.address_type),
                ));
            }
        }
    }
}

fn check_mesh_label(metadata: &ObjectMeta, problems: &mut Vec<FieldError>) {
    let value = metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(MESH_LABEL));
    if let Some(value) = value.filter(|value| *value != MESH_ENABLED && *value != MESH_DISABLED) {
        problems.push(FieldError::new(
            format!("metadata.labels[{MESH_LABEL:?}]"),
            format!("{value:?} is not {MESH_ENABLED:?} or {MESH_DISABLED:?}"),
        ));
    }
}

fn check_ip(field: String, value: &str, problems: &mut Vec<FieldError>) {
    if value.parse::<IpAddr>().is_err() {
        problems.push(FieldError::new(
            field,
            format!("{value:?} is not an IP address"),
        ));
    }
}

fn check_port(field: String, port: i32, problems: &mut Vec<FieldError>) {
    if !(1..=65535).contains(&port) {
        problems.push(FieldError::new(
            field,
            format!("{port} is not a port number (1-65535)"),
        ));
    }
}

/// The ports of one of the pod's exclusion annotations
/// (`weir.dev/exclude-outbound-ports`, `weir.dev/exclude-inbound-ports`), at
/// most as many as the data path's map entry holds.
pub fn excluded_ports(metadata: &ObjectMeta, annotation: &str) -> Result<Vec<u16>, FieldError> {
    let field = annotation_field(annotation);
    let ports = annotation_list(metadata, annotation)
        .map(|item| match item.parse() {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(FieldError::new(
                &field,
                format!("{item:?} is not a port number (1-65535)"),
            )),
        })
        .collect::<Result<Vec<u16>, _>>()?;
    if ports.len() > MAX_EXCLUDED_PORTS {
        return Err(FieldError::new(
            field,
            format!(
                "{} ports listed, at most {MAX_EXCLUDED_PORTS} are supported",
                ports.len()
            ),
        ));
    }
    Ok(ports)
}

/// The networks of the pod's `weir.dev/exclude-outbound-cidrs` annotation,
/// with host bits cleared. The data path holds a limited number of IPv4 ones.
pub fn excluded_cidrs(metadata: &ObjectMeta) -> Result<Vec<IpNet>, FieldError> {
    let field = annotation_field(EXCLUDE_CIDRS_ANNOTATION);
    let cidrs = annotation_list(metadata, EXCLUDE_CIDRS_ANNOTATION)
        .map(|item| {
            item.parse::<IpNet>().map(|cidr| cidr.trunc()).map_err(|_| {
                FieldError::new(&field, format!("{item:?} is not a CIDR such as 10.0.0.0/8"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ipv4 = cidrs
        .iter()
        .filter(|cidr| matches!(cidr, IpNet::V4(_)))
        .count();
    if ipv4 > MAX_EXCLUDED_CIDRS {
        return Err(FieldError::new(
            field,
            format!("{ipv4} IPv4 CIDRs listed, at most {MAX_EXCLUDED_CIDRS} are supported"),
        ));
    }
    Ok(cidrs)
}

fn annotation_field(key: &str) -> String {
    format!("metadata.annotations[{key:?}]")
}

/// The items of a comma separated annotation; spaces and empty items are
/// allowed, so a trailing comma does no harm.
fn annotation_list<'a>(metadata: &'a ObjectMeta, key: &str) -> impl Iterator<Item = &'a str> {
    metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(key))
        .into_iter()
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|item| !item.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOKINFO: &str = include_str!("testdata/bookinfo.yaml");

    fn parse(text: &str) -> Result<ParsedFile, Vec<ManifestError>> {
        parse_file(Path::new("test.yaml"), text)
    }

    /// The single error that `text` gives.
    fn only_error(text: &str) -> ManifestError {
        match parse(text) {
            Err(errors) if errors.len() == 1 => errors.into_iter().next().unwrap(),
            other => panic!("expected one error, got {other:?}"),
        }
    }

    const POD: &str = "
apiVersion: v1
kind: Pod
metadata:
  name: ratings-v1
  namespace: default
spec:
  containers:
  - name: ratings
    image: docker.io/istio/examples-bookinfo-ratings-v1:1.20.2
";

    #[test]
    fn parses_every_document_and_skips_empty_ones() {
        let parsed = parse(BOOKINFO).unwrap();
        let keys: Vec<String> = parsed.objects.iter().map(|o| o.key().to_string()).collect();
        assert!(keys.contains(&"Namespace default".to_owned()), "{keys:?}");
        assert!(keys.contains(&"Pod default/productpage-v1-6b746f74dc-x2bkv".to_owned()));
        assert!(keys.contains(&"Service default/reviews".to_owned()));
        assert!(keys.contains(&"EndpointSlice default/details-7xkq2".to_owned()));
        assert_eq!(keys.len(), 12, "{keys:?}");
        assert_eq!(parsed.warnings, []);

        let text = format!("---\n\n---\n# only a comment\n---{POD}---\n");
        assert_eq!(parse(&text).unwrap().objects.len(), 1);
    }

    #[test]
    fn parses_json() {
        let text = r#"{"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "bookinfo", "labels": {"weir.dev/mesh": "enabled"}}}"#;
        let parsed = parse(text).unwrap();
        assert_eq!(parsed.objects[0].key().to_string(), "Namespace bookinfo");
    }

    #[test]
    fn takes_the_items_of_a_list() {
        let text = "
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: default}
- apiVersion: v1
  kind: Service
  metadata: {name: ratings}
  spec:
    ports: [{name: http, port: 9080}]
- apiVersion: v1
  kind: Pod
  metadata: {}
";
        let errors = parse(text).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "test.yaml: document 1 items[2]: metadata.name: must be a non-empty string"
        );

        let text = text.replace("metadata: {}", "metadata: {name: ratings-v1}");
        let keys: Vec<String> = parse(&text)
            .unwrap()
            .objects
            .iter()
            .map(|o| o.key().to_string())
            .collect();
        // A namespaced object without a namespace lands in "default".
        assert_eq!(
            keys,
            [
                "Namespace default",
                "Service default/ratings",
                "Pod default/ratings-v1"
            ]
        );
    }

    #[test]
    fn wrong_type_names_file_object_and_field() {
        let text = format!("{POD}    ports:\n    - containerPort: \"abc\"\n");
        let error = only_error(&text);
        assert_eq!(error.file, Path::new("test.yaml"));
        assert_eq!(error.object, "Pod default/ratings-v1");
        assert_eq!(error.field, "spec.containers[0].ports[0].containerPort");
        assert!(error.message.contains("invalid type"), "{error}");
        assert!(error.to_string().starts_with(
            "test.yaml: Pod default/ratings-v1: spec.containers[0].ports[0].containerPort: "
        ));
    }

    #[test]
    fn bad_pod_ip_is_an_error() {
        let text = format!("{POD}status:\n  podIP: 10.244.1.300\n");
        let error = only_error(&text);
        assert_eq!(error.field, "status.podIP");
        assert_eq!(error.message, "\"10.244.1.300\" is not an IP address");

        let text = format!("{POD}status:\n  podIPs:\n  - ip: 10.244.1.3\n  - ip: fd00::zz\n");
        assert_eq!(only_error(&text).field, "status.podIPs[1].ip");
    }

    #[test]
    fn bad_annotations_and_labels_are_errors() {
        let with_metadata = |line: &str| {
            POD.replace(
                "  namespace: default\n",
                &format!("  namespace: default\n{line}\n"),
            )
        };

        let bad_port =
            with_metadata("  annotations: {weir.dev/exclude-outbound-ports: \"5432, 65536\"}");
        let error = only_error(&bad_port);
        assert_eq!(
            error.field,
            "metadata.annotations[\"weir.dev/exclude-outbound-ports\"]"
        );
        assert_eq!(error.message, "\"65536\" is not a port number (1-65535)");

        let bad_cidr = with_metadata(
            "  annotations: {weir.dev/exclude-outbound-cidrs: \"10.0.0.0/8,192.168.1.5/33\"}",
        );
        assert_eq!(
            only_error(&bad_cidr).to_string(),
            "test.yaml: Pod default/ratings-v1: metadata.annotations[\"weir.dev/exclude-outbound-cidrs\"]: \
             \"192.168.1.5/33\" is not a CIDR such as 10.0.0.0/8"
        );

        let ports: Vec<String> = (1..=17).map(|port| port.to_string()).collect();
        let too_many = with_metadata(&format!(
            "  annotations: {{weir.dev/exclude-outbound-ports: \"{}\"}}",
            ports.join(",")
        ));
        assert_eq!(
            only_error(&too_many).message,
            "17 ports listed, at most 16 are supported"
        );

        let cidrs: Vec<String> = (0..9).map(|i| format!("10.{i}.0.0/16")).collect();
        let too_many = with_metadata(&format!(
            "  annotations: {{weir.dev/exclude-outbound-cidrs: \"{},fd00::/8\"}}",
            cidrs.join(",")
        ));
        assert_eq!(
            only_error(&too_many).message,
            "9 IPv4 CIDRs listed, at most 8 are supported"
        );

        let bad_label = with_metadata("  labels: {weir.dev/mesh: \"yes\"}");
        let error = only_error(&bad_label);
        assert_eq!(error.field, "metadata.labels[\"weir.dev/mesh\"]");
        assert_eq!(error.message, "\"yes\" is not \"enabled\" or \"disabled\"");
    }

    #[test]
    fn exclusions_parse() {
        let text = POD.replace(
            "  namespace: default\n",
            "  namespace: default\n  annotations:\n    weir.dev/exclude-outbound-ports: \"5432, 6379,\"\n    \
             weir.dev/exclude-outbound-cidrs: \"10.1.2.3/8, 192.168.1.5/32,fd00::/8\"\n",
        );
        let parsed = parse(&text).unwrap();
        let metadata = parsed.objects[0].metadata();
        assert_eq!(
            excluded_ports(metadata, EXCLUDE_PORTS_ANNOTATION).unwrap(),
            [5432, 6379]
        );
        let cidrs: Vec<String> = excluded_cidrs(metadata)
            .unwrap()
            .iter()
            .map(IpNet::to_string)
            .collect();
        assert_eq!(cidrs, ["10.0.0.0/8", "192.168.1.5/32", "fd00::/8"]);
    }

    #[test]
    fn bad_cluster_ip_is_an_error_but_none_is_headless() {
        let service = |cluster_ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews}}\nspec:\n  clusterIP: \"{cluster_ip}\"\n"
            )
        };
        assert!(parse(&service("None")).is_ok());
        assert!(parse(&service("")).is_ok());
        assert!(parse(&service("fd00:10:96::a")).is_ok());
        let error = only_error(&service("10.96.0.256"));
        assert_eq!(
            (error.object.as_str(), error.field.as_str()),
            ("Service reviews", "spec.clusterIP")
        );
    }

    #[test]
    fn unsupported_kind_is_a_warning() {
        let text = format!(
            "{POD}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
"
        );
        let parsed = parse(&text).unwrap();
        assert_eq!(parsed.objects.len(), 1);
        assert_eq!(
            parsed
                .warnings
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["test.yaml: PeerAuthentication istio-system/default: \
              kind PeerAuthentication (security.istio.io/v1) is not supported yet, ignored"]
        );
    }

    const POLICY: &str = "
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-foo, namespace: bar}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {namespaces: [foo], ipBlocks: [10.244.0.0/16]}}]
    to: [{operation: {ports: [\"9080\"]}}]
";

    #[test]
    fn parses_authorization_policies_of_both_versions() {
        let beta = POLICY
            .replace("security.istio.io/v1", "security.istio.io/v1beta1")
            .replace(", namespace: bar", "");
        let text = format!("{POLICY}---{beta}");
        let parsed = parse(&text).unwrap();
        let keys: Vec<String> = parsed.objects.iter().map(|o| o.key().to_string()).collect();
        assert_eq!(
            keys,
            [
                "AuthorizationPolicy bar/allow-foo",
                "AuthorizationPolicy default/allow-foo"
            ]
        );
        assert_eq!(parsed.warnings, []);
        // As `kubectl get -o yaml` gives it, with istiod's status.
        let status =
            format!("{POLICY}status: {{validationMessages: [{{type: {{code: IST0001}}}}]}}\n");
        assert!(parse(&status).is_ok());
    }

    #[test]
    fn policy_errors_name_the_field() {
        let bad_cidr = POLICY.replace("10.244.0.0/16", "10.244.0.0/16, 10.244.0.0/40");
        assert_eq!(
            only_error(&bad_cidr).to_string(),
            "test.yaml: AuthorizationPolicy bar/allow-foo: spec.rules[0].from[0].source.ipBlocks[1]: \
             \"10.244.0.0/40\" is not an IP address or a CIDR"
        );

        // Fields that weir does not know are reported, never ignored.
        let unknown = POLICY.replace("namespaces: [foo]", "serviceAccounts: [foo/sleep]");
        let error = only_error(&unknown);
        assert_eq!(error.field, "spec.rules[0].from[0].source.serviceAccounts");
        assert!(
            error.message.starts_with("unknown field `serviceAccounts`"),
            "{error}"
        );

        // Kubernetes would reject a number where Istio's schema has a string.
        let number = POLICY.replace("[\"9080\"]", "[9080]");
        let error = only_error(&number);
        assert_eq!(error.field, "spec.rules[0].to[0].operation.ports[0]");
        assert!(error.message.contains("invalid type"), "{error}");

        let custom = POLICY.replace("spec:\n", "spec:\n  action: CUSTOM\n");
        assert_eq!(
            only_error(&custom).to_string(),
            "test.yaml: AuthorizationPolicy bar/allow-foo: spec.action: \
             CUSTOM (external authorization) is not supported"
        );

        let when = POLICY.replace(
            "    to:",
            "    when: [{key: source.ip, values: [10.0.0.1]}, {key: request.size, values: [\"1\"]}]\n    to:",
        );
        let error = only_error(&when);
        assert_eq!(
            (error.field.as_str(), error.message.as_str()),
            (
                "spec.rules[0].when[1].key",
                "\"request.size\" is not a key that Istio knows"
            )
        );
    }

    #[test]
    fn l7_policy_fields_are_warnings() {
        let text = POLICY.replace("ports: [\"9080\"]", "ports: [\"9080\"], methods: [GET]");
        let parsed = parse(&text).unwrap();
        assert_eq!(parsed.objects.len(), 1, "the policy is used");
        let [warning] = parsed.warnings.as_slice() else {
            panic!("{:?}", parsed.warnings)
        };
        assert_eq!(warning.object, "AuthorizationPolicy bar/allow-foo");
        assert_eq!(warning.field, "spec.rules[0].to[0].operation.methods");
        assert_eq!(
            warning.message,
            "methods is an L7 attribute, which weir cannot check: \
             as in Istio's ztunnel, this ALLOW rule never matches (allows less than written)"
        );
    }

    const ROUTES: &str = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: bookinfo}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {end-user: {exact: jason}}
      uri: {prefix: /reviews}
    route:
    - destination: {host: reviews, subset: v2}
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: \"gateway-error,connect-failure,503\"}
    timeout: 10s
  - route:
    - {destination: {host: reviews.other, subset: v1}, weight: 90}
    - {destination: {host: ratings.bookinfo.svc.cluster.local, port: {number: 9080}}, weight: 10}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}}
";

    #[test]
    fn parses_virtual_services_and_destination_rules_of_every_version() {
        let alpha = ROUTES.replace(
            "networking.istio.io/v1beta1",
            "networking.istio.io/v1alpha3",
        );
        for text in [ROUTES, alpha.as_str()] {
            let parsed = parse(text).unwrap();
            assert_eq!(parsed.warnings, []);
            let Object::VirtualService(vs) = &parsed.objects[0] else {
                panic!("{:?}", parsed.objects[0])
            };
            let vs = vs.translate().unwrap().value;
            assert_eq!(vs.hosts, ["reviews.bookinfo.svc.cluster.local"]);
            assert!(vs.mesh);
            let rule = &vs.http[0];
            assert_eq!(rule.timeout, Some(std::time::Duration::from_secs(10)));
            let retries = rule.retries.as_ref().unwrap();
            assert_eq!(retries.attempts, 3);
            assert!(retries.retry_on.gateway_error && retries.retry_on.connect_failure);
            assert_eq!(retries.retry_on.retriable_status_codes, [503]);
            let hosts: Vec<&str> = vs.http[1].routes.iter().map(|r| r.host.as_str()).collect();
            assert_eq!(
                hosts,
                [
                    "reviews.other.svc.cluster.local",
                    "ratings.bookinfo.svc.cluster.local"
                ]
            );
            assert_eq!(vs.http[1].routes[1].port, Some(9080));
            let Object::DestinationRule(dr) = &parsed.objects[1] else {
                panic!()
            };
            let dr = dr.translate().unwrap().value;
            assert_eq!(dr.host, "reviews.bookinfo.svc.cluster.local");
            assert_eq!(dr.load_balancer, Some(crate::routing::LoadBalancer::Random));
            assert_eq!(
                dr.subset("v2").unwrap().load_balancer,
                Some(crate::routing::LoadBalancer::RoundRobin)
            );
        }
        assert!(
            parse(&ROUTES.replace("networking.istio.io/v1\n", "networking.istio.io/v2\n"))
                .unwrap()
                .warnings[0]
                .message
                .contains("not supported yet")
        );
    }

    #[test]
    fn connection_pools_parse_with_istio_defaults() {
        // Istio's samples/httpbin/destination-rule circuit breaker.
        let text = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
        http2MaxRequests: 0
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
";
        let parsed = parse(text).unwrap();
        assert_eq!(parsed.warnings, []);
        let Object::DestinationRule(dr) = &parsed.objects[0] else {
            panic!()
        };
        let dr = dr.translate().unwrap().value;
        assert_eq!(
            dr.outlier_detection,
            Some(crate::routing::OutlierDetection {
                consecutive_5xx_errors: 1,
                consecutive_gateway_errors: 0,
                interval: std::time::Duration::from_secs(1),
                base_ejection_time: std::time::Duration::from_secs(180),
                max_ejection_percent: 100,
            })
        );
        let pool = dr.connection_pool.unwrap();
        assert_eq!(
            pool,
            crate::routing::ConnectionPool {
                max_connections: Some(1),
                max_pending_requests: Some(1),
                max_requests_per_connection: Some(1),
                // 0 is Istio's "no limit".
                max_requests: None,
                max_retries: None,
                connect_timeout: None,
            }
        );
        let error = only_error(&text.replace("maxConnections: 1", "maxConnections: -1"));
        assert_eq!(
            (error.field.as_str(), error.message.as_str()),
            (
                "spec.trafficPolicy.connectionPool.tcp.maxConnections",
                "must not be negative"
            )
        );
    }

    #[test]
    fn routing_errors_name_the_field() {
        let cases = [
            (
                "timeout: 10s",
                "timeout: 10 seconds",
                "spec.http[0].timeout",
                "\"10 seconds\" is not a duration such as 1s or 100ms",
            ),
            (
                "{exact: jason}",
                "{exact: jason, prefix: j}",
                "spec.http[0].match[0].headers[\"end-user\"]",
                "exactly one of exact, prefix and regex must be set",
            ),
            (
                "{prefix: /reviews}",
                "{regex: \"/reviews[\"}",
                "spec.http[0].match[0].uri.regex",
                "",
            ),
            (
                "connect-failure,503",
                "connect-failure,sometimes",
                "spec.http[0].retries.retryOn",
                "\"sometimes\" is not a retry condition that Istio knows, nor a status code",
            ),
            (
                "weight: 90",
                "weight: -90",
                "spec.http[1].route[0].weight",
                "must not be negative",
            ),
            (
                "simple: RANDOM",
                "simple: FASTEST",
                "spec.trafficPolicy.loadBalancer.simple",
                "\"FASTEST\" is not ROUND_ROBIN, LEAST_REQUEST, RANDOM or PASSTHROUGH",
            ),
            (
                "simple: RANDOM",
                "simple: RANDOM, consistentHash: {useSourceIp: true}",
                "spec.trafficPolicy.loadBalancer",
                "only one of simple and consistentHash may be set",
            ),
            (
                "simple: RANDOM",
                "consistentHash: {httpHeaderName: x-user, useSourceIp: true}",
                "spec.trafficPolicy.loadBalancer.consistentHash",
                "exactly one of httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName must be set",
            ),
            (
                "{name: v1,",
                "{name: v2,",
                "spec.subsets[1].name",
                "\"v2\" is defined twice",
            ),
        ];
        for (from, to, field, message) in cases {
            assert!(ROUTES.contains(from), "{from}");
            let error = only_error(&ROUTES.replace(from, to));
            assert_eq!(error.field, field, "{error}");
            assert!(error.message.starts_with(message), "{error}");
        }
        let both = ROUTES.replace(
            "    timeout: 10s\n",
            "    timeout: 10s\n    redirect: {uri: /elsewhere}\n",
        );
        let error = only_error(&both);
        assert_eq!(
            (error.field.as_str(), error.message.as_str()),
            (
                "spec.http[0]",
                "only one of route, redirect and directResponse may be set"
            )
        );
        let code = ROUTES.replace(
            "  - route:\n    - {destination: {host: reviews.other",
            "  - redirect: {uri: /x, redirectCode: 200}\n  - route:\n    - {destination: {host: reviews.other",
        );
        assert_eq!(
            only_error(&code).field,
            "spec.http[1].redirect.redirectCode"
        );
        let header = ROUTES.replace(
            "    timeout: 10s\n",
            "    timeout: 10s\n    headers: {request: {set: {\"bad header\": x}}}\n",
        );
        assert_eq!(
            only_error(&header).field,
            "spec.http[0].headers.request.set[\"bad header\"]"
        );
        // Fields that Istio does not have are errors too.
        let error = only_error(&ROUTES.replace("timeout: 10s", "timeout: 10s\n    timeOut: 1s"));
        assert_eq!(error.field, "spec.http[0].timeOut");
        assert!(
            error.message.starts_with("unknown field `timeOut`"),
            "{error}"
        );
    }

    #[test]
    fn unimplemented_routing_fields_are_warnings() {
        let text = ROUTES
            .replace(
                "    timeout: 10s\n",
                "    timeout: 10s\n    delegate: {name: reviews-v2}\n    mirror: {host: shadow}\n",
            )
            .replace(
                "simple: RANDOM}",
                "simple: RANDOM}, portLevelSettings: [{port: {number: 80}}]",
            )
            .replace(
                "spec:\n  hosts: [reviews]\n",
                "spec:\n  hosts: [reviews]\n  tcp: [{route: [{destination: {host: reviews}}]}]\n",
            );
        let parsed = parse(&text).unwrap();
        assert_eq!(parsed.objects.len(), 2, "the objects are used");
        let warnings: Vec<(&str, &str)> = parsed
            .warnings
            .iter()
            .map(|w| (w.field.as_str(), w.message.as_str()))
            .collect();
        assert_eq!(
            warnings,
            [
                (
                    "spec.tcp",
                    "not implemented in weir yet: these routes are ignored, the traffic is forwarded at L4"
                ),
                (
                    "spec.http[0].delegate",
                    "not implemented in weir yet: ignored"
                ),
                (
                    "spec.trafficPolicy.portLevelSettings",
                    "not implemented in weir yet: ignored"
                ),
            ]
        );
        // A gateway's VirtualService is loaded but is not for the mesh.
        let gateway = ROUTES.replace(
            "  hosts: [reviews]\n",
            "  hosts: [reviews]\n  gateways: [bookinfo-gateway]\n",
        );
        let Object::VirtualService(vs) = &parse(&gateway).unwrap().objects[0] else {
            panic!()
        };
        assert!(!vs.translate().unwrap().value.mesh);
    }

    #[test]
    fn documents_need_kind_api_version_and_name() {
        let missing_kind = only_error("apiVersion: v1\nmetadata: {name: x}\n---\n");
        assert_eq!(
            missing_kind.to_string(),
            "test.yaml: document 1: kind: missing"
        );
        let missing_version = only_error("---\n---\nkind: Pod\nmetadata: {name: x}\n");
        assert_eq!(
            missing_version.to_string(),
            "test.yaml: document 2: apiVersion: missing"
        );
        let missing_name =
            only_error("apiVersion: apps/v1\nkind: Deployment\nmetadata: {namespace: default}\n");
        assert_eq!(
            missing_name.to_string(),
            "test.yaml: document 1: metadata.name: must be a non-empty string"
        );
        let not_an_object = only_error("- just\n- a list\n");
        assert_eq!(
            not_an_object.to_string(),
            "test.yaml: document 1: expected a Kubernetes object (a mapping)"
        );
    }

    #[test]
    fn syntax_error_names_the_document() {
        let error = only_error(&format!("{POD}---\nkind: Pod\nmetadata: [\n"));
        assert_eq!(
            (error.object.as_str(), error.field.as_str()),
            ("document 2", "")
        );
        assert!(error.message.contains("line"), "{error}");
    }

    #[test]
    fn endpoint_slice_addresses_must_match_the_address_type() {
        let text = "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: details-abcde, labels: {kubernetes.io/service-name: details}}
addressType: IPv4
endpoints:
- addresses: [10.244.63.11]
- addresses: [\"fd00::11\"]
";
        let error = only_error(text);
        assert_eq!(error.object, "EndpointSlice details-abcde");
        assert_eq!(error.field, "endpoints[1].addresses[0]");
        assert_eq!(error.message, "\"fd00::11\" is not an IPv4 address");
    }
}
