//! weir, the node agent: eBPF redirect of enrolled pods' connections into a
//! per-node proxy. `main.rs` is the command line; the pieces live here so
//! that the test sandbox can share them.

pub mod netns;
