//! Network-namespace sandboxes for weir's integration tests, its demo and
//! its benchmarks: a two-node cluster on one machine, as DESIGN.md's "The
//! sandbox" describes.
//!
//! ```text
//!                 switch namespace (bridge br0)
//!           10.10.0.63 /              \ 10.10.0.64
//!   node xuegod63 (cni0 10.S.63.1)   node xuegod64 (cni0 10.S.64.1)
//!        |        |                        |
//!      pod      pod  (10.S.63.2, …)      pod  (10.S.64.2, …)
//! ```
//!
//! `S` is [`SandboxOptions::subnet`] (244 for the demo). Each node routes to
//! the other node's pods and has no default route, so nothing leaves the
//! sandbox; nothing is added to the root network namespace. Services get
//! ClusterIPs in 10.96.0.0/16.
//!
//! Besides namespaces, a sandbox owns `/run/weir-sandbox/<tag>/` (the
//! `manifests/` and `netns/` directories its agents read, and agent logs)
//! and the cgroup `<cgroup2>/weir-<tag>/`, which the agents attach their
//! programs to. [`Sandbox::new`] moves the calling process into that
//! cgroup's `pods/` child, so the sockets a test opens from its pods pass
//! through the sandbox's programs and no one else's. A process therefore
//! holds one sandbox at a time; `Sandbox::new` waits for the previous one
//! to drop.
//!
//! Everything needs root. Agents are the `weir` binary: see
//! [`agent_binary`].

mod agent;
mod apiserver;
mod cgroup;
mod command;
mod http;
mod manifests;
mod pod;
mod prometheus;
mod sandbox;
mod socket;
mod topology;

pub use agent::{Agent, agent_binary};
pub use apiserver::ApiServer;
pub use http::{HttpResponse, http_get};
pub use pod::{Pause, Pod, PodSpec};
pub use prometheus::{Sample, metric_value, samples};
pub use sandbox::{Sandbox, SandboxOptions, unique_tag};
pub use topology::{Addressing, Node, NodeId};
pub use weir::netns::NetNs;
