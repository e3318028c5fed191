//! The iptables fallback: the same proxy, fed by a REDIRECT in the pod's
//! nat table instead of connect4.

mod common;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use common::{ECHO, echo, metric, serve_echo, wait_until};
use weir_sandbox::{NodeId, Pod, PodSpec, Sandbox, SandboxOptions};

fn nat_table(pod: &Pod) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", pod.netns().path().display()))
        .args(["iptables-save", "-t", "nat"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn iptables_redirect_feeds_the_same_proxy() {
    let mut sb = Sandbox::new(SandboxOptions::for_test("iptables")).unwrap();
    let server = sb
        .add_pod(PodSpec::new("server", NodeId::Xuegod64).ports(&[("echo", ECHO)]))
        .unwrap();
    serve_echo(&server);
    let client = sb
        .add_pod(
            PodSpec::new("client", NodeId::Xuegod63)
                .label("weir.dev/mesh", "enabled")
                .annotation("weir.dev/exclude-outbound-ports", "7001"),
        )
        .unwrap();
    let agent = sb
        .start_agent(NodeId::Xuegod63, &["--interception", "iptables"])
        .unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let rules = nat_table(&client);
    assert!(rules.contains("REDIRECT --to-ports 15001"), "{rules}");
    assert!(rules.contains("--dport 7001 -j RETURN"), "{rules}");

    let target = server.addr(ECHO);
    let mut stream = client.connect(target).unwrap();
    // NAT is invisible to the app: its socket is connected to the server.
    assert_eq!(stream.peer_addr().unwrap(), target);
    let seen = echo(&mut stream, b"through iptables").unwrap().peer;
    assert_eq!(
        seen.ip(),
        IpAddr::V4(client.ip()),
        "server must see the pod's own IP"
    );
    let labels = [
        ("source_workload", "client"),
        ("destination_workload", "server"),
    ];
    assert_eq!(
        metric(&agent, "istio_tcp_connections_opened_total", &labels),
        1.0
    );
    // connect4 took no part: the pod is not in its map.
    let redirected = [("direction", "outbound"), ("decision", "redirected")];
    assert_eq!(metric(&agent, "weir_decisions_total", &redirected), 0.0);

    // Gone from the manifests (its namespace stays): the rules go, and the
    // pod's connections still work, direct.
    sb.remove_manifest("pod-default-client.yaml").unwrap();
    wait_until("the pod's rules are removed", || {
        !nat_table(&client).contains("WEIR_OUTPUT")
    });
    let mut stream = client.connect(target).unwrap();
    echo(&mut stream, b"direct").unwrap();
}
