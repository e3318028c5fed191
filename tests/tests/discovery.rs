//! Finding a pod's network namespace without a path to it: the agent's
//! `--netns-dir` is empty, and the pod is found because a process lives in
//! its namespace, as a pod's pause container does on a real node.
//!
//! Every agent on the machine sees every process, so other tests' pods may
//! be found too; they live in other subnets, and no manifest of this
//! sandbox names their addresses.

mod common;

use std::fs;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ECHO, echo, enrolled_pod, meshed, metric, redirected, serve_echo, wait_until};
use weir::netns::NsId;
use weir_sandbox::{Agent, NodeId, Pod, PodSpec, Sandbox, SandboxOptions};

struct Cluster {
    sb: Sandbox,
    /// Enrolled, on xuegod63; its namespace has no file in the netns dir.
    client: Pod,
    /// Not enrolled, on xuegod64.
    server: Pod,
}

fn cluster(test: &str) -> Cluster {
    let mut sb = Sandbox::new(SandboxOptions::for_test(test)).unwrap();
    let client = sb.add_pod(meshed("client", NodeId::Xuegod63)).unwrap();
    let server = sb
        .add_pod(
            PodSpec::new("server", NodeId::Xuegod64)
                .label("app", "server")
                .ports(&[("echo", ECHO)]),
        )
        .unwrap();
    serve_echo(&server);
    Cluster { sb, client, server }
}

/// Leaves the agent's `--netns-dir` empty.
fn hide_namespaces(sb: &Sandbox, pods: &[&Pod]) {
    for pod in pods {
        fs::remove_file(sb.netns_dir().join(pod.netns_name())).unwrap();
    }
    assert_eq!(fs::read_dir(sb.netns_dir()).unwrap().count(), 0);
}

fn opened(agent: &Agent) -> f64 {
    metric(
        agent,
        "istio_tcp_connections_opened_total",
        &[
            ("source_workload", "client"),
            ("destination_workload", "server"),
        ],
    )
}

#[test]
fn pod_is_found_from_a_process_in_its_namespace() {
    let c = cluster("found-from-process");
    hide_namespaces(&c.sb, &[&c.client, &c.server]);
    let mut sb = c.sb;
    let agent = sb.start_agent(NodeId::Xuegod63, &[]).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let target = c.server.addr(ECHO);

    // Nothing in the pod yet: no file, no process, nothing to find it by.
    assert!(enrolled_pod(&agent, "client").is_none());
    let stream = c.client.connect(target).unwrap();
    assert!(
        !redirected(&stream),
        "the pod was enrolled without a namespace"
    );
    drop(stream);

    let pause = c.client.spawn_pause().unwrap();
    // Waiting pods are looked for again each second.
    wait_until("the pod is found by its process", || {
        enrolled_pod(&agent, "client").is_some()
    });
    let pod = enrolled_pod(&agent, "client").unwrap();
    assert_eq!(pod["found_by"], "process", "{pod}");
    // Not the process's /proc entry, which goes with the process: the
    // agent's own descriptor.
    let path = PathBuf::from(pod["netns"].as_str().unwrap());
    assert!(
        path.starts_with(format!("/proc/{}/fd", agent.pid())),
        "{}",
        path.display()
    );

    let mut stream = c.client.connect(target).unwrap();
    assert!(redirected(&stream), "{:?}", stream.local_addr());
    let seen = echo(&mut stream, b"found by its process").unwrap().peer;
    assert_eq!(seen.ip(), IpAddr::V4(c.client.ip()));
    assert_eq!(opened(&agent), 1.0);

    // The pause process goes; the recorded path still names the pod's
    // namespace, and the pod stays enrolled.
    drop(pause);
    let pod_id = c.client.netns().id().unwrap();
    assert_eq!(NsId::of(&path).unwrap(), pod_id);
    let mut stream = c.client.connect(target).unwrap();
    assert!(redirected(&stream));
    echo(&mut stream, b"still enrolled").unwrap();

    // Gone from the manifests: released at the next model change.
    let removed = Instant::now();
    sb.remove_manifest("pod-default-client.yaml").unwrap();
    wait_until("the pod is released", || {
        enrolled_pod(&agent, "client").is_none()
    });
    eprintln!("released {:?} after the manifest went", removed.elapsed());
    let stream = c.client.connect(target).unwrap();
    assert!(!redirected(&stream), "a released pod is still redirected");
}

#[test]
fn a_netns_dir_file_is_preferred_to_a_process() {
    let c = cluster("netns-file-first");
    let mut sb = c.sb;
    // Both ways lead to the pod's namespace.
    let _pause = c.client.spawn_pause().unwrap();
    let agent = sb.start_agent(NodeId::Xuegod63, &[]).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let pod = enrolled_pod(&agent, "client").expect("enrolled at start");
    assert_eq!(pod["found_by"], "netns_dir", "{pod}");
    assert_eq!(
        pod["netns"].as_str().unwrap(),
        sb.netns_dir().join(c.client.netns_name()).to_str().unwrap()
    );
    // `_pause` drops before `sb`, being declared after it.
}

/// iptables mode runs `nsenter --net=<path>` with the recorded path: the
/// agent's descriptor must work there too, also after the process is gone.
#[test]
fn iptables_mode_uses_the_recorded_path() {
    let c = cluster("found-iptables");
    hide_namespaces(&c.sb, &[&c.client, &c.server]);
    let mut sb = c.sb;
    let pause = c.client.spawn_pause().unwrap();
    let agent = sb
        .start_agent(NodeId::Xuegod63, &["--interception", "iptables"])
        .unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    wait_until("the pod is found by its process", || {
        enrolled_pod(&agent, "client").is_some()
    });
    drop(pause);
    let target = c.server.addr(ECHO);
    let mut stream = c.client.connect(target).unwrap();
    assert_eq!(stream.peer_addr().unwrap(), target);
    echo(&mut stream, b"through iptables").unwrap();
    assert_eq!(opened(&agent), 1.0);

    // Released: the agent empties the pod's nat table through the same path.
    sb.remove_manifest("pod-default-client.yaml").unwrap();
    wait_until("the pod's rules are removed", || {
        !nat_table(&c.client).contains("WEIR_OUTPUT")
    });
}

fn nat_table(pod: &Pod) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", pod.netns().path().display()))
        .args(["iptables-save", "-t", "nat"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}
