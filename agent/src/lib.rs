//! weir, the node agent: eBPF redirect of enrolled pods' connections into a
//! per-node proxy. `main.rs` is the command line; the pieces live here so
//! that the test sandbox can share them.
//!
//! The data path, in the order a connection meets it:
//! - `datapath`: the eBPF programs and their maps (connect4/6 redirect);
//! - `enrollment`: which pods are redirected, kept in step with `model`;
//! - `inpod`: per-pod socket factories inside each pod's namespace, and
//!   finding that namespace (`cni`: the CNI plugin names it at pod creation);
//! - `proxy`: the outbound listener, destination choice and byte copying;
//! - `policy`: Istio's AuthorizationPolicy, decided per connection;
//! - `routing`: Istio's VirtualService and DestinationRule, applied per
//!   HTTP request by `proxy::http`;
//! - `metrics` and `admin`: what the agent reports.

pub mod admin;
pub mod cgroup;
pub mod cni;
pub mod datapath;
pub mod enrollment;
pub mod inpod;
pub mod iptables;
pub mod metrics;
pub mod model;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod routing;
pub mod run;
