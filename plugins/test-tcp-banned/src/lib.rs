//! A network (TCP) test plugin that closes the connection when a banned word passes.
//!
//! Configuration (JSON, optional): `{"word": "forbidden", "upstream_word": "leak",
//! "trap_word": "boom"}`. Downstream data holding `word` closes the downstream
//! (`proxy_close_stream(DOWNSTREAM)`); upstream data holding `upstream_word` closes the upstream
//! (`proxy_close_stream(UPSTREAM)`); downstream data holding `trap_word` panics, which traps the VM.
//! The data that holds a banned word is dropped (set to empty) before the close.

use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(BannedRoot::default()) });
}}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct Config {
    word: String,
    upstream_word: String,
    trap_word: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            word: "forbidden".to_owned(),
            upstream_word: "leak".to_owned(),
            trap_word: "boom".to_owned(),
        }
    }
}

#[derive(Default)]
struct BannedRoot {
    config: Config,
}

impl Context for BannedRoot {}

impl RootContext for BannedRoot {
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
        Some(Box::new(Banned {
            config: self.config.clone(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}

struct Banned {
    config: Config,
}

fn holds(data: &[u8], word: &str) -> bool {
    !word.is_empty() && data.windows(word.len()).any(|w| w == word.as_bytes())
}

impl Context for Banned {}

impl StreamContext for Banned {
    fn on_downstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        let data = self.get_downstream_data(0, data_size).unwrap_or_default();
        if holds(&data, &self.config.trap_word) {
            panic!("trap word seen");
        }
        if holds(&data, &self.config.word) {
            self.set_downstream_data(0, data_size, b"");
            self.close_downstream();
        }
        Action::Continue
    }

    fn on_upstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        let data = self.get_upstream_data(0, data_size).unwrap_or_default();
        if holds(&data, &self.config.upstream_word) {
            self.set_upstream_data(0, data_size, b"");
            self.close_upstream();
        }
        Action::Continue
    }
}
