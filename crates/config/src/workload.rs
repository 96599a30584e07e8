//! The gateway's identity as Istio sees a workload (namespace, labels, Gateway name), each
//! listener's traffic direction, and how a WasmPlugin is attached to a listener: namespace scoping,
//! `selector`, `targetRefs` and `match`, as istiod does it.
//!
//! Istio sources these rules follow (istio/istio, master Aug 2026):
//! - `pilot/pkg/model/policyattachment.go` `WorkloadPolicyMatcher.ShouldAttachPolicy`: selector vs
//!   targetRefs, the `gateway.networking.k8s.io/gateway-name` label, namespaces.
//! - `pilot/pkg/model/push_context.go` `WasmPluginsByListenerInfo`: plugins from the proxy's
//!   namespace, then the root namespace (then, for waypoints, the namespaces of their Services),
//!   each list sorted by creation time, name, namespace; then a stable sort by priority per phase.
//! - `pilot/pkg/model/extensions.go` `matchTrafficSelectors` / `matchMode` / `matchPorts`, and
//!   `workloadModeForListenerClass` (gateway listeners are `CLIENT`, sidecar inbound `SERVER`,
//!   sidecar outbound `CLIENT`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::Report;
use crate::wasm_plugin::{PolicyTargetReference, WasmPluginSpec, WorkloadMode};

/// The label Kubernetes Gateway API deployments carry, naming their `Gateway`. Istio treats a
/// workload with this label as a Gateway API gateway: `targetRefs` of kind `Gateway` match its value.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The Gateway API group.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
/// The GatewayClass of Istio waypoints (`targetRefs` of kind GatewayClass match only it).
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";
/// Istio's default config root namespace (`meshConfig.rootNamespace`).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";
/// The namespace the gateway is in when the configuration does not say.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The gateway as a workload (the top-level `workload` key of the gateway config): what Istio knows
/// of a proxy when it decides which WasmPlugins apply to it. Every field is optional.
///
/// ```yaml
/// workload:
///   name: bookinfo-gateway          # the Kubernetes Gateway this gateway is (targetRefs kind Gateway)
///   namespace: default              # default "default"
///   labels: { istio: ingressgateway }   # what `selector.matchLabels` is matched against
///   root_namespace: istio-system    # default "istio-system": plugins there apply to every workload
///   waypoint: false                 # act as an Istio waypoint (targetRefs only, Service targets)
///   services: [reviews]             # waypoints only: Services (NAME or NAMESPACE/NAME) it serves
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Workload {
    /// The name of the Kubernetes `Gateway` this gateway is an instance of. Istio's Gateway API
    /// deployments carry it as the `gateway.networking.k8s.io/gateway-name` label; setting `name`
    /// adds that label (see [`Workload::effective_labels`]), which makes the gateway a Gateway API
    /// gateway for `targetRefs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The gateway's namespace (Istio: the proxy's config namespace). Default `default`.
    pub namespace: String,
    /// The gateway's labels (Istio: the pod's labels), for `selector.matchLabels`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Istio's config root namespace: a WasmPlugin there applies to workloads in every namespace.
    /// Default `istio-system`.
    pub root_namespace: String,
    /// Whether this gateway is a waypoint (Istio ambient): selector-based plugins are ignored, and
    /// `targetRefs` may name the Services in [`services`](Self::services) or the `istio-waypoint`
    /// GatewayClass. Requires `name`.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub waypoint: bool,
    /// Waypoints only: the Services whose traffic this waypoint handles, as `NAME` (in
    /// [`namespace`](Self::namespace)) or `NAMESPACE/NAME`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            name: None,
            namespace: DEFAULT_NAMESPACE.to_owned(),
            labels: BTreeMap::new(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
            waypoint: false,
            services: Vec::new(),
        }
    }
}

/// A listener's traffic direction, Istio's `WorkloadMode` as a WasmPlugin's `match[].mode` is
/// compared with it. Istio classes every gateway listener as `CLIENT` (so is the default), sidecar
/// inbound listeners as `SERVER` and sidecar outbound ones as `CLIENT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ListenerMode {
    /// Outbound, and every Istio gateway: `match` modes `CLIENT`, `CLIENT_AND_SERVER` and
    /// `UNDEFINED` apply.
    #[default]
    Client,
    /// Inbound, as a sidecar's inbound listener: `match` modes `SERVER`, `CLIENT_AND_SERVER` and
    /// `UNDEFINED` apply.
    Server,
}

impl ListenerMode {
    /// Whether a `match[].mode` selects traffic of this direction (Istio's `matchMode`).
    pub fn matches(self, mode: WorkloadMode) -> bool {
        match mode {
            WorkloadMode::Undefined | WorkloadMode::ClientAndServer => true,
            WorkloadMode::Client => self == ListenerMode::Client,
            WorkloadMode::Server => self == ListenerMode::Server,
        }
    }
}

impl Workload {
    /// The labels Istio would see: [`labels`](Self::labels), plus
    /// `gateway.networking.k8s.io/gateway-name: NAME` when [`name`](Self::name) is set (an explicit
    /// label of that key wins; validation refuses a conflicting one).
    pub fn effective_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        if let Some(name) = &self.name {
            labels
                .entry(GATEWAY_NAME_LABEL.to_owned())
                .or_insert_with(|| name.clone());
        }
        labels
    }

    /// The Kubernetes Gateway name, when this is a Gateway API gateway (the gateway-name label).
    pub fn gateway_name(&self) -> Option<String> {
        self.effective_labels().remove(GATEWAY_NAME_LABEL)
    }

    /// The waypoint's Services as (namespace, name).
    pub fn service_refs(&self) -> Vec<(String, String)> {
        self.services
            .iter()
            .map(|s| match s.split_once('/') {
                Some((ns, name)) => (ns.to_owned(), name.to_owned()),
                None => (self.namespace.clone(), s.clone()),
            })
            .collect()
    }

    /// The namespace a WasmPlugin is in: `metadata.namespace`, or, for a manifest without one, the
    /// gateway's namespace (as `kubectl apply` puts it in the namespace of the context it runs in).
    pub fn plugin_namespace<'a>(&'a self, plugin: &'a WasmPluginSpec) -> &'a str {
        plugin
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(&self.namespace)
    }

    /// Where a plugin's namespace puts it among the plugins Istio looks up for this workload, or
    /// `None` when its namespace is not looked at: 0 for the gateway's own namespace, 1 for the root
    /// namespace, 2 for the namespace of one of a waypoint's Services. Istio lists the plugins in
    /// that order before sorting them by priority, so it breaks priority ties.
    pub fn namespace_rank(&self, plugin: &WasmPluginSpec) -> Option<u8> {
        let ns = self.plugin_namespace(plugin);
        if ns == self.namespace {
            Some(0)
        } else if ns == self.root_namespace {
            Some(1)
        } else if self.waypoint && self.service_refs().iter().any(|(sns, _)| sns == ns) {
            Some(2)
        } else {
            None
        }
    }

    /// Whether Istio would attach the plugin to this workload (before `match` and `type`): its
    /// namespace is looked at ([`namespace_rank`](Self::namespace_rank)), and Istio's
    /// `ShouldAttachPolicy` holds:
    ///
    /// - not a Gateway API gateway (no gateway name): a plugin with `targetRefs` never applies;
    ///   otherwise `selector.matchLabels` must be a subset of the labels (no selector: all);
    /// - a Gateway API gateway, plugin without `targetRefs`: the selector as above (ignored, so
    ///   never applied, on a waypoint);
    /// - with `targetRefs`, any one that matches: kind `Service` (group `""`/`core`) on a waypoint
    ///   serving that Service in the plugin's namespace; kind `GatewayClass` `istio-waypoint` for a
    ///   waypoint and a plugin in the root namespace; kind `Gateway` (group
    ///   `gateway.networking.k8s.io`) named as the gateway, plugin in the gateway's namespace.
    ///   `ServiceEntry` targets never match (Wasmgate has no ServiceEntries).
    pub fn selects(&self, plugin: &WasmPluginSpec) -> bool {
        if self.namespace_rank(plugin).is_none() {
            return false;
        }
        let policy_ns = self.plugin_namespace(plugin);
        let labels = self.effective_labels();
        let selected = || {
            plugin.spec.selector.as_ref().is_none_or(|s| {
                s.match_labels
                    .iter()
                    .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
            })
        };
        let refs = plugin.target_refs();
        let Some(gateway_name) = labels.get(GATEWAY_NAME_LABEL) else {
            return refs.is_empty() && selected();
        };
        if refs.is_empty() {
            return !self.waypoint && selected();
        }
        let services = self.service_refs();
        refs.iter().any(|r| {
            let group = canonical_group(r);
            if self.waypoint && group == "core" && r.kind == "Service" {
                let hit = services
                    .iter()
                    .any(|(ns, name)| *name == r.name && ns == policy_ns);
                if hit {
                    return true;
                }
            }
            if group == GATEWAY_API_GROUP
                && r.kind == "GatewayClass"
                && policy_ns == self.root_namespace
                && self.waypoint
                && r.name == WAYPOINT_GATEWAY_CLASS
            {
                return true;
            }
            if policy_ns != self.namespace {
                return false;
            }
            if !r
                .namespace
                .as_deref()
                .is_none_or(|ns| ns.is_empty() || ns == self.namespace)
            {
                return false;
            }
            group == GATEWAY_API_GROUP && r.kind == "Gateway" && r.name == *gateway_name
        })
    }

    /// Checks the `workload` section.
    pub(crate) fn validate(&self, report: &mut Report<'_>) {
        if let Some(name) = &self.name
            && !is_dns_subdomain(name)
        {
            report.push(
                "workload.name",
                format!("{name:?} is not a valid Gateway name (lowercase letters, digits, '-' and '.', at most 253)"),
            );
        }
        for (field, ns) in [
            ("workload.namespace", &self.namespace),
            ("workload.root_namespace", &self.root_namespace),
        ] {
            if !is_dns_label(ns) {
                report.push(
                    field,
                    format!("{ns:?} is not a valid namespace (lowercase letters, digits and '-', at most 63)"),
                );
            }
        }
        for (key, value) in &self.labels {
            let at = format!("workload.labels.{key}");
            if let Err(reason) = check_label_key(key) {
                report.push(&at, reason);
            } else if let Err(reason) = check_label_value(value) {
                report.push(&at, reason);
            }
        }
        if let (Some(name), Some(label)) = (&self.name, self.labels.get(GATEWAY_NAME_LABEL))
            && name != label
        {
            report.push(
                format!("workload.labels.{GATEWAY_NAME_LABEL}"),
                format!("{label:?} differs from workload.name {name:?}"),
            );
        }
        if self.waypoint && self.gateway_name().is_none() {
            report.push(
                "workload.waypoint",
                "a waypoint is a Gateway API gateway: set workload.name",
            );
        }
        if !self.services.is_empty() && !self.waypoint {
            report.push(
                "workload.services",
                "Istio attaches Service targetRefs to waypoints only: set workload.waypoint: true",
            );
        }
        for (i, service) in self.services.iter().enumerate() {
            let ok = match service.split_once('/') {
                Some((ns, name)) => is_dns_label(ns) && is_dns_label(name),
                None => is_dns_label(service),
            };
            if !ok {
                report.push(
                    format!("workload.services[{i}]"),
                    format!("{service:?} is not NAME or NAMESPACE/NAME"),
                );
            }
        }
    }
}

/// `group` as Istio canonicalises it: empty is `core`.
pub(crate) fn canonical_group(r: &PolicyTargetReference) -> &str {
    match r.group.as_deref() {
        None | Some("") => "core",
        Some(g) => g,
    }
}

/// A DNS-1123 subdomain (Kubernetes object names).
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// A DNS-1123 label (namespaces, Service names).
pub(crate) fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && is_dns_subdomain(s)
}

/// A Kubernetes label key: an optional DNS subdomain prefix and `/`, then a name of at most 63
/// characters, alphanumeric at both ends, `-`, `_`, `.` inside.
pub(crate) fn check_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && !is_dns_subdomain(p)
    {
        return Err(format!(
            "label key {key:?}: the prefix must be a DNS subdomain"
        ));
    }
    if !is_label_name(name) || name.is_empty() {
        return Err(format!(
            "label key {key:?} is not valid (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// A Kubernetes label value: empty, or as a label key's name part.
pub(crate) fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?} is not valid (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)"
        ))
    }
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wasm_plugin::{PluginType, WasmPluginSpec, scan_wasm_plugins};
    use crate::{GatewayConfig, PluginPhase, PortSelector, TrafficSelector};
    use std::path::Path;

    /// The manifests of Istio's documentation (see each file's first lines for its source).
    const DOCS: &[(&str, &str)] = &[
        (
            "openid-connect-file.yaml",
            include_str!("../tests/istio-docs/openid-connect-file.yaml"),
        ),
        (
            "openid-connect-oci.yaml",
            include_str!("../tests/istio-docs/openid-connect-oci.yaml"),
        ),
        (
            "openid-connect-vmconfig.yaml",
            include_str!("../tests/istio-docs/openid-connect-vmconfig.yaml"),
        ),
        (
            "openid-connect-https.yaml",
            include_str!("../tests/istio-docs/openid-connect-https.yaml"),
        ),
        (
            "phase-and-priority.yaml",
            include_str!("../tests/istio-docs/phase-and-priority.yaml"),
        ),
        (
            "basic-auth.yaml",
            include_str!("../tests/istio-docs/basic-auth.yaml"),
        ),
        (
            "basic-auth-at-gateway.yaml",
            include_str!("../tests/istio-docs/basic-auth-at-gateway.yaml"),
        ),
        (
            "basic-auth-at-waypoint.yaml",
            include_str!("../tests/istio-docs/basic-auth-at-waypoint.yaml"),
        ),
        (
            "basic-auth-for-service.yaml",
            include_str!("../tests/istio-docs/basic-auth-for-service.yaml"),
        ),
        ("match.yaml", include_str!("../tests/istio-docs/match.yaml")),
    ];

    fn doc(name: &str) -> Vec<WasmPluginSpec> {
        let (_, text) = DOCS.iter().find(|(n, _)| *n == name).unwrap();
        let scan = scan_wasm_plugins(text, Path::new(name));
        assert_eq!(scan.errors, Vec::new(), "{name}");
        assert_eq!(scan.skipped, Vec::new(), "{name}");
        scan.plugins
    }

    fn one(name: &str) -> WasmPluginSpec {
        let mut plugins = doc(name);
        assert_eq!(plugins.len(), 1, "{name}");
        plugins.remove(0)
    }

    fn workload(yaml: &str) -> Workload {
        let config = GatewayConfig::from_yaml_str(&format!("workload: {yaml}\n"), "gw.yaml")
            .unwrap_or_else(|e| panic!("{e}"));
        config.validate().unwrap_or_else(|e| panic!("{e}"));
        config.workload
    }

    #[test]
    fn every_istio_docs_manifest_is_accepted() {
        let mut count = 0;
        for (name, _) in DOCS {
            count += doc(name).len();
        }
        assert_eq!(count, 12);
        let https = one("openid-connect-https.yaml");
        assert_eq!(
            https
                .to_plugin_spec_with_env(&|k| (k == "POD_NAME").then(|| "gw-1".into()))
                .environment,
            vec![
                ("POD_NAME".to_owned(), "gw-1".to_owned()),
                ("TRUST_DOMAIN".to_owned(), "cluster.local".to_owned())
            ]
        );
        let file = one("openid-connect-file.yaml");
        assert_eq!(
            file.to_plugin_spec().configuration,
            br#"{"openid_realm":"ingress","openid_server":"authn"}"#
        );
        let gw = one("basic-auth-at-gateway.yaml");
        assert_eq!(gw.metadata.namespace, None);
        assert_eq!(gw.target_refs()[0].name, "bookinfo-gateway");
        let svc = one("basic-auth-for-service.yaml");
        assert_eq!(svc.target_refs()[0].group.as_deref(), Some(""));
        let m = one("match.yaml");
        assert_eq!(
            m.spec.traffic_match,
            vec![TrafficSelector {
                mode: WorkloadMode::Client,
                ports: vec![PortSelector { number: 8080 }]
            }]
        );
    }

    #[test]
    fn defaults_and_every_key() {
        let config = GatewayConfig::from_yaml_str("", "gw.yaml").unwrap();
        assert_eq!(config.workload, Workload::default());
        assert_eq!(config.workload.namespace, "default");
        assert_eq!(config.workload.root_namespace, "istio-system");
        let w = workload(
            "{name: bookinfo-gateway, namespace: bookinfo, labels: {istio: ingressgateway, app: gw}, \
             root_namespace: mesh-root, waypoint: true, services: [reviews, other/ratings]}",
        );
        assert_eq!(w.name.as_deref(), Some("bookinfo-gateway"));
        assert_eq!(w.namespace, "bookinfo");
        assert_eq!(w.root_namespace, "mesh-root");
        assert_eq!(w.labels["istio"], "ingressgateway");
        assert_eq!(w.gateway_name().as_deref(), Some("bookinfo-gateway"));
        assert_eq!(w.effective_labels()[GATEWAY_NAME_LABEL], "bookinfo-gateway");
        assert_eq!(
            w.service_refs(),
            [
                ("bookinfo".to_owned(), "reviews".to_owned()),
                ("other".to_owned(), "ratings".to_owned())
            ]
        );
        let listeners = GatewayConfig::from_yaml_str(
            "listeners:\n  - {name: a, address: 127.0.0.1:1}\n  - {name: b, address: 127.0.0.1:2, mode: SERVER}\n  - {name: c, address: 127.0.0.1:3, mode: CLIENT}\n",
            "gw.yaml",
        )
        .unwrap()
        .listeners;
        let modes: Vec<_> = listeners.iter().map(|l| l.mode).collect();
        assert_eq!(
            modes,
            [
                ListenerMode::Client,
                ListenerMode::Server,
                ListenerMode::Client
            ]
        );
    }

    #[test]
    fn workload_errors_name_the_field() {
        let errors = |yaml: &str| -> Vec<String> {
            let config = GatewayConfig::from_yaml_str(yaml, "gw.yaml");
            match config {
                Err(e) => vec![e.to_string()],
                Ok(c) => c
                    .validate()
                    .err()
                    .map(|e| e.iter().map(ToString::to_string).collect())
                    .unwrap_or_default(),
            }
        };
        let cases: &[(&str, &str)] = &[
            (
                "workload: {namespace: Bad_NS}",
                "gw.yaml: workload.namespace: \"Bad_NS\" is not a valid namespace (lowercase letters, digits and '-', at most 63)",
            ),
            (
                "workload: {root_namespace: a.b}",
                "gw.yaml: workload.root_namespace: \"a.b\" is not a valid namespace (lowercase letters, digits and '-', at most 63)",
            ),
            (
                "workload: {name: Gw}",
                "gw.yaml: workload.name: \"Gw\" is not a valid Gateway name (lowercase letters, digits, '-' and '.', at most 253)",
            ),
            (
                "workload: {labels: {\"-x\": y}}",
                "gw.yaml: workload.labels.-x: label key \"-x\" is not valid (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)",
            ),
            (
                "workload: {labels: {x: \"a b\"}}",
                "gw.yaml: workload.labels.x: label value \"a b\" is not valid (at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit)",
            ),
            (
                "workload: {name: a, labels: {gateway.networking.k8s.io/gateway-name: b}}",
                "gw.yaml: workload.labels.gateway.networking.k8s.io/gateway-name: \"b\" differs from workload.name \"a\"",
            ),
            (
                "workload: {waypoint: true}",
                "gw.yaml: workload.waypoint: a waypoint is a Gateway API gateway: set workload.name",
            ),
            (
                "workload: {services: [reviews]}",
                "gw.yaml: workload.services: Istio attaches Service targetRefs to waypoints only: set workload.waypoint: true",
            ),
            (
                "workload: {name: w, waypoint: true, services: [a/b/c]}",
                "gw.yaml: workload.services[0]: \"a/b/c\" is not NAME or NAMESPACE/NAME",
            ),
            (
                "workload: {nmae: x}",
                "gw.yaml: workload.nmae: unknown field `nmae`, expected one of `name`, `namespace`, `labels`, `root_namespace`, `waypoint`, `services` (line 1, column 12)",
            ),
            (
                "listeners:\n  - {name: a, address: 127.0.0.1:1, mode: CLIENT_AND_SERVER}\n",
                "gw.yaml: listeners[0].mode: unknown variant `CLIENT_AND_SERVER`, expected `CLIENT` or `SERVER` (line 2, column 43)",
            ),
        ];
        for (yaml, expected) in cases {
            assert_eq!(errors(yaml), [expected.to_string()], "{yaml}");
        }
        // A label that agrees with the name is fine; so is a prefixed key.
        workload(
            "{name: a, labels: {gateway.networking.k8s.io/gateway-name: a, app.kubernetes.io/name: x}}",
        );
    }

    #[test]
    fn selector_and_namespace_scoping() {
        // The API reference's first example: namespace istio-ingress, selector istio=ingressgateway.
        let p = one("openid-connect-file.yaml");
        let ingress =
            workload("{namespace: istio-ingress, labels: {istio: ingressgateway, app: x}}");
        assert!(ingress.selects(&p), "matchLabels is a subset of the labels");
        assert!(
            !workload("{namespace: istio-ingress, labels: {istio: egressgateway}}").selects(&p)
        );
        assert!(
            !workload("{namespace: istio-ingress}").selects(&p),
            "no labels"
        );
        assert!(
            !workload("{namespace: other, labels: {istio: ingressgateway}}").selects(&p),
            "a plugin applies only in its own namespace"
        );
        // The distribution task's example lives in the root namespace: every namespace gets it.
        let root = one("basic-auth.yaml");
        assert!(workload("{namespace: bookinfo, labels: {istio: ingressgateway}}").selects(&root));
        assert!(workload("{labels: {istio: ingressgateway}}").selects(&root));
        assert!(
            !workload(
                "{namespace: bookinfo, labels: {istio: ingressgateway}, root_namespace: mesh}"
            )
            .selects(&root),
            "istio-system is only special as the root namespace"
        );
        // No selector: every workload of the namespace; a manifest without namespace is in the
        // gateway's namespace.
        let mut any = p.clone();
        any.spec.selector = None;
        assert!(workload("{namespace: istio-ingress}").selects(&any));
        any.metadata.namespace = None;
        assert!(workload("{namespace: whatever}").selects(&any));
        assert_eq!(Workload::default().plugin_namespace(&any), "default");
        // An empty matchLabels selects everything, as an empty subset.
        any.spec.selector = Some(crate::WorkloadSelector::default());
        assert!(Workload::default().selects(&any));
    }

    #[test]
    fn target_refs_as_istio_attaches_them() {
        let gw = one("basic-auth-at-gateway.yaml");
        assert!(workload("{name: bookinfo-gateway}").selects(&gw));
        assert!(
            workload("{labels: {gateway.networking.k8s.io/gateway-name: bookinfo-gateway}}")
                .selects(&gw),
            "the gateway-name label is what Istio matches"
        );
        assert!(!workload("{name: other-gateway}").selects(&gw));
        assert!(
            !Workload::default().selects(&gw),
            "not a Gateway API gateway: plugins with targetRefs are ignored"
        );
        assert!(
            workload("{name: bookinfo-gateway, namespace: bookinfo}").selects(&gw),
            "no namespace in the manifest: the gateway's"
        );
        let mut elsewhere = gw.clone();
        elsewhere.metadata.namespace = Some("istio-system".into());
        assert!(
            !workload("{name: bookinfo-gateway}").selects(&elsewhere),
            "a Gateway target must be in the plugin's namespace, even the root one"
        );
        let mut deprecated = gw.clone();
        deprecated.spec.target_ref = deprecated.spec.target_refs.pop();
        assert!(
            workload("{name: bookinfo-gateway}").selects(&deprecated),
            "targetRef"
        );
        let mut no_group = gw.clone();
        no_group.spec.target_refs[0].group = None;
        assert!(
            !workload("{name: bookinfo-gateway}").selects(&no_group),
            "kind Gateway in the core group is not a Gateway API Gateway"
        );
        let mut second = gw.clone();
        second.spec.target_refs.insert(
            0,
            crate::PolicyTargetReference {
                group: Some(GATEWAY_API_GROUP.into()),
                kind: "Gateway".into(),
                name: "first".into(),
                namespace: None,
            },
        );
        assert!(
            workload("{name: bookinfo-gateway}").selects(&second),
            "any targetRef"
        );

        // A Gateway API gateway still takes selector plugins (ENABLE_SELECTOR_BASED_K8S_GATEWAY_POLICY
        // defaults to true), but a waypoint does not.
        let selector = one("openid-connect-file.yaml");
        assert!(
            workload("{name: gw, namespace: istio-ingress, labels: {istio: ingressgateway}}")
                .selects(&selector)
        );
        assert!(
            !workload("{name: gw, namespace: istio-ingress, labels: {istio: ingressgateway}, waypoint: true}")
                .selects(&selector)
        );

        // Waypoints: the waypoint Gateway, Services it serves, the istio-waypoint GatewayClass.
        let at_waypoint = one("basic-auth-at-waypoint.yaml");
        assert!(workload("{name: waypoint, waypoint: true}").selects(&at_waypoint));
        let for_service = one("basic-auth-for-service.yaml");
        assert!(
            workload("{name: waypoint, waypoint: true, services: [reviews]}").selects(&for_service)
        );
        assert!(
            !workload("{name: waypoint, waypoint: true, services: [ratings]}")
                .selects(&for_service)
        );
        assert!(
            !workload("{name: reviews}").selects(&for_service),
            "Service targets attach to waypoints only"
        );
        let mut in_svc_ns = for_service.clone();
        in_svc_ns.metadata.namespace = Some("shop".into());
        let waypoint = workload("{name: waypoint, waypoint: true, services: [shop/reviews]}");
        assert_eq!(waypoint.namespace_rank(&in_svc_ns), Some(2));
        assert!(
            waypoint.selects(&in_svc_ns),
            "a Service's namespace is looked at"
        );
        let mut class = at_waypoint.clone();
        class.metadata.namespace = Some("istio-system".into());
        class.spec.target_refs[0].kind = "GatewayClass".into();
        class.spec.target_refs[0].name = WAYPOINT_GATEWAY_CLASS.into();
        assert!(workload("{name: any, waypoint: true}").selects(&class));
        assert!(
            !workload("{name: any}").selects(&class),
            "GatewayClass: waypoints only"
        );
        class.metadata.namespace = None;
        assert!(
            !workload("{name: any, waypoint: true}").selects(&class),
            "GatewayClass: root namespace only"
        );
    }

    #[test]
    fn match_modes_and_ports() {
        use WorkloadMode::*;
        let mut p = one("match.yaml");
        let set = |p: &mut WasmPluginSpec, selectors: &[(WorkloadMode, &[u32])]| {
            p.spec.traffic_match = selectors
                .iter()
                .map(|(mode, ports)| TrafficSelector {
                    mode: *mode,
                    ports: ports
                        .iter()
                        .map(|&number| PortSelector { number })
                        .collect(),
                })
                .collect();
        };
        // The docs fragment: CLIENT on 8080.
        assert!(p.matches_listener(8080, ListenerMode::Client));
        assert!(!p.matches_listener(8080, ListenerMode::Server));
        assert!(!p.matches_listener(8443, ListenerMode::Client));
        for (mode, client, server) in [
            (Undefined, true, true),
            (ClientAndServer, true, true),
            (Client, true, false),
            (Server, false, true),
        ] {
            set(&mut p, &[(mode, &[])]);
            assert_eq!(
                p.matches_listener(1, ListenerMode::Client),
                client,
                "{mode:?}"
            );
            assert_eq!(
                p.matches_listener(1, ListenerMode::Server),
                server,
                "{mode:?}"
            );
        }
        // Entries are ORed; inside one, mode AND ports (any listed port).
        set(&mut p, &[(Server, &[80]), (Client, &[443, 8443])]);
        assert!(p.matches_listener(8443, ListenerMode::Client));
        assert!(p.matches_listener(80, ListenerMode::Server));
        assert!(!p.matches_listener(80, ListenerMode::Client));
        assert!(!p.matches_listener(443, ListenerMode::Server));
        set(&mut p, &[]);
        assert!(
            p.matches_listener(0, ListenerMode::Server),
            "no match: everything"
        );
        set(&mut p, &[(Undefined, &[8080])]);
        assert!(
            !p.matches_listener(0, ListenerMode::Client),
            "port 0 matches no port list"
        );
    }

    const GATEWAY: &str = "
workload:
  name: bookinfo-gateway
  namespace: istio-ingress
  labels: { istio: ingressgateway }
listeners:
  - name: http
    address: 127.0.0.1:8080
    http_filters:
      - name: own
        vm_config: { code: { local: { filename: /own.wasm } } }
  - name: inbound
    address: 127.0.0.1:9080
    mode: SERVER
";

    fn names(chain: &[crate::PluginSpec]) -> Vec<&str> {
        chain.iter().map(|p| p.name.as_str()).collect()
    }

    #[test]
    fn chains_apply_every_field_and_istio_order() {
        let config = GatewayConfig::from_yaml_str(GATEWAY, "gw.yaml").unwrap();
        let mut report = crate::error::Report::new("gw.yaml");
        config.workload.validate(&mut report);
        assert!(report.errors.is_empty(), "{}", report.errors);
        let mut plugins = doc("phase-and-priority.yaml");
        plugins.extend(doc("basic-auth.yaml")); // root namespace, selector matches
        let mut at_gateway = one("basic-auth-at-gateway.yaml"); // namespace-less = istio-ingress
        at_gateway.spec.phase = PluginPhase::Stats;
        plugins.push(at_gateway);
        let mut server_only = one("match.yaml");
        server_only.metadata.name = "server-only".into();
        server_only.spec.traffic_match[0].mode = WorkloadMode::Server;
        server_only.spec.traffic_match[0].ports[0].number = 9080;
        server_only.spec.phase = PluginPhase::UnspecifiedPhase;
        plugins.push(server_only);
        let mut network = one("openid-connect-oci.yaml");
        network.metadata.name = "network".into();
        network.spec.plugin_type = PluginType::Network;
        plugins.push(network);
        let mut other_ns = one("openid-connect-https.yaml");
        other_ns.metadata.namespace = Some("bookinfo".into());
        plugins.push(other_ns);
        let mut other_labels = one("openid-connect-https.yaml");
        other_labels.metadata.name = "egress-only".into();
        other_labels.spec.selector.as_mut().unwrap().match_labels =
            [("istio".to_owned(), "egressgateway".to_owned())].into();
        plugins.push(other_labels);

        // The docs' ordering: openid-connect (AUTHN) -> acl-check (AUTHZ, 1000) -> check-header
        // (AUTHZ, 10). Same phase and priority: the gateway's namespace before the root namespace.
        assert_eq!(
            names(&config.chain_for_listener(0, &plugins)),
            [
                "istio-ingress.openid-connect",
                "istio-system.basic-auth",
                "istio-ingress.acl-check",
                "istio-ingress.check-header",
                "basic-auth-at-gateway",
                "own",
            ]
        );
        assert_eq!(
            names(&config.chain_for_listener(1, &plugins)),
            [
                "istio-ingress.openid-connect",
                "istio-system.basic-auth",
                "istio-ingress.acl-check",
                "istio-ingress.check-header",
                "basic-auth-at-gateway",
                "istio-system.server-only",
            ],
            "the SERVER listener on 9080 takes the SERVER plugin, not the CLIENT 8080 one"
        );
        assert_eq!(
            names(&config.chain_for_network_listener(0, &plugins)),
            ["istio-ingress.network"]
        );
        assert!(config.chain_for_network_listener(5, &plugins).is_empty());
        // match.yaml (CLIENT, 8080, root namespace, no selector) joins the first listener only.
        let mut client_8080 = one("match.yaml");
        client_8080.metadata.name = "client-8080".into();
        plugins.push(client_8080);
        assert_eq!(
            names(&config.chain_for_listener(0, &plugins))[..3],
            [
                "istio-ingress.openid-connect",
                "istio-system.basic-auth",
                "istio-system.client-8080", // same phase, priority, namespace: by name
            ]
        );
        assert!(
            !names(&config.chain_for_listener(1, &plugins)).contains(&"istio-system.client-8080")
        );
    }

    #[test]
    fn priority_ties_follow_istio() {
        use crate::ObjectMeta;
        let plugin =
            |name: &str, ns: Option<&str>, priority: Option<i32>, created: &str| WasmPluginSpec {
                file: "p.yaml".into(),
                document: 1,
                api_version: crate::WASM_PLUGIN_API_VERSIONS[0].into(),
                metadata: ObjectMeta {
                    name: name.into(),
                    namespace: ns.map(str::to_owned),
                    creation_timestamp: Some(created.into()),
                    ..Default::default()
                },
                spec: crate::WasmPlugin {
                    url: "oci://r/p:1".into(),
                    phase: PluginPhase::Authn,
                    priority,
                    ..Default::default()
                },
            };
        let mut plugins = vec![
            plugin(
                "root-early",
                Some("istio-system"),
                Some(5),
                "2020-01-01T00:00:00Z",
            ),
            plugin("own-late", Some("default"), Some(5), "2024-01-01T00:00:00Z"),
            plugin("unnamespaced", None, Some(5), "2023-01-01T00:00:00Z"),
            plugin("unset", Some("default"), None, "2020-01-01T00:00:00Z"),
            plugin(
                "min",
                Some("default"),
                Some(i32::MIN),
                "2021-01-01T00:00:00Z",
            ),
            plugin(
                "high-root",
                Some("istio-system"),
                Some(6),
                "2025-01-01T00:00:00Z",
            ),
        ];
        crate::order_plugins_for(&Workload::default(), &mut plugins);
        let order: Vec<_> = plugins.iter().map(|p| p.metadata.name.as_str()).collect();
        assert_eq!(
            order,
            [
                "high-root",    // priority first, whatever the namespace
                "unnamespaced", // 5, own namespace, 2023
                "own-late",     // 5, own namespace, 2024
                "root-early",   // 5, root namespace comes after the own namespace
                "unset",        // unset = i32::MIN: ties with MIN, then by creation time
                "min",
            ]
        );
    }
}
