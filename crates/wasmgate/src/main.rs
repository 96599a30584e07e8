//! The `wasmgate` binary: CLI verbs wired to the crates.

mod distribution;
mod envoy_imports;
mod gateway;
mod inspect;
mod plugin_run;
mod plugin_test;
mod quickstart;
mod scaffold;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, reload};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Check gateway configuration files and Istio WasmPlugin manifests (files or folders) offline.
    Validate {
        /// Gateway configuration files, WasmPlugin manifest files, or folders of manifests.
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
    /// Create a plugin project (Rust, AssemblyScript, C++ or Go) with a build, a test and a gateway config.
    New(scaffold::NewArgs),
    /// Build a plugin project to its .wasm; print its path, size and sha256.
    Build(scaffold::BuildArgs),
    /// Run a plugin against the requests and expectations of a cases file (exit 1 when one fails).
    Test(plugin_test::TestArgs),
    /// Run one request through a plugin in-process and show what the plugin changed.
    Run(Box<plugin_run::RunArgs>),
    /// Show a module's ABI version, callbacks and imports, and which hosts (Wasmgate, Envoy)
    /// provide each import; exit code 2 when some import is provided by neither.
    Inspect(inspect::InspectArgs),
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
    let plugins = wasmgate_runtime::LOG_TARGET;
    let filter = EnvFilter::try_new(format!("{filter},{plugins}=trace"))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{plugins}=trace")));
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
            command: PluginCommand::New(args),
        } => scaffold::new(args),
        Command::Plugin {
            command: PluginCommand::Build(args),
        } => scaffold::build(args),
        Command::Plugin {
            command: PluginCommand::Test(args),
        } => plugin_test::run(args),
        Command::Plugin {
            command: PluginCommand::Run(args),
        } => plugin_run::run(*args),
        Command::Plugin {
            command: PluginCommand::Inspect(args),
        } => inspect::inspect(args),
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
            EnvFilter::try_new(format!("{level},{}=trace", wasmgate_runtime::LOG_TARGET))
                .map_err(|e| e.to_string())?;
        filter.reload(replacement).map_err(|e| e.to_string())
    });
    gateway::serve(control, config, config_path, prepared, Some(set_filter))?;
    Ok(ExitCode::SUCCESS)
}

/// `wasmgate validate FILE...`: each FILE is a gateway configuration, a file of Kubernetes
/// manifests (a document with `kind` or `apiVersion`: its Istio WasmPlugins are checked, other
/// kinds are skipped with a note), or a folder of such manifests (`*.yaml`, `*.yml`, as
/// `plugins_dir` is read). A gateway configuration's `plugins_dir` is checked too. Prints
/// `FILE: ok` for each good file, every error on stderr (file, document, field, reason); exit code 1
/// on any error.
fn validate(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for file in files {
        let ok = if file.is_dir() {
            validate_manifest_dir(file)
        } else {
            match std::fs::read_to_string(file) {
                Ok(text) if wasmgate_config::is_kubernetes_manifest(&text) => {
                    let scan = wasmgate_config::scan_wasm_plugins(&text, file);
                    report_manifests(&scan, std::slice::from_ref(file))
                }
                Ok(_) => validate_gateway_config(file),
                Err(e) => {
                    eprintln!("{}: cannot read the file: {e}", file.display());
                    false
                }
            }
        };
        failed |= !ok;
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn validate_gateway_config(file: &std::path::Path) -> bool {
    match wasmgate_config::GatewayConfig::load(file) {
        Ok(config) => match &config.plugins_dir {
            Some(dir) if dir.is_dir() => {
                let scan = wasmgate_config::scan_wasm_plugin_dir(dir);
                for note in &scan.skipped {
                    println!("{note}");
                }
                for error in &scan.errors {
                    eprintln!("{error}");
                }
                if scan.errors.is_empty() {
                    println!("{}: ok", file.display());
                }
                scan.errors.is_empty()
            }
            _ => {
                println!("{}: ok", file.display());
                true
            }
        },
        Err(errors) => {
            eprintln!("{errors}");
            false
        }
    }
}

fn validate_manifest_dir(dir: &std::path::Path) -> bool {
    let files = match wasmgate_config::manifest_files(dir) {
        Ok(files) => files,
        Err(error) => {
            eprintln!("{error}");
            return false;
        }
    };
    if files.is_empty() {
        println!("{}: ok (no *.yaml or *.yml files)", dir.display());
        return true;
    }
    report_manifests(&wasmgate_config::scan_wasm_plugin_dir(dir), &files)
}

/// Prints a scan's notes and errors, then `FILE: ok` for each of `files` without errors.
fn report_manifests(scan: &wasmgate_config::ManifestScan, files: &[PathBuf]) -> bool {
    for note in &scan.skipped {
        println!("{note}");
    }
    for error in &scan.errors {
        eprintln!("{error}");
    }
    for file in files {
        let name = file.display().to_string();
        let prefix = format!("{name} (document ");
        let bad = scan
            .errors
            .iter()
            .any(|e| e.source == name || e.source.starts_with(&prefix));
        if !bad {
            println!("{name}: ok");
        }
    }
    scan.errors.is_empty()
}
