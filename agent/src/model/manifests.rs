//! The manifests source: a directory (or one file) of Kubernetes-style YAML
//! or JSON manifests, watched for changes.
//!
//! A file that fails to parse or check keeps serving the objects it last had
//! when it was good, so a typo in one file never takes the rest of the mesh
//! down with it, and never empties the file's own part of it.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::watch;

use super::cluster::{BuildOptions, Cluster};
use super::objects::{ManifestError, ManifestWarning, Object, ObjectKey, parse_file};
use super::source::ModelWatch;

/// A manifest directory, or a single manifest file, and the last good
/// objects of each of its files.
#[derive(Debug)]
pub struct ManifestDir {
    path: PathBuf,
    /// By path, so in name order: of two definitions of an object, the one in
    /// the file with the smaller name wins.
    files: BTreeMap<PathBuf, Vec<Object>>,
    options: BuildOptions,
}

/// What a load found besides the objects; [`LoadReport::log`] logs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// A file with errors keeps the objects it had when it last loaded
    /// cleanly, if it ever did; a duplicate object is left out.
    pub errors: Vec<ManifestError>,
    pub warnings: Vec<ManifestWarning>,
}

impl LoadReport {
    pub fn log(&self) {
        for error in &self.errors {
            tracing::error!(
                file = %error.file.display(),
                object = %error.object,
                field = %error.field,
                "invalid manifest: {}",
                error.message,
            );
        }
        for warning in &self.warnings {
            tracing::warn!(
                file = %warning.file.display(),
                object = %warning.object,
                field = %warning.field,
                "{}",
                warning.message,
            );
        }
    }
}

impl ManifestDir {
    /// A source for `path`, a directory or a single file. Nothing is read
    /// before [`ManifestDir::reload`].
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            files: BTreeMap::new(),
            options: BuildOptions::default(),
        }
    }

    /// The same source, building clusters with these options.
    pub fn with_options(self, options: BuildOptions) -> Self {
        Self { options, ..self }
    }

    /// Reads every manifest file again and builds the cluster from them.
    ///
    /// In a directory, manifest files are the `*.yaml`, `*.yml` and `*.json`
    /// files whose names do not start with a dot; subdirectories are not
    /// read. Files that went away drop their objects.
    pub fn reload(&mut self) -> (Cluster, LoadReport) {
        let mut report = LoadReport::default();
        match manifest_files(&self.path) {
            Ok(paths) => {
                if paths.is_empty() {
                    report.warnings.push(ManifestWarning {
                        file: self.path.clone(),
                        object: String::new(),
                        field: String::new(),
                        message: "no *.yaml, *.yml or *.json files".to_owned(),
                    });
                }
                self.files.retain(|file, _| paths.contains(file));
                for path in paths {
                    self.load_file(path, &mut report);
                }
            }
            // Keep every file's objects: they may be back on the next event.
            Err(error) => report
                .errors
                .push(file_error(&self.path, "cannot list", &error)),
        }
        let cluster = Cluster::build_with(self.unique_objects(&mut report.errors), self.options);
        // Rules that need other objects to be judged, such as a Service's
        // port protocols.
        report
            .warnings
            .extend(cluster.routing_warnings().iter().map(|w| ManifestWarning {
                file: self.path.clone(),
                object: w.object.clone(),
                field: String::new(),
                message: w.message.clone(),
            }));
        (cluster, report)
    }

    fn load_file(&mut self, path: PathBuf, report: &mut LoadReport) {
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // Removed since the directory was listed.
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                self.files.remove(&path);
                return;
            }
            Err(error) => return report.errors.push(file_error(&path, "cannot read", &error)),
        };
        match parse_file(&path, &text) {
            Ok(parsed) => {
                report.warnings.extend(parsed.warnings);
                self.files.insert(path, parsed.objects);
            }
            Err(errors) => report.errors.extend(errors),
        }
    }

    /// Every object once: a second definition of the same object, in
    /// another file or the same one, is an error and is left out.
    fn unique_objects(&self, errors: &mut Vec<ManifestError>) -> Vec<&Object> {
        let mut first_file: HashMap<ObjectKey, &Path> = HashMap::new();
        let mut objects = Vec::new();
        for (file, file_objects) in &self.files {
            for object in file_objects {
                let key = object.key();
                if let Some(first) = first_file.get(&key) {
                    errors.push(ManifestError {
                        file: file.clone(),
                        object: key.to_string(),
                        field: String::new(),
                        message: format!("also defined in {}, which is used", first.display()),
                    });
                } else {
                    first_file.insert(key, file);
                    objects.push(object);
                }
            }
        }
        objects
    }
}

fn file_error(path: &Path, action: &str, error: &io::Error) -> ManifestError {
    ManifestError {
        file: path.to_owned(),
        object: String::new(),
        field: String::new(),
        message: format!("{action}: {error}"),
    }
}

/// The manifest files at `path`, sorted by name; `path` itself if it is a file.
fn manifest_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    if std::fs::metadata(path)?.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let file = entry?.path();
        // Hidden names are editors' and tools' temporary files, and the
        // `..data` links of a mounted ConfigMap. `is_file` follows symlinks,
        // which is how a ConfigMap volume presents its keys.
        let hidden = file
            .file_name()
            .is_some_and(|name| name.as_encoded_bytes().starts_with(b"."));
        let manifest = file.extension().is_some_and(|extension| {
            ["yaml", "yml", "json"]
                .iter()
                .any(|wanted| extension == *wanted)
        });
        if manifest && !hidden && file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

/// Runs every check the agent runs on `path` (a directory or a file), for
/// `weir validate`: the warnings if it would load cleanly, else the errors.
pub fn validate(path: &Path) -> Result<Vec<ManifestWarning>, Vec<ManifestError>> {
    let (_, report) = ManifestDir::new(path).reload();
    if report.errors.is_empty() {
        Ok(report.warnings)
    } else {
        Err(report.errors)
    }
}

/// How long the directory must be quiet before a reload, so that a burst of
/// events (an editor's write, rename and chmod; a tool writing many files)
/// gives a single reload.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// The longest a reload waits for quiet, so that a steady trickle of events
/// cannot hold changes back.
const MAX_DELAY: Duration = Duration::from_secs(1);

/// Loads the manifests at `path` (a directory or a file), then reloads them
/// whenever something in the directory is created, written, removed or
/// renamed. Every load's errors and warnings are logged.
///
/// The initial load is done when this returns, so [`ModelWatch::current`]
/// holds the initial manifests from the start, and the watch is synced. Reloads run on a thread of
/// their own, so this needs no async runtime. Fails when `path` cannot be
/// watched.
pub fn watch(path: PathBuf, options: BuildOptions) -> anyhow::Result<ModelWatch> {
    let (event_tx, event_rx) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
        match event {
            Ok(event) if !changes_files(event.kind) => return,
            Ok(_) => {}
            // Such as an overflowing event queue: changes may have been missed.
            Err(error) => tracing::warn!(%error, "watching manifests"),
        }
        // Fails only once the reload thread has ended, so nobody listens.
        let _ = event_tx.send(());
    })?;
    // A single file is watched through its directory: tools replace files by
    // renaming over them, which a watch on the file itself would not survive.
    let watched = if path.is_dir() {
        path.as_path()
    } else {
        path.parent()
            .filter(|parent| !parent.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    };
    watcher
        .watch(watched, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", watched.display()))?;

    // Loaded after the watch started, so no change between the two is lost.
    let mut source = ManifestDir::new(path).with_options(options);
    let (cluster, report) = source.reload();
    report.log();
    let rejected = Arc::new(AtomicU64::new(report.errors.len() as u64));
    let (snapshot_tx, snapshots) = watch::channel(Arc::new(cluster));
    let counter = rejected.clone();
    thread::Builder::new()
        .name("weir-manifests".to_owned())
        .spawn(move || reload_on_change(source, &event_rx, &snapshot_tx, &counter))?;
    // Dropping the watcher drops its event sender, which ends the reload
    // thread: that thread lives exactly as long as the watch.
    let (_, synced) = watch::channel(true);
    Ok(ModelWatch::new(snapshots, synced, rejected, watcher))
}

/// Whether an event may mean that manifests changed. Opening and reading
/// files do not, and reacting to them would make every reload trigger the
/// next; closing a file written to does, as the last step of a write.
fn changes_files(kind: EventKind) -> bool {
    match kind {
        EventKind::Access(access) => access == AccessKind::Close(AccessMode::Write),
        _ => true,
    }
}

fn reload_on_change(
    mut source: ManifestDir,
    events: &mpsc::Receiver<()>,
    snapshots: &watch::Sender<Arc<Cluster>>,
    rejected: &AtomicU64,
) {
    while events.recv().is_ok() {
        wait_for_quiet(events);
        let (cluster, report) = source.reload();
        report.log();
        rejected.fetch_add(report.errors.len() as u64, Ordering::Relaxed);
        // Receivers only wake up when the cluster really changed.
        snapshots.send_if_modified(|current| {
            let changed = **current != cluster;
            if changed {
                *current = Arc::new(cluster);
            }
            changed
        });
    }
}

/// Consumes events until none came for [`DEBOUNCE`], or [`MAX_DELAY`] passed.
fn wait_for_quiet(events: &mpsc::Receiver<()>) {
    let deadline = Instant::now() + MAX_DELAY;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || events.recv_timeout(DEBOUNCE.min(left)).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::net::IpAddr;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static COUNT: AtomicU32 = AtomicU32::new(0);
            let unique = format!(
                "weir-manifests-{}-{}",
                std::process::id(),
                COUNT.fetch_add(1, Ordering::Relaxed)
            );
            let path = std::env::temp_dir().join(unique);
            fs::create_dir(&path).unwrap();
            Self(path)
        }

        fn write(&self, name: &str, text: &str) {
            fs::write(self.0.join(name), text).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn pod(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{containers: [{{name: app}}]}}\nstatus: {{podIP: \"{ip}\"}}\n"
        )
    }

    fn service(name: &str, cluster_ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: \"{cluster_ip}\", ports: [{{name: http, port: 9080}}]}}\n"
        )
    }

    fn pod_names(cluster: &Cluster) -> Vec<&str> {
        cluster
            .workloads()
            .iter()
            .map(|workload| workload.name.as_str())
            .collect()
    }

    #[test]
    fn bad_file_keeps_its_last_good_objects() {
        let dir = TempDir::new();
        dir.write("a.yaml", &pod("productpage-v1", "10.244.63.10"));
        dir.write("b.yml", &service("productpage", "10.96.0.10"));
        dir.write("notes.txt", "not a manifest");
        dir.write(".a.yaml.swp", "not a manifest either");
        let mut source = ManifestDir::new(&dir.0);
        let (cluster, report) = source.reload();
        assert_eq!(report, LoadReport::default());
        assert_eq!(pod_names(&cluster), ["productpage-v1"]);
        assert_eq!(cluster.services().len(), 1);

        // a.yaml breaks, b.yml changes, c.yaml arrives broken.
        dir.write("a.yaml", &pod("productpage-v1", "10.244.63.300"));
        dir.write("b.yml", &service("details", "10.96.0.11"));
        dir.write("c.yaml", &pod("reviews-v1", "not-an-ip"));
        let (cluster, report) = source.reload();
        let errors: Vec<(&Path, &str)> = report
            .errors
            .iter()
            .map(|e| (e.file.as_path(), e.field.as_str()))
            .collect();
        assert_eq!(
            errors,
            [
                (dir.0.join("a.yaml").as_path(), "status.podIP"),
                (&dir.0.join("c.yaml"), "status.podIP")
            ]
        );
        assert_eq!(pod_names(&cluster), ["productpage-v1"]);
        assert_eq!(
            cluster.workloads()[0].ips,
            ["10.244.63.10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(cluster.services()[0].name, "details");

        // A removed file takes its objects along, even its last good ones.
        fs::remove_file(dir.0.join("a.yaml")).unwrap();
        let (cluster, report) = source.reload();
        assert_eq!(report.errors.len(), 1);
        assert!(pod_names(&cluster).is_empty());
    }

    #[test]
    fn duplicate_object_keeps_the_first() {
        let dir = TempDir::new();
        dir.write("10-pods.yaml", &pod("details-v1", "10.244.63.11"));
        dir.write(
            "20-more.json",
            r#"{"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "details-v1"}, "spec": {"containers": [{"name": "app"}]}}"#,
        );
        let first = dir.0.join("10-pods.yaml");
        let errors = validate(&dir.0).unwrap_err();
        assert_eq!(
            errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [format!(
                "{}: Pod default/details-v1: also defined in {}, which is used",
                dir.0.join("20-more.json").display(),
                first.display()
            )]
        );
        let (cluster, _) = ManifestDir::new(&dir.0).reload();
        assert_eq!(
            cluster.workloads()[0].ips.len(),
            1,
            "the first definition has the IP"
        );
    }

    #[test]
    fn validate_reports_warnings_and_takes_a_single_file() {
        let dir = TempDir::new();
        dir.write(
            "deploy.yaml",
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: reviews-v1, namespace: default}\n",
        );
        let warnings = validate(&dir.0.join("deploy.yaml")).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0]
                .message
                .contains("kind Deployment (apps/v1) is not supported yet")
        );

        let missing = validate(&dir.0.join("missing")).unwrap_err();
        assert!(
            missing[0].message.starts_with("cannot list: "),
            "{}",
            missing[0]
        );
    }

    /// Waits a few seconds at most for a snapshot that `ready` accepts.
    async fn wait_for(
        snapshots: &mut watch::Receiver<Arc<Cluster>>,
        ready: impl FnMut(&Arc<Cluster>) -> bool,
    ) {
        tokio::time::timeout(Duration::from_secs(5), snapshots.wait_for(ready))
            .await
            .expect("no such snapshot within 5 s")
            .unwrap();
    }

    #[tokio::test]
    async fn watch_picks_up_new_files_renames_and_removals() {
        let dir = TempDir::new();
        dir.write("a.yaml", &pod("productpage-v1", "10.244.63.10"));
        let watching = watch(dir.0.clone(), BuildOptions::default()).unwrap();
        assert_eq!(pod_names(&watching.current()), ["productpage-v1"]);
        let mut snapshots = watching.subscribe();

        dir.write("b.yaml", &pod("details-v1", "10.244.63.11"));
        wait_for(&mut snapshots, |cluster| {
            pod_names(cluster) == ["details-v1", "productpage-v1"]
        })
        .await;

        // As editors and kubectl-like tools do: write aside, rename over.
        dir.write(".b.yaml.tmp", &pod("reviews-v1", "10.244.63.12"));
        fs::rename(dir.0.join(".b.yaml.tmp"), dir.0.join("b.yaml")).unwrap();
        wait_for(&mut snapshots, |cluster| {
            pod_names(cluster) == ["productpage-v1", "reviews-v1"]
        })
        .await;

        fs::rename(dir.0.join("a.yaml"), dir.0.join("a.yaml.disabled")).unwrap();
        wait_for(&mut snapshots, |cluster| {
            pod_names(cluster) == ["reviews-v1"]
        })
        .await;
    }

    #[tokio::test]
    async fn dropping_the_watch_stops_it() {
        let dir = TempDir::new();
        let watching = watch(dir.0.clone(), BuildOptions::default()).unwrap();
        let mut snapshots = watching.subscribe();
        drop(watching);
        // The reload thread ends, and with it the sending side.
        let changed = tokio::time::timeout(Duration::from_secs(5), snapshots.changed()).await;
        assert!(changed.expect("still watching after 5 s").is_err());
    }

    #[tokio::test]
    async fn watch_of_a_single_file_survives_replacement() {
        let dir = TempDir::new();
        let file = dir.0.join("mesh.yaml");
        dir.write("mesh.yaml", &pod("productpage-v1", "10.244.63.10"));
        let watching = watch(file.clone(), BuildOptions::default()).unwrap();
        let mut snapshots = watching.subscribe();
        for name in ["details-v1", "ratings-v1"] {
            dir.write("new.tmp", &pod(name, "10.244.63.11"));
            fs::rename(dir.0.join("new.tmp"), &file).unwrap();
            wait_for(&mut snapshots, |cluster| pod_names(cluster) == [name]).await;
        }
    }
}
