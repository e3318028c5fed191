//! weir's chained CNI plugin, and the protocol it speaks with the agent.
//!
//! The container runtime calls the plugin for every pod sandbox it makes,
//! after the main plugin (Calico, Cilium, bridge, …) has given the pod its
//! addresses, and before any app container starts. On ADD the plugin tells
//! the node's agent the pod's name, network namespace and addresses over a
//! unix socket, and returns only once the agent has enrolled the pod, so a
//! pod's first `connect()` is already intercepted. This is how istio-cni
//! closes the same startup race for ambient mode.
//!
//! - [`protocol`]: one JSON request, one JSON reply, per connection;
//! - [`spec`]: the CNI side: environment, network configuration, results
//!   and errors as the CNI specification defines them;
//! - [`plugin`]: ADD, DEL, CHECK and VERSION;
//! - [`install`]: what the DaemonSet's init container runs to put the
//!   plugin on a node (`weir-cni install` / `uninstall`).

pub mod install;
pub mod plugin;
pub mod protocol;
pub mod spec;
