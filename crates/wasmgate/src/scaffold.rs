//! `wasmgate plugin new` and `plugin build`: start a plugin project from a template, build it to a
//! `.wasm` module, and optionally write that module as an OCI image layout.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use wasmgate_fetch::cache::sha256_hex;
use wasmgate_fetch::oci::{OCI_MANIFEST, WASM_CONFIG, WASM_LAYER};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    /// Rust with the proxy-wasm crate (needs cargo and the wasm32-wasip1 target).
    Rust,
    /// AssemblyScript with @solo-io/proxy-runtime (needs Node.js and npm).
    #[value(alias = "as")]
    Assemblyscript,
    /// C++ with proxy-wasm-cpp-sdk (needs Emscripten's em++, make and a checkout of the SDK).
    Cpp,
    /// Go with proxy-wasm-go-sdk (needs Go 1.24 or later: the maintained Go SDK targets the
    /// upstream Go compiler, not TinyGo).
    #[value(alias = "go")]
    Tinygo,
}

#[derive(Args, Debug)]
pub struct NewArgs {
    /// The project name (letters, digits, `-`, `_`); also the folder created.
    name: String,
    /// The language of the project.
    #[arg(long, value_enum)]
    lang: Lang,
    /// Where to create the project folder (default: the current folder).
    #[arg(long, value_name = "PARENT", default_value = ".")]
    dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    /// The project folder (default: the current folder).
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// Also write the module as an OCI image layout (a Wasm artifact image) into this folder.
    #[arg(long, value_name = "OUTDIR")]
    oci: Option<PathBuf>,
}

const RUST_CARGO_TOML: &str = include_str!("../templates/rust/Cargo.toml");
const RUST_LIB_RS: &str = include_str!("../templates/rust/lib.rs");
const RUST_README: &str = include_str!("../templates/rust/README.md");
const RUST_GATEWAY: &str = include_str!("../templates/rust/gateway.yaml");
const RUST_GITIGNORE: &str = include_str!("../templates/rust/gitignore");
const AS_PACKAGE_JSON: &str = include_str!("../templates/assemblyscript/package.json");
const AS_INDEX_TS: &str = include_str!("../templates/assemblyscript/index.ts");
const AS_TSCONFIG: &str = include_str!("../templates/assemblyscript/tsconfig.json");
const AS_README: &str = include_str!("../templates/assemblyscript/README.md");
const AS_GATEWAY: &str = include_str!("../templates/assemblyscript/gateway.yaml");
const AS_GITIGNORE: &str = include_str!("../templates/assemblyscript/gitignore");
const CPP_PLUGIN_CC: &str = include_str!("../templates/cpp/plugin.cc");
const CPP_MAKEFILE: &str = include_str!("../templates/cpp/Makefile");
const CPP_README: &str = include_str!("../templates/cpp/README.md");
const CPP_GATEWAY: &str = include_str!("../templates/cpp/gateway.yaml");
const CPP_GITIGNORE: &str = include_str!("../templates/cpp/gitignore");
const GO_MAIN_GO: &str = include_str!("../templates/tinygo/main.go");
const GO_MOD: &str = include_str!("../templates/tinygo/go.mod");
const GO_README: &str = include_str!("../templates/tinygo/README.md");
const GO_GATEWAY: &str = include_str!("../templates/tinygo/gateway.yaml");
const GO_GITIGNORE: &str = include_str!("../templates/tinygo/gitignore");
/// The same cases fit every template: they add the same header from the same configuration.
const CASES: &str = include_str!("../templates/cases.yaml");

/// The module an AssemblyScript project builds (its package.json `asbuild` script).
const AS_MODULE: &str = "build/plugin.wasm";
/// The module a C++ project's Makefile builds (from plugin.cc).
const CPP_MODULE: &str = "plugin.wasm";
/// The module a Go project builds (`go build -o`).
const GO_MODULE: &str = "main.wasm";
const RUST_TARGET: &str = "wasm32-wasip1";

fn check_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("invalid plugin name {name:?}: use only ASCII letters, digits, '-' and '_'");
    }
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        bail!("invalid plugin name {name:?}: it must start with a letter");
    }
    Ok(())
}

/// The files of a new project, as (relative path, contents).
fn project_files(name: &str, lang: Lang) -> anyhow::Result<Vec<(&'static str, String)>> {
    let fill = |template: &str, module: &str| {
        template
            .replace("{{module}}", module)
            .replace("{{name}}", name)
    };
    match lang {
        Lang::Rust => {
            let module = format!(
                "target/{RUST_TARGET}/release/{}.wasm",
                name.replace('-', "_")
            );
            Ok(vec![
                ("Cargo.toml", fill(RUST_CARGO_TOML, &module)),
                ("src/lib.rs", fill(RUST_LIB_RS, &module)),
                ("README.md", fill(RUST_README, &module)),
                ("gateway.yaml", fill(RUST_GATEWAY, &module)),
                (".gitignore", fill(RUST_GITIGNORE, &module)),
                ("tests/cases.yaml", fill(CASES, &module)),
            ])
        }
        Lang::Assemblyscript => Ok(vec![
            ("package.json", fill(AS_PACKAGE_JSON, AS_MODULE)),
            ("assembly/index.ts", fill(AS_INDEX_TS, AS_MODULE)),
            ("assembly/tsconfig.json", fill(AS_TSCONFIG, AS_MODULE)),
            ("README.md", fill(AS_README, AS_MODULE)),
            ("gateway.yaml", fill(AS_GATEWAY, AS_MODULE)),
            (".gitignore", fill(AS_GITIGNORE, AS_MODULE)),
            ("tests/cases.yaml", fill(CASES, AS_MODULE)),
        ]),
        // The name only appears inside strings and as the Go module path (which may hold `-`
        // and `_`); the C++ classes and the Go package (`main`) have fixed names.
        Lang::Cpp => Ok(vec![
            ("plugin.cc", fill(CPP_PLUGIN_CC, CPP_MODULE)),
            ("Makefile", fill(CPP_MAKEFILE, CPP_MODULE)),
            ("README.md", fill(CPP_README, CPP_MODULE)),
            ("gateway.yaml", fill(CPP_GATEWAY, CPP_MODULE)),
            (".gitignore", fill(CPP_GITIGNORE, CPP_MODULE)),
            ("tests/cases.yaml", fill(CASES, CPP_MODULE)),
        ]),
        Lang::Tinygo => Ok(vec![
            ("main.go", fill(GO_MAIN_GO, GO_MODULE)),
            ("go.mod", fill(GO_MOD, GO_MODULE)),
            ("README.md", fill(GO_README, GO_MODULE)),
            ("gateway.yaml", fill(GO_GATEWAY, GO_MODULE)),
            (".gitignore", fill(GO_GITIGNORE, GO_MODULE)),
            ("tests/cases.yaml", fill(CASES, GO_MODULE)),
        ]),
    }
}

/// `wasmgate plugin new NAME --lang L [--dir PARENT]`.
pub fn new(args: NewArgs) -> anyhow::Result<ExitCode> {
    check_name(&args.name)?;
    let files = project_files(&args.name, args.lang)?;
    let root = args.dir.join(&args.name);
    if root.symlink_metadata().is_ok() {
        bail!(
            "{} already exists; not overwriting it (pick another name or --dir)",
            root.display()
        );
    }
    if !args.dir.is_dir() {
        bail!("--dir {}: no such folder", args.dir.display());
    }
    std::fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
    for (relative, contents) in &files {
        let path = root.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("created {}", root.display());
    for (relative, _) in &files {
        println!("  {relative}");
    }
    println!("next: wasmgate plugin build {}", root.display());
    Ok(ExitCode::SUCCESS)
}

/// Where cargo puts the project's build and its cdylib's file stem, from `cargo metadata` (so
/// `CARGO_TARGET_DIR`, `.cargo/config.toml` and `[lib] name` are taken into account).
fn rust_artifact(cargo: &std::ffi::OsStr, dir: &Path) -> anyhow::Result<(PathBuf, String)> {
    let output = Command::new(cargo)
        .current_dir(dir)
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("cannot start cargo (is Rust installed? https://rustup.rs)")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed in {}:\n{}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("reading cargo metadata")?;
    let target_dir = metadata["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    let manifest = std::fs::canonicalize(dir.join("Cargo.toml"))?;
    let package = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| {
            p["manifest_path"]
                .as_str()
                .and_then(|m| std::fs::canonicalize(m).ok())
                .is_some_and(|m| m == manifest)
        })
        .with_context(|| {
            format!(
                "{}: not a package (a workspace root? build one member's folder)",
                manifest.display()
            )
        })?;
    let library = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == "cdylib"))
        })
        .and_then(|t| t["name"].as_str())
        .with_context(|| {
            format!(
                "{}: no cdylib library (a plugin needs [lib] crate-type = [\"cdylib\"])",
                manifest.display()
            )
        })?;
    Ok((PathBuf::from(target_dir), library.replace('-', "_")))
}

fn run(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {what} (is it installed and on PATH?)"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

fn ensure_rust_target() -> anyhow::Result<()> {
    let Ok(output) = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
    else {
        // No rustup: let cargo report a missing target itself.
        return Ok(());
    };
    let installed = String::from_utf8_lossy(&output.stdout);
    if output.status.success() && !installed.lines().any(|l| l.trim() == RUST_TARGET) {
        eprintln!("installing the {RUST_TARGET} target: rustup target add {RUST_TARGET}");
        run(
            Command::new("rustup").args(["target", "add", RUST_TARGET]),
            "rustup target add",
        )?;
    }
    Ok(())
}

fn build_rust(dir: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let (target_dir, artifact) = rust_artifact(&cargo, dir)?;
    ensure_rust_target()?;
    run(
        Command::new(&cargo)
            .current_dir(dir)
            .args(["build", "--release", "--target", RUST_TARGET]),
        "cargo build --release --target wasm32-wasip1",
    )?;
    Ok(target_dir
        .join(RUST_TARGET)
        .join("release")
        .join(format!("{artifact}.wasm")))
}

fn build_assemblyscript(dir: &Path) -> anyhow::Result<PathBuf> {
    if !dir.join("node_modules").exists() {
        run(
            Command::new("npm")
                .current_dir(dir)
                .args(["install", "--no-audit", "--no-fund"]),
            "npm install",
        )?;
    }
    run(
        Command::new("npx").current_dir(dir).args([
            "asc",
            "assembly/index.ts",
            "-b",
            AS_MODULE,
            "--use",
            "abort=abort_proc_exit",
            "--optimize",
        ]),
        "npx asc",
    )?;
    Ok(dir.join(AS_MODULE))
}

/// A program a build needs, and where to get it.
struct Tool {
    /// The command, as looked up on PATH (or a path).
    command: std::ffi::OsString,
    /// What it is, for the message.
    what: &'static str,
    /// How to install it.
    install: &'static str,
}

/// Where `command` is: itself when it names a path, else the first executable file of that name in
/// a PATH folder.
fn find_program(command: &std::ffi::OsStr) -> Option<PathBuf> {
    let is_program = |path: &Path| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            path.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        }
        #[cfg(not(unix))]
        {
            path.is_file() || path.with_extension("exe").is_file()
        }
    };
    let path = Path::new(command);
    if path.components().count() > 1 {
        return is_program(path).then(|| path.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|folder| folder.join(command))
        .find(|candidate| is_program(candidate))
}

/// Fails, before anything runs, when one of `tools` is missing: names each missing tool, where to
/// get it, and the command the build would have run.
fn require_tools(tools: &[Tool], dir: &Path, would_run: &str) -> anyhow::Result<()> {
    let missing: Vec<&Tool> = tools
        .iter()
        .filter(|tool| find_program(&tool.command).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut message = String::new();
    for tool in &missing {
        message.push_str(&format!(
            "{} ({}) is not on PATH; install it: {}\n",
            tool.command.to_string_lossy(),
            tool.what,
            tool.install
        ));
    }
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    message.push_str(&format!(
        "not building {}; the build would have run, in that folder:\n{would_run}",
        dir.display()
    ));
    bail!(message)
}

/// The C++ compiler the template's Makefile runs: `$EMXX`, as make would take it, else em++.
fn emxx() -> std::ffi::OsString {
    std::env::var_os("EMXX")
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "em++".into())
}

fn build_cpp(dir: &Path) -> anyhow::Result<PathBuf> {
    require_tools(
        &[
            Tool {
                command: emxx(),
                what: "Emscripten's C++ compiler, which the Makefile runs",
                install: "https://emscripten.org/docs/getting_started/downloads.html, then \
                          `source emsdk_env.sh`; the Makefile also needs a checkout of \
                          https://github.com/proxy-wasm/proxy-wasm-cpp-sdk (see the project's \
                          README.md)",
            },
            Tool {
                command: "make".into(),
                what: "GNU make",
                install: "https://www.gnu.org/software/make/ (or your system's package, e.g. \
                          `apt-get install make`)",
            },
        ],
        dir,
        "  make    (the Makefile runs em++ on plugin.cc and the SDK's proxy_wasm_intrinsics.cc)",
    )?;
    run(Command::new("make").current_dir(dir), "make")?;
    Ok(dir.join(CPP_MODULE))
}

const GO_BUILD: &[&str] = &["build", "-buildmode=c-shared", "-o", GO_MODULE, "."];

fn build_go(dir: &Path) -> anyhow::Result<PathBuf> {
    let tidy = !dir.join("go.sum").exists();
    let would_run = format!(
        "{}  GOOS=wasip1 GOARCH=wasm go {}",
        if tidy { "  go mod tidy\n" } else { "" },
        GO_BUILD.join(" ")
    );
    require_tools(
        &[Tool {
            command: "go".into(),
            what: "the Go toolchain, 1.24 or later: proxy-wasm-go-sdk builds with upstream Go, \
                   not TinyGo",
            install: "https://go.dev/dl/",
        }],
        dir,
        &would_run,
    )?;
    if tidy {
        run(
            Command::new("go").current_dir(dir).args(["mod", "tidy"]),
            "go mod tidy",
        )?;
    }
    run(
        Command::new("go")
            .current_dir(dir)
            .env("GOOS", "wasip1")
            .env("GOARCH", "wasm")
            .args(GO_BUILD),
        "GOOS=wasip1 GOARCH=wasm go build",
    )?;
    Ok(dir.join(GO_MODULE))
}

/// `wasmgate plugin build [DIR] [--oci OUTDIR]`.
pub fn build(args: BuildArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.dir;
    let package_json = dir.join("package.json");
    let makefile = dir.join("Makefile");
    let module = if dir.join("Cargo.toml").is_file() {
        build_rust(dir)?
    } else if package_json.is_file() {
        let text = std::fs::read_to_string(&package_json)
            .with_context(|| format!("reading {}", package_json.display()))?;
        if !text.contains("\"assemblyscript\"") {
            bail!(
                "{}: not an AssemblyScript project (no assemblyscript dependency)",
                package_json.display()
            );
        }
        build_assemblyscript(dir)?
    } else if dir.join("go.mod").is_file() {
        build_go(dir)?
    } else if makefile.is_file() {
        let text = std::fs::read_to_string(&makefile)
            .with_context(|| format!("reading {}", makefile.display()))?;
        if !text.contains("PROXY_WASM_CPP_SDK") && !text.contains("proxy_wasm_intrinsics") {
            bail!(
                "{}: not a Proxy-Wasm C++ project (the Makefile does not use \
                 proxy-wasm-cpp-sdk: no PROXY_WASM_CPP_SDK or proxy_wasm_intrinsics)",
                makefile.display()
            );
        }
        build_cpp(dir)?
    } else {
        bail!(
            "{}: no Cargo.toml, package.json, go.mod or Makefile; `wasmgate plugin build` knows \
             Rust, AssemblyScript, Go and C++ (Emscripten) projects (see `wasmgate plugin new`)",
            dir.display()
        );
    };
    let bytes = std::fs::read(&module)
        .with_context(|| format!("the build did not produce {}", module.display()))?;
    if !wasmgate_fetch::unbox::is_wasm(&bytes) {
        bail!("{} is not a WebAssembly module", module.display());
    }
    let module = std::fs::canonicalize(&module).unwrap_or(module);
    let sha256 = sha256_hex(&bytes);
    println!("module: {}", module.display());
    println!("size:   {} bytes", bytes.len());
    println!("sha256: {sha256}");
    if let Some(out) = &args.oci {
        let digest = write_oci_layout(out, &bytes)?;
        println!("oci:    {} (manifest {digest})", out.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn descriptor(media_type: &str, data: &[u8], title: Option<&str>) -> serde_json::Value {
    let mut descriptor = serde_json::json!({
        "mediaType": media_type,
        "digest": format!("sha256:{}", sha256_hex(data)),
        "size": data.len(),
    });
    if let Some(title) = title {
        descriptor["annotations"] = serde_json::json!({ "org.opencontainers.image.title": title });
    }
    descriptor
}

fn write_blob(blobs: &Path, data: &[u8]) -> anyhow::Result<()> {
    let path = blobs.join(sha256_hex(data));
    std::fs::write(&path, data).with_context(|| format!("writing {}", path.display()))
}

/// Writes `module` as an OCI image layout holding one Wasm artifact image (the layout
/// `plugin push --variant artifact` sends), tagged `latest`. Returns the manifest digest.
pub fn write_oci_layout(out: &Path, module: &[u8]) -> anyhow::Result<String> {
    let blobs = out.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).with_context(|| format!("creating {}", blobs.display()))?;
    let config = serde_json::to_vec(&serde_json::json!({
        "type": "envoy_proxy",
        "abiVersions": ["v0.2.1"],
        "config": { "root_ids": [] },
    }))?;
    let config_descriptor = descriptor(WASM_CONFIG, &config, Some("runtime-config.json"));
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_descriptor,
        "layers": [config_descriptor, descriptor(WASM_LAYER, module, Some("plugin.wasm"))],
    }))?;
    write_blob(&blobs, &config)?;
    write_blob(&blobs, module)?;
    write_blob(&blobs, &manifest)?;
    let mut manifest_descriptor = descriptor(OCI_MANIFEST, &manifest, None);
    manifest_descriptor["annotations"] =
        serde_json::json!({ "org.opencontainers.image.ref.name": "latest" });
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_descriptor],
    });
    std::fs::write(out.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    std::fs::write(out.join("index.json"), serde_json::to_vec_pretty(&index)?)?;
    Ok(format!("sha256:{}", sha256_hex(&manifest)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("demo-1_x").is_ok());
        for bad in ["", "a b", "../x", "x/y", "1abc", "-x", "é"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
