//! The OCI fetcher against a real registry (Debian's `docker-registry`, started per test):
//! every layout pushed, resolved and pulled back; htpasswd auth; TLS with a private CA; the
//! failures an operator meets, each with its kind and a message that says what to do.

mod common;

use std::time::Duration;

use common::registry::{Mode, TestRegistry};
use wasmgate_fetch::docker_config::Credentials;
use wasmgate_fetch::oci::{ImageLayout, ImageVariant, Registry};
use wasmgate_fetch::{DockerConfig, FetchError, FetchErrorKind, FetchOptions, OciReference};

/// A small valid module made distinctive by a custom section named "wasmgate".
fn test_module(tag: &str) -> Vec<u8> {
    let mut payload = vec![8u8];
    payload.extend_from_slice(b"wasmgate");
    payload.extend_from_slice(tag.as_bytes());
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    module.push(0); // custom section
    let mut size = payload.len();
    loop {
        // unsigned LEB128
        let byte = (size & 0x7f) as u8;
        size >>= 7;
        module.push(if size == 0 { byte } else { byte | 0x80 });
        if size == 0 {
            break;
        }
    }
    module.extend_from_slice(&payload);
    module
}

fn reference(registry: &TestRegistry, repository_and_tag: &str) -> OciReference {
    OciReference::parse(&format!("{}/{repository_and_tag}", registry.address)).unwrap()
}

fn options() -> FetchOptions {
    FetchOptions {
        attempt_timeout: Duration::from_secs(10),
        deadline: Duration::from_secs(20),
        ..FetchOptions::default()
    }
}

fn insecure(registry: &TestRegistry) -> FetchOptions {
    FetchOptions {
        insecure_registries: vec![registry.address.clone()],
        ..options()
    }
}

fn basic(username: &str, password: &str) -> Option<Credentials> {
    Some(Credentials::Basic {
        username: username.into(),
        password: password.into(),
    })
}

fn assert_error(error: &FetchError, kind: FetchErrorKind, words: &[&str]) {
    assert_eq!(error.kind, kind, "{error}");
    for word in words {
        assert!(
            error.message.to_lowercase().contains(&word.to_lowercase()),
            "{word:?} missing from: {error}"
        );
    }
}

async fn roundtrip(variant: ImageVariant, layout: ImageLayout) {
    let registry = TestRegistry::start(Mode::Plain).await;
    let options = insecure(&registry);
    let module = test_module(&format!("{variant:?}"));
    let tagged = reference(&registry, "plugins/roundtrip:v1");
    let client = Registry::new(&tagged, &options, None).unwrap();
    let digest = client.push(&tagged, &module, variant).await.unwrap();
    assert!(
        digest.starts_with("sha256:") && digest.len() == 71,
        "{digest}"
    );

    let manifest = client.resolve(&tagged).await.unwrap();
    assert_eq!(manifest.digest, digest);
    assert_eq!(manifest.layout, layout);
    assert_eq!(
        client.module(&tagged, &manifest, 1 << 20).await.unwrap(),
        module
    );

    // By digest, from a fresh client, as a WasmPlugin pinning the image would.
    let pinned = reference(&registry, &format!("plugins/roundtrip@{digest}"));
    let fresh = Registry::new(&pinned, &options, None).unwrap();
    let manifest = fresh.resolve(&pinned).await.unwrap();
    assert_eq!(
        (manifest.digest.as_str(), manifest.layout),
        (digest.as_str(), layout)
    );
    assert_eq!(
        fresh.module(&pinned, &manifest, 1 << 20).await.unwrap(),
        module
    );

    // Pushing the same module again gives the same image.
    assert_eq!(
        client.push(&tagged, &module, variant).await.unwrap(),
        digest
    );
}

#[tokio::test]
async fn compat_image_roundtrip() {
    roundtrip(ImageVariant::Compat, ImageLayout::OciCompat).await;
}

#[tokio::test]
async fn artifact_image_roundtrip() {
    roundtrip(ImageVariant::Artifact, ImageLayout::Artifact).await;
}

#[tokio::test]
async fn docker_image_roundtrip() {
    roundtrip(ImageVariant::Docker, ImageLayout::Docker).await;
}

#[tokio::test]
async fn module_download_is_capped() {
    let registry = TestRegistry::start(Mode::Plain).await;
    let options = insecure(&registry);
    let module = test_module(&"x".repeat(100));
    for (variant, repository) in [
        (ImageVariant::Artifact, "capped/artifact:v1"),
        (ImageVariant::Compat, "capped/compat:v1"),
    ] {
        let image = reference(&registry, repository);
        let client = Registry::new(&image, &options, None).unwrap();
        client.push(&image, &module, variant).await.unwrap();
        let manifest = client.resolve(&image).await.unwrap();
        let error = client.module(&image, &manifest, 64).await.unwrap_err();
        assert_error(&error, FetchErrorKind::DownloadFailure, &["64-byte limit"]);
    }

    // A layer that is small compressed but unpacks to a module above the cap.
    let roomy = test_module(&"\0".repeat(4000));
    let image = reference(&registry, "capped/bomb:v1");
    let client = Registry::new(&image, &options, None).unwrap();
    client
        .push(&image, &roomy, ImageVariant::Docker)
        .await
        .unwrap();
    let manifest = client.resolve(&image).await.unwrap();
    let error = client.module(&image, &manifest, 1000).await.unwrap_err();
    assert_error(
        &error,
        FetchErrorKind::DownloadFailure,
        &["plugin.wasm is", "1000-byte limit"],
    );
    assert_eq!(
        client.module(&image, &manifest, 10_000).await.unwrap(),
        roomy
    );
}

#[tokio::test]
async fn htpasswd_right_credentials_work() {
    let registry = TestRegistry::start(Mode::Htpasswd {
        username: "alice".into(),
        password: "wonderland".into(),
    })
    .await;
    let options = insecure(&registry);
    let image = reference(&registry, "private/plugin:v1");
    let module = test_module("private");
    let client = Registry::new(&image, &options, basic("alice", "wonderland")).unwrap();
    let digest = client
        .push(&image, &module, ImageVariant::Compat)
        .await
        .unwrap();
    let manifest = client.resolve(&image).await.unwrap();
    assert_eq!(manifest.digest, digest);
    assert_eq!(
        client.module(&image, &manifest, 1 << 20).await.unwrap(),
        module
    );
}

#[tokio::test]
async fn htpasswd_wrong_credentials_and_anonymous_are_refused() {
    let registry = TestRegistry::start(Mode::Htpasswd {
        username: "alice".into(),
        password: "wonderland".into(),
    })
    .await;
    let options = insecure(&registry);
    let image = reference(&registry, "private/plugin:v1");
    let owner = Registry::new(&image, &options, basic("alice", "wonderland")).unwrap();
    owner
        .push(&image, &test_module("private"), ImageVariant::Artifact)
        .await
        .unwrap();

    let wrong = Registry::new(&image, &options, basic("alice", "looking-glass")).unwrap();
    let error = wrong.resolve(&image).await.unwrap_err();
    assert_error(
        &error,
        FetchErrorKind::ManifestFailure,
        &["401", "refused the credentials", &registry.address],
    );
    assert!(!error.to_string().contains("looking-glass"), "{error}");
    assert_eq!(
        error.url,
        format!("oci://{}/private/plugin:v1", registry.address)
    );

    let anonymous = Registry::new(&image, &options, None).unwrap();
    let error = anonymous.resolve(&image).await.unwrap_err();
    assert_error(
        &error,
        FetchErrorKind::ManifestFailure,
        &["401", "requires credentials", "imagePullSecret"],
    );

    let error = wrong
        .push(&image, &test_module("evil"), ImageVariant::Compat)
        .await
        .unwrap_err();
    assert_error(
        &error,
        FetchErrorKind::DownloadFailure,
        &["401", "refused the credentials"],
    );
}

#[tokio::test]
async fn tls_registry_with_its_ca_trusted() {
    let registry = TestRegistry::start(Mode::Tls).await;
    let options = FetchOptions {
        extra_root_certificates: vec![registry.ca_pem.clone().unwrap()],
        ..options()
    };
    let image = reference(&registry, "tls/plugin:v1");
    let module = test_module("tls");
    let client = Registry::new(&image, &options, None).unwrap();
    let digest = client
        .push(&image, &module, ImageVariant::Docker)
        .await
        .unwrap();
    let manifest = client.resolve(&image).await.unwrap();
    assert_eq!(
        (manifest.digest.as_str(), manifest.layout),
        (digest.as_str(), ImageLayout::Docker)
    );
    assert_eq!(
        client.module(&image, &manifest, 1 << 20).await.unwrap(),
        module
    );
}

#[tokio::test]
async fn tls_registry_without_its_ca_is_refused() {
    let registry = TestRegistry::start(Mode::Tls).await;
    let image = reference(&registry, "tls/plugin:v1");
    let client = Registry::new(&image, &options(), None).unwrap();
    let error = client.resolve(&image).await.unwrap_err();
    assert_error(
        &error,
        FetchErrorKind::ManifestFailure,
        &["certificate", "CA"],
    );
}

#[tokio::test]
async fn plain_http_registry_not_listed_as_insecure_is_refused() {
    let registry = TestRegistry::start(Mode::Plain).await;
    let image = reference(&registry, "plain/plugin:v1");
    let client = Registry::new(&image, &options(), None).unwrap();
    let error = client.resolve(&image).await.unwrap_err();
    assert_error(
        &error,
        FetchErrorKind::ManifestFailure,
        &["plain HTTP", "insecure"],
    );
}

#[tokio::test]
async fn unknown_tag_is_a_manifest_failure() {
    let registry = TestRegistry::start(Mode::Plain).await;
    let options = insecure(&registry);
    let image = reference(&registry, "plugins/known:v1");
    let client = Registry::new(&image, &options, None).unwrap();
    client
        .push(&image, &test_module("known"), ImageVariant::Compat)
        .await
        .unwrap();
    for missing in ["plugins/known:v2", "plugins/unknown:v1"] {
        let missing = reference(&registry, missing);
        let error = client.resolve(&missing).await.unwrap_err();
        assert_error(
            &error,
            FetchErrorKind::ManifestFailure,
            &["404", "not found"],
        );
    }
    // Through the fetcher, as the gateway asks: the same error, counted as Istio's agent counts it.
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), options);
    for (count, missing) in [(1, "plugins/known:v2"), (2, "plugins/unknown:v1")] {
        let url = reference(&registry, missing).to_string();
        let error = fetcher.fetch(request(&url)).await.unwrap_err();
        assert_error(
            &error,
            FetchErrorKind::ManifestFailure,
            &["404", "not found"],
        );
        let metrics = fetcher.metrics();
        assert_eq!(metrics.remote_fetch_count("manifest_failure"), count);
        assert_eq!(metrics.remote_fetch_count("download_failure"), 0);
        assert_eq!(metrics.remote_fetch_count("success"), 0);
    }
    assert!(fetcher.cache().is_empty());
}

fn fetcher(dir: &std::path::Path, options: FetchOptions) -> wasmgate_fetch::Fetcher {
    let cache = wasmgate_fetch::Cache::open(dir).unwrap();
    wasmgate_fetch::Fetcher::new(options, std::sync::Arc::new(cache)).unwrap()
}

fn request(url: &str) -> wasmgate_fetch::ModuleRequest<'_> {
    wasmgate_fetch::ModuleRequest {
        url,
        ..wasmgate_fetch::ModuleRequest::default()
    }
}

#[tokio::test]
async fn docker_image_without_plugin_wasm_is_a_fetch_failure() {
    let registry = TestRegistry::start(Mode::Plain).await;
    let image = reference(&registry, "plugins/misnamed:v1");
    push_docker_image(
        &registry,
        &image,
        &[("filter.wasm", &test_module("misnamed"))],
    )
    .await;
    let client = Registry::new(&image, &insecure(&registry), None).unwrap();
    let manifest = client.resolve(&image).await.unwrap();
    assert_eq!(manifest.layout, ImageLayout::Docker);
    let error = client.module(&image, &manifest, 1 << 20).await.unwrap_err();
    assert_error(
        &error,
        FetchErrorKind::FetchFailure,
        &["no plugin.wasm in its last layer"],
    );
}

#[tokio::test]
async fn non_wasm_layout_is_a_manifest_failure() {
    let registry = TestRegistry::start(Mode::Plain).await;
    let image = reference(&registry, "plugins/wasm-to-oci:v1");
    push_raw_image(
        &registry,
        &image,
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.wasm.config.v1+json",
        &[(
            "application/vnd.wasm.content.layer.v1+wasm",
            test_module("w2o"),
        )],
    )
    .await;
    let client = Registry::new(&image, &insecure(&registry), None).unwrap();
    let error = client.resolve(&image).await.unwrap_err();
    assert_error(
        &error,
        FetchErrorKind::ManifestFailure,
        &["wasm-to-oci", "compat image"],
    );
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), insecure(&registry));
    let error = fetcher
        .fetch(request(&image.to_string()))
        .await
        .unwrap_err();
    assert_error(&error, FetchErrorKind::ManifestFailure, &["wasm-to-oci"]);
    assert_eq!(fetcher.metrics().remote_fetch_count("manifest_failure"), 1);
}

#[tokio::test]
async fn docker_config_picks_the_entry_for_the_registry() {
    let registry = TestRegistry::start(Mode::Htpasswd {
        username: "bob".into(),
        password: "builder".into(),
    })
    .await;
    let options = insecure(&registry);
    let image = reference(&registry, "team/plugin:v1");
    let module = test_module("docker-config");
    let port = registry.address.rsplit(':').next().unwrap();
    let other_port: u16 = port.parse::<u16>().unwrap().wrapping_add(1);
    let config = DockerConfig::from_json(
        format!(
            r#"{{"auths": {{
                "127.0.0.1:{other_port}": {{"username": "bob", "password": "wrong-port"}},
                "https://index.docker.io/v1/": {{"username": "bob", "password": "hub"}},
                "http://127.0.0.1:{port}/v2/": {{"username": "bob", "password": "url-form"}},
                "127.0.0.1:{port}": {{"auth": "{auth}"}}
            }}}}"#,
            auth = base64_encode("bob:builder"),
        )
        .as_bytes(),
    )
    .unwrap();
    let credentials = config.credentials_for(&image.registry);
    assert_eq!(credentials, basic("bob", "builder"));
    let client = Registry::new(&image, &options, credentials).unwrap();
    let digest = client
        .push(&image, &module, ImageVariant::Artifact)
        .await
        .unwrap();
    let manifest = client.resolve(&image).await.unwrap();
    assert_eq!(manifest.digest, digest);
    assert_eq!(
        client.module(&image, &manifest, 1 << 20).await.unwrap(),
        module
    );

    // The URL form alone matches too, and an empty entry means anonymous (refused here).
    let url_only = DockerConfig::from_json(
        format!(r#"{{"auths": {{"http://127.0.0.1:{port}/v2/": {{"username": "bob", "password": "builder"}}}}}}"#)
            .as_bytes(),
    )
    .unwrap();
    let client =
        Registry::new(&image, &options, url_only.credentials_for(&image.registry)).unwrap();
    assert_eq!(client.resolve(&image).await.unwrap().digest, digest);
    let empty =
        DockerConfig::from_json(format!(r#"{{"auths": {{"127.0.0.1:{port}": {{}}}}}}"#).as_bytes())
            .unwrap();
    assert_eq!(empty.credentials_for(&image.registry), None);
    let client = Registry::new(&image, &options, None).unwrap();
    let error = client.resolve(&image).await.unwrap_err();
    assert_error(
        &error,
        FetchErrorKind::ManifestFailure,
        &["requires credentials"],
    );
}

#[tokio::test]
async fn metadata_addresses_are_refused_before_any_request() {
    let image = OciReference::parse("169.254.169.254:5000/plugins/p:v1").unwrap();
    let options = FetchOptions {
        insecure_registries: vec!["169.254.169.254:5000".into()],
        ..options()
    };
    let client = Registry::new(&image, &options, None).unwrap();
    let error = client.resolve(&image).await.unwrap_err();
    assert_error(&error, FetchErrorKind::DownloadFailure, &["link-local"]);
}

fn base64_encode(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// A Docker image whose one layer is a gzip'd tar of `files` (no `plugin.wasm` unless given).
async fn push_docker_image(registry: &TestRegistry, image: &OciReference, files: &[(&str, &[u8])]) {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, name, *data).unwrap();
    }
    let tar = builder.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).unwrap();
    push_raw_image(
        registry,
        image,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.container.image.v1+json",
        &[(
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            gz.finish().unwrap(),
        )],
    )
    .await;
}

/// Pushes a hand-made image with oci-client, bypassing `Registry::push`.
async fn push_raw_image(
    registry: &TestRegistry,
    image: &OciReference,
    manifest_type: &str,
    config_type: &str,
    layers: &[(&str, Vec<u8>)],
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = oci_client::Client::new(oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::Http,
        ..Default::default()
    });
    let target = image.to_client_reference();
    let auth = oci_client::secrets::RegistryAuth::Anonymous;
    client
        .auth(&target, &auth, oci_client::RegistryOperation::Push)
        .await
        .unwrap();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let mut descriptors = Vec::new();
    for (media_type, data) in layers {
        client
            .push_blob(&target, data.clone(), &sha256(data))
            .await
            .unwrap();
        descriptors.push(serde_json::json!({"mediaType": media_type, "digest": sha256(data), "size": data.len()}));
    }
    client
        .push_blob(&target, config.clone(), &sha256(&config))
        .await
        .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {"mediaType": config_type, "digest": sha256(&config), "size": config.len()},
        "layers": descriptors,
    }))
    .unwrap();
    client
        .push_manifest_raw(&target, manifest, manifest_type.parse().unwrap())
        .await
        .unwrap_or_else(|e| panic!("pushing {image}: {e}; registry log:\n{}", registry.log()));
}

/// oci-client's own HTTP client has no resolver or redirect hooks: layers come through the guarded
/// client, and a token realm is checked before oci-client asks it.
#[tokio::test]
async fn blob_redirects_and_token_realms_into_metadata_addresses_are_refused() {
    for base_url in [
        "http://169.254.169.254/",
        "http://metadata.google.internal/",
    ] {
        let registry = TestRegistry::start(Mode::RedirectingBlobs {
            base_url: base_url.into(),
        })
        .await;
        let image = reference(&registry, "redirect/p:v1");
        let options = insecure(&registry);
        let client = Registry::new(&image, &options, None).unwrap();
        client
            .push(&image, &test_module("redirect"), ImageVariant::Artifact)
            .await
            .unwrap();
        let manifest = client.resolve(&image).await.unwrap();
        let error = client.module(&image, &manifest, 1 << 20).await.unwrap_err();
        assert_error(
            &error,
            FetchErrorKind::DownloadFailure,
            &[
                "link-local or cloud metadata",
                &manifest.layer_digest()[..20],
            ],
        );
    }

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["token-issuer".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let registry = TestRegistry::start(Mode::Token {
        realm: "http://169.254.169.254/token".into(),
        service: "wasmgate-test".into(),
        issuer: "wasmgate-test".into(),
        root_cert_pem: cert.pem(),
    })
    .await;
    let image = reference(&registry, "realm/p:v1");
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), insecure(&registry));
    let error = fetcher
        .fetch(request(&image.to_string()))
        .await
        .unwrap_err();
    assert_error(
        &error,
        FetchErrorKind::DownloadFailure,
        &["token service http://169.254.169.254/token", "link-local"],
    );
    assert_eq!(fetcher.metrics().remote_fetch_count("download_failure"), 1);
}

/// A registry that redirects its manifest requests. A real registry does not (its `redirect`
/// middleware covers blobs only), so a hand-made server plays one: `/v2/` answers, and every
/// manifest is "elsewhere", at a cloud metadata address.
#[tokio::test]
async fn manifest_redirects_into_metadata_addresses_are_refused() {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut head = [0u8; 4096];
            let read = stream.read(&mut head).unwrap_or(0);
            let answer = if head[..read].starts_with(b"GET /v2/ ") {
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
            } else {
                "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://169.254.169.254/latest/meta-data/\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            };
            let _ = stream.write_all(answer.as_bytes());
        }
    });
    let image = OciReference::parse(&format!("{address}/redirect/p:v1")).unwrap();
    let options = FetchOptions {
        insecure_registries: vec![address.to_string()],
        ..options()
    };
    let client = Registry::new(&image, &options, None).unwrap();
    let error = client.resolve(&image).await.unwrap_err();
    assert_error(
        &error,
        FetchErrorKind::ManifestFailure,
        &["manifest v1", "link-local or cloud metadata"],
    );
}

/// Istio's pull policies through the [`wasmgate_fetch::Fetcher`]: `:latest` asks the registry each
/// time and reuses the cached module while the digest holds; a pinned tag is served from the
/// cache; a `sha256` is the manifest digest.
#[tokio::test]
async fn pull_policies_follow_istio() {
    use std::sync::Arc;
    use wasmgate_fetch::{Cache, Fetcher, ModuleRequest, PullPolicy};

    let registry = TestRegistry::start(Mode::Plain).await;
    let options = insecure(&registry);
    let pusher = |r: &OciReference| Registry::new(r, &options, None).unwrap();
    let latest = reference(&registry, "policy/p:latest");
    let pinned = reference(&registry, "policy/p:v1");
    let (one, two) = (test_module("one"), test_module("two"));
    pusher(&latest)
        .push(&latest, &one, ImageVariant::Compat)
        .await
        .unwrap();
    let v1_digest = pusher(&pinned)
        .push(&pinned, &one, ImageVariant::Compat)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let fetcher =
        Fetcher::new(options.clone(), Arc::new(Cache::open(dir.path()).unwrap())).unwrap();
    let fetch = |url: String, sha256: Option<String>, policy: Option<PullPolicy>| {
        let fetcher = &fetcher;
        async move {
            fetcher
                .fetch(ModuleRequest {
                    url: &url,
                    sha256: sha256.as_deref(),
                    pull_policy: policy,
                    credentials: None,
                })
                .await
                .unwrap()
        }
    };
    let latest_url = latest.to_string();
    let first = fetch(latest_url.clone(), None, None).await;
    assert!(!first.cache_hit);
    assert_eq!(&*first.bytes, one.as_slice());
    // Always (the default for :latest): the manifest is read again, the layer is not.
    let again = fetch(latest_url.clone(), None, None).await;
    assert!(again.cache_hit, "same digest: no layer download");
    // The tag moves: the next fetch sees the new module.
    pusher(&latest)
        .push(&latest, &two, ImageVariant::Compat)
        .await
        .unwrap();
    let moved = fetch(latest_url.clone(), None, None).await;
    assert_eq!(&*moved.bytes, two.as_slice());
    // IfNotPresent keeps what it has, even for :latest.
    let kept = fetch(latest_url, None, Some(PullPolicy::IfNotPresent)).await;
    assert!(kept.cache_hit);
    assert_eq!(&*kept.bytes, two.as_slice());

    // A pinned tag: fetched once, then served from the cache.
    let v1 = fetch(pinned.to_string(), None, None).await;
    assert_eq!(v1.digest.as_deref(), Some(v1_digest.as_str()));
    assert!(fetch(pinned.to_string(), None, None).await.cache_hit);
    // sha256 names the manifest digest: a match is a cache hit, a mismatch an error.
    let sha = v1_digest.trim_start_matches("sha256:").to_owned();
    assert!(fetch(pinned.to_string(), Some(sha), None).await.cache_hit);
    let error = fetcher
        .fetch(ModuleRequest {
            url: &pinned.to_string(),
            sha256: Some(&"a".repeat(64)),
            ..ModuleRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.kind, FetchErrorKind::ChecksumMismatched, "{error}");
    assert!(error.message.contains(&v1_digest), "{error}");
    assert_eq!(
        fetcher.metrics().remote_fetch_count("checksum_mismatched"),
        1
    );
}

/// HTTPS module downloads verify the server's certificate: the TLS registry doubles as an HTTPS
/// file server (an artifact's layer blob is the raw module).
#[tokio::test]
async fn https_downloads_verify_certificates() {
    use std::sync::Arc;
    use wasmgate_fetch::{Cache, Fetcher, ModuleRequest};

    let registry = TestRegistry::start(Mode::Tls).await;
    let trusted = FetchOptions {
        extra_root_certificates: vec![registry.ca_pem.clone().unwrap()],
        ..options()
    };
    let image = reference(&registry, "https/plugin:v1");
    let module = test_module("https");
    let client = Registry::new(&image, &trusted, None).unwrap();
    client
        .push(&image, &module, ImageVariant::Artifact)
        .await
        .unwrap();
    let manifest = client.resolve(&image).await.unwrap();
    let url = format!(
        "https://{}/v2/https/plugin/blobs/{}",
        registry.address,
        manifest.layer_digest()
    );
    let request = ModuleRequest {
        url: &url,
        ..ModuleRequest::default()
    };

    let dir = tempfile::tempdir().unwrap();
    let untrusting = Fetcher::new(
        FetchOptions {
            max_attempts: 1,
            ..options()
        },
        Arc::new(Cache::open(dir.path().join("a")).unwrap()),
    )
    .unwrap();
    let error = untrusting.fetch(request).await.unwrap_err();
    assert_eq!(error.kind, FetchErrorKind::DownloadFailure, "{error}");
    assert!(
        error.message.to_lowercase().contains("certificate"),
        "{error}"
    );

    let trusting = Fetcher::new(
        trusted,
        Arc::new(Cache::open(dir.path().join("b")).unwrap()),
    )
    .unwrap();
    let fetched = trusting.fetch(request).await.unwrap();
    assert_eq!(&*fetched.bytes, module.as_slice());
}
