//! The `weir` command line.

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use weir::datapath::{self, PinDir};
use weir::model::BuildOptions;
use weir::run::{FailMode, Interception, ModelSource, RunConfig};

#[derive(Parser)]
#[command(name = "weir", version, about = "Sidecar-free service mesh node agent")]
struct Cli {
    #[arg(long, env = "WEIR_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Run(Box<RunArgs>),
    /// Check manifests offline with the same rules the agent applies.
    Validate {
        /// A manifest file or a directory of them.
        path: PathBuf,
    },
    /// Remove every program, link, map and pin of a node. Stop the agent first.
    Uninstall {
        #[arg(long, env = "NODE_NAME")]
        node: String,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name; pods with this spec.nodeName are enrolled.
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// Directory of Kubernetes YAML manifests, watched for changes, instead
    /// of the Kubernetes API.
    #[arg(long, env = "WEIR_MANIFESTS", conflicts_with_all = ["kube", "kubeconfig"])]
    manifests: Option<PathBuf>,
    /// Watch the Kubernetes API [default when running in a pod].
    #[arg(long)]
    kube: bool,
    /// Kubeconfig for the API [default: $KUBECONFIG, ~/.kube/config, or
    /// the pod's service account].
    #[arg(long, env = "WEIR_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Also enroll pods that Istio ambient would, by the label
    /// `istio.io/dataplane-mode=ambient`. Never run weir and ztunnel on one
    /// node.
    #[arg(long, env = "WEIR_HONOR_ISTIO_LABELS")]
    honor_istio_labels: bool,
    /// cgroup v2 directory to attach to [default: the cgroup2 mount].
    #[arg(long, env = "WEIR_CGROUP")]
    cgroup: Option<PathBuf>,
    /// Directory of network namespace files searched for pod IPs.
    #[arg(long, env = "WEIR_NETNS_DIR", default_value = "/var/run/netns")]
    netns_dir: PathBuf,
    /// Unix socket the weir-cni plugin reaches the agent on; no CNI server
    /// without it.
    #[arg(long, env = "WEIR_CNI_SOCKET")]
    cni_socket: Option<PathBuf>,
    /// What enrolled pods get while no agent runs.
    #[arg(long, env = "WEIR_FAIL_MODE", value_enum, default_value_t = FailMode::Open)]
    fail_mode: FailMode,
    /// How outbound connections are intercepted: eBPF, or an iptables
    /// REDIRECT in each pod for kernels without the cgroup hooks.
    #[arg(long, env = "WEIR_INTERCEPTION", value_enum, default_value_t = Interception::Ebpf)]
    interception: Interception,
    /// Let the kernel carry established L4 flows from socket to socket
    /// (sockmap), once policy has allowed them. Off by default: on this
    /// kernel the egress redirect goes through a workqueue and measured
    /// slower than the proxy (see bench/README.md). eBPF interception only.
    #[arg(long, env = "WEIR_FAST_PATH", default_value_t = false, action = clap::ArgAction::Set)]
    fast_path: bool,
    #[arg(long, env = "WEIR_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    #[arg(long, env = "WEIR_HEALTH_ADDR", default_value = "0.0.0.0:15021")]
    health_addr: SocketAddr,
    #[arg(long, env = "WEIR_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// AuthorizationPolicies in this namespace apply to the whole mesh.
    #[arg(long, env = "WEIR_ROOT_NAMESPACE", default_value = "istio-system")]
    root_namespace: String,
    /// Trust domain of principals (`<domain>/ns/<ns>/sa/<sa>`).
    #[arg(long, env = "WEIR_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Seconds to let live connections finish after SIGTERM.
    #[arg(long, env = "WEIR_DRAIN_SECONDS", default_value_t = 5)]
    drain_seconds: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Validate { path } => return validate(&path),
        Command::Uninstall { node } => uninstall(&node),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = RunConfig {
        node: args.node,
        source: model_source(args.manifests, args.kube, args.kubeconfig)?,
        build: BuildOptions {
            honor_istio_labels: args.honor_istio_labels,
        },
        cgroup: args.cgroup,
        netns_dir: args.netns_dir,
        cni_socket: args.cni_socket,
        fail_mode: args.fail_mode,
        interception: args.interception,
        fast_path: args.fast_path,
        metrics_addr: args.metrics_addr,
        health_addr: args.health_addr,
        admin_addr: args.admin_addr,
        drain: Duration::from_secs(args.drain_seconds),
        root_namespace: args.root_namespace,
        trust_domain: args.trust_domain,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(weir::run::run(config))
}

/// The manifests if given; otherwise the API, which needs `--kube` or a
/// kubeconfig unless the agent runs in a pod.
fn model_source(
    manifests: Option<PathBuf>,
    kube: bool,
    kubeconfig: Option<PathBuf>,
) -> anyhow::Result<ModelSource> {
    let in_pod = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    match manifests {
        Some(path) => Ok(ModelSource::Manifests(path)),
        None if kube || kubeconfig.is_some() || in_pod => Ok(ModelSource::Kube { kubeconfig }),
        None => anyhow::bail!(
            "no model source: give --manifests <dir>, or --kube for the Kubernetes API"
        ),
    }
}

fn validate(path: &std::path::Path) -> ExitCode {
    match weir::model::manifests::validate(path) {
        Ok(warnings) => {
            for warning in &warnings {
                println!("warning: {warning}");
            }
            println!("{}: valid", path.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for error in &errors {
                println!("error: {error}");
            }
            ExitCode::FAILURE
        }
    }
}

fn uninstall(node: &str) -> anyhow::Result<()> {
    let pins = PinDir::for_node(node);
    if datapath::uninstall(&pins)? {
        tracing::info!(pins = %pins.path().display(), "removed every program, link and map");
    } else {
        tracing::info!(pins = %pins.path().display(), "nothing installed");
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
