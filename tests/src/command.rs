//! Running the external commands a sandbox is built with, mostly iproute2.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `cmd` to completion and returns its stdout. A failure names the
/// command and carries its stderr, which is where `ip` says what was wrong.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let output = cmd
        .output()
        .with_context(|| format!("cannot run `{shown}`"))?;
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs `ip <args>`, with `args` separated by spaces: the sandbox's names
/// never contain any, and the commands read as they would in a shell.
pub(crate) fn ip(args: &str) -> Result<String> {
    run(Command::new("ip").args(args.split_whitespace()))
}

fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}
