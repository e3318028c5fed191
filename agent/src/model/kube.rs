//! The Kubernetes API source: every kind the model uses is listed, then
//! watched, with kube-rs's watcher, which relists after a `410 Gone` or a
//! broken watch and backs off while the API server is unreachable.
//!
//! Each kind keeps a reflector of its own here rather than kube-rs's store,
//! because what it keeps is the last *good* version of each object: an
//! object that fails the same checks a manifest would is logged, counted
//! and skipped, and the version before it stays in force. Objects then go
//! through exactly the path manifests do, into [`Cluster::build_with`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Debug;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, Config, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use super::cluster::{BuildOptions, Cluster};
use super::objects::{FieldError, Object, ObjectKey};
use super::source::ModelWatch;

/// A kind the agent lists and watches, as RBAC names it: the ClusterRole in
/// `daemonset/` must grant get, list and watch on each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchedKind {
    /// The API group; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub plural: &'static str,
    /// A kind of a CRD that may not be installed. Without it the source
    /// carries on as if there were no such objects.
    pub optional: bool,
}

impl WatchedKind {
    const fn core(kind: &'static str, plural: &'static str) -> Self {
        Self {
            group: "",
            version: "v1",
            kind,
            plural,
            optional: false,
        }
    }

    /// The kind as a dynamic resource, for Istio's CRDs.
    fn resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.to_owned(),
            version: self.version.to_owned(),
            api_version: self.api_version(),
            kind: self.kind.to_owned(),
            plural: self.plural.to_owned(),
        }
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

pub const NAMESPACES: WatchedKind = WatchedKind::core("Namespace", "namespaces");
/// All pods, not only this node's: their IPs and service accounts are the
/// identity of every peer, and they back every Service's endpoints. The
/// node's own pods are among them, so one watch serves both needs.
pub const PODS: WatchedKind = WatchedKind::core("Pod", "pods");
pub const SERVICES: WatchedKind = WatchedKind::core("Service", "services");
pub const ENDPOINT_SLICES: WatchedKind = WatchedKind {
    group: "discovery.k8s.io",
    version: "v1",
    kind: "EndpointSlice",
    plural: "endpointslices",
    optional: false,
};
pub const AUTHORIZATION_POLICIES: WatchedKind = WatchedKind {
    group: "security.istio.io",
    version: "v1",
    kind: "AuthorizationPolicy",
    plural: "authorizationpolicies",
    optional: true,
};

pub const VIRTUAL_SERVICES: WatchedKind = WatchedKind {
    group: "networking.istio.io",
    version: "v1",
    kind: "VirtualService",
    plural: "virtualservices",
    optional: true,
};
pub const DESTINATION_RULES: WatchedKind = WatchedKind {
    group: "networking.istio.io",
    version: "v1",
    kind: "DestinationRule",
    plural: "destinationrules",
    optional: true,
};

/// Everything the source watches.
pub const WATCHED: [WatchedKind; 7] = [
    NAMESPACES,
    PODS,
    SERVICES,
    ENDPOINT_SLICES,
    AUTHORIZATION_POLICIES,
    VIRTUAL_SERVICES,
    DESTINATION_RULES,
];

/// Changes that come together (a Deployment's pods, an EndpointSlice after
/// its pods) are built into one snapshot.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// A client from `kubeconfig` if given, else as kube-rs infers it: the
/// `KUBECONFIG` variable, `~/.kube/config`, or the pod's service account.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => Config::infer().await.context(
            "no kubeconfig given, and none found (KUBECONFIG, ~/.kube/config, in-cluster)",
        )?,
    };
    Ok(Client::try_from(config)?)
}

/// Starts watching the API server. The watch is synced once every kind has
/// been listed in full; until then the snapshot is empty. Errors are logged
/// and retried with backoff for as long as the watch lives.
pub fn watch(client: Client, options: BuildOptions) -> ModelWatch {
    let reflectors = Arc::new(Reflectors::default());
    let mut tasks = JoinSet::new();
    tasks.spawn(reflect(
        Api::<Namespace>::all(client.clone()),
        NAMESPACES,
        reflectors.clone(),
    ));
    tasks.spawn(reflect(
        Api::<Pod>::all(client.clone()),
        PODS,
        reflectors.clone(),
    ));
    tasks.spawn(reflect(
        Api::<Service>::all(client.clone()),
        SERVICES,
        reflectors.clone(),
    ));
    tasks.spawn(reflect(
        Api::<EndpointSlice>::all(client.clone()),
        ENDPOINT_SLICES,
        reflectors.clone(),
    ));
    tasks.spawn(reflect(
        Api::<DynamicObject>::all_with(client.clone(), &AUTHORIZATION_POLICIES.resource()),
        AUTHORIZATION_POLICIES,
        reflectors.clone(),
    ));
    tasks.spawn(reflect(
        Api::<DynamicObject>::all_with(client.clone(), &VIRTUAL_SERVICES.resource()),
        VIRTUAL_SERVICES,
        reflectors.clone(),
    ));
    tasks.spawn(reflect(
        Api::<DynamicObject>::all_with(client, &DESTINATION_RULES.resource()),
        DESTINATION_RULES,
        reflectors.clone(),
    ));

    let (snapshot_tx, snapshots) = watch::channel(Arc::new(Cluster::default()));
    let (synced_tx, synced) = watch::channel(false);
    let rejected = reflectors.rejected.clone();
    tasks.spawn(async move {
        loop {
            reflectors.changed.notified().await;
            tokio::time::sleep(DEBOUNCE).await;
            let Some(cluster) = reflectors.build(options) else {
                continue;
            };
            snapshot_tx.send_if_modified(|current| {
                let changed = **current != cluster;
                if changed {
                    *current = Arc::new(cluster);
                }
                changed
            });
            if !synced_tx.send_replace(true) {
                let cluster = snapshot_tx.borrow();
                info!(
                    pods = cluster.workloads().len(),
                    services = cluster.services().len(),
                    policies = cluster.policies().len(),
                    "Kubernetes API synced"
                );
            }
        }
    });
    // Dropping the JoinSet, with the watch, aborts its tasks.
    ModelWatch::new(snapshots, synced, rejected, tasks)
}

/// The last good objects of every kind, shared by the watch tasks.
#[derive(Default)]
struct Reflectors {
    state: Mutex<State>,
    changed: Notify,
    rejected: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    objects: HashMap<&'static str, BTreeMap<ObjectKey, Object>>,
    /// Kinds listed in full at least once.
    synced: HashSet<&'static str>,
}

impl Reflectors {
    /// The cluster of every object, once every kind is synced.
    fn build(&self, options: BuildOptions) -> Option<Cluster> {
        let state = self.state.lock().unwrap();
        if state.synced.len() < WATCHED.len() {
            return None;
        }
        let objects = state.objects.values().flat_map(BTreeMap::values);
        Some(Cluster::build_with(objects, options))
    }

    /// The object to keep for `key`: `decoded` when it is good, else the
    /// last good version, if any.
    fn admit(
        &self,
        kind: WatchedKind,
        key: &ObjectKey,
        decoded: Result<Object, Vec<FieldError>>,
    ) -> Option<Object> {
        let problems = match decoded {
            Ok(object) => {
                let problems = object.check();
                if problems.is_empty() {
                    return Some(object);
                }
                problems
            }
            Err(problems) => problems,
        };
        for problem in &problems {
            error!(object = %key, field = %problem.field, "invalid object from the API server: {}", problem.message);
        }
        self.rejected.fetch_add(1, Ordering::Relaxed);
        let state = self.state.lock().unwrap();
        state.objects.get(kind.kind)?.get(key).cloned()
    }

    fn apply(&self, kind: WatchedKind, key: ObjectKey, object: Option<Object>) {
        let mut state = self.state.lock().unwrap();
        let objects = state.objects.entry(kind.kind).or_default();
        match object {
            Some(object) => objects.insert(key, object),
            None => objects.remove(&key),
        };
        drop(state);
        self.changed.notify_one();
    }

    /// Replaces every object of a kind after a full list.
    fn replace(&self, kind: WatchedKind, objects: BTreeMap<ObjectKey, Object>) {
        let mut state = self.state.lock().unwrap();
        state.objects.insert(kind.kind, objects);
        state.synced.insert(kind.kind);
        drop(state);
        self.changed.notify_one();
    }
}

/// Keeps one kind's objects in `reflectors` for as long as it runs.
async fn reflect<K>(api: Api<K>, kind: WatchedKind, reflectors: Arc<Reflectors>)
where
    K: Resource + FromApi + Clone + DeserializeOwned + Debug + Send + 'static,
{
    let events = watcher::watcher(api, watcher::Config::default()).default_backoff();
    let mut events = std::pin::pin!(events);
    let mut listing: Option<BTreeMap<ObjectKey, Object>> = None;
    let mut missing_logged = false;
    let mut healthy = true;
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(e) if kind.optional && is_not_found(&e) => {
                if !missing_logged {
                    info!(
                        kind = kind.kind,
                        group = kind.group,
                        "CRD not installed; carrying on without it"
                    );
                    missing_logged = true;
                }
                // As if it were installed with no objects, until it is.
                reflectors.replace(kind, BTreeMap::new());
                continue;
            }
            Err(e) => {
                warn!(kind = kind.kind, error = %e, "watch failed; retrying");
                healthy = false;
                continue;
            }
        };
        if !healthy {
            info!(kind = kind.kind, "watch resumed");
            healthy = true;
        }
        match event {
            Event::Init => listing = Some(BTreeMap::new()),
            Event::InitApply(object) => {
                let (key, decoded) = object.decode(kind);
                if let Some(object) = reflectors.admit(kind, &key, decoded) {
                    listing.get_or_insert_default().insert(key, object);
                }
            }
            Event::InitDone => reflectors.replace(kind, listing.take().unwrap_or_default()),
            Event::Apply(object) => {
                let (key, decoded) = object.decode(kind);
                if let Some(object) = reflectors.admit(kind, &key, decoded) {
                    reflectors.apply(kind, key, Some(object));
                }
            }
            Event::Delete(object) => {
                let (key, _) = object.decode(kind);
                reflectors.apply(kind, key, None);
            }
        }
    }
}

fn is_not_found(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => status.code == 404,
        _ => false,
    }
}

/// An object from the API turned into the model's [`Object`], keyed even
/// when it does not decode.
trait FromApi: Resource {
    fn decode(self, kind: WatchedKind) -> (ObjectKey, Result<Object, Vec<FieldError>>);

    fn key(&self, kind: WatchedKind) -> ObjectKey {
        ObjectKey {
            kind: kind.kind.to_owned(),
            namespace: self.meta().namespace.clone(),
            name: self.meta().name.clone().unwrap_or_default(),
        }
    }
}

impl FromApi for Namespace {
    fn decode(self, kind: WatchedKind) -> (ObjectKey, Result<Object, Vec<FieldError>>) {
        (self.key(kind), Ok(Object::Namespace(self)))
    }
}

impl FromApi for Pod {
    fn decode(self, kind: WatchedKind) -> (ObjectKey, Result<Object, Vec<FieldError>>) {
        (self.key(kind), Ok(Object::Pod(Box::new(trim(self)))))
    }
}

impl FromApi for Service {
    fn decode(self, kind: WatchedKind) -> (ObjectKey, Result<Object, Vec<FieldError>>) {
        (self.key(kind), Ok(Object::Service(Box::new(self))))
    }
}

impl FromApi for EndpointSlice {
    fn decode(self, kind: WatchedKind) -> (ObjectKey, Result<Object, Vec<FieldError>>) {
        (self.key(kind), Ok(Object::EndpointSlice(self)))
    }
}

/// Istio's kinds come as dynamic objects, decoded as manifests are.
impl FromApi for DynamicObject {
    fn decode(self, kind: WatchedKind) -> (ObjectKey, Result<Object, Vec<FieldError>>) {
        let decoded = serde_yaml::to_value(&self)
            .map_err(|e| FieldError::new("", e.to_string()))
            .and_then(|value| Object::decode(&kind.api_version(), kind.kind, value))
            .and_then(|object| {
                object
                    .ok_or_else(|| FieldError::new("kind", format!("{} is not handled", kind.kind)))
            })
            .map_err(|e| vec![e]);
        (self.key(kind), decoded)
    }
}

/// Keeps only what the model reads of a pod. Every pod of the cluster is
/// held, so the rest (managed fields, environment, volumes, container
/// statuses, last-applied annotations) would be most of the agent's memory.
fn trim(mut pod: Pod) -> Pod {
    let metadata = &mut pod.metadata;
    metadata.managed_fields = None;
    if let Some(annotations) = &mut metadata.annotations {
        annotations.retain(|key, _| key.starts_with("weir.dev/"));
    }
    if let Some(spec) = &mut pod.spec {
        spec.volumes = None;
        spec.init_containers = None;
        spec.ephemeral_containers = None;
        spec.affinity = None;
        spec.tolerations = None;
        for container in &mut spec.containers {
            container.env = None;
            container.env_from = None;
            container.volume_mounts = None;
            container.command = None;
            container.args = None;
            container.resources = None;
        }
    }
    if let Some(status) = &mut pod.status {
        status.container_statuses = None;
        status.init_container_statuses = None;
        status.ephemeral_container_statuses = None;
    }
    pod
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde::Deserialize as _;

    use super::*;

    fn typed<K: k8s_openapi::Resource>() -> (&'static str, &'static str, &'static str, &'static str)
    {
        (K::GROUP, K::VERSION, K::KIND, K::URL_PATH_SEGMENT)
    }

    fn named(kind: WatchedKind) -> (&'static str, &'static str, &'static str, &'static str) {
        (kind.group, kind.version, kind.kind, kind.plural)
    }

    #[test]
    fn watched_kinds_name_the_types_they_decode_into() {
        assert_eq!(named(NAMESPACES), typed::<Namespace>());
        assert_eq!(named(PODS), typed::<Pod>());
        assert_eq!(named(SERVICES), typed::<Service>());
        assert_eq!(named(ENDPOINT_SLICES), typed::<EndpointSlice>());
        assert_eq!(AUTHORIZATION_POLICIES.api_version(), "security.istio.io/v1");
        assert_eq!(VIRTUAL_SERVICES.api_version(), "networking.istio.io/v1");
        assert_eq!(DESTINATION_RULES.api_version(), "networking.istio.io/v1");
    }

    /// The DaemonSet's ClusterRole grants exactly what the source calls:
    /// get, list and watch on each watched kind, and nothing else.
    #[test]
    fn cluster_role_covers_every_watched_kind_and_no_more() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../daemonset/rbac.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let role = serde_yaml::Deserializer::from_str(&text)
            .map(|document| serde_yaml::Value::deserialize(document).unwrap())
            .find(|document| {
                document["kind"] == "ClusterRole" && document["metadata"]["name"] == "weir"
            })
            .expect("no ClusterRole weir in daemonset/rbac.yaml");
        let strings = |value: &serde_yaml::Value| -> Vec<String> {
            value
                .as_sequence()
                .unwrap()
                .iter()
                .map(|item| item.as_str().unwrap().to_owned())
                .collect()
        };
        let mut granted = BTreeSet::new();
        for rule in role["rules"].as_sequence().unwrap() {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        granted.insert((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
        let needed: BTreeSet<(String, String, String)> = WATCHED
            .iter()
            .flat_map(|kind| {
                ["get", "list", "watch"].map(|verb| {
                    (
                        kind.group.to_owned(),
                        kind.plural.to_owned(),
                        verb.to_owned(),
                    )
                })
            })
            .collect();
        assert_eq!(granted, needed);
    }
}
