//! A real registry for the OCI tests: Debian's `docker-registry` (distribution 2.8) serving on
//! 127.0.0.1 from a temporary directory, in plain HTTP, htpasswd or TLS mode. Killed on drop.

// Each test binary that declares `mod common` compiles this; not all of them use all of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the binary is; `WASMGATE_DOCKER_REGISTRY` overrides.
const DEFAULT_BINARY: &str = "/usr/bin/docker-registry";
const READY_WITHIN: Duration = Duration::from_secs(30);
const START_ATTEMPTS: usize = 5;

/// How the registry is reached.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Plain HTTP, anonymous.
    Plain,
    /// Plain HTTP, HTTP Basic against an htpasswd file holding one user.
    Htpasswd { username: String, password: String },
    /// HTTPS with a certificate for 127.0.0.1 and localhost signed by a fresh test CA.
    Tls,
    /// Plain HTTP with Docker's token authentication: clients get a Bearer token from `realm`,
    /// whose JWTs are signed by the key of `root_cert_pem`.
    Token {
        realm: String,
        service: String,
        issuer: String,
        root_cert_pem: String,
    },
    /// Plain HTTP, anonymous, answering blob downloads with a redirect to `base_url` (the
    /// registry's `redirect` storage middleware, as a registry on S3 or GCS redirects to them).
    RedirectingBlobs { base_url: String },
}

pub struct TestRegistry {
    child: Child,
    /// `127.0.0.1:PORT`, as references write it.
    pub address: String,
    /// The test CA (PEM) in TLS mode.
    pub ca_pem: Option<Vec<u8>>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestRegistry {
    /// Starts a registry and returns once `GET /v2/` answers.
    pub async fn start(mode: Mode) -> Self {
        let binary = binary();
        let mut last_log = String::new();
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(&binary, &mode).await {
                Ok(registry) => return registry,
                Err(Collision(log)) => last_log = log,
            }
        }
        panic!(
            "docker-registry could not get a free port in {START_ATTEMPTS} tries; last log:\n{last_log}"
        );
    }

    async fn try_start(binary: &Path, mode: &Mode) -> Result<Self, Collision> {
        let dir = tempfile::tempdir().expect("temporary directory");
        let port = free_port();
        let address = format!("127.0.0.1:{port}");
        let mut extra = String::new();
        let mut ca_pem = None;
        match mode {
            Mode::Plain => {}
            Mode::Htpasswd { username, password } => {
                let hash = bcrypt::hash_with_result(password, 4)
                    .expect("bcrypt hash")
                    .format_for_version(bcrypt::Version::TwoY);
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, format!("{username}:{hash}\n")).expect("write htpasswd");
                extra.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: wasmgate-test\n    path: {}\n",
                    path.display()
                ));
            }
            Mode::Token {
                realm,
                service,
                issuer,
                root_cert_pem,
            } => {
                let path = dir.path().join("token-issuer.pem");
                std::fs::write(&path, root_cert_pem).expect("write the token issuer's certificate");
                extra.push_str(&format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
                    path.display()
                ));
            }
            Mode::RedirectingBlobs { base_url } => {
                extra.push_str(&format!(
                    "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: {base_url}\n"
                ));
            }
            Mode::Tls => {
                let (ca, cert, key) = test_pki();
                let cert_path = dir.path().join("server.pem");
                let key_path = dir.path().join("server-key.pem");
                std::fs::write(&cert_path, cert).expect("write cert");
                std::fs::write(&key_path, key).expect("write key");
                extra.push_str(&format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    cert_path.display(),
                    key_path.display()
                ));
                ca_pem = Some(ca.into_bytes());
            }
        }
        // `http.tls` must sit under `http:`, `auth` at the top: keep the TLS lines right after it.
        let (http_extra, top_extra) = if matches!(mode, Mode::Tls) {
            (extra, String::new())
        } else {
            (String::new(), extra)
        };
        let config = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {address}\n  secret: wasmgate-test-secret\n{http_extra}\
             {top_extra}",
            root = dir.path().join("data").display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write registry config");
        let log = dir.path().join("registry.log");
        let log_file = std::fs::File::create(&log).expect("create log");
        let child = Command::new(binary)
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log handle"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut registry = TestRegistry {
            child,
            address,
            ca_pem,
            log,
            _dir: dir,
        };
        registry.wait_ready().await?;
        Ok(registry)
    }

    /// Polls `GET /v2/` until any HTTP answer (200, or 401 with auth on).
    async fn wait_ready(&mut self) -> Result<(), Collision> {
        wasmgate_crypto();
        let mut builder = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2));
        let scheme = match &self.ca_pem {
            Some(ca) => {
                let ca = reqwest::Certificate::from_pem(ca).expect("CA PEM");
                builder = builder.tls_certs_merge([ca]);
                "https"
            }
            None => "http",
        };
        let client = builder.build().expect("readiness client");
        let url = format!("{scheme}://{}/v2/", self.address);
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("poll registry") {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                if log.contains("address already in use") {
                    return Err(Collision(log));
                }
                panic!("docker-registry exited ({status}) before answering; its log:\n{log}");
            }
            if client.get(&url).send().await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > READY_WITHIN {
                panic!(
                    "docker-registry did not answer {url} within {READY_WITHIN:?}; its log:\n{}",
                    self.log()
                );
            }
            // Polling interval, not a wait for readiness: the loop ends on the first answer.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The registry's log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The registry exited because its port was taken meanwhile.
struct Collision(String);

fn binary() -> PathBuf {
    let path = std::env::var_os("WASMGATE_DOCKER_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BINARY));
    assert!(
        path.is_file(),
        "the OCI tests need a real registry: {} is missing. Run scripts/test.sh, which installs it \
         (apt-get install -y docker-registry), or set WASMGATE_DOCKER_REGISTRY to the binary",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

fn wasmgate_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A fresh CA and a server certificate for 127.0.0.1 and localhost: (CA PEM, cert PEM, key PEM).
fn test_pki() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "wasmgate test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .expect("server params");
    params
        .distinguished_name
        .push(DnType::CommonName, "wasmgate test registry");
    let cert = params.signed_by(&key, &ca, &ca_key).expect("server cert");
    (ca.pem(), cert.pem(), key.serialize_pem())
}
