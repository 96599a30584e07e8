//! Adds one configurable header to requests, responses or both.
//!
//! Plugin configuration (JSON, every field optional):
//! `{"name": "hello", "value": "world", "side": "request" | "response" | "both"}`.
//! The defaults are `hello`, `world` and `response`. See README.md.

use std::rc::Rc;

use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(AddHeaderRoot { config: Rc::default() })
    });
}}

/// Which message(s) get the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Side {
    Request,
    #[default]
    Response,
    Both,
}

impl Side {
    fn request(self) -> bool {
        matches!(self, Side::Request | Side::Both)
    }

    fn response(self) -> bool {
        matches!(self, Side::Response | Side::Both)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct Config {
    name: String,
    value: String,
    side: Side,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: "hello".into(),
            value: "world".into(),
            side: Side::default(),
        }
    }
}

impl Config {
    /// The configuration must be a JSON object: serde would otherwise also accept an
    /// array and map its elements onto the fields in order.
    fn parse(raw: &[u8]) -> Result<Self, serde_json::Error> {
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(raw)?;
        Config::deserialize(serde_json::Value::Object(object))
    }
}

struct AddHeaderRoot {
    /// Shared with every HTTP context; replaced wholesale on reconfiguration, so
    /// streams already in flight keep the configuration they started with.
    config: Rc<Config>,
}

impl Context for AddHeaderRoot {}

impl RootContext for AddHeaderRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        // No configuration at all means "all defaults".
        let config = if raw.iter().all(u8::is_ascii_whitespace) {
            Config::default()
        } else {
            match Config::parse(&raw) {
                Ok(config) => config,
                Err(err) => {
                    error!("add-header: invalid configuration: {err}");
                    return false;
                }
            }
        };
        info!(
            "add-header: {}: {} on {:?}",
            config.name, config.value, config.side
        );
        self.config = Rc::new(config);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(AddHeader {
            config: Rc::clone(&self.config),
        }))
    }

    // Without this the SDK does not know which kind of stream context to create.
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct AddHeader {
    config: Rc<Config>,
}

impl Context for AddHeader {}

impl HttpContext for AddHeader {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.config.side.request() {
            self.add_http_request_header(&self.config.name, &self.config.value);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.config.side.response() {
            self.add_http_response_header(&self.config.name, &self.config.value);
        }
        Action::Continue
    }
}
