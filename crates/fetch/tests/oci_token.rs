//! Bearer-token authentication against a real registry: Debian's `docker-registry` configured for
//! Docker's token auth, and a token service in the test that checks Basic credentials and issues
//! ES256 JWTs with the `access` the client asked for (as Docker Hub, GHCR or Harbor do).

mod common;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use common::registry::{Mode, TestRegistry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wasmgate_fetch::docker_config::Credentials;
use wasmgate_fetch::oci::{ImageVariant, Registry};
use wasmgate_fetch::{FetchErrorKind, FetchOptions, OciReference};

const SERVICE: &str = "wasmgate-test-registry";
const ISSUER: &str = "wasmgate-test-issuer";
const USER: &str = "token-user";
const PASSWORD: &str = "token-pass";

/// A token service on 127.0.0.1: Basic credentials in, a signed JWT out.
struct TokenService {
    realm: String,
    cert_pem: String,
}

impl TokenService {
    async fn start() -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["token-issuer".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let signer = Arc::new(
            ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                &key.serialize_der(),
                &ring::rand::SystemRandom::new(),
            )
            .unwrap(),
        );
        let cert_der = STANDARD.encode(cert.der());
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let realm = format!("http://{}/token", socket.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = socket.accept().await {
                let (signer, cert_der) = (signer.clone(), cert_der.clone());
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let answer = answer(&String::from_utf8_lossy(&request), &signer, &cert_der);
                    let _ = stream.write_all(answer.as_bytes()).await;
                });
            }
        });
        Self {
            realm,
            cert_pem: cert.pem(),
        }
    }
}

fn answer(request: &str, signer: &ring::signature::EcdsaKeyPair, cert_der: &str) -> String {
    let expected = format!("Basic {}", STANDARD.encode(format!("{USER}:{PASSWORD}")));
    let authorized = request.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("authorization:") && l[14..].trim() == expected
    });
    if !authorized {
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
        return format!(
            "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    let target = request.split_whitespace().nth(1).unwrap_or("/");
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let access: Vec<serde_json::Value> = query
        .split('&')
        .filter_map(|pair| pair.strip_prefix("scope="))
        .map(|scope| {
            scope
                .replace("%3A", ":")
                .replace("%2C", ",")
                .replace("%2F", "/")
        })
        .filter_map(|scope| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({
                "type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "x5c": [cert_der]});
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": USER, "aud": SERVICE, "exp": now + 300, "nbf": now - 10,
        "iat": now, "jti": format!("{now}-{}", access.len()), "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = signer
        .sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes())
        .unwrap();
    let token = format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature.as_ref())
    );
    let body =
        serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string();
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn module() -> Vec<u8> {
    b"\0asm\x01\0\0\0\0\x06\x05token".to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_from_the_registrys_token_service() {
    let tokens = TokenService::start().await;
    let registry = TestRegistry::start(Mode::Token {
        realm: tokens.realm.clone(),
        service: SERVICE.into(),
        issuer: ISSUER.into(),
        root_cert_pem: tokens.cert_pem.clone(),
    })
    .await;
    let options = FetchOptions {
        insecure_registries: vec![registry.address.clone()],
        ..FetchOptions::default()
    };
    let image = OciReference::parse(&format!("{}/token/plugin:v1", registry.address)).unwrap();
    let credentials = Credentials::Basic {
        username: USER.into(),
        password: PASSWORD.into(),
    };
    let client = Registry::new(&image, &options, Some(credentials.clone())).unwrap();
    let digest = client
        .push(&image, &module(), ImageVariant::Compat)
        .await
        .unwrap_or_else(|e| panic!("{e}\nregistry log:\n{}", registry.log()));
    let manifest = Registry::new(&image, &options, Some(credentials))
        .unwrap()
        .resolve(&image)
        .await
        .unwrap();
    assert_eq!(manifest.digest, digest);
    assert_eq!(
        client.module(&image, &manifest, 1 << 20).await.unwrap(),
        module()
    );

    // Without credentials the token service refuses, and so the registry does.
    let anonymous = Registry::new(&image, &options, None).unwrap();
    let error = anonymous.resolve(&image).await.unwrap_err();
    assert_eq!(error.kind, FetchErrorKind::ManifestFailure, "{error}");
    let wrong = Registry::new(
        &image,
        &options,
        Some(Credentials::Basic {
            username: USER.into(),
            password: "wrong".into(),
        }),
    )
    .unwrap();
    let error = wrong.resolve(&image).await.unwrap_err();
    assert_eq!(error.kind, FetchErrorKind::ManifestFailure, "{error}");
    assert!(
        !error.to_string().contains("wrong"),
        "no secret in: {error}"
    );
}
