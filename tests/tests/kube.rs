//! The Kubernetes API source, driven through kube-rs against a stand-in API
//! server that answers in the real server's shapes: lists, watch events,
//! BOOKMARKs, `410 Gone`, 404 for a CRD that is not installed, and 503.
//!
//! The first tests run the source in this process, from objects recorded as
//! the API returns them (`tests/fixtures/kube/`). The last runs agents in
//! the sandbox, and checks that the API path and the manifests path give the
//! same interception and the same `/config_dump`.

mod common;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{ECHO, echo, meshed, metric, redirected, serve_echo, wait_until};
use serde_json::{Value, json};
use weir::model::kube::WATCHED;
use weir::model::{BuildOptions, Cluster, ModelWatch, WorkloadKey};
use weir_sandbox::{ApiServer, NodeId, PodSpec, Sandbox, SandboxOptions};

const SYNC: Duration = Duration::from_secs(20);
const POLICIES: &str = "/apis/security.istio.io/v1/authorizationpolicies";

fn fixture() -> Vec<Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/kube/bookinfo.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn fixture_object(name: &str) -> Value {
    fixture()
        .into_iter()
        .find(|object| object["metadata"]["name"] == name)
        .unwrap()
}

/// A fake API server holding the recorded objects, and a source reading it.
struct Api {
    server: ApiServer,
    watch: ModelWatch,
    runtime: tokio::runtime::Runtime,
    _kubeconfig: TempFile,
}

impl Api {
    fn start(name: &str, prepare: impl FnOnce(&ApiServer), options: BuildOptions) -> Api {
        Api::start_with(name, prepare, options, KubeconfigBy::Flag)
    }

    fn start_with(
        name: &str,
        prepare: impl FnOnce(&ApiServer),
        options: BuildOptions,
        by: KubeconfigBy,
    ) -> Api {
        let server = ApiServer::new();
        for object in fixture() {
            server.apply(object).unwrap();
        }
        prepare(&server);
        let addr = server.listen(None).unwrap();
        let kubeconfig = TempFile::new(name);
        ApiServer::write_kubeconfig(addr, &kubeconfig.0).unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let flag = match by {
            KubeconfigBy::Flag => Some(kubeconfig.0.as_path()),
            KubeconfigBy::Env => {
                // SAFETY: nextest runs each test in a process of its own,
                // and no other thread of this one reads the environment yet.
                unsafe { std::env::set_var("KUBECONFIG", &kubeconfig.0) };
                None
            }
        };
        let watch = runtime.block_on(async {
            let client = weir::model::kube::client(flag).await.unwrap();
            weir::model::kube::watch(client, options)
        });
        Api {
            server,
            watch,
            runtime,
            _kubeconfig: kubeconfig,
        }
    }

    fn synced(&self, within: Duration) -> bool {
        self.block_on_timeout(within, self.watch.synced())
    }

    fn block_on_timeout(&self, within: Duration, future: impl Future<Output = ()>) -> bool {
        self.runtime
            .block_on(async { tokio::time::timeout(within, future).await })
            .is_ok()
    }

    fn cluster(&self) -> Arc<Cluster> {
        self.watch.current()
    }

    /// Waits until the source's snapshot satisfies `condition`.
    fn wait_for(&self, what: &str, condition: impl Fn(&Cluster) -> bool) {
        wait_until(what, || condition(&self.cluster()));
    }
}

/// How the source is told where the API server is: `--kubeconfig`, or the
/// `KUBECONFIG` variable that kube-rs reads when no file is given.
enum KubeconfigBy {
    Flag,
    Env,
}

struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> TempFile {
        TempFile(
            std::env::temp_dir().join(format!("weir-{name}-{}.kubeconfig", std::process::id())),
        )
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn key(name: &str) -> WorkloadKey {
    WorkloadKey {
        namespace: "default".to_owned(),
        name: name.to_owned(),
    }
}

const PRODUCTPAGE: &str = "productpage-v1-6b746f74dc-x7k2p";
const REVIEWS_V1: &str = "reviews-v1-7f6b8d5c9b-9zv4d";
const REVIEWS_V2: &str = "reviews-v2-5d9f7c8b6d-m2q8r";

#[test]
fn recorded_objects_build_the_same_model_as_manifests() {
    let api = Api::start("recorded", |_| {}, BuildOptions::default());
    assert!(api.synced(SYNC), "never synced");

    // The same objects as manifests: YAML documents of the recorded JSON.
    let manifests: String = fixture()
        .iter()
        .map(|object| format!("---\n{}", serde_yaml::to_string(object).unwrap()))
        .collect();
    let parsed = weir::model::parse_file("bookinfo.yaml".as_ref(), &manifests).unwrap();
    let expected = Cluster::build(&parsed.objects);
    assert_eq!(*api.cluster(), expected);

    let cluster = api.cluster();
    let names: Vec<&str> = cluster
        .enrolled_on("xuegod64")
        .map(|w| w.name.as_str())
        .collect();
    assert_eq!(names, [PRODUCTPAGE, REVIEWS_V1]);
    let reviews = &cluster.services()[0];
    assert_eq!(reviews.ports[0].endpoints.len(), 2);
    assert_eq!(cluster.policies().len(), 1);
    assert_eq!(
        cluster.workload(&key(PRODUCTPAGE)).unwrap().workload_name,
        "productpage-v1"
    );
    assert_eq!(api.watch.rejected(), 0);

    // The calls a reflector makes: a list, then a watch with bookmarks, for
    // every kind, at every one of its collection paths.
    let requests = api.server.requests();
    for kind in WATCHED {
        let collection = if kind.group.is_empty() {
            format!("/api/{}/{}", kind.version, kind.plural)
        } else {
            format!("/apis/{}/{}/{}", kind.group, kind.version, kind.plural)
        };
        let calls: Vec<&String> = requests
            .iter()
            .filter(|line| line.starts_with(&format!("GET {collection}?")))
            .collect();
        assert!(
            calls.iter().any(|line| !line.contains("watch=true")),
            "no list of {collection}: {requests:#?}"
        );
        wait_until(&format!("a watch of {collection}"), || {
            api.server.requests().iter().any(|line| {
                line.starts_with(&format!("GET {collection}?"))
                    && line.contains("watch=true")
                    && line.contains("allowWatchBookmarks=true")
            })
        });
    }
}

#[test]
fn kubeconfig_from_the_environment_is_used_when_none_is_given() {
    let api = Api::start_with("env", |_| {}, BuildOptions::default(), KubeconfigBy::Env);
    assert!(api.synced(SYNC), "never synced");
    assert_eq!(api.cluster().workloads().len(), 3);
}

#[test]
fn watch_events_bookmarks_and_gone_keep_the_model_current() {
    let api = Api::start("events", |_| {}, BuildOptions::default());
    assert!(api.synced(SYNC));

    // MODIFIED: the pod opts out of the mesh.
    let mut pod = fixture_object(REVIEWS_V1);
    pod["metadata"]["labels"]["weir.dev/mesh"] = json!("disabled");
    api.server.apply(pod).unwrap();
    api.wait_for("reviews-v1 opted out", |c| {
        !c.workload(&key(REVIEWS_V1)).unwrap().enrolled
    });

    // A BOOKMARK changes nothing and breaks nothing.
    api.server.bookmark();
    // DELETED.
    api.server.delete(&fixture_object(PRODUCTPAGE)).unwrap();
    api.wait_for("productpage gone", |c| {
        c.workload(&key(PRODUCTPAGE)).is_none()
    });

    // 410 Gone: history compacted. Watches end, and watching again from an
    // old version is refused, so the source must list again; a pod added
    // while no watch ran arrives through that list.
    let lists_before = lists_of(&api.server, "/api/v1/pods");
    api.server.compact();
    let mut added = fixture_object(PRODUCTPAGE);
    added["metadata"]["name"] = json!("productpage-v1-6b746f74dc-q4w8e");
    api.server.apply(added).unwrap();
    api.wait_for("the new productpage, after the relist", |c| {
        c.workload(&key("productpage-v1-6b746f74dc-q4w8e"))
            .is_some()
    });
    assert!(lists_of(&api.server, "/api/v1/pods") > lists_before);
    assert!(api.cluster().workload(&key(PRODUCTPAGE)).is_none());
    assert!(!api.cluster().workload(&key(REVIEWS_V1)).unwrap().enrolled);
}

fn lists_of(server: &ApiServer, collection: &str) -> usize {
    server
        .requests()
        .iter()
        .filter(|line| line.starts_with(&format!("GET {collection}?")) && !line.contains("watch="))
        .count()
}

#[test]
fn an_invalid_object_is_rejected_and_its_last_good_version_stays() {
    let api = Api::start("invalid", |_| {}, BuildOptions::default());
    assert!(api.synced(SYNC));
    let before = api.cluster().workload(&key(REVIEWS_V2)).unwrap().clone();
    assert!(before.enrolled);

    let mut broken = fixture_object(REVIEWS_V2);
    broken["metadata"]["labels"]["weir.dev/mesh"] = json!("disabled");
    broken["metadata"]["annotations"]["weir.dev/exclude-outbound-ports"] = json!("5432,not-a-port");
    api.server.apply(broken).unwrap();
    // A new pod after it shows the source went on past the broken one.
    let mut next = fixture_object(REVIEWS_V2);
    next["metadata"]["name"] = json!("reviews-v2-5d9f7c8b6d-z9z9z");
    api.server.apply(next).unwrap();
    api.wait_for("the pod after the broken one", |c| {
        c.workload(&key("reviews-v2-5d9f7c8b6d-z9z9z")).is_some()
    });

    assert_eq!(api.watch.rejected(), 1);
    assert_eq!(
        api.cluster().workload(&key(REVIEWS_V2)),
        Some(&before),
        "the broken update replaced the last good version"
    );
}

#[test]
fn without_the_istio_crd_the_source_syncs_and_picks_it_up_later() {
    let api = Api::start(
        "nocrd",
        |server| server.set_missing(POLICIES, true),
        BuildOptions::default(),
    );
    assert!(
        api.synced(SYNC),
        "a missing optional CRD held the sync back"
    );
    assert!(api.cluster().policies().is_empty());

    api.server.set_missing(POLICIES, false);
    api.wait_for("the policy, once the CRD is installed", |c| {
        c.policies().len() == 1
    });
}

#[test]
fn the_source_is_not_synced_until_the_api_answers() {
    let api = Api::start(
        "unavailable",
        |server| server.set_unavailable(true),
        BuildOptions::default(),
    );
    assert!(!api.synced(Duration::from_secs(2)), "synced without an API");
    assert!(api.cluster().workloads().is_empty());

    api.server.set_unavailable(false);
    assert!(api.synced(SYNC), "never synced once the API came back");
    assert_eq!(api.cluster().workloads().len(), 3);
}

#[test]
fn istio_ambient_labels_enroll_only_when_honoured() {
    let ambient = |server: &ApiServer| {
        let mut namespace = fixture_object("default");
        let labels = &mut namespace["metadata"]["labels"];
        labels.as_object_mut().unwrap().remove("weir.dev/mesh");
        labels["istio.io/dataplane-mode"] = json!("ambient");
        server.apply(namespace).unwrap();
        let mut pod = fixture_object(REVIEWS_V1);
        pod["metadata"]["labels"]["istio.io/dataplane-mode"] = json!("none");
        server.apply(pod).unwrap();
    };
    let enrolled = |api: &Api| -> Vec<String> {
        let cluster = api.cluster();
        let mut names: Vec<String> = ["xuegod63", "xuegod64"]
            .iter()
            .flat_map(|node| {
                cluster
                    .enrolled_on(node)
                    .map(|w| w.name.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        names.sort();
        names
    };

    let plain = Api::start("ambient-off", ambient, BuildOptions::default());
    assert!(plain.synced(SYNC));
    assert!(enrolled(&plain).is_empty());

    let honoured = Api::start(
        "ambient-on",
        ambient,
        BuildOptions {
            honor_istio_labels: true,
        },
    );
    assert!(honoured.synced(SYNC));
    assert_eq!(enrolled(&honoured), [PRODUCTPAGE, REVIEWS_V2]);
}

/// The same pods, namespace and service, fed to an agent first as manifests
/// and then through the API: the same pods are intercepted, and
/// `/config_dump` is the same.
#[test]
fn api_source_gives_the_same_interception_and_config_dump_as_manifests() {
    let mut sb = Sandbox::new(SandboxOptions::for_test("kube-parity")).unwrap();
    sb.add_namespace("shop", &[("weir.dev/mesh", "enabled")])
        .unwrap();
    let client = sb
        .add_pod(
            PodSpec::new("client", NodeId::Xuegod63)
                .namespace("shop")
                .label("app", "client"),
        )
        .unwrap();
    let server = sb
        .add_pod(
            PodSpec::new("server", NodeId::Xuegod64)
                .label("app", "server")
                .label("weir.dev/mesh", "disabled")
                .ports(&[("echo", ECHO)]),
        )
        .unwrap();
    serve_echo(&server);
    let cluster_ip = sb.addressing().service_ip(7);
    sb.add_service(
        "server",
        "default",
        cluster_ip,
        ECHO,
        ECHO,
        &[("app", "server")],
    )
    .unwrap();

    let check = |agent: &weir_sandbox::Agent| -> Value {
        agent.wait_ready(SYNC).unwrap();
        let mut stream = client.connect((cluster_ip, ECHO).into()).unwrap();
        assert!(redirected(&stream), "the client's connection went direct");
        let echoed = echo(&mut stream, b"hello").unwrap();
        assert_eq!(echoed.server, "server");
        wait_until("the connection counted", || {
            metric(
                agent,
                "istio_tcp_connections_closed_total",
                &[("reporter", "source")],
            ) >= 1.0
        });
        let mut dump = agent.config_dump().unwrap();
        // The pods' namespace files are the same; nothing else may differ.
        dump.as_object_mut().unwrap().remove("node");
        dump
    };

    let by_manifests = sb.start_agent(NodeId::Xuegod63, &[]).unwrap();
    let manifests_dump = check(&by_manifests);
    by_manifests.sigterm().unwrap();
    by_manifests.wait_timeout(Duration::from_secs(20)).unwrap();

    let api = ApiServer::new();
    api.apply_dir(sb.manifests_dir()).unwrap();
    let addr = api.listen(Some(sb.node(NodeId::Xuegod63).netns())).unwrap();
    let kubeconfig = sb.dir().join("kubeconfig");
    ApiServer::write_kubeconfig(addr, &kubeconfig).unwrap();
    // Nothing from the manifests directory can reach this agent.
    let by_api = sb
        .start_agent_with_kubeconfig(NodeId::Xuegod63, &kubeconfig, &[])
        .unwrap();
    let api_dump = check(&by_api);
    assert_eq!(api_dump, manifests_dump);
    assert!(
        api.requests()
            .iter()
            .any(|line| line.starts_with("GET /api/v1/pods?")),
        "the agent never asked the API server for pods"
    );
    let log = by_api.log().unwrap();
    assert!(log.contains("Kubernetes API synced"), "{log}");

    // A pod deleted from the API is released at once.
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": "shop", "name": "client"}});
    api.delete(&pod).unwrap();
    wait_until("the deleted pod released", || {
        by_api.config_dump().unwrap()["enrolled"]
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    let stream = client.connect(server.addr(ECHO)).unwrap();
    assert!(!redirected(&stream), "a released pod is still redirected");
}

/// Until the API has been listed in full the agent is live but not ready,
/// and acts on nothing: a pod enrolled by an earlier agent stays enrolled,
/// in its fail mode, rather than being released.
#[test]
fn agent_is_live_but_not_ready_until_the_api_answers() {
    let mut sb = Sandbox::new(SandboxOptions::for_test("kube-ready")).unwrap();
    let client = sb.add_pod(meshed("client", NodeId::Xuegod63)).unwrap();
    let server = sb
        .add_pod(PodSpec::new("server", NodeId::Xuegod64).ports(&[("echo", ECHO)]))
        .unwrap();
    serve_echo(&server);
    let closed = ["--fail-mode", "closed"];
    let first = sb.start_agent(NodeId::Xuegod63, &closed).unwrap();
    first.wait_ready(SYNC).unwrap();
    first.sigterm().unwrap();
    first.wait_timeout(SYNC).unwrap();

    let api = ApiServer::new();
    api.apply_dir(sb.manifests_dir()).unwrap();
    api.set_unavailable(true);
    let addr = api.listen(Some(sb.node(NodeId::Xuegod63).netns())).unwrap();
    let kubeconfig = sb.dir().join("kubeconfig");
    ApiServer::write_kubeconfig(addr, &kubeconfig).unwrap();
    let agent = sb
        .start_agent_with_kubeconfig(NodeId::Xuegod63, &kubeconfig, &closed)
        .unwrap();
    wait_until("the agent answers its liveness probe", || {
        agent
            .probe("/healthz/live")
            .is_ok_and(|status| status == 200)
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.probe("/healthz/ready").unwrap(), 503);
    // The pod is still in the mesh, with no listener yet: fail closed. Had
    // the agent acted on its empty view, the pod would connect directly.
    let refused = client.connect(server.addr(ECHO)).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::PermissionDenied,
        "{refused}"
    );
    assert!(
        api.requests()
            .iter()
            .any(|line| line.starts_with("GET /api/v1/"))
    );

    api.set_unavailable(false);
    agent.wait_ready(SYNC).unwrap();
    let mut stream = client
        .connect(server.addr(ECHO))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log().unwrap()));
    assert!(redirected(&stream));
    assert_eq!(echo(&mut stream, b"after sync").unwrap().server, "server");
}
