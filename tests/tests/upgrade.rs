//! An agent of another build, or one that finds an older map layout, swaps
//! its programs into the pinned links with BPF_LINK_UPDATE: the cgroup never
//! runs without the programs, and no link is added or lost.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

use weir::datapath::{PROGRAMS, PinDir};
use weir_common::{LAYOUT_VERSION, Settings};
use weir_sandbox::{NodeId, PodSpec, Sandbox, SandboxOptions};

fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool")
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (link id, program id) of every pinned link: the cgroup links and the
/// enrolled pod's sk_lookup link.
fn links(pins: &Path) -> Vec<(u64, u64)> {
    let inbound = std::fs::read_dir(pins.join("links/inbound"))
        .unwrap()
        .map(|entry| entry.unwrap().path());
    let links: Vec<_> = PROGRAMS
        .iter()
        .map(|name| pins.join("links").join(name))
        .chain(inbound)
        .collect();
    assert_eq!(links.len(), PROGRAMS.len() + 1);
    links
        .iter()
        .map(|link| {
            let info = bpftool_json(&["link", "show", "pinned", link.to_str().unwrap()]);
            (
                info["id"].as_u64().unwrap(),
                info["prog_id"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn attachments(cgroup: &Path) -> usize {
    bpftool_json(&["cgroup", "show", cgroup.to_str().unwrap()])
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn other_build_and_older_layout_replace_programs_in_place() {
    let mut sb = Sandbox::new(SandboxOptions::for_test("upgrade")).unwrap();
    let client = sb
        .add_pod(PodSpec::new("client", NodeId::Xuegod63).label("weir.dev/mesh", "enabled"))
        .unwrap();
    let server = sb
        .add_pod(PodSpec::new("server", NodeId::Xuegod64))
        .unwrap();
    let listener = server.listen(7000).unwrap();
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let peer = stream.peer_addr().unwrap();
            let _ = stream.write_all(peer.ip().to_string().as_bytes());
        }
    });
    let pins = PinDir::for_node(sb.node(NodeId::Xuegod63).name())
        .path()
        .to_path_buf();

    let agent = sb.start_agent(NodeId::Xuegod63, &[]).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let before = links(&pins);
    let attached = attachments(sb.cgroup_path());
    assert_eq!(attached, PROGRAMS.len());
    agent.sigterm().unwrap();
    assert!(
        agent
            .wait_timeout(Duration::from_secs(10))
            .unwrap()
            .success()
    );

    // Make the pins look like another build's, with an older map layout
    // beside them.
    let settings = pins.join(format!("maps-v{LAYOUT_VERSION}/SETTINGS"));
    let mut update = vec![
        "map",
        "update",
        "pinned",
        settings.to_str().unwrap(),
        "key",
        "0",
        "0",
        "0",
        "0",
        "value",
    ];
    let value: Vec<String> = (0..size_of::<Settings>())
        // Byte 8 is the low byte of `build_id`.
        .map(|i| if i == 8 { "1" } else { "0" }.to_owned())
        .collect();
    update.extend(value.iter().map(String::as_str));
    let out = Command::new("bpftool").args(&update).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let older = pins.join(format!("maps-v{}", LAYOUT_VERSION - 1));
    std::fs::create_dir(&older).unwrap();

    let agent = sb.start_agent(NodeId::Xuegod63, &[]).unwrap();
    agent.wait_ready(Duration::from_secs(20)).unwrap();
    let after = links(&pins);
    for ((link_before, prog_before), (link_after, prog_after)) in before.iter().zip(&after) {
        assert_eq!(link_before, link_after, "the link must stay the same");
        assert_ne!(prog_before, prog_after, "the program must be replaced");
    }
    assert_eq!(
        attachments(sb.cgroup_path()),
        attached,
        "no attachment added or lost"
    );
    assert!(!older.exists(), "the older layout must be removed");

    // And the new programs redirect.
    let mut stream = client.connect(server.addr(7000)).unwrap();
    assert_eq!(
        stream.local_addr().unwrap().ip(),
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    );
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.shutdown(Shutdown::Write).unwrap();
    let mut seen = String::new();
    stream.read_to_string(&mut seen).unwrap();
    assert_eq!(seen, client.ip().to_string());
}
