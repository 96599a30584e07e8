//! The canonical `basic-auth` plugin (`plugins/basic-auth`), configured as Istio's basic_auth is.

mod common;

use common::*;
use wasmgate_abi::{Action, LogLevel};
use wasmgate_toolkit::harness::{Exchange, Harness, Message, RecordingHost};

/// The configuration from Istio's basic_auth guide (`admin3:admin3` given as base64).
const ISTIO_EXAMPLE: &str = r#"{
    "basic_auth_rules": [
        {
            "prefix": "/productpage",
            "request_methods": ["GET", "POST"],
            "credentials": ["ok:test", "YWRtaW4zOmFkbWluMw=="]
        }
    ]
}"#;

const NO_CREDENTIALS: &str = "No Basic Authentication information found.";
const INVALID_CREDENTIALS: &str = "User name or password is invalid.";

// base64 of the credentials, worked out independently of the plugin.
const OK_TEST: &str = "b2s6dGVzdA=="; // ok:test
const ADMIN3: &str = "YWRtaW4zOmFkbWluMw=="; // admin3:admin3
const OK_WRONG: &str = "b2s6d3Jvbmc="; // ok:wrong
const ADMIN: &str = "YWRtaW46YWRtaW4="; // admin:admin

fn basic_auth(config: &str) -> Harness {
    harness(&rust_plugin("basic_auth"), config)
}

fn send(h: &mut Harness, request: Message) -> Exchange {
    h.exchange(request, &mut |_: &Message| Message::response(200))
        .unwrap()
}

fn get(path: &str) -> Message {
    Message::request("GET", path)
}

fn with_basic(request: Message, token: &str) -> Message {
    request.header("authorization", &format!("Basic {token}"))
}

#[track_caller]
fn assert_passes(exchange: &Exchange) {
    assert!(
        exchange.local_response.is_none(),
        "unexpected local reply: {:?}",
        exchange.local_response
    );
    assert!(
        exchange.upstream_request.is_some(),
        "the request did not reach the upstream"
    );
    let response = exchange.response.as_ref().unwrap();
    assert_eq!(response.headers.get_str(":status"), Some("200"));
}

/// A 401 with the challenge for `realm` and `body`, sent before the upstream saw anything.
#[track_caller]
fn assert_denied(exchange: &Exchange, realm: &str, body: &str) {
    assert!(
        exchange.upstream_request.is_none(),
        "a denied request reached the upstream"
    );
    assert_eq!(exchange.actions[0], ("on_request_headers", Action::Pause));
    let local = exchange
        .local_response
        .as_ref()
        .expect("the plugin replied locally");
    assert_eq!(local.status_code, 401);
    assert_eq!(String::from_utf8_lossy(&local.body), body);
    let response = exchange.response.as_ref().unwrap();
    assert_eq!(response.headers.get_str(":status"), Some("401"));
    let challenge = format!("Basic realm={realm}");
    assert_eq!(
        response.headers.get_str("www-authenticate"),
        Some(challenge.as_str())
    );
    assert_eq!(String::from_utf8_lossy(&response.body_bytes()), body);
}

#[test]
fn no_credentials_get_a_401_with_the_challenge() {
    let mut h = basic_auth(ISTIO_EXAMPLE);
    for request in [
        get("/productpage"),
        Message::request("POST", "/productpage/reviews"),
    ] {
        assert_denied(&send(&mut h, request), "istio", NO_CREDENTIALS);
    }
}

#[test]
fn configured_credentials_reach_the_upstream() {
    let mut h = basic_auth(ISTIO_EXAMPLE);
    // `ok:test` is configured as written, `admin3:admin3` as base64.
    for token in [OK_TEST, ADMIN3] {
        let exchange = send(&mut h, with_basic(get("/productpage"), token));
        assert_passes(&exchange);
        let sent = exchange.upstream_request.unwrap();
        assert_eq!(
            sent.headers.get_str("authorization"),
            Some(format!("Basic {token}").as_str()),
            "the header is passed on untouched"
        );
    }
    assert_passes(&send(
        &mut h,
        with_basic(Message::request("POST", "/productpage"), ADMIN3),
    ));
}

#[test]
fn wrong_credentials_are_invalid() {
    let mut h = basic_auth(ISTIO_EXAMPLE);
    for token in [OK_WRONG, ADMIN] {
        let exchange = send(&mut h, with_basic(get("/productpage"), token));
        assert_denied(&exchange, "istio", INVALID_CREDENTIALS);
    }
}

#[test]
fn unlisted_methods_and_other_paths_pass() {
    let mut h = basic_auth(ISTIO_EXAMPLE);
    assert_passes(&send(&mut h, Message::request("DELETE", "/productpage")));
    assert_passes(&send(&mut h, get("/reviews")));
    assert_passes(&send(&mut h, get("/")));
    // Methods are compared exactly, as HTTP methods are case-sensitive.
    assert_passes(&send(&mut h, Message::request("get", "/productpage")));
}

#[test]
fn the_query_string_is_not_part_of_the_path() {
    let config = r#"{"basic_auth_rules": [
        {"prefix": "/productpage", "request_methods": ["GET"], "credentials": ["ok:test"]},
        {"exact": "/status", "request_methods": ["GET"], "credentials": ["ok:test"]},
        {"suffix": ".php", "request_methods": ["GET"], "credentials": ["ok:test"]}
    ]}"#;
    let mut h = basic_auth(config);
    for path in ["/status?verbose=1", "/index.php?page=2", "/productpage?x=1"] {
        assert_denied(&send(&mut h, get(path)), "istio", NO_CREDENTIALS);
        assert_passes(&send(&mut h, with_basic(get(path), OK_TEST)));
    }
    for path in [
        "/other?next=/productpage",
        "/status/x?a=/status",
        "/x?file=a.php",
    ] {
        assert_passes(&send(&mut h, get(path)));
    }
}

#[test]
fn exact_and_suffix_rules() {
    let config = r#"{"basic_auth_rules": [
        {"exact": "/admin", "request_methods": ["GET", "PUT"], "credentials": ["admin:admin"]},
        {"suffix": ".secret", "request_methods": ["GET"], "credentials": ["ok:test"]}
    ]}"#;
    let mut h = basic_auth(config);
    assert_denied(&send(&mut h, get("/admin")), "istio", NO_CREDENTIALS);
    assert_denied(
        &send(&mut h, Message::request("PUT", "/admin")),
        "istio",
        NO_CREDENTIALS,
    );
    assert_passes(&send(&mut h, with_basic(get("/admin"), ADMIN)));
    assert_passes(&send(&mut h, get("/admin/")));
    assert_passes(&send(&mut h, get("/administrator")));

    assert_denied(
        &send(&mut h, get("/files/a.secret")),
        "istio",
        NO_CREDENTIALS,
    );
    assert_passes(&send(&mut h, with_basic(get("/files/a.secret"), OK_TEST)));
    assert_denied(
        &send(&mut h, with_basic(get("/files/a.secret"), ADMIN)),
        "istio",
        INVALID_CREDENTIALS,
    );
    assert_passes(&send(&mut h, get("/files/a.secret.txt")));
}

#[test]
fn the_scheme_is_case_insensitive() {
    let mut h = basic_auth(ISTIO_EXAMPLE);
    for scheme in ["basic", "BASIC", "bAsIc"] {
        let request = get("/productpage").header("authorization", &format!("{scheme} {OK_TEST}"));
        assert_passes(&send(&mut h, request));
    }
}

#[test]
fn other_schemes_and_empty_tokens_count_as_no_credentials() {
    let mut h = basic_auth(ISTIO_EXAMPLE);
    for value in [
        "Bearer b2s6dGVzdA==",
        "Basic",
        "Basic   ",
        "b2s6dGVzdA==",
        "",
    ] {
        let request = get("/productpage").header("authorization", value);
        assert_denied(&send(&mut h, request), "istio", NO_CREDENTIALS);
    }
}

#[test]
fn malformed_base64_is_invalid() {
    let mut h = basic_auth(ISTIO_EXAMPLE);
    for token in [
        "not*base64",
        "b2s6dGVzdA=",   // padding that does not fit
        "b2s6dGVzdA===", // too much padding
        "b",             // a length base64 cannot have
        "b2s6 dGVzdA==",
        "ok:test", // not encoded
    ] {
        let exchange = send(&mut h, with_basic(get("/productpage"), token));
        assert_denied(&exchange, "istio", INVALID_CREDENTIALS);
    }
    // Bytes that are not UTF-8 are refused too, without trapping the plugin.
    let mut request = get("/productpage");
    request.headers.add("authorization", b"Basic \xff\xfe");
    assert_denied(&send(&mut h, request), "istio", INVALID_CREDENTIALS);
    assert_passes(&send(&mut h, with_basic(get("/productpage"), OK_TEST)));
}

#[test]
fn unpadded_base64_is_accepted() {
    // In the configuration and in the header.
    let config = r#"{"basic_auth_rules": [
        {"prefix": "/", "request_methods": ["GET"], "credentials": ["b2s6dGVzdA"]}
    ]}"#;
    let mut h = basic_auth(config);
    assert_passes(&send(&mut h, with_basic(get("/"), OK_TEST)));
    assert_passes(&send(&mut h, with_basic(get("/"), "b2s6dGVzdA")));
}

#[test]
fn the_realm_is_configurable() {
    let config = r#"{"realm": "wasmgate", "basic_auth_rules": [
        {"prefix": "/", "request_methods": ["GET"], "credentials": ["ok:test"]}
    ]}"#;
    let mut h = basic_auth(config);
    assert_denied(&send(&mut h, get("/")), "wasmgate", NO_CREDENTIALS);
    assert_denied(
        &send(&mut h, with_basic(get("/"), ADMIN)),
        "wasmgate",
        INVALID_CREDENTIALS,
    );
}

#[test]
fn every_matching_rule_must_accept_the_credentials() {
    // As in Istio's plugin: a narrower rule restricts who of a wider rule gets in.
    let config = r#"{"basic_auth_rules": [
        {"prefix": "/", "request_methods": ["GET"], "credentials": ["ok:test", "admin:admin"]},
        {"prefix": "/admin", "request_methods": ["GET"], "credentials": ["admin:admin"]}
    ]}"#;
    let mut h = basic_auth(config);
    assert_passes(&send(&mut h, with_basic(get("/admin"), ADMIN)));
    assert_denied(
        &send(&mut h, with_basic(get("/admin"), OK_TEST)),
        "istio",
        INVALID_CREDENTIALS,
    );
    assert_passes(&send(&mut h, with_basic(get("/home"), OK_TEST)));
}

#[test]
fn an_empty_rule_list_checks_nothing() {
    let mut h = basic_auth(r#"{"basic_auth_rules": []}"#);
    assert_passes(&send(&mut h, get("/productpage")));
    let warnings: Vec<_> = h
        .logs()
        .into_iter()
        .filter(|r| r.level == LogLevel::Warn && r.message.contains("basic_auth_rules is empty"))
        .collect();
    assert_eq!(warnings.len(), 1);
}

/// Loads `config`, expects the plugin to refuse it, and returns what it logged as the reason.
#[track_caller]
fn rejected(config: &str) -> String {
    let host = RecordingHost::default();
    let Err(err) = Harness::load(
        runtime(),
        &rust_plugin("basic_auth"),
        vm_config("test"),
        plugin("basic-auth", config),
        host.clone(),
    ) else {
        panic!("the plugin accepted {config}");
    };
    assert!(
        err.to_string().contains("returned false"),
        "unexpected error for {config}: {err}"
    );
    let logs = &host.recorded.lock().logs;
    let reasons: Vec<&str> = logs
        .iter()
        .filter(|r| r.level == LogLevel::Error)
        .map(|r| r.message.as_str())
        .filter(|m| m.starts_with("basic-auth: invalid configuration: "))
        .collect();
    assert_eq!(reasons.len(), 1, "one reason logged for {config}: {logs:?}");
    reasons[0].to_owned()
}

#[test]
fn invalid_configurations_are_refused_with_a_reason() {
    let ok_rule = r#"{"prefix": "/", "request_methods": ["GET"], "credentials": ["ok:test"]}"#;
    let cases = [
        ("", "the configuration is empty"),
        ("{", "not valid JSON"),
        ("[]", "must be a JSON object"),
        (r#"{"realm": "istio"}"#, "basic_auth_rules is missing"),
        (
            r#"{"basic_auth_rules": {"prefix": "/"}}"#,
            "basic_auth_rules must be a list of rules",
        ),
        (
            &format!(r#"{{"basic_auth_rules": [{ok_rule}, "/admin"]}}"#),
            "basic_auth_rules[1]: is not an object",
        ),
        (
            &format!(
                r#"{{"basic_auth_rules": [{ok_rule}, {{"prefix": "/a", "exact": "/b",
                    "request_methods": ["GET"], "credentials": ["ok:test"]}}]}}"#
            ),
            "basic_auth_rules[1]: sets both prefix and exact; exactly one",
        ),
        (
            r#"{"basic_auth_rules": [{"request_methods": ["GET"], "credentials": ["ok:test"]}]}"#,
            "basic_auth_rules[0]: sets none of prefix, exact or suffix",
        ),
        (
            r#"{"basic_auth_rules": [{"prefix": 3, "request_methods": ["GET"], "credentials": ["ok:test"]}]}"#,
            "basic_auth_rules[0]: prefix must be a string",
        ),
        (
            r#"{"basic_auth_rules": [{"exact": "", "request_methods": ["GET"], "credentials": ["ok:test"]}]}"#,
            "basic_auth_rules[0]: exact must not be empty",
        ),
        (
            r#"{"basic_auth_rules": [{"prefix": "/", "credentials": ["ok:test"]}]}"#,
            "basic_auth_rules[0]: request_methods must list at least one method",
        ),
        (
            r#"{"basic_auth_rules": [{"prefix": "/", "request_methods": [], "credentials": ["ok:test"]}]}"#,
            "basic_auth_rules[0]: request_methods must list at least one method",
        ),
        (
            r#"{"basic_auth_rules": [{"prefix": "/", "request_methods": ["GET", 1], "credentials": ["ok:test"]}]}"#,
            "basic_auth_rules[0]: request_methods[1] must be a string",
        ),
        (
            r#"{"basic_auth_rules": [{"prefix": "/", "request_methods": "GET", "credentials": ["ok:test"]}]}"#,
            "basic_auth_rules[0]: request_methods must be a list of strings",
        ),
        (
            r#"{"basic_auth_rules": [{"prefix": "/", "request_methods": ["GET"], "credentials": []}]}"#,
            "basic_auth_rules[0]: credentials must list at least one credential",
        ),
        (
            r#"{"basic_auth_rules": [{"prefix": "/", "request_methods": ["GET"]}]}"#,
            "basic_auth_rules[0]: credentials must list at least one credential",
        ),
        (
            &format!(
                r#"{{"basic_auth_rules": [{ok_rule}, {{"suffix": ".x", "request_methods": ["GET"],
                    "credentials": ["ok:test", "not-base64!"]}}]}}"#
            ),
            "basic_auth_rules[1]: credentials[1] is neither \"user:password\" nor the base64",
        ),
        (
            // base64 of "nocolon": valid base64, but not of user:password.
            r#"{"basic_auth_rules": [{"prefix": "/", "request_methods": ["GET"], "credentials": ["bm9jb2xvbg=="]}]}"#,
            "basic_auth_rules[0]: credentials[0] is neither",
        ),
        (
            &format!(r#"{{"basic_auth_rules": [{ok_rule}], "realm": 7}}"#),
            "realm must be a string",
        ),
    ];
    for (config, expected) in cases {
        let reason = rejected(config);
        assert!(
            reason.contains(expected),
            "for {config}: expected {expected:?} in {reason:?}"
        );
    }
}

#[test]
fn a_refused_credential_is_not_logged() {
    let reason = rejected(
        r#"{"basic_auth_rules": [{"prefix": "/", "request_methods": ["GET"], "credentials": ["hunter2"]}]}"#,
    );
    assert!(!reason.contains("hunter2"), "{reason}");
}
