//! ADD, DEL, CHECK and VERSION, as a container runtime calls them.

use std::io::Write;
use std::time::Duration;

use crate::protocol::{self, Command, Reply, Request, Status};
use crate::spec::{CniCommand, CniError, Env, FailMode, NetConf, code, version_info};

/// How long the plugin waits for the agent at each step of ADD and CHECK;
/// the agent itself answers within about 5 s.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// DEL is best effort and must not hold up a pod's deletion for long.
pub const DEL_TIMEOUT: Duration = Duration::from_secs(3);

/// What the plugin prints and how it exits.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: String,
    pub exit_code: u8,
}

impl Outcome {
    fn success(stdout: String) -> Outcome {
        Outcome {
            stdout,
            exit_code: 0,
        }
    }

    fn error(error: &CniError) -> Outcome {
        Outcome {
            stdout: error.to_json(),
            exit_code: 1,
        }
    }
}

/// Runs one CNI command: `var` reads the environment, `stdin` is the
/// network configuration, `log` is stderr.
pub fn run(var: impl Fn(&str) -> Option<String>, stdin: &[u8], log: &mut dyn Write) -> Outcome {
    match var("CNI_COMMAND").as_deref() {
        Some("VERSION") => return Outcome::success(version_info()),
        None | Some("") => {
            return Outcome::error(&CniError::new(
                code::INVALID_ENVIRONMENT,
                "CNI_COMMAND is not set",
            ));
        }
        Some(_) => {}
    }
    let conf = match NetConf::parse(stdin) {
        Ok(conf) => conf,
        Err(error) => return Outcome::error(&error),
    };
    match Env::read(&var).and_then(|env| command(&env, &conf, log)) {
        Ok(stdout) => Outcome::success(stdout),
        Err(error) => Outcome::error(&error.version(&conf.cni_version)),
    }
}

fn command(env: &Env, conf: &NetConf, log: &mut dyn Write) -> Result<String, CniError> {
    let Some((namespace, name)) = env.args.pod() else {
        // Not a Kubernetes pod: nothing the agent could enroll.
        let _ = writeln!(
            log,
            "weir-cni: no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS; passing through"
        );
        return Ok(pass_through(env, conf));
    };
    let pod = format!("{namespace}/{name}");
    let mut request = Request {
        command: Command::Add,
        pod_namespace: namespace.to_owned(),
        pod_name: name.to_owned(),
        container_id: env.container_id.clone(),
        netns: env.netns.clone(),
        ips: Vec::new(),
    };
    match env.command {
        CniCommand::Add => {
            request.ips = conf.prev_ips()?;
            let reply = protocol::call(&conf.socket, &request, AGENT_TIMEOUT);
            settle(&pod, "ADD", reply, conf, log)?;
            Ok(conf.result())
        }
        CniCommand::Check => {
            request.command = Command::Check;
            let reply = protocol::call(&conf.socket, &request, AGENT_TIMEOUT);
            settle(&pod, "CHECK", reply, conf, log)?;
            Ok(String::new())
        }
        CniCommand::Del => {
            request.command = Command::Del;
            if let Err(e) = protocol::call(&conf.socket, &request, DEL_TIMEOUT) {
                let _ = writeln!(log, "weir-cni: DEL {pod}: agent not told ({e}); ignored");
            }
            Ok(String::new())
        }
        CniCommand::Version => Ok(version_info()),
    }
}

/// ADD's output, or nothing for DEL and CHECK.
fn pass_through(env: &Env, conf: &NetConf) -> String {
    match env.command {
        CniCommand::Add => conf.result(),
        CniCommand::Del | CniCommand::Check => String::new(),
        CniCommand::Version => version_info(),
    }
}

/// Turns the agent's answer, or the failure to get one, into success or a
/// CNI error. An enrolled pod, or one that is not to be enrolled, is fine.
/// Anything else means the pod would start without the mesh: with fail mode
/// open that is logged and let be (discovery by IP enrolls it later), with
/// fail mode closed the runtime is told to try again later.
fn settle(
    pod: &str,
    what: &str,
    reply: std::io::Result<Reply>,
    conf: &NetConf,
    log: &mut dyn Write,
) -> Result<(), CniError> {
    let problem = match reply {
        Ok(Reply {
            status: Status::Enrolled | Status::NotEnrolled,
            ..
        }) => return Ok(()),
        Ok(Reply {
            status: Status::Pending,
            message,
        }) if what == "CHECK" => {
            return Err(CniError::new(
                code::NOT_ENROLLED,
                format!("pod {pod} is to be enrolled in the mesh but is not"),
            )
            .details(message.unwrap_or_default()));
        }
        Ok(Reply {
            status: Status::Unknown,
            ..
        }) if what == "CHECK" => {
            let _ = writeln!(
                log,
                "weir-cni: CHECK {pod}: the agent does not know the pod"
            );
            return Ok(());
        }
        Ok(Reply { status, message }) => format!(
            "the agent answered {status:?}{}",
            message.map(|m| format!(": {m}")).unwrap_or_default()
        ),
        Err(e) => format!("cannot reach the agent at {}: {e}", conf.socket.display()),
    };
    match conf.fail_mode {
        FailMode::Open => {
            let _ = writeln!(
                log,
                "weir-cni: {what} {pod}: {problem}; failMode open, so the pod starts without waiting for the mesh"
            );
            Ok(())
        }
        FailMode::Closed => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!("{what} {pod}: {problem}"),
        )
        .details("failMode closed: the pod may not start before weir enrolls it")),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::os::unix::net::UnixListener;
    use std::path::{Path, PathBuf};

    use super::*;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir =
                std::env::temp_dir().join(format!("weir-cni-plugin-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cni_env(command: &str) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<&str, String> = [
            ("CNI_COMMAND", command.to_owned()),
            ("CNI_CONTAINERID", "c1".to_owned()),
            ("CNI_NETNS", "/var/run/netns/cni-1".to_owned()),
            ("CNI_IFNAME", "eth0".to_owned()),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p".to_owned(),
            ),
        ]
        .into_iter()
        .collect();
        move |name| map.get(name).cloned()
    }

    fn config(socket: &Path, fail_mode: &str) -> Vec<u8> {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"net","type":"weir-cni","socket":{:?},"failMode":"{fail_mode}",
               "prevResult":{{"cniVersion":"1.0.0","ips":[{{"address":"10.1.2.3/24"}}]}}}}"#,
            socket.to_str().unwrap()
        )
        .into_bytes()
    }

    /// An agent that answers one request with `reply` and returns what it was asked.
    fn fake_agent(socket: &Path, reply: Reply) -> std::thread::JoinHandle<Request> {
        let listener = UnixListener::bind(socket).unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let request: Request = protocol::decode(&stream).unwrap();
            stream.write_all(&protocol::encode(&reply)).unwrap();
            request
        })
    }

    #[test]
    fn add_tells_the_agent_and_passes_the_result_on() {
        let dir = TempDir::new("add");
        let socket = dir.0.join("cni.sock");
        let agent = fake_agent(&socket, Reply::new(Status::Enrolled));
        let mut log = Vec::new();
        let outcome = run(cni_env("ADD"), &config(&socket, "closed"), &mut log);
        assert_eq!(outcome.exit_code, 0, "{}", outcome.stdout);
        assert_eq!(
            outcome.stdout,
            r#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.2.3/24"}]}"#
        );
        let request = agent.join().unwrap();
        assert_eq!(request.command, Command::Add);
        assert_eq!(
            (request.pod_namespace.as_str(), request.pod_name.as_str()),
            ("default", "p")
        );
        assert_eq!(request.netns, "/var/run/netns/cni-1");
        assert_eq!(
            request.ips,
            vec!["10.1.2.3".parse::<std::net::IpAddr>().unwrap()]
        );
    }

    #[test]
    fn fail_mode_decides_when_the_agent_is_down_or_unsure() {
        let dir = TempDir::new("down");
        let socket = dir.0.join("nobody.sock");
        let mut log = Vec::new();
        let open = run(cni_env("ADD"), &config(&socket, "open"), &mut log);
        assert_eq!(open.exit_code, 0);
        assert!(open.stdout.contains("10.1.2.3/24"));
        assert!(String::from_utf8_lossy(&log).contains("cannot reach the agent"));

        let closed = run(cni_env("ADD"), &config(&socket, "closed"), &mut log);
        assert_eq!(closed.exit_code, 1);
        let error: serde_json::Value = serde_json::from_str(&closed.stdout).unwrap();
        assert_eq!(error["code"], 11);
        assert_eq!(error["cniVersion"], "1.0.0");

        // DEL always succeeds.
        let del = run(cni_env("DEL"), &config(&socket, "closed"), &mut log);
        assert_eq!(del, Outcome::success(String::new()));

        // An agent that has not enrolled the pod in time counts as down.
        let agent = fake_agent(&socket, Reply::new(Status::Pending));
        let closed = run(cni_env("ADD"), &config(&socket, "closed"), &mut log);
        agent.join().unwrap();
        assert_eq!(closed.exit_code, 1);
        assert!(closed.stdout.contains(r#""code":11"#), "{}", closed.stdout);
    }

    #[test]
    fn check_fails_only_for_a_pod_that_should_be_enrolled() {
        let dir = TempDir::new("check");
        let socket = dir.0.join("cni.sock");
        for (status, exit_code) in [
            (Status::Enrolled, 0),
            (Status::NotEnrolled, 0),
            (Status::Unknown, 0),
            (Status::Pending, 1),
        ] {
            let agent = fake_agent(&socket, Reply::new(status));
            let outcome = run(cni_env("CHECK"), &config(&socket, "open"), &mut Vec::new());
            assert_eq!(agent.join().unwrap().command, Command::Check);
            assert_eq!(
                outcome.exit_code, exit_code,
                "{status:?}: {}",
                outcome.stdout
            );
            if exit_code == 1 {
                assert!(outcome.stdout.contains(r#""code":100"#));
            }
            std::fs::remove_file(&socket).unwrap();
        }
    }

    #[test]
    fn pods_the_runtime_does_not_name_pass_through() {
        let env = |name: &str| match name {
            "CNI_COMMAND" => Some("ADD".to_owned()),
            "CNI_CONTAINERID" | "CNI_NETNS" | "CNI_IFNAME" => Some("x".to_owned()),
            _ => None,
        };
        let outcome = run(
            env,
            &config(Path::new("/nonexistent"), "closed"),
            &mut Vec::new(),
        );
        assert_eq!(outcome.exit_code, 0);
        assert!(outcome.stdout.contains("10.1.2.3/24"));
    }
}
