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
fn new_refuses_bad_names_existing_folders_and_untemplated_languages() {
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
    let stderr = failed(&run(&["plugin", "new", "x", "--lang", "cpp"], dir));
    assert!(
        stderr.contains("emcc") && stderr.contains("proxy-wasm-cpp-sdk"),
        "{stderr}"
    );
    let stderr = failed(&run(&["plugin", "new", "x", "--lang", "tinygo"], dir));
    assert!(stderr.contains("TinyGo"), "{stderr}");
    assert!(!dir.join("x").exists());

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
    assert!(stderr.contains("no Cargo.toml or package.json"), "{stderr}");
}
