//! `wasmgate plugin new` and `plugin build`, through the real binary and real toolchains.
//!
//! The Rust test runs a real `cargo build --release --target wasm32-wasip1` of the generated
//! project, offline (the crates it needs are the ones the repo's own plugins use), into the shared
//! `target/scaffold-test` so later runs reuse the build.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{repo, wasmgate};
use sha2::{Digest, Sha256};

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn run(args: &[&str], cwd: &Path) -> Output {
    wasmgate()
        .args(args)
        .current_dir(cwd)
        .env("CARGO_TARGET_DIR", repo().join("target/scaffold-test"))
        .env("CARGO_NET_OFFLINE", "true")
        .output()
        .unwrap()
}

fn ok(output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn failed(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "should have failed; stdout:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The value of a `key: value` line of `plugin build`'s output.
fn field<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key}: in\n{stdout}"))
        .trim()
}

/// Checks `plugin build`'s output against the file, returns the module path and bytes.
fn check_built(stdout: &str) -> (PathBuf, Vec<u8>) {
    let path = PathBuf::from(field(stdout, "module"));
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(field(stdout, "sha256"), sha256_hex(&bytes));
    assert_eq!(field(stdout, "size"), format!("{} bytes", bytes.len()));
    (path, bytes)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The OCI image layout in `dir` holds one artifact image whose Wasm layer is `module`.
fn check_oci_layout(dir: &Path, module: &[u8]) {
    let blob = |digest: &str| {
        let hex = digest.strip_prefix("sha256:").unwrap();
        let data = std::fs::read(dir.join("blobs/sha256").join(hex)).unwrap();
        assert_eq!(
            sha256_hex(&data),
            hex,
            "blob {digest} has the wrong content"
        );
        data
    };
    let layout = read_json(&dir.join("oci-layout"));
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index = read_json(&dir.join("index.json"));
    assert_eq!(index["schemaVersion"], 2);
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1);
    assert_eq!(
        manifests[0]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let manifest_bytes = blob(manifests[0]["digest"].as_str().unwrap());
    assert_eq!(manifests[0]["size"], manifest_bytes.len());
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.module.wasm.config.v1+json"
    );
    let config: serde_json::Value =
        serde_json::from_slice(&blob(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    assert_eq!(config["type"], "envoy_proxy");
    let layer = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["mediaType"] == "application/vnd.module.wasm.content.layer.v1+wasm")
        .expect("a Wasm layer");
    assert_eq!(layer["digest"], format!("sha256:{}", sha256_hex(module)));
    assert_eq!(layer["size"], module.len());
    assert_eq!(blob(layer["digest"].as_str().unwrap()), module);
}

#[test]
fn a_new_rust_plugin_builds_runs_and_packs_as_an_oci_layout() {
    let temp = tempfile::tempdir().unwrap();
    let stdout = ok(&run(
        &["plugin", "new", "demo-rs", "--lang", "rust"],
        temp.path(),
    ));
    assert!(stdout.contains("created"), "{stdout}");
    let project = temp.path().join("demo-rs");
    for file in [
        "Cargo.toml",
        "src/lib.rs",
        "README.md",
        "gateway.yaml",
        ".gitignore",
        "tests/cases.yaml",
    ] {
        assert!(project.join(file).is_file(), "{file} is missing");
    }
    let gateway = std::fs::read_to_string(project.join("gateway.yaml")).unwrap();
    assert!(
        gateway.contains("filename: target/wasm32-wasip1/release/demo_rs.wasm"),
        "{gateway}"
    );

    let oci = temp.path().join("oci");
    let stdout = ok(&run(
        &["plugin", "build", "demo-rs", "--oci", oci.to_str().unwrap()],
        temp.path(),
    ));
    let (module, bytes) = check_built(&stdout);
    assert!(
        module.ends_with("wasm32-wasip1/release/demo_rs.wasm"),
        "{stdout}"
    );
    check_oci_layout(&oci, &bytes);

    let inspect = ok(&run(
        &["plugin", "inspect", module.to_str().unwrap()],
        temp.path(),
    ));
    assert!(inspect.contains("abi version: 0.2.1"), "{inspect}");
    assert!(inspect.contains("proxy_on_response_headers"), "{inspect}");

    // The project's own test passes.
    let tested = ok(&run(
        &[
            "plugin",
            "test",
            module.to_str().unwrap(),
            "tests/cases.yaml",
        ],
        &project,
    ));
    assert!(tested.contains("3 cases: 3 passed, 0 failed"), "{tested}");

    let default = ok(&run(
        &["plugin", "run", module.to_str().unwrap()],
        temp.path(),
    ));
    assert!(default.contains("+ x-demo-rs: hello"), "{default}");
    let configured = ok(&run(
        &[
            "plugin",
            "run",
            module.to_str().unwrap(),
            "--config",
            r#"{"header": "x-scaffold", "value": "yes"}"#,
        ],
        temp.path(),
    ));
    assert!(configured.contains("+ x-scaffold: yes"), "{configured}");
    assert!(
        configured.contains("[info] demo-rs: adding x-scaffold: yes"),
        "{configured}"
    );
    let rejected = failed(&run(
        &["plugin", "run", module.to_str().unwrap(), "--config", "[1]"],
        temp.path(),
    ));
    assert!(
        rejected.contains("rejected its configuration"),
        "{rejected}"
    );

    // The generated gateway.yaml serves the plugin once the module is where it expects it (this
    // test builds under CARGO_TARGET_DIR, so copy it there), on free ports.
    let release = project.join("target/wasm32-wasip1/release");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::copy(&module, release.join("demo_rs.wasm")).unwrap();
    let config = project.join("gateway.yaml");
    let yaml = gateway
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:15000", "127.0.0.1:0");
    std::fs::write(&config, yaml).unwrap();
    let validated = ok(&run(&["validate", "gateway.yaml"], &project));
    assert!(validated.contains("gateway.yaml: ok"), "{validated}");
    let gateway = common::start(&["run", "--config", config.to_str().unwrap()]);
    let (status, answer) = common::get(gateway.listener("main"), "/", "");
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("x-demo-rs: hello"), "{answer}");
    assert!(answer.ends_with("hello from wasmgate\n"), "{answer}");
}

#[test]
fn a_new_assemblyscript_plugin_is_generated_and_builds_with_the_repo_toolchain() {
    let temp = tempfile::tempdir().unwrap();
    ok(&run(
        &["plugin", "new", "demo_as", "--lang", "assemblyscript"],
        temp.path(),
    ));
    let project = temp.path().join("demo_as");
    let package = read_json(&project.join("package.json"));
    let reference = read_json(&repo().join("plugins/test-assemblyscript/package.json"));
    assert_eq!(package["dependencies"], reference["dependencies"]);
    assert_eq!(package["devDependencies"], reference["devDependencies"]);
    read_json(&project.join("assembly/tsconfig.json"));
    for file in [
        "assembly/index.ts",
        "README.md",
        "gateway.yaml",
        ".gitignore",
        "tests/cases.yaml",
    ] {
        assert!(project.join(file).is_file(), "{file} is missing");
    }

    // Building needs Node and the SDK: reuse the repo's test plugin's node_modules, no network.
    let node_modules = repo().join("plugins/test-assemblyscript/node_modules");
    let have_npx = std::process::Command::new("npx")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node_modules.join("assemblyscript").is_dir() || !have_npx {
        // scripts/test.sh installs both; only an explicit opt-out may leave them out.
        assert_eq!(
            std::env::var("WASMGATE_SKIP_ASSEMBLYSCRIPT").as_deref(),
            Ok("1"),
            "no npx or no {}: run scripts/build-plugins.sh",
            node_modules.display()
        );
        eprintln!("WASMGATE_SKIP_ASSEMBLYSCRIPT=1: not building the AssemblyScript template");
        return;
    }
    std::os::unix::fs::symlink(&node_modules, project.join("node_modules")).unwrap();
    let stdout = ok(&run(&["plugin", "build", "demo_as"], temp.path()));
    let (module, _) = check_built(&stdout);
    assert_eq!(
        module,
        project.join("build/plugin.wasm").canonicalize().unwrap()
    );
    let configured = ok(&run(
        &[
            "plugin",
            "run",
            module.to_str().unwrap(),
            "--config",
            r#"{"header": "x-as", "value": "v1"}"#,
        ],
        temp.path(),
    ));
    assert!(configured.contains("+ x-as: v1"), "{configured}");
    let default = ok(&run(
        &["plugin", "run", module.to_str().unwrap()],
        temp.path(),
    ));
    assert!(default.contains("+ x-demo_as: hello"), "{default}");
    let tested = ok(&run(
        &[
            "plugin",
            "test",
            module.to_str().unwrap(),
            "tests/cases.yaml",
        ],
        &project,
    ));
    assert!(tested.contains("3 cases: 3 passed, 0 failed"), "{tested}");
}

#[test]
fn new_refuses_bad_names_existing_folders_and_unknown_languages() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path();
    for bad in ["a b", "../escape", "x/y", "9lives", ""] {
        let stderr = failed(&run(&["plugin", "new", bad, "--lang", "rust"], dir));
        assert!(stderr.contains("invalid plugin name"), "{bad:?}: {stderr}");
    }
    assert!(!dir.join("escape").exists() && !dir.parent().unwrap().join("escape").exists());

    std::fs::create_dir(dir.join("taken")).unwrap();
    std::fs::write(dir.join("taken/keep.txt"), "mine").unwrap();
    let stderr = failed(&run(&["plugin", "new", "taken", "--lang", "rust"], dir));
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(dir.join("taken/keep.txt")).unwrap(),
        "mine"
    );
    assert!(!dir.join("taken/Cargo.toml").exists());

    let stderr = failed(&run(&["plugin", "new", "x", "--lang", "cobol"], dir));
    assert!(stderr.contains("invalid value 'cobol'"), "{stderr}");
    assert!(!dir.join("x").exists());
    // C++ and Go are templated now (their own tests below check the projects).
    ok(&run(&["plugin", "new", "x-cpp", "--lang", "cpp"], dir));
    assert!(dir.join("x-cpp/plugin.cc").is_file());
    ok(&run(&["plugin", "new", "x-go", "--lang", "tinygo"], dir));
    assert!(dir.join("x-go/main.go").is_file());

    // --dir puts the project elsewhere.
    std::fs::create_dir(dir.join("parent")).unwrap();
    ok(&run(
        &[
            "plugin", "new", "there", "--lang", "rust", "--dir", "parent",
        ],
        dir,
    ));
    assert!(dir.join("parent/there/Cargo.toml").is_file());

    // build refuses a workspace root and a crate that is no cdylib.
    std::fs::create_dir(dir.join("ws")).unwrap();
    std::fs::write(dir.join("ws/Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
    let stderr = failed(&run(&["plugin", "build", "ws"], dir));
    assert!(stderr.contains("not a package"), "{stderr}");
    std::fs::create_dir_all(dir.join("bin/src")).unwrap();
    std::fs::write(
        dir.join("bin/Cargo.toml"),
        "[package]\nname = \"bin\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n",
    )
    .unwrap();
    std::fs::write(dir.join("bin/src/main.rs"), "fn main() {}\n").unwrap();
    let stderr = failed(&run(&["plugin", "build", "bin"], dir));
    assert!(stderr.contains("no cdylib library"), "{stderr}");

    // build refuses a folder that is no project.
    let stderr = failed(&run(&["plugin", "build", "taken"], dir));
    assert!(
        stderr.contains("no Cargo.toml, package.json, go.mod or Makefile"),
        "{stderr}"
    );
    // ... and a Makefile that is not a Proxy-Wasm C++ one.
    std::fs::write(dir.join("taken/Makefile"), "all:\n\ttrue\n").unwrap();
    let stderr = failed(&run(&["plugin", "build", "taken"], dir));
    assert!(stderr.contains("not a Proxy-Wasm C++ project"), "{stderr}");
}

/// `wasmgate` with PATH replaced by `path`, so the toolchains it finds are the test's.
fn run_with_path(args: &[&str], cwd: &Path, path: &std::ffi::OsStr) -> Output {
    wasmgate()
        .args(args)
        .current_dir(cwd)
        .env("PATH", path)
        .env_remove("EMXX")
        .output()
        .unwrap()
}

/// A failure that is a clean error (exit 1, an `error:` line), not a panic; returns stderr.
fn clean_failure(output: &Output) -> String {
    let stderr = failed(output);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Writes an executable shell script `name` into `dir`.
fn write_script(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The folder holding `program` on this machine's PATH.
fn folder_of(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).find(|folder| folder.join(program).is_file())
}

/// Writes the smallest valid Wasm module to the `-o` argument (a stand-in for a compiler's output).
const FAKE_COMPILE: &str = r#"out=
while [ $# -gt 0 ]; do [ "$1" = -o ] && out=$2; shift; done
printf '\000asm\001\000\000\000' > "$out"
"#;

/// Checks the files a new project has, that every placeholder was filled and that the shared
/// cases came along with the name; returns the project folder.
fn check_new_project(parent: &Path, name: &str, lang: &str, files: &[&str]) -> PathBuf {
    let stdout = ok(&run(&["plugin", "new", name, "--lang", lang], parent));
    let project = parent.join(name);
    for file in files {
        assert!(stdout.contains(file), "{file} not listed:\n{stdout}");
        let text =
            std::fs::read_to_string(project.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            !text.contains("{{"),
            "{file} has an unfilled placeholder:\n{text}"
        );
    }
    let cases = std::fs::read_to_string(project.join("tests/cases.yaml")).unwrap();
    assert!(
        cases.contains(&format!(
            "configuration: {{ header: x-{name}, value: hello }}"
        )),
        "{cases}"
    );
    assert!(cases.contains("contains: invalid configuration"), "{cases}");
    project
}

/// The generated gateway.yaml passes `validate` once its module exists, on free ports.
fn check_gateway_validates(project: &Path, module: &str) {
    let gateway = std::fs::read_to_string(project.join("gateway.yaml")).unwrap();
    assert!(
        gateway.contains(&format!("filename: {module}")),
        "{gateway}"
    );
    let yaml = gateway
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:15000", "127.0.0.1:0");
    std::fs::write(project.join("gateway.yaml"), yaml).unwrap();
    let validated = ok(&run(&["validate", "gateway.yaml"], project));
    assert!(validated.contains("gateway.yaml: ok"), "{validated}");
}

#[test]
fn a_new_cpp_plugin_is_generated_and_built_with_make_and_em_plus_plus() {
    let temp = tempfile::tempdir().unwrap();
    let files = [
        "plugin.cc",
        "Makefile",
        "README.md",
        "gateway.yaml",
        ".gitignore",
        "tests/cases.yaml",
    ];
    let project = check_new_project(temp.path(), "demo-cpp", "cpp", &files);
    let read = |file: &str| std::fs::read_to_string(project.join(file)).unwrap();
    let source = read("plugin.cc");
    for expected in [
        "#include \"proxy_wasm_intrinsics.h\"",
        "std::string header = \"x-demo-cpp\";",
        "logInfo(\"demo-cpp: adding \" + config.header + \": \" + config.value);",
        "logError(\"demo-cpp: invalid configuration: \" + error);",
        "getBufferBytes(WasmBufferType::PluginConfiguration, 0, configuration_size)",
        "FilterHeadersStatus onResponseHeaders(uint32_t, bool) override",
        "addResponseHeader(",
        "RegisterContextFactory register_AddHeader(CONTEXT_FACTORY(AddHeaderContext),",
    ] {
        assert!(source.contains(expected), "plugin.cc lacks {expected:?}");
    }
    let makefile = read("Makefile");
    for expected in [
        "PROXY_WASM_CPP_SDK ?= proxy-wasm-cpp-sdk",
        "all: plugin.wasm",
        "-sSTANDALONE_WASM",
        "\t$(EMXX) --std=c++17",
    ] {
        assert!(makefile.contains(expected), "Makefile lacks {expected:?}");
    }
    let readme = read("README.md");
    assert!(
        readme.contains("wasmgate plugin test plugin.wasm tests/cases.yaml"),
        "{readme}"
    );
    assert!(readme.contains("not built in Wasmgate's CI"), "{readme}");
    assert_eq!(read(".gitignore").lines().next(), Some("/plugin.wasm"));

    // Without the toolchain: a clear error naming each tool, where to get it, what would have run.
    let empty = tempfile::tempdir().unwrap();
    let stderr = clean_failure(&run_with_path(
        &["plugin", "build", "demo-cpp"],
        temp.path(),
        empty.path().as_os_str(),
    ));
    for expected in [
        "em++ (Emscripten",
        "https://emscripten.org/",
        "https://github.com/proxy-wasm/proxy-wasm-cpp-sdk",
        "make (GNU make) is not on PATH",
        "the build would have run, in that folder:\n  make",
    ] {
        assert!(stderr.contains(expected), "no {expected:?} in:\n{stderr}");
    }
    assert!(!project.join("plugin.wasm").exists());

    // With a stand-in em++ (and the machine's make): make runs it with the SDK's options, and the
    // module is reported and packed as for the other languages.
    let make = folder_of("make").expect("make is needed to test the C++ build");
    let bin = tempfile::tempdir().unwrap();
    write_script(
        bin.path(),
        "em++",
        &format!("echo \"$@\" > em-args.txt\n{FAKE_COMPILE}"),
    );
    let path = std::env::join_paths([bin.path(), &make]).unwrap();
    // No SDK checkout yet: the Makefile says so.
    let output = run_with_path(&["plugin", "build", "demo-cpp"], temp.path(), &path);
    let stderr = failed(&output);
    assert!(
        stderr.contains("no proxy-wasm-cpp-sdk at proxy-wasm-cpp-sdk"),
        "{stderr}"
    );
    assert!(stderr.contains("make failed"), "{stderr}");
    std::fs::create_dir(project.join("proxy-wasm-cpp-sdk")).unwrap();
    std::fs::write(
        project.join("proxy-wasm-cpp-sdk/proxy_wasm_intrinsics.h"),
        "",
    )
    .unwrap();
    let oci = temp.path().join("oci");
    let stdout = ok(&run_with_path(
        &[
            "plugin",
            "build",
            "demo-cpp",
            "--oci",
            oci.to_str().unwrap(),
        ],
        temp.path(),
        &path,
    ));
    let (module, bytes) = check_built(&stdout);
    assert_eq!(module, project.join("plugin.wasm").canonicalize().unwrap());
    check_oci_layout(&oci, &bytes);
    let args = read("em-args.txt");
    for expected in [
        "--std=c++17 -O3 -flto --no-entry",
        "--js-library proxy-wasm-cpp-sdk/proxy_wasm_intrinsics.js",
        "-sSTANDALONE_WASM -sEXPORTED_FUNCTIONS=_malloc",
        "-Iproxy-wasm-cpp-sdk proxy-wasm-cpp-sdk/proxy_wasm_intrinsics.cc plugin.cc -o plugin.wasm",
    ] {
        assert!(args.contains(expected), "em++ got {args}");
    }

    check_gateway_validates(&project, "plugin.wasm");
}

#[test]
fn a_new_go_plugin_is_generated_and_built_with_go_for_wasip1() {
    let temp = tempfile::tempdir().unwrap();
    let files = [
        "main.go",
        "go.mod",
        "README.md",
        "gateway.yaml",
        ".gitignore",
        "tests/cases.yaml",
    ];
    let project = check_new_project(temp.path(), "demo-go", "tinygo", &files);
    let read = |file: &str| std::fs::read_to_string(project.join(file)).unwrap();

    // go.mod: the module, the Go version the SDK needs, and the SDK pinned to a pseudo-version
    // (it has no tags): v0.0.0-YYYYMMDDHHMMSS-<12 hex digits of the commit>.
    let go_mod = read("go.mod");
    let directives: Vec<&str> = go_mod
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//"))
        .collect();
    assert_eq!(directives[0], "module demo-go", "{go_mod}");
    assert_eq!(directives[1], "go 1.24", "{go_mod}");
    let version = directives[2]
        .strip_prefix("require github.com/proxy-wasm/proxy-wasm-go-sdk ")
        .unwrap_or_else(|| panic!("no SDK requirement in {go_mod}"));
    let parts: Vec<&str> = version.split('-').collect();
    assert_eq!(parts.len(), 3, "{version}");
    assert_eq!(parts[0], "v0.0.0");
    assert!(
        parts[1].len() == 14 && parts[1].bytes().all(|b| b.is_ascii_digit()),
        "{version}"
    );
    assert!(
        parts[2].len() == 12 && parts[2].bytes().all(|b| b.is_ascii_hexdigit()),
        "{version}"
    );
    assert_eq!(directives.len(), 3, "{go_mod}");

    // main.go: package main, and every import is the standard library or the SDK go.mod requires.
    let source = read("main.go");
    assert!(source.contains("\npackage main\n"), "{source}");
    let imports = source
        .split_once("import (\n")
        .and_then(|(_, rest)| rest.split_once("\n)"))
        .expect("an import block")
        .0;
    for line in imports.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = line.trim_matches('"');
        let first = path.split('/').next().unwrap();
        assert!(
            !first.contains('.') || path.starts_with("github.com/proxy-wasm/proxy-wasm-go-sdk/"),
            "main.go imports {path}, which go.mod does not require"
        );
    }
    for expected in [
        "proxywasm.SetVMContext(&vmContext{})",
        "return config{header: \"x-demo-go\", value: \"hello\"}",
        "OnPluginStart(pluginConfigurationSize int) types.OnPluginStartStatus",
        "proxywasm.LogInfof(\"demo-go: adding %s: %s\", cfg.header, cfg.value)",
        "proxywasm.LogErrorf(\"demo-go: invalid configuration: %v\", err)",
        "OnHttpResponseHeaders(numHeaders int, endOfStream bool) types.Action",
        "proxywasm.AddHttpResponseHeader(h.config.header, h.config.value)",
    ] {
        assert!(source.contains(expected), "main.go lacks {expected:?}");
    }
    // Go source is indented with tabs (gofmt).
    assert!(
        source.lines().all(|l| !l.starts_with(' ')),
        "main.go has a line indented with spaces"
    );
    let readme = read("README.md");
    assert!(
        readme.contains("wasmgate plugin test main.wasm tests/cases.yaml"),
        "{readme}"
    );
    assert!(readme.contains("not built in Wasmgate's CI"), "{readme}");
    assert_eq!(read(".gitignore").lines().next(), Some("/main.wasm"));

    // `--lang go` is the same template.
    ok(&run(
        &["plugin", "new", "demo-go2", "--lang", "go"],
        temp.path(),
    ));
    assert_eq!(
        std::fs::read_to_string(temp.path().join("demo-go2/go.mod"))
            .unwrap()
            .replace("demo-go2", "demo-go"),
        go_mod
    );

    // Without Go: a clear error naming the tool, where to get it, and what would have run.
    let empty = tempfile::tempdir().unwrap();
    let stderr = clean_failure(&run_with_path(
        &["plugin", "build", "demo-go"],
        temp.path(),
        empty.path().as_os_str(),
    ));
    for expected in [
        "go (the Go toolchain, 1.24 or later",
        "not TinyGo",
        "https://go.dev/dl/",
        "the build would have run, in that folder:\n  go mod tidy\n  \
         GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o main.wasm .",
    ] {
        assert!(stderr.contains(expected), "no {expected:?} in:\n{stderr}");
    }

    // With a stand-in go: `go mod tidy` first (no go.sum yet), then the wasip1 build; the module
    // is reported and packed as for the other languages.
    let bin = tempfile::tempdir().unwrap();
    write_script(
        bin.path(),
        "go",
        &format!(
            r#"echo "$* GOOS=$GOOS GOARCH=$GOARCH" >> go-calls.txt
case "$1" in
  mod) : > go.sum; exit 0 ;;
  build) [ "$GOOS" = wasip1 ] && [ "$GOARCH" = wasm ] || {{ echo "fake go: not wasip1/wasm" >&2; exit 1; }} ;;
  *) echo "fake go: unexpected $*" >&2; exit 3 ;;
esac
{FAKE_COMPILE}"#
        ),
    );
    let oci = temp.path().join("oci");
    let stdout = ok(&run_with_path(
        &["plugin", "build", "demo-go", "--oci", oci.to_str().unwrap()],
        temp.path(),
        bin.path().as_os_str(),
    ));
    let (module, bytes) = check_built(&stdout);
    assert_eq!(module, project.join("main.wasm").canonicalize().unwrap());
    check_oci_layout(&oci, &bytes);
    let calls = read("go-calls.txt");
    let calls: Vec<&str> = calls.lines().collect();
    assert!(calls[0].starts_with("mod tidy "), "{calls:?}");
    assert_eq!(
        calls[1], "build -buildmode=c-shared -o main.wasm . GOOS=wasip1 GOARCH=wasm",
        "{calls:?}"
    );
    // With go.sum present, no tidy.
    ok(&run_with_path(
        &["plugin", "build", "demo-go"],
        temp.path(),
        bin.path().as_os_str(),
    ));
    let calls = read("go-calls.txt");
    assert_eq!(calls.lines().count(), 3, "{calls}");
    assert!(
        calls.lines().last().unwrap().starts_with("build "),
        "{calls}"
    );

    check_gateway_validates(&project, "main.wasm");
}
