//! The results: Markdown tables with the machine's facts, and an SVG chart
//! of latency percentiles, both saved under `bench/results/`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::load::{Bulk, Measured};
use crate::meter::Usage;
use crate::probe::ProbeResult;
use crate::{HttpMode, Mode, Placement, Settings, Workload};

/// One measurement of one workload in one scenario.
#[derive(Clone, Debug)]
pub struct Run {
    /// Requests/s, connections/s or Gbit/s.
    pub value: f64,
    pub count: u64,
    /// p50, p99, p99.9 in µs (request/response and connection workloads).
    pub latency_us: Option<[f64; 3]>,
    pub usage: Usage,
}

impl Run {
    pub fn from_measured(measured: &Measured) -> Run {
        let q = |quantile: f64| measured.latency.value_at_quantile(quantile) as f64 / 1e3;
        Run {
            value: measured.per_second,
            count: measured.count,
            latency_us: Some([q(0.5), q(0.99), q(0.999)]),
            usage: measured.usage,
        }
    }

    pub fn from_bulk(bulk: &Bulk) -> Run {
        Run {
            value: bulk.gbit_per_second,
            count: bulk.bytes,
            latency_us: None,
            usage: bulk.usage,
        }
    }

    /// One progress line.
    pub fn describe(&self, workload: Workload) -> String {
        let cpu = format!(
            "cpu: agents {:.2}, bench {:.2} (loadgen thread {:.2}), others {:.2} cores",
            self.usage.cores(self.usage.agents),
            self.usage.cores(self.usage.process),
            self.usage.cores(self.usage.thread),
            self.usage.cores(self.usage.others()),
        );
        match (workload, self.latency_us) {
            (Workload::Bulk, _) => format!("{:>8.2} Gbit/s  {cpu}", self.value),
            (Workload::Connections, _) => format!("{:>8.0} conn/s  {cpu}", self.value),
            (_, Some([p50, p99, p999])) => format!(
                "{:>8.0} req/s   p50 {p50:.1} p99 {p99:.1} p99.9 {p999:.1} µs  {cpu}",
                self.value
            ),
            (_, None) => format!("{:>8.0} req/s  {cpu}", self.value),
        }
    }

    /// Agent CPU seconds per 100k requests (or connections).
    fn agent_cpu_per_100k(&self) -> f64 {
        self.usage.agents.as_secs_f64() / (self.count.max(1) as f64) * 1e5
    }
}

#[derive(Clone, Debug, Default)]
pub struct ConnectCost {
    pub without: Vec<ProbeResult>,
    pub with_weir: Vec<ProbeResult>,
}

/// Agent RSS, bytes.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// (node, RSS) for each agent, ready and with its pods enrolled.
    pub idle_at_start: Vec<(String, u64)>,
    /// xuegod63's agent once every round has run.
    pub idle_after_load: u64,
    pub before_idle_connections: u64,
    pub with_idle_connections: u64,
    pub after_idle_connections: u64,
    pub idle_connections: usize,
    /// Proxied connections the agent still counted open after the close
    /// (opened − closed, reporter=source).
    pub still_open: Option<u64>,
    /// The machine's kernel slab memory (/proc/meminfo Slab) before and
    /// with the idle connections.
    pub slab_before: u64,
    pub slab_with: u64,
    /// Agent descriptors per idle proxied connection.
    pub fds_per_connection: f64,
    /// Why fewer than 10k idle connections were opened, if so.
    pub limited_by: Option<String>,
}

/// What the numbers were measured on.
#[derive(Clone, Debug)]
pub struct Facts {
    pub date: String,
    /// The file name stem: the UTC date and time.
    pub stem: String,
    pub kernel: String,
    pub nproc: usize,
    pub cpu_model: String,
    pub memory_mib: u64,
    pub commit: String,
    pub agent_binary: String,
    pub load_at_start: String,
    pub load_at_end: String,
    pub took: Duration,
}

impl Facts {
    pub fn collect() -> Facts {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let (y, mo, d, h, mi, s) = civil(now);
        let uname = uname();
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_mib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            / 1024;
        Facts {
            date: format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC"),
            stem: format!("{y:04}-{mo:02}-{d:02}T{h:02}-{mi:02}-{s:02}Z"),
            kernel: uname,
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory_mib,
            commit: git_commit(),
            agent_binary: weir_sandbox::agent_binary()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|e| format!("{e:#}")),
            load_at_start: loadavg(),
            load_at_end: String::new(),
            took: Duration::ZERO,
        }
    }

    pub fn finish(mut self, took: Duration) -> Facts {
        self.load_at_end = loadavg();
        self.took = took;
        self
    }
}

/// `uname -srvm`.
fn uname() -> String {
    // SAFETY: uname fills the zeroed struct; its fields are NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return "unknown".to_owned();
        }
        let field = |f: &[libc::c_char]| {
            std::ffi::CStr::from_ptr(f.as_ptr())
                .to_string_lossy()
                .into_owned()
        };
        format!(
            "{} {} {} {}",
            field(&u.sysname),
            field(&u.release),
            field(&u.version),
            field(&u.machine)
        )
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

fn git_commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(workspace_root())
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                .is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{commit} (with uncommitted changes)")
            } else {
                commit
            }
        }
        None => "unknown".to_owned(),
    }
}

/// Seconds since the epoch to (year, month, day, hour, minute, second),
/// UTC (Howard Hinnant's days-to-civil).
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        year,
        month,
        day,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

/// Median, min and max.
#[derive(Clone, Copy, Debug)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

impl Stat {
    fn of(values: impl IntoIterator<Item = f64>) -> Option<Stat> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    fn show(&self, format: fn(f64) -> String) -> String {
        format!(
            "{} ({}–{})",
            format(self.median),
            format(self.min),
            format(self.max)
        )
    }
}

fn rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.1}k", x / 1e3)
    } else if x >= 1e3 {
        format!("{:.2}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

fn micros(x: f64) -> String {
    if x < 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

fn two(x: f64) -> String {
    format!("{x:.2}")
}

fn ratio(x: Option<f64>) -> String {
    x.map_or_else(|| "–".to_owned(), |r| format!("{r:.2}×"))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
}

pub struct Report {
    pub settings: Settings,
    pub facts: Facts,
    pub results: BTreeMap<(Placement, Mode, Workload), Vec<Run>>,
    /// HTTP with 1 KiB answers, 16 connections.
    pub http: BTreeMap<(Placement, HttpMode), Vec<Run>>,
    pub connect: ConnectCost,
    pub memory: Memory,
}

type Scenario = (Placement, Mode);

fn scenarios() -> impl Iterator<Item = Scenario> {
    Placement::ALL
        .into_iter()
        .flat_map(|p| Mode::ALL.into_iter().map(move |m| (p, m)))
}

fn scenario_label((placement, mode): Scenario) -> String {
    format!("{}, {}", placement.label(), mode.label())
}

impl Report {
    fn runs(&self, (placement, mode): Scenario, workload: Workload) -> &[Run] {
        self.results
            .get(&(placement, mode, workload))
            .map_or(&[], Vec::as_slice)
    }

    fn stat(
        &self,
        scenario: Scenario,
        workload: Workload,
        f: impl Fn(&Run) -> f64,
    ) -> Option<Stat> {
        Stat::of(self.runs(scenario, workload).iter().map(f))
    }

    fn value(&self, scenario: Scenario, workload: Workload) -> Option<Stat> {
        self.stat(scenario, workload, |r| r.value)
    }

    fn percentile(&self, scenario: Scenario, workload: Workload, i: usize) -> Option<Stat> {
        Stat::of(
            self.runs(scenario, workload)
                .iter()
                .filter_map(|r| r.latency_us.map(|l| l[i])),
        )
    }

    /// The scenario's median over direct's median, same placement.
    fn ratio(&self, scenario: Scenario, workload: Workload) -> Option<f64> {
        let direct = self.value((scenario.0, Mode::Direct), workload)?.median;
        let value = self.value(scenario, workload)?.median;
        (direct > 0.0).then(|| value / direct)
    }

    /// Added median p50 over direct's, µs.
    fn added_p50(&self, scenario: Scenario, workload: Workload) -> Option<f64> {
        let direct = self
            .percentile((scenario.0, Mode::Direct), workload, 0)?
            .median;
        Some(self.percentile(scenario, workload, 0)?.median - direct)
    }

    /// Both probes' rates, and the median (min–max) of each round's ratio:
    /// the two runs of a round are adjacent in time, so drift cancels.
    fn connect_ratio(&self) -> Option<(Stat, Stat, Stat)> {
        let without = Stat::of(self.connect.without.iter().map(|r| r.per_second))?;
        let with = Stat::of(self.connect.with_weir.iter().map(|r| r.per_second))?;
        let paired = Stat::of(
            self.connect
                .without
                .iter()
                .zip(&self.connect.with_weir)
                .map(|(without, with)| with.per_second / without.per_second),
        )?;
        Some((without, with, paired))
    }

    fn bytes_per_connection(&self) -> Option<f64> {
        let m = &self.memory;
        (m.idle_connections > 0).then(|| {
            (m.with_idle_connections as f64 - m.before_idle_connections as f64)
                / m.idle_connections as f64
        })
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let s = &self.settings;
        let f = &self.facts;
        let _ = writeln!(
            md,
            "# weir benchmark, {} ({})\n",
            f.date,
            if s.quick { "quick run" } else { "full run" }
        );
        let _ = writeln!(md, "| machine | |\n|---|---|");
        let _ = writeln!(md, "| kernel | {} |", f.kernel);
        let _ = writeln!(md, "| CPUs | {} × {} |", f.nproc, f.cpu_model);
        let _ = writeln!(md, "| memory | {} MiB |", f.memory_mib);
        let _ = writeln!(md, "| weir commit | {} |", f.commit);
        let _ = writeln!(md, "| agent binary | `{}` |", f.agent_binary);
        let _ = writeln!(
            md,
            "| load average | {} at start, {} at end |",
            f.load_at_start, f.load_at_end
        );
        let others = Stat::of(
            self.results
                .values()
                .flatten()
                .map(|r| r.usage.cores(r.usage.others())),
        );
        if let Some(others) = others {
            let _ = writeln!(
                md,
                "| CPU used by others while measuring | {} cores median, {} max (other processes, kernel threads) |",
                two(others.median),
                two(others.max)
            );
        }
        let _ = writeln!(
            md,
            "| rounds | {}, interleaved (every scenario once per round, the order rotating) |",
            s.rounds
        );
        let _ = writeln!(
            md,
            "| durations | request/response {:?} (+{:?} warm-up), new connections {:?} (+{:?}), bulk {:?}, connect() probe {:?} × {} rounds |",
            s.request_response.measure,
            s.request_response.warmup,
            s.connections.measure,
            s.connections.warmup,
            s.bulk,
            s.probe_time,
            s.probe_rounds
        );
        let _ = writeln!(md, "| took | {:.0} s |", f.took.as_secs_f64());
        md.push('\n');
        md.push_str(
            "Cells are the median of the rounds with (min–max); ratios are the scenario's median over \
             direct's, same placement, same run. Clients run on xuegod63; servers on xuegod63 (same node) \
             or xuegod64 (cross node). *weir L4*: the client pod is enrolled (connect4 redirect, outbound \
             proxy), the server is not. *weir L4 both ends*: the server is enrolled too (sk_lookup, inbound \
             proxy). *iptables*: the same outbound proxy fed by an iptables REDIRECT in the client pod's nat \
             table; its client runs on xuegod64, whose agent runs with `--interception iptables`, and its \
             servers are on xuegod64 (same node) or xuegod63 (cross node), not enrolled; its ratios are to \
             direct from xuegod63 (the two nodes are alike: namespaces on one machine).\n\n",
        );

        self.headline(&mut md);
        self.throughput(&mut md);
        self.latency(&mut md);
        self.http(&mut md);
        self.cpu(&mut md);
        self.connect_table(&mut md);
        self.memory_table(&mut md);
        self.notes(&mut md);
        md
    }

    fn headline(&self, md: &mut String) {
        let weir: Vec<Scenario> = Placement::ALL
            .into_iter()
            .flat_map(|p| [(p, Mode::L4), (p, Mode::L4Both), (p, Mode::Iptables)])
            .collect();
        let _ = writeln!(md, "## Headline (issue 6 targets)\n");
        let mut header = "| figure |".to_owned();
        let mut rule = "|---|".to_owned();
        for &sc in &weir {
            let _ = write!(header, " {} |", scenario_label(sc));
            rule.push_str("---|");
        }
        let _ = writeln!(md, "{header} target |\n{rule}---|");
        let row = |md: &mut String, name: &str, target: &str, cell: &dyn Fn(Scenario) -> String| {
            let mut line = format!("| {name} |");
            for &sc in &weir {
                let _ = write!(line, " {} |", cell(sc));
            }
            let _ = writeln!(md, "{line} {target} |");
        };
        row(md, "req/resp c=16 throughput", "≥ 0.60×", &|sc| {
            ratio(self.ratio(sc, Workload::Rr16))
        });
        row(md, "req/resp c=16 added p50", "≤ 30 µs", &|sc| {
            self.added_p50(sc, Workload::Rr16)
                .map_or_else(|| "–".to_owned(), |x| format!("{x:+.1} µs"))
        });
        row(md, "req/resp c=1 throughput", "", &|sc| {
            ratio(self.ratio(sc, Workload::Rr1))
        });
        row(md, "bulk", "≥ 0.85×", &|sc| {
            ratio(self.ratio(sc, Workload::Bulk))
        });
        row(md, "new connections/s", "≥ 0.5×", &|sc| {
            ratio(self.ratio(sc, Workload::Connections))
        });
        md.push('\n');
        self.against_iptables(md);
        if let Some((_, _, r)) = self.connect_ratio() {
            let _ = writeln!(
                md,
                "- connect() of a pod that is not enrolled, weir attached vs no weir program: **{:.3}×** \
                 ({:.3}–{:.3} over the rounds; target ≥ 0.97×)",
                r.median, r.min, r.max
            );
        }
        if let Some((_, rss)) = self.memory.idle_at_start.first() {
            let _ = writeln!(md, "- agent RSS idle: **{}** (target ≤ 20 MiB)", mib(*rss));
        }
        if let Some(b) = self.bytes_per_connection() {
            let _ = writeln!(
                md,
                "- per idle proxied connection: **{:.1} KiB** (target ≤ 20 KiB)",
                b / 1024.0
            );
        }
        md.push('\n');
    }

    /// Issue 6: weir must beat iptables on connection setup and be at
    /// least equal elsewhere. weir L4's medians over iptables', per
    /// placement (the same as the ratio of their ratios to direct).
    fn against_iptables(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "weir L4 against iptables (weir L4's median over iptables', same placement, same run):\n"
        );
        let mut header = "| figure |".to_owned();
        let mut rule = "|---|".to_owned();
        for placement in Placement::ALL {
            let _ = write!(header, " {}, weir L4 / iptables |", placement.label());
            rule.push_str("---|");
        }
        let _ = writeln!(md, "{header} target |\n{rule}---|");
        let over = |placement: Placement, workload: Workload| -> String {
            let weir = self.value((placement, Mode::L4), workload);
            let iptables = self.value((placement, Mode::Iptables), workload);
            match (weir, iptables) {
                (Some(w), Some(i)) if i.median > 0.0 => format!("{:.2}×", w.median / i.median),
                _ => "–".to_owned(),
            }
        };
        let p50 = |placement: Placement, workload: Workload| -> String {
            let weir = self.percentile((placement, Mode::L4), workload, 0);
            let iptables = self.percentile((placement, Mode::Iptables), workload, 0);
            match (weir, iptables) {
                (Some(w), Some(i)) => format!("{:+.1} µs", w.median - i.median),
                _ => "–".to_owned(),
            }
        };
        let row =
            |md: &mut String, name: &str, target: &str, cell: &dyn Fn(Placement) -> String| {
                let mut line = format!("| {name} |");
                for placement in Placement::ALL {
                    let _ = write!(line, " {} |", cell(placement));
                }
                let _ = writeln!(md, "{line} {target} |");
            };
        row(md, "new connections/s", "> 1×", &|p| {
            over(p, Workload::Connections)
        });
        row(md, "req/resp c=16 throughput", "≥ 1×", &|p| {
            over(p, Workload::Rr16)
        });
        row(
            md,
            "req/resp c=16 p50, weir L4 − iptables",
            "≤ 0",
            &|p| p50(p, Workload::Rr16),
        );
        row(md, "req/resp c=1 throughput", "≥ 1×", &|p| {
            over(p, Workload::Rr1)
        });
        row(
            md,
            "req/resp c=1 p50, weir L4 − iptables",
            "≤ 0",
            &|p| p50(p, Workload::Rr1),
        );
        row(md, "bulk", "≥ 1×", &|p| over(p, Workload::Bulk));
        md.push('\n');
    }

    fn throughput(&self, md: &mut String) {
        let _ = writeln!(md, "## Throughput\n");
        let _ = writeln!(
            md,
            "| scenario | req/s, c=1 | × | req/s, c=16 | × | bulk Gbit/s | × | new conn/s | × |\n|---|---|---|---|---|---|---|---|---|"
        );
        for sc in scenarios() {
            let mut line = format!("| {} |", scenario_label(sc));
            for workload in Workload::ALL {
                let format: fn(f64) -> String = if workload == Workload::Bulk {
                    two
                } else {
                    rate
                };
                let cell = self
                    .value(sc, workload)
                    .map_or_else(|| "–".to_owned(), |s| s.show(format));
                let _ = write!(line, " {cell} | {} |", ratio(self.ratio(sc, workload)));
            }
            let _ = writeln!(md, "{line}");
        }
        md.push('\n');
    }

    fn latency(&self, md: &mut String) {
        let _ = writeln!(md, "## Request/response latency, µs (1 KiB each way)\n");
        let _ = writeln!(
            md,
            "| scenario | c=1 p50 | c=1 p99 | c=1 p99.9 | c=16 p50 | c=16 p99 | c=16 p99.9 | added p50, c=1 / c=16 |\n|---|---|---|---|---|---|---|---|"
        );
        for sc in scenarios() {
            let mut line = format!("| {} |", scenario_label(sc));
            for workload in [Workload::Rr1, Workload::Rr16] {
                for i in 0..3 {
                    let cell = self
                        .percentile(sc, workload, i)
                        .map_or_else(|| "–".to_owned(), |s| s.show(micros));
                    let _ = write!(line, " {cell} |");
                }
            }
            let added = |w| {
                self.added_p50(sc, w)
                    .map_or_else(|| "–".to_owned(), |x| format!("{x:+.1}"))
            };
            let _ = writeln!(
                md,
                "{line} {} / {} |",
                added(Workload::Rr1),
                added(Workload::Rr16)
            );
        }
        md.push('\n');
    }

    /// The HTTP scenarios, against direct in the same placement: what L7
    /// parsing and routing add on top of L4.
    fn http(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "## HTTP through the L7 proxy (1 KiB answers to GETs, 16 kept-alive connections)\n"
        );
        let _ = writeln!(
            md,
            "| scenario | req/s | × direct | p50 µs | p99 µs | added p50 µs | p50 × | p99 × |\n|---|---|---|---|---|---|---|---|"
        );
        let runs = |key| self.http.get(&key).map_or(&[][..], Vec::as_slice);
        let value = |key| Stat::of(runs(key).iter().map(|r| r.value));
        let percentile =
            |key, i: usize| Stat::of(runs(key).iter().filter_map(|r| r.latency_us.map(|l| l[i])));
        for placement in Placement::ALL {
            let direct = (placement, HttpMode::Direct);
            for mode in HttpMode::ALL {
                let key = (placement, mode);
                let over = |a: Option<Stat>, b: Option<Stat>| {
                    a.zip(b)
                        .filter(|(_, b)| b.median > 0.0)
                        .map(|(a, b)| a.median / b.median)
                };
                let show = |s: Option<Stat>, format: fn(f64) -> String| {
                    s.map_or_else(|| "–".to_owned(), |s| s.show(format))
                };
                let added = percentile(key, 0).zip(percentile(direct, 0)).map_or_else(
                    || "–".to_owned(),
                    |(a, d)| format!("{:+.1}", a.median - d.median),
                );
                let _ = writeln!(
                    md,
                    "| {}, {} | {} | {} | {} | {} | {added} | {} | {} |",
                    placement.label(),
                    mode.label(),
                    show(value(key), rate),
                    ratio(over(value(key), value(direct))),
                    show(percentile(key, 0), micros),
                    show(percentile(key, 1), micros),
                    ratio(over(percentile(key, 0), percentile(direct, 0))),
                    ratio(over(percentile(key, 1), percentile(direct, 1))),
                );
            }
        }
        md.push_str(
            "\nweir L7 goes through one proxy hop (the client's node; the server is not \
             enrolled), so its added p50 is the cost of one L7 hop.\n\n",
        );
    }

    fn cpu(&self, md: &mut String) {
        let _ = writeln!(md, "## CPU\n");
        md.push_str(
            "Proxy CPU: both agents' user+system time (/proc/<pid>/stat) over the measured window, \
             per 100k requests or connections, or per GB of bulk transfer. *In kernel*: the share of \
             it that is system time (system calls, and the TCP and loopback/veth processing they do \
             inline), for c=1 / c=16 / bulk / new conn.\n\n",
        );
        let _ = writeln!(
            md,
            "| scenario | proxy CPU s/100k req, c=1 | s/100k req, c=16 | s/100k new conn | s/GB bulk | in kernel |\n|---|---|---|---|---|---|"
        );
        for sc in scenarios() {
            let per_100k = |w| {
                self.stat(sc, w, Run::agent_cpu_per_100k)
                    .map_or_else(|| "–".to_owned(), |s| s.show(two))
            };
            let per_gb = self
                .stat(sc, Workload::Bulk, |r| {
                    r.usage.agents.as_secs_f64() / (r.count.max(1) as f64 / 1e9)
                })
                .map_or_else(|| "–".to_owned(), |s| s.show(two));
            let kernel = Workload::ALL
                .map(|w| {
                    self.stat(sc, w, |r| {
                        r.usage.agents_system.as_secs_f64() / r.usage.agents.as_secs_f64()
                    })
                    .map_or_else(|| "–".to_owned(), |s| format!("{:.0}%", s.median * 100.0))
                })
                .join(" / ");
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {per_gb} | {kernel} |",
                scenario_label(sc),
                per_100k(Workload::Rr1),
                per_100k(Workload::Rr16),
                per_100k(Workload::Connections),
            );
        }
        md.push('\n');
        md.push_str(
            "Cores busy (CPU seconds per second, median of the rounds) during each workload, as \
             *agents · bench · load gen · softirq · others*: *agents* both agents; *bench* this whole \
             process, load generator and servers (getrusage RUSAGE_SELF); *load gen* its load generator \
             thread alone (RUSAGE_THREAD); *softirq* the machine's softirq time (network receive \
             processing; this kernel has no IRQ time accounting, so it is also inside the time of \
             whatever task it interrupted); *others* the machine's busy time spent by neither this \
             process nor the agents (other work on the machine, kernel threads).\n\n",
        );
        let mut header = "| scenario |".to_owned();
        let mut rule = "|---|".to_owned();
        for workload in Workload::ALL {
            let _ = write!(header, " {} |", workload.label());
            rule.push_str("---|");
        }
        let _ = writeln!(md, "{header}\n{rule}");
        for sc in scenarios() {
            let mut line = format!("| {} |", scenario_label(sc));
            for workload in Workload::ALL {
                let cores = |f: fn(&Usage) -> Duration| {
                    self.stat(sc, workload, |r| r.usage.cores(f(&r.usage)))
                        .map_or_else(|| "–".to_owned(), |s| two(s.median))
                };
                let _ = write!(
                    line,
                    " {} · {} · {} · {} · {} |",
                    cores(|u| u.agents),
                    cores(|u| u.process),
                    cores(|u| u.thread),
                    cores(|u| u.softirq),
                    cores(Usage::others),
                );
            }
            let _ = writeln!(md, "{line}");
        }
        md.push('\n');
    }

    fn connect_table(&self, md: &mut String) {
        let _ = writeln!(md, "## connect() of a pod that is not enrolled\n");
        md.push_str(
            "A pod on xuegod63, whose agent runs; the other agent is not started yet. Loop: socket, \
             connect to a listener on the pod's own address, accept, close with a reset. *weir \
             attached*: from the sandbox's cgroup, so the agent's connect4 and sock_ops programs run; \
             *no weir program*: the same from a process outside it. The two alternate; × is the \
             median (min–max) of each round's ratio of the two adjacent runs.\n\n",
        );
        let _ = writeln!(
            md,
            "| | connections/s | connect() p50, µs | × |\n|---|---|---|---|"
        );
        if let Some((without, with, r)) = self.connect_ratio() {
            let p50 = |v: &[ProbeResult]| {
                Stat::of(v.iter().map(|r| r.connect_p50_ns / 1e3))
                    .map_or_else(|| "–".to_owned(), |s| s.show(|x| format!("{x:.2}")))
            };
            let _ = writeln!(
                md,
                "| no weir program | {} | {} | 1× |",
                without.show(rate),
                p50(&self.connect.without)
            );
            let _ = writeln!(
                md,
                "| weir attached | {} | {} | {} |",
                with.show(rate),
                p50(&self.connect.with_weir),
                r.show(|x| format!("{x:.3}×"))
            );
        }
        md.push('\n');
    }

    fn memory_table(&self, md: &mut String) {
        let m = &self.memory;
        let _ = writeln!(md, "## Agent memory (VmRSS)\n");
        let _ = writeln!(md, "| when | RSS |\n|---|---|");
        for (node, rss) in &m.idle_at_start {
            let _ = writeln!(md, "| {node}, idle after start | {} |", mib(*rss));
        }
        let _ = writeln!(
            md,
            "| xuegod63, idle after every round | {} |",
            mib(m.idle_after_load)
        );
        let _ = writeln!(
            md,
            "| xuegod63, with {} idle proxied connections | {} |",
            m.idle_connections,
            mib(m.with_idle_connections)
        );
        let _ = writeln!(
            md,
            "| xuegod63, 2 s after they closed ({} still open by the agent's metrics) | {} |",
            m.still_open
                .map_or_else(|| "?".to_owned(), |n| n.to_string()),
            mib(m.after_idle_connections)
        );
        if let Some(b) = self.bytes_per_connection() {
            let _ = writeln!(
                md,
                "| per idle connection ((with − before) / {}) | {:.0} bytes ({:.1} KiB) |",
                m.idle_connections,
                b,
                b / 1024.0
            );
        }
        let _ = writeln!(
            md,
            "\nIdle connections: enrolled client to a pod that is not, same node, one byte echoed on each; \
             each is a client socket, the proxy's accepted and upstream sockets, and the server's."
        );
        if m.idle_connections > 0 {
            let slab = (m.slab_with as f64 - m.slab_before as f64) / m.idle_connections as f64;
            let _ = writeln!(
                md,
                "The agent holds {:.1} descriptors per idle proxied connection. RSS leaves out kernel \
                 memory: the machine's slab grew by {:.1} KiB per connection, for all its sockets (client, \
                 the proxy's two, server) and whatever the agent keeps in the kernel for it (pipes, \
                 for one), plus any other work on the machine meanwhile.",
                m.fds_per_connection,
                slab / 1024.0
            );
        }
        if let Some(reason) = &m.limited_by {
            let _ = writeln!(
                md,
                "Only {} connections rather than 10k, limited by {reason}: the hard limit cannot be \
                 raised here without CAP_SYS_RESOURCE.",
                m.idle_connections
            );
        }
        md.push('\n');
    }

    fn notes(&self, md: &mut String) {
        let mut notes = Vec::new();
        let nproc = self.facts.nproc.max(1) as f64;
        for sc in scenarios() {
            for workload in Workload::ALL {
                let thread = self.stat(sc, workload, |r| r.usage.cores(r.usage.thread));
                let busy = self.stat(sc, workload, |r| r.usage.cores(r.usage.machine_busy));
                if let (Some(thread), Some(busy)) = (thread, busy)
                    && thread.median > 0.9
                {
                    let limit = if workload == Workload::Bulk {
                        "one stream has one sending thread, so this is the single-stream limit"
                    } else if busy.median > 0.9 * nproc {
                        "the machine was saturated, so the limit is the CPU, shared by generator, servers and kernel"
                    } else {
                        "the generator may limit this figure"
                    };
                    notes.push(format!(
                        "the load generator thread used {:.2} cores in {} {} (machine {:.2} of {nproc} cores busy): {limit}",
                        thread.median,
                        scenario_label(sc),
                        workload.label(),
                        busy.median,
                    ));
                }
            }
        }
        if let Some(s) = Stat::of(
            self.results
                .values()
                .flatten()
                .map(|r| r.usage.cores(r.usage.others())),
        ) && s.max > 0.25
        {
            notes.push(format!(
                "other work used up to {:.2} cores (median {:.2}) while measuring: absolute numbers are noisy, ratios less so",
                s.max, s.median
            ));
        }
        let steal = Stat::of(
            self.results
                .values()
                .flatten()
                .map(|r| r.usage.cores(r.usage.steal)),
        );
        if let Some(s) = steal
            && s.max > 0.05
        {
            notes.push(format!(
                "the hypervisor took up to {:.2} cores (steal time)",
                s.max
            ));
        }
        if !notes.is_empty() {
            let _ = writeln!(md, "## Notes\n");
            for note in notes {
                let _ = writeln!(md, "- {note}");
            }
            md.push('\n');
        }
    }

    /// A bar chart of p50, p99 and p99.9 per scenario, one panel per
    /// concurrency, on a log scale, with min–max whiskers.
    pub fn svg(&self) -> String {
        const WIDTH: f64 = 980.0;
        const PANEL: f64 = 360.0;
        const TOP: f64 = 56.0;
        const LEFT: f64 = 64.0;
        const RIGHT: f64 = 16.0;
        const PLOT_TOP: f64 = 40.0;
        const PLOT_BOTTOM: f64 = 60.0;
        const COLORS: [&str; 3] = ["#4C78A8", "#F58518", "#E45756"];
        const NAMES: [&str; 3] = ["p50", "p99", "p99.9"];
        let panels = [
            (Workload::Rr1, "1 connection"),
            (Workload::Rr16, "16 connections"),
        ];
        let height = TOP + PANEL * panels.len() as f64 + 10.0;
        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
        );
        let _ = writeln!(
            svg,
            r##"<rect width="100%" height="100%" fill="#ffffff"/>"##
        );
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="24" font-size="17" text-anchor="middle" font-weight="bold">weir request/response latency, 1 KiB each way ({})</text>"#,
            WIDTH / 2.0,
            self.facts.date
        );
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="44" font-size="12" text-anchor="middle" fill="#444">µs, log scale; bars: median of {} rounds, whiskers: min–max; commit {}</text>"##,
            WIDTH / 2.0,
            self.settings.rounds,
            self.facts.commit
        );
        // Legend.
        for (i, (color, name)) in COLORS.iter().zip(NAMES).enumerate() {
            let x = WIDTH - RIGHT - 210.0 + i as f64 * 70.0;
            let _ = writeln!(
                svg,
                r#"<rect x="{x}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}" font-size="12">{name}</text>"#,
                TOP + 6.0,
                x + 16.0,
                TOP + 16.0
            );
        }
        let all: Vec<Scenario> = scenarios().collect();
        for (panel, (workload, title)) in panels.iter().enumerate() {
            let y0 = TOP + panel as f64 * PANEL;
            let plot_top = y0 + PLOT_TOP;
            let plot_bottom = y0 + PANEL - PLOT_BOTTOM;
            let stats: Vec<[Option<Stat>; 3]> = all
                .iter()
                .map(|&sc| [0, 1, 2].map(|i| self.percentile(sc, *workload, i)))
                .collect();
            let values = stats
                .iter()
                .flatten()
                .flatten()
                .flat_map(|s| [s.min, s.max])
                .filter(|v| *v > 0.0);
            let (lo, hi) = values.fold((f64::MAX, 0.0_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
            if hi <= 0.0 {
                continue;
            }
            let lo = 10_f64.powf(lo.log10().floor());
            let hi = 10_f64.powf(hi.log10().ceil()).max(lo * 10.0);
            let y = |v: f64| {
                let t = (v.max(lo).log10() - lo.log10()) / (hi.log10() - lo.log10());
                plot_bottom - t * (plot_bottom - plot_top)
            };
            let _ = writeln!(
                svg,
                r#"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{title}</text>"#,
                y0 + 24.0
            );
            // Grid at 1, 2, 5 × 10^k.
            let mut decade = lo;
            while decade <= hi * 1.0001 {
                for m in [1.0, 2.0, 5.0] {
                    let v = decade * m;
                    if v > hi * 1.0001 {
                        break;
                    }
                    let yy = y(v);
                    let stroke = if m == 1.0 { "#bbbbbb" } else { "#e6e6e6" };
                    let _ = writeln!(
                        svg,
                        r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{}" y2="{yy:.1}" stroke="{stroke}"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end" fill="#444">{}</text>"##,
                        WIDTH - RIGHT,
                        LEFT - 6.0,
                        yy + 4.0,
                        axis_label(v)
                    );
                }
                decade *= 10.0;
            }
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{plot_bottom}" x2="{}" y2="{plot_bottom}" stroke="#333"/>"##,
                WIDTH - RIGHT
            );
            let group = (WIDTH - LEFT - RIGHT) / all.len() as f64;
            let bar = 30.0;
            let gap = 6.0;
            for (g, (&sc, stat)) in all.iter().zip(&stats).enumerate() {
                let x_group = LEFT + g as f64 * group;
                let start = x_group + (group - (3.0 * bar + 2.0 * gap)) / 2.0;
                for (i, s) in stat.iter().enumerate() {
                    let Some(s) = s else { continue };
                    let x = start + i as f64 * (bar + gap);
                    let top = y(s.median);
                    let _ = writeln!(
                        svg,
                        r#"<rect x="{x:.1}" y="{top:.1}" width="{bar}" height="{:.1}" fill="{}"><title>{} {}: median {:.1} µs, min {:.1}, max {:.1}</title></rect>"#,
                        (plot_bottom - top).max(0.0),
                        COLORS[i],
                        scenario_label(sc),
                        NAMES[i],
                        s.median,
                        s.min,
                        s.max
                    );
                    let cx = x + bar / 2.0;
                    let (ymin, ymax) = (y(s.min), y(s.max));
                    let _ = writeln!(
                        svg,
                        r##"<line x1="{cx:.1}" y1="{ymin:.1}" x2="{cx:.1}" y2="{ymax:.1}" stroke="#222"/><line x1="{:.1}" y1="{ymax:.1}" x2="{:.1}" y2="{ymax:.1}" stroke="#222"/><line x1="{:.1}" y1="{ymin:.1}" x2="{:.1}" y2="{ymin:.1}" stroke="#222"/>"##,
                        cx - 4.0,
                        cx + 4.0,
                        cx - 4.0,
                        cx + 4.0
                    );
                    let _ = writeln!(
                        svg,
                        r#"<text x="{cx:.1}" y="{:.1}" font-size="10" text-anchor="middle">{}</text>"#,
                        ymax - 4.0,
                        micros(s.median)
                    );
                }
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}" font-size="12" text-anchor="middle">{}</text>"#,
                    x_group + group / 2.0,
                    plot_bottom + 18.0,
                    sc.1.label()
                );
            }
            // Placement labels under each half, with a separator.
            let per_placement = Mode::ALL.len() as f64 * group;
            for (i, placement) in Placement::ALL.iter().enumerate() {
                let x = LEFT + i as f64 * per_placement;
                let _ = writeln!(
                    svg,
                    r##"<text x="{:.1}" y="{:.1}" font-size="13" font-weight="bold" text-anchor="middle" fill="#333">{}</text>"##,
                    x + per_placement / 2.0,
                    plot_bottom + 38.0,
                    placement.label()
                );
                if i > 0 {
                    let _ = writeln!(
                        svg,
                        r##"<line x1="{x:.1}" y1="{plot_top}" x2="{x:.1}" y2="{:.1}" stroke="#888" stroke-dasharray="4 3"/>"##,
                        plot_bottom + 40.0
                    );
                }
            }
        }
        svg.push_str("</svg>\n");
        svg
    }
}

fn axis_label(v: f64) -> String {
    if v >= 1000.0 {
        format!("{}k", v / 1000.0)
    } else if v >= 1.0 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// Writes `<stem>.md` and `<stem>.svg` under `bench/results/`.
pub fn save(facts: &Facts, markdown: &str, svg: &str) -> Result<(PathBuf, PathBuf)> {
    let dir = workspace_root().join("bench").join("results");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let md_path = dir.join(format!("{}.md", facts.stem));
    let svg_path = dir.join(format!("{}.svg", facts.stem));
    let svg_name = format!("{}.svg", facts.stem);
    let markdown = format!("{markdown}![latency percentiles]({svg_name})\n");
    std::fs::write(&md_path, markdown)
        .with_context(|| format!("cannot write {}", md_path.display()))?;
    std::fs::write(&svg_path, svg)
        .with_context(|| format!("cannot write {}", svg_path.display()))?;
    Ok((md_path, svg_path))
}
