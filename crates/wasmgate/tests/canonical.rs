//! The canonical plugins through the binary, on real sockets: `plugins/ext-authz` against a real
//! authorization server, and `plugins/rate-limit` with its buckets shared by two workers.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use parking_lot::Mutex;

/// The values of header `name` in a request or response head (the text up to the blank line).
fn header_values(text: &str, name: &str) -> Vec<String> {
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    head.lines()
        .skip(1)
        .filter_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
        .collect()
}

fn header(text: &str, name: &str) -> Option<String> {
    header_values(text, name).into_iter().next()
}

fn body(text: &str) -> &str {
    text.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// An HTTP/1.1 server on a thread that records every request (head and content-length body)
/// and answers each with the raw response `answer` writes for it, then closes the connection.
struct Recording {
    address: SocketAddr,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Recording {
    fn start(answer: fn(&str) -> String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let recorded = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let recorded = recorded.clone();
                std::thread::spawn(move || {
                    let mut writer = stream.try_clone().unwrap();
                    let Some(request) = read_request(stream) else {
                        return;
                    };
                    recorded.lock().push(request.clone());
                    let _ = writer.write_all(answer(&request).as_bytes());
                });
            }
        });
        Self { address, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().clone()
    }

    fn count(&self) -> usize {
        self.requests.lock().len()
    }
}

fn read_request(stream: TcpStream) -> Option<String> {
    let mut reader = BufReader::new(stream);
    let mut request = String::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok()?;
        }
        request.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    request.push_str(&String::from_utf8_lossy(&body));
    Some(request)
}

fn response(status: &str, headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// The upstream: 200 `upstream says hi` to everything.
fn upstream_answer(_request: &str) -> String {
    response("200 OK", "", "upstream says hi")
}

/// The authorization service: `Bearer good` is alice; no credentials get a 401 challenge;
/// `Bearer redirect` is sent to a login page; anything else is refused.
fn auth_answer(request: &str) -> String {
    match header(request, "authorization").as_deref() {
        Some("Bearer good") => response("200 OK", "x-user: alice\r\nx-internal: secret\r\n", ""),
        None => response(
            "401 Unauthorized",
            "www-authenticate: Bearer realm=\"test\"\r\nx-internal: secret\r\ncontent-type: text/plain\r\n",
            "token required",
        ),
        Some("Bearer redirect") => response("302 Found", "location: /login\r\n", "log in first"),
        Some(_) => response("403 Forbidden", "", "denied by auth server"),
    }
}

/// A server that accepts connections and never answers.
fn silent_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream);
        }
    });
    address
}

/// An address nothing listens on.
fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn filter(name: &str, wasm: &std::path::Path, configuration: &str) -> String {
    format!(
        "      - name: {name}\n        configuration: {configuration}\n        vm_config: {{ code: {{ local: {{ filename: {} }} }} }}\n",
        wasm.display()
    )
}

fn listener(name: &str, filters: &str) -> String {
    format!(
        "  - name: {name}\n    address: 127.0.0.1:0\n    http_filters:\n{filters}    routes: [ {{ match: {{ prefix: / }}, cluster: up }} ]\n"
    )
}

// ------------------------------------------------------------------------------------------------
// ext-authz
// ------------------------------------------------------------------------------------------------

#[test]
fn ext_authz_lets_through_what_the_service_allows_and_answers_its_denials() {
    let upstream = Recording::start(upstream_answer);
    let auth = Recording::start(auth_answer);
    let wasm = plugin("ext_authz");
    let listeners = [
        listener(
            "checked",
            &filter(
                "authz",
                &wasm,
                "{ cluster: auth, headers_to_forward: [authorization, X-Request-Id], allowed_upstream_headers: [x-user] }",
            ),
        ),
        listener(
            "unknown",
            &filter("authz-unknown", &wasm, "{ cluster: nowhere }"),
        ),
        listener("down", &filter("authz-down", &wasm, "{ cluster: down }")),
        listener(
            "silent",
            &filter(
                "authz-silent",
                &wasm,
                "{ cluster: silent, timeout_ms: 300 }",
            ),
        ),
        listener(
            "down-allow",
            &filter(
                "authz-down-allow",
                &wasm,
                "{ cluster: down, failure_mode_allow: true, allowed_upstream_headers: [x-user] }",
            ),
        ),
    ]
    .concat();
    let yaml = format!(
        "workers: 1\nadmin: 127.0.0.1:0\nlisteners:\n{listeners}clusters:\n  - {{ name: up, endpoints: [\"{}\"] }}\n  - {{ name: auth, endpoints: [\"{}\"] }}\n  - {{ name: down, endpoints: [\"{}\"] }}\n  - {{ name: silent, endpoints: [\"{}\"] }}\n",
        upstream.address,
        auth.address,
        closed_port(),
        silent_server()
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &yaml);
    let gateway = start_capturing(wasmgate().args(["run", "--config", config.to_str().unwrap()]));
    let checked = gateway.listener("checked");

    // Allowed: the check carries the chosen headers and what the client asked for; the upstream
    // gets the service's x-user in place of the client's, and nothing else of the answer.
    let (status, answer) = get(
        checked,
        "/orders?id=7",
        "authorization: Bearer good\r\nx-request-id: r-1\r\ncookie: session=secret\r\nx-user: mallory\r\n",
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(body(&answer), "upstream says hi");
    let checks = auth.requests();
    assert_eq!(checks.len(), 1, "{checks:?}");
    let check = &checks[0];
    assert!(check.starts_with("GET /check HTTP/1.1\r\n"), "{check}");
    assert_eq!(header(check, "host").as_deref(), Some("auth"), "{check}");
    assert_eq!(
        header(check, "authorization").as_deref(),
        Some("Bearer good"),
        "{check}"
    );
    assert_eq!(header(check, "x-request-id").as_deref(), Some("r-1"));
    assert_eq!(header(check, "x-forwarded-method").as_deref(), Some("GET"));
    assert_eq!(
        header(check, "x-forwarded-uri").as_deref(),
        Some("/orders?id=7")
    );
    assert_eq!(header(check, "cookie"), None, "not listed, not forwarded");
    let forwarded = upstream.requests();
    assert_eq!(forwarded.len(), 1);
    assert_eq!(
        header_values(&forwarded[0], "x-user"),
        ["alice"],
        "{}",
        forwarded[0]
    );
    assert_eq!(header(&forwarded[0], "x-internal"), None);
    assert_eq!(
        header(&forwarded[0], "authorization").as_deref(),
        Some("Bearer good")
    );

    // A body waits, held by the gateway, while the check runs, then goes on whole.
    let (status, answer) = http(
        checked,
        "POST /submit HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\nauthorization: Bearer good\r\ncontent-length: 11\r\n\r\nhello world",
    );
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        header(&auth.requests()[1], "x-forwarded-method").as_deref(),
        Some("POST")
    );
    let posted = &upstream.requests()[1];
    assert!(
        posted.starts_with("POST /submit ") && posted.ends_with("\r\n\r\nhello world"),
        "{posted}"
    );

    // Denied: the service's status and body reach the client; the upstream never sees it.
    let (status, answer) = get(checked, "/orders", "authorization: Bearer bad\r\n");
    assert_eq!(status, 403, "{answer}");
    assert_eq!(body(&answer), "denied by auth server");
    // Its 401 challenge too, with the headers a client needs and not the others.
    let (status, answer) = get(checked, "/orders", "");
    assert_eq!(status, 401, "{answer}");
    assert_eq!(body(&answer), "token required");
    assert_eq!(
        header(&answer, "www-authenticate").as_deref(),
        Some("Bearer realm=\"test\"")
    );
    assert_eq!(header(&answer, "x-internal"), None, "{answer}");
    // A status that is no denial (a redirect) is answered as 403.
    let (status, answer) = get(checked, "/orders", "authorization: Bearer redirect\r\n");
    assert_eq!(status, 403, "{answer}");
    assert_eq!(body(&answer), "log in first");
    assert_eq!(
        upstream.count(),
        2,
        "denied requests never reach the upstream"
    );
    assert_eq!(auth.count(), 5);

    // No verdict (a cluster the gateway does not know, nobody listening, no answer within
    // timeout_ms) is a denial...
    for name in ["unknown", "down", "silent"] {
        let (status, answer) = get(
            gateway.listener(name),
            "/",
            "authorization: Bearer good\r\n",
        );
        assert_eq!(status, 403, "{name}: {answer}");
    }
    assert_eq!(upstream.count(), 2);
    // ... unless failure_mode_allow, which still keeps the client from naming the user.
    let (status, answer) = get(
        gateway.listener("down-allow"),
        "/",
        "authorization: Bearer good\r\nx-user: mallory\r\n",
    );
    assert_eq!(status, 200, "{answer}");
    let forwarded = upstream.requests();
    assert_eq!(forwarded.len(), 3);
    assert_eq!(header(&forwarded[2], "x-user"), None, "{}", forwarded[2]);

    assert!(
        eventually(Duration::from_secs(5), || {
            let log = gateway.stderr.lock();
            log.contains("ext-authz: no answer from cluster down")
                && log.contains("ext-authz: no answer from cluster silent")
                && log.contains("the check call to cluster nowhere could not start")
                && log.contains("letting the request through (failure_mode_allow)")
        }),
        "each failure is logged with its cluster"
    );
}

#[test]
fn ext_authz_refuses_a_bad_configuration() {
    let wasm = plugin("ext_authz");
    let cases = [
        ("{}", "cluster is missing"),
        ("\"not json\"", "ext-authz: invalid configuration"),
        (
            "{ cluster: auth, failure_mode: true }",
            "unknown field `failure_mode`",
        ),
        (
            "{ cluster: auth, headers_to_forward: [\":path\"] }",
            "is not a header name",
        ),
        (
            "{ cluster: auth, headers_to_forward: [Host] }",
            "the gateway or this plugin sets it",
        ),
        (
            "{ cluster: auth, timeout_ms: 0 }",
            "timeout_ms must be between 1",
        ),
        ("{ cluster: auth, path: check }", "must start with /"),
    ];
    for (configuration, expected) in cases {
        let yaml = format!(
            "workers: 1\nadmin: 127.0.0.1:0\nlisteners:\n{}clusters:\n  - {{ name: up, endpoints: [\"127.0.0.1:9\"] }}\n",
            listener("main", &filter("authz", &wasm, configuration))
        );
        let stderr = run_expecting_failure(&yaml);
        assert!(
            stderr.contains("ext-authz: invalid configuration") && stderr.contains(expected),
            "{configuration}: expected {expected:?} in:\n{stderr}"
        );
        assert!(stderr.contains("authz"), "the plugin is named: {stderr}");
    }
}

// ------------------------------------------------------------------------------------------------
// rate-limit
// ------------------------------------------------------------------------------------------------

/// The upstream for rate-limit tests: also echoes `x-context-id` (added by test-multi-root),
/// which tells which worker's VM a request went through.
fn rate_limit_gateway(workers: usize, configuration: &str) -> (Running, Recording) {
    let upstream = Recording::start(upstream_answer);
    let filters = filter("limit", &plugin("rate_limit"), configuration)
        + &filter("which-vm", &plugin("test_multi_root"), "\"\"");
    let yaml = format!(
        "workers: {workers}\nadmin: 127.0.0.1:0\nlisteners:\n{}clusters:\n  - {{ name: up, endpoints: [\"{}\"] }}\n",
        listener("main", &filters),
        upstream.address
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&dir, &yaml);
    let gateway = start(&["run", "--config", config.to_str().unwrap()]);
    (gateway, upstream)
}

#[test]
fn rate_limit_shares_one_bucket_between_workers() {
    const BURST: usize = 20;
    const OVER: usize = 10;
    // A token every 1000 s: none comes back while the test runs.
    let (gateway, upstream) = rate_limit_gateway(
        2,
        &format!("{{ requests_per_second: 0.001, burst: {BURST} }}"),
    );
    let main = gateway.listener("main");

    // Many clients at once, each request on its own connection, so both workers serve.
    let next = AtomicUsize::new(0);
    let answers = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..6 {
            scope.spawn(|| {
                while next.fetch_add(1, Ordering::SeqCst) < BURST + OVER {
                    let answer = get(main, "/", "");
                    answers.lock().push(answer);
                }
            });
        }
    });
    let answers = answers.into_inner();
    let allowed: Vec<&String> = answers
        .iter()
        .filter(|(status, _)| *status == 200)
        .map(|(_, text)| text)
        .collect();
    let limited: Vec<&String> = answers
        .iter()
        .filter(|(status, _)| *status == 429)
        .map(|(_, text)| text)
        .collect();
    assert_eq!(
        (allowed.len(), limited.len()),
        (BURST, OVER),
        "{answers:#?}"
    );

    // Each token was taken exactly once: the remaining counts are BURST-1 down to 0, each once.
    let mut remaining: Vec<usize> = allowed
        .iter()
        .map(|text| {
            header(text, "x-ratelimit-remaining")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no x-ratelimit-remaining: {text}"))
        })
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..BURST).collect::<Vec<_>>());
    for text in &allowed {
        assert_eq!(
            header(text, "x-ratelimit-limit").as_deref(),
            Some("20"),
            "{text}"
        );
    }
    for text in &limited {
        assert_eq!(header(text, "x-ratelimit-limit").as_deref(), Some("20"));
        let retry_after: u64 = header(text, "retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no retry-after: {text}"));
        assert!((1..=1000).contains(&retry_after), "{text}");
        assert_eq!(body(text), "rate limit exceeded\n");
    }

    // Both workers served: each VM numbers its contexts from the same start, so two VMs show
    // as a context id seen twice.
    let forwarded = upstream.requests();
    assert_eq!(forwarded.len(), BURST, "limited requests never reach it");
    let mut context_ids: Vec<String> = forwarded
        .iter()
        .map(|request| header(request, "x-context-id").expect("test-multi-root ran"))
        .collect();
    context_ids.sort();
    assert!(
        context_ids.windows(2).any(|pair| pair[0] == pair[1]),
        "the allowed requests went through one worker only ({context_ids:?}); the test proves \
         nothing about sharing"
    );
}

#[test]
fn rate_limit_keeps_a_bucket_per_key() {
    // One token an hour, two to start with; denials with 503.
    let (gateway, upstream) = rate_limit_gateway(
        2,
        "{ tokens_per_fill: 1, fill_interval_ms: 3600000, burst: 2, key_header: X-Api-Key, status: 503 }",
    );
    let main = gateway.listener("main");
    let send = |key: Option<&str>| {
        let extra = key.map_or(String::new(), |key| format!("x-api-key: {key}\r\n"));
        get(main, "/", &extra)
    };
    for key in [Some("alpha"), Some("beta"), None] {
        for left in ["1", "0"] {
            let (status, answer) = send(key);
            assert_eq!(status, 200, "{key:?}: {answer}");
            assert_eq!(
                header(&answer, "x-ratelimit-remaining").as_deref(),
                Some(left),
                "{key:?}: {answer}"
            );
            assert_eq!(header(&answer, "x-ratelimit-limit").as_deref(), Some("2"));
        }
        let (status, answer) = send(key);
        assert_eq!(status, 503, "{key:?}: {answer}");
        let retry_after: u64 = header(&answer, "retry-after")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no retry-after: {answer}"));
        assert!((1..=3600).contains(&retry_after), "{answer}");
    }
    // Spent keys stay spent; a new one starts full.
    assert_eq!(send(Some("alpha")).0, 503);
    assert_eq!(send(None).0, 503);
    assert_eq!(send(Some("gamma")).0, 200);
    assert_eq!(upstream.count(), 7);
}

#[test]
fn rate_limit_refuses_a_bad_configuration() {
    let wasm = plugin("rate_limit");
    let cases = [
        ("{ burst: 5 }", "requests_per_second (or tokens_per_fill"),
        (
            "{ requests_per_second: 0, burst: 1 }",
            "requests_per_second must be greater than 0",
        ),
        (
            "{ requests_per_second: 0.0000001 }",
            "requests_per_second must be at least 0.000001",
        ),
        (
            "{ requests_per_second: 1, tokens_per_fill: 1, fill_interval_ms: 10 }",
            "not both",
        ),
        (
            "{ tokens_per_fill: 5 }",
            "tokens_per_fill and fill_interval_ms go together",
        ),
        (
            "{ requests_per_second: 1, burst: 0 }",
            "burst must be between 1",
        ),
        (
            "{ requests_per_second: 1, status: 200 }",
            "status must be a 4xx or 5xx status",
        ),
        (
            "{ requests_per_second: 1, brust: 5 }",
            "unknown field `brust`",
        ),
        ("\"not json\"", "rate-limit: invalid configuration"),
    ];
    for (configuration, expected) in cases {
        let yaml = format!(
            "workers: 1\nadmin: 127.0.0.1:0\nlisteners:\n{}clusters:\n  - {{ name: up, endpoints: [\"127.0.0.1:9\"] }}\n",
            listener("main", &filter("limit", &wasm, configuration))
        );
        let stderr = run_expecting_failure(&yaml);
        assert!(
            stderr.contains("rate-limit: invalid configuration") && stderr.contains(expected),
            "{configuration}: expected {expected:?} in:\n{stderr}"
        );
    }
}
