//! `weir-cni install` and `uninstall`, for the DaemonSet's init container:
//! put the plugin into the node's CNI bin directory and chain it after the
//! node's network plugin in its conflist, and take both away again.
//!
//! The conflist is edited as text: only the `plugins` array changes, and the
//! rest of the file stays byte for byte as the network plugin wrote it.
//! Every file is written to a temporary name and renamed into place, so the
//! runtime never reads half a file.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::DEFAULT_SOCKET;
use crate::spec::PLUGIN_TYPE;

pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";
pub const DEFAULT_CONF_DIR: &str = "/etc/cni/net.d";

#[derive(Debug)]
pub struct InstallError(String);

impl fmt::Display for InstallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InstallError {}

impl InstallError {
    pub fn from_message(message: impl Into<String>) -> InstallError {
        InstallError(message.into())
    }
}

fn io_error(what: impl fmt::Display, path: &Path, e: io::Error) -> InstallError {
    InstallError(format!("{what} {}: {e}", path.display()))
}

/// What a command line asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cli {
    Install {
        bin_dir: PathBuf,
        conf_dir: PathBuf,
        socket: PathBuf,
    },
    Uninstall {
        bin_dir: PathBuf,
        conf_dir: PathBuf,
    },
    Help,
}

pub const USAGE: &str = "\
usage: weir-cni install [--bin-dir DIR] [--conf-dir DIR] [--socket PATH]
       weir-cni uninstall [--bin-dir DIR] [--conf-dir DIR]

Run by a container runtime (CNI_COMMAND set), weir-cni is a chained CNI
plugin. Without CNI_COMMAND it installs or uninstalls itself:
  --bin-dir   CNI plugin directory (default /opt/cni/bin)
  --conf-dir  CNI configuration directory (default /etc/cni/net.d); the
              lexically first *.conflist there gets weir-cni appended
  --socket    the agent's socket (default /var/run/weir/cni.sock)";

impl Cli {
    /// Parses `args` without the program name.
    pub fn parse(args: &[String]) -> Result<Cli, InstallError> {
        let Some((command, rest)) = args.split_first() else {
            return Ok(Cli::Help);
        };
        let install = match command.as_str() {
            "install" => true,
            "uninstall" => false,
            "help" | "--help" | "-h" => return Ok(Cli::Help),
            other => return Err(InstallError(format!("unknown command {other:?}\n{USAGE}"))),
        };
        let mut values: HashMap<&str, String> = HashMap::new();
        let mut rest = rest.iter();
        while let Some(arg) = rest.next() {
            let (flag, value) = match arg.split_once('=') {
                Some((flag, value)) => (flag, value.to_owned()),
                None => (
                    arg.as_str(),
                    rest.next()
                        .ok_or_else(|| InstallError(format!("{arg} needs a value")))?
                        .clone(),
                ),
            };
            let known = if install {
                ["--bin-dir", "--conf-dir", "--socket"].as_slice()
            } else {
                ["--bin-dir", "--conf-dir"].as_slice()
            };
            let Some(flag) = known.iter().find(|known| **known == flag) else {
                return Err(InstallError(format!("unknown option {flag:?}\n{USAGE}")));
            };
            values.insert(flag, value);
        }
        let mut take = |flag, default: &str| {
            PathBuf::from(values.remove(flag).unwrap_or_else(|| default.to_owned()))
        };
        let bin_dir = take("--bin-dir", DEFAULT_BIN_DIR);
        let conf_dir = take("--conf-dir", DEFAULT_CONF_DIR);
        Ok(if install {
            Cli::Install {
                bin_dir,
                conf_dir,
                socket: take("--socket", DEFAULT_SOCKET),
            }
        } else {
            Cli::Uninstall { bin_dir, conf_dir }
        })
    }
}

/// Copies `exe` to `<bin_dir>/weir-cni` and chains the plugin into the
/// first conflist of `conf_dir`. Returns what it did, for the log. Running
/// it again changes nothing.
pub fn install(
    exe: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    socket: &Path,
) -> Result<Vec<String>, InstallError> {
    let mut done = Vec::new();
    let binary = fs::read(exe).map_err(|e| io_error("cannot read", exe, e))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    write_atomically(&target, &binary, 0o755)?;
    done.push(format!("installed {}", target.display()));

    let conflist = first_conflist(conf_dir)?.ok_or_else(|| {
        InstallError(format!(
            "no *.conflist in {}: install the pod network's CNI plugin first (weir-cni only chains after one)",
            conf_dir.display()
        ))
    })?;
    let text = fs::read_to_string(&conflist).map_err(|e| io_error("cannot read", &conflist, e))?;
    let socket = socket
        .to_str()
        .ok_or_else(|| InstallError(format!("socket path {} is not UTF-8", socket.display())))?;
    let entry = format!(
        r#"{{"type": "{PLUGIN_TYPE}", "socket": {}}}"#,
        serde_json::Value::from(socket)
    );
    let edited =
        chain(&text, &entry).map_err(|e| InstallError(format!("{}: {e}", conflist.display())))?;
    match edited {
        Some(edited) => {
            let mode = fs::metadata(&conflist)
                .map(|m| m.permissions().mode())
                .unwrap_or(0o644);
            write_atomically(&conflist, edited.as_bytes(), mode)?;
            done.push(format!("chained {PLUGIN_TYPE} in {}", conflist.display()));
        }
        None => done.push(format!(
            "{} already chains {PLUGIN_TYPE}",
            conflist.display()
        )),
    }
    Ok(done)
}

/// Takes the plugin out of every conflist of `conf_dir` and removes
/// `<bin_dir>/weir-cni`. Returns what it did.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<String>, InstallError> {
    let mut done = Vec::new();
    for conflist in conflists(conf_dir)? {
        let text =
            fs::read_to_string(&conflist).map_err(|e| io_error("cannot read", &conflist, e))?;
        let edited =
            unchain(&text).map_err(|e| InstallError(format!("{}: {e}", conflist.display())))?;
        if let Some(edited) = edited {
            let mode = fs::metadata(&conflist)
                .map(|m| m.permissions().mode())
                .unwrap_or(0o644);
            write_atomically(&conflist, edited.as_bytes(), mode)?;
            done.push(format!("removed {PLUGIN_TYPE} from {}", conflist.display()));
        }
    }
    let target = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&target) {
        Ok(()) => done.push(format!("removed {}", target.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("cannot remove", &target, e)),
    }
    Ok(done)
}

/// The `*.conflist` files of `dir`, sorted by name.
fn conflists(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error("cannot read", dir, e))? {
        let path = entry.map_err(|e| io_error("cannot read", dir, e))?.path();
        if path.extension().is_some_and(|ext| ext == "conflist") && path.is_file() {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// The conflist the runtime uses: the lexically first one.
fn first_conflist(dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    Ok(conflists(dir)?.into_iter().next())
}

/// Writes `<path>` through a temporary file in the same directory, so that
/// readers see the old file or the new one, never part of one.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), InstallError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    // No .conflist suffix: the runtime must never pick the temporary file.
    let temp = dir.join(format!(".{name}.weir-cni-{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = fs::File::create(&temp)?;
        file.write_all(contents)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    written.map_err(|e| {
        let _ = fs::remove_file(&temp);
        io_error("cannot write", path, e)
    })
}

/// The `plugins` of a conflist, each with its byte range in the text.
struct Plugins<'a> {
    /// Just after the array's `[`.
    open: usize,
    entries: Vec<(std::ops::Range<usize>, PluginFields)>,
    text: &'a str,
}

#[derive(Deserialize, PartialEq, Eq)]
struct PluginFields {
    #[serde(rename = "type", default)]
    plugin_type: String,
}

fn parse_plugins(text: &str) -> Result<Plugins<'_>, String> {
    let top: HashMap<String, &RawValue> =
        serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    let array = top
        .get("plugins")
        .ok_or("no \"plugins\" list: not a conflist")?;
    let list: Vec<&RawValue> =
        serde_json::from_str(array.get()).map_err(|e| format!("\"plugins\" is not a list: {e}"))?;
    let offset = |raw: &str| raw.as_ptr() as usize - text.as_ptr() as usize;
    let open = offset(array.get()) + 1;
    let mut entries = Vec::new();
    for raw in list {
        let fields: PluginFields = serde_json::from_str(raw.get())
            .map_err(|e| format!("a plugin is not an object: {e}"))?;
        let start = offset(raw.get());
        entries.push((start..start + raw.get().len(), fields));
    }
    Ok(Plugins {
        open,
        entries,
        text,
    })
}

impl Plugins<'_> {
    fn ours(&self) -> Option<&std::ops::Range<usize>> {
        self.entries
            .iter()
            .find(|(_, fields)| fields.plugin_type == PLUGIN_TYPE)
            .map(|(range, _)| range)
    }

    /// The whitespace that starts the line `at` is on, to indent like it.
    fn indent_of(&self, at: usize) -> &str {
        let line_start = self.text[..at].rfind('\n').map_or(0, |i| i + 1);
        let prefix = &self.text[line_start..at];
        &prefix[..prefix.len() - prefix.trim_start().len()]
    }
}

/// `text` with `entry` as the last plugin, or the existing weir-cni plugin
/// replaced by `entry`; `None` when it is already there as `entry`.
fn chain(text: &str, entry: &str) -> Result<Option<String>, String> {
    let plugins = parse_plugins(text)?;
    let mut edited = String::with_capacity(text.len() + entry.len() + 8);
    if let Some(range) = plugins.ours() {
        if &text[range.clone()] == entry {
            return Ok(None);
        }
        edited.push_str(&text[..range.start]);
        edited.push_str(entry);
        edited.push_str(&text[range.end..]);
    } else if let Some((last, _)) = plugins.entries.last() {
        let indent = plugins.indent_of(last.start);
        edited.push_str(&text[..last.end]);
        if text[..last.start].ends_with(indent) && !indent.is_empty() {
            edited.push_str(",\n");
            edited.push_str(indent);
        } else {
            edited.push_str(", ");
        }
        edited.push_str(entry);
        edited.push_str(&text[last.end..]);
    } else {
        edited.push_str(&text[..plugins.open]);
        edited.push_str(entry);
        edited.push_str(&text[plugins.open..]);
    }
    // What was written must still be a conflist with the plugin in it.
    if parse_plugins(&edited)?.ours().is_none() {
        return Err("editing the plugins list failed".to_owned());
    }
    Ok(Some(edited))
}

/// `text` without the weir-cni plugins, or `None` when it has none.
fn unchain(text: &str) -> Result<Option<String>, String> {
    let mut text = text.to_owned();
    let mut changed = false;
    loop {
        let plugins = parse_plugins(&text)?;
        let Some(index) = plugins
            .entries
            .iter()
            .position(|(_, fields)| fields.plugin_type == PLUGIN_TYPE)
        else {
            break;
        };
        let range = plugins.entries[index].0.clone();
        // Take the separator with it: the comma before, or for the first
        // entry the comma after.
        let cut = if index > 0 {
            plugins.entries[index - 1].0.end..range.end
        } else if let Some((next, _)) = plugins.entries.get(1) {
            range.start..next.start
        } else {
            range
        };
        text.replace_range(cut, "");
        changed = true;
    }
    Ok(changed.then_some(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "ipam": {"type": "calico-ipam"},
      "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}
    },
    {
      "type": "portmap",
      "snat": true,
      "capabilities": {"portMappings": true}
    }
  ]
}
"#;

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir()
                .join(format!("weir-cni-install-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("bin")).unwrap();
            fs::create_dir_all(dir.join("net.d")).unwrap();
            TempDir(dir)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn chaining_appends_once_and_keeps_the_rest() {
        let entry = r#"{"type": "weir-cni", "socket": "/var/run/weir/cni.sock"}"#;
        let chained = chain(CALICO, entry).unwrap().unwrap();
        assert!(chained.starts_with(&CALICO[..CALICO.find("\n    }\n  ]").unwrap()]));
        assert!(chained.ends_with(&format!(
            "\"portMappings\": true}}\n    }},\n    {entry}\n  ]\n}}\n"
        )));
        let json: serde_json::Value = serde_json::from_str(&chained).unwrap();
        let plugins = json["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2]["socket"], "/var/run/weir/cni.sock");
        assert_eq!(json["name"], "k8s-pod-network");
        assert_eq!(plugins[0]["ipam"]["type"], "calico-ipam");

        // Again: nothing to do.
        assert_eq!(chain(&chained, entry).unwrap(), None);
        // Another socket replaces the entry in place.
        let moved = chain(&chained, r#"{"type": "weir-cni", "socket": "/run/w.sock"}"#)
            .unwrap()
            .unwrap();
        let json: serde_json::Value = serde_json::from_str(&moved).unwrap();
        assert_eq!(json["plugins"].as_array().unwrap().len(), 3);
        assert_eq!(json["plugins"][2]["socket"], "/run/w.sock");

        // Unchaining gives back the original text.
        assert_eq!(unchain(&chained).unwrap().as_deref(), Some(CALICO));
        assert_eq!(unchain(CALICO).unwrap(), None);
    }

    #[test]
    fn chaining_compact_and_empty_lists() {
        let entry = r#"{"type": "weir-cni", "socket": "/s"}"#;
        let compact = r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}"#;
        let chained = chain(compact, entry).unwrap().unwrap();
        assert_eq!(
            chained,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}, {"type": "weir-cni", "socket": "/s"}]}"#
        );
        assert_eq!(unchain(&chained).unwrap().as_deref(), Some(compact));

        let empty = r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#;
        let chained = chain(empty, entry).unwrap().unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&chained).unwrap()["plugins"][0]["type"],
            "weir-cni"
        );
        assert_eq!(unchain(&chained).unwrap().as_deref(), Some(empty));

        // weir-cni first in the list: the comma after it goes too.
        let first = r#"{"plugins":[{"type":"weir-cni"}, {"type":"bridge"}]}"#;
        assert_eq!(
            unchain(first).unwrap().as_deref(),
            Some(r#"{"plugins":[{"type":"bridge"}]}"#)
        );

        assert!(
            chain(r#"{"type":"bridge"}"#, entry)
                .unwrap_err()
                .contains("not a conflist")
        );
        assert!(chain("[1]", entry).is_err());
    }

    #[test]
    fn install_is_idempotent_and_uninstall_undoes_it() {
        let dir = TempDir::new("idempotent");
        let exe = dir.path("weir-cni-build");
        fs::write(&exe, b"#!/bin/sh\n").unwrap();
        let (bin, conf) = (dir.path("bin"), dir.path("net.d"));
        fs::write(conf.join("10-calico.conflist"), CALICO).unwrap();
        fs::write(conf.join("20-other.conflist"), CALICO).unwrap();
        fs::write(conf.join("05-single.conf"), r#"{"type":"bridge"}"#).unwrap();
        let socket = Path::new("/var/run/weir/cni.sock");

        let done = install(&exe, &bin, &conf, socket).unwrap();
        assert_eq!(done.len(), 2, "{done:?}");
        let installed = bin.join("weir-cni");
        assert_eq!(fs::read(&installed).unwrap(), b"#!/bin/sh\n");
        assert_eq!(
            fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let first = fs::read_to_string(conf.join("10-calico.conflist")).unwrap();
        assert!(first.contains(r#"{"type": "weir-cni", "socket": "/var/run/weir/cni.sock"}"#));
        // Only the first conflist, and no temporary files left behind.
        assert_eq!(
            fs::read_to_string(conf.join("20-other.conflist")).unwrap(),
            CALICO
        );
        let mut names: Vec<_> = fs::read_dir(&conf)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["05-single.conf", "10-calico.conflist", "20-other.conflist"]
        );

        let again = install(&exe, &bin, &conf, socket).unwrap();
        assert!(again[1].contains("already chains"), "{again:?}");
        assert_eq!(
            fs::read_to_string(conf.join("10-calico.conflist")).unwrap(),
            first
        );

        uninstall(&bin, &conf).unwrap();
        assert!(!installed.exists());
        assert_eq!(
            fs::read_to_string(conf.join("10-calico.conflist")).unwrap(),
            CALICO
        );
        assert_eq!(uninstall(&bin, &conf).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn install_without_a_conflist_says_so() {
        let dir = TempDir::new("noconf");
        let exe = dir.path("weir-cni-build");
        fs::write(&exe, b"x").unwrap();
        let error = install(&exe, &dir.path("bin"), &dir.path("net.d"), Path::new("/s"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("no *.conflist in"), "{error}");
    }

    #[test]
    fn command_lines() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            Cli::parse(&args("install --bin-dir /b --conf-dir=/c --socket /s")).unwrap(),
            Cli::Install {
                bin_dir: "/b".into(),
                conf_dir: "/c".into(),
                socket: "/s".into()
            }
        );
        assert_eq!(
            Cli::parse(&args("uninstall")).unwrap(),
            Cli::Uninstall {
                bin_dir: DEFAULT_BIN_DIR.into(),
                conf_dir: DEFAULT_CONF_DIR.into()
            }
        );
        assert_eq!(Cli::parse(&[]).unwrap(), Cli::Help);
        assert!(Cli::parse(&args("uninstall --socket /s")).is_err());
        assert!(Cli::parse(&args("install --bin-dir")).is_err());
        assert!(Cli::parse(&args("frobnicate")).is_err());
    }
}
