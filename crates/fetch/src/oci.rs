//! OCI registries, as Istio's agent pulls Wasm images: the manifest first (its digest is what a
//! WasmPlugin's `sha256` names), the module's layer only when the cache does not already hold it.
//!
//! Three layouts are accepted, tried in Istio's order (media types decide, annotations do not):
//! a Docker image whose last layer holds `plugin.wasm`, an OCI image whose last layer holds
//! `plugin.wasm` ("compat"), and Solo's artifact with exactly two layers, one of them the raw module.
//! The v2 API is oci-client's; this module adds the SSRF guard, size caps, digest checks, layout
//! detection and errors an operator can act on. `push` writes each layout, for tests and tooling.
//!
//! oci-client builds its own HTTP client, with no hook for a resolver or a redirect policy, so a
//! pull does not use it: the token exchange, the manifest and the layers go through the guarded
//! client module downloads use (registries redirect blobs to storage, wherever that is). Pushes
//! (tooling) use oci-client, after the token service a registry names has been checked.

use std::io::Read as _;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use sha2::{Digest as _, Sha256};

use crate::docker_config::Credentials;
use crate::error::{FetchError, FetchErrorKind};
use crate::{FetchOptions, OciReference, net};

/// Manifest media types.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Layer media types of the three layouts.
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";
/// Image configs written by `push`.
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// wasm-to-oci's layer, which Istio does not accept (istio/istio#39990).
const WASM_TO_OCI_LAYER: &str = "application/vnd.wasm.content.layer.v1+wasm";
const VARIANT_ANNOTATION: &str = "module.wasm.image/variant";
const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";
/// The file a compat image's last layer must hold.
const PLUGIN_FILE: &str = "plugin.wasm";
/// Manifests are small; anything bigger is not one.
const MAX_MANIFEST_SIZE: usize = 4 << 20;

/// How an image carries its module (Istio's extraction order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageLayout {
    /// Docker manifest, last layer `application/vnd.docker.image.rootfs.diff.tar.gzip` holding
    /// `plugin.wasm`.
    Docker,
    /// OCI manifest, last layer `application/vnd.oci.image.layer.v1.tar+gzip` holding `plugin.wasm`.
    OciCompat,
    /// Solo's Wasm artifact: exactly two layers, one `application/vnd.module.wasm.content.layer.v1+wasm`
    /// that is the raw module.
    Artifact,
}

/// What [`Registry::push`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageVariant {
    /// OCI manifest annotated `module.wasm.image/variant=compat`, one tar+gzip layer holding
    /// `plugin.wasm` (what `buildah` makes).
    Compat,
    /// Solo's artifact: the runtime config and the raw module as the two layers.
    Artifact,
    /// Docker manifest, one rootfs tar.gzip layer holding `plugin.wasm` (what `docker build` makes).
    Docker,
}

/// A resolved image: its manifest digest and where its module is, without any layer downloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// `sha256:<hex>` of the manifest bytes: what Istio compares a WasmPlugin's `sha256` with.
    pub digest: String,
    pub layout: ImageLayout,
    /// The manifest's media type.
    pub media_type: String,
    /// The layer holding the module.
    layer: Blob,
}

impl Manifest {
    /// Digest of the layer that holds the module.
    pub fn layer_digest(&self) -> &str {
        &self.layer.digest
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Blob {
    media_type: String,
    /// `sha256:<64 lowercase hex>`, checked when the manifest was read.
    digest: String,
    size: u64,
}

/// One registry's v2 API with the credentials to use there. Cheap to keep; not tied to one image.
pub struct Registry {
    client: Client,
    auth: RegistryAuth,
    has_credentials: bool,
    /// `host[:port]` as in the references this client serves.
    registry: String,
    insecure: bool,
    attempt_timeout: Duration,
    deadline: Duration,
    progress: Option<crate::ProgressFn>,
    /// The guarded client ([`crate::http::HttpFetcher`]'s) for layers and the token realm check.
    http: reqwest::Client,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("registry", &self.registry)
            .field("insecure", &self.insecure)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// A client for `reference`'s registry. `credentials` `None` means anonymous. Plain HTTP only
    /// when `options` lists the registry as insecure; otherwise HTTPS with verified certificates
    /// (the platform's roots plus `options.extra_root_certificates`).
    pub fn new(
        reference: &OciReference,
        options: &FetchOptions,
        credentials: Option<Credentials>,
    ) -> Result<Self, FetchError> {
        crate::install_crypto_provider();
        let url = reference.to_string();
        let mut roots = Vec::new();
        for (index, pem) in options.extra_root_certificates.iter().enumerate() {
            let before = roots.len();
            for der in CertificateDer::pem_slice_iter(pem) {
                let der = der.map_err(|e| {
                    FetchError::new(
                        &url,
                        FetchErrorKind::Io,
                        format!("extra root certificate #{index} is not valid PEM: {e}"),
                    )
                })?;
                roots.push(Certificate {
                    encoding: CertificateEncoding::Der,
                    data: der.to_vec(),
                });
            }
            if roots.len() == before {
                return Err(FetchError::new(
                    &url,
                    FetchErrorKind::Io,
                    format!("extra root certificate #{index} holds no PEM CERTIFICATE block"),
                ));
            }
        }
        let insecure = options.is_insecure(&reference.registry);
        let config = ClientConfig {
            protocol: if insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            extra_root_certificates: roots,
            // Multi-platform indexes are refused with a reason rather than resolved.
            platform_resolver: None,
            connect_timeout: Some(options.attempt_timeout),
            read_timeout: Some(options.attempt_timeout),
            user_agent: concat!("wasmgate/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        let client = Client::try_from(config).map_err(|e| {
            FetchError::new(
                &url,
                FetchErrorKind::Io,
                format!("cannot build the registry client: {}", chain(&e)),
            )
        })?;
        let (auth, has_credentials) = match credentials {
            None => (RegistryAuth::Anonymous, false),
            Some(Credentials::Basic { username, password }) => {
                (RegistryAuth::Basic(username, password), true)
            }
            Some(Credentials::Bearer(token)) => (RegistryAuth::Bearer(token), true),
        };
        Ok(Self {
            client,
            auth,
            has_credentials,
            registry: reference.registry.clone(),
            insecure,
            attempt_timeout: options.attempt_timeout,
            deadline: options.deadline,
            progress: options.progress.clone(),
            http: crate::http::HttpFetcher::new(options)
                .map_err(|e| FetchError::new(&url, e.kind, e.message))?
                .client()
                .clone(),
        })
    }

    /// Fetches the manifest only (no layers): its digest and the image's layout. Every failure is
    /// a [`FetchErrorKind::ManifestFailure`], except a refused address ([`FetchErrorKind::DownloadFailure`]).
    pub async fn resolve(&self, reference: &OciReference) -> Result<Manifest, FetchError> {
        let image = self.prepare(reference).await?;
        let fail = |message: String| {
            FetchError::new(
                reference.to_string(),
                FetchErrorKind::ManifestFailure,
                message,
            )
        };
        let what = format!(
            "manifest {} of repository {}",
            reference
                .digest
                .as_deref()
                .or(reference.effective_tag())
                .unwrap_or("latest"),
            reference.repository
        );
        let pulled = tokio::time::timeout(self.attempt_timeout, async {
            let token = self.pull_token(&image).await?;
            self.get_manifest(&image, token.as_deref(), &what).await
        })
        .await;
        let body = match pulled {
            Err(_) => {
                return Err(fail(format!(
                    "registry {} did not answer within {:?}",
                    self.registry, self.attempt_timeout
                )));
            }
            Ok(Err(message)) => return Err(fail(message)),
            Ok(Ok(body)) => body,
        };
        if body.len() > MAX_MANIFEST_SIZE {
            return Err(fail(format!(
                "the manifest is {} bytes, more than a manifest can be ({MAX_MANIFEST_SIZE})",
                body.len()
            )));
        }
        let digest = sha256_digest(&body);
        if let Some(pinned) = &reference.digest
            && !pinned.eq_ignore_ascii_case(&digest)
        {
            return Err(fail(format!(
                "the registry sent a manifest whose digest is {digest}, not the {pinned} asked for"
            )));
        }
        let (media_type, layout, layer) = detect_layout(&body).map_err(fail)?;
        Ok(Manifest {
            digest,
            layout,
            media_type,
            layer,
        })
    }

    /// Downloads the module `manifest` points at: the last layer's `plugin.wasm` for Docker and
    /// compat images, the raw Wasm layer for artifacts. `max_size` caps the download and the
    /// unpacked module. Transport, size and digest problems are [`FetchErrorKind::DownloadFailure`];
    /// content without a module is [`FetchErrorKind::FetchFailure`].
    pub async fn module(
        &self,
        reference: &OciReference,
        manifest: &Manifest,
        max_size: usize,
    ) -> Result<Vec<u8>, FetchError> {
        let url = reference.to_string();
        let download =
            |message: String| FetchError::new(&url, FetchErrorKind::DownloadFailure, message);
        let image = self.prepare(reference).await?;
        let layer = &manifest.layer;
        if layer.size > max_size as u64 {
            return Err(download(format!(
                "layer {} is {} bytes, above the {max_size}-byte limit",
                layer.digest, layer.size
            )));
        }
        let mut buffer = CappedBuffer::new(max_size);
        buffer.progress = self.progress.clone().map(|p| (p, layer.size));
        let what = format!("layer {}", layer.digest);
        let pulled = tokio::time::timeout(self.deadline, async {
            let token = self.pull_token(&image).await?;
            self.download_blob(&image, &layer.digest, token.as_deref(), &mut buffer, &what)
                .await
        })
        .await;
        match pulled {
            Err(_) => {
                return Err(download(format!(
                    "layer {} did not arrive within {:?}",
                    layer.digest, self.deadline
                )));
            }
            Ok(Err(_)) if buffer.exceeded => {
                return Err(download(format!(
                    "layer {} is larger than the {max_size}-byte limit",
                    layer.digest
                )));
            }
            Ok(Err(message)) => return Err(download(message)),
            Ok(Ok(())) => {}
        }
        let data = buffer.data;
        // Checked on the whole layer: it is the whole point of a digest.
        let actual = sha256_digest(&data);
        if actual != layer.digest {
            return Err(download(format!(
                "layer {} arrived with digest {actual}: corrupted or tampered with",
                layer.digest
            )));
        }
        if data.len() as u64 != layer.size {
            return Err(download(format!(
                "layer {} is {} bytes, the manifest says {}",
                layer.digest,
                data.len(),
                layer.size
            )));
        }
        match manifest.layout {
            ImageLayout::Artifact => Ok(data),
            ImageLayout::Docker | ImageLayout::OciCompat => {
                let extracted =
                    tokio::task::spawn_blocking(move || extract_plugin(&data, max_size))
                        .await
                        .map_err(|e| download(format!("unpacking the layer failed: {e}")))?;
                extracted.map_err(|(kind, message)| FetchError::new(&url, kind, message))
            }
        }
    }

    /// Pushes `module` as an image of `variant` under `reference`; returns the manifest digest
    /// `sha256:<hex>`. Failures are [`FetchErrorKind::DownloadFailure`] saying what failed.
    pub async fn push(
        &self,
        reference: &OciReference,
        module: &[u8],
        variant: ImageVariant,
    ) -> Result<String, FetchError> {
        let built = build_image(module, variant).map_err(|e| {
            FetchError::new(
                reference.to_string(),
                FetchErrorKind::DownloadFailure,
                format!("cannot build the image: {e}"),
            )
        })?;
        self.push_built(reference, &built).await
    }

    /// Pushes an image read from an OCI image layout as it is: its blobs and manifest byte for
    /// byte, so the digest is the layout's. Returns the manifest digest; failures as [`Self::push`].
    pub async fn push_image(
        &self,
        reference: &OciReference,
        image: &LayoutImage,
    ) -> Result<String, FetchError> {
        self.push_built(reference, &image.image).await
    }

    async fn push_built(
        &self,
        reference: &OciReference,
        built: &BuiltImage,
    ) -> Result<String, FetchError> {
        let url = reference.to_string();
        let fail =
            |message: String| FetchError::new(&url, FetchErrorKind::DownloadFailure, message);
        let image = self.prepare(reference).await?;
        let digest = sha256_digest(&built.manifest);
        if let Some(pinned) = &reference.digest
            && !pinned.eq_ignore_ascii_case(&digest)
        {
            return Err(fail(format!(
                "cannot push to {pinned}: the image's manifest digest is {digest}"
            )));
        }
        let pushed = tokio::time::timeout(self.deadline, async {
            self.authenticate(&image, RegistryOperation::Push)
                .await
                .map_err(|e| self.describe(&e, "the push"))?;
            for (blob, blob_digest) in &built.blobs {
                self.client
                    .push_blob(&image, blob.clone(), blob_digest)
                    .await
                    .map_err(|e| self.describe(&e, &format!("uploading blob {blob_digest}")))?;
            }
            let content_type = built
                .media_type
                .parse()
                .map_err(|_| format!("bad media type {}", built.media_type))?;
            self.client
                .push_manifest_raw(&image, built.manifest.clone(), content_type)
                .await
                .map_err(|e| self.describe(&e, "the manifest upload"))?;
            Ok::<_, String>(())
        })
        .await;
        match pushed {
            Err(_) => Err(fail(format!(
                "the push to registry {} did not finish within {:?}",
                self.registry, self.deadline
            ))),
            Ok(Err(message)) => Err(fail(message)),
            Ok(Ok(())) => Ok(digest),
        }
    }

    /// A GET of `path` under the registry's `/v2/`, with the guarded client (redirects are
    /// followed, never into link-local or metadata addresses, and drop the `Authorization`
    /// header when they leave the registry's host), authorised with `token` or the credentials.
    fn registry_get(
        &self,
        image: &oci_client::Reference,
        path: &str,
        token: Option<&str>,
    ) -> reqwest::RequestBuilder {
        let scheme = if self.insecure { "http" } else { "https" };
        let url = format!(
            "{scheme}://{}/v2/{}/{path}",
            image.resolve_registry(),
            image.repository()
        );
        let request = self.http.get(&url);
        match (token, &self.auth) {
            (Some(token), _) => request.bearer_auth(token),
            (None, RegistryAuth::Bearer(token)) => request.bearer_auth(token),
            (None, RegistryAuth::Basic(username, password)) => {
                request.basic_auth(username, Some(password))
            }
            (None, RegistryAuth::Anonymous) => request,
        }
    }

    /// The bearer token for pulling from `image`'s repository, asked of the token service the
    /// registry names in its challenge, with the guarded client: oci-client would ask it with its
    /// own, whose lookups nothing checks. `None` when the registry asks for no token (it takes
    /// Basic credentials as they are, or none).
    async fn pull_token(&self, image: &oci_client::Reference) -> Result<Option<String>, String> {
        if let RegistryAuth::Bearer(token) = &self.auth {
            return Ok(Some(token.clone()));
        }
        let registry = &self.registry;
        let scheme = if self.insecure { "http" } else { "https" };
        let probe = format!("{scheme}://{}/v2/", image.resolve_registry());
        let response = self
            .http
            .get(&probe)
            .send()
            .await
            .map_err(|e| self.unanswered(&e, "its API root (/v2/)"))?;
        if response.status() != reqwest::StatusCode::UNAUTHORIZED {
            return Ok(None);
        }
        let Some(challenge) = response
            .headers()
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .find(|value| bearer_realm(value).is_some())
        else {
            return Ok(None);
        };
        let realm = bearer_realm(challenge).unwrap_or_default();
        let mut url = reqwest::Url::parse(&realm).map_err(|e| {
            format!("registry {registry} names a token service that is not a URL ({realm}): {e}")
        })?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = bearer_param(challenge, "service") {
                query.append_pair("service", &service);
            }
            query.append_pair("scope", &format!("repository:{}:pull", image.repository()));
        }
        let mut request = self.http.get(url);
        if let RegistryAuth::Basic(username, password) = &self.auth {
            request = request.basic_auth(username, Some(password));
        }
        let response = request
            .send()
            .await
            .map_err(|e| self.unanswered(&e, &format!("a token from {realm}")))?;
        let status = response.status();
        if !status.is_success() {
            return Err(if self.has_credentials {
                format!("registry {registry} refused the credentials (token exchange): {status}")
            } else {
                format!("registry {registry} refused an anonymous token: {status}")
            });
        }
        let answer: serde_json::Value = response.json().await.map_err(|e| {
            format!(
                "the token service of registry {registry} answered no JSON: {}",
                chain(&e)
            )
        })?;
        // Docker's token protocol names it `token`; OAuth2-style services `access_token`.
        answer["token"]
            .as_str()
            .or(answer["access_token"].as_str())
            .map(|token| Some(token.to_owned()))
            .ok_or_else(|| format!("the token service of registry {registry} answered no token"))
    }

    /// The manifest `image` names, in any of the four manifest media types. With the guarded
    /// client, as layers: oci-client's own would follow a registry's redirect anywhere.
    async fn get_manifest(
        &self,
        image: &oci_client::Reference,
        token: Option<&str>,
        what: &str,
    ) -> Result<Vec<u8>, String> {
        let reference = image.digest().or(image.tag()).unwrap_or("latest");
        let accept = [
            DOCKER_MANIFEST,
            OCI_MANIFEST,
            OCI_INDEX,
            DOCKER_MANIFEST_LIST,
        ]
        .join(", ");
        let registry = &self.registry;
        let mut response = self
            .registry_get(image, &format!("manifests/{reference}"), token)
            .header(reqwest::header::ACCEPT, accept)
            .send()
            .await
            .map_err(|e| self.unanswered(&e, what))?;
        let status = response.status();
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("{what} from registry {registry} broke off: {}", chain(&e)))?
        {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_MANIFEST_SIZE {
                return Err(format!(
                    "the manifest is more than {MAX_MANIFEST_SIZE} bytes, more than a manifest can be"
                ));
            }
        }
        match status.as_u16() {
            200..=299 => Ok(body),
            401 => Err(self.refused("401", what)),
            403 => Err(self.refused("403", what)),
            404 => {
                // The registry's error envelope says which: the repository or the manifest.
                let codes = error_codes(&body);
                if codes.contains("NAME_UNKNOWN") {
                    Err(format!(
                        "{what} was not found: no such repository on registry {registry} (404 {codes})"
                    ))
                } else {
                    Err(format!(
                        "{what} was not found on registry {registry} (404 {codes})"
                    ))
                }
            }
            _ => Err(format!("registry {registry} answered {status} for {what}")),
        }
    }

    /// GETs a blob with the guarded client into `buffer` (see [`Self::registry_get`]).
    async fn download_blob(
        &self,
        image: &oci_client::Reference,
        digest: &str,
        token: Option<&str>,
        buffer: &mut CappedBuffer,
        what: &str,
    ) -> Result<(), String> {
        use tokio::io::AsyncWriteExt as _;
        let registry = &self.registry;
        let mut response = self
            .registry_get(image, &format!("blobs/{digest}"), token)
            .send()
            .await
            .map_err(|e| self.unanswered(&e, what))?;
        let status = response.status();
        match status.as_u16() {
            200..=299 => {}
            401 => return Err(self.refused("401", what)),
            403 => return Err(self.refused("403", what)),
            404 => return Err(format!("{what} is missing from registry {registry} (404)")),
            _ => return Err(format!("registry {registry} answered {status} for {what}")),
        }
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("{what} from registry {registry} broke off: {}", chain(&e)))?
        {
            buffer
                .write_all(&chunk)
                .await
                .map_err(|e| format!("{what}: {e}"))?;
        }
        Ok(())
    }

    /// Refuses a token service that is a link-local or metadata address, as the registry's own
    /// address is refused. oci-client asks the realm a registry's `WWW-Authenticate` names for
    /// tokens with its own client; this asks `/v2/` first with the guarded one and checks the
    /// realm it names. (oci-client resolves the name again: a DNS answer that changes between
    /// the two is not caught here.) A registry that cannot be asked is left to the requests that
    /// follow, which report it in their words.
    async fn check_token_realm(
        &self,
        image: &oci_client::Reference,
        url: &str,
    ) -> Result<(), FetchError> {
        let scheme = if self.insecure { "http" } else { "https" };
        let probe = format!("{scheme}://{}/v2/", image.resolve_registry());
        let Ok(Ok(response)) =
            tokio::time::timeout(self.attempt_timeout, self.http.get(&probe).send()).await
        else {
            return Ok(());
        };
        let Some(realm) = response
            .headers()
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .find_map(bearer_realm)
        else {
            return Ok(());
        };
        let Ok(parsed) = reqwest::Url::parse(&realm) else {
            return Ok(());
        };
        let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default()) else {
            return Ok(());
        };
        net::check_host(host, port).await.map_err(|reason| {
            FetchError::new(
                url,
                FetchErrorKind::DownloadFailure,
                format!(
                    "registry {} names its token service {realm}: {reason}",
                    self.registry
                ),
            )
        })
    }

    /// Checks `reference` is for this registry and its address is allowed; returns oci-client's
    /// reference with the registry's credentials stored.
    async fn prepare(&self, reference: &OciReference) -> Result<oci_client::Reference, FetchError> {
        let url = reference.to_string();
        if reference.registry != self.registry {
            return Err(FetchError::new(
                url,
                FetchErrorKind::InvalidUrl,
                format!(
                    "the image is on registry {}, this client is for {}",
                    reference.registry, self.registry
                ),
            ));
        }
        let image = reference.to_client_reference();
        let (host, port) = host_port(image.resolve_registry(), self.insecure);
        net::check_host(&host, port)
            .await
            .map_err(|message| FetchError::new(&url, FetchErrorKind::DownloadFailure, message))?;
        self.check_token_realm(&image, &url).await?;
        self.client
            .store_auth_if_needed(image.resolve_registry(), &self.auth)
            .await;
        Ok(image)
    }

    /// Runs the registry's auth handshake up front, so that a token server refusing the
    /// credentials is reported as such (oci-client would otherwise go on anonymously).
    async fn authenticate(
        &self,
        image: &oci_client::Reference,
        operation: RegistryOperation,
    ) -> Result<(), OciDistributionError> {
        self.client
            .auth(image, &self.auth, operation)
            .await
            .map(drop)
    }

    /// The registry said no (`status`) to `what`: the credentials, or their absence.
    fn refused(&self, status: &str, what: &str) -> String {
        let registry = &self.registry;
        if self.has_credentials {
            format!("registry {registry} refused the credentials ({status}) for {what}")
        } else {
            format!(
                "registry {registry} requires credentials ({status}) for {what} and none were given: set an imagePullSecret"
            )
        }
    }

    /// A sentence about a request for `what` that got no answer (`text` is the error's chain),
    /// with a hint where the cause is a usual one.
    fn transport(&self, text: String, timeout: bool, connect: bool, what: &str) -> String {
        let registry = &self.registry;
        let lower = text.to_ascii_lowercase();
        let hint = if lower.contains("certificate") || lower.contains("unknownissuer") {
            " (the registry's TLS certificate is not trusted: add its CA to the extra root certificates)"
        } else if lower.contains("invalidcontenttype") || lower.contains("corrupt message") {
            " (the registry seems to speak plain HTTP: list it as an insecure registry to use HTTP)"
        } else {
            ""
        };
        let scheme = if self.insecure { "http" } else { "https" };
        if timeout {
            format!("registry {registry} did not answer in time for {what}: {text}")
        } else if connect {
            format!("cannot connect to registry {registry} over {scheme} for {what}: {text}{hint}")
        } else {
            format!("request to registry {registry} for {what} failed: {text}{hint}")
        }
    }

    /// [`Self::transport`] for the guarded client's errors.
    fn unanswered(&self, error: &reqwest::Error, what: &str) -> String {
        self.transport(chain(error), error.is_timeout(), error.is_connect(), what)
    }

    /// A sentence about `error`, met while getting `what`.
    fn describe(&self, error: &OciDistributionError, what: &str) -> String {
        let registry = &self.registry;
        let refused = |status: &str| self.refused(status, what);
        match error {
            OciDistributionError::UnauthorizedError { .. } => refused("401"),
            OciDistributionError::AuthenticationFailure(reason) => {
                let reason = short(reason);
                if self.has_credentials {
                    format!(
                        "registry {registry} refused the credentials (token exchange): {reason}"
                    )
                } else {
                    format!("registry {registry} refused an anonymous token: {reason}")
                }
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<String> = envelope
                    .errors
                    .iter()
                    .map(|e| {
                        // The wire form (MANIFEST_UNKNOWN), as registries document it.
                        let code = serde_json::to_value(&e.code)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_else(|| format!("{:?}", e.code));
                        format!("{code}: {}", e.message)
                    })
                    .collect();
                let codes = codes.join("; ");
                let has = |code: OciErrorCode| envelope.errors.iter().any(|e| e.code == code);
                if has(OciErrorCode::ManifestUnknown) || has(OciErrorCode::NotFound) {
                    format!("{what} was not found on registry {registry} (404 {codes})")
                } else if has(OciErrorCode::NameUnknown) {
                    format!(
                        "{what} was not found: no such repository on registry {registry} (404 {codes})"
                    )
                } else if has(OciErrorCode::BlobUnknown) {
                    format!("{what} is missing from registry {registry} ({codes})")
                } else if has(OciErrorCode::Unauthorized) {
                    refused("401")
                } else if has(OciErrorCode::Denied) {
                    refused("403 denied")
                } else {
                    format!("registry {registry} refused {what}: {codes}")
                }
            }
            OciDistributionError::ServerError { code, message, .. } => match code {
                401 => refused("401"),
                403 => refused("403"),
                404 => format!("{what} was not found on registry {registry} (404)"),
                _ => format!(
                    "registry {registry} answered {code} for {what}: {}",
                    short(message)
                ),
            },
            OciDistributionError::RequestError(e) => {
                self.transport(chain(e), e.is_timeout(), e.is_connect(), what)
            }
            OciDistributionError::DigestError(e) => {
                format!("{what} from registry {registry} does not match its digest: {e}")
            }
            OciDistributionError::SpecViolationError(e) => {
                format!("registry {registry} broke the distribution spec on {what}: {e}")
            }
            other => format!("{what} from registry {registry}: {}", chain(other)),
        }
    }
}

/// Reads the manifest JSON and tells where the module is, in Istio's order.
fn detect_layout(body: &[u8]) -> Result<(String, ImageLayout, Blob), String> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        schema_version: Option<i64>,
        media_type: Option<String>,
        #[serde(default)]
        layers: Option<Vec<RawDescriptor>>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct RawDescriptor {
        media_type: String,
        digest: String,
        size: i64,
    }
    let raw: Raw =
        serde_json::from_slice(body).map_err(|e| format!("the manifest is not valid JSON: {e}"))?;
    if raw.schema_version != Some(2) {
        return Err(format!(
            "manifest schemaVersion {:?} is not supported (only 2)",
            raw.schema_version
        ));
    }
    let media_type = match raw.media_type {
        Some(media_type) => media_type,
        // OCI lets a manifest leave its media type out.
        None if raw.manifests.is_some() => OCI_INDEX.to_owned(),
        None => OCI_MANIFEST.to_owned(),
    };
    if media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST {
        return Err(format!(
            "manifest media type {media_type} is a multi-platform image index, not a Wasm image layout: push a single-platform image"
        ));
    }
    if media_type != DOCKER_MANIFEST && media_type != OCI_MANIFEST {
        return Err(format!(
            "manifest media type {media_type} is not a Wasm image layout (want {DOCKER_MANIFEST} or {OCI_MANIFEST})"
        ));
    }
    let mut layers = Vec::new();
    for layer in raw.layers.unwrap_or_default() {
        let digest = layer.digest.to_ascii_lowercase();
        let valid = digest
            .strip_prefix("sha256:")
            .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if !valid {
            return Err(format!(
                "layer digest {:?} is not sha256:<64 hex digits>",
                layer.digest
            ));
        }
        let size = u64::try_from(layer.size)
            .map_err(|_| format!("layer {digest} has a negative size {}", layer.size))?;
        layers.push(Blob {
            media_type: layer.media_type,
            digest,
            size,
        });
    }
    let listed = || {
        let types: Vec<&str> = layers.iter().map(|l| l.media_type.as_str()).collect();
        format!("[{}]", types.join(", "))
    };
    let Some(last) = layers.last() else {
        return Err(format!(
            "manifest media type {media_type} is not a Wasm image layout: the image has no layers"
        ));
    };
    if media_type == DOCKER_MANIFEST {
        if last.media_type != DOCKER_LAYER {
            return Err(format!(
                "manifest media type {media_type} is not a Wasm image layout: its last layer is {} (want {DOCKER_LAYER} holding {PLUGIN_FILE})",
                last.media_type
            ));
        }
        return Ok((media_type, ImageLayout::Docker, last.clone()));
    }
    if last.media_type == OCI_LAYER {
        return Ok((media_type, ImageLayout::OciCompat, last.clone()));
    }
    if layers.len() == 2
        && let Some(wasm) = layers.iter().find(|l| l.media_type == WASM_LAYER)
    {
        return Ok((media_type, ImageLayout::Artifact, wasm.clone()));
    }
    if layers.iter().any(|l| l.media_type == WASM_TO_OCI_LAYER) {
        return Err(format!(
            "manifest media type {media_type} is a wasm-to-oci artifact ({WASM_TO_OCI_LAYER}), which Istio does not accept either: push the module as a compat image (a {OCI_LAYER} layer holding {PLUGIN_FILE})"
        ));
    }
    Err(format!(
        "manifest media type {media_type} is not a Wasm image layout: layers are {}; want the last layer {OCI_LAYER} holding {PLUGIN_FILE}, or exactly 2 layers one of which is {WASM_LAYER}",
        listed()
    ))
}

/// The first regular file named `plugin.wasm` (any directory) in a gzip'd tar, as Istio takes it.
fn extract_plugin(layer: &[u8], max_size: usize) -> Result<Vec<u8>, (FetchErrorKind, String)> {
    let not_archive = |e: std::io::Error| {
        (
            FetchErrorKind::FetchFailure,
            format!("the last layer is not a gzip'd tar: {e}"),
        )
    };
    // The whole unpacked stream is bounded too, so a gzip bomb of other files cannot run long.
    let limit = (max_size as u64).saturating_mul(2).saturating_add(1 << 20);
    let stream = flate2::read::GzDecoder::new(layer).take(limit);
    let mut archive = tar::Archive::new(stream);
    for entry in archive.entries().map_err(not_archive)? {
        let entry = entry.map_err(not_archive)?;
        let header = entry.header();
        let path = entry.path().map_err(not_archive)?;
        let is_plugin = path.file_name().is_some_and(|n| n == PLUGIN_FILE);
        if !is_plugin || !header.entry_type().is_file() {
            continue;
        }
        let declared = header.size().map_err(not_archive)?;
        if declared > max_size as u64 {
            return Err((
                FetchErrorKind::DownloadFailure,
                format!("{PLUGIN_FILE} is {declared} bytes, above the {max_size}-byte limit"),
            ));
        }
        let mut module = Vec::with_capacity(declared as usize);
        entry
            .take(max_size as u64 + 1)
            .read_to_end(&mut module)
            .map_err(not_archive)?;
        if module.len() > max_size {
            return Err((
                FetchErrorKind::DownloadFailure,
                format!("{PLUGIN_FILE} is larger than the {max_size}-byte limit"),
            ));
        }
        return Ok(module);
    }
    Err((
        FetchErrorKind::FetchFailure,
        format!("the image has no {PLUGIN_FILE} in its last layer"),
    ))
}

/// An image ready to push: blobs (config included) and the manifest.
#[derive(Debug, Clone)]
struct BuiltImage {
    /// Each blob with its digest, once each.
    blobs: Vec<(Vec<u8>, String)>,
    manifest: Vec<u8>,
    media_type: String,
}

fn build_image(module: &[u8], variant: ImageVariant) -> Result<BuiltImage, std::io::Error> {
    let descriptor = |media_type: &str, data: &[u8], title: Option<&str>| {
        let mut d = serde_json::json!({
            "mediaType": media_type,
            "digest": sha256_digest(data),
            "size": data.len(),
        });
        if let Some(title) = title {
            d["annotations"] = serde_json::json!({ TITLE_ANNOTATION: title });
        }
        d
    };
    let image_config = |tar: &[u8]| {
        serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": { "type": "layers", "diff_ids": [sha256_digest(tar)] },
        }))
        .expect("a JSON value serialises")
    };
    match variant {
        ImageVariant::Compat | ImageVariant::Docker => {
            let tar = plugin_tar(module)?;
            let layer = gzip(&tar)?;
            let config = image_config(&tar);
            let manifest = if variant == ImageVariant::Docker {
                serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": DOCKER_MANIFEST,
                    "config": descriptor(DOCKER_CONFIG, &config, None),
                    "layers": [descriptor(DOCKER_LAYER, &layer, None)],
                })
            } else {
                serde_json::json!({
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": descriptor(OCI_CONFIG, &config, None),
                    "layers": [descriptor(OCI_LAYER, &layer, None)],
                    "annotations": { VARIANT_ANNOTATION: "compat" },
                })
            };
            Ok(BuiltImage {
                manifest: serde_json::to_vec(&manifest)?,
                media_type: if variant == ImageVariant::Docker {
                    DOCKER_MANIFEST
                } else {
                    OCI_MANIFEST
                }
                .to_owned(),
                blobs: vec![
                    (config.clone(), sha256_digest(&config)),
                    (layer.clone(), sha256_digest(&layer)),
                ],
            })
        }
        ImageVariant::Artifact => {
            let config = serde_json::to_vec(&serde_json::json!({
                "type": "envoy_proxy",
                "abiVersions": ["v0.2.1"],
                "config": { "root_ids": [] },
            }))?;
            let config_descriptor = descriptor(WASM_CONFIG, &config, Some("runtime-config.json"));
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config_descriptor,
                "layers": [config_descriptor, descriptor(WASM_LAYER, module, Some(PLUGIN_FILE))],
            });
            Ok(BuiltImage {
                manifest: serde_json::to_vec(&manifest)?,
                media_type: OCI_MANIFEST.to_owned(),
                blobs: vec![
                    (config.clone(), sha256_digest(&config)),
                    (module.to_vec(), sha256_digest(module)),
                ],
            })
        }
    }
}

/// The annotation an image layout's `index.json` names (tags) each image with.
const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// An image read from an OCI image layout folder (`oci-layout`, `index.json`, `blobs/sha256/`), as
/// `wasmgate plugin build --oci` writes one: the manifest and every blob it names, each checked
/// against its descriptor's digest and size, and the image checked to be a Wasm image a pull
/// accepts (so a push never publishes what no gateway can load).
#[derive(Debug, Clone)]
pub struct LayoutImage {
    image: BuiltImage,
    /// `sha256:<hex>` of the manifest: the digest the pushed image will have.
    pub digest: String,
    pub layout: ImageLayout,
}

/// A descriptor as `index.json` and manifests write them.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutDescriptor {
    digest: String,
    size: i64,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

impl LayoutImage {
    /// Reads the image of the layout in `dir`: its only image, or when `index.json` lists several,
    /// the one named `tag` (`latest` when `None`). An unreadable file is [`FetchErrorKind::Io`];
    /// anything else wrong with the folder or the image is [`FetchErrorKind::FetchFailure`].
    pub fn read(dir: &Path, tag: Option<&str>) -> Result<Self, FetchError> {
        let source = dir.display().to_string();
        let invalid =
            |message: String| FetchError::new(&source, FetchErrorKind::FetchFailure, message);

        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Marker {
            image_layout_version: String,
        }
        let marker = read_file(dir, "oci-layout", MAX_MANIFEST_SIZE)?;
        let marker: Marker = serde_json::from_slice(&marker)
            .map_err(|e| invalid(format!("oci-layout is not an OCI image layout marker: {e}")))?;
        if !marker.image_layout_version.starts_with("1.") {
            return Err(invalid(format!(
                "image layout version {:?} is not supported (want 1.x)",
                marker.image_layout_version
            )));
        }

        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<LayoutDescriptor>,
        }
        let index = read_file(dir, "index.json", MAX_MANIFEST_SIZE)?;
        let index: Index = serde_json::from_slice(&index)
            .map_err(|e| invalid(format!("index.json is not an image index: {e}")))?;
        let chosen = match index.manifests.as_slice() {
            [] => return Err(invalid("index.json lists no image".into())),
            [only] => only,
            several => {
                let tag = tag.unwrap_or("latest");
                let name = |d: &LayoutDescriptor| d.annotations.get(REF_NAME_ANNOTATION).cloned();
                several
                    .iter()
                    .find(|d| name(d).as_deref() == Some(tag))
                    .ok_or_else(|| {
                        let names: Vec<String> = several
                            .iter()
                            .map(|d| name(d).unwrap_or_else(|| d.digest.clone()))
                            .collect();
                        invalid(format!(
                            "index.json lists {} images and none is named {tag:?} (by {REF_NAME_ANNOTATION}): {}; push to that tag",
                            several.len(),
                            names.join(", ")
                        ))
                    })?
            }
        };
        let manifest = read_blob(dir, chosen, MAX_MANIFEST_SIZE)?;
        let (media_type, layout, module_layer) = detect_layout(&manifest).map_err(&invalid)?;

        #[derive(serde::Deserialize)]
        struct Parts {
            config: Option<LayoutDescriptor>,
            #[serde(default)]
            layers: Vec<LayoutDescriptor>,
        }
        let parts: Parts = serde_json::from_slice(&manifest)
            .map_err(|e| invalid(format!("the manifest's config or layers: {e}")))?;
        let mut blobs: Vec<(Vec<u8>, String)> = Vec::new();
        // An artifact lists its config as a layer too: upload it once.
        for descriptor in parts.config.iter().chain(&parts.layers) {
            let digest = descriptor.digest.to_ascii_lowercase();
            if blobs.iter().all(|(_, seen)| *seen != digest) {
                blobs.push((read_blob(dir, descriptor, crate::DEFAULT_MAX_SIZE)?, digest));
            }
        }
        let module_blob = blobs
            .iter()
            .find(|(_, digest)| *digest == module_layer.digest)
            .map(|(data, _)| data.as_slice())
            .unwrap_or_default();
        match layout {
            ImageLayout::Artifact if !crate::unbox::is_wasm(module_blob) => {
                return Err(invalid(format!(
                    "the Wasm layer {} is not a Wasm module: {}",
                    module_layer.digest,
                    crate::unbox::describe_non_wasm(module_blob)
                )));
            }
            ImageLayout::Artifact => {}
            ImageLayout::Docker | ImageLayout::OciCompat => {
                extract_plugin(module_blob, crate::DEFAULT_MAX_SIZE)
                    .map_err(|(_, message)| invalid(message))?;
            }
        }
        Ok(Self {
            digest: sha256_digest(&manifest),
            image: BuiltImage {
                blobs,
                manifest,
                media_type,
            },
            layout,
        })
    }
}

/// `dir/name`, refused above `cap` bytes.
fn read_file(dir: &Path, name: &str, cap: usize) -> Result<Vec<u8>, FetchError> {
    let path = dir.join(name);
    let fail = |kind, message: String| FetchError::new(dir.display().to_string(), kind, message);
    let file = std::fs::File::open(&path)
        .map_err(|e| fail(FetchErrorKind::Io, format!("cannot read {name}: {e}")))?;
    let mut data = Vec::new();
    file.take(cap as u64 + 1)
        .read_to_end(&mut data)
        .map_err(|e| fail(FetchErrorKind::Io, format!("cannot read {name}: {e}")))?;
    if data.len() > cap {
        return Err(fail(
            FetchErrorKind::FetchFailure,
            format!("{name} is larger than {cap} bytes"),
        ));
    }
    Ok(data)
}

/// The blob `descriptor` names, from `dir/blobs/sha256/`, checked against its size and digest.
fn read_blob(dir: &Path, descriptor: &LayoutDescriptor, cap: usize) -> Result<Vec<u8>, FetchError> {
    let invalid = |message: String| {
        FetchError::new(
            dir.display().to_string(),
            FetchErrorKind::FetchFailure,
            message,
        )
    };
    let digest = descriptor.digest.to_ascii_lowercase();
    // Checked before it becomes a path: a digest is also a file name here.
    let Some(hex) = digest
        .strip_prefix("sha256:")
        .filter(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        return Err(invalid(format!(
            "digest {:?} is not sha256:<64 hex digits>",
            descriptor.digest
        )));
    };
    let size = usize::try_from(descriptor.size)
        .map_err(|_| invalid(format!("blob {digest} has a bad size {}", descriptor.size)))?;
    if size > cap {
        return Err(invalid(format!(
            "blob {digest} is {size} bytes, above the {cap}-byte limit"
        )));
    }
    let data = read_file(dir, &format!("blobs/sha256/{hex}"), cap)?;
    if data.len() != size {
        return Err(invalid(format!(
            "blob {digest} is {} bytes, its descriptor says {size}",
            data.len()
        )));
    }
    let actual = sha256_digest(&data);
    if actual != digest {
        return Err(invalid(format!(
            "blob blobs/sha256/{hex} does not match its digest: its content is {actual}"
        )));
    }
    Ok(data)
}

/// A tar holding `module` as `plugin.wasm`, reproducibly (no times, no owners).
pub(crate) fn plugin_tar(module: &[u8]) -> Result<Vec<u8>, std::io::Error> {
    tar_of(&[(PLUGIN_FILE, module)])
}

/// A tar of regular files, reproducibly.
pub(crate) fn tar_of(files: &[(&str, &[u8])]) -> Result<Vec<u8>, std::io::Error> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, name, *data)?;
    }
    builder.into_inner()
}

pub(crate) fn gzip(data: &[u8]) -> Result<Vec<u8>, std::io::Error> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data)?;
    encoder.finish()
}

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// `host` and port of a registry as oci-client addresses it (`host`, `host:port`, `[v6]:port`).
fn host_port(registry: &str, insecure: bool) -> (String, u16) {
    let default = if insecure { 80 } else { 443 };
    if let Some(rest) = registry.strip_prefix('[')
        && let Some((host, after)) = rest.split_once(']')
    {
        let port = after
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(default);
        return (format!("[{host}]"), port);
    }
    match registry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host.to_owned(), port),
            Err(_) => (registry.to_owned(), default),
        },
        _ => (registry.to_owned(), default),
    }
}

/// The `realm` of a `Bearer` challenge in a `WWW-Authenticate` value, unquoted.
fn bearer_realm(challenge: &str) -> Option<String> {
    bearer_param(challenge, "realm")
}

/// A parameter (`realm`, `service`) of a Bearer `WWW-Authenticate` challenge.
fn bearer_param(challenge: &str, wanted: &str) -> Option<String> {
    let (scheme, params) = challenge.trim().split_once(char::is_whitespace)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut rest = params.trim_start();
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=')?;
        let name = name.trim().trim_start_matches(',').trim();
        let after = after.trim_start();
        let (value, remainder) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next().map(|(_, c)| c)),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        if name.eq_ignore_ascii_case(wanted) {
            return Some(value);
        }
        rest = remainder.trim_start().trim_start_matches(',').trim_start();
    }
    None
}

/// The codes of a registry's error envelope (`{"errors":[{"code":"MANIFEST_UNKNOWN",...}]}`) with
/// their messages, as registries document them; empty when the body is not one.
fn error_codes(body: &[u8]) -> String {
    let Ok(envelope) = serde_json::from_slice::<serde_json::Value>(body) else {
        return String::new();
    };
    let errors = envelope["errors"].as_array().cloned().unwrap_or_default();
    let codes: Vec<String> = errors
        .iter()
        .map(|e| {
            let code = e["code"].as_str().unwrap_or("UNKNOWN");
            match e["message"].as_str() {
                Some(message) => format!("{code}: {message}"),
                None => code.to_owned(),
            }
        })
        .collect();
    codes.join("; ")
}

/// An error and its sources, without repeating a source its parent already quoted.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// A registry's error body, cut to a readable length.
fn short(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

/// A writer for oci-client's blob download that refuses to grow past a limit.
struct CappedBuffer {
    data: Vec<u8>,
    cap: usize,
    exceeded: bool,
    /// Told of each write: bytes so far and the expected total.
    progress: Option<(crate::ProgressFn, u64)>,
}

impl CappedBuffer {
    fn new(cap: usize) -> Self {
        Self {
            data: Vec::new(),
            cap,
            exceeded: false,
            progress: None,
        }
    }
}

impl tokio::io::AsyncWrite for CappedBuffer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.data.len().saturating_add(buf.len()) > self.cap {
            self.exceeded = true;
            return Poll::Ready(Err(std::io::Error::other(
                "the blob is larger than the size limit",
            )));
        }
        self.data.extend_from_slice(buf);
        if let Some((progress, total)) = &self.progress {
            (progress.0)(self.data.len() as u64, Some(*total));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(media_type: Option<&str>, layers: &[&str]) -> Vec<u8> {
        let layers: Vec<_> = layers
            .iter()
            .enumerate()
            .map(|(i, t)| {
                serde_json::json!({"mediaType": t, "digest": format!("sha256:{:064x}", i), "size": 10})
            })
            .collect();
        let mut m = serde_json::json!({"schemaVersion": 2, "layers": layers});
        if let Some(t) = media_type {
            m["mediaType"] = t.into();
        }
        serde_json::to_vec(&m).unwrap()
    }

    #[test]
    fn detects_layouts_in_istio_order() {
        let detect =
            |t, l: &[&str]| detect_layout(&manifest(t, l)).map(|(_, layout, b)| (layout, b.digest));
        let d = |i: u32| format!("sha256:{i:064x}");
        assert_eq!(
            detect(Some(DOCKER_MANIFEST), &[DOCKER_LAYER]).unwrap(),
            (ImageLayout::Docker, d(0))
        );
        assert_eq!(
            detect(Some(DOCKER_MANIFEST), &[DOCKER_LAYER, DOCKER_LAYER]).unwrap(),
            (ImageLayout::Docker, d(1))
        );
        assert_eq!(
            detect(Some(OCI_MANIFEST), &[OCI_LAYER]).unwrap(),
            (ImageLayout::OciCompat, d(0))
        );
        assert_eq!(
            detect(None, &[OCI_LAYER]).unwrap(),
            (ImageLayout::OciCompat, d(0))
        );
        assert_eq!(
            detect(Some(OCI_MANIFEST), &[WASM_CONFIG, WASM_LAYER]).unwrap(),
            (ImageLayout::Artifact, d(1))
        );
        for (t, layers, reason) in [
            (
                Some(DOCKER_MANIFEST),
                &[OCI_LAYER][..],
                "last layer is application/vnd.oci",
            ),
            (Some(OCI_MANIFEST), &[WASM_LAYER], "not a Wasm image layout"),
            (
                Some(OCI_MANIFEST),
                &[WASM_CONFIG, WASM_LAYER, WASM_LAYER],
                "exactly 2 layers",
            ),
            (Some(OCI_MANIFEST), &[WASM_TO_OCI_LAYER], "wasm-to-oci"),
            (Some(OCI_MANIFEST), &[], "no layers"),
            (Some(OCI_INDEX), &[], "index"),
            (
                Some("text/plain"),
                &[OCI_LAYER],
                "text/plain is not a Wasm image layout",
            ),
        ] {
            let error = detect(t, layers).unwrap_err();
            assert!(error.contains(reason), "{t:?} {layers:?}: {error}");
        }
        let bad_digest = br#"{"schemaVersion":2,"layers":[{"mediaType":"x","digest":"sha256:../../etc","size":1}]}"#;
        assert!(
            detect_layout(bad_digest)
                .unwrap_err()
                .contains("not sha256")
        );
        assert!(
            detect_layout(b"{\"schemaVersion\":1}")
                .unwrap_err()
                .contains("schemaVersion")
        );
    }

    #[test]
    fn extracts_plugin_wasm_and_enforces_the_cap() {
        let module = b"\0asm\x01\0\0\0";
        let layer = gzip(
            &tar_of(&[
                ("runtime-config.json", b"{}"),
                ("./dir/plugin.wasm", module),
            ])
            .unwrap(),
        )
        .unwrap();
        assert_eq!(extract_plugin(&layer, 1024).unwrap(), module);
        let (kind, message) = extract_plugin(&layer, 4).unwrap_err();
        assert_eq!(kind, FetchErrorKind::DownloadFailure, "{message}");
        assert!(message.contains("limit"), "{message}");
        let other = gzip(&tar_of(&[("other.wasm", module)]).unwrap()).unwrap();
        let (kind, message) = extract_plugin(&other, 1024).unwrap_err();
        assert_eq!(kind, FetchErrorKind::FetchFailure);
        assert!(message.contains("no plugin.wasm"), "{message}");
        let (kind, message) = extract_plugin(module, 1024).unwrap_err();
        assert_eq!(kind, FetchErrorKind::FetchFailure);
        assert!(message.contains("gzip"), "{message}");
    }

    #[test]
    fn reads_the_realm_of_a_bearer_challenge() {
        assert_eq!(
            bearer_realm(r#"Bearer realm="https://auth.example/token",service="registry""#)
                .as_deref(),
            Some("https://auth.example/token")
        );
        assert_eq!(
            bearer_realm(r#"bearer service="r", realm="http://169.254.169.254/t\"x""#).as_deref(),
            Some(r#"http://169.254.169.254/t"x"#)
        );
        assert_eq!(
            bearer_realm("Bearer realm=http://h/t, scope=x").as_deref(),
            Some("http://h/t")
        );
        assert_eq!(bearer_realm(r#"Basic realm="registry""#), None);
        assert_eq!(bearer_realm(r#"Bearer service="r""#), None);
    }

    #[tokio::test]
    async fn capped_buffer_refuses_to_grow_past_its_limit() {
        use tokio::io::AsyncWriteExt as _;
        let mut buffer = CappedBuffer::new(4);
        buffer.write_all(b"abcd").await.unwrap();
        assert!(buffer.write_all(b"e").await.is_err());
        assert!(buffer.exceeded);
        assert_eq!(buffer.data, b"abcd");
    }

    #[test]
    fn splits_registry_host_and_port() {
        assert_eq!(
            host_port("127.0.0.1:5000", false),
            ("127.0.0.1".into(), 5000)
        );
        assert_eq!(host_port("ghcr.io", false), ("ghcr.io".into(), 443));
        assert_eq!(host_port("r.local", true), ("r.local".into(), 80));
        assert_eq!(host_port("[::1]:5000", false), ("[::1]".into(), 5000));
        assert_eq!(host_port("[::1]", false), ("[::1]".into(), 443));
    }

    /// Writes `image` as an OCI image layout in `dir`, its manifest listed under `index_digest`.
    fn write_layout(dir: &Path, image: &BuiltImage, index_digest: &str) {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        for (data, digest) in &image.blobs {
            std::fs::write(blobs.join(&digest["sha256:".len()..]), data).unwrap();
        }
        let digest = sha256_digest(&image.manifest);
        std::fs::write(blobs.join(&digest["sha256:".len()..]), &image.manifest).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": image.media_type,
                "digest": index_digest,
                "size": image.manifest.len(),
            }],
        });
        std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    }

    #[test]
    fn layout_images_are_read_whole_and_checked() {
        let module = b"\0asm\x01\0\0\0".to_vec();
        for (variant, layout) in [
            (ImageVariant::Compat, ImageLayout::OciCompat),
            (ImageVariant::Docker, ImageLayout::Docker),
            (ImageVariant::Artifact, ImageLayout::Artifact),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let built = build_image(&module, variant).unwrap();
            write_layout(dir.path(), &built, &sha256_digest(&built.manifest));
            let read = LayoutImage::read(dir.path(), Some("v1")).unwrap();
            assert_eq!(read.layout, layout);
            assert_eq!(read.digest, sha256_digest(&built.manifest));
            assert_eq!(read.image.manifest, built.manifest);
            assert_eq!(read.image.media_type, built.media_type);
            assert_eq!(read.image.blobs, built.blobs);
        }

        let dir = tempfile::tempdir().unwrap();
        let built = build_image(&module, ImageVariant::Compat).unwrap();
        // A digest is a file name in the layout: one that is a path never becomes one.
        write_layout(dir.path(), &built, "sha256:../../../../etc/passwd");
        let error = LayoutImage::read(dir.path(), None).unwrap_err();
        assert_eq!(error.kind, FetchErrorKind::FetchFailure);
        assert!(
            error.message.contains("is not sha256:<64 hex digits>"),
            "{error}"
        );

        std::fs::remove_file(dir.path().join("oci-layout")).unwrap();
        let error = LayoutImage::read(dir.path(), None).unwrap_err();
        assert_eq!(error.kind, FetchErrorKind::Io);
        assert!(error.message.contains("cannot read oci-layout"), "{error}");

        // A layer that is not what the manifest promises: a compat layer without plugin.wasm.
        let dir = tempfile::tempdir().unwrap();
        let mut built = build_image(&module, ImageVariant::Compat).unwrap();
        let empty = gzip(&tar_of(&[("other.txt", b"x".as_slice())]).unwrap()).unwrap();
        let layer = &built.blobs[1].1;
        let manifest = String::from_utf8(built.manifest.clone())
            .unwrap()
            .replace(layer.as_str(), &sha256_digest(&empty))
            .replace(
                &format!("\"size\":{}", built.blobs[1].0.len()),
                &format!("\"size\":{}", empty.len()),
            );
        built.manifest = manifest.into_bytes();
        built.blobs[1] = (empty.clone(), sha256_digest(&empty));
        write_layout(dir.path(), &built, &sha256_digest(&built.manifest));
        let error = LayoutImage::read(dir.path(), None).unwrap_err();
        assert!(error.message.contains("no plugin.wasm"), "{error}");
    }
}
