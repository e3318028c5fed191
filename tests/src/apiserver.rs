//! A small stand-in for the Kubernetes API server, for driving the agent's
//! kube-rs source without a cluster.
//!
//! It answers the calls a reflector makes, in the shapes the real server
//! uses: a list (`{"kind": "PodList", "metadata": {"resourceVersion"},
//! "items"}`, items without kind and apiVersion), and a watch from a
//! resourceVersion, as newline-delimited events (ADDED, MODIFIED, DELETED,
//! BOOKMARK, and ERROR with a `Status` of code 410 once the version asked
//! for is older than the server still has). A resource can be made missing
//! (404, as for a CRD that is not installed) and the whole server
//! unavailable (503).
//!
//! Each request gets its own thread and its own connection (the server
//! always says `Connection: close`), so a watch holds nothing else up.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::NetNs;

/// The collections the server knows: URL path, apiVersion, kind, and
/// whether the kind is a custom resource, whose list items keep their kind
/// and apiVersion.
const RESOURCES: &[Resource] = &[
    ("/api/v1/namespaces", "v1", "Namespace", false),
    ("/api/v1/pods", "v1", "Pod", false),
    ("/api/v1/services", "v1", "Service", false),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io/v1",
        "EndpointSlice",
        false,
    ),
    (
        "/apis/security.istio.io/v1/authorizationpolicies",
        "security.istio.io/v1",
        "AuthorizationPolicy",
        true,
    ),
    (
        "/apis/networking.istio.io/v1/virtualservices",
        "networking.istio.io/v1",
        "VirtualService",
        true,
    ),
    (
        "/apis/networking.istio.io/v1/destinationrules",
        "networking.istio.io/v1",
        "DestinationRule",
        true,
    ),
];

type Resource = (&'static str, &'static str, &'static str, bool);

/// Watches end after this long at the latest, as the real server ends them
/// after `timeoutSeconds`; the client then watches again.
const MAX_WATCH: Duration = Duration::from_secs(30);

/// A running fake API server. Dropping it stops every listener and watch.
pub struct ApiServer {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stopped: AtomicBool,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    /// By collection path, then namespace and name.
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    /// Every change, in order: version, collection, event type, object.
    events: Vec<(u64, &'static str, &'static str, Value)>,
    /// Watches from a version older than this get 410 Gone.
    oldest: u64,
    missing: HashSet<&'static str>,
    unavailable: bool,
    /// Request lines, for tests to look at.
    requests: Vec<String>,
}

impl ApiServer {
    pub fn new() -> ApiServer {
        ApiServer {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    resource_version: 1000,
                    oldest: 1000,
                    ..State::default()
                }),
                changed: Condvar::new(),
                stopped: AtomicBool::new(false),
            }),
        }
    }

    /// Listens on a free port of 127.0.0.1 in `netns` (the caller's own
    /// namespace when None), and returns that address.
    pub fn listen(&self, netns: Option<&NetNs>) -> Result<SocketAddr> {
        let bind = || TcpListener::bind("127.0.0.1:0");
        let listener = match netns {
            Some(netns) => netns.run(bind)??,
            None => bind()?,
        };
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = self.shared.clone();
        thread::spawn(move || accept_loop(&listener, &shared));
        Ok(addr)
    }

    /// Writes a kubeconfig for the server at `addr` to `path`.
    pub fn write_kubeconfig(addr: SocketAddr, path: &Path) -> Result<()> {
        let config = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters:\n- name: fake\n  cluster: {{server: \"http://{addr}\"}}\n\
             users:\n- name: fake\n  user: {{token: fake}}\n\
             contexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n"
        );
        std::fs::write(path, config).with_context(|| format!("cannot write {}", path.display()))
    }

    /// Adds or replaces an object (a full object with kind and apiVersion)
    /// and tells the watches. Returns its new resourceVersion.
    pub fn apply(&self, mut object: Value) -> Result<u64> {
        let collection = collection_of(&object)?;
        let key = object_key(&object);
        let mut state = self.shared.state.lock().unwrap();
        state.resource_version += 1;
        let version = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let objects = state.objects.entry(collection).or_default();
        let event = if objects.contains_key(&key) {
            "MODIFIED"
        } else {
            object["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{version:012}"));
            "ADDED"
        };
        objects.insert(key, object.clone());
        state.events.push((version, collection, event, object));
        drop(state);
        self.shared.changed.notify_all();
        Ok(version)
    }

    /// Removes an object and tells the watches.
    pub fn delete(&self, kind_and_api: &Value) -> Result<()> {
        let collection = collection_of(kind_and_api)?;
        let key = object_key(kind_and_api);
        let mut state = self.shared.state.lock().unwrap();
        let Some(mut object) = state
            .objects
            .get_mut(collection)
            .and_then(|objects| objects.remove(&key))
        else {
            bail!("no such object: {key:?}");
        };
        state.resource_version += 1;
        let version = state.resource_version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        state.events.push((version, collection, "DELETED", object));
        drop(state);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Loads every object of the YAML files in `dir` (one or more documents
    /// each), as `kubectl apply -f dir` would.
    pub fn apply_dir(&self, dir: &Path) -> Result<()> {
        let mut paths: Vec<_> = std::fs::read_dir(dir)?
            .map(|entry| entry.map(|entry| entry.path()))
            .collect::<Result<_, _>>()?;
        paths.sort();
        for path in paths {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if name.starts_with('.') || !name.ends_with(".yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path)?;
            for document in serde_yaml::Deserializer::from_str(&text) {
                let mut object: Value = serde::Deserialize::deserialize(document)
                    .with_context(|| format!("cannot parse {}", path.display()))?;
                if object.is_null() {
                    continue;
                }
                if object["kind"] != "Namespace" && object["metadata"]["namespace"].is_null() {
                    object["metadata"]["namespace"] = json!("default");
                }
                self.apply(object)?;
            }
        }
        Ok(())
    }

    /// Forgets the history: every watch ends, and watching again from any
    /// version seen so far gets 410 Gone, so clients must list again.
    pub fn compact(&self) {
        let mut state = self.shared.state.lock().unwrap();
        state.events.clear();
        state.oldest = state.resource_version + 1;
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Sends a BOOKMARK at the current version to every watch.
    pub fn bookmark(&self) {
        let mut state = self.shared.state.lock().unwrap();
        let version = state.resource_version;
        for &(collection, api_version, kind, _) in RESOURCES {
            let bookmark = json!({
                "kind": kind,
                "apiVersion": api_version,
                "metadata": {"resourceVersion": version.to_string()},
            });
            state
                .events
                .push((version, collection, "BOOKMARK", bookmark));
        }
        drop(state);
        self.shared.changed.notify_all();
    }

    /// Makes a collection answer 404, as a CRD that is not installed does.
    pub fn set_missing(&self, collection: &'static str, missing: bool) {
        let mut state = self.shared.state.lock().unwrap();
        if missing {
            state.missing.insert(collection);
        } else {
            state.missing.remove(collection);
        }
    }

    /// Makes every request fail with 503, and ends every watch.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.state.lock().unwrap().unavailable = unavailable;
        self.shared.changed.notify_all();
    }

    /// The request lines (`GET /api/v1/pods?...`) received so far.
    pub fn requests(&self) -> Vec<String> {
        self.shared.state.lock().unwrap().requests.clone()
    }
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
    }
}

/// The collection path of an object, from its apiVersion and kind.
fn collection_of(object: &Value) -> Result<&'static str> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    RESOURCES
        .iter()
        .find(|resource| (resource.1, resource.2) == (api_version, kind))
        .map(|resource| resource.0)
        .with_context(|| format!("the fake API server does not serve {api_version} {kind}"))
}

fn object_key(object: &Value) -> (String, String) {
    let metadata = &object["metadata"];
    let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
    (text(&metadata["namespace"]), text(&metadata["name"]))
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    while !shared.stopped.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = shared.clone();
                thread::spawn(move || {
                    // The client hanging up mid-answer is its business.
                    let _ = serve(stream, &shared);
                });
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn serve(stream: TcpStream, shared: &Shared) -> Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Only GETs without a body come: the rest of the head is not needed.
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or_default();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(key, _)| *key == name)
            .map(|(_, value)| value.to_owned())
    };
    let mut stream = stream;
    let (collection, api_version, kind, custom) = {
        let mut state = shared.state.lock().unwrap();
        state.requests.push(request_line.trim().to_owned());
        if state.unavailable {
            return respond(
                &mut stream,
                503,
                &status(503, "ServiceUnavailable", "unavailable"),
            );
        }
        match RESOURCES.iter().find(|resource| resource.0 == path) {
            Some(&(collection, ..)) if state.missing.contains(collection) => {
                return respond(
                    &mut stream,
                    404,
                    &status(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    ),
                );
            }
            Some(&resource) => resource,
            None => {
                return respond(
                    &mut stream,
                    404,
                    &status(404, "NotFound", "not served here"),
                );
            }
        }
    };
    if matches!(param("watch").as_deref(), Some("true" | "1")) {
        let from = param("resourceVersion")
            .and_then(|version| version.parse().ok())
            .unwrap_or(0);
        watch(&mut stream, shared, collection, from)
    } else {
        let state = shared.state.lock().unwrap();
        let items: Vec<Value> = state
            .objects
            .get(collection)
            .into_iter()
            .flat_map(BTreeMap::values)
            .map(|object| {
                let mut item = object.clone();
                if !custom && let Some(fields) = item.as_object_mut() {
                    fields.remove("kind");
                    fields.remove("apiVersion");
                }
                item
            })
            .collect();
        let list = json!({
            "kind": format!("{kind}List"),
            "apiVersion": api_version,
            "metadata": {"resourceVersion": state.resource_version.to_string()},
            "items": items,
        });
        drop(state);
        respond(&mut stream, 200, &list)
    }
}

/// Streams the events of `collection` after version `from`, then new ones
/// as they come, until the watch times out, the history is compacted, or
/// the server stops or becomes unavailable.
fn watch(stream: &mut TcpStream, shared: &Shared, collection: &str, from: u64) -> Result<()> {
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    )?;
    let deadline = Instant::now() + MAX_WATCH;
    let mut state = shared.state.lock().unwrap();
    if from < state.oldest {
        let gone = status(
            410,
            "Expired",
            &format!("too old resource version: {from} ({})", state.oldest),
        );
        drop(state);
        writeln!(stream, "{}", json!({"type": "ERROR", "object": gone}))?;
        return Ok(());
    }
    // Events are sent by their place in the history: a BOOKMARK carries no
    // new version of its own.
    let mut next = state
        .events
        .iter()
        .position(|(version, ..)| *version > from)
        .unwrap_or(state.events.len());
    let oldest = state.oldest;
    loop {
        if shared.stopped.load(Ordering::Relaxed) || state.unavailable || state.oldest != oldest {
            return Ok(());
        }
        let mut lines = String::new();
        for (_, event_collection, event, object) in &state.events[next..] {
            if *event_collection == collection {
                lines.push_str(&json!({"type": event, "object": object}).to_string());
                lines.push('\n');
            }
        }
        next = state.events.len();
        if !lines.is_empty() {
            drop(state);
            stream.write_all(lines.as_bytes())?;
            state = shared.state.lock().unwrap();
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        state = shared.changed.wait_timeout(state, left).unwrap().0;
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn respond(stream: &mut TcpStream, code: u16, body: &Value) -> Result<()> {
    let body = body.to_string();
    write!(
        stream,
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        if code == 200 { "OK" } else { "Error" },
        body.len()
    )?;
    Ok(())
}
