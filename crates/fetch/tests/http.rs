//! HTTP(S) fetches against a real server on 127.0.0.1 that misbehaves on purpose: every fault gets
//! the right `result` label and a clear reason, and the cache behaves across restarts and
//! concurrent requests.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use wasmgate_fetch::{Cache, FetchErrorKind, FetchOptions, Fetcher, ModuleRequest, PullPolicy};

/// A valid, distinctive module: the header and a custom section.
const MODULE: &[u8] = b"\0asm\x01\0\0\0\0\x0a\x04testmodule";

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// A hand-rolled HTTP/1.1 server, so faults (truncation, lies about length) are exact.
struct FaultServer {
    address: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
}

impl FaultServer {
    async fn start() -> Self {
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = socket.local_addr().unwrap();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let counts = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = socket.accept().await else {
                    return;
                };
                let counts = counts.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 1024];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&request);
                    let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let hit = {
                        let mut counts = counts.lock();
                        let count = counts.entry(path.clone()).or_default();
                        *count += 1;
                        *count
                    };
                    let _ = answer(&mut stream, &path, hit).await;
                });
            }
        });
        Self { address, hits }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().get(path).copied().unwrap_or(0)
    }
}

async fn answer(stream: &mut tokio::net::TcpStream, path: &str, hit: usize) -> std::io::Result<()> {
    let respond = |status: &str, headers: &str, body: &[u8]| {
        let mut out = format!(
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        out
    };
    let bytes = match path {
        "/ok.wasm" => respond("200 OK", "", MODULE),
        "/gz.wasm" => respond("200 OK", "", &gzip(MODULE)),
        "/flaky.wasm" if hit <= 2 => respond("500 Internal Server Error", "", b"try again"),
        "/flaky.wasm" => respond("200 OK", "", MODULE),
        "/always-500.wasm" => respond("503 Service Unavailable", "", b"down"),
        "/missing.wasm" => respond("404 Not Found", "", b"no such module"),
        "/forbidden.wasm" => respond("403 Forbidden", "", b"no"),
        "/not-implemented.wasm" => respond("501 Not Implemented", "", b"never"),
        "/slow.wasm" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            respond("200 OK", "", MODULE)
        }
        "/shared.wasm" => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            respond("200 OK", "", MODULE)
        }
        "/truncated.wasm" => {
            // Promises 1000 bytes, sends 12, hangs up.
            let mut out =
                b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\nconnection: close\r\n\r\n".to_vec();
            out.extend_from_slice(&MODULE[..12]);
            out
        }
        "/html" => respond(
            "200 OK",
            "content-type: text/html\r\n",
            b"<html>Not a module</html>",
        ),
        "/big.wasm" => {
            let mut body = MODULE.to_vec();
            body.resize(4096, 0);
            respond("200 OK", "", &body)
        }
        "/loop" => respond("302 Found", "location: /loop\r\n", b""),
        "/to-metadata" => respond(
            "302 Found",
            "location: http://169.254.169.254/latest/meta-data/\r\n",
            b"",
        ),
        _ => respond("404 Not Found", "", b""),
    };
    stream.write_all(&bytes).await?;
    stream.shutdown().await
}

fn options() -> FetchOptions {
    FetchOptions {
        attempt_timeout: Duration::from_secs(2),
        deadline: Duration::from_secs(5),
        max_attempts: 4,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        ..FetchOptions::default()
    }
}

fn fetcher(dir: &std::path::Path, options: FetchOptions) -> Fetcher {
    Fetcher::new(options, Arc::new(Cache::open(dir).unwrap())).unwrap()
}

fn request(url: &str) -> ModuleRequest<'_> {
    ModuleRequest {
        url,
        ..ModuleRequest::default()
    }
}

#[tokio::test]
async fn a_module_is_fetched_once_then_served_from_the_cache() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), options());
    let url = server.url("/ok.wasm");
    let first = fetcher.fetch(request(&url)).await.unwrap();
    assert_eq!(&*first.bytes, MODULE);
    assert_eq!(first.sha256, sha256(MODULE));
    assert!(!first.cache_hit);
    assert_eq!(std::fs::read(&first.path).unwrap(), MODULE);
    let second = fetcher.fetch(request(&url)).await.unwrap();
    assert!(second.cache_hit);
    assert_eq!(server.hits("/ok.wasm"), 1);
    // Always asks the server again.
    let always = ModuleRequest {
        pull_policy: Some(PullPolicy::Always),
        ..request(&url)
    };
    assert!(!fetcher.fetch(always).await.unwrap().cache_hit);
    assert_eq!(server.hits("/ok.wasm"), 2);
    let metrics = fetcher.metrics();
    assert_eq!(metrics.remote_fetch_count("success"), 2);
    assert_eq!(metrics.cache_lookup_count(true), 1);
    assert_eq!(metrics.cache_lookup_count(false), 2);
    assert!(metrics.prometheus().contains("wasm_cache_entries 1"));
}

#[tokio::test]
async fn gzip_is_unwrapped_and_sha256_checked_on_the_module() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), options());
    let url = server.url("/gz.wasm");
    let sha = sha256(MODULE);
    let fetched = fetcher
        .fetch(ModuleRequest {
            sha256: Some(&sha),
            ..request(&url)
        })
        .await
        .unwrap();
    assert_eq!(&*fetched.bytes, MODULE);
}

#[tokio::test]
async fn five_hundred_is_retried_until_it_succeeds() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), options());
    let fetched = fetcher
        .fetch(request(&server.url("/flaky.wasm")))
        .await
        .unwrap();
    assert_eq!(&*fetched.bytes, MODULE);
    assert_eq!(server.hits("/flaky.wasm"), 3);
    assert_eq!(fetcher.metrics().remote_fetch_count("success"), 1);
    assert_eq!(fetcher.metrics().remote_fetch_count("download_failure"), 0);
}

/// Fetches `path` and returns the error, after checking its kind and `result` label count.
async fn fails(
    fetcher: &Fetcher,
    url: &str,
    sha256: Option<&str>,
    kind: FetchErrorKind,
    label: &str,
) -> String {
    let error = fetcher
        .fetch(ModuleRequest {
            sha256,
            ..request(url)
        })
        .await
        .expect_err("the fetch fails");
    assert_eq!(error.kind, kind, "{error}");
    assert_eq!(error.url, url);
    assert_eq!(fetcher.metrics().remote_fetch_count(label), 1, "{label}");
    assert_eq!(fetcher.metrics().remote_fetch_count("success"), 0);
    assert!(fetcher.cache().is_empty(), "nothing was cached");
    error.to_string()
}

#[tokio::test]
async fn four_hundred_four_is_not_retried() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), options());
    let url = server.url("/missing.wasm");
    let message = fails(
        &fetcher,
        &url,
        None,
        FetchErrorKind::DownloadFailure,
        "download_failure",
    )
    .await;
    assert!(
        message.contains("404") && message.contains("not retried"),
        "{message}"
    );
    assert_eq!(server.hits("/missing.wasm"), 1);
}

#[tokio::test]
async fn other_4xx_and_the_5xx_that_will_not_change_are_not_retried() {
    let server = FaultServer::start().await;
    for (path, status) in [("/forbidden.wasm", "403"), ("/not-implemented.wasm", "501")] {
        let dir = tempfile::tempdir().unwrap();
        let fetcher = fetcher(dir.path(), options());
        let url = server.url(path);
        let message = fails(
            &fetcher,
            &url,
            None,
            FetchErrorKind::DownloadFailure,
            "download_failure",
        )
        .await;
        assert!(
            message.contains(status) && message.contains("not retried"),
            "{message}"
        );
        assert_eq!(server.hits(path), 1, "{path}");
    }
}

#[tokio::test]
async fn credentials_in_the_url_are_in_no_error_and_no_cache_index() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), options());
    let with_password = |path: &str| {
        server
            .url(path)
            .replace("http://", "http://module-user:hunter2-secret@")
    };
    let url = with_password("/missing.wasm");
    let error = fetcher
        .fetch(request(&url))
        .await
        .expect_err("the fetch fails");
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains("hunter2-secret"), "{shown}");
    assert!(
        error.url.contains("module-user:***@") && shown.contains("404"),
        "{shown}"
    );
    // A transport error quotes the URL too.
    let refused = "http://module-user:hunter2-secret@127.0.0.1:1/p.wasm";
    let error = fetcher
        .fetch(ModuleRequest {
            url: refused,
            ..ModuleRequest::default()
        })
        .await
        .expect_err("nothing listens on port 1");
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains("hunter2-secret"), "{shown}");
    // Fetched: the index keys the URL without the password, and it is still found by it.
    let url = with_password("/ok.wasm");
    fetcher.fetch(request(&url)).await.unwrap();
    let index = std::fs::read_to_string(dir.path().join("index.json")).unwrap();
    assert!(
        !index.contains("hunter2-secret") && index.contains("module-user:***@"),
        "{index}"
    );
    assert!(fetcher.fetch(request(&url)).await.unwrap().cache_hit);
    assert_eq!(server.hits("/ok.wasm"), 1);
}

#[tokio::test]
async fn persistent_5xx_gives_up_after_the_attempts() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), options());
    let url = server.url("/always-500.wasm");
    let message = fails(
        &fetcher,
        &url,
        None,
        FetchErrorKind::DownloadFailure,
        "download_failure",
    )
    .await;
    assert!(
        message.contains("503") && message.contains("4 attempts"),
        "{message}"
    );
    assert_eq!(server.hits("/always-500.wasm"), 4);
}

#[tokio::test]
async fn a_slow_server_is_abandoned_at_the_deadline() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(
        dir.path(),
        FetchOptions {
            attempt_timeout: Duration::from_millis(400),
            deadline: Duration::from_secs(1),
            ..options()
        },
    );
    let started = Instant::now();
    let url = server.url("/slow.wasm");
    let message = fails(
        &fetcher,
        &url,
        None,
        FetchErrorKind::DownloadFailure,
        "download_failure",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
    assert!(message.contains("no complete answer within"), "{message}");
}

#[tokio::test]
async fn a_truncated_body_fails_as_a_download_failure() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), options());
    let url = server.url("/truncated.wasm");
    fails(
        &fetcher,
        &url,
        None,
        FetchErrorKind::DownloadFailure,
        "download_failure",
    )
    .await;
    assert!(
        server.hits("/truncated.wasm") > 1,
        "a transport error is retried"
    );
}

#[tokio::test]
async fn a_wrong_sha256_is_checksum_mismatched() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), options());
    let url = server.url("/ok.wasm");
    let wrong = "0".repeat(64);
    let message = fails(
        &fetcher,
        &url,
        Some(&wrong),
        FetchErrorKind::ChecksumMismatched,
        "checksum_mismatched",
    )
    .await;
    assert!(
        message.contains(&sha256(MODULE)) && message.contains(&wrong),
        "{message}"
    );
}

#[tokio::test]
async fn a_body_that_is_not_wasm_is_a_fetch_failure() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), options());
    let url = server.url("/html");
    let message = fails(
        &fetcher,
        &url,
        None,
        FetchErrorKind::FetchFailure,
        "fetch_failure",
    )
    .await;
    assert!(
        message.contains("not a Wasm module") && message.contains("<html>"),
        "{message}"
    );
}

#[tokio::test]
async fn a_body_over_the_cap_is_refused() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(
        dir.path(),
        FetchOptions {
            max_size: 1024,
            ..options()
        },
    );
    let url = server.url("/big.wasm");
    let message = fails(
        &fetcher,
        &url,
        None,
        FetchErrorKind::DownloadFailure,
        "download_failure",
    )
    .await;
    assert!(message.contains("1024-byte limit"), "{message}");
    assert_eq!(server.hits("/big.wasm"), 1, "not retried");
}

#[tokio::test]
async fn a_redirect_loop_stops() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), options());
    let url = server.url("/loop");
    let message = fails(
        &fetcher,
        &url,
        None,
        FetchErrorKind::DownloadFailure,
        "download_failure",
    )
    .await;
    assert!(message.contains("redirects"), "{message}");
}

#[tokio::test]
async fn metadata_addresses_are_refused_directly_and_through_redirects() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = fetcher(dir.path(), options());
    let url = server.url("/to-metadata");
    let message = fails(
        &fetcher,
        &url,
        None,
        FetchErrorKind::DownloadFailure,
        "download_failure",
    )
    .await;
    assert!(message.contains("metadata"), "{message}");
    let direct = fetcher
        .fetch(request("http://169.254.169.254/latest/meta-data/"))
        .await
        .unwrap_err();
    assert!(direct.message.contains("refusing"), "{direct}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_of_one_url_download_once() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let fetcher = Arc::new(fetcher(dir.path(), options()));
    let url = server.url("/shared.wasm");
    let started = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (fetcher, url, started) = (fetcher.clone(), url.clone(), started.clone());
        tasks.push(tokio::spawn(async move {
            started.fetch_add(1, Ordering::SeqCst);
            fetcher.fetch(request(&url)).await.unwrap().sha256
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), sha256(MODULE));
    }
    assert_eq!(started.load(Ordering::SeqCst), 8);
    assert_eq!(server.hits("/shared.wasm"), 1);
}

#[tokio::test]
async fn the_cache_survives_a_restart_without_the_network() {
    let dir = tempfile::tempdir().unwrap();
    let url = {
        let server = FaultServer::start().await;
        let url = server.url("/ok.wasm");
        fetcher(dir.path(), options())
            .fetch(request(&url))
            .await
            .unwrap();
        url
    };
    // A new process's fetcher over the same folder, and nothing listening at the URL any more
    // (the port is closed once the server's runtime task is gone; refused either way).
    let fetcher = fetcher(dir.path(), options());
    let fetched = fetcher.fetch(request(&url)).await.unwrap();
    assert!(fetched.cache_hit);
    assert_eq!(&*fetched.bytes, MODULE);
    let unreachable = "http://127.0.0.1:9/never.wasm";
    let error = fetcher.fetch(request(unreachable)).await.unwrap_err();
    assert_eq!(error.kind, FetchErrorKind::DownloadFailure);
}

#[tokio::test]
async fn local_files_are_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.wasm");
    std::fs::write(&path, MODULE).unwrap();
    let fetcher = fetcher(dir.path(), options());
    let url = format!("file://{}", path.display());
    assert_eq!(&*fetcher.fetch(request(&url)).await.unwrap().bytes, MODULE);
    let wrong = "1".repeat(64);
    let error = fetcher
        .fetch(ModuleRequest {
            sha256: Some(&wrong),
            ..request(&url)
        })
        .await
        .unwrap_err();
    assert_eq!(error.kind, FetchErrorKind::ChecksumMismatched);
    let error = fetcher
        .fetch(request("file:///no/such.wasm"))
        .await
        .unwrap_err();
    assert!(error.message.contains("/no/such.wasm"), "{error}");
}

#[tokio::test]
async fn progress_is_reported_with_the_total() {
    let server = FaultServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    type Seen = Arc<Mutex<Vec<(u64, Option<u64>)>>>;
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let fetcher = fetcher(
        dir.path(),
        FetchOptions {
            progress: Some(wasmgate_fetch::ProgressFn(Arc::new(move |got, total| {
                record.lock().push((got, total))
            }))),
            ..options()
        },
    );
    fetcher
        .fetch(request(&server.url("/ok.wasm")))
        .await
        .unwrap();
    let seen = seen.lock();
    let total = MODULE.len() as u64;
    assert_eq!(seen.last(), Some(&(total, Some(total))), "{seen:?}");
}
