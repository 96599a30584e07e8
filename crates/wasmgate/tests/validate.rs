//! `wasmgate validate` on WasmPlugin manifests (files and folders) and gateway configurations,
//! offline: good inputs print `FILE: ok` and exit 0; any error names the file, the document, the
//! field and the reason, and exits 1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::wasmgate;

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../config/tests/istio-docs")
}

fn validate(args: &[&Path]) -> Output {
    wasmgate().arg("validate").args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const GOOD: &str = "apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: good
spec:
  url: oci://ghcr.io/istio-ecosystem/wasm-extensions/basic_auth:1.12.0
  phase: AUTHN
";

#[test]
fn istio_docs_manifests_are_valid() {
    // Each file on its own: as a folder they would repeat names (five `openid-connect` variants).
    let mut files: Vec<PathBuf> = std::fs::read_dir(docs())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 10);
    let args: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let output = validate(&args);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let expected: String = files
        .iter()
        .map(|f| format!("{}: ok\n", f.display()))
        .collect();
    assert_eq!(text(&output.stdout), expected);

    // As a folder, the repeated names are what Kubernetes would refuse too.
    let output = validate(&[&docs()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).contains("duplicate WasmPlugin \"istio-ingress.openid-connect\""),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn bad_manifests_name_file_document_field_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plugins.yaml");
    std::fs::write(
        &file,
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\n---\n{GOOD}---\n{}---\n{}",
            GOOD.replace("name: good", "name: bad-url")
                .replace("oci://ghcr.io", "fake://ghcr.io"),
            GOOD.replace("name: good", "name: both")
                .replace(
                    "  phase: AUTHN\n",
                    "  selector: {matchLabels: {app: gw}}\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]\n  vmConfig:\n    env:\n    - {name: POD_NAME, valueFrom: HOST, value: x}\n",
                )
        ),
    )
    .unwrap();
    let output = validate(&[&file]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    let f = file.display();
    assert_eq!(
        stderr,
        format!(
            "{f} (document 3): spec.url: unsupported URL scheme \"fake\" (allowed: file, http, https, \
             oci, or none for OCI; a registry with a port needs oci://)\n\
             {f} (document 4): spec: only one of targetRefs or selector can be set\n\
             {f} (document 4): spec.vmConfig.env[0].value: value may only be set when valueFrom is \
             INLINE\n"
        )
    );
    let stdout = text(&output.stdout);
    assert_eq!(
        stdout,
        format!("{f} (document 1): skipped: kind Secret (v1) is not a WasmPlugin\n")
    );
}

#[test]
fn a_folder_keeps_checking_after_a_bad_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.yaml"), GOOD).unwrap();
    std::fs::write(
        dir.path().join("b.yml"),
        GOOD.replace("phase: AUTHN", "phase: LATE"),
    )
    .unwrap();
    std::fs::write(dir.path().join("c.yaml"), GOOD).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not: [yaml").unwrap();
    let output = validate(&[dir.path()]);
    assert_eq!(output.status.code(), Some(1));
    let d = dir.path();
    assert_eq!(
        text(&output.stderr),
        format!(
            "{} (document 1): spec.phase: unknown variant `LATE`, expected one of \
             `UNSPECIFIED_PHASE`, `AUTHN`, `AUTHZ`, `STATS`\n\
             {} (document 1): metadata.name: duplicate WasmPlugin \"good\" (also in {} (document 1))\n",
            d.join("b.yml").display(),
            d.join("c.yaml").display(),
            d.join("a.yaml").display()
        )
    );
    assert_eq!(
        text(&output.stdout),
        format!("{}: ok\n", d.join("a.yaml").display())
    );
}

#[test]
fn gateway_configs_and_their_plugins_dir() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins.d");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::write(plugins.join("p.yaml"), GOOD).unwrap();
    let config = dir.path().join("gateway.yaml");
    std::fs::write(
        &config,
        "workload: { name: bookinfo-gateway, namespace: default, labels: { istio: ingressgateway } }\n\
         listeners:\n  - name: main\n    address: 127.0.0.1:0\n    mode: CLIENT\n    routes:\n      - match: { prefix: / }\n        direct_response: { status: 200 }\n\
         plugins_dir: plugins.d\n",
    )
    .unwrap();
    let manifest = plugins.join("p.yaml");
    let output = validate(&[&config, &manifest]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout),
        format!("{}: ok\n{}: ok\n", config.display(), manifest.display())
    );

    // A bad manifest in plugins_dir fails the gateway config, as it would fail `run`.
    std::fs::write(plugins.join("q.yaml"), GOOD.replace("good", "Bad")).unwrap();
    let output = validate(&[&config]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr)
            .contains("q.yaml (document 1): metadata.name: \"Bad\" is not a valid name"),
        "{}",
        text(&output.stderr)
    );

    // Gateway config errors as before, the new keys included.
    std::fs::write(
        &config,
        "workload: { namespace: Not_A_Namespace }\nlisteners:\n  - { name: a, address: 127.0.0.1:0, mode: OUTBOUND }\n",
    )
    .unwrap();
    let output = validate(&[&config]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(
            "listeners[0].mode: unknown variant `OUTBOUND`, expected `CLIENT` or `SERVER`"
        ),
        "{stderr}"
    );
}
