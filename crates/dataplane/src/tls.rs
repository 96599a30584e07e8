//! TLS on both sides, with rustls on the `ring` provider: listener termination from PEM files
//! (ALPN `h2` and `http/1.1`) and per-cluster upstream TLS. Everything is loaded once at start-up,
//! before any worker starts, so a bad file stops start-up with the listener or cluster named.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_rustls::{DefaultServerNameResolver, FixedServerNameResolver, ResolveServerName};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, ProtocolVersion, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::server::StartError;
use crate::spec::{ClusterSpec, ListenerSpec, TlsFiles, UpstreamTls};

/// Always `ring`, never the process default: another crate in the binary may enable another
/// provider, and then rustls could not pick one by itself.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls server configuration of a listener, or `None` for plain HTTP.
pub(crate) fn listener_config(
    listener: &ListenerSpec,
) -> Result<Option<Arc<ServerConfig>>, StartError> {
    let Some(files) = &listener.tls else {
        return Ok(None);
    };
    let error = |file: &Path, reason: String| StartError::ListenerTls {
        listener: listener.name.clone(),
        file: file.to_owned(),
        reason,
    };
    let TlsFiles {
        cert_file,
        key_file,
    } = files;
    let certs = read_certificates(cert_file).map_err(|reason| error(cert_file, reason))?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        error(
            key_file,
            match e {
                rustls_pki_types::pem::Error::NoItemsFound => {
                    "no private key found (expected a PEM PKCS#8, PKCS#1 or SEC1 key)".into()
                }
                other => format!("reading the private key: {other}"),
            },
        )
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error(cert_file, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            error(
                key_file,
                format!(
                    "the key does not fit the certificate in {}: {e}",
                    cert_file.display()
                ),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// Every certificate in a PEM file, in order; at least one.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("reading certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate found (expected PEM `CERTIFICATE` sections)".into());
    }
    Ok(certs)
}

/// What a cluster's connector needs: the client configuration (ALPN is set by the caller) and
/// the name the upstream certificate is checked against.
#[derive(Clone)]
pub(crate) struct ClusterTls {
    pub config: Arc<ClientConfig>,
    pub server_name: Arc<dyn ResolveServerName + Send + Sync>,
}

/// The TLS settings of a cluster, or `None` for plain HTTP.
pub(crate) fn cluster_config(cluster: &ClusterSpec) -> Result<Option<ClusterTls>, StartError> {
    let Some(tls) = &cluster.tls else {
        return Ok(None);
    };
    let error = |file: Option<&PathBuf>, reason: String| StartError::ClusterTls {
        cluster: cluster.name.clone(),
        file: file.cloned(),
        reason,
    };
    let UpstreamTls {
        sni,
        ca_file,
        insecure_skip_verify,
    } = tls;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error(None, e.to_string()))?;
    let mut config = if *insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        match ca_file {
            Some(path) => {
                for cert in read_certificates(path).map_err(|r| error(Some(path), r))? {
                    roots
                        .add(cert)
                        .map_err(|e| error(Some(path), format!("a CA certificate: {e}")))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = if cluster.http2 {
        vec![b"h2".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let server_name: Arc<dyn ResolveServerName + Send + Sync> = match sni {
        Some(name) => {
            let name = ServerName::try_from(name.clone())
                .map_err(|e| error(None, format!("sni {name:?}: {e}")))?;
            Arc::new(FixedServerNameResolver::new(name))
        }
        None => Arc::new(DefaultServerNameResolver::default()),
    };
    Ok(Some(ClusterTls {
        config: Arc::new(config),
        server_name,
    }))
}

/// The configuration plain clusters carry: their URIs are `http://`, so the connector never
/// uses it, but one client type serves both kinds of cluster.
pub(crate) fn plain_cluster_config() -> ClusterTls {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    ClusterTls {
        config: Arc::new(config),
        server_name: Arc::new(DefaultServerNameResolver::default()),
    }
}

/// `TLSv1.2`, `TLSv1.3`, as Envoy names them in `connection.tls_version`.
pub(crate) fn version_name(version: ProtocolVersion) -> String {
    match version {
        ProtocolVersion::TLSv1_2 => "TLSv1.2".into(),
        ProtocolVersion::TLSv1_3 => "TLSv1.3".into(),
        other => format!("{other:?}"),
    }
}

/// `insecure_skip_verify`: accepts any upstream certificate, for tests and for upstreams with
/// self-signed certificates during development. It still checks the handshake signatures (the
/// peer holds the key of the certificate it sent), but not who the certificate belongs to, so it
/// gives no protection against an attacker in the middle. Never use it in production.
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
