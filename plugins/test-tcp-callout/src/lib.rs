//! A network (TCP) test plugin that holds a connection until an `http_call` answers.
//!
//! Configuration (JSON): `{"cluster": "auth", "path": "/auth", "phase": "connection"}` (or
//! `"data"`). In `connection` phase `on_new_connection` sends the call and pauses; in `data` phase
//! the first `on_downstream_data` does, and later data is held (Pause) meanwhile. A 200 answer
//! continues the downstream (`proxy_continue_stream(DOWNSTREAM)`); anything else, or a failed
//! call, closes it. In `upstream_data` phase the first `on_upstream_data` sends the call and holds
//! the upstream's bytes, and a 200 answer continues the upstream
//! (`proxy_continue_stream(UPSTREAM)`, which Envoy answers UNIMPLEMENTED and the SDK traps on).
//! Counter `tcp_callout_answers` counts answers.

use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType};
use serde::Deserialize;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(CalloutRoot::default()) });
}}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
struct Config {
    cluster: String,
    path: String,
    phase: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            cluster: "auth".to_owned(),
            path: "/auth".to_owned(),
            phase: "connection".to_owned(),
        }
    }
}

#[derive(Default)]
struct CalloutRoot {
    config: Config,
    answers: u32,
}

impl Context for CalloutRoot {}

impl RootContext for CalloutRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        match self.get_plugin_configuration() {
            Some(raw) if !raw.is_empty() => match serde_json::from_slice(&raw) {
                Ok(config) => self.config = config,
                Err(_) => return false,
            },
            _ => {}
        }
        self.answers =
            hostcalls::define_metric(MetricType::Counter, "tcp_callout_answers").unwrap_or(0);
        true
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Callout {
            config: self.config.clone(),
            answers: self.answers,
            state: State::Idle,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}

#[derive(PartialEq, Eq)]
enum State {
    Idle,
    Waiting,
    Allowed,
}

struct Callout {
    config: Config,
    answers: u32,
    state: State,
}

impl Callout {
    /// Sends the call; true if it is on its way.
    fn call(&mut self) -> bool {
        let sent = self.dispatch_http_call(
            &self.config.cluster,
            vec![
                (":method", "GET"),
                (":path", &self.config.path),
                (":authority", "auth.local"),
            ],
            None,
            vec![],
            Duration::from_secs(5),
        );
        match sent {
            Ok(_) => {
                self.state = State::Waiting;
                true
            }
            Err(_) => {
                self.close_downstream();
                false
            }
        }
    }
}

impl Context for Callout {
    fn on_http_call_response(&mut self, _token: u32, headers: usize, _body: usize, _trailers: usize) {
        let _ = hostcalls::increment_metric(self.answers, 1);
        // A failed call has no headers: reading one is BAD_ARGUMENT in Envoy, a panic in the SDK.
        let status = if headers > 0 {
            self.get_http_call_response_header(":status")
        } else {
            None
        };
        if status.as_deref() == Some("200") {
            self.state = State::Allowed;
            if self.config.phase == "upstream_data" {
                self.resume_upstream();
            } else {
                self.resume_downstream();
            }
        } else {
            self.close_downstream();
        }
    }
}

impl StreamContext for Callout {
    fn on_new_connection(&mut self) -> Action {
        if self.config.phase == "connection" && self.call() {
            return Action::Pause;
        }
        Action::Continue
    }

    fn on_downstream_data(&mut self, _data_size: usize, _end_of_stream: bool) -> Action {
        match self.state {
            State::Allowed => Action::Continue,
            State::Waiting => Action::Pause,
            State::Idle => {
                if self.config.phase == "data" && self.call() {
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
        }
    }

    fn on_upstream_data(&mut self, _data_size: usize, _end_of_stream: bool) -> Action {
        if self.config.phase != "upstream_data" {
            return Action::Continue;
        }
        match self.state {
            State::Allowed => Action::Continue,
            State::Waiting => Action::Pause,
            State::Idle => {
                if self.call() {
                    Action::Pause
                } else {
                    Action::Continue
                }
            }
        }
    }
}
