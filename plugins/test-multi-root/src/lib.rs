//! One module, several root contexts: the host may create more than one root
//! context in the same VM (one per plugin sharing it), each with its own root id.
//!
//! The SDK's root factory only receives the context id, so every root context is the
//! same type and learns its root id from the `plugin_root_id` property in
//! `on_configure`. HTTP streams report the root id and their own context id in request
//! headers, which lets a test see which root context a stream was routed to.
//! A root id of `reject` makes `on_configure` fail.

use std::rc::Rc;

use log::info;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|context_id| -> Box<dyn RootContext> {
        Box::new(MultiRoot { context_id, root_id: Rc::from("") })
    });
}}

struct MultiRoot {
    context_id: u32,
    root_id: Rc<str>,
}

impl Context for MultiRoot {}

impl RootContext for MultiRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let root_id = match self.get_property(vec!["plugin_root_id"]) {
            Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            None => "none".to_owned(),
        };
        info!(
            "root context {} configured with root id {root_id:?}",
            self.context_id
        );
        self.root_id = Rc::from(root_id);
        &*self.root_id != "reject"
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(MultiRootHttp {
            context_id,
            root_id: Rc::clone(&self.root_id),
        }))
    }

    // Without this the SDK does not know which kind of stream context to create.
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct MultiRootHttp {
    context_id: u32,
    root_id: Rc<str>,
}

impl Context for MultiRootHttp {}

impl HttpContext for MultiRootHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.add_http_request_header("x-root-id", &self.root_id);
        self.add_http_request_header("x-context-id", &self.context_id.to_string());
        Action::Continue
    }
}
