//! `wasmgate plugin test FILE CASES.yaml`: the real module, in-process, against declared cases.
//!
//! Exit codes: 0 when every case passes, 1 when one fails, 2 when the cases cannot run at all (an
//! unreadable module or cases file).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use wasmgate_abi::LogLevel;
use wasmgate_runtime::{Runtime, RuntimeConfig};
use wasmgate_toolkit::cases::{self, CasesFile, RunOptions};

#[derive(Args)]
pub struct TestArgs {
    /// The plugin's .wasm file.
    file: PathBuf,
    /// The cases file (YAML): requests, fixtures and expectations. See docs/writing-plugins.md.
    cases: PathBuf,
    /// A file holding the plugin configuration, replacing the cases file's
    /// `plugin.configuration`. A .yaml/.yml/.json file is passed to the plugin as JSON; any other
    /// as is.
    #[arg(long, value_name = "CFG")]
    config: Option<PathBuf>,
    /// Run only the cases whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// The plugin's log level: lines below it are not recorded (default: the cases file's
    /// `plugin.log_level`, else info).
    #[arg(long)]
    log_level: Option<String>,
}

const SETUP_FAILED: u8 = 2;

pub fn run(args: TestArgs) -> anyhow::Result<ExitCode> {
    match prepare_and_run(&args) {
        Ok(code) => Ok(code),
        Err(error) => {
            eprintln!("error: {error:#}");
            Ok(ExitCode::from(SETUP_FAILED))
        }
    }
}

fn prepare_and_run(args: &TestArgs) -> anyhow::Result<ExitCode> {
    let wasm =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let text = std::fs::read_to_string(&args.cases)
        .with_context(|| format!("reading {}", args.cases.display()))?;
    let file = CasesFile::parse(&text, &args.cases.display().to_string())?;
    let configuration = args.config.as_deref().map(read_configuration).transpose()?;
    let level_name = args
        .log_level
        .as_deref()
        .or(file.plugin.log_level.as_deref())
        .unwrap_or("info");
    let log_level = LogLevel::parse(level_name).with_context(|| {
        format!("unknown log level {level_name:?} (trace, debug, info, warn, error, critical)")
    })?;

    let runtime = Runtime::new(RuntimeConfig {
        log_level,
        ..Default::default()
    })?;
    let module = runtime
        .load(&wasm)
        .with_context(|| format!("loading {}", args.file.display()))?;
    let plugin_name = args
        .file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    let options = RunOptions {
        configuration,
        filter: args.filter.clone(),
        plugin_name,
    };
    println!(
        "{} (sha256 {}) against {}",
        args.file.display(),
        &module.sha256()[..12],
        args.cases.display()
    );
    let report = cases::run(&runtime, &module, &file, &options)?;
    if report.cases.is_empty() {
        anyhow::bail!(
            "no case matches --filter {:?}",
            args.filter.as_deref().unwrap_or_default()
        );
    }
    print!("{report}");
    Ok(if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Reads `--config`: structured files become the JSON the gateway would pass.
fn read_configuration(path: &Path) -> anyhow::Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let structured = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    );
    if !structured {
        return Ok(raw);
    }
    let value: serde_yaml::Value = serde_yaml::from_slice(&raw)
        .with_context(|| format!("{}: not valid YAML or JSON", path.display()))?;
    Ok(cases::configuration_bytes(&value))
}
