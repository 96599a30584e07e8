//! The plugin `bench/` measures, the same in Envoy and in Wasmgate: per request it reads a header,
//! sets a request header, increments a counter, and sets a response header.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, MetricType};

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(BenchRoot { counter: None }) });
}}

struct BenchRoot {
    counter: Option<u32>,
}

impl Context for BenchRoot {}

impl RootContext for BenchRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        self.counter = hostcalls::define_metric(MetricType::Counter, "bench_requests_total").ok();
        self.counter.is_some()
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Bench { counter: self.counter }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Bench {
    counter: Option<u32>,
}

impl Context for Bench {}

impl HttpContext for Bench {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let agent_length = self.get_http_request_header_bytes("user-agent").map_or(0, |v| v.len());
        self.set_http_request_header("x-bench-agent-length", Some(&agent_length.to_string()));
        if let Some(counter) = self.counter {
            let _ = hostcalls::increment_metric(counter, 1);
        }
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.set_http_response_header("x-bench", Some("1"));
        Action::Continue
    }
}
