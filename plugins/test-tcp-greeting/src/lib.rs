//! A network (TCP) test plugin that rewrites `hello` to `howdy` in downstream data and
//! `HELLO` to `HOWDY` in upstream data.
//!
//! Configuration (JSON, optional): `{"line_mode": true}` holds downstream data (Pause) until it
//! holds a newline, then rewrites and passes all of it; the host must hand the accumulated bytes
//! to the next call. Shared data `tcp_greeting_sizes` records the sizes each downstream call
//! reported, comma-separated.

use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(GreetingRoot::default()) });
}}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
struct Config {
    line_mode: bool,
}

#[derive(Default)]
struct GreetingRoot {
    config: Config,
}

impl Context for GreetingRoot {}

impl RootContext for GreetingRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        match self.get_plugin_configuration() {
            Some(raw) if !raw.is_empty() => match serde_json::from_slice(&raw) {
                Ok(config) => self.config = config,
                Err(_) => return false,
            },
            _ => {}
        }
        true
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Greeting {
            config: self.config,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}

struct Greeting {
    config: Config,
}

fn replace(data: &[u8], from: &[u8], to: &[u8]) -> Option<Vec<u8>> {
    if !data.windows(from.len()).any(|w| w == from) {
        return None;
    }
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    Some(out)
}

impl Context for Greeting {}

impl StreamContext for Greeting {
    fn on_downstream_data(&mut self, data_size: usize, end_of_stream: bool) -> Action {
        let mut sizes = self
            .get_shared_data("tcp_greeting_sizes")
            .0
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if !sizes.is_empty() {
            sizes.push(',');
        }
        sizes.push_str(&data_size.to_string());
        let _ = self.set_shared_data("tcp_greeting_sizes", Some(sizes.as_bytes()), None);
        let data = self.get_downstream_data(0, data_size).unwrap_or_default();
        if self.config.line_mode && !end_of_stream && !data.contains(&b'\n') {
            return Action::Pause;
        }
        if let Some(new) = replace(&data, b"hello", b"howdy") {
            self.set_downstream_data(0, data_size, &new);
        }
        Action::Continue
    }

    fn on_upstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        let data = self.get_upstream_data(0, data_size).unwrap_or_default();
        if let Some(new) = replace(&data, b"HELLO", b"HOWDY") {
            self.set_upstream_data(0, data_size, &new);
        }
        Action::Continue
    }
}
