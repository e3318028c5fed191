//! The CNI specification's side of the plugin: the environment the runtime
//! sets, the network configuration on stdin, and errors in the spec's
//! format. Versions 1.0.0, 0.4.0 and 0.3.1 share everything used here.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::protocol::DEFAULT_SOCKET;

/// What `VERSION` reports, oldest first.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.3.1", "0.4.0", "1.0.0"];
pub const LATEST_VERSION: &str = "1.0.0";

/// The plugin's name in a conflist's `type`, and its file in the bin dir.
pub const PLUGIN_TYPE: &str = "weir-cni";

/// Error codes of the CNI specification.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// The first of the codes a plugin may define: CHECK found a pod that
    /// should be enrolled and is not.
    pub const NOT_ENROLLED: u32 = 100;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniCommand {
    Add,
    Del,
    Check,
    Version,
}

impl CniCommand {
    pub fn parse(value: &str) -> Result<CniCommand, CniError> {
        match value {
            "ADD" => Ok(CniCommand::Add),
            "DEL" => Ok(CniCommand::Del),
            "CHECK" => Ok(CniCommand::Check),
            "VERSION" => Ok(CniCommand::Version),
            other => Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_COMMAND {other:?} is not supported"),
            )),
        }
    }
}

/// The `CNI_*` environment of an ADD, DEL or CHECK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Env {
    pub command: CniCommand,
    pub container_id: String,
    /// Empty on a DEL whose namespace is already gone.
    pub netns: String,
    pub ifname: String,
    pub args: PodArgs,
    pub path: String,
}

impl Env {
    /// Reads the environment through `var`, checking what the spec requires
    /// of each command.
    pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let command = CniCommand::parse(&required(&var, "CNI_COMMAND")?)?;
        let netns = match command {
            CniCommand::Add | CniCommand::Check => required(&var, "CNI_NETNS")?,
            CniCommand::Del | CniCommand::Version => var("CNI_NETNS").unwrap_or_default(),
        };
        Ok(Env {
            command,
            container_id: required(&var, "CNI_CONTAINERID")?,
            netns,
            ifname: required(&var, "CNI_IFNAME")?,
            args: PodArgs::parse(&var("CNI_ARGS").unwrap_or_default()),
            path: var("CNI_PATH").unwrap_or_default(),
        })
    }
}

fn required(var: &impl Fn(&str) -> Option<String>, name: &str) -> Result<String, CniError> {
    match var(name) {
        Some(value) if !value.is_empty() => Ok(value),
        _ => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("{name} is not set"),
        )),
    }
}

/// The pod, from `CNI_ARGS` as the kubelet's runtimes fill it in:
/// `IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=productpage-v1;…`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: Option<String>,
    pub name: Option<String>,
}

impl PodArgs {
    pub fn parse(args: &str) -> PodArgs {
        let mut pod = PodArgs::default();
        for pair in args.split(';') {
            match pair.split_once('=') {
                Some(("K8S_POD_NAMESPACE", value)) if !value.is_empty() => {
                    pod.namespace = Some(value.to_owned());
                }
                Some(("K8S_POD_NAME", value)) if !value.is_empty() => {
                    pod.name = Some(value.to_owned());
                }
                _ => {}
            }
        }
        pod
    }

    /// Namespace and name, when the runtime said both: only Kubernetes pods
    /// can be enrolled.
    pub fn pod(&self) -> Option<(&str, &str)> {
        Some((self.namespace.as_deref()?, self.name.as_deref()?))
    }
}

/// What happens to a pod while the agent cannot be reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// The pod starts anyway; discovery by IP enrolls it once the agent runs.
    #[default]
    Open,
    /// The runtime gets "try again later" and retries.
    Closed,
}

/// The network configuration on stdin, as the runtime passes it to one
/// plugin of a chain.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// The result of the plugins before this one, passed on unchanged.
    #[serde(default)]
    pub prev_result: Option<Box<RawValue>>,
    /// The agent's unix socket.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default)]
    pub fail_mode: FailMode,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            let code = if e.is_data() {
                code::INVALID_CONFIG
            } else {
                code::DECODING_FAILURE
            };
            CniError::new(code, format!("network configuration: {e}"))
        })?;
        check_version(&conf.cni_version)?;
        Ok(conf)
    }

    /// The pod's addresses from `prevResult.ips`, without prefix lengths.
    pub fn prev_ips(&self) -> Result<Vec<IpAddr>, CniError> {
        let Some(raw) = &self.prev_result else {
            return Ok(Vec::new());
        };
        #[derive(Deserialize)]
        struct Result {
            #[serde(default)]
            ips: Vec<IpConfig>,
        }
        #[derive(Deserialize)]
        struct IpConfig {
            address: String,
        }
        let result: Result = serde_json::from_str(raw.get())
            .map_err(|e| CniError::new(code::INVALID_CONFIG, format!("prevResult: {e}")))?;
        result
            .ips
            .iter()
            .map(|ip| {
                let address = ip.address.split('/').next().unwrap_or_default();
                address.parse().map_err(|_| {
                    CniError::new(
                        code::INVALID_CONFIG,
                        format!("prevResult: invalid address {:?}", ip.address),
                    )
                })
            })
            .collect()
    }

    /// What ADD prints: the previous result as it came, or, first in a
    /// chain, an empty result.
    pub fn result(&self) -> String {
        match &self.prev_result {
            Some(raw) => raw.get().to_owned(),
            None => serde_json::json!({ "cniVersion": self.cni_version }).to_string(),
        }
    }
}

pub fn check_version(version: &str) -> Result<(), CniError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {version:?} is not supported"),
        )
        .details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))))
    }
}

/// `VERSION`'s answer.
pub fn version_info() -> String {
    serde_json::json!({
        "cniVersion": LATEST_VERSION,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
    .to_string()
}

/// An error as the spec wants it on stdout, with a non-zero exit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CniError {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<String>,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            cni_version: LATEST_VERSION.to_owned(),
            code,
            msg: msg.into(),
            details: None,
        }
    }

    pub fn details(mut self, details: impl Into<String>) -> CniError {
        self.details = Some(details.into());
        self
    }

    /// Reports in the version the runtime asked for, when it is one.
    pub fn version(mut self, version: &str) -> CniError {
        if SUPPORTED_VERSIONS.contains(&version) {
            version.clone_into(&mut self.cni_version);
        }
        self
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("errors always serialize")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn kubelet_args_name_the_pod() {
        let args = PodArgs::parse(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=bookinfo;K8S_POD_NAME=reviews-v1-7d8c;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u",
        );
        assert_eq!(args.pod(), Some(("bookinfo", "reviews-v1-7d8c")));
        assert_eq!(PodArgs::parse("").pod(), None);
        assert_eq!(
            PodArgs::parse("K8S_POD_NAME=x;K8S_POD_NAMESPACE=").pod(),
            None
        );
        assert_eq!(
            PodArgs::parse("garbage;;=;K8S_POD_NAME=a=b")
                .name
                .as_deref(),
            Some("a=b")
        );
    }

    #[test]
    fn environment_per_command() {
        let add = Env::read(env(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=p"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]))
        .unwrap();
        assert_eq!(add.command, CniCommand::Add);
        assert_eq!(add.netns, "/var/run/netns/cni-1");
        assert_eq!(add.args.pod(), Some(("default", "p")));

        // ADD and CHECK need the namespace; DEL may come after it is gone.
        let without_netns = [("CNI_CONTAINERID", "c1"), ("CNI_IFNAME", "eth0")];
        for command in ["ADD", "CHECK"] {
            let mut pairs = without_netns.to_vec();
            pairs.push(("CNI_COMMAND", command));
            let error = Env::read(env(&pairs)).unwrap_err();
            assert_eq!(error.code, code::INVALID_ENVIRONMENT);
            assert!(error.msg.contains("CNI_NETNS"), "{}", error.msg);
        }
        let mut pairs = without_netns.to_vec();
        pairs.push(("CNI_COMMAND", "DEL"));
        assert_eq!(Env::read(env(&pairs)).unwrap().netns, "");

        let error = Env::read(env(&[("CNI_COMMAND", "GC")])).unwrap_err();
        assert_eq!(error.code, code::INVALID_ENVIRONMENT);
        let error = Env::read(env(&[("CNI_COMMAND", "DEL"), ("CNI_IFNAME", "eth0")])).unwrap_err();
        assert!(error.msg.contains("CNI_CONTAINERID"));
    }

    #[test]
    fn chained_config_with_defaults() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"weir-cni",
                 "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],
                   "ips":[{"address":"10.244.63.2/24","gateway":"10.244.63.1","interface":0},
                          {"address":"fd00::2/64"}]}}"#,
        )
        .unwrap();
        assert_eq!(conf.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(conf.fail_mode, FailMode::Open);
        assert_eq!(
            conf.prev_ips().unwrap(),
            vec![
                "10.244.63.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
        // Passed on byte for byte, line breaks and all.
        let result = conf.result();
        assert!(result.starts_with(r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0"}],"#));
        assert!(
            result.ends_with("{\"address\":\"fd00::2/64\"}]}"),
            "{result}"
        );
        assert_eq!(result.lines().count(), 3);

        let conf = NetConf::parse(
            br#"{"cniVersion":"0.3.1","name":"n","type":"weir-cni","socket":"/run/x.sock","failMode":"closed","prevResult":null}"#,
        )
        .unwrap();
        assert_eq!(conf.socket, PathBuf::from("/run/x.sock"));
        assert_eq!(conf.fail_mode, FailMode::Closed);
        assert!(conf.prev_ips().unwrap().is_empty());
        assert_eq!(conf.result(), r#"{"cniVersion":"0.3.1"}"#);
    }

    #[test]
    fn config_errors_carry_the_spec_codes() {
        let error = NetConf::parse(b"{not json").unwrap_err();
        assert_eq!(error.code, code::DECODING_FAILURE);
        let error =
            NetConf::parse(br#"{"cniVersion":"1.0.0","failMode":"sometimes"}"#).unwrap_err();
        assert_eq!(error.code, code::INVALID_CONFIG);
        let error = NetConf::parse(br#"{"cniVersion":"0.2.0"}"#).unwrap_err();
        assert_eq!(error.code, code::INCOMPATIBLE_VERSION);
        let conf = NetConf::parse(
            br#"{"cniVersion":"0.4.0","prevResult":{"ips":[{"address":"nonsense"}]}}"#,
        )
        .unwrap();
        assert_eq!(conf.prev_ips().unwrap_err().code, code::INVALID_CONFIG);

        let json: serde_json::Value = serde_json::from_str(
            &CniError::new(code::TRY_AGAIN_LATER, "agent down")
                .version("0.4.0")
                .to_json(),
        )
        .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"cniVersion": "0.4.0", "code": 11, "msg": "agent down"})
        );
    }

    #[test]
    fn version_lists_every_supported_version() {
        let json: serde_json::Value = serde_json::from_str(&version_info()).unwrap();
        assert_eq!(json["cniVersion"], "1.0.0");
        assert_eq!(
            json["supportedVersions"],
            serde_json::json!(["0.3.1", "0.4.0", "1.0.0"])
        );
    }
}
