//! A network (TCP) test plugin that counts what passes into metrics.
//!
//! Host tests are written against the names below, so treat them as a contract:
//!
//! - counters `tcp_counter_connections`, `tcp_counter_downstream_bytes`,
//!   `tcp_counter_upstream_bytes`, `tcp_counter_downstream_close_{local,remote}`,
//!   `tcp_counter_upstream_close_{local,remote}`, `tcp_counter_done`, `tcp_counter_ticks`;
//! - shared data `tcp_counter_connection`: the last connection's properties, one line:
//!   `id=<connection.id> source=<source.address> destination=<destination.address>
//!   mtls=<connection.mtls> sni=<connection.requested_server_name or ->`;
//! - configuration (JSON, optional): `{"tick_ms": N}` ticks every N ms; `{"queue": "NAME"}`
//!   registers shared queue NAME, each new connection enqueues its id there, and the root
//!   dequeues on `on_queue_ready`, counting `tcp_counter_queue_messages`.

use log::info;
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, PeerType};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(CounterRoot::default()) });
}}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Config {
    tick_ms: Option<u64>,
    queue: Option<String>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Metrics {
    connections: u32,
    downstream_bytes: u32,
    upstream_bytes: u32,
    downstream_close_local: u32,
    downstream_close_remote: u32,
    upstream_close_local: u32,
    upstream_close_remote: u32,
    done: u32,
    ticks: u32,
    queue_messages: u32,
}

fn counter(name: &str) -> u32 {
    hostcalls::define_metric(MetricType::Counter, name).unwrap_or(0)
}

impl Metrics {
    fn define() -> Self {
        Metrics {
            connections: counter("tcp_counter_connections"),
            downstream_bytes: counter("tcp_counter_downstream_bytes"),
            upstream_bytes: counter("tcp_counter_upstream_bytes"),
            downstream_close_local: counter("tcp_counter_downstream_close_local"),
            downstream_close_remote: counter("tcp_counter_downstream_close_remote"),
            upstream_close_local: counter("tcp_counter_upstream_close_local"),
            upstream_close_remote: counter("tcp_counter_upstream_close_remote"),
            done: counter("tcp_counter_done"),
            ticks: counter("tcp_counter_ticks"),
            queue_messages: counter("tcp_counter_queue_messages"),
        }
    }
}

fn bump(metric: u32, by: usize) {
    let _ = hostcalls::increment_metric(metric, by as i64);
}

#[derive(Default)]
struct CounterRoot {
    metrics: Metrics,
    queue: Option<u32>,
}

impl Context for CounterRoot {}

impl RootContext for CounterRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.metrics = Metrics::define();
        let config: Config = match self.get_plugin_configuration() {
            Some(raw) if !raw.is_empty() => match serde_json::from_slice(&raw) {
                Ok(config) => config,
                Err(_) => return false,
            },
            _ => Config::default(),
        };
        if let Some(ms) = config.tick_ms {
            self.set_tick_period(std::time::Duration::from_millis(ms));
        }
        if let Some(name) = &config.queue {
            self.queue = Some(self.register_shared_queue(name));
        }
        true
    }

    fn on_tick(&mut self) {
        bump(self.metrics.ticks, 1);
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(_message)) = self.dequeue_shared_queue(queue_id) {
            bump(self.metrics.queue_messages, 1);
        }
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Counter {
            metrics: self.metrics,
            queue: self.queue,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}

struct Counter {
    metrics: Metrics,
    queue: Option<u32>,
}

impl Counter {
    fn text(&self, path: &[&str]) -> String {
        self.get_property(path.to_vec())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|| "-".to_owned())
    }
}

impl Context for Counter {}

impl StreamContext for Counter {
    fn on_new_connection(&mut self) -> Action {
        bump(self.metrics.connections, 1);
        let id = self
            .get_property(vec!["connection", "id"])
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0);
        let mtls = self
            .get_property(vec!["connection", "mtls"])
            .map(|b| b.first() == Some(&1))
            .unwrap_or(false);
        let line = format!(
            "id={id} source={} destination={} mtls={mtls} sni={}",
            self.text(&["source", "address"]),
            self.text(&["destination", "address"]),
            self.text(&["connection", "requested_server_name"]),
        );
        info!("new connection: {line}");
        let _ = self.set_shared_data("tcp_counter_connection", Some(line.as_bytes()), None);
        if let Some(queue) = self.queue {
            let _ = self.enqueue_shared_queue(queue, Some(id.to_string().as_bytes()));
        }
        Action::Continue
    }

    fn on_downstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        bump(self.metrics.downstream_bytes, data_size);
        Action::Continue
    }

    fn on_upstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        bump(self.metrics.upstream_bytes, data_size);
        Action::Continue
    }

    fn on_downstream_close(&mut self, peer_type: PeerType) {
        match peer_type {
            PeerType::Local => bump(self.metrics.downstream_close_local, 1),
            _ => bump(self.metrics.downstream_close_remote, 1),
        }
    }

    fn on_upstream_close(&mut self, peer_type: PeerType) {
        match peer_type {
            PeerType::Local => bump(self.metrics.upstream_close_local, 1),
            _ => bump(self.metrics.upstream_close_remote, 1),
        }
    }

    fn on_log(&mut self) {
        bump(self.metrics.done, 1);
    }
}
