//! `cargo xtask check-manifests`: what can be checked of `daemonset/`
//! without a cluster or a container engine. `cargo xtask test` runs it
//! before the tests, silently when all is well.
//!
//! - Every manifest, `optional/` included, against the Kubernetes 1.33 API
//!   schemas with unknown fields rejected (PyPI's kubernetes-validate). Kinds
//!   of CRDs it has no schema for pass only when listed in [`CRD_KINDS`].
//! - The `Kustomization` lists exactly the top-level manifests, so that
//!   `kubectl apply -k daemonset/` and `kubectl apply -f daemonset/` apply the
//!   same objects, and lists nothing under `optional/`.
//! - `kubectl apply -f daemonset/` applies files in name order: the file of a
//!   Namespace comes before every file with objects in it.
//! - Every container runs the same image, and its command is a binary that
//!   the Containerfile copies into the runtime stage.
//!
//! YAML is read by the validator's own PyYAML, so that xtask needs no YAML
//! crate and stays buildable before anything else is installed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The Kubernetes version the manifests must be valid for: the agent's
/// k8s-openapi feature, and our users' clusters.
const KUBERNETES: &str = "1.33.0";

/// (apiVersion, kind) of custom resources the validator cannot know.
const CRD_KINDS: &[(&str, &str)] = &[("monitoring.coreos.com/v1", "ServiceMonitor")];

/// kustomize's names for its file; `kustomization.yaml` and `.yml` would be
/// read by `kubectl apply -f` too, which fails on them.
const KUSTOMIZATION: &str = "Kustomization";

/// Lists what the checks need of the manifests, one tab-separated fact per
/// line: `object <file> <kind> <name> <namespace>`, `container <file> <object>
/// <container> <image> <argv0>`, and `resource <entry>` for each entry of
/// the kustomization given with `--kustomization`.
const FACTS: &str = r#"
import sys, yaml
args = sys.argv[1:]
kustomization = None
if args[:1] == ["--kustomization"]:
    kustomization, args = args[1], args[2:]

def pod_spec(doc):
    spec = doc.get("spec") or {}
    if doc.get("kind") == "Pod":
        return spec
    if doc.get("kind") == "CronJob":
        spec = (spec.get("jobTemplate") or {}).get("spec") or {}
    return (spec.get("template") or {}).get("spec")

def clean(value):
    return str(value).replace("\t", " ").replace("\n", " ")

for path in args:
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for doc in docs:
        meta = doc.get("metadata") or {}
        kind = doc.get("kind", "?")
        print("object", path, kind, clean(meta.get("name", "")), clean(meta.get("namespace", "")), sep="\t")
        spec = pod_spec(doc)
        if not isinstance(spec, dict):
            continue
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            command = c.get("command") or [""]
            print("container", path, kind + "/" + clean(meta.get("name", "?")),
                  clean(c.get("name", "?")), clean(c.get("image", "")), clean(command[0]), sep="\t")
if kustomization:
    with open(kustomization) as f:
        doc = yaml.safe_load(f) or {}
    for entry in doc.get("resources") or []:
        print("resource", clean(entry), sep="\t")
"#;

pub fn check(root: &Path) -> anyhow::Result<usize> {
    let dir = root.join("daemonset");
    let files = manifest_files(&dir)?;
    let mut problems = validate_schemas(&dir, &files)?;
    let facts = Facts::read(&dir, &files)?;
    problems.extend(check_kustomization(&dir, &files, &facts));
    problems.extend(check_apply_order(&files, &facts));
    problems.extend(check_commands(&dir, &facts)?);
    if !problems.is_empty() {
        bail!("daemonset/ has problems:\n  {}", problems.join("\n  "));
    }
    Ok(files.len())
}

/// Every *.yaml and *.yml under `dir`, relative to it, sorted by name as
/// `kubectl apply -f` reads them.
fn manifest_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, base: &Path, found: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, base, found)?;
            } else if path
                .extension()
                .is_some_and(|ext| ext == "yaml" || ext == "yml")
            {
                found.push(path.strip_prefix(base)?.to_path_buf());
            }
        }
        Ok(())
    }
    let mut found = Vec::new();
    walk(dir, dir, &mut found)?;
    found.sort();
    if found.is_empty() {
        bail!("no manifests in {}", dir.display());
    }
    Ok(found)
}

fn validate_schemas(dir: &Path, files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let output = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k"])
        .arg(KUBERNETES)
        .args(files)
        .current_dir(dir)
        .output()
        .context("running python3 -m kubernetes_validate (cargo xtask setup installs it)")?;
    let mut problems = Vec::new();
    let text = String::from_utf8_lossy(&output.stdout);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if !is_known_crd(line) {
            problems.push(line.to_owned());
        }
    }
    if !output.status.success() && problems.is_empty() {
        problems.push(format!(
            "kubernetes-validate failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(problems)
}

/// A warning that the validator has no schema for one of [`CRD_KINDS`].
fn is_known_crd(line: &str) -> bool {
    let Some(rest) = line
        .strip_prefix("WARN ")
        .and_then(|l| l.split_once("Couldn't find schema for kind "))
        .map(|(_, rest)| rest)
    else {
        return false;
    };
    CRD_KINDS.iter().any(|(api_version, kind)| {
        rest.starts_with(&format!("{kind} with api version {api_version} "))
    })
}

/// What the manifests say, as read by [`FACTS`].
#[derive(Default)]
struct Facts {
    /// file → its objects, in order.
    objects: BTreeMap<PathBuf, Vec<Object>>,
    containers: Vec<Container>,
    /// The kustomization's `resources`, when there is one.
    resources: Option<Vec<String>>,
}

struct Object {
    kind: String,
    name: String,
    namespace: String,
}

struct Container {
    file: PathBuf,
    object: String,
    name: String,
    image: String,
    argv0: String,
}

impl Facts {
    fn read(dir: &Path, files: &[PathBuf]) -> anyhow::Result<Facts> {
        let mut command = Command::new("python3");
        command.args(["-c", FACTS]).current_dir(dir);
        let kustomization = dir.join(KUSTOMIZATION).exists();
        if kustomization {
            command.args(["--kustomization", KUSTOMIZATION]);
        }
        let output = command
            .args(files)
            .output()
            .context("running python3 to read the manifests")?;
        if !output.status.success() {
            bail!(
                "reading the manifests failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let mut facts = Facts {
            resources: kustomization.then(Vec::new),
            ..Facts::default()
        };
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            match line.split('\t').collect::<Vec<_>>().as_slice() {
                ["object", file, kind, name, namespace] => facts
                    .objects
                    .entry(PathBuf::from(file))
                    .or_default()
                    .push(Object {
                        kind: kind.to_string(),
                        name: name.to_string(),
                        namespace: namespace.to_string(),
                    }),
                ["container", file, object, name, image, argv0] => {
                    facts.containers.push(Container {
                        file: PathBuf::from(file),
                        object: object.to_string(),
                        name: name.to_string(),
                        image: image.to_string(),
                        argv0: argv0.to_string(),
                    })
                }
                ["resource", entry] => {
                    if let Some(resources) = &mut facts.resources {
                        resources.push(entry.to_string());
                    }
                }
                _ => bail!("unexpected line from the manifest reader: {line:?}"),
            }
        }
        Ok(facts)
    }
}

fn check_kustomization(dir: &Path, files: &[PathBuf], facts: &Facts) -> Vec<String> {
    let mut problems = Vec::new();
    for name in ["kustomization.yaml", "kustomization.yml"] {
        if dir.join(name).exists() {
            problems.push(format!(
                "{name}: `kubectl apply -f daemonset/` would fail on it; name it {KUSTOMIZATION}"
            ));
        }
    }
    let Some(resources) = &facts.resources else {
        problems.push(format!("{KUSTOMIZATION}: missing"));
        return problems;
    };
    let top_level: BTreeSet<&Path> = files
        .iter()
        .filter(|f| f.components().count() == 1)
        .map(PathBuf::as_path)
        .collect();
    let mut listed = BTreeSet::new();
    for entry in resources {
        let path = Path::new(entry);
        if !dir.join(path).is_file() {
            problems.push(format!("{KUSTOMIZATION}: {entry} does not exist"));
        } else if !top_level.contains(path) {
            problems.push(format!(
                "{KUSTOMIZATION}: {entry} is not a top-level manifest, which `kubectl apply -f daemonset/` would skip"
            ));
        } else if !listed.insert(path) {
            problems.push(format!("{KUSTOMIZATION}: {entry} is listed twice"));
        }
    }
    for file in top_level.difference(&listed) {
        problems.push(format!(
            "{KUSTOMIZATION}: {} is not listed, so `kubectl apply -k` would leave it out",
            file.display()
        ));
    }
    problems
}

/// `kubectl apply -f` takes the files in name order and the objects of a
/// file in order: a namespace that the manifests create must come before
/// every object in it.
fn check_apply_order(files: &[PathBuf], facts: &Facts) -> Vec<String> {
    let top_level: Vec<(&PathBuf, &Vec<Object>)> = files
        .iter()
        .filter(|f| f.components().count() == 1)
        .filter_map(|f| Some((f, facts.objects.get(f)?)))
        .collect();
    let created: BTreeSet<&str> = top_level
        .iter()
        .flat_map(|(_, objects)| objects.iter())
        .filter(|o| o.kind == "Namespace")
        .map(|o| o.name.as_str())
        .collect();
    let mut applied = BTreeSet::new();
    let mut problems = Vec::new();
    for (file, objects) in top_level {
        for object in objects {
            let namespace = object.namespace.as_str();
            if created.contains(namespace) && !applied.contains(namespace) {
                problems.push(format!(
                    "{}: {} {} comes before its Namespace {namespace} in `kubectl apply -f` order",
                    file.display(),
                    object.kind,
                    object.name
                ));
            }
            if object.kind == "Namespace" {
                applied.insert(object.name.as_str());
            }
        }
    }
    problems
}

/// Every container runs the same image, and a binary that the
/// Containerfile's runtime stage holds.
fn check_commands(dir: &Path, facts: &Facts) -> anyhow::Result<Vec<String>> {
    let containerfile = dir.join("Containerfile");
    let text = std::fs::read_to_string(&containerfile)
        .with_context(|| format!("reading {}", containerfile.display()))?;
    let shipped = runtime_binaries(&text);
    let mut problems = Vec::new();
    if shipped.is_empty() {
        problems.push("Containerfile: the runtime stage copies no binary".to_owned());
    }
    let images: BTreeSet<&str> = facts.containers.iter().map(|c| c.image.as_str()).collect();
    if images.len() > 1 {
        problems.push(format!(
            "containers run different images: {}",
            images.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    for c in &facts.containers {
        let place = format!("{}: {} container {}", c.file.display(), c.object, c.name);
        let binary = c.argv0.rsplit('/').next().unwrap_or_default();
        if binary.is_empty() {
            problems.push(format!("{place}: no command; name the binary it runs"));
        } else if !shipped.contains(binary) {
            problems.push(format!(
                "{place}: runs {}, which the Containerfile does not copy into the runtime stage",
                c.argv0
            ));
        }
    }
    Ok(problems)
}

/// File names that the last stage of a Containerfile copies in.
fn runtime_binaries(containerfile: &str) -> BTreeSet<String> {
    // Instructions, with continuation lines joined and comments dropped.
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in containerfile.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => current.push_str(head),
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let last_stage = instructions
        .iter()
        .rposition(|i| keyword(i) == "FROM")
        .map_or(&instructions[..], |at| &instructions[at + 1..]);
    let mut binaries = BTreeSet::new();
    for instruction in last_stage.iter().filter(|i| keyword(i) == "COPY") {
        let words: Vec<&str> = instruction
            .split_whitespace()
            .skip(1)
            .filter(|w| !w.starts_with("--"))
            .map(|w| w.trim_matches(|c| matches!(c, '[' | ']' | '"' | ',')))
            .filter(|w| !w.is_empty())
            .collect();
        let Some((destination, sources)) = words.split_last() else {
            continue;
        };
        let base = |path: &str| {
            path.trim_end_matches('/')
                .rsplit('/')
                .next()
                .map(str::to_owned)
        };
        if destination.ends_with('/') || sources.len() > 1 {
            binaries.extend(sources.iter().filter_map(|s| base(s)));
        } else {
            binaries.extend(base(destination));
        }
    }
    binaries
}

fn keyword(instruction: &str) -> String {
    instruction
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A copy of daemonset/ under a fresh root, changed by `edit`, checked.
    fn check_copy(case: &str, edit: impl FnOnce(&Path)) -> anyhow::Result<usize> {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemonset");
        let root = std::env::temp_dir().join(format!("weir-xtask-{}-{case}", std::process::id()));
        let dir = root.join("daemonset");
        let _ = std::fs::remove_dir_all(&root);
        copy_dir(&source, &dir);
        edit(&dir);
        let result = check(&root);
        std::fs::remove_dir_all(&root).unwrap();
        result
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            let target = to.join(path.file_name().unwrap());
            if path.is_dir() {
                copy_dir(&path, &target);
            } else {
                std::fs::copy(&path, &target).unwrap();
            }
        }
    }

    fn replace(file: &Path, from: &str, to: &str) {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(text.contains(from), "{} has no {from:?}", file.display());
        std::fs::write(file, text.replace(from, to)).unwrap();
    }

    fn fails_with(result: anyhow::Result<usize>, expected: &str) {
        let error = format!("{:#}", result.expect_err("the check should fail"));
        assert!(error.contains(expected), "{expected:?} not in:\n{error}");
    }

    /// The real manifests pass, and each kind of mistake is caught. Needs
    /// kubernetes-validate (`cargo xtask setup`).
    #[test]
    fn catches_each_kind_of_mistake() {
        check_copy("clean", |_| ()).unwrap();
        fails_with(
            check_copy("field", |dir| {
                replace(
                    &dir.join("daemonset.yaml"),
                    "mountPropagation: B",
                    "mountPropogation: B",
                )
            }),
            "'mountPropogation' was unexpected",
        );
        fails_with(
            check_copy("unlisted", |dir| {
                replace(&dir.join(KUSTOMIZATION), "  - rbac.yaml\n", "")
            }),
            "rbac.yaml is not listed",
        );
        fails_with(
            check_copy("missing", |dir| {
                replace(&dir.join(KUSTOMIZATION), "rbac.yaml", "rbac.yml")
            }),
            "rbac.yml does not exist",
        );
        fails_with(
            check_copy("order", |dir| {
                std::fs::rename(dir.join("00-namespace.yaml"), dir.join("namespace.yaml")).unwrap();
                replace(
                    &dir.join(KUSTOMIZATION),
                    "00-namespace.yaml",
                    "namespace.yaml",
                );
            }),
            "configmap.yaml: ConfigMap weir-config comes before its Namespace weir-system",
        );
        fails_with(
            check_copy("binary", |dir| {
                replace(
                    &dir.join("Containerfile"),
                    "COPY --from=build /src/target/release/weir-cni",
                    "#",
                )
            }),
            "runs weir-cni, which the Containerfile does not copy",
        );
        fails_with(
            check_copy("kustomization.yaml", |dir| {
                std::fs::copy(dir.join(KUSTOMIZATION), dir.join("kustomization.yaml")).unwrap();
            }),
            "kustomization.yaml: `kubectl apply -f daemonset/` would fail on it",
        );
    }

    #[test]
    fn runtime_binaries_come_from_the_last_stage() {
        let containerfile = "FROM rust AS build\nCOPY . .\nRUN cargo build \\\n  --release\n\
            # a comment\nFROM distroless\nCOPY --from=build /src/weir /usr/local/bin/weir\n\
            COPY --from=build [\"/src/a\", \"/src/weir-cni\", \"/usr/local/bin/\"]\n";
        let found: Vec<String> = runtime_binaries(containerfile).into_iter().collect();
        assert_eq!(found, ["a", "weir", "weir-cni"]);
    }

    #[test]
    fn only_listed_crds_are_excused() {
        assert!(is_known_crd(
            "WARN optional/servicemonitor.yaml Couldn't find schema for kind ServiceMonitor \
             with api version monitoring.coreos.com/v1 for kubernetes version 1.33"
        ));
        assert!(!is_known_crd(
            "WARN daemonset.yaml Couldn't find schema for kind DaemonSet with api version \
             apps/v1beta2 for kubernetes version 1.33"
        ));
        assert!(!is_known_crd("ERROR daemonset.yaml did not validate"));
    }
}
