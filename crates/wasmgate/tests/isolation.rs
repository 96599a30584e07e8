//! Hostile plugins through the real binary: `plugins/test-hostile` (Rust SDK; what it does and
//! where is chosen by its configuration) and hand-written modules in `tests/hostile-wat/`. Each
//! test starts one gateway (one worker, so what a VM has been through decides each answer) with a
//! listener per scenario and an `other` listener through add-header; drives concurrent load at the
//! hostile listeners while a watcher checks that `other` keeps answering 200; checks each answer
//! against the failure policy; and ends by checking that the process is alive and `/ready`.
//!
//! Failure policies, as Envoy has them: FAIL_CLOSED leaves the VM failed and answers 503 to every
//! request that reaches it; FAIL_OPEN skips the plugin; FAIL_RELOAD builds a fresh VM for new
//! requests (Envoy with a backoff, during which it answers 503, so the tests wait for recovery
//! with `eventually` rather than expecting it on the very next request).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use parking_lot::{Condvar, Mutex};

/// A client gives up on an answer after this long. Only a hang comes near it: the slowest answer
/// here waits behind a few 200 ms callback time limits, and the gateway's own pause deadline
/// (60 s) is what a stuck stream would run into.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a recovery (a FAIL_RELOAD VM rebuilt) or a log line may take to show.
const SETTLE: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------------
// The upstream.
// ------------------------------------------------------------------------------------------------

/// The upstream of every test here, one thread per connection and one request per connection.
/// `/trailers` answers chunked with a trailer; `/slow` waits until [`Upstream::open_gate`];
/// anything else answers 200 `upstream says hi` with a content-length. Request bodies
/// (content-length or chunked, trailers included) are read whole first, so the gateway never
/// sees the upstream close on a request it is still sending.
struct Upstream {
    address: SocketAddr,
    slow_arrivals: Arc<AtomicUsize>,
    gate: Arc<(Mutex<bool>, Condvar)>,
}

impl Upstream {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let slow_arrivals = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (arrivals, gate_for_threads) = (slow_arrivals.clone(), gate.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (arrivals, gate) = (arrivals.clone(), gate_for_threads.clone());
                std::thread::spawn(move || serve_one(stream, &arrivals, &gate));
            }
        });
        Self {
            address,
            slow_arrivals,
            gate,
        }
    }

    fn open_gate(&self) {
        let (open, wake) = &*self.gate;
        *open.lock() = true;
        wake.notify_all();
    }
}

fn serve_one(stream: TcpStream, arrivals: &AtomicUsize, gate: &(Mutex<bool>, Condvar)) {
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let Some(path) = read_request(&mut reader) else {
        return;
    };
    if path == "/slow" {
        arrivals.fetch_add(1, Ordering::SeqCst);
        let (open, wake) = gate;
        let mut open = open.lock();
        while !*open {
            wake.wait(&mut open);
        }
    }
    let _ = if path == "/trailers" {
        writer.write_all(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-upstream-trailer\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\nx-upstream-trailer: yes\r\n\r\n",
        )
    } else {
        let body = "upstream says hi";
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
}

/// Reads one request, body and trailers included; returns its path.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let path = line.split_whitespace().nth(1)?.to_owned();
    let (mut length, mut chunked) = (0usize, false);
    loop {
        line.clear();
        if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            length = value.trim().parse().ok()?;
        } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    if !chunked {
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        return Some(path);
    }
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
        if size == 0 {
            // Trailers, up to the blank line.
            loop {
                line.clear();
                if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" {
                    return Some(path);
                }
            }
        }
        let mut chunk = vec![0; size + 2];
        reader.read_exact(&mut chunk).ok()?;
    }
}

// ------------------------------------------------------------------------------------------------
// The client.
// ------------------------------------------------------------------------------------------------

/// What a client got back.
#[derive(Debug, Clone)]
struct Reply {
    /// 0 when no status line came back.
    status: u16,
    text: String,
    /// The whole response arrived: its full content-length, or a chunked body through the last
    /// chunk and the trailers.
    complete: bool,
    /// A read error (a reset, or the read timeout: a hang).
    error: Option<String>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        let head = self.text.split("\r\n\r\n").next()?;
        head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    fn body(&self) -> &str {
        self.text
            .split_once("\r\n\r\n")
            .map_or("", |(_, body)| body)
    }

    fn outcome(&self) -> Outcome {
        match (self.status, self.complete) {
            (200, true) => Outcome::Ok,
            (200, false) => Outcome::CutShort,
            (503, true) => Outcome::Unavailable,
            _ => Outcome::Other,
        }
    }
}

/// Sends `request` on a new connection and reads until the gateway closes it.
fn send(address: SocketAddr, request: &str) -> Reply {
    send_within(address, request, READ_TIMEOUT)
}

/// As [`send`], giving up on a read after `timeout`.
fn send_within(address: SocketAddr, request: &str, timeout: Duration) -> Reply {
    let mut stream = match TcpStream::connect(address) {
        Ok(stream) => stream,
        // A gateway that died refuses connections: an answer nobody expects, not a panic in
        // whichever thread sent it.
        Err(error) => {
            return Reply {
                status: 0,
                text: String::new(),
                complete: false,
                error: Some(format!("connect: {error}")),
            };
        }
    };
    stream.set_read_timeout(Some(timeout)).unwrap();
    // A gateway that answers before reading the whole request may close early; what it
    // answered is still there to read.
    let _ = stream.write_all(request.as_bytes());
    let mut bytes = Vec::new();
    let mut buffer = [0u8; 16384];
    let error = loop {
        match stream.read(&mut buffer) {
            Ok(0) => break None,
            Ok(n) => bytes.extend_from_slice(&buffer[..n]),
            Err(error) => break Some(format!("{error} ({:?})", error.kind())),
        }
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let complete = is_complete(&text, error.is_none());
    Reply {
        status,
        text,
        complete,
        error,
    }
}

fn is_complete(text: &str, clean_end: bool) -> bool {
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let header = |name: &str| {
        head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name)
                .then(|| value.trim().to_ascii_lowercase())
        })
    };
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        let mut rest = body;
        loop {
            let Some((size, after)) = rest.split_once("\r\n") else {
                return false;
            };
            let Ok(size) = usize::from_str_radix(size.split(';').next().unwrap_or(""), 16) else {
                return false;
            };
            if size == 0 {
                // The trailer section ends with an empty line.
                return after == "\r\n" || after.ends_with("\r\n\r\n");
            }
            let Some(after) = after.get(size..).and_then(|a| a.strip_prefix("\r\n")) else {
                return false;
            };
            rest = after;
        }
    }
    match header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(length) => body.len() == length,
        None => clean_end,
    }
}

/// What a request exercises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// GET /: request headers, response headers and body.
    Get,
    /// POST with a content-length body: the request body callback.
    PostBody,
    /// POST chunked with a trailer: the request body and trailers callbacks.
    PostTrailers,
    /// GET /trailers: a chunked response with a trailer, for the response trailers callback.
    GetTrailers,
    /// GET /slow: the upstream holds the answer until its gate opens.
    GetSlow,
}

/// A request; `hostile` adds the `x-hostile` header the plugin's `only_if_header` looks for.
/// `id` goes in `x-hostile-id`, which the plugin echoes as `x-hostile-id-seen`.
fn request(kind: Kind, hostile: bool, id: &str) -> String {
    request_with(kind, if hostile { "x-hostile: 1\r\n" } else { "" }, id)
}

/// A request with `extra` header lines (each ending in CRLF).
fn request_with(kind: Kind, extra: &str, id: &str) -> String {
    let head = format!("host: localhost\r\nconnection: close\r\nx-hostile-id: {id}\r\n{extra}");
    match kind {
        Kind::Get => format!("GET / HTTP/1.1\r\n{head}\r\n"),
        Kind::GetSlow => format!("GET /slow HTTP/1.1\r\n{head}\r\n"),
        Kind::GetTrailers => format!("GET /trailers HTTP/1.1\r\n{head}te: trailers\r\n\r\n"),
        Kind::PostBody => format!("POST / HTTP/1.1\r\n{head}content-length: 11\r\n\r\nhello world"),
        Kind::PostTrailers => format!(
            "POST / HTTP/1.1\r\n{head}transfer-encoding: chunked\r\ntrailer: x-client-trailer\r\n\r\n5\r\nhello\r\n0\r\nx-client-trailer: yes\r\n\r\n"
        ),
    }
}

/// How an answer went, as the failure policies decide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// 200, whole.
    Ok,
    /// 200 whose body or trailers never arrived: the stream failed after its head went out.
    CutShort,
    /// 503: the plugin failed (FAIL_CLOSED, or FAIL_RELOAD for the request that failed it).
    Unavailable,
    /// Anything else: no policy allows it.
    Other,
}

// ------------------------------------------------------------------------------------------------
// The gateway.
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Closed,
    Open,
    Reload,
}

const POLICIES: [Policy; 3] = [Policy::Closed, Policy::Open, Policy::Reload];

impl Policy {
    fn yaml(self) -> &'static str {
        match self {
            Policy::Closed => "FAIL_CLOSED",
            Policy::Open => "FAIL_OPEN",
            Policy::Reload => "FAIL_RELOAD",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Policy::Closed => "closed",
            Policy::Open => "open",
            Policy::Reload => "reload",
        }
    }
}

/// One `http_filters` entry: `name` is also the vm_id, so each filter has its own shared data.
/// `configuration` (and `vm_configuration`) are JSON without single quotes.
fn filter(
    name: &str,
    policy: Policy,
    wasm: &Path,
    configuration: &str,
    vm_configuration: Option<&str>,
) -> String {
    let vm_configuration = vm_configuration
        .map(|c| format!("configuration: '{c}', "))
        .unwrap_or_default();
    format!(
        "      - name: {name}\n        failure_policy: {}\n        configuration: '{configuration}'\n        vm_config: {{ vm_id: {name}, {vm_configuration}code: {{ local: {{ filename: \"{}\" }} }} }}\n",
        policy.yaml(),
        wasm.display()
    )
}

/// A listener per `(name, http_filters entries)`, plus `other` through add-header; every route
/// goes to the cluster `upstream` (also the plugin's `http_call` target). One worker: each
/// plugin has one VM, so what it has been through decides each answer. `limits` goes inside
/// `plugin_limits`, after the 200 ms callback time limit.
fn gateway_yaml(upstream: SocketAddr, listeners: &[(String, String)], limits: &str) -> String {
    let mut yaml = format!(
        "workers: 1\nadmin: 127.0.0.1:0\nplugin_limits: {{ callback_time_limit: 200ms{limits} }}\nlisteners:\n"
    );
    let add_header = plugin("add_header");
    let other = [(
        "other".to_owned(),
        format!(
            "      - name: other\n        configuration: '{{\"name\":\"x-other\",\"value\":\"served\",\"side\":\"response\"}}'\n        vm_config: {{ vm_id: other, code: {{ local: {{ filename: \"{}\" }} }} }}\n",
            add_header.display()
        ),
    )];
    for (name, filters) in listeners.iter().chain(&other) {
        yaml.push_str(&format!(
            "  - name: {name}\n    address: 127.0.0.1:0\n    http_filters:\n{filters}    routes: [ {{ match: {{ prefix: / }}, cluster: upstream }} ]\n"
        ));
    }
    yaml.push_str(&format!(
        "clusters:\n  - {{ name: upstream, endpoints: [\"{upstream}\"] }}\n"
    ));
    yaml
}

fn hostile_wasm() -> PathBuf {
    plugin("test_hostile")
}

/// A module from a WAT file in `tests/hostile-wat/`, written into `dir`.
fn wat_module(dir: &Path, name: &str) -> PathBuf {
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/hostile-wat")
        .join(format!("{name}.wat"));
    let bytes = wat::parse_file(&source).unwrap_or_else(|e| panic!("{}: {e}", source.display()));
    let path = dir.join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).unwrap();
    path
}

struct Gateway {
    running: Running,
    log: PathBuf,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    fn start(yaml: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("gateway.yaml");
        std::fs::write(&config, yaml).unwrap();
        let log = dir.path().join("gateway.log");
        let running = start_logging_to(
            wasmgate().args(["run", "--config", config.to_str().unwrap()]),
            &log,
        );
        Self {
            running,
            log,
            config,
            _dir: dir,
        }
    }

    fn listener(&self, name: &str) -> SocketAddr {
        self.running.listener(name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(80)..].join("\n")
    }

    fn misdeed_logged(&self, plugin: &str, callback: &str) -> bool {
        misdeed_logged(&self.log, plugin, callback)
    }

    /// The process is still running, and its admin server answers `/ready` with 200.
    fn assert_alive_and_ready(&mut self, after: &str) {
        if let Some(status) = self.running.child.try_wait().unwrap() {
            panic!(
                "the gateway exited ({status}) after {after}; its log ends:\n{}",
                self.log_tail()
            );
        }
        let reply = send(
            self.running.admin,
            "GET /ready HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
        );
        assert_eq!(reply.status, 200, "/ready after {after}: {reply:?}");
    }
}

/// Whether the plugin's own log says it did its misdeed in `callback` (its line reads
/// `hostile: <Action> in <callback>`, with the plugin name as a field).
fn misdeed_logged(log: &Path, plugin: &str, callback: &str) -> bool {
    let needle = format!("in {callback} plugin=\"{plugin}\"");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .any(|l| l.contains("hostile: ") && l.contains(&needle))
}

/// Requests `other` (through add-header) on a thread until stopped, then once more: the route
/// that no hostile plugin is on.
struct Watch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Reply>>,
}

impl Watch {
    fn start(address: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut replies = Vec::new();
            loop {
                let last = stopped.load(Ordering::SeqCst);
                replies.push(send(address, &request(Kind::Get, false, "other")));
                if last {
                    return replies;
                }
                // Pacing, not waiting for anything: leave the two cores to the load.
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Self { stop, thread }
    }

    /// Stops the watcher; every answer `other` gave must have been a whole 200 from add-header.
    fn assert_served(self) {
        self.stop.store(true, Ordering::SeqCst);
        let replies = self.thread.join().unwrap();
        let bad: Vec<&Reply> = replies
            .iter()
            .filter(|r| r.outcome() != Outcome::Ok || r.header("x-other") != Some("served"))
            .collect();
        assert!(
            bad.is_empty(),
            "the other route failed {} of {} times, e.g. {:?}",
            bad.len(),
            replies.len(),
            bad[0]
        );
    }
}

/// Sends `jobs` (hostile or not, with an id each) from `tasks` threads at once; returns each
/// job's reply beside it.
fn load(
    address: SocketAddr,
    kind: Kind,
    jobs: Vec<(bool, String)>,
    tasks: usize,
) -> Vec<(bool, String, Reply)> {
    let jobs = Arc::new(Mutex::new(jobs));
    let threads: Vec<_> = (0..tasks)
        .map(|_| {
            let jobs = jobs.clone();
            std::thread::spawn(move || {
                let mut done = Vec::new();
                loop {
                    // The lock is released at the end of this statement, before the request.
                    let Some((hostile, id)) = jobs.lock().pop() else {
                        return done;
                    };
                    let reply = send(address, &request(kind, hostile, &id));
                    done.push((hostile, id, reply));
                }
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect()
}

/// `count` jobs, every `hostile_every`-th of them hostile, starting with the second (so the first
/// one meets a healthy VM); none if `hostile_every` is 0.
fn jobs(count: usize, hostile_every: usize) -> Vec<(bool, String)> {
    (0..count)
        .map(|i| {
            let hostile = hostile_every != 0 && i % hostile_every == 1 % hostile_every;
            (hostile, format!("r{i}"))
        })
        .rev()
        .collect()
}

// ------------------------------------------------------------------------------------------------
// Misdeeds that fail the VM, in every stream callback, under each policy.
// ------------------------------------------------------------------------------------------------

/// Where a stream callback runs, which decides what a failure there can still change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before the response head leaves (Wasmgate holds it until the first body bytes have passed
    /// the chain): a failure can still become a 503.
    BeforeHead,
    /// After the head and the body left (response trailers): the response can only be cut short.
    AfterHead,
    /// After the response (on_log, on_done): this request is answered; the next ones see the
    /// failed VM.
    AfterResponse,
}

struct StreamCallback {
    name: &'static str,
    kind: Kind,
    stage: Stage,
}

const STREAM_CALLBACKS: [StreamCallback; 9] = [
    StreamCallback {
        name: "on_request_headers",
        kind: Kind::Get,
        stage: Stage::BeforeHead,
    },
    StreamCallback {
        name: "on_request_body",
        kind: Kind::PostBody,
        stage: Stage::BeforeHead,
    },
    StreamCallback {
        name: "on_request_trailers",
        kind: Kind::PostTrailers,
        stage: Stage::BeforeHead,
    },
    StreamCallback {
        name: "on_http_call_response",
        kind: Kind::Get,
        stage: Stage::BeforeHead,
    },
    StreamCallback {
        name: "on_response_headers",
        kind: Kind::Get,
        stage: Stage::BeforeHead,
    },
    StreamCallback {
        name: "on_response_body",
        kind: Kind::Get,
        stage: Stage::BeforeHead,
    },
    StreamCallback {
        name: "on_response_trailers",
        kind: Kind::GetTrailers,
        stage: Stage::AfterHead,
    },
    StreamCallback {
        name: "on_log",
        kind: Kind::Get,
        stage: Stage::AfterResponse,
    },
    StreamCallback {
        name: "on_done",
        kind: Kind::Get,
        stage: Stage::AfterResponse,
    },
];

/// What a request may get from a plugin whose misdeed fails its VM.
fn allowed(policy: Policy, stage: Stage, hostile: bool) -> &'static [Outcome] {
    use Outcome::*;
    match (policy, stage, hostile) {
        (Policy::Open, ..) => &[Ok],
        // The request that fails the VM, or one that meets it failed (or, FAIL_RELOAD, meets the
        // reload backoff).
        (_, Stage::BeforeHead, true) => &[Unavailable],
        (_, Stage::AfterHead, true) => &[CutShort, Unavailable],
        (_, Stage::AfterResponse, true) => &[Ok, Unavailable],
        // A normal request is fine until the VM fails before it or under it (and if that
        // happens after its head went out, it is cut short).
        (_, _, false) => &[Ok, CutShort, Unavailable],
    }
}

/// How much load each scenario of a matrix gets.
struct Load {
    tasks: usize,
    requests: usize,
    hostile_every: usize,
}

/// `action` (a misdeed that fails the VM) in each of `callbacks` under each of `policies`, a
/// listener apiece. FAIL_CLOSED and FAIL_OPEN scenarios (and FAIL_RELOAD ones if
/// `reload_under_load`) are loaded all at once; then every scenario is checked in the state its
/// policy settles in. Without `reload_under_load`, FAIL_RELOAD scenarios get no concurrent load,
/// only the settled checks, one request at a time: under concurrent load the gateway mixes up
/// streams across a rebuild (see streams_in_flight_across_a_fail_reload_keep_their_own_contexts).
fn fatal_matrix(
    action: &str,
    callbacks: &[&StreamCallback],
    policies: &[Policy],
    load_shape: Load,
    limits: &str,
    reload_under_load: bool,
) -> Gateway {
    let upstream = Upstream::start();
    let wasm = hostile_wasm();
    let mut scenarios = Vec::new();
    let mut listeners = Vec::new();
    for callback in callbacks {
        for &policy in policies {
            let name = format!(
                "{}-{}",
                callback.name.trim_start_matches("on_"),
                policy.short()
            );
            let configuration = format!(
                "{{\"action\":\"{action}\",\"in\":\"{}\",\"only_if_header\":\"x-hostile\"}}",
                callback.name
            );
            listeners.push((
                name.clone(),
                filter(&name, policy, &wasm, &configuration, None),
            ));
            scenarios.push((name, *callback, policy));
        }
    }
    let mut gateway = Gateway::start(&gateway_yaml(upstream.address, &listeners, limits));
    let watch = Watch::start(gateway.listener("other"));

    // The loaded scenarios all at once, each from its own threads.
    let loaded = |policy: Policy| policy != Policy::Reload || reload_under_load;
    let runs: Vec<_> = scenarios
        .iter()
        .filter(|(_, _, policy)| loaded(*policy))
        .map(|(name, callback, policy)| {
            let address = gateway.listener(name);
            let (kind, tasks) = (callback.kind, load_shape.tasks);
            let jobs = jobs(load_shape.requests, load_shape.hostile_every);
            let run = std::thread::spawn(move || load(address, kind, jobs, tasks));
            (name, callback, *policy, run)
        })
        .collect();
    let mut problems = Vec::new();
    for (name, callback, policy, run) in runs {
        for (hostile, id, reply) in run.join().unwrap() {
            let allowed = allowed(policy, callback.stage, hostile);
            if !allowed.contains(&reply.outcome()) {
                problems.push(format!(
                    "{name}: {} request {id} got {:?}, expected one of {allowed:?}: {reply:?}",
                    if hostile { "hostile" } else { "normal" },
                    reply.outcome()
                ));
            }
            // Whatever a stream's fate, it never sees another request's context.
            if let Some(seen) = reply.header("x-hostile-id-seen")
                && seen != id
            {
                problems.push(format!(
                    "{name}: request {id} saw {seen}'s context: {reply:?}"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} answers broke the policy:\n{}\nlog:\n{}",
        problems.len(),
        problems.join("\n"),
        gateway.log_tail()
    );
    watch.assert_served();
    gateway.assert_alive_and_ready(&format!("{action} under load"));

    // The settled state, each scenario from its own thread (FAIL_RELOAD's backoff makes its
    // recovery take seconds), one request at a time within a scenario.
    let checks: Vec<_> = scenarios
        .iter()
        .map(|(name, callback, policy)| {
            let (name, kind, stage, policy) =
                (name.clone(), callback.kind, callback.stage, *policy);
            let address = gateway.listener(&name);
            std::thread::spawn(move || settled_problems(&name, kind, stage, policy, address))
        })
        .collect();
    let problems: Vec<String> = checks
        .into_iter()
        .flat_map(|check| check.join().unwrap())
        .collect();
    assert!(
        problems.is_empty(),
        "{}\nlog:\n{}",
        problems.join("\n"),
        gateway.log_tail()
    );
    for (name, callback, _) in &scenarios {
        assert!(
            gateway.misdeed_logged(name, callback.name),
            "{name}: the plugin never reached its misdeed in {}",
            callback.name
        );
    }
    let reply = send(
        gateway.listener("other"),
        &request(Kind::Get, false, "other"),
    );
    assert_eq!(
        reply.outcome(),
        Outcome::Ok,
        "other after {action}: {reply:?}"
    );
    gateway.assert_alive_and_ready(&format!("{action}: the settled checks"));
    gateway
}

/// Checks the state a failure policy settles in, after the load; returns what is wrong.
fn settled_problems(
    name: &str,
    kind: Kind,
    stage: Stage,
    policy: Policy,
    address: SocketAddr,
) -> Vec<String> {
    let normal = || send(address, &request(kind, false, "settled"));
    let hostile = || send(address, &request(kind, true, "settled-hostile"));
    let mut problems = Vec::new();
    let mut expect = |what: &str, reply: Reply, expected: Outcome| {
        if reply.outcome() != expected {
            problems.push(format!(
                "{name}: {what}: expected {expected:?}, got {reply:?}"
            ));
        }
    };
    match policy {
        Policy::Closed => {
            // The VM stays failed: every request that reaches it, normal or not.
            for round in 0..3 {
                expect(&format!("normal {round}"), normal(), Outcome::Unavailable);
            }
            expect("hostile", hostile(), Outcome::Unavailable);
        }
        Policy::Open => {
            expect("normal", normal(), Outcome::Ok);
            expect("hostile", hostile(), Outcome::Ok);
        }
        Policy::Reload => {
            // Twice: a fresh VM serves normal requests again (once the backoff allows a rebuild),
            // and a hostile request fails it as it failed the first.
            for round in 0..2 {
                if !eventually(SETTLE, || normal().outcome() == Outcome::Ok) {
                    problems.push(format!(
                        "{name}: no VM served a normal request (round {round})"
                    ));
                    return problems;
                }
                let reply = hostile();
                let allowed = allowed(policy, stage, true);
                // Only a failure after the response leaves this request whole.
                if !allowed.contains(&reply.outcome())
                    || (stage != Stage::AfterResponse && reply.outcome() == Outcome::Ok)
                {
                    problems.push(format!(
                        "{name}: hostile request (round {round}): expected one of {allowed:?}, \
                         got {reply:?}"
                    ));
                }
            }
            if !eventually(SETTLE, || normal().outcome() == Outcome::Ok) {
                problems.push(format!("{name}: no fresh VM after the second failure"));
            }
        }
    }
    problems
}

#[test]
fn a_panic_in_each_stream_callback_gets_the_failure_policy_outcome() {
    let callbacks: Vec<&StreamCallback> = STREAM_CALLBACKS.iter().collect();
    fatal_matrix(
        "panic",
        &callbacks,
        &POLICIES,
        Load {
            tasks: 8,
            requests: 200,
            hostile_every: 3,
        },
        "",
        false,
    );
}

#[test]
fn fail_reload_under_concurrent_load_gives_each_stream_the_policy_outcome() {
    let callbacks: Vec<&StreamCallback> = STREAM_CALLBACKS.iter().collect();
    fatal_matrix(
        "panic",
        &callbacks,
        &[Policy::Reload],
        Load {
            tasks: 8,
            requests: 200,
            hostile_every: 3,
        },
        "",
        true,
    );
}

#[test]
fn an_endless_loop_in_each_stream_callback_is_stopped_by_the_time_limit() {
    // A hostile request that meets a working VM holds the one worker for the 200 ms limit, so
    // fewer requests than for panics.
    let callbacks: Vec<&StreamCallback> = STREAM_CALLBACKS.iter().collect();
    let gateway = fatal_matrix(
        "loop",
        &callbacks,
        &POLICIES,
        Load {
            tasks: 3,
            requests: 12,
            hostile_every: 6,
        },
        "",
        false,
    );
    // The limit, not something else, ended the loops.
    assert!(
        gateway.log().contains("200ms callback time limit"),
        "no callback stopped at the time limit; log:\n{}",
        gateway.log_tail()
    );
}

#[test]
fn deep_recursion_overflows_the_stack_and_gets_the_failure_policy_outcome() {
    let callbacks: Vec<&StreamCallback> = STREAM_CALLBACKS
        .iter()
        .filter(|c| ["on_request_headers", "on_response_body", "on_log"].contains(&c.name))
        .collect();
    let gateway = fatal_matrix(
        "recurse",
        &callbacks,
        &POLICIES,
        Load {
            tasks: 4,
            requests: 16,
            hostile_every: 4,
        },
        "",
        false,
    );
    // wasmtime's trap for a wasm stack past plugin_limits.max_stack_bytes.
    assert!(
        gateway.log().contains("call stack exhausted"),
        "no stack overflow trap; log:\n{}",
        gateway.log_tail()
    );
}

#[test]
fn a_memory_bomb_is_stopped_by_the_per_vm_memory_limit() {
    // 32 MiB per VM: the bomb's 1 MiB chunks run into it after some 30 allocations, the failed
    // allocation aborts (a trap), and the policy takes over.
    let callbacks: Vec<&StreamCallback> = STREAM_CALLBACKS
        .iter()
        .filter(|c| ["on_request_headers", "on_response_body", "on_log"].contains(&c.name))
        .collect();
    let gateway = fatal_matrix(
        "memory_bomb",
        &callbacks,
        &POLICIES,
        Load {
            tasks: 4,
            requests: 16,
            hostile_every: 4,
        },
        ", max_memory_bytes: 33554432",
        false,
    );
    // The per-VM limit refused the growth (not the process, nor the pool running out).
    assert!(
        gateway
            .log()
            .lines()
            .any(|l| l.contains("max_memory_bytes") && l.contains("33554432")),
        "no growth refused at the 32 MiB limit; log:\n{}",
        gateway.log_tail()
    );
}

// ------------------------------------------------------------------------------------------------
// Root callbacks: tick, queue, the root's own http_call.
// ------------------------------------------------------------------------------------------------

#[test]
fn panics_and_loops_in_root_callbacks_get_the_failure_policy_outcome() {
    let upstream = Upstream::start();
    let wasm = hostile_wasm();
    let mut scenarios = Vec::new();
    let mut listeners = Vec::new();
    for callback in ["on_tick", "on_queue_ready", "on_root_http_call_response"] {
        for action in ["panic", "loop"] {
            for policy in POLICIES {
                let name = format!(
                    "{}-{action}-{}",
                    callback.trim_start_matches("on_"),
                    policy.short()
                );
                // A request with x-hostile arms the root callback (or, for the queue, enqueues
                // the message that calls it); it misbehaves once per arming.
                let configuration = format!(
                    "{{\"action\":\"{action}\",\"in\":\"{callback}\",\"only_if_header\":\"x-hostile\",\"tick_ms\":50}}"
                );
                listeners.push((
                    name.clone(),
                    filter(&name, policy, &wasm, &configuration, None),
                ));
                scenarios.push((name, callback, policy));
            }
        }
    }
    let mut gateway = Gateway::start(&gateway_yaml(upstream.address, &listeners, ""));
    let watch = Watch::start(gateway.listener("other"));
    let runs: Vec<_> = scenarios
        .iter()
        .map(|(name, callback, policy)| {
            let (name, callback, policy) = (name.clone(), *callback, *policy);
            let address = gateway.listener(&name);
            let log = gateway.log.clone();
            std::thread::spawn(move || root_scenario(&name, callback, policy, address, &log))
        })
        .collect();
    let problems: Vec<String> = runs
        .into_iter()
        .flat_map(|run| run.join().unwrap())
        .collect();
    assert!(
        problems.is_empty(),
        "{}\nlog:\n{}",
        problems.join("\n"),
        gateway.log_tail()
    );
    watch.assert_served();
    gateway.assert_alive_and_ready("misdeeds in root callbacks");
}

/// One root-callback scenario; returns what went against the policy.
fn root_scenario(
    name: &str,
    callback: &str,
    policy: Policy,
    address: SocketAddr,
    log: &Path,
) -> Vec<String> {
    let mut problems = Vec::new();
    let expect = |problems: &mut Vec<String>, what: &str, reply: Reply, allowed: &[Outcome]| {
        if !allowed.contains(&reply.outcome()) {
            problems.push(format!(
                "{name}: {what} got {:?}, expected one of {allowed:?}: {reply:?}",
                reply.outcome()
            ));
        }
    };
    let normal = || send(address, &request(Kind::Get, false, "normal"));
    // The arming request itself passes; the root callback fails the VM after it, or while it
    // is still being answered.
    let arming = send(address, &request(Kind::Get, true, "arming"));
    let arming_allowed: &[Outcome] = match policy {
        Policy::Open => &[Outcome::Ok],
        _ => &[Outcome::Ok, Outcome::Unavailable],
    };
    expect(&mut problems, "the arming request", arming, arming_allowed);
    // The misdeed's own log line comes from the callback that then fails the VM, before the
    // worker (the one) can take another request: once it shows, the failure has happened.
    if !eventually(SETTLE, || misdeed_logged(log, name, callback)) {
        return vec![format!(
            "{name}: the plugin never reached its misdeed in {callback}"
        )];
    }
    let settled = match policy {
        Policy::Closed => Outcome::Unavailable,
        Policy::Open => Outcome::Ok,
        Policy::Reload => {
            // A fresh VM (unarmed) once the reload (backoff) lets one be built.
            if !eventually(SETTLE, || normal().outcome() == Outcome::Ok) {
                problems.push(format!("{name}: no fresh VM served a normal request"));
            }
            Outcome::Ok
        }
    };
    for (_, id, reply) in load(address, Kind::Get, jobs(16, 0), 4) {
        expect(
            &mut problems,
            &format!("settled request {id}"),
            reply,
            &[settled],
        );
    }
    problems
}

// ------------------------------------------------------------------------------------------------
// Start-up callbacks: vm start and configure.
// ------------------------------------------------------------------------------------------------

#[test]
fn a_plugin_failing_at_start_up_stops_the_gateway_from_starting() {
    // As Envoy: a plugin whose vm start or configure traps rejects the configuration at start-up,
    // whatever its failure policy (Envoy 1.40 exits with "Plugin configured to fail closed failed
    // to load" for FAIL_OPEN too).
    let upstream = Upstream::start();
    let wasm = hostile_wasm();
    for (action, callback) in [
        ("panic", "on_vm_start"),
        ("loop", "on_configure"),
        ("recurse", "on_configure"),
    ] {
        for policy in [Policy::Closed, Policy::Open] {
            let spec = format!("{{\"action\":\"{action}\",\"in\":\"{callback}\"}}");
            // on_vm_start reads its misdeed from the VM configuration.
            let filters = filter("starting", policy, &wasm, &spec, Some(&spec));
            let dir = tempfile::tempdir().unwrap();
            let config = dir.path().join("gateway.yaml");
            std::fs::write(
                &config,
                gateway_yaml(upstream.address, &[("starting".to_owned(), filters)], ""),
            )
            .unwrap();
            let stderr = dir.path().join("stderr");
            let mut child = wasmgate()
                .args(["run", "--config", config.to_str().unwrap()])
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&stderr).unwrap())
                .spawn()
                .unwrap();
            let mut exit = None;
            let exited = eventually(SETTLE, || {
                exit = child.try_wait().unwrap();
                exit.is_some()
            });
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
            let log = std::fs::read_to_string(&stderr).unwrap();
            assert!(
                exited,
                "{action} in {callback} ({policy:?}): the gateway neither started nor exited:\n{log}"
            );
            assert!(
                !exit.unwrap().success(),
                "{action} in {callback} ({policy:?}) started:\n{log}"
            );
            let proxy_callback = format!("proxy_{callback}");
            assert!(
                log.lines().any(|l| l.starts_with("error:")
                    && l.contains("starting")
                    && l.contains(&proxy_callback)),
                "{action} in {callback} ({policy:?}): the error names neither the plugin nor \
                 the callback:\n{log}"
            );
        }
    }
}

#[test]
fn a_fail_reload_whose_new_vm_fails_to_start_keeps_answering_503() {
    // The plugin starts fine; a request with x-hostile arms its start-up misdeed (process-wide
    // shared data, which outlives the VM) and fails the VM, so FAIL_RELOAD builds another,
    // whose vm start or configure now misbehaves: every request gets 503, and the other route
    // does not notice.
    let upstream = Upstream::start();
    let wasm = hostile_wasm();
    let scenarios = [
        ("panic", "on_configure"),
        ("loop", "on_vm_start"),
        ("recurse", "on_configure"),
    ];
    let mut listeners = Vec::new();
    for (action, callback) in scenarios {
        let name = format!("{}-{action}", callback.trim_start_matches("on_"));
        let spec = format!(
            "{{\"action\":\"{action}\",\"in\":\"{callback}\",\"only_if_header\":\"x-hostile\"}}"
        );
        listeners.push((
            name.clone(),
            filter(&name, Policy::Reload, &wasm, &spec, Some(&spec)),
        ));
    }
    let mut gateway = Gateway::start(&gateway_yaml(upstream.address, &listeners, ""));
    let watch = Watch::start(gateway.listener("other"));
    let runs: Vec<_> = scenarios
        .iter()
        .map(|(action, callback)| {
            let name = format!("{}-{action}", callback.trim_start_matches("on_"));
            let address = gateway.listener(&name);
            std::thread::spawn(move || {
                let first = send(address, &request(Kind::Get, false, "first"));
                let arming = send(address, &request(Kind::Get, true, "arming"));
                // Few: with a loop in the start-up, each failed rebuild holds the worker for the
                // time limit.
                let after = load(address, Kind::Get, jobs(6, 0), 2);
                (name, first, arming, after)
            })
        })
        .collect();
    for (run, (_, callback)) in runs.into_iter().zip(scenarios) {
        let (name, first, arming, after) = run.join().unwrap();
        assert_eq!(first.outcome(), Outcome::Ok, "{name}: {first:?}");
        assert_eq!(arming.outcome(), Outcome::Unavailable, "{name}: {arming:?}");
        for (_, id, reply) in after {
            assert_eq!(
                reply.outcome(),
                Outcome::Unavailable,
                "{name}: request {id} after the failed rebuilds: {reply:?}"
            );
        }
        assert!(
            gateway.misdeed_logged(&name, callback),
            "{name}: the rebuilt VM never ran its misdeed in {callback}; log:\n{}",
            gateway.log_tail()
        );
    }
    watch.assert_served();
    gateway.assert_alive_and_ready("failed rebuilds");
}

#[test]
fn a_hot_reload_to_a_plugin_that_fails_to_configure_is_refused_and_the_old_one_serves() {
    let upstream = Upstream::start();
    let wasm = hostile_wasm();
    // Harmless at first: one log line, and only for requests with x-hostile.
    let harmless =
        "{\"action\":\"log_flood\",\"in\":\"on_log\",\"lines\":1,\"only_if_header\":\"x-hostile\"}";
    let yaml = |configuration: &str| {
        gateway_yaml(
            upstream.address,
            &[(
                "hot".to_owned(),
                filter("hot", Policy::Closed, &wasm, configuration, None),
            )],
            "",
        )
    };
    let mut gateway = Gateway::start(&yaml(harmless));
    let hot = gateway.listener("hot");
    let watch = Watch::start(gateway.listener("other"));
    assert_eq!(
        send(hot, &request(Kind::Get, false, "before")).outcome(),
        Outcome::Ok
    );
    for (attempt, action) in ["panic", "loop"].into_iter().enumerate() {
        let hostile = format!("{{\"action\":\"{action}\",\"in\":\"on_configure\"}}");
        // Replaced whole (rename), so the watcher never reads half a file.
        let partial = gateway.config.with_extension("partial");
        std::fs::write(&partial, yaml(&hostile)).unwrap();
        std::fs::rename(&partial, &gateway.config).unwrap();
        let refused = eventually(SETTLE, || {
            reload_failures(gateway.running.admin) > attempt as u64
        });
        assert!(
            refused,
            "the reload to {action} in on_configure was not refused; log:\n{}",
            gateway.log_tail()
        );
        // The serving chain stays: the earlier, harmless VM answers.
        let reply = send(hot, &request(Kind::Get, false, "after"));
        assert_eq!(
            reply.outcome(),
            Outcome::Ok,
            "after the refused {action}: {reply:?}"
        );
        gateway.assert_alive_and_ready(&format!("a refused reload ({action})"));
    }
    watch.assert_served();
}

fn reload_failures(admin: SocketAddr) -> u64 {
    let stats = send(
        admin,
        "GET /stats/prometheus HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    );
    stats
        .body()
        .lines()
        .find_map(|l| l.strip_prefix("wasmgate_config_reloads_total{result=\"failure\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

// ------------------------------------------------------------------------------------------------
// Host calls at odd times, and local replies from everywhere.
// ------------------------------------------------------------------------------------------------

/// Callbacks that run before `on_response_headers` adds `x-hostile-statuses`, so the statuses the
/// host answered there reach the client.
fn statuses_visible(callback: &str) -> bool {
    [
        "on_request_headers",
        "on_request_body",
        "on_request_trailers",
        "on_http_call_response",
        "on_response_headers",
    ]
    .contains(&callback)
}

#[test]
fn proxy_done_continue_and_close_at_odd_times_and_local_replies_from_anywhere() {
    let upstream = Upstream::start();
    let wasm = hostile_wasm();
    let actions = [
        "done_early",
        "continue_request",
        "continue_response",
        "continue_early",
        "close_early",
        "local_reply",
    ];
    let mut scenarios = Vec::new();
    let mut listeners = Vec::new();
    for action in actions {
        for callback in &STREAM_CALLBACKS {
            let name = format!("{action}-{}", callback.name.trim_start_matches("on_"));
            let configuration = format!("{{\"action\":\"{action}\",\"in\":\"{}\"}}", callback.name);
            listeners.push((
                name.clone(),
                filter(&name, Policy::Closed, &wasm, &configuration, None),
            ));
            scenarios.push((name, action, callback));
        }
        // The same from the root, on every tick (no stream to continue, close or answer).
        let name = format!("{action}-tick");
        let configuration =
            format!("{{\"action\":\"{action}\",\"in\":\"on_tick\",\"tick_ms\":20}}");
        listeners.push((
            name.clone(),
            filter(&name, Policy::Closed, &wasm, &configuration, None),
        ));
    }
    let mut gateway = Gateway::start(&gateway_yaml(upstream.address, &listeners, ""));
    let watch = Watch::start(gateway.listener("other"));
    let runs: Vec<_> = scenarios
        .iter()
        .map(|(name, _, callback)| {
            let address = gateway.listener(name);
            let kind = callback.kind;
            // Every request misbehaves (no only_if_header): jobs are all "normal".
            std::thread::spawn(move || load(address, kind, jobs(12, 0), 3))
        })
        .collect();
    let mut problems = Vec::new();
    let mut close_outcomes = std::collections::BTreeSet::new();
    for ((name, action, callback), run) in scenarios.iter().zip(runs) {
        for (_, id, reply) in run.join().unwrap() {
            if let Some(problem) = odd_reply_problem(action, callback.name, &reply) {
                problems.push(format!("{name} request {id}: {problem}: {reply:?}"));
            }
            if *action == "close_early" {
                close_outcomes.insert(format!("{}: {:?}", callback.name, reply.outcome()));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} odd answers:\n{}\nlog:\n{}",
        problems.len(),
        problems.join("\n"),
        gateway.log_tail()
    );
    // What proxy_close_stream did, for whoever reads the test's output.
    eprintln!("proxy_close_stream outcomes: {close_outcomes:?}");
    for action in actions {
        let name = format!("{action}-tick");
        assert!(
            eventually(SETTLE, || gateway.misdeed_logged(&name, "on_tick")),
            "{name}: no tick misbehaved"
        );
        let reply = send(gateway.listener(&name), &request(Kind::Get, false, "tick"));
        assert_eq!(reply.outcome(), Outcome::Ok, "{name}: {reply:?}");
    }
    watch.assert_served();
    gateway.assert_alive_and_ready("odd host calls");
}

/// What is wrong with `reply` to a request whose plugin did `action` in `callback`, if anything.
fn odd_reply_problem(action: &str, callback: &str, reply: &Reply) -> Option<String> {
    if reply
        .error
        .as_deref()
        .is_some_and(|e| e.contains("TimedOut") || e.contains("WouldBlock"))
    {
        return Some("no answer: the stream hung".to_owned());
    }
    let statuses = reply.header("x-hostile-statuses");
    let expect_statuses = |expected: String| {
        (statuses_visible(callback) && statuses != Some(expected.as_str()))
            .then(|| format!("x-hostile-statuses {statuses:?}, expected {expected:?}"))
    };
    match action {
        // proxy_close_stream resets the stream, as Envoy means it (Envoy 1.40 itself crashes in
        // most callbacks): no response before the head is out, a cut-short one after, and
        // nothing left to close once the response went out whole (on_log, on_done).
        "close_early" => match callback {
            "on_log" | "on_done" => {
                (reply.outcome() != Outcome::Ok).then(|| "expected the upstream's 200".to_owned())
            }
            "on_request_headers"
            | "on_request_body"
            | "on_request_trailers"
            | "on_response_headers" => {
                (reply.status != 0).then(|| "expected a reset with no response".to_owned())
            }
            _ => (reply.status != 0 && reply.outcome() != Outcome::CutShort)
                .then(|| "expected a reset: no response, or one cut short".to_owned()),
        },
        "local_reply" => match callback {
            // After the response (on_log, on_done) a reply has nothing left to replace: the
            // response went out whole. (Envoy 1.40 crashes here.)
            "on_log" | "on_done" => {
                (reply.outcome() != Outcome::Ok).then(|| "expected the upstream's 200".to_owned())
            }
            // After the head and body went out a reply cannot replace them: the stream is
            // ended without its last chunk, as Envoy resets a stream whose head went out.
            "on_response_trailers" => (reply.outcome() != Outcome::CutShort
                || reply.text.contains(" 418 "))
            .then(|| "expected the upstream's 200 cut short".to_owned()),
            // Before the head went out (Wasmgate holds the head until the first body bytes
            // passed the chain, so on_response_body too) the reply replaces the response.
            _ => {
                let expected_body = format!("hostile reply from {callback}");
                (reply.status != 418
                    || !reply.complete
                    || reply.body() != expected_body
                    || reply.header("x-hostile-reply") != Some(callback))
                .then(|| format!("expected the plugin's whole 418 {expected_body:?}"))
            }
        },
        _ => {
            if reply.outcome() != Outcome::Ok {
                return Some("expected the upstream's whole 200".to_owned());
            }
            // One response head: a continue of the response while it was not paused must not
            // send the head again (Envoy 1.40 sends it twice from on_response_headers).
            if reply.text.matches("HTTP/1.1 ").count() != 1 {
                return Some("more than one response head".to_owned());
            }
            match action {
                // NOT_FOUND, as Envoy: no proxy_on_done answered false.
                "done_early" => expect_statuses(format!("{callback}:done=1")),
                "continue_request" => expect_statuses(format!("{callback}:continue_request=0")),
                "continue_response" => expect_statuses(format!("{callback}:continue_response=0")),
                _ => expect_statuses(format!("{callback}:continue_request=0,continue_response=0")),
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// A log flood.
// ------------------------------------------------------------------------------------------------

#[test]
fn a_log_flood_neither_stops_the_gateway_nor_fails_requests() {
    let upstream = Upstream::start();
    let wasm = hostile_wasm();
    let listeners = [
        (
            "flood-requests".to_owned(),
            filter(
                "flood-requests",
                Policy::Closed,
                &wasm,
                "{\"action\":\"log_flood\",\"in\":\"on_request_headers\",\"lines\":300,\"line_bytes\":200}",
                None,
            ),
        ),
        (
            "flood-ticks".to_owned(),
            filter(
                "flood-ticks",
                Policy::Closed,
                &wasm,
                "{\"action\":\"log_flood\",\"in\":\"on_tick\",\"tick_ms\":20,\"lines\":300,\"line_bytes\":200}",
                None,
            ),
        ),
    ];
    let mut gateway = Gateway::start(&gateway_yaml(upstream.address, &listeners, ""));
    let watch = Watch::start(gateway.listener("other"));
    let ticks = gateway.listener("flood-ticks");
    let ticking = std::thread::spawn(move || load(ticks, Kind::Get, jobs(40, 0), 2));
    let flooded = load(
        gateway.listener("flood-requests"),
        Kind::Get,
        jobs(200, 0),
        8,
    );
    for (_, id, reply) in flooded {
        assert_eq!(reply.outcome(), Outcome::Ok, "request {id}: {reply:?}");
        assert_eq!(
            reply.header("x-hostile-statuses"),
            Some("on_request_headers:flooded=300"),
            "request {id}: {reply:?}"
        );
    }
    for (_, id, reply) in ticking.join().unwrap() {
        assert_eq!(
            reply.outcome(),
            Outcome::Ok,
            "flood-ticks request {id}: {reply:?}"
        );
    }
    let log = gateway.log();
    assert!(
        log.contains("hostile flood on_request_headers 299 "),
        "no request flood in the log"
    );
    assert!(
        log.contains("hostile flood on_tick 299 "),
        "no tick flood in the log"
    );
    watch.assert_served();
    gateway.assert_alive_and_ready("a log flood");
}

// ------------------------------------------------------------------------------------------------
// Hand-written allocators (WAT): garbage answers and a trap inside a host call.
// ------------------------------------------------------------------------------------------------

#[test]
fn an_allocator_answering_garbage_gets_errors_and_one_that_traps_fails_the_vm() {
    let upstream = Upstream::start();
    let dir = tempfile::tempdir().unwrap();
    let garbage = wat_module(dir.path(), "garbage-allocator");
    let trapping = wat_module(dir.path(), "trapping-allocator");
    let listeners = [
        (
            "garbage".to_owned(),
            filter("garbage", Policy::Closed, &garbage, "{}", None),
        ),
        (
            "trapping-closed".to_owned(),
            filter("trapping-closed", Policy::Closed, &trapping, "{}", None),
        ),
        (
            "trapping-open".to_owned(),
            filter("trapping-open", Policy::Open, &trapping, "{}", None),
        ),
        (
            "trapping-reload".to_owned(),
            filter("trapping-reload", Policy::Reload, &trapping, "{}", None),
        ),
    ];
    let mut gateway = Gateway::start(&gateway_yaml(upstream.address, &listeners, ""));
    let watch = Watch::start(gateway.listener("other"));
    // What each listener's every answer must be.
    let expected = [
        ("garbage", Outcome::Ok),
        ("trapping-closed", Outcome::Unavailable),
        ("trapping-open", Outcome::Ok),
        // Every request traps its fresh VM.
        ("trapping-reload", Outcome::Unavailable),
    ];
    let runs: Vec<_> = expected
        .iter()
        .map(|(name, _)| {
            let address = gateway.listener(name);
            std::thread::spawn(move || load(address, Kind::Get, jobs(32, 0), 4))
        })
        .collect();
    for ((name, outcome), run) in expected.iter().zip(runs) {
        for (_, id, reply) in run.join().unwrap() {
            assert_eq!(reply.outcome(), *outcome, "{name} request {id}: {reply:?}");
            if *name == "garbage" {
                // Null, u32::MAX, past the end and straddling the end are INVALID_MEMORY_ACCESS
                // (6); the in-bounds answer that aliases the out-parameters is the guest's own
                // business: OK.
                assert_eq!(
                    reply.header("x-alloc-statuses"),
                    Some("6,6,6,6,0,"),
                    "{name} request {id}: {reply:?}"
                );
            }
        }
    }
    watch.assert_served();
    gateway.assert_alive_and_ready("garbage and trapping allocators");
}

#[test]
fn a_fail_open_plugin_that_traps_after_editing_the_headers_leaves_them_as_they_were() {
    let upstream = echo_upstream();
    let dir = tempfile::tempdir().unwrap();
    let module = wat_module(dir.path(), "edit-then-trap");
    let listeners = [(
        "edit-open".to_owned(),
        filter("edit-open", Policy::Open, &module, "{}", None),
    )];
    let mut gateway = Gateway::start(&gateway_yaml(upstream, &listeners, ""));
    let reply = send(
        gateway.listener("edit-open"),
        "GET /edited HTTP/1.1\r\nhost: example.com\r\nx-kept: yes\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(reply.status, 200, "{reply:?}");
    // The echo upstream answers with the request head it received.
    assert!(reply.text.contains("x-kept: yes"), "{reply:?}");
    assert!(
        !reply.text.contains("x-edited"),
        "the failed plugin's edit reached the upstream: {reply:?}"
    );
    assert!(
        gateway.log().contains("edit-open"),
        "the trap is not logged:\n{}",
        gateway.log_tail()
    );
    gateway.assert_alive_and_ready("a FAIL_OPEN plugin trapping after an edit");
}

// ------------------------------------------------------------------------------------------------
// FAIL_RELOAD in depth.
// ------------------------------------------------------------------------------------------------

#[test]
fn a_vm_rebuilt_by_fail_reload_can_still_reply_and_call_out() {
    let upstream = Upstream::start();
    let configuration = "[{\"action\":\"local_reply\",\"in\":\"on_request_headers\",\"only_if_header\":\"x-reply\"},{\"action\":\"log_flood\",\"lines\":1,\"in\":\"on_http_call_response\",\"only_if_header\":\"x-call\"},{\"action\":\"panic\",\"in\":\"on_request_headers\",\"only_if_header\":\"x-crash\"}]";
    let listeners = [(
        "rebuilt".to_owned(),
        filter(
            "rebuilt",
            Policy::Reload,
            &hostile_wasm(),
            configuration,
            None,
        ),
    )];
    let mut gateway = Gateway::start(&gateway_yaml(upstream.address, &listeners, ""));
    let address = gateway.listener("rebuilt");
    // A local reply and a paused http_call take milliseconds; far past that is a hang.
    let patience = Duration::from_secs(10);
    let check = |when: &str| {
        let reply = send_within(
            address,
            &request_with(Kind::Get, "x-reply: 1\r\n", "r"),
            patience,
        );
        assert_eq!(reply.status, 418, "local reply {when}: {reply:?}");
        let reply = send_within(
            address,
            &request_with(Kind::Get, "x-call: 1\r\n", "c"),
            patience,
        );
        assert_eq!(reply.outcome(), Outcome::Ok, "http_call {when}: {reply:?}");
        assert_eq!(
            reply.header("x-hostile-statuses"),
            Some("on_http_call_response:flooded=1"),
            "http_call {when}: {reply:?}"
        );
    };
    check("on the first VM");
    let crash = send(address, &request_with(Kind::Get, "x-crash: 1\r\n", "x"));
    assert_eq!(crash.outcome(), Outcome::Unavailable, "{crash:?}");
    assert!(
        eventually(SETTLE, || send(address, &request(Kind::Get, false, "n"))
            .outcome()
            == Outcome::Ok),
        "no VM was rebuilt"
    );
    check("on the rebuilt VM");
    gateway.assert_alive_and_ready("a rebuilt VM");
}

#[test]
fn streams_in_flight_across_a_fail_reload_keep_their_own_contexts() {
    let upstream = Upstream::start();
    let listeners = [(
        "crossing".to_owned(),
        filter(
            "crossing",
            Policy::Reload,
            &hostile_wasm(),
            "{\"action\":\"panic\",\"in\":\"on_request_headers\",\"only_if_header\":\"x-hostile\"}",
            None,
        ),
    )];
    let mut gateway = Gateway::start(&gateway_yaml(upstream.address, &listeners, ""));
    let address = gateway.listener("crossing");
    let in_flight = |prefix: &'static str| -> Vec<JoinHandle<(String, Reply)>> {
        (0..3)
            .map(|i| {
                std::thread::spawn(move || {
                    let id = format!("{prefix}{i}");
                    let reply = send(address, &request(Kind::GetSlow, false, &id));
                    (id, reply)
                })
            })
            .collect()
    };
    // Three streams on the first VM, held at the upstream...
    let old = in_flight("old");
    assert!(eventually(SETTLE, || upstream
        .slow_arrivals
        .load(Ordering::SeqCst)
        == 3));
    // ...the VM fails under them...
    let crash = send(address, &request(Kind::Get, true, "crash"));
    assert_eq!(crash.outcome(), Outcome::Unavailable, "{crash:?}");
    // ...and three new streams start on the rebuilt VM.
    let new = in_flight("new");
    assert!(eventually(SETTLE, || upstream
        .slow_arrivals
        .load(Ordering::SeqCst)
        == 6));
    upstream.open_gate();
    let mut problems = Vec::new();
    for (id, reply) in old.into_iter().chain(new).map(|t| t.join().unwrap()) {
        // Whatever else happens, no stream sees another request's context.
        if let Some(seen) = reply.header("x-hostile-id-seen")
            && seen != id
        {
            problems.push(format!("{id} saw {seen}'s context: {reply:?}"));
        }
        // The new streams did nothing wrong, on a healthy VM. (The old ones lost their VM.)
        if id.starts_with("new") && reply.outcome() != Outcome::Ok {
            problems.push(format!("{id} failed: {reply:?}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    gateway.assert_alive_and_ready("streams across a reload");
}
