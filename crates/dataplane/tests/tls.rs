//! TLS on both sides: listener termination (HTTP/1.1 and HTTP/2 by ALPN, what plugins see,
//! start-up errors, bad clients) and upstream TLS per cluster (CA file, SNI, webpki roots,
//! insecure mode). The PKI is made at test time with rcgen.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use wasmgate_dataplane::*;
use wasmgate_runtime::Runtime;

/// A test CA and a server certificate it signed, for `localhost`, `127.0.0.1` and
/// `upstream.test`, written as PEM files to a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca_file: PathBuf,
    /// The server certificate followed by the CA: a chain, leaf first.
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "wasmgate test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "upstream.test".to_string(),
    ])
    .unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    let cert_file = dir.path().join("cert.pem");
    let key_file = dir.path().join("key.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    std::fs::write(&cert_file, format!("{}{}", cert.pem(), ca.pem())).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    Pki {
        dir,
        ca_file,
        cert_file,
        key_file,
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Pki {
    fn files(&self) -> TlsFiles {
        TlsFiles {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
        }
    }

    /// A TLS server for a test upstream, offering `h2` and `http/1.1`.
    fn acceptor(&self) -> TlsAcceptor {
        let certs = CertificateDer::pem_file_iter(&self.cert_file)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&self.key_file).unwrap();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(config))
    }

    /// A client trusting the test CA that connects to any address under the name `localhost`.
    /// `all_versions` offers `h2` and `http/1.1` by ALPN; otherwise only HTTP/1.1 is spoken.
    fn client(&self, all_versions: bool) -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca_file).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let builder = HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_only()
            .with_server_name_resolver(FixedServerNameResolver::new(
                ServerName::try_from("localhost").unwrap(),
            ));
        let connector = if all_versions {
            builder.enable_all_versions().build()
        } else {
            builder.enable_http1().build()
        };
        Client::builder(TokioExecutor::new()).build(connector)
    }
}

fn get(address: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().uri(format!("https://{address}{path}"));
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    builder.body(Full::new(Bytes::new())).unwrap()
}

fn plain_get(address: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(format!("http://{address}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

async fn send<C>(
    client: &Client<C, Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> (http::response::Parts, Bytes)
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let response = client.request(request).await.expect("the gateway answers");
    let (parts, body) = response.into_parts();
    (parts, body.collect().await.unwrap().to_bytes())
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

/// A gateway with a TLS listener (the `main` one) routing `/` to `upstream`.
fn tls_gateway(
    pki: &Pki,
    upstream: SocketAddr,
    runtime: Arc<Runtime>,
    filters: Vec<FilterSpec>,
    limits: Limits,
) -> Gateway {
    let spec = GatewaySpec {
        workers: 1,
        listeners: vec![ListenerSpec {
            tls: Some(pki.files()),
            ..listener(vec![route("/", "upstream")], filters, limits)
        }],
        clusters: vec![cluster("upstream", upstream)],
    };
    Gateway::start(runtime, spec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_over_tls_reaches_a_plain_upstream() {
    let pki = pki();
    let up = upstream().await;
    let gw = tls_gateway(&pki, up.address, runtime(), vec![], Limits::default());
    let client = pki.client(false);
    for _ in 0..2 {
        let (parts, body) = send(&client, get(gw.address, "/hello", &[])).await;
        assert_eq!(parts.status, 200);
        assert_eq!(parts.version, http::Version::HTTP_11);
        assert_eq!(parts.headers["x-upstream-secret"], "s3cret");
        assert!(body.is_empty());
    }
    let seen = up.seen.lock().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].path, "/hello");
    assert_eq!(seen[0].headers["x-forwarded-proto"], "https");
    assert_eq!(
        seen[0].version,
        http::Version::HTTP_11,
        "the upstream side is unchanged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_negotiated_by_alpn() {
    let pki = pki();
    let up = upstream().await;
    let gw = tls_gateway(&pki, up.address, runtime(), vec![], Limits::default());
    // The client offers both; the gateway picks h2.
    let (parts, _) = send(&pki.client(true), get(gw.address, "/h2", &[])).await;
    assert_eq!(parts.status, 200);
    assert_eq!(parts.version, http::Version::HTTP_2);
    let seen = up.seen.lock().last().cloned().unwrap();
    assert_eq!(seen.path, "/h2");
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_see_https_the_tls_version_and_the_sni() {
    let pki = pki();
    let up = upstream().await;
    let runtime = runtime();
    let gw = tls_gateway(
        &pki,
        up.address,
        runtime.clone(),
        vec![kitchen(&runtime)],
        Limits::default(),
    );
    for all_versions in [false, true] {
        let client = pki.client(all_versions);
        for (property, expected) in [
            ("request.scheme", "https"),
            ("connection.tls_version", "TLSv1.3"),
            ("connection.requested_server_name", "localhost"),
        ] {
            let (parts, _) = send(
                &client,
                get(
                    gw.address,
                    "/property",
                    &[("x-mode", "property"), ("x-property-path", property)],
                ),
            )
            .await;
            assert_eq!(parts.status, 200);
            let seen = up.seen.lock().last().cloned().unwrap();
            assert_eq!(
                seen.headers["x-kitchen-property"],
                hex(expected).as_str(),
                "{property} over {:?}",
                parts.version
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_or_key_files_stop_start_up() {
    let pki = pki();
    let garbage = pki.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a pem file\n").unwrap();
    let other_key = pki.dir.path().join("other-key.pem");
    std::fs::write(&other_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
    let missing = pki.dir.path().join("missing.pem");
    let cases: [(TlsFiles, &Path, &str); 4] = [
        (
            TlsFiles {
                key_file: garbage.clone(),
                ..pki.files()
            },
            &garbage,
            "no private key",
        ),
        (
            TlsFiles {
                key_file: other_key.clone(),
                ..pki.files()
            },
            &other_key,
            "does not fit the certificate",
        ),
        (
            TlsFiles {
                cert_file: garbage.clone(),
                ..pki.files()
            },
            &garbage,
            "no certificate",
        ),
        (
            TlsFiles {
                cert_file: missing.clone(),
                ..pki.files()
            },
            &missing,
            "No such file",
        ),
    ];
    for (files, at_fault, reason) in cases {
        let spec = GatewaySpec {
            workers: 1,
            listeners: vec![ListenerSpec {
                name: "secure".into(),
                tls: Some(files),
                ..listener(vec![], vec![], Limits::default())
            }],
            clusters: vec![],
        };
        let Err(error) = start(runtime(), spec, Arc::new(GatewayStats::default())) else {
            panic!("started with a bad file: {}", at_fault.display());
        };
        let message = error.to_string();
        assert!(
            matches!(&error, StartError::ListenerTls { listener, file, .. }
                if listener == "secure" && file == at_fault),
            "{message}"
        );
        assert!(message.contains("listener secure"), "{message}");
        assert!(
            message.contains(&at_fault.display().to_string()),
            "{message}"
        );
        assert!(message.contains(reason), "{message}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_do_not_break_the_listener() {
    let pki = pki();
    let up = upstream().await;
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let gw = tls_gateway(&pki, up.address, runtime(), vec![], limits);
    // Plain HTTP instead of a client hello: the handshake fails and the connection closes.
    let mut stream = tokio::net::TcpStream::connect(gw.address).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection")
        .ok();
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    // Random bytes.
    let mut stream = tokio::net::TcpStream::connect(gw.address).await.unwrap();
    stream.write_all(&[0xde; 300]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection")
        .ok();
    // A client that says nothing is dropped after the header-read timeout.
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(gw.address).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut answer))
        .await
        .expect("the handshake times out")
        .ok();
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(answer.is_empty());
    // The listener (one worker) still serves.
    let (parts, _) = send(&pki.client(false), get(gw.address, "/after", &[])).await;
    assert_eq!(parts.status, 200);
    assert_eq!(
        up.seen.lock().len(),
        1,
        "only the good request went through"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_per_cluster() {
    let pki = pki();
    let secure = tls_upstream(pki.acceptor()).await;
    let tls_cluster = |name: &str, http2: bool, tls: UpstreamTls| ClusterSpec {
        http2,
        tls: Some(tls),
        ..cluster(name, secure.address)
    };
    let with_ca = UpstreamTls {
        ca_file: Some(pki.ca_file.clone()),
        ..UpstreamTls::default()
    };
    let clusters = vec![
        tls_cluster("ca", false, with_ca.clone()),
        tls_cluster("ca_h2", true, with_ca.clone()),
        tls_cluster(
            "sni",
            false,
            UpstreamTls {
                sni: Some("upstream.test".into()),
                ..with_ca.clone()
            },
        ),
        tls_cluster(
            "wrong_sni",
            false,
            UpstreamTls {
                sni: Some("elsewhere.test".into()),
                ..with_ca.clone()
            },
        ),
        tls_cluster("webpki", false, UpstreamTls::default()),
        tls_cluster(
            "insecure",
            true,
            UpstreamTls {
                insecure_skip_verify: true,
                ..UpstreamTls::default()
            },
        ),
    ];
    let routes = clusters
        .iter()
        .map(|c| route(&format!("/{}/", c.name), &c.name))
        .collect();
    let spec = GatewaySpec {
        workers: 1,
        listeners: vec![listener(routes, vec![], Limits::default())],
        clusters,
    };
    let gw = Gateway::start(runtime(), spec);
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    /// The version and SNI the upstream saw, or `None` when it saw nothing.
    type Saw<'a> = Option<(http::Version, Option<&'a str>)>;
    let cases: [(&str, u16, Saw<'_>); 6] = [
        ("ca", 200, Some((http::Version::HTTP_11, None))),
        ("ca_h2", 200, Some((http::Version::HTTP_2, None))),
        (
            "sni",
            200,
            Some((http::Version::HTTP_11, Some("upstream.test"))),
        ),
        ("wrong_sni", 503, None),
        ("webpki", 503, None),
        ("insecure", 200, Some((http::Version::HTTP_2, None))),
    ];
    for (name, status, expected) in cases {
        let before = secure.seen.lock().len();
        let path = format!("/{name}/x");
        let (parts, body) = send(&client, plain_get(gw.address, &path)).await;
        assert_eq!(
            parts.status,
            status,
            "{name}: {}",
            String::from_utf8_lossy(&body)
        );
        let seen = secure.seen.lock().clone();
        match expected {
            Some((version, sni)) => {
                let last = seen.last().unwrap();
                assert_eq!(last.path, path);
                assert_eq!(
                    (last.version, last.sni.as_deref()),
                    (version, sni),
                    "{name}"
                );
            }
            None => {
                assert_eq!(seen.len(), before, "{name}: the upstream saw no request");
                let body = String::from_utf8_lossy(&body);
                assert!(body.contains("upstream connect error"), "{name}: {body}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_upstream_tls_settings_stop_start_up() {
    let pki = pki();
    let garbage = pki.dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a pem file\n").unwrap();
    let spec = |tls: UpstreamTls| GatewaySpec {
        workers: 1,
        listeners: vec![],
        clusters: vec![ClusterSpec {
            tls: Some(tls),
            ..cluster("secure", "127.0.0.1:1".parse().unwrap())
        }],
    };
    let Err(error) = start(
        runtime(),
        spec(UpstreamTls {
            ca_file: Some(garbage.clone()),
            ..UpstreamTls::default()
        }),
        Arc::new(GatewayStats::default()),
    ) else {
        panic!("started with a CA file that holds no certificate");
    };
    let message = error.to_string();
    assert!(
        matches!(&error, StartError::ClusterTls { cluster, file: Some(file), .. }
            if cluster == "secure" && file == &garbage),
        "{message}"
    );
    assert!(
        message.contains(&garbage.display().to_string()) && message.contains("no certificate"),
        "{message}"
    );
    let Err(error) = start(
        runtime(),
        spec(UpstreamTls {
            sni: Some("not a name!".into()),
            ..UpstreamTls::default()
        }),
        Arc::new(GatewayStats::default()),
    ) else {
        panic!("started with an invalid SNI");
    };
    assert!(
        error.to_string().contains("cluster secure") && error.to_string().contains("sni"),
        "{error}"
    );
}
