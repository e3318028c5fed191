//! The agent's side of the CNI plugin (`weir run --cni-socket PATH`).
//!
//! `weir-cni` runs in the container runtime when a pod's sandbox is made,
//! before any of the pod's containers, and asks this agent over a unix
//! socket (protocol: [`weir_cni::protocol`]) to enroll the pod. The agent
//! records the namespace the plugin names as a hint, which enrollment tries
//! before scanning, runs a pass at once, and answers once the pod is
//! enrolled, so the pod's first `connect()` is already steered. It answers
//! sooner when the model says the pod is not to be enrolled, and after
//! [`ADD_WAIT`] at the latest: then the pod is unknown to the model or still
//! pending, and the plugin's fail mode decides.
//!
//! The server task only reads and writes the socket. Requests reach the
//! main loop (`run.rs`) through a channel, and are answered there after a
//! reconcile pass, so that hints and enrollment stay in one place.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};
use weir_cni::protocol::{self, Command, MAX_MESSAGE, Reply, Request, Status};

use crate::enrollment::Enrollment;
use crate::model::{Cluster, WorkloadKey};

/// How long an ADD may wait for the model to know its pod and for the pod's
/// enrollment. The plugin waits 10 s for the answer.
pub const ADD_WAIT: Duration = Duration::from_secs(5);
/// How long a plugin may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A request from the server task, with the way back to its connection.
#[derive(Debug)]
pub struct Incoming {
    request: Request,
    reply: oneshot::Sender<Reply>,
}

/// What [`Cni::next`] waited for.
#[derive(Debug)]
pub enum Event {
    Request(Incoming),
    /// A waiting ADD ran out of time; the pass after it answers.
    Deadline,
}

/// A request waiting for a pass to answer it.
struct Pending {
    key: WorkloadKey,
    command: Command,
    deadline: Instant,
    reply: oneshot::Sender<Reply>,
}

/// The CNI server and the requests it waits to answer.
pub struct Cni {
    node: String,
    requests: Option<mpsc::Receiver<Incoming>>,
    pending: Vec<Pending>,
    server: Option<(SocketFile, JoinHandle<()>)>,
}

impl Cni {
    /// No `--cni-socket`: no server, and [`Cni::next`] never returns.
    pub fn disabled(node: String) -> Cni {
        Cni {
            node,
            requests: None,
            pending: Vec::new(),
            server: None,
        }
    }

    /// Listens on `path`, replacing a socket file an earlier agent left.
    /// Only root may connect: a hint decides which namespace a pod's
    /// traffic is taken from.
    pub fn listen(path: &Path, node: String) -> anyhow::Result<Cni> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => debug!(socket = %path.display(), "removed a stale CNI socket"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let (requests, receiver) = mpsc::channel(64);
        let task = tokio::spawn(serve(listener, requests));
        info!(socket = %path.display(), "listening for the CNI plugin");
        Ok(Cni {
            node,
            requests: Some(receiver),
            pending: Vec::new(),
            server: Some((SocketFile::of(path)?, task)),
        })
    }

    /// The next request, or the deadline of a waiting one.
    pub async fn next(&mut self) -> Event {
        let deadline = self.pending.iter().map(|p| p.deadline).min();
        let requests = self.requests.as_mut();
        tokio::select! {
            Some(incoming) = async move {
                match requests {
                    Some(requests) => requests.recv().await,
                    None => std::future::pending().await,
                }
            } => Event::Request(incoming),
            () = async move {
                match deadline {
                    Some(deadline) => tokio::time::sleep_until(deadline).await,
                    None => std::future::pending().await,
                }
            } => Event::Deadline,
        }
    }

    /// Takes a request in. ADD records its hint and waits for a pass to
    /// enroll the pod; DEL drops the hint. The pass after this answers.
    pub fn handle(&mut self, event: Event, enrollment: &mut Enrollment) {
        let Event::Request(Incoming { request, reply }) = event else {
            return;
        };
        let key = WorkloadKey {
            namespace: request.pod_namespace,
            name: request.pod_name,
        };
        let mut deadline = Instant::now();
        match request.command {
            Command::Add => {
                let netns = Path::new(&request.netns);
                info!(pod = %key, netns = %netns.display(), ips = ?request.ips, container = %request.container_id, "CNI ADD");
                if let Err(e) = enrollment.hint(&key, &request.container_id, netns, request.ips) {
                    warn!(pod = %key, netns = %netns.display(), error = %e, "CNI ADD: cannot open the namespace");
                    let _ = reply.send(Reply::error(format!(
                        "cannot open network namespace {:?}: {e}",
                        request.netns
                    )));
                    return;
                }
                deadline += ADD_WAIT;
            }
            Command::Del => {
                info!(pod = %key, container = %request.container_id, "CNI DEL");
                enrollment.unhint(&key, &request.container_id);
            }
            Command::Check => {}
        }
        self.pending.push(Pending {
            key,
            command: request.command,
            deadline,
            reply,
        });
    }

    /// After a pass: answers every request whose pod is enrolled or not to
    /// be, and those whose time is up, with what the agent knows now.
    pub fn settle(&mut self, cluster: &Cluster, enrollment: &Enrollment) {
        if self.pending.is_empty() {
            return;
        }
        let now = Instant::now();
        for pending in std::mem::take(&mut self.pending) {
            let status = status(cluster, enrollment, &self.node, &pending.key);
            let settled = matches!(status, Status::Enrolled | Status::NotEnrolled)
                || pending.command != Command::Add
                || now >= pending.deadline;
            if !settled && !pending.reply.is_closed() {
                self.pending.push(pending);
                continue;
            }
            let message = match status {
                Status::Pending if pending.command == Command::Add => {
                    Some(format!("not enrolled after {ADD_WAIT:?}"))
                }
                Status::Unknown => Some(format!(
                    "no pod {} in the agent's model of the cluster",
                    pending.key
                )),
                _ => None,
            };
            if pending.command == Command::Add {
                info!(pod = %pending.key, ?status, "CNI ADD answered");
            }
            let _ = pending.reply.send(Reply { status, message });
        }
    }
}

/// What the model and the enrollment say about one pod.
fn status(cluster: &Cluster, enrollment: &Enrollment, node: &str, key: &WorkloadKey) -> Status {
    match cluster.workload(key) {
        None => Status::Unknown,
        Some(workload) if workload.enrolled && workload.node.as_deref() == Some(node) => {
            if enrollment.is_enrolled(key) {
                Status::Enrolled
            } else {
                Status::Pending
            }
        }
        Some(_) => Status::NotEnrolled,
    }
}

impl Drop for Cni {
    /// Stops accepting and removes the socket, so that plugins find no
    /// agent at once and follow their fail mode. Requests still waiting get
    /// an error when their senders go with `pending`.
    fn drop(&mut self) {
        if let Some((socket, task)) = self.server.take() {
            task.abort();
            socket.remove();
        }
    }
}

/// The socket file this agent bound. During a rolling update the next
/// agent binds its own at the same path before this one stops, so only the
/// file that is still this agent's own is removed.
struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl SocketFile {
    fn of(path: &Path) -> io::Result<SocketFile> {
        let metadata = std::fs::metadata(path)?;
        Ok(SocketFile {
            path: path.to_path_buf(),
            id: (metadata.dev(), metadata.ino()),
        })
    }

    fn remove(self) {
        let ours = std::fs::metadata(&self.path)
            .is_ok_and(|metadata| (metadata.dev(), metadata.ino()) == self.id);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

async fn serve(listener: UnixListener, requests: mpsc::Sender<Incoming>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "accepting a CNI connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            if let Err(e) = exchange(stream, requests).await {
                debug!(error = %e, "CNI connection failed");
            }
        });
    }
}

/// One request line in, one reply line out.
async fn exchange(stream: UnixStream, requests: mpsc::Sender<Incoming>) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read.take(MAX_MESSAGE));
    tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request"))??;
    let reply = match serde_json::from_slice::<Request>(&line) {
        Err(e) => Reply::error(format!("bad request: {e}")),
        Ok(request) => {
            let (reply, answer) = oneshot::channel();
            let stopping = || Reply::error("the agent is stopping");
            if requests.send(Incoming { request, reply }).await.is_err() {
                stopping()
            } else {
                answer.await.unwrap_or_else(|_| stopping())
            }
        }
    };
    write.write_all(&protocol::encode(&reply)).await?;
    write.shutdown().await
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn a_socket_file_replaced_by_the_next_agent_is_left_alone() {
        let dir = std::env::temp_dir().join(format!("weir-cni-socket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cni.sock");
        let _ = std::fs::remove_file(&path);

        let _old = UnixListener::bind(&path).unwrap();
        let old = SocketFile::of(&path).unwrap();
        // The next agent removes the file and binds its own.
        std::fs::remove_file(&path).unwrap();
        let _new = UnixListener::bind(&path).unwrap();
        old.remove();
        assert!(
            path.exists(),
            "the old agent removed the new agent's socket"
        );

        SocketFile::of(&path).unwrap().remove();
        assert!(!path.exists(), "an agent left its own socket behind");
        std::fs::remove_dir(&dir).unwrap();
    }
}
