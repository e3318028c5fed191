//! The agent's data model: Kubernetes objects, from whichever source, turned
//! into one [`Cluster`] snapshot.
//!
//! - [`objects`] decodes and checks objects from YAML or JSON: Namespace,
//!   Pod, Service and EndpointSlice into k8s-openapi types, the same types a
//!   Kubernetes API watch yields, and Istio's AuthorizationPolicy into weir's
//!   mirror of Istio's type;
//! - [`cluster`] builds the snapshot that the data path and the proxy read:
//!   workloads, enrollment, services and their endpoints, and authorization
//!   policies;
//! - [`manifests`] is the source that reads and watches a directory of
//!   manifests, and backs `weir validate`;
//! - [`kube`] is the source that lists and watches the Kubernetes API;
//! - [`source`] is what either source hands the agent.

pub mod cluster;
pub mod kube;
pub mod manifests;
pub mod objects;
pub mod source;

pub use cluster::{BuildOptions, Cluster, Endpoint, Service, ServicePort, Workload, WorkloadKey};
pub use manifests::{LoadReport, ManifestDir, validate};
pub use objects::{
    FieldError, ManifestError, ManifestWarning, Object, ObjectKey, ParsedFile, parse_file,
};
pub use source::ModelWatch;
