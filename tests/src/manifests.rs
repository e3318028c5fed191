//! The manifests directory the agents read with `--manifests`: Kubernetes
//! objects as YAML, one file per object. Files are replaced atomically, so
//! an agent watching the directory never reads half a file.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

use crate::pod::PodSpec;

pub(crate) struct Manifests {
    dir: PathBuf,
}

impl Manifests {
    /// The directory is made by the caller, which tracks what it made.
    pub(crate) fn new(dir: PathBuf) -> Manifests {
        Manifests { dir }
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `contents` to `file_name` through a rename. The temporary name
    /// starts with a dot and ends in `.tmp`, so a directory scan skips it.
    pub(crate) fn write(&self, file_name: &str, contents: &str) -> Result<()> {
        let path = self.dir.join(file_name);
        let temporary = self.dir.join(format!(".{file_name}.tmp"));
        fs::write(&temporary, contents)
            .with_context(|| format!("cannot write {}", temporary.display()))?;
        fs::rename(&temporary, &path).with_context(|| {
            format!(
                "cannot rename {} to {}",
                temporary.display(),
                path.display()
            )
        })
    }

    pub(crate) fn write_object(&self, file_name: &str, object: &Value) -> Result<()> {
        let yaml = serde_yaml::to_string(object)
            .with_context(|| format!("cannot render {file_name} as YAML"))?;
        self.write(file_name, &yaml)
    }

    pub(crate) fn remove(&self, file_name: &str) -> Result<()> {
        let path = self.dir.join(file_name);
        fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))
    }
}

pub(crate) fn namespace_file(name: &str) -> String {
    format!("namespace-{name}.yaml")
}

pub(crate) fn pod_file(namespace: &str, name: &str) -> String {
    format!("pod-{namespace}-{name}.yaml")
}

pub(crate) fn service_file(namespace: &str, name: &str) -> String {
    format!("service-{namespace}-{name}.yaml")
}

pub(crate) fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": name, "labels": string_map(labels) },
    })
}

/// A running pod as the API server would show it once scheduled on
/// `node_name`: its address and readiness are in `status`.
pub(crate) fn pod(spec: &PodSpec, ip: Ipv4Addr, node_name: &str, host_ip: Ipv4Addr) -> Value {
    let ports: Vec<Value> = spec
        .ports
        .iter()
        .map(|(name, port)| json!({ "name": name, "containerPort": port, "protocol": "TCP" }))
        .collect();
    let ready = if spec.ready { "True" } else { "False" };
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": spec.labels,
            "annotations": spec.annotations,
        },
        "spec": {
            "nodeName": node_name,
            "serviceAccountName": spec.service_account,
            "containers": [{ "name": spec.name, "image": "weir.dev/sandbox-app", "ports": ports }],
        },
        "status": {
            "phase": "Running",
            "hostIP": host_ip.to_string(),
            "podIP": ip.to_string(),
            "podIPs": [{ "ip": ip.to_string() }],
            "conditions": [
                { "type": "Ready", "status": ready },
                { "type": "ContainersReady", "status": ready },
            ],
        },
    })
}

pub(crate) fn service(
    port_name: &str,
    name: &str,
    namespace: &str,
    cluster_ip: Ipv4Addr,
    port: u16,
    target_port: u16,
    selector: &[(&str, &str)],
) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip.to_string(),
            "clusterIPs": [cluster_ip.to_string()],
            "selector": string_map(selector),
            "ports": [{ "name": port_name, "port": port, "targetPort": target_port, "protocol": "TCP" }],
        },
    })
}

fn string_map(pairs: &[(&str, &str)]) -> Value {
    let map: Map<String, Value> = pairs
        .iter()
        .map(|&(key, value)| (key.to_owned(), Value::from(value)))
        .collect();
    Value::Object(map)
}
