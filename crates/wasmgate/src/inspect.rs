//! `wasmgate plugin inspect FILE|URL`: a module's ABI version, callbacks and imports, and for each
//! import whether Wasmgate and Envoy provide it, before anything runs the module.
//!
//! The imports and exports are read from the module's sections here rather than from a compiled
//! module: a module that imports something Wasmgate lacks does not compile-and-link, and is exactly
//! the one worth describing. Wasmgate's own loader then runs too, for everything else it checks
//! (types, memory, allocator). Exit code 2 when the module cannot run on either host (an import
//! neither provides, or a module Wasmgate refuses for a reason Envoy shares), so CI can gate on it.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use serde::Serialize;
use wasmgate_abi::AbiVersion;
use wasmgate_runtime::{LoadError, Runtime, RuntimeConfig};

use crate::distribution::{self, RemoteArgs};
use crate::envoy_imports;

/// The exit code when some import is provided by neither host, or the module does not load.
const UNUSABLE: u8 = 2;

const WASI_MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// The .wasm file, or a URL (file://, http(s)://, oci://) fetched into the cache as
    /// `plugin pull` does.
    source: String,
    /// Print the report as one JSON object on stdout (warnings and errors included).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// Everything `inspect` says, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Report {
    /// The path or URL as given.
    source: String,
    /// For a URL: the module's file in the cache.
    path: Option<String>,
    /// For an OCI image: the manifest digest.
    digest: Option<String>,
    size: usize,
    sha256: String,
    /// `0.2.1`, ...; `None` when the module exports no known ABI marker.
    abi_version: Option<String>,
    /// Exported Proxy-Wasm callbacks, allocators and start functions, sorted.
    callbacks: Vec<String>,
    imports: Vec<ImportReport>,
    /// WASI functions imported, per WASI module name.
    wasi: BTreeMap<String, Vec<String>>,
    /// The Envoy release the `envoy` columns describe.
    envoy_version: &'static str,
    /// Whether Wasmgate's loader accepts the module, and if not, why.
    wasmgate_loads: bool,
    wasmgate_error: Option<String>,
    warnings: Vec<String>,
    errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct ImportReport {
    module: String,
    name: String,
    /// `function`, `memory`, `table`, `global` or `tag`.
    kind: &'static str,
    /// The function's type, when the type section could be read.
    #[serde(rename = "type")]
    ty: Option<String>,
    wasmgate: bool,
    /// Wasmgate links it, but only answers an errno (a WASI function without descriptors behind it).
    wasmgate_stub: bool,
    envoy: bool,
    /// Why Envoy does not link it.
    envoy_note: Option<String>,
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let (wasm, mut report) = if args.source.contains("://") {
        let fetched = distribution::fetch(&args.source, None, false, &args.remote)?;
        let report = Report::new(
            &args.source,
            Some(fetched.path.display().to_string()),
            fetched.digest.clone(),
        );
        (fetched.bytes.to_vec(), report)
    } else {
        let path = Path::new(&args.source);
        let wasm = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        if !wasmgate_fetch::unbox::is_wasm(&wasm) {
            bail!(
                "{}: {}",
                path.display(),
                wasmgate_fetch::unbox::describe_non_wasm(&wasm)
            );
        }
        (wasm, Report::new(&args.source, None, None))
    };
    let declared = declared(&wasm).with_context(|| format!("reading {}", args.source))?;
    report.describe(&wasm, &declared);
    report.load_in_wasmgate(&wasm)?;

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print();
    }
    Ok(if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(UNUSABLE)
    })
}

impl Report {
    fn new(source: &str, path: Option<String>, digest: Option<String>) -> Self {
        Self {
            source: source.to_owned(),
            path,
            digest,
            size: 0,
            sha256: String::new(),
            abi_version: None,
            callbacks: Vec::new(),
            imports: Vec::new(),
            wasi: BTreeMap::new(),
            envoy_version: envoy_imports::VERSION,
            wasmgate_loads: false,
            wasmgate_error: None,
            warnings: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Fills in everything read from the sections, and each import's verdict.
    fn describe(&mut self, wasm: &[u8], declared: &Declared) {
        self.size = wasm.len();
        self.sha256 = wasmgate_fetch::cache::sha256_hex(wasm);
        // The newest marker wins when a module exports several, as Wasmgate's loader decides.
        let abi = declared
            .exports
            .iter()
            .filter(|(_, kind)| *kind == ExportKind::Function)
            .filter_map(|(name, _)| AbiVersion::from_marker(name))
            .max();
        self.abi_version = abi.map(|v| v.to_string());
        let mut callbacks: Vec<String> = declared
            .exports
            .iter()
            .filter(|(name, kind)| *kind == ExportKind::Function && is_callback(name))
            .map(|(name, _)| name.clone())
            .collect();
        callbacks.sort();
        callbacks.dedup();
        self.callbacks = callbacks;

        let wasmgate: HashSet<(&str, &str)> = wasmgate_runtime::host_functions().collect();
        for import in &declared.imports {
            let qualified = format!("{}.{}", import.module, import.name);
            let is_wasi = WASI_MODULES.contains(&import.module.as_str());
            let (kind, ty) = match &import.kind {
                ImportKind::Function(ty) => ("function", ty.as_ref()),
                ImportKind::Table => ("table", None),
                ImportKind::Memory => ("memory", None),
                ImportKind::Global => ("global", None),
                ImportKind::Tag => ("tag", None),
            };
            let entry = if kind == "function" {
                let in_wasmgate =
                    wasmgate.contains(&(import.module.as_str(), import.name.as_str()));
                let returns_nothing = ty.is_some_and(|t| t.results.is_empty());
                let envoy =
                    envoy_imports::support(&import.module, &import.name, abi, returns_nothing);
                ImportReport {
                    module: import.module.clone(),
                    name: import.name.clone(),
                    kind,
                    ty: ty.map(ToString::to_string),
                    wasmgate: in_wasmgate,
                    wasmgate_stub: in_wasmgate
                        && is_wasi
                        && wasmgate_runtime::is_wasi_stub(&import.name),
                    envoy: envoy.links(),
                    envoy_note: envoy.reason(),
                }
            } else {
                // Proxy-Wasm hosts give functions only: a module defines its own memory and tables.
                ImportReport {
                    module: import.module.clone(),
                    name: import.name.clone(),
                    kind,
                    ty: None,
                    wasmgate: false,
                    wasmgate_stub: false,
                    envoy: false,
                    envoy_note: Some(format!("Envoy provides no {kind} to import")),
                }
            };
            match (entry.wasmgate, entry.envoy) {
                (true, true) => {}
                (true, false) => self.warnings.push(format!(
                    "{qualified}: Wasmgate provides it, but {}; the module does not load in Envoy",
                    entry.envoy_note.as_deref().unwrap_or("Envoy does not")
                )),
                (false, true) => self.warnings.push(format!(
                    "{qualified}: Envoy {} provides it, but Wasmgate does not; the module does not load in Wasmgate",
                    envoy_imports::VERSION
                )),
                (false, false) if kind != "function" => self.errors.push(format!(
                    "{qualified}: the module imports a {kind}, which no Proxy-Wasm host provides (a module defines its own)"
                )),
                (false, false) => self.errors.push(format!(
                    "{qualified}: neither Wasmgate nor Envoy {} provides it",
                    envoy_imports::VERSION
                )),
            }
            if kind == "function" && is_wasi {
                self.wasi
                    .entry(import.module.clone())
                    .or_default()
                    .push(import.name.clone());
            }
            self.imports.push(entry);
        }
        for names in self.wasi.values_mut() {
            names.sort();
            names.dedup();
        }
    }

    /// Runs Wasmgate's loader (compiles the module and checks its exports and import types).
    fn load_in_wasmgate(&mut self, wasm: &[u8]) -> anyhow::Result<()> {
        let runtime = Runtime::new(RuntimeConfig::default())?;
        match runtime.load(wasm) {
            Ok(_) => self.wasmgate_loads = true,
            Err(error) => {
                self.wasmgate_error = Some(match &error {
                    // The loader's wording ("no Proxy-Wasm host defines") is not true of the
                    // imports only Envoy has.
                    LoadError::UnknownImports(names) => {
                        format!(
                            "it imports what Wasmgate does not provide: {}",
                            names.join(", ")
                        )
                    }
                    other => other.to_string(),
                });
                match error {
                    // Already said import by import, with what Envoy does.
                    LoadError::UnknownImports(_) | LoadError::UnsupportedImport { .. } => {}
                    // Host set-up, not the module: no verdict.
                    LoadError::Engine(message) => bail!("setting up the engine: {message}"),
                    // Checks Envoy makes too (the ABI marker, memory, an allocator, callback and
                    // import types, valid code): a module failing them runs on neither host.
                    other => self
                        .errors
                        .push(format!("Wasmgate refuses the module: {other}")),
                }
            }
        }
        Ok(())
    }

    fn print(&self) {
        match &self.path {
            Some(path) => {
                println!("url:         {}", self.source);
                println!("cached:      {path}");
            }
            None => println!("file:        {}", self.source),
        }
        if let Some(digest) = &self.digest {
            println!("digest:      {digest}");
        }
        println!("size:        {} bytes", self.size);
        println!("sha256:      {}", self.sha256);
        println!(
            "abi version: {}",
            self.abi_version
                .as_deref()
                .unwrap_or("none (no proxy_abi_version_* export)")
        );
        println!("callbacks:   {}", list_or_none(&self.callbacks));
        let width = self
            .imports
            .iter()
            .map(|i| i.module.len() + 1 + i.name.len())
            .max()
            .unwrap_or(0);
        if self.imports.is_empty() {
            println!("imports:     none");
        } else {
            let head = format!("imports:     {}", self.imports.len());
            println!(
                "{head:head_width$}  wasmgate  envoy {}",
                envoy_imports::VERSION,
                head_width = width + 2
            );
        }
        for import in &self.imports {
            let qualified = format!("{}.{}", import.module, import.name);
            let wasmgate = match (import.wasmgate, import.wasmgate_stub) {
                (false, _) => "no",
                (true, true) => "stub",
                (true, false) => "yes",
            };
            let envoy = if import.envoy { "yes" } else { "no" };
            let kind = if import.kind == "function" {
                String::new()
            } else {
                format!("  ({})", import.kind)
            };
            println!("  {qualified:width$}  {wasmgate:8}  {envoy}{kind}");
        }
        if self.wasi.is_empty() {
            println!("wasi:        none");
        }
        for (module, names) in &self.wasi {
            println!("wasi:        {module}: {}", names.join(", "));
        }
        if self.imports.iter().any(|i| i.wasmgate_stub) {
            println!(
                "             (stub: Wasmgate links it but answers an errno; no files or sockets)"
            );
        }
        match &self.wasmgate_error {
            None => println!("wasmgate:    loads"),
            Some(error) => println!("wasmgate:    does not load: {error}"),
        }
        for warning in &self.warnings {
            eprintln!("warning: {warning}");
        }
        for error in &self.errors {
            eprintln!("error: {error}");
        }
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// Exports a Proxy-Wasm host calls: the callbacks, the allocators and the WASI start functions.
fn is_callback(name: &str) -> bool {
    name.starts_with("proxy_on_") || matches!(name, "_initialize" | "_start" | "main" | "malloc")
}

/// A module's imports and exports, read from its sections.
#[derive(Debug, Default)]
struct Declared {
    imports: Vec<Import>,
    exports: Vec<(String, ExportKind)>,
}

#[derive(Debug)]
struct Import {
    module: String,
    name: String,
    kind: ImportKind,
}

#[derive(Debug)]
enum ImportKind {
    /// The function's type, when the type section could be read.
    Function(Option<FuncType>),
    Table,
    Memory,
    Global,
    Tag,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExportKind {
    Function,
    Other,
}

#[derive(Debug, Clone)]
struct FuncType {
    params: Vec<String>,
    results: Vec<String>,
}

impl fmt::Display for FuncType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "({}) -> ({})",
            self.params.join(", "),
            self.results.join(", ")
        )
    }
}

/// A module whose bytes break the binary format where `inspect` reads them.
#[derive(Debug)]
struct Malformed {
    offset: usize,
    what: String,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "not a valid WebAssembly module: {} (at byte {})",
            self.what, self.offset
        )
    }
}

impl std::error::Error for Malformed {}

impl From<wasmparser::BinaryReaderError> for Malformed {
    fn from(error: wasmparser::BinaryReaderError) -> Self {
        Malformed {
            offset: error.offset(),
            what: error.message().to_owned(),
        }
    }
}

/// Reads the type, import and export sections with wasmparser (the parser wasmtime itself
/// uses), without validating the rest: the names are what matters here.
fn declared(wasm: &[u8]) -> Result<Declared, Malformed> {
    use wasmparser::{CompositeInnerType, Encoding, ExternalKind, Payload, TypeRef};
    let mut declared = Declared::default();
    // By type index; `None` for types that are not plain function types (GC rec groups).
    let mut types: Vec<Option<FuncType>> = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(wasm) {
        match payload? {
            Payload::Version {
                encoding: Encoding::Component,
                range,
                ..
            } => {
                return Err(Malformed {
                    offset: range.start,
                    what: "a WebAssembly component, not a core module: Proxy-Wasm hosts load \
                           core modules"
                        .into(),
                });
            }
            Payload::TypeSection(reader) => {
                for group in reader {
                    for sub_type in group?.into_types() {
                        types.push(match &sub_type.composite_type.inner {
                            CompositeInnerType::Func(func) => Some(FuncType {
                                params: func.params().iter().map(|t| t.to_string()).collect(),
                                results: func.results().iter().map(|t| t.to_string()).collect(),
                            }),
                            _ => None,
                        });
                    }
                }
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import?;
                    let kind = match import.ty {
                        TypeRef::Func(index) | TypeRef::FuncExact(index) => {
                            ImportKind::Function(types.get(index as usize).cloned().flatten())
                        }
                        TypeRef::Table(_) => ImportKind::Table,
                        TypeRef::Memory(_) => ImportKind::Memory,
                        TypeRef::Global(_) => ImportKind::Global,
                        TypeRef::Tag(_) => ImportKind::Tag,
                    };
                    declared.imports.push(Import {
                        module: import.module.to_owned(),
                        name: import.name.to_owned(),
                        kind,
                    });
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    let export = export?;
                    let kind = match export.kind {
                        ExternalKind::Func => ExportKind::Function,
                        _ => ExportKind::Other,
                    };
                    declared.exports.push((export.name.to_owned(), kind));
                }
            }
            _ => {}
        }
    }
    Ok(declared)
}
