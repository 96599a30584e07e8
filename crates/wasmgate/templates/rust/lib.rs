//! {{name}}: a Proxy-Wasm HTTP filter that adds one header to every response.
//!
//! Plugin configuration (JSON, both fields optional):
//! `{"header": "x-{{name}}", "value": "hello"}`.

use std::rc::Rc;

use log::{error, info};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(Root { config: Rc::new(Config::default()) })
    });
}}

struct Config {
    header: String,
    value: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            header: "x-{{name}}".to_string(),
            value: "hello".to_string(),
        }
    }
}

impl Config {
    /// Reads the JSON object the gateway passes as the plugin configuration.
    fn parse(raw: &[u8]) -> Result<Config, String> {
        let mut config = Config::default();
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(config);
        }
        let json: serde_json::Value = serde_json::from_slice(raw).map_err(|e| e.to_string())?;
        let object = json.as_object().ok_or("the configuration is not a JSON object")?;
        for (key, value) in object {
            let text = value
                .as_str()
                .ok_or_else(|| format!("\"{key}\" is not a string"))?
                .to_string();
            match key.as_str() {
                "header" => config.header = text,
                "value" => config.value = text,
                other => return Err(format!("unknown field \"{other}\"")),
            }
        }
        Ok(config)
    }
}

struct Root {
    config: Rc<Config>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&raw) {
            Ok(config) => {
                info!("{{name}}: adding {}: {}", config.header, config.value);
                self.config = Rc::new(config);
                true
            }
            Err(err) => {
                // Returning false rejects the configuration: the gateway reports it.
                error!("{{name}}: invalid configuration: {err}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Filter {
            config: Rc::clone(&self.config),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Filter {
    config: Rc<Config>,
}

impl Context for Filter {}

impl HttpContext for Filter {
    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.add_http_response_header(&self.config.header, &self.config.value);
        Action::Continue
    }
}
