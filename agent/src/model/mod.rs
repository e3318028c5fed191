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
//!   manifests, and backs `weir validate`.

pub mod cluster;
pub mod manifests;
pub mod objects;

pub use cluster::{Cluster, Endpoint, Service, ServicePort, Workload, WorkloadKey};
pub use manifests::{LoadReport, ManifestDir, ManifestWatch, validate, watch};
pub use objects::{
    FieldError, ManifestError, ManifestWarning, Object, ObjectKey, ParsedFile, parse_file,
};
