//! `weir-cni`: run by a container runtime as a chained CNI plugin (with
//! `CNI_COMMAND` set), or by the DaemonSet's init container as
//! `weir-cni install` / `weir-cni uninstall`.

use std::io::{Read, Write};
use std::process::ExitCode;

use weir_cni::install::{self, Cli, USAGE};
use weir_cni::plugin;

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_some() {
        let mut stdin = Vec::new();
        // VERSION may come without a configuration; the plugin reports a
        // missing one for the other commands.
        let _ = std::io::stdin().read_to_end(&mut stdin);
        let outcome = plugin::run(
            |name| std::env::var(name).ok(),
            &stdin,
            &mut std::io::stderr(),
        );
        let mut stdout = std::io::stdout();
        let _ = stdout.write_all(outcome.stdout.as_bytes());
        let _ = stdout.flush();
        return ExitCode::from(outcome.exit_code);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = Cli::parse(&args).and_then(|cli| match cli {
        Cli::Install {
            bin_dir,
            conf_dir,
            socket,
        } => {
            let exe = std::env::current_exe().map_err(|e| {
                install::InstallError::from_message(format!("cannot find this executable: {e}"))
            })?;
            install::install(&exe, &bin_dir, &conf_dir, &socket)
        }
        Cli::Uninstall { bin_dir, conf_dir } => install::uninstall(&bin_dir, &conf_dir),
        Cli::Help => {
            println!("{USAGE}");
            Ok(Vec::new())
        }
    });
    match result {
        Ok(done) => {
            for line in done {
                eprintln!("weir-cni: {line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("weir-cni: {e}");
            ExitCode::FAILURE
        }
    }
}
