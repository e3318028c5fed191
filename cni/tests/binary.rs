//! The built `weir-cni` executable, run the way a container runtime and the
//! DaemonSet's init container run it.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn weir_cni(env: &[(&str, &str)], args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir-cni"))
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn version_reports_the_supported_versions() {
    let output = weir_cni(
        &[("CNI_COMMAND", "VERSION")],
        &[],
        r#"{"cniVersion":"1.0.0"}"#,
    );
    assert!(output.status.success());
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        json["supportedVersions"],
        serde_json::json!(["0.3.1", "0.4.0", "1.0.0"])
    );
}

#[test]
fn errors_are_json_on_stdout_with_a_failing_exit() {
    let output = weir_cni(
        &[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c")],
        &[],
        r#"{"cniVersion":"0.4.0","name":"n","type":"weir-cni"}"#,
    );
    assert_eq!(output.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["code"], 4, "{json}");
    assert_eq!(json["cniVersion"], "0.4.0");

    let output = weir_cni(&[("CNI_COMMAND", "DEL")], &[], "not json");
    assert_eq!(output.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["code"], 6, "{json}");
}

#[test]
fn without_cni_command_it_is_the_installer() {
    let output = weir_cni(&[], &["--help"], "");
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("weir-cni install"));
    let output = weir_cni(&[], &["install", "--bogus", "x"], "");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown option"));
}
