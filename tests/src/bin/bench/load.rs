//! The load generator: each workload runs on a fresh thread inside the
//! client pod's network namespace, with a single-threaded tokio runtime, so
//! every socket it opens belongs to the pod (and, this process being in the
//! sandbox's pods cgroup, passes through the sandbox's eBPF programs).
//!
//! Every loop stops by itself, at a deadline and at a maximum count.

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use weir_sandbox::Pod;

use crate::meter::{Snapshot, Usage};

/// Request and response size.
pub const MESSAGE: usize = 1024;
const BULK_CHUNK: usize = 128 * 1024;
/// Connecting, one request, one idle ping: each must finish within this.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Caps on count, whatever the deadline says.
const MAX_REQUESTS_PER_WORKER: u64 = 50_000_000;
const MAX_BULK_BYTES: u64 = 1 << 40;
/// Latencies are recorded in nanoseconds, up to a minute.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// How long one measurement runs: first unmeasured, then measured.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub warmup: Duration,
    pub measure: Duration,
}

/// Who is measured besides this process.
#[derive(Clone, Debug)]
pub struct Meters {
    pub agent_pids: Vec<u32>,
}

/// A request/response or connection-rate result.
#[derive(Clone, Debug)]
pub struct Measured {
    /// Requests (or connections) completed inside the measured window.
    pub count: u64,
    pub per_second: f64,
    pub latency: Histogram<u64>,
    pub usage: Usage,
}

/// A bulk transfer result.
#[derive(Clone, Debug)]
pub struct Bulk {
    pub bytes: u64,
    pub gbit_per_second: f64,
    pub usage: Usage,
}

/// What a client expects of its own connections: redirected by connect4
/// to the agent's 127.0.0.1:15001 (local address on loopback) or not.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    pub redirected: bool,
}

impl Expect {
    fn check(self, stream: &TcpStream) -> Result<()> {
        let local = stream.local_addr()?;
        let redirected = local.ip().is_loopback();
        ensure!(
            redirected == self.redirected,
            "the client's connection has local address {local}: it was {}redirected to the agent, \
             which this scenario does not expect",
            if redirected { "" } else { "not " }
        );
        Ok(())
    }
}

/// Runs `work` on a new thread inside `pod`'s network namespace, on a
/// single-threaded runtime, and returns its result.
pub fn in_pod<T, F, Fut>(pod: &Pod, work: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<T>>,
{
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name(format!("load-{}", pod.name()))
            .spawn_scoped(scope, || {
                pod.netns()
                    .enter()
                    .with_context(|| format!("cannot enter pod {}", pod.name()))?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(work())
            })?
            .join()
            .map_err(|_| anyhow!("the load generator panicked"))?
    })
}

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds")
}

async fn connect(server: SocketAddr, expect: Expect) -> Result<TcpStream> {
    let stream = timeout(IO_TIMEOUT, TcpStream::connect(server))
        .await
        .with_context(|| format!("connecting to {server} timed out"))?
        .with_context(|| format!("cannot connect to {server}"))?;
    stream.set_nodelay(true)?;
    expect.check(&stream)?;
    Ok(stream)
}

/// Takes a snapshot at the start and the end of the measured window.
async fn meter_window(meters: &Meters, from: Instant, until: Instant) -> Result<Usage> {
    tokio::time::sleep_until(from.into()).await;
    let before = Snapshot::take(&meters.agent_pids)?;
    tokio::time::sleep_until(until.into()).await;
    let after = Snapshot::take(&meters.agent_pids)?;
    Ok(before.until(&after))
}

type Worker =
    tokio::task::JoinHandle<Result<Result<(Histogram<u64>, u64)>, tokio::time::error::Elapsed>>;

/// Merges the workers' histograms and counts into one measurement.
async fn gather(
    workers: Vec<Worker>,
    window: Window,
    usage: Usage,
    what: &str,
) -> Result<Measured> {
    let mut latency = histogram();
    let mut count = 0;
    for worker in workers {
        let (histogram, n) = worker
            .await?
            .with_context(|| format!("{what} timed out"))??;
        latency.add(histogram)?;
        count += n;
    }
    Ok(Measured {
        count,
        per_second: count as f64 / window.measure.as_secs_f64(),
        latency,
        usage,
    })
}

/// `connections` kept-open connections, each writing 1 KiB and reading the
/// 1 KiB echo back, one request at a time.
pub async fn request_response(
    server: SocketAddr,
    connections: usize,
    window: Window,
    meters: &Meters,
    expect: Expect,
) -> Result<Measured> {
    let streams = connect_all(server, connections, expect).await?;
    closed_loop(
        streams,
        window,
        meters,
        "a request/response worker",
        rr_worker,
    )
    .await
}

async fn connect_all(
    server: SocketAddr,
    connections: usize,
    expect: Expect,
) -> Result<Vec<TcpStream>> {
    let mut streams = Vec::with_capacity(connections);
    for _ in 0..connections {
        streams.push(connect(server, expect).await?);
    }
    Ok(streams)
}

/// Runs `worker` on each stream from the end of the warm-up to the end of
/// the window, and gathers what they measured.
async fn closed_loop<W, F>(
    streams: Vec<TcpStream>,
    window: Window,
    meters: &Meters,
    what: &str,
    worker: W,
) -> Result<Measured>
where
    W: Fn(TcpStream, Instant, Instant) -> F,
    F: Future<Output = Result<(Histogram<u64>, u64)>> + Send + 'static,
{
    let from = Instant::now() + window.warmup;
    let until = from + window.measure;
    let workers: Vec<_> = streams
        .into_iter()
        .map(|stream| {
            tokio::spawn(timeout(
                window.warmup + window.measure + IO_TIMEOUT,
                worker(stream, from, until),
            ))
        })
        .collect();
    let usage = meter_window(meters, from, until).await?;
    gather(workers, window, usage, what).await
}

async fn rr_worker(
    mut stream: TcpStream,
    from: Instant,
    until: Instant,
) -> Result<(Histogram<u64>, u64)> {
    let request = [0x5a_u8; MESSAGE];
    let mut response = [0_u8; MESSAGE];
    let mut latency = histogram();
    let mut count = 0;
    for _ in 0..MAX_REQUESTS_PER_WORKER {
        let start = Instant::now();
        if start >= until {
            break;
        }
        stream.write_all(&request).await?;
        stream.read_exact(&mut response).await?;
        let end = Instant::now();
        if start >= from && end <= until {
            latency.saturating_record(end.duration_since(start).as_nanos() as u64);
            count += 1;
        }
    }
    Ok((latency, count))
}

/// `connections` kept-alive HTTP/1.1 connections, each sending a GET for
/// `host` and reading the 1 KiB answer, one request at a time.
pub async fn http_request_response(
    server: SocketAddr,
    host: &'static str,
    connections: usize,
    window: Window,
    meters: &Meters,
    expect: Expect,
) -> Result<Measured> {
    let streams = connect_all(server, connections, expect).await?;
    closed_loop(
        streams,
        window,
        meters,
        "an HTTP worker",
        |stream, from, until| http_worker(stream, host, from, until),
    )
    .await
}

async fn http_worker(
    mut stream: TcpStream,
    host: &'static str,
    from: Instant,
    until: Instant,
) -> Result<(Histogram<u64>, u64)> {
    let request = format!("GET / HTTP/1.1\r\nhost: {host}\r\n\r\n").into_bytes();
    let mut buf = vec![0_u8; 16 * 1024];
    let mut latency = histogram();
    let mut count = 0;
    for _ in 0..MAX_REQUESTS_PER_WORKER {
        let start = Instant::now();
        if start >= until {
            break;
        }
        stream.write_all(&request).await?;
        read_http_response(&mut stream, &mut buf).await?;
        let end = Instant::now();
        if start >= from && end <= until {
            latency.saturating_record(end.duration_since(start).as_nanos() as u64);
            count += 1;
        }
    }
    Ok((latency, count))
}

/// Reads one `200` response with a content-length body. One request is in
/// flight at a time, so nothing of the next response can follow it.
async fn read_http_response(stream: &mut TcpStream, buf: &mut [u8]) -> Result<()> {
    let mut filled = 0;
    let head_end = loop {
        ensure!(
            filled < buf.len(),
            "an HTTP response head over {} bytes",
            buf.len()
        );
        let n = stream.read(&mut buf[filled..]).await?;
        ensure!(n > 0, "the server closed the connection mid-response");
        filled += n;
        if let Some(end) = buf[..filled].windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("a response head not in UTF-8")?;
    ensure!(head.starts_with("HTTP/1.1 200 "), "not a 200: {head}");
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .with_context(|| format!("no content-length: {head}"))?;
    let mut left = (head_end + length).saturating_sub(filled);
    while left > 0 {
        let room = left.min(buf.len());
        let n = stream.read(&mut buf[..room]).await?;
        ensure!(n > 0, "the server closed the connection mid-body");
        left -= n;
    }
    Ok(())
}

/// `concurrency` workers, each in a loop: connect, 1 KiB each way, close.
pub async fn connection_rate(
    server: SocketAddr,
    concurrency: usize,
    window: Window,
    meters: &Meters,
    expect: Expect,
) -> Result<Measured> {
    let from = Instant::now() + window.warmup;
    let until = from + window.measure;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            tokio::spawn(timeout(
                window.warmup + window.measure + IO_TIMEOUT,
                connection_worker(server, from, until, expect),
            ))
        })
        .collect();
    let usage = meter_window(meters, from, until).await?;
    gather(workers, window, usage, "a connection worker").await
}

async fn connection_worker(
    server: SocketAddr,
    from: Instant,
    until: Instant,
    expect: Expect,
) -> Result<(Histogram<u64>, u64)> {
    let request = [0x5a_u8; MESSAGE];
    let mut response = [0_u8; MESSAGE];
    let mut latency = histogram();
    let mut count = 0;
    for _ in 0..MAX_REQUESTS_PER_WORKER {
        let start = Instant::now();
        if start >= until {
            break;
        }
        let mut stream = TcpStream::connect(server)
            .await
            .with_context(|| format!("cannot connect to {server}"))?;
        stream.set_nodelay(true)?;
        if count == 0 {
            expect.check(&stream)?;
        }
        stream.write_all(&request).await?;
        stream.read_exact(&mut response).await?;
        drop(stream);
        let end = Instant::now();
        if start >= from && end <= until {
            latency.saturating_record(end.duration_since(start).as_nanos() as u64);
            count += 1;
        }
    }
    Ok((latency, count))
}

/// One stream, written as fast as it goes for `duration`; the server
/// answers with the byte count it read once the stream ends, so the rate is
/// what arrived, not what sat in buffers.
pub async fn bulk(
    server: SocketAddr,
    duration: Duration,
    meters: &Meters,
    expect: Expect,
) -> Result<Bulk> {
    let work = async {
        let mut stream = connect(server, expect).await?;
        let chunk = vec![0x5a_u8; BULK_CHUNK];
        let before = Snapshot::take(&meters.agent_pids)?;
        let start = Instant::now();
        let until = start + duration;
        let mut sent: u64 = 0;
        while Instant::now() < until && sent < MAX_BULK_BYTES {
            stream.write_all(&chunk).await?;
            sent += chunk.len() as u64;
        }
        stream.shutdown().await?;
        let mut count = [0_u8; 8];
        stream.read_exact(&mut count).await?;
        let elapsed = start.elapsed();
        let after = Snapshot::take(&meters.agent_pids)?;
        let received = u64::from_be_bytes(count);
        if received != sent {
            bail!("bulk: sent {sent} bytes, the server read {received}");
        }
        Ok(Bulk {
            bytes: received,
            gbit_per_second: received as f64 * 8.0 / elapsed.as_secs_f64() / 1e9,
            usage: before.until(&after),
        })
    };
    timeout(duration + IO_TIMEOUT * 3, work)
        .await
        .context("the bulk transfer timed out")?
}

/// Opens connections to `server`, each with one byte echoed to make sure
/// it reaches the server: first `calibrate`, then as many more as `plan`
/// says (it sees the first batch open), `concurrency` at a time. Keeps them
/// open while `while_open` runs with their number, then closes them all.
pub async fn idle_connections<T>(
    server: SocketAddr,
    calibrate: usize,
    concurrency: usize,
    deadline: Duration,
    expect: Expect,
    plan: impl FnOnce() -> Result<usize>,
    while_open: impl FnOnce(usize) -> Result<T>,
) -> Result<T> {
    let started = Instant::now();
    let mut streams = open_idle(server, calibrate, concurrency, deadline, expect).await?;
    // The agent runs elsewhere; give it a moment to settle (nothing else
    // runs on this runtime meanwhile).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let more = plan()?;
    let left = deadline.saturating_sub(started.elapsed());
    streams.extend(open_idle(server, more, concurrency, left, expect).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let result = while_open(streams.len());
    drop(streams);
    result
}

async fn open_idle(
    server: SocketAddr,
    count: usize,
    concurrency: usize,
    deadline: Duration,
    expect: Expect,
) -> Result<Vec<TcpStream>> {
    let per_worker = count.div_ceil(concurrency.max(1));
    let open = async {
        let workers: Vec<_> = (0..concurrency)
            .map(|i| {
                let n = per_worker.min(count.saturating_sub(i * per_worker));
                tokio::spawn(async move {
                    let mut streams = Vec::with_capacity(n);
                    for _ in 0..n {
                        let mut stream = connect(server, expect).await?;
                        let mut byte = [0_u8; 1];
                        let echoed = async {
                            stream.write_all(b"!").await?;
                            stream.read_exact(&mut byte).await
                        };
                        timeout(IO_TIMEOUT, echoed)
                            .await
                            .context("no echo")?
                            .context("echo")?;
                        streams.push(stream);
                    }
                    anyhow::Ok(streams)
                })
            })
            .collect();
        let mut streams = Vec::with_capacity(count);
        for worker in workers {
            let opened = streams.len();
            streams.extend(worker.await?.with_context(|| {
                format!("an idle connection failed after {opened} of {count} were open")
            })?);
        }
        anyhow::Ok(streams)
    };
    let streams = timeout(deadline, open)
        .await
        .with_context(|| format!("opening {count} idle connections took over {deadline:?}"))??;
    ensure!(
        streams.len() == count,
        "opened {} of {count}",
        streams.len()
    );
    Ok(streams)
}
