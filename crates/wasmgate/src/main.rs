//! The `wasmgate` binary: CLI verbs wired to the crates.

mod plugin_run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "wasmgate",
    version,
    about = "A Proxy-Wasm gateway and plugin toolkit"
)]
struct Cli {
    /// Log filter for Wasmgate's own logs (tracing syntax), e.g. `info` or `wasm=debug`.
    #[arg(long, global = true, default_value = "warn", env = "WASMGATE_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with plugin modules.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run one request through a plugin in-process and show what the plugin changed.
    Run(Box<plugin_run::RunArgs>),
    /// Show a module's ABI version, callbacks and imports.
    Inspect {
        /// The .wasm file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Plugin {
            command: PluginCommand::Run(args),
        } => plugin_run::run(*args),
        Command::Plugin {
            command: PluginCommand::Inspect { file },
        } => plugin_run::inspect(&file),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
