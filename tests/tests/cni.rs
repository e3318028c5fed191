//! The chained CNI plugin, run exactly as a container runtime runs it: a
//! process with the `CNI_*` environment and the network configuration, with
//! the main plugin's result as `prevResult`, on stdin.
//!
//! The agents here get an empty `--netns-dir` and the pods have no process,
//! so only the plugin's word can lead an agent to a pod's namespace.

mod common;

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{ECHO, echo, enrolled_pod, meshed, metric, redirected, serve_echo};
use weir_sandbox::{Agent, NodeId, Pod, PodSpec, Sandbox, SandboxOptions};

/// `weir-cni`: `$WEIR_CNI_BIN`, or beside the `weir` binary the sandbox
/// runs (`cargo build -p weir -p weir-cni`).
fn cni_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("WEIR_CNI_BIN") {
        return PathBuf::from(bin);
    }
    let bin = weir_sandbox::agent_binary()
        .unwrap()
        .with_file_name("weir-cni");
    assert!(
        bin.is_file(),
        "no {}; build it with `cargo build -p weir-cni`",
        bin.display()
    );
    bin
}

/// What the main plugin (bridge, Calico, …) returned for the pod, as the
/// runtime hands it to the next plugin of the chain.
fn prev_result(pod: &Pod, netns: &str) -> String {
    let ip = pod.ip();
    let gateway = {
        let [a, b, c, _] = ip.octets();
        format!("{a}.{b}.{c}.1")
    };
    format!(
        r#"{{"cniVersion":"1.0.0","interfaces":[{{"name":"eth0","sandbox":"{netns}"}}],"ips":[{{"address":"{ip}/24","gateway":"{gateway}","interface":0}}],"dns":{{}}}}"#
    )
}

/// One run of the plugin for `pod` (namespace `default`, name `name`).
struct Call<'a> {
    command: &'a str,
    name: &'a str,
    netns: &'a str,
    socket: &'a Path,
    fail_mode: &'a str,
    prev_result: &'a str,
}

impl Call<'_> {
    fn run(&self) -> Output {
        let bin = cni_binary();
        let config = format!(
            r#"{{"cniVersion":"1.0.0","name":"weir-test","type":"weir-cni","socket":{},"failMode":"{}","prevResult":{}}}"#,
            serde_json::Value::from(self.socket.to_str().unwrap()),
            self.fail_mode,
            self.prev_result
        );
        let mut child = Command::new(&bin)
            .env_clear()
            .env("CNI_COMMAND", self.command)
            .env("CNI_CONTAINERID", format!("sandbox-{}", self.name))
            .env("CNI_NETNS", self.netns)
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=sandbox-{}",
                    self.name, self.name
                ),
            )
            .env("CNI_PATH", bin.parent().unwrap())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(config.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }
}

fn stdout(output: &Output) -> &str {
    std::str::from_utf8(&output.stdout).unwrap()
}

fn describe(output: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        output.status,
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The CNI error on stdout of a failed run.
fn cni_error(output: &Output) -> serde_json::Value {
    assert_eq!(output.status.code(), Some(1), "{}", describe(output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(output)))
}

struct Node {
    _sb: Sandbox,
    agent: Agent,
    socket: PathBuf,
    /// Enrolled by label, on xuegod63.
    client: Pod,
    /// Not enrolled, on xuegod63.
    plain: Pod,
    /// Not enrolled, on xuegod64: what the clients connect to.
    server: Pod,
}

fn node(test: &str) -> Node {
    let mut sb = Sandbox::new(SandboxOptions::for_test(test)).unwrap();
    let client = sb.add_pod(meshed("client", NodeId::Xuegod63)).unwrap();
    let plain = sb
        .add_pod(PodSpec::new("plain", NodeId::Xuegod63).label("app", "plain"))
        .unwrap();
    let server = sb
        .add_pod(
            PodSpec::new("server", NodeId::Xuegod64)
                .label("app", "server")
                .ports(&[("echo", ECHO)]),
        )
        .unwrap();
    serve_echo(&server);
    // Nothing in the netns dir: the agent finds pods only by the plugin.
    for pod in [&client, &plain, &server] {
        fs::remove_file(sb.netns_dir().join(pod.netns_name())).unwrap();
    }
    let socket = sb.dir().join("cni-xuegod63.sock");
    let agent = sb
        .start_agent(
            NodeId::Xuegod63,
            &["--cni-socket", socket.to_str().unwrap()],
        )
        .unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    Node {
        _sb: sb,
        agent,
        socket,
        client,
        plain,
        server,
    }
}

#[test]
fn add_enrolls_the_pod_before_it_returns() {
    let n = node("cni-add");
    let netns = n.client.netns().path().to_str().unwrap().to_owned();
    let prev = prev_result(&n.client, &netns);
    let call = |command| Call {
        command,
        name: "client",
        netns: &netns,
        socket: &n.socket,
        fail_mode: "closed",
        prev_result: &prev,
    };
    let target = n.server.addr(ECHO);

    // Before ADD the agent cannot know where the pod is: CHECK says so.
    let stream = n.client.connect(target).unwrap();
    assert!(!redirected(&stream), "enrolled before ADD");
    drop(stream);
    let error = cni_error(&call("CHECK").run());
    assert_eq!(error["code"], 100, "{error}");
    assert_eq!(error["cniVersion"], "1.0.0");

    let started = Instant::now();
    let add = call("ADD").run();
    assert!(add.status.success(), "{}", describe(&add));
    // A chained plugin passes the result on unchanged.
    assert_eq!(stdout(&add), prev);
    eprintln!("ADD took {:?}", started.elapsed());

    // The pod's first connect() after ADD is already steered.
    let mut stream = n.client.connect(target).unwrap();
    assert!(redirected(&stream), "{:?}", stream.local_addr());
    let seen = echo(&mut stream, b"enrolled by the plugin").unwrap().peer;
    assert_eq!(seen.ip(), IpAddr::V4(n.client.ip()));
    let opened = metric(
        &n.agent,
        "istio_tcp_connections_opened_total",
        &[
            ("source_workload", "client"),
            ("destination_workload", "server"),
        ],
    );
    assert_eq!(opened, 1.0);
    let pod = enrolled_pod(&n.agent, "client").unwrap();
    assert_eq!(pod["found_by"], "cni", "{pod}");

    let check = call("CHECK").run();
    assert!(check.status.success(), "{}", describe(&check));
    assert_eq!(stdout(&check), "");
    let del = call("DEL").run();
    assert!(del.status.success(), "{}", describe(&del));
    assert_eq!(stdout(&del), "");

    // A stopping agent takes its socket away, so that plugins find no
    // agent at once rather than wait.
    n.agent.sigterm().unwrap();
    n.agent.wait_timeout(Duration::from_secs(20)).unwrap();
    assert!(!n.socket.exists());
}

#[test]
fn add_of_a_pod_not_to_be_enrolled_returns_at_once() {
    let n = node("cni-plain");
    let netns = n.plain.netns().path().to_str().unwrap().to_owned();
    let prev = prev_result(&n.plain, &netns);
    let call = |command, name| Call {
        command,
        name,
        netns: &netns,
        socket: &n.socket,
        fail_mode: "closed",
        prev_result: &prev,
    };
    let started = Instant::now();
    let add = call("ADD", "plain").run();
    assert!(add.status.success(), "{}", describe(&add));
    assert_eq!(stdout(&add), prev);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let stream = n.plain.connect(n.server.addr(ECHO)).unwrap();
    assert!(!redirected(&stream), "an unlabelled pod was enrolled");
    assert!(call("CHECK", "plain").run().status.success());

    // A pod the model never shows: after a bounded wait the agent says it
    // does not know it, and with fail mode closed the runtime retries.
    let started = Instant::now();
    let error = cni_error(&call("ADD", "ghost").run());
    assert_eq!(error["code"], 11, "{error}");
    assert!(
        error["msg"].as_str().unwrap().contains("Unknown"),
        "{error}"
    );
    let waited = started.elapsed();
    assert!(
        (Duration::from_secs(4)..Duration::from_secs(9)).contains(&waited),
        "waited {waited:?}"
    );
    assert!(call("DEL", "ghost").run().status.success());
}

#[test]
fn without_an_agent_the_fail_mode_decides() {
    let dir = std::env::temp_dir().join(weir_sandbox::unique_tag("cni-down"));
    fs::create_dir(&dir).unwrap();
    // No socket at all, and a socket file an agent that died left behind.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let prev = r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.2.3/24"}]}"#;
    for socket in [dir.join("missing.sock"), stale] {
        let call = |fail_mode| Call {
            command: "ADD",
            name: "client",
            netns: "/var/run/netns/does-not-matter",
            socket: &socket,
            fail_mode,
            prev_result: prev,
        };
        let error = cni_error(&call("closed").run());
        assert_eq!(error["code"], 11, "{error}");
        assert_eq!(error["cniVersion"], "1.0.0");
        assert!(
            error["msg"]
                .as_str()
                .unwrap()
                .contains("cannot reach the agent")
        );

        let open = call("open").run();
        assert!(open.status.success(), "{}", describe(&open));
        assert_eq!(stdout(&open), prev);
        assert!(String::from_utf8_lossy(&open.stderr).contains("failMode open"));

        let del = Call {
            command: "DEL",
            ..call("closed")
        }
        .run();
        assert!(del.status.success(), "{}", describe(&del));
    }
    fs::remove_dir_all(&dir).unwrap();
}
