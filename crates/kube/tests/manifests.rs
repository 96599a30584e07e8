//! The shipped Kubernetes manifests (deploy/kubernetes) agree with the gateway and with the mirror.

use std::path::{Path, PathBuf};

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/kubernetes")
        .join(file)
}

fn documents(file: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize as _;
    let text = std::fs::read_to_string(deploy(file)).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .collect()
}

fn find<'a>(docs: &'a [serde_yaml::Value], kind: &str, name: &str) -> Vec<&'a serde_yaml::Value> {
    docs.iter()
        .filter(|d| {
            d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name)
        })
        .collect()
}

#[test]
fn the_crd_is_istios_wasmplugin() {
    let docs = documents("wasmplugin-crd.yaml");
    assert_eq!(docs.len(), 1);
    let crd = &docs[0];
    assert_eq!(crd["kind"].as_str(), Some("CustomResourceDefinition"));
    assert_eq!(
        crd["metadata"]["name"].as_str(),
        Some("wasmplugins.extensions.istio.io")
    );
    let spec = &crd["spec"];
    assert_eq!(
        spec["group"].as_str(),
        Some(wasmgate_kube::WASM_PLUGIN_GROUP)
    );
    assert_eq!(
        spec["names"]["plural"].as_str(),
        Some(wasmgate_kube::WASM_PLUGIN_PLURAL)
    );
    assert_eq!(
        spec["names"]["kind"].as_str(),
        Some(wasmgate_kube::WASM_PLUGIN_KIND)
    );
    assert_eq!(spec["scope"].as_str(), Some("Namespaced"));
    let version = &spec["versions"][0];
    assert_eq!(
        version["name"].as_str(),
        Some(wasmgate_kube::WASM_PLUGIN_VERSION)
    );
    let fields = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    for field in [
        "selector",
        "targetRefs",
        "url",
        "sha256",
        "imagePullPolicy",
        "imagePullSecret",
        "pluginConfig",
        "pluginName",
        "phase",
        "priority",
        "failStrategy",
        "vmConfig",
        "match",
        "type",
    ] {
        assert!(fields.get(field).is_some(), "{field}");
    }
}

#[test]
fn the_configmap_is_a_gateway_config_with_a_kubernetes_source() {
    let docs = documents("wasmgate.yaml");
    let configmap = find(&docs, "ConfigMap", "wasmgate");
    assert_eq!(configmap.len(), 1);
    let text = configmap[0]["data"]["gateway.yaml"].as_str().unwrap();
    let config = wasmgate_config::GatewayConfig::from_yaml_str(text, "gateway.yaml")
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(config.kubernetes.is_some());
    assert_eq!(config.workload.namespace, "wasmgate");
    assert_eq!(config.workload.root_namespace, "istio-system");

    // The Deployment runs that file, in the namespace the configuration names.
    let deployment = find(&docs, "Deployment", "wasmgate")[0];
    assert_eq!(
        deployment["metadata"]["namespace"].as_str(),
        Some("wasmgate")
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(args, ["run", "--config", "/etc/wasmgate/gateway.yaml"]);
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/ready")
    );
    let admin_port = config.admin.port();
    let ports = container["ports"].as_sequence().unwrap();
    assert!(ports.iter().any(|p| p["name"].as_str() == Some("admin")
        && p["containerPort"].as_u64() == Some(admin_port.into())));
}

#[test]
fn rbac_grants_what_the_mirror_watches() {
    let docs = documents("wasmgate.yaml");
    let verbs = |role: &serde_yaml::Value, group: &str, resource: &str| -> Vec<String> {
        role["rules"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter(|r| {
                r["apiGroups"]
                    .as_sequence()
                    .unwrap()
                    .iter()
                    .any(|g| g.as_str() == Some(group))
                    && r["resources"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .any(|x| x.as_str() == Some(resource))
            })
            .flat_map(|r| r["verbs"].as_sequence().unwrap().clone())
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let role = find(&docs, "Role", "wasmgate")[0];
    assert_eq!(role["metadata"]["namespace"].as_str(), Some("wasmgate"));
    for (group, resource) in [("extensions.istio.io", "wasmplugins"), ("", "secrets")] {
        let granted = verbs(role, group, resource);
        for verb in ["get", "list", "watch"] {
            assert!(granted.iter().any(|v| v == verb), "{resource}: {verb}");
        }
    }
    let root = find(&docs, "Role", "wasmgate-root-wasmplugins")[0];
    assert_eq!(root["metadata"]["namespace"].as_str(), Some("istio-system"));
    let granted = verbs(root, "extensions.istio.io", "wasmplugins");
    for verb in ["get", "list", "watch"] {
        assert!(granted.iter().any(|v| v == verb), "root: {verb}");
    }
    assert!(verbs(root, "", "secrets").is_empty());
    for (binding, namespace) in [
        ("wasmgate", "wasmgate"),
        ("wasmgate-root-wasmplugins", "istio-system"),
    ] {
        let binding = find(&docs, "RoleBinding", binding)[0];
        assert_eq!(binding["metadata"]["namespace"].as_str(), Some(namespace));
        assert_eq!(
            binding["subjects"][0]["name"].as_str(),
            Some("wasmgate"),
            "{binding:?}"
        );
        assert_eq!(
            binding["subjects"][0]["namespace"].as_str(),
            Some("wasmgate")
        );
    }
}

#[test]
fn the_example_wasmplugin_passes_the_gateways_validation() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        deploy("example-wasmplugin.yaml"),
        dir.path().join("example.yaml"),
    )
    .unwrap();
    let plugins = wasmgate_config::load_wasm_plugins(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(plugins.len(), 1);
    assert_eq!(plugins[0].metadata.namespace.as_deref(), Some("wasmgate"));
}
