//! The `wasmgate` binary: CLI verbs wired to the crates.

mod distribution;
mod gateway;
mod plugin_run;
mod quickstart;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, reload};

#[derive(Parser)]
#[command(
    name = "wasmgate",
    version,
    about = "A Proxy-Wasm gateway and plugin toolkit"
)]
struct Cli {
    /// Log filter for Wasmgate's own logs (tracing syntax), e.g. `info` or `wasmgate_dataplane=debug`.
    /// Plugin logs are governed by their own level (admin `/logging?wasm=LEVEL`).
    #[arg(long, global = true, default_value = "info", env = "WASMGATE_LOG")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. Without --config: the built-in quickstart (basic-auth in front of a demo page).
    Run {
        /// The gateway configuration (YAML).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Quickstart only: where to listen.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Quickstart only: the admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
    },
    /// Check gateway configuration files without starting anything.
    Validate {
        /// Gateway configuration files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
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
    /// Fetch a module into the cache (file, http(s) or OCI) and print its path and sha256.
    Pull(distribution::PullArgs),
    /// Push a module to an OCI registry as an image Istio and Wasmgate accept.
    Push(distribution::PushArgs),
    /// The module cache.
    Cache {
        #[command(subcommand)]
        command: distribution::CacheCommand,
    },
}

type FilterHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

fn init_logging(filter: &str) -> FilterHandle {
    // Plugin lines pass through here unfiltered: the runtime's own level decides which it emits.
    let filter = EnvFilter::try_new(format!("{filter},wasm=trace"))
        .unwrap_or_else(|_| EnvFilter::new("info,wasm=trace"));
    let (layer, handle) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    handle
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = init_logging(&cli.log);
    let result = match cli.command {
        Command::Run {
            config,
            listen,
            admin,
        } => run(config, listen, admin, filter),
        Command::Validate { files } => validate(&files),
        Command::Plugin {
            command: PluginCommand::Run(args),
        } => plugin_run::run(*args),
        Command::Plugin {
            command: PluginCommand::Inspect { file },
        } => plugin_run::inspect(&file),
        Command::Plugin {
            command: PluginCommand::Pull(args),
        } => distribution::pull(args),
        Command::Plugin {
            command: PluginCommand::Push(args),
        } => distribution::push(args),
        Command::Plugin {
            command: PluginCommand::Cache { command },
        } => distribution::cache(command),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    config: Option<PathBuf>,
    listen: SocketAddr,
    admin: SocketAddr,
    filter: FilterHandle,
) -> anyhow::Result<ExitCode> {
    let config_path = config;
    let config = match &config_path {
        Some(path) => wasmgate_config::GatewayConfig::load(path)
            .map_err(|errors| anyhow::anyhow!("{errors}"))?,
        None => {
            let plugin = quickstart::basic_auth_module()?;
            let upstream = quickstart::start_demo_upstream()?;
            let yaml = quickstart::config_yaml(listen, admin, upstream, &plugin);
            let config = wasmgate_config::GatewayConfig::from_yaml_str(&yaml, "<quickstart>")
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("the built-in quickstart configuration")?;
            println!(
                "Wasmgate quickstart: basic-auth guards http://{listen}/productpage (try: curl -u ok:test http://{listen}/productpage)"
            );
            config
        }
    };
    let control = gateway::Control::new(&config)?;
    let prepared = gateway::prepare(&config, &control, &[])?;
    let set_filter: wasmgate_dataplane::LogFilterSetter = Arc::new(move |level: &str| {
        let replacement =
            EnvFilter::try_new(format!("{level},wasm=trace")).map_err(|e| e.to_string())?;
        filter.reload(replacement).map_err(|e| e.to_string())
    });
    gateway::serve(control, config, config_path, prepared, Some(set_filter))?;
    Ok(ExitCode::SUCCESS)
}

fn validate(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for file in files {
        match wasmgate_config::GatewayConfig::load(file) {
            Ok(_) => println!("{}: ok", file.display()),
            Err(errors) => {
                failed = true;
                eprintln!("{errors}");
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
