//! `wasmgate plugin run`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use wasmgate_abi::{HeaderMap, HttpCallRequest, LogLevel};
use wasmgate_dataplane::{ClusterSpec, UpstreamTls, send_once};
use wasmgate_runtime::{CallOutcome, PluginConfig, Runtime, RuntimeConfig, VmConfig};
use wasmgate_toolkit::harness::{Harness, Message, RecordingHost};

#[derive(Args)]
pub struct RunArgs {
    /// The plugin's .wasm file.
    file: PathBuf,
    /// Plugin configuration, passed to proxy_on_configure as is (often JSON).
    #[arg(long, default_value = "")]
    config: String,
    /// VM configuration, passed to proxy_on_vm_start.
    #[arg(long, default_value = "")]
    vm_config: String,
    /// Root id choosing the plugin's root context.
    #[arg(long, default_value = "")]
    root_id: String,
    /// Environment variable for the plugin, KEY=VALUE (repeatable). The host's own are never passed.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Request method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// Request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Request header, "name: value" (repeatable).
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Request body.
    #[arg(long)]
    body: Option<String>,
    /// Plugin log level (trace, debug, info, warn, error, critical).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// A live upstream (http://HOST:PORT or https://HOST:PORT) to send the request to, as the
    /// plugin lets it through, instead of the built-in sample. The request's authority becomes
    /// HOST:PORT unless -H names one.
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
}

/// Where `--upstream` sends the request: a one-endpoint cluster and a runtime to drive it.
struct LiveUpstream {
    cluster: ClusterSpec,
    authority: String,
    runtime: tokio::runtime::Runtime,
}

/// How long a request to the live upstream may take, as a cluster's default request timeout.
const LIVE_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(15);

impl LiveUpstream {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: hyper::Uri = url
            .parse()
            .with_context(|| format!("--upstream {url:?} is not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => Some(UpstreamTls::default()),
            _ => bail!("--upstream {url:?}: the scheme must be http:// or https://"),
        };
        let authority = uri
            .authority()
            .with_context(|| format!("--upstream {url:?} has no host"))?;
        if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
            bail!("--upstream {url:?}: give only scheme, host and port; the path goes in --path");
        }
        let port = authority
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        let cluster = ClusterSpec {
            name: "upstream".into(),
            endpoints: vec![format!("{}:{port}", authority.host())],
            connect_timeout: Duration::from_secs(5),
            request_timeout: Some(LIVE_UPSTREAM_TIMEOUT),
            http2: false,
            tls,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the HTTP client")?;
        Ok(Self {
            cluster,
            authority: authority.to_string(),
            runtime,
        })
    }

    /// The upstream's answer; a failed exchange answers 503 as a gateway would, with the reason.
    fn send(&self, request: &Message) -> anyhow::Result<Message> {
        let call = HttpCallRequest {
            upstream: self.cluster.name.clone(),
            headers: request.headers.clone(),
            body: request.body_bytes(),
            trailers: request.trailers.clone().unwrap_or_default(),
            timeout_ms: LIVE_UPSTREAM_TIMEOUT.as_millis() as u32,
        };
        let outcome = self
            .runtime
            .block_on(send_once(&self.cluster, &call))
            .context("--upstream")?;
        match outcome {
            CallOutcome::Response {
                headers,
                body,
                trailers,
            } => Ok(Message {
                headers,
                body: if body.is_empty() { vec![] } else { vec![body] },
                trailers: (!trailers.is_empty()).then_some(trailers),
            }),
            CallOutcome::Failure { message } => {
                bail!(
                    "the upstream {} failed: {message}",
                    self.cluster.endpoints[0]
                )
            }
        }
    }
}

fn parse_header(raw: &str) -> anyhow::Result<(String, String)> {
    let (name, value) = raw
        .split_once(':')
        .with_context(|| format!("header {raw:?} is not \"name: value\""))?;
    let name = name.trim();
    if name.is_empty() {
        bail!("header {raw:?} has an empty name");
    }
    Ok((name.to_owned(), value.trim().to_owned()))
}

fn print_headers(title: &str, headers: &HeaderMap, before: Option<&HeaderMap>) {
    println!("{title}");
    for (name, value) in headers.to_string_pairs() {
        let changed = before.is_some_and(|b| b.get_str(&name) != Some(value.as_str()));
        println!("  {} {name}: {value}", if changed { "+" } else { " " });
    }
    if let Some(before) = before {
        for (name, value) in before.to_string_pairs() {
            if headers.get(&name).is_none() {
                println!("  - {name}: {value}");
            }
        }
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let wasm =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let log_level = LogLevel::parse(&args.log_level)
        .with_context(|| format!("unknown log level {:?}", args.log_level))?;
    let environment = args
        .env
        .iter()
        .map(|e| {
            e.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .with_context(|| format!("--env {e:?} is not KEY=VALUE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let runtime = Runtime::new(RuntimeConfig {
        log_level,
        ..Default::default()
    })?;
    let vm_config = VmConfig {
        vm_id: "cli".into(),
        configuration: args.vm_config.into_bytes(),
        environment,
        capabilities: None,
    };
    let name = args
        .file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let plugin = PluginConfig {
        name,
        root_id: args.root_id,
        configuration: args.config.into_bytes(),
    };
    let mut harness = Harness::load(runtime, &wasm, vm_config, plugin, RecordingHost::default())
        .with_context(|| format!("starting {}", args.file.display()))?;

    let live = args
        .upstream
        .as_deref()
        .map(LiveUpstream::parse)
        .transpose()?;
    let mut request = Message::request(&args.method, &args.path);
    let authority = live.as_ref().map_or("localhost", |l| l.authority.as_str());
    request.headers.replace(":authority", authority);
    for raw in &args.headers {
        let (name, value) = parse_header(raw)?;
        if name.eq_ignore_ascii_case("host") || name == ":authority" {
            request.headers.replace(":authority", value);
        } else {
            request.headers.add(name, value);
        }
    }
    if let Some(body) = args.body {
        request.body.push(body.into_bytes());
    }
    let original_request = request.headers.clone();
    let mut upstream_response = None;
    let mut upstream_failure = None;
    let exchange = harness.exchange(request, &mut |received: &Message| {
        let response = match &live {
            Some(live) => live.send(received).unwrap_or_else(|error| {
                let reply = Message::response(503).body_chunk(format!("{error:#}\n"));
                upstream_failure = Some(error);
                reply
            }),
            None => Message::response(200)
                .header("content-type", "text/plain")
                .body_chunk("hello from the sample upstream\n"),
        };
        upstream_response = Some(response.headers.clone());
        response
    })?;
    if let Some(error) = &upstream_failure {
        println!("upstream error (answered 503): {error:#}");
    }

    match &exchange.upstream_request {
        Some(sent) => print_headers(
            "request headers, as the upstream received them:",
            &sent.headers,
            Some(&original_request),
        ),
        None => println!("the request did not reach the upstream"),
    }
    if let Some(local) = &exchange.local_response {
        println!("local reply from the plugin: {}", local.status_code);
    }
    match &exchange.response {
        Some(response) => {
            print_headers(
                "response headers, as the client received them:",
                &response.headers,
                upstream_response.as_ref(),
            );
            println!(
                "response body:\n  {}",
                String::from_utf8_lossy(&response.body_bytes()).trim_end()
            );
        }
        None => println!(
            "the stream stalled in {} (paused, never resumed)",
            exchange.stalled_in.unwrap_or("?")
        ),
    }
    let logs = harness.logs();
    if !logs.is_empty() {
        println!("plugin logs:");
        for record in logs {
            println!("  [{}] {}", record.level, record.message);
        }
    }
    Ok(ExitCode::SUCCESS)
}
