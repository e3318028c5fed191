//! The plugin ↔ agent protocol, over the agent's unix socket (`weir run
//! --cni-socket`, by default [`DEFAULT_SOCKET`]).
//!
//! Per connection: the plugin writes one [`Request`] as a line of JSON, the
//! agent answers with one [`Reply`] as a line of JSON and closes. Unknown
//! fields are ignored on both sides, so either may add some.
//!
//! ```text
//! → {"command":"add","pod_namespace":"default","pod_name":"productpage-v1",
//!    "container_id":"4b1f…","netns":"/var/run/netns/cni-1c2d…","ips":["10.244.63.2"]}
//! ← {"status":"enrolled"}
//! ```

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the agent listens unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/weir/cni.sock";

/// The longest request or reply line either side accepts.
pub const MAX_MESSAGE: u64 = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// A pod sandbox was made: enroll it now, answer once done.
    Add,
    /// The sandbox goes away: forget what ADD said.
    Del,
    /// Is the pod enrolled as it should be?
    Check,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub pod_namespace: String,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub pod_name: String,
    /// `CNI_CONTAINERID`: the sandbox, which changes when a pod's sandbox is
    /// made again.
    pub container_id: String,
    /// `CNI_NETNS`: the pod's network namespace file. May be empty on DEL.
    #[serde(default)]
    pub netns: String,
    /// The pod's addresses, from `prevResult.ips`.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// What the agent knows about the pod when it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The pod's traffic is taken over.
    Enrolled,
    /// The pod is not to be enrolled (not labelled, opted out, host
    /// network, another node's).
    NotEnrolled,
    /// The pod is to be enrolled but is not (yet).
    Pending,
    /// The agent's model does not know the pod (yet).
    Unknown,
    /// The request itself failed; see the message.
    Error,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub status: Status,
    /// Why, for the runtime's log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Reply {
    pub fn new(status: Status) -> Reply {
        Reply {
            status,
            message: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Reply {
        Reply {
            status: Status::Error,
            message: Some(message.into()),
        }
    }
}

/// One JSON document and a newline.
pub fn encode<T: Serialize>(message: &T) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("protocol types always serialize");
    line.push(b'\n');
    line
}

/// One line of JSON, at most [`MAX_MESSAGE`] bytes.
pub fn decode<T: for<'de> Deserialize<'de>>(reader: impl Read) -> io::Result<T> {
    let mut line = Vec::new();
    BufReader::new(reader.take(MAX_MESSAGE)).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the other side closed without a message",
        ));
    }
    serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Sends `request` to the agent at `socket` and waits at most `timeout` for
/// each step (connect, write, read) of the exchange.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> io::Result<Reply> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(&encode(request))?;
    decode(&stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_json_line_each() {
        let request = Request {
            command: Command::Add,
            pod_namespace: "default".into(),
            pod_name: "productpage-v1".into(),
            container_id: "4b1f".into(),
            netns: "/var/run/netns/cni-1".into(),
            ips: vec!["10.244.63.2".parse().unwrap()],
        };
        let line = encode(&request);
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.starts_with(r#"{"command":"add","pod_namespace":"default""#));
        assert_eq!(decode::<Request>(&line[..]).unwrap(), request);

        let reply = Reply::new(Status::NotEnrolled);
        assert_eq!(encode(&reply), b"{\"status\":\"not_enrolled\"}\n");
        let error: Reply =
            decode(&br#"{"status":"error","message":"no such netns","more":1}"#[..]).unwrap();
        assert_eq!(error, Reply::error("no such netns"));
    }

    #[test]
    fn a_closed_stream_is_an_error() {
        let error = decode::<Reply>(&b""[..]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
        let error = decode::<Reply>(&b"{not json}\n"[..]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
