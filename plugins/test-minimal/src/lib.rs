//! The smallest useful plugin: adds `x-minimal: 1` to the request and to the response.
//!
//! Used for benchmarks and start-up tests, so it deliberately sets up nothing else:
//! no logger, no root context of its own (the SDK supplies a no-op one).

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

proxy_wasm::main! {{
    proxy_wasm::set_http_context(|_context_id, _root_context_id| -> Box<dyn HttpContext> {
        Box::new(Minimal)
    });
}}

struct Minimal;

impl Context for Minimal {}

impl HttpContext for Minimal {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.add_http_request_header("x-minimal", "1");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.add_http_response_header("x-minimal", "1");
        Action::Continue
    }
}
