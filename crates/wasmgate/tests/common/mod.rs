//! The `wasmgate` binary as a test drives it: started with a config, its printed addresses
//! read, plain HTTP/1.1 requests, a simple upstream.

// Each test binary that declares `mod common` compiles this; not all of them use all of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

pub fn wasmgate() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_wasmgate"));
    command.env(
        "WASMGATE_CACHE_DIR",
        repo().join("target/wasmgate-test-cache"),
    );
    command
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn plugin(name: &str) -> PathBuf {
    let path = repo().join(format!("plugins/target/wasm32-wasip1/release/{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing; run scripts/build-plugins.sh",
        path.display()
    );
    std::fs::canonicalize(path).unwrap()
}

/// A running gateway process, killed on drop.
pub struct Running {
    pub child: Child,
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: SocketAddr,
    /// Everything the process wrote to stderr so far (when started with [`start_capturing`]).
    pub stderr: Arc<Mutex<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    pub fn listener(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .expect("listener printed")
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().unwrap()
    }
}

/// Starts `wasmgate` with `args` and reads the addresses it prints once ready.
pub fn start(args: &[&str]) -> Running {
    start_with(wasmgate().args(args), false)
}

/// As [`start`], keeping what the process writes to stderr in [`Running::stderr`] (and still
/// echoing it, so a failing test shows it).
pub fn start_capturing(command: &mut Command) -> Running {
    start_with(command, true)
}

fn start_with(command: &mut Command, capture: bool) -> Running {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(if capture {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .spawn()
        .unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    if let Some(pipe) = child.stderr.take() {
        let stderr = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                eprintln!("{line}");
                let mut text = stderr.lock();
                text.push_str(&line);
                text.push('\n');
            }
        });
    }
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let (listeners, admin) = read_addresses(&mut lines, || {
        "wasmgate exited before printing its addresses".into()
    });
    std::thread::spawn(move || for _ in lines {});
    Running {
        child,
        listeners,
        admin,
        stderr,
    }
}

/// One HTTP/1.1 request with `connection: close`; returns (status, headers+body text).
pub fn http(address: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

pub fn get(address: SocketAddr, path: &str, extra: &str) -> (u16, String) {
    http(
        address,
        &format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n{extra}\r\n"),
    )
}

/// A value of the gateway's `/stats/prometheus`; panics, showing the page, when it is not there.
pub fn metric(admin: SocketAddr, name: &str) -> u64 {
    let (_, stats) = get(admin, "/stats/prometheus", "");
    stats
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in\n{stats}"))
}

/// Reads a request's line and headers (the tests' requests have no body); `None` if the client
/// went away first.
fn read_request_head(stream: &mut TcpStream) -> Option<String> {
    let mut buffer = [0u8; 4096];
    let mut request = Vec::new();
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return None,
            Ok(n) => request.extend_from_slice(&buffer[..n]),
        }
    }
    Some(String::from_utf8_lossy(&request).into_owned())
}

/// An upstream that answers 200 with the request head it received (header `x-upstream: echo`),
/// so a test sees what went over the wire.
pub fn echo_upstream() -> SocketAddr {
    answering_upstream(|head| head.to_owned())
}

/// An upstream that answers 200 with `body` to every request.
pub fn fixed_upstream(body: &'static str) -> SocketAddr {
    answering_upstream(move |_| body.to_owned())
}

fn answering_upstream(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let answer = answer.clone();
            std::thread::spawn(move || {
                let Some(head) = read_request_head(&mut stream) else {
                    return;
                };
                let body = answer(&head);
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nx-upstream: echo\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    address
}

/// A plain upstream on a thread: answers every request 200 "upstream says hi" after `delay`.
pub fn upstream(delay: Duration) -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                if read_request_head(&mut stream).is_none() {
                    return;
                }
                std::thread::sleep(delay);
                let body = "upstream says hi";
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    address
}

/// What a [`ModuleServer`] path answers.
#[derive(Clone)]
pub enum Reply {
    /// A status and a body, with a true content-length.
    Status(u16, Vec<u8>),
    /// These bytes as they are (a lying content-length, a redirect, ...), then the connection closes.
    Raw(Vec<u8>),
    /// 200 with the body, after a pause.
    Slow(Duration, Vec<u8>),
    /// The status (with a short body) while the counter is above zero, counting it down; then 200
    /// with the body. See [`ModuleServer::flaky`].
    Flaky(Arc<std::sync::atomic::AtomicUsize>, u16, Vec<u8>),
}

type Routes = Arc<Mutex<std::collections::HashMap<String, Reply>>>;

/// A module server on a thread: answers each path with what [`ModuleServer::set`] last put there
/// (404 for unknown paths), and counts requests per path.
pub struct ModuleServer {
    pub address: SocketAddr,
    routes: Routes,
}

impl ModuleServer {
    pub fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let routes: Routes = Arc::default();
        let served = routes.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let served = served.clone();
                std::thread::spawn(move || {
                    let Some(head) = read_request_head(&mut stream) else {
                        return;
                    };
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let reply = served
                        .lock()
                        .get(&path)
                        .cloned()
                        .unwrap_or(Reply::Status(404, b"not found".to_vec()));
                    let (status, body) = match reply {
                        Reply::Raw(bytes) => {
                            let _ = stream.write_all(&bytes);
                            return;
                        }
                        Reply::Slow(pause, body) => {
                            std::thread::sleep(pause);
                            (200, body)
                        }
                        Reply::Status(status, body) => (status, body),
                        Reply::Flaky(failures, status, body) => {
                            use std::sync::atomic::Ordering;
                            let failing = failures
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok();
                            if failing {
                                (status, b"try again".to_vec())
                            } else {
                                (200, body)
                            }
                        }
                    };
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(&body);
                });
            }
        });
        Self { address, routes }
    }

    pub fn set(&self, path: &str, status: u16, body: &[u8]) {
        self.reply(path, Reply::Status(status, body.to_vec()));
    }

    pub fn reply(&self, path: &str, reply: Reply) {
        self.routes.lock().insert(path.to_owned(), reply);
    }

    /// `path` answers `status` to its first `failures` requests, then 200 with `body`.
    pub fn flaky(&self, path: &str, failures: usize, status: u16, body: &[u8]) {
        self.reply(
            path,
            Reply::Flaky(
                Arc::new(std::sync::atomic::AtomicUsize::new(failures)),
                status,
                body.to_vec(),
            ),
        );
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }
}

/// Polls `check` every 50 ms until it holds or `within` passes; returns whether it held.
pub fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// As [`start`], with the process's stderr written to the file `log` instead of echoed: for
/// gateways that log more than a test's output should hold (trap backtraces, log floods), and
/// whose log the test reads back. Nothing reads a pipe here, so a chatty gateway never blocks
/// on a full one.
pub fn start_logging_to(command: &mut Command, log: &std::path::Path) -> Running {
    let file = std::fs::File::create(log).unwrap();
    let mut child = command.stdout(Stdio::piped()).stderr(file).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let (listeners, admin) = read_addresses(&mut lines, || {
        let _ = child.kill();
        let _ = child.wait();
        format!(
            "wasmgate exited before printing its addresses; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    });
    std::thread::spawn(move || for _ in lines {});
    Running {
        child,
        listeners,
        admin,
        stderr: Arc::default(),
    }
}

/// Writes `yaml` as `gateway.yaml` in `dir`.
pub fn write_config(dir: &tempfile::TempDir, yaml: &str) -> PathBuf {
    let path = dir.path().join("gateway.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// Starts `wasmgate run` on `yaml`, which must fail naming the file; returns what it wrote to
/// stderr.
pub fn run_expecting_failure(yaml: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, yaml);
    let output = wasmgate()
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "start-up must fail for:\n{yaml}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("gateway.yaml"),
        "the file is named: {stderr}"
    );
    stderr
}

/// The `listener NAME on ADDRESS` lines and the `admin on ADDRESS` line `run` prints once ready;
/// if the output ends first, panics with what `exited` says.
fn read_addresses(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    exited: impl FnOnce() -> String,
) -> (Vec<(String, SocketAddr)>, SocketAddr) {
    let mut listeners = Vec::new();
    loop {
        let Some(Ok(line)) = lines.next() else {
            panic!("{}", exited());
        };
        if let Some(rest) = line.strip_prefix("listener ") {
            let (name, address) = rest.split_once(" on ").unwrap();
            listeners.push((name.to_owned(), address.parse().unwrap()));
        } else if let Some(address) = line.strip_prefix("admin on ") {
            return (listeners, address.parse().unwrap());
        }
    }
}
