//! Every host function of a real instance, called with pointers, lengths and ids from the fuzz
//! input: in range, just past the end of memory, near `u32::MAX`, and summing past 2^32.
//!
//! The probe module (built once per process) imports every `env.proxy_*` function the runtime
//! defines and the WASI functions, and reaches each through one uniform trampoline, so a call is a
//! function index and twelve words. The input then drives a fresh VM through the public API:
//! direct calls (as the current context of a stream), and calls "armed" in the guest that the next
//! callback makes, so host functions also run inside `proxy_on_vm_start`, `proxy_on_configure`,
//! `proxy_on_http_call_response`, the gRPC callbacks, `proxy_on_foreign_function` and the stream
//! callbacks, where other buffers and maps exist. Between calls it changes the stream's maps and
//! buffers, delivers callout answers, makes the guest allocator lie, and grows memory, which
//! moves the boundaries.
//!
//! What must hold: the host never panics; every `proxy_*` call answers a `proxy_status_t` and
//! every WASI call an errno; and a VM only traps when the guest asked for it (`proc_exit`, or an
//! allocator that traps). Any other trap means the host turned bad arguments into a trap.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use wasmgate_abi::{HeaderMap, LogLevel, PeerType, StreamInfo, pairs};
use wasmgate_runtime::{
    CallOutcome, CompiledModule, PluginConfig, Runtime, RuntimeConfig, Vm, VmConfig, VmError,
};
use wasmgate_toolkit::harness::RecordingHost;

/// With `WASMGATE_FUZZ_TRACE` set, each step and answer is printed: run the target on one input
/// (`host_calls crash-...`) to see what the input did.
macro_rules! trace {
    ($($arg:tt)*) => {
        if tracing_enabled() {
            eprintln!($($arg)*);
        }
    };
}

fn tracing_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("WASMGATE_FUZZ_TRACE").is_some())
}

/// What a host function answers the guest.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Answer {
    /// A `proxy_status_t`.
    Status,
    /// A WASI errno.
    Errno,
    /// Nothing (`proc_exit`, which does not return).
    Nothing,
}

use Answer::*;

/// A function the probe imports: module, name, the kind of each argument, and the answer.
type Function = (&'static str, &'static str, &'static str, Answer);

/// Every function the probe imports: the runtime's `env` functions as it lists them
/// ([`wasmgate_runtime::host_functions`], so one it adds is fuzzed without a change here), each
/// with its argument kinds from [`env_kinds`], then [`WASI`].
///
/// Kinds, which give both the Wasm parameter types and what a well-formed argument is:
/// `n` bytes in memory (pointer, length), `c` the known cluster's name, `m` a serialized map,
/// `i` an fd_write iovec table (pointer, count), `b` a writable buffer, `o` an output pointer,
/// `k` a small enumeration value (a type, a level, an fd), `v` any i32 (an id, a token, a size),
/// `w` any i64.
///
/// A function the runtime adds without kinds in [`env_kinds`] stops the target on its first input
/// with its name; one the runtime retypes fails `Runtime::load` there. `proxy_continue_request`,
/// `proxy_continue_response` and `proxy_clear_route_cache` are imported in their status-returning
/// form; a module imports one form of a name, and the other (ABI 0.1.0's void form) runs the same
/// code.
static FUNCTIONS: LazyLock<Vec<Function>> = LazyLock::new(|| {
    let mut functions: Vec<Function> = wasmgate_runtime::host_functions()
        // The Emscripten helpers take no pointers and touch no state: nothing to fuzz.
        .filter(|(module, name)| {
            *module == "env"
                && !matches!(*name, "emscripten_notify_memory_growth" | "pthread_equal")
        })
        .map(|(module, name)| {
            let kinds = env_kinds(name).unwrap_or_else(|| {
                panic!("env.{name} is a host function without argument kinds: add it to env_kinds")
            });
            (module, name, kinds, Status)
        })
        .collect();
    for function @ (module, name, _, _) in WASI {
        assert!(
            wasmgate_runtime::host_functions().any(|f| f == (*module, *name)),
            "{module}.{name} is no longer a host function"
        );
        functions.push(*function);
    }
    functions
});

/// The argument kinds of each `env` function (see [`FUNCTIONS`]): they follow its signature in
/// the runtime.
fn env_kinds(name: &str) -> Option<&'static str> {
    Some(match name {
        "proxy_log" => "kn",
        "proxy_get_log_level" => "o",
        "proxy_get_current_time_nanoseconds" => "o",
        "proxy_set_tick_period_milliseconds" => "v",
        "proxy_get_configuration" => "oo",
        "proxy_get_buffer_bytes" => "kvvoo",
        "proxy_set_buffer_bytes" => "kvvn",
        "proxy_get_buffer_status" => "koo",
        "proxy_get_header_map_size" => "ko",
        "proxy_get_header_map_pairs" => "koo",
        "proxy_set_header_map_pairs" => "km",
        "proxy_get_header_map_value" => "knoo",
        "proxy_add_header_map_value" => "knn",
        "proxy_replace_header_map_value" => "knn",
        "proxy_remove_header_map_value" => "kn",
        "proxy_continue_stream" => "k",
        "proxy_close_stream" => "k",
        "proxy_continue_request" => "",
        "proxy_continue_response" => "",
        "proxy_clear_route_cache" => "",
        "proxy_get_status" => "ooo",
        "proxy_send_local_response" => "vnnmv",
        "proxy_http_call" => "cmnmvo",
        "proxy_grpc_call" => "cnnmnvo",
        "proxy_grpc_stream" => "cnnmo",
        "proxy_grpc_send" => "vnk",
        "proxy_grpc_cancel" => "v",
        "proxy_grpc_close" => "v",
        "proxy_get_shared_data" => "nooo",
        "proxy_set_shared_data" => "nnv",
        "proxy_register_shared_queue" => "no",
        "proxy_resolve_shared_queue" => "nno",
        "proxy_enqueue_shared_queue" => "vn",
        "proxy_dequeue_shared_queue" => "voo",
        "proxy_define_metric" => "kno",
        "proxy_increment_metric" => "vw",
        "proxy_record_metric" => "vw",
        "proxy_get_metric" => "vo",
        "proxy_get_property" => "noo",
        "proxy_set_property" => "nn",
        "proxy_set_effective_context" => "v",
        "proxy_done" => "",
        "proxy_call_foreign_function" => "nnoo",
        _ => return None,
    })
}

/// WASI: every implemented function, a few of the stubs, and the older module name.
const WASI: &[Function] = &[
    ("wasi_snapshot_preview1", "fd_write", "kio", Errno),
    ("wasi_snapshot_preview1", "fd_fdstat_get", "ko", Errno),
    ("wasi_snapshot_preview1", "clock_time_get", "kwo", Errno),
    ("wasi_snapshot_preview1", "clock_res_get", "ko", Errno),
    ("wasi_snapshot_preview1", "random_get", "b", Errno),
    ("wasi_snapshot_preview1", "environ_get", "oo", Errno),
    ("wasi_snapshot_preview1", "environ_sizes_get", "oo", Errno),
    ("wasi_snapshot_preview1", "args_get", "oo", Errno),
    ("wasi_snapshot_preview1", "args_sizes_get", "oo", Errno),
    ("wasi_snapshot_preview1", "proc_exit", "v", Nothing),
    ("wasi_snapshot_preview1", "sched_yield", "", Errno),
    ("wasi_snapshot_preview1", "fd_read", "kio", Errno),
    ("wasi_snapshot_preview1", "fd_close", "k", Errno),
    ("wasi_snapshot_preview1", "fd_seek", "kwko", Errno),
    ("wasi_snapshot_preview1", "fd_prestat_get", "ko", Errno),
    ("wasi_snapshot_preview1", "path_open", "kknkwwko", Errno),
    ("wasi_snapshot_preview1", "poll_oneoff", "oovo", Errno),
    ("wasi_snapshot_preview1", "proc_raise", "k", Errno),
    ("wasi_unstable", "fd_write", "kio", Errno),
    ("wasi_unstable", "random_get", "b", Errno),
    ("wasi_unstable", "clock_time_get", "kwo", Errno),
    ("wasi_unstable", "environ_get", "oo", Errno),
];

/// Words an argument of this kind takes: spans and i64s take two.
fn words_of(kind: char) -> usize {
    if "ncmibw".contains(kind) { 2 } else { 1 }
}

/// Words a call takes.
fn arity(kinds: &str) -> usize {
    kinds.chars().map(words_of).sum()
}

/// Every trampoline takes this many i32 words; the widest function (`proxy_grpc_call`) needs 12.
const WORDS: usize = 12;
/// Calls the guest can hold armed for its next callback.
const SLOTS: usize = 3;
/// Steps one input may take, so an input's run time stays bounded.
const MAX_STEPS: usize = 64;

const PAGE: u32 = 65536;
/// The probe's memory starts at one page and may grow to this many.
const MAX_PAGES: u32 = 4;
/// Where the constant data (names, maps, iovec tables) lives; below it, a little room near 0.
const BLOB_AT: u32 = 256;
/// Output slots for host functions to write into.
const OUT_AT: u32 = 8192;
/// The guest allocator's heap, up to the end of memory.
const HEAP_AT: u32 = 16384;

const CLUSTER: &str = "upstream_cluster";
const FOREIGN: &str = "echo";

/// The probe module, and where its constant data lies.
struct Probe {
    runtime: Arc<Runtime>,
    module: Arc<CompiledModule>,
    layout: Layout,
}

fn probe() -> &'static Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    PROBE.get_or_init(|| {
        // Another subscriber (none is expected) would do as well.
        let _ = tracing::subscriber::set_global_default(FormatEverything);
        let runtime = Runtime::new(RuntimeConfig {
            max_vms: 4,
            max_memory_bytes: (MAX_PAGES * PAGE) as usize,
            // Every log line goes through the whole path.
            log_level: LogLevel::Trace,
            // No time limit: a host call that hangs is for libFuzzer's -timeout to report, not a
            // trap this target would have to tell apart from the traps it looks for.
            callback_time_limit: Duration::ZERO,
            ..RuntimeConfig::default()
        })
        .expect("the runtime starts");
        let layout = Layout::new();
        let module = runtime
            .load(&probe_module(&layout))
            .expect("the probe module loads");
        Probe {
            runtime,
            module,
            layout,
        }
    })
}

/// A `tracing` subscriber that enables everything and formats every field into nothing, so the
/// runtime's log lines and host/VM trace, which format what guests pass, run as they do in a
/// gateway with `wasm` logging at trace.
struct FormatEverything;

impl tracing::Subscriber for FormatEverything {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        span.record(&mut Discard);
        tracing::span::Id::from_u64(1)
    }

    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        values.record(&mut Discard);
    }

    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}

    fn event(&self, event: &tracing::Event<'_>) {
        event.record(&mut Discard);
    }

    fn enter(&self, _: &tracing::span::Id) {}

    fn exit(&self, _: &tracing::span::Id) {}
}

struct Discard;

impl tracing::field::Visit for Discard {
    fn record_debug(&mut self, _: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::io::Write;
        let _ = write!(std::io::sink(), "{value:?}");
    }
}

/// Constant data laid out from [`BLOB_AT`], 4-byte aligned, and where each item lies.
#[derive(Default)]
struct Layout {
    bytes: Vec<u8>,
    /// `(pointer, length)` of every item, for arguments of kind `n`.
    spans: Vec<(u32, u32)>,
    /// Serialized maps, well-formed and not, for kind `m`.
    maps: Vec<(u32, u32)>,
    /// `(pointer, entry count)` of fd_write iovec tables, for kind `i`.
    iovecs: Vec<(u32, u32)>,
    /// The name of the one cluster the host knows, for kind `c`.
    cluster: (u32, u32),
}

impl Layout {
    fn add(&mut self, item: &[u8]) -> (u32, u32) {
        self.bytes.resize(self.bytes.len().next_multiple_of(4), 0);
        let span = (BLOB_AT + self.bytes.len() as u32, item.len() as u32);
        self.bytes.extend_from_slice(item);
        self.spans.push(span);
        span
    }

    fn add_map(&mut self, item: &[u8]) {
        let span = self.add(item);
        self.maps.push(span);
    }

    fn add_iovecs(&mut self, entries: &[(u32, u32)]) {
        let table: Vec<u8> = entries
            .iter()
            .flat_map(|(pointer, len)| [pointer.to_le_bytes(), len.to_le_bytes()])
            .flatten()
            .collect();
        let (pointer, _) = self.add(&table);
        self.iovecs.push((pointer, entries.len() as u32));
    }

    fn new() -> Self {
        let mut layout = Layout::default();
        layout.cluster = layout.add(CLUSTER.as_bytes());
        for text in [
            FOREIGN,
            "fuzz",
            "queue",
            "metric",
            "",
            ":path",
            ":authority",
            "content-length",
            "x-fuzz",
            "/path?query=1",
            "plugin_name",
            "plugin_vm_id",
            "request\0path",
            "request\0headers\0:path",
            "request\0url_path",
            "request\0query",
            "request\0duration",
            "request\0size",
            "response\0code",
            "response\0headers",
            "response\0grpc_status",
            "source\0address",
            "source\0port",
            "destination\0address",
            "connection\0mtls",
            "connection_id",
            "upstream\0address",
            "xds\0node\0id",
            "filter\0state\0key",
        ] {
            layout.add(text.as_bytes());
        }
        layout.add(b"\xff\xfe\xfd not UTF-8");
        layout.add_map(&pairs::encode(&[
            (":method", "GET"),
            (":path", "/"),
            (":authority", "example.com"),
            ("content-type", "text/plain"),
        ]));
        // No :authority: proxy_http_call must refuse it.
        layout.add_map(&pairs::encode(&[(":method", "POST"), (":path", "/")]));
        layout.add_map(&pairs::encode(&[
            ("grpc-status", "0"),
            ("", ""),
            ("a\0b", "\0"),
        ]));
        // Five pairs declared, one size entry given.
        layout.add_map(&[5, 0, 0, 0, 1, 0, 0, 0]);
        // A key that claims 4 GiB.
        layout.add_map(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, b'k', 0, 0]);
        // The two spellings of an empty map besides zero bytes.
        layout.add_map(&[0]);
        layout.add_map(&[0, 0, 0, 0]);
        let hello = layout.add(b"hello\n");
        let lines = layout.add(b"a line\nand another");
        layout.add_iovecs(&[hello, lines]);
        // The second entry runs off the end of the first page.
        layout.add_iovecs(&[hello, (PAGE - 2, 16)]);
        layout.add_iovecs(&[]);
        assert!(BLOB_AT as usize + layout.bytes.len() < OUT_AT as usize);
        layout
    }
}

/// Every Proxy-Wasm callback the runtime calls (its own list, so one it adds is fuzzed too), with
/// its parameter count and whether it answers a value; the allocators and start functions are the
/// probe's own.
fn callbacks() -> impl Iterator<Item = &'static (&'static str, usize, bool)> {
    wasmgate_runtime::CALLBACKS
        .iter()
        .filter(|(name, _, _)| name.starts_with("proxy_on_") && *name != "proxy_on_memory_allocate")
}

/// What `set` changes in the guest.
const SET_ALLOC_MODE: i32 = 0;
const SET_ALLOC_VALUE: i32 = 1;
const SET_ANSWER: i32 = 2;

/// Allocator modes: honest (a bump allocator that starts over when memory runs out, and answers
/// 0 when a request cannot fit), answers 0, answers a chosen address, traps, grows memory by a page
/// and answers its start (memory changes size inside the host call).
const ALLOC_MODES: i32 = 5;
const ALLOC_TRAPS: i32 = 3;
const ALLOC_GROWS: i32 = 4;

/// The Wasm parameter types of an argument kind.
fn wasm_params(kind: char) -> &'static str {
    match kind {
        'w' => "i64 ",
        _ if words_of(kind) == 2 => "i32 i32 ",
        _ => "i32 ",
    }
}

fn probe_module(layout: &Layout) -> Vec<u8> {
    let twelve = "i32 ".repeat(WORDS);
    let mut wat = format!("(module\n  (type $t (func (param {twelve}) (result i32)))\n");
    for (index, (module, name, kinds, answer)) in FUNCTIONS.iter().enumerate() {
        let params: String = kinds.chars().map(wasm_params).collect();
        let result = if *answer == Nothing {
            ""
        } else {
            "(result i32)"
        };
        wat.push_str(&format!(
            "  (import \"{module}\" \"{name}\" (func $f{index} (param {params}) {result}))\n"
        ));
    }
    let data: String = layout.bytes.iter().map(|b| format!("\\{b:02x}")).collect();
    wat.push_str(&format!(
        r#"  (memory (export "memory") 1 {MAX_PAGES})
  (data (i32.const {BLOB_AT}) "{data}")
  (global $mode (mut i32) (i32.const 0))
  (global $alloc_value (mut i32) (i32.const 0))
  (global $answer (mut i32) (i32.const 1))
  (global $next (mut i32) (i32.const {HEAP_AT}))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32) (local $at i32)
    (if (i32.eq (global.get $mode) (i32.const 1)) (then (return (i32.const 0))))
    (if (i32.eq (global.get $mode) (i32.const 2)) (then (return (global.get $alloc_value))))
    (if (i32.eq (global.get $mode) (i32.const {ALLOC_TRAPS})) (then unreachable))
    (if (i32.eq (global.get $mode) (i32.const {ALLOC_GROWS})) (then
      (local.set $at (memory.grow (i32.const 1)))
      (if (i32.eq (local.get $at) (i32.const -1)) (then (return (i32.const 0))))
      (return (i32.mul (local.get $at) (i32.const {PAGE})))))
    (if (i32.gt_u (local.get $size) (i32.sub (i32.mul (memory.size) (i32.const {PAGE})) (global.get $next)))
      (then (global.set $next (i32.const {HEAP_AT}))))
    (if (i32.gt_u (local.get $size) (i32.sub (i32.mul (memory.size) (i32.const {PAGE})) (global.get $next)))
      (then (return (i32.const 0))))
    (local.set $at (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $size)))
    (local.get $at))
  (func (export "set") (param $what i32) (param $value i32)
    (if (i32.eq (local.get $what) (i32.const {SET_ALLOC_MODE})) (then (global.set $mode (local.get $value))))
    (if (i32.eq (local.get $what) (i32.const {SET_ALLOC_VALUE})) (then (global.set $alloc_value (local.get $value))))
    (if (i32.eq (local.get $what) (i32.const {SET_ANSWER})) (then (global.set $answer (local.get $value)))))
  (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
  (func (export "pages") (result i32) (memory.size))
  (func (export "poke") (param i32 i32) (i32.store8 (local.get 0) (local.get 1)))
"#
    ));
    // One trampoline per function, all of type $t, in a table: a call is an index and 12 words.
    let mut elems = String::new();
    for (index, (_, _, kinds, answer)) in FUNCTIONS.iter().enumerate() {
        let mut body = String::new();
        let mut word = 0;
        for kind in kinds.chars() {
            if kind == 'w' {
                body.push_str(&format!(
                    "(i64.or (i64.extend_i32_u (local.get {word})) \
                     (i64.shl (i64.extend_i32_u (local.get {})) (i64.const 32))) ",
                    word + 1
                ));
                word += 2;
            } else {
                for _ in 0..words_of(kind) {
                    body.push_str(&format!("(local.get {word}) "));
                    word += 1;
                }
            }
        }
        assert!(word <= WORDS);
        let tail = if *answer == Nothing {
            "(i32.const 0)"
        } else {
            ""
        };
        wat.push_str(&format!(
            "  (func $c{index} (type $t) (call $f{index} {body}) {tail})\n"
        ));
        elems.push_str(&format!(" $c{index}"));
    }
    let n = FUNCTIONS.len();
    wat.push_str(&format!(
        "  (table {n} funcref)\n  (elem (i32.const 0) func{elems})\n"
    ));
    let gets: String = (1..=WORDS).map(|i| format!("(local.get {i}) ")).collect();
    wat.push_str(&format!(
        "  (func (export \"call\") (param $fn i32) (param {twelve}) (result i32)\n    \
         (call_indirect (type $t) {gets}(local.get $fn)))\n"
    ));
    // Armed calls: each slot holds a function and its words until a callback makes the call.
    let mut run_armed = String::new();
    let mut arm = String::new();
    let mut result = String::new();
    for slot in 0..SLOTS {
        wat.push_str(&format!(
            "  (global $armed{slot} (mut i32) (i32.const 0))\n  \
             (global $fn{slot} (mut i32) (i32.const 0))\n  \
             (global $r{slot} (mut i32) (i32.const 0))\n"
        ));
        let mut sets = String::new();
        let mut args = String::new();
        for w in 0..WORDS {
            wat.push_str(&format!(
                "  (global $a{slot}_{w} (mut i32) (i32.const 0))\n"
            ));
            sets.push_str(&format!("(global.set $a{slot}_{w} (local.get {})) ", w + 2));
            args.push_str(&format!("(global.get $a{slot}_{w}) "));
        }
        arm.push_str(&format!(
            "    (if (i32.eq (local.get 0) (i32.const {slot})) (then \
             (global.set $armed{slot} (i32.const 1)) (global.set $fn{slot} (local.get 1)) {sets}))\n"
        ));
        // Disarmed before the call, so a callback the call causes does not make it again.
        run_armed.push_str(&format!(
            "    (if (global.get $armed{slot}) (then (global.set $armed{slot} (i32.const 0)) \
             (global.set $r{slot} (call_indirect (type $t) {args}(global.get $fn{slot})))))\n"
        ));
        result.push_str(&format!(
            "    (if (i32.eq (local.get 0) (i32.const {slot})) (then \
             (return (global.get $armed{slot}) (global.get $r{slot}))))\n"
        ));
    }
    wat.push_str(&format!(
        "  (func (export \"arm\") (param i32 i32 {twelve})\n{arm}  )\n\
         \x20 (func $run_armed\n{run_armed}  )\n\
         \x20 (func (export \"result\") (param i32) (result i32 i32)\n{result}    \
         (i32.const 0) (i32.const 0))\n"
    ));
    for (name, params, answers) in callbacks() {
        let params = "i32 ".repeat(*params);
        let (result, tail) = if *answers {
            ("(result i32)", "(global.get $answer)")
        } else {
            ("", "")
        };
        wat.push_str(&format!(
            "  (func (export \"{name}\") (param {params}) {result} (call $run_armed) {tail})\n"
        ));
    }
    wat.push_str(")\n");
    wat::parse_str(&wat).expect("the probe module is valid WAT")
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let mut run = Run::new(&mut u);
    // Running out of input ends the run early; everything it did has been checked.
    let _ = run.steps(&mut u);
});

/// One input's VM and what the driver knows about it.
struct Run {
    probe: &'static Probe,
    vm: Vm,
    host: RecordingHost,
    root: u32,
    stream: u32,
    pages: u32,
    /// The function armed in each slot, until its call is made.
    armed: [Option<usize>; SLOTS],
    /// The input armed or called `proc_exit`, or made the allocator trap: a trap may follow.
    trap_asked: bool,
    /// The VM trapped: it serves no more callbacks, and the run ends.
    over: bool,
    /// The allocator was set to grow memory: `pages` is read again after each step.
    allocator_grows: bool,
}

impl Run {
    fn new(u: &mut Unstructured<'_>) -> Self {
        let probe = probe();
        let host = RecordingHost::new(vec![CLUSTER.into()])
            .with_foreign_function(FOREIGN, Arc::new(|arguments| Ok(arguments.to_vec())));
        // Fields not set here keep their defaults (no capability restriction). The allow is for
        // VmConfig versions without such fields, where the struct update changes nothing.
        #[allow(clippy::needless_update)]
        let config = VmConfig {
            vm_id: "fuzz".into(),
            configuration: take(u, 16).to_vec(),
            environment: (0..u.int_in_range(0..=2u8).unwrap_or(0))
                .map(|i| {
                    let value = String::from_utf8_lossy(take(u, 8)).into_owned();
                    (format!("VAR{i}"), value)
                })
                .collect(),
            ..VmConfig::default()
        };
        let vm = Vm::new(
            &probe.runtime,
            &probe.module,
            config,
            Box::new(host.clone()),
        )
        .expect("the probe instantiates");
        let mut run = Run {
            probe,
            vm,
            host,
            root: 0,
            stream: 0,
            pages: 1,
            armed: [None; SLOTS],
            trap_asked: false,
            over: false,
            allocator_grows: false,
        };
        run.start(u);
        run
    }

    /// Starts the plugin and one stream, with calls armed for their callbacks when the input asks.
    fn start(&mut self, u: &mut Unstructured<'_>) {
        for slot in 0..SLOTS {
            if u.ratio(1, 3).unwrap_or(false) {
                let _ = self.arm(u, slot);
            }
        }
        let plugin = PluginConfig {
            name: "fuzz".into(),
            root_id: String::new(),
            configuration: take(u, 16).to_vec(),
        };
        let started = self.vm.start_plugin(plugin);
        let Some(root) = self.outcome(started) else {
            return;
        };
        self.root = root;
        self.new_stream(root);
    }

    fn new_stream(&mut self, root: u32) {
        let created = self.vm.create_stream(root);
        let Some(stream) = self.outcome(created) else {
            return;
        };
        self.stream = stream;
        if let Some(data) = self.vm.stream_mut(stream) {
            data.request_headers = Some(
                HeaderMap::from_pairs([
                    (":method", "GET"),
                    (":path", "/path?query=1"),
                    (":authority", "example.com"),
                    ("content-length", "4"),
                ])
                .into(),
            );
            data.request_body = Some(b"body".to_vec());
            data.info = stream_info();
        }
    }

    fn steps(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        for _ in 0..MAX_STEPS {
            if self.over || u.is_empty() {
                break;
            }
            let step = u.int_in_range(0..=15u8)?;
            trace!("step {step}");
            match step {
                0..=3 => self.direct_call(u)?,
                4 | 5 => {
                    let slot = u.choose_index(SLOTS)?;
                    self.arm(u, slot)?;
                }
                6 | 7 => self.stream_callback(u)?,
                8 => self.http_call_response(u)?,
                9 => self.grpc_event(u)?,
                10 => {
                    let root = self.context(u)?;
                    let function_id = u.arbitrary()?;
                    let arguments = take(u, 16).to_vec();
                    let result = self.vm.on_foreign_function(root, function_id, arguments);
                    self.outcome(result);
                }
                11 => self.root_event(u)?,
                12 => self.set_stream_data(u)?,
                13 => self.guest_setting(u)?,
                14 => self.memory(u)?,
                _ => self.lifecycle(u)?,
            }
            self.collect_armed();
            if self.allocator_grows {
                self.update_pages();
            }
        }
        Ok(())
    }

    /// A function and its words, as the input chooses them.
    fn call(&self, u: &mut Unstructured<'_>) -> Result<(usize, [i32; WORDS])> {
        let function = u.choose_index(FUNCTIONS.len())?;
        let kinds = FUNCTIONS[function].2;
        let needed = arity(kinds);
        let mut words = [0u32; WORDS];
        if u.ratio(1, 4)? {
            // Every word hostile.
            let mut filled = 0;
            while filled < needed {
                let previous = if filled > 0 { words[filled - 1] } else { 0 };
                for word in self.word(u, previous)? {
                    if filled < needed {
                        words[filled] = word;
                        filled += 1;
                    }
                }
            }
        } else {
            // Well-formed arguments with at most two words made hostile: a bad value then meets
            // the checks that only run once the other arguments have passed theirs.
            let mut filled = 0;
            for kind in kinds.chars() {
                for word in self.well_formed(u, kind)? {
                    words[filled] = word;
                    filled += 1;
                }
            }
            if needed > 0 {
                for _ in 0..u.int_in_range(0..=2u8)? {
                    let index = u.choose_index(needed)?;
                    let previous = if index > 0 { words[index - 1] } else { 0 };
                    words[index] = self.word(u, previous)?[0];
                }
            }
        }
        Ok((function, words.map(|word| word as i32)))
    }

    /// A well-formed argument of `kind` (see [`FUNCTIONS`]).
    fn well_formed(&self, u: &mut Unstructured<'_>, kind: char) -> Result<Vec<u32>> {
        let layout = &self.probe.layout;
        let pick = |u: &mut Unstructured<'_>, spans: &[(u32, u32)]| -> Result<Vec<u32>> {
            let (pointer, len) = spans[u.choose_index(spans.len())?];
            Ok(vec![pointer, len])
        };
        Ok(match kind {
            'n' => pick(u, &layout.spans)?,
            'c' => vec![layout.cluster.0, layout.cluster.1],
            'm' => pick(u, &layout.maps)?,
            'i' => pick(u, &layout.iovecs)?,
            'b' => vec![
                OUT_AT + 4 * u.int_in_range(0..=63)?,
                u.int_in_range(0..=64)?,
            ],
            'o' => vec![OUT_AT + 4 * u.int_in_range(0..=63)?],
            'k' => vec![u.int_in_range(0..=9)?],
            'w' => vec![u.int_in_range(0..=16)?, 0],
            // Ids, tokens, sizes and codes are small, or anything.
            _ if u.ratio(3, 4)? => vec![u.int_in_range(0..=16)?],
            _ => vec![u.arbitrary()?],
        })
    }

    /// One argument, or a pointer and its length. Pointers and lengths are where hosts go wrong, so
    /// most choices are places in memory, its end, and values whose sum with the previous word
    /// lands exactly on the end of memory or on 2^32.
    fn word(&self, u: &mut Unstructured<'_>, previous: u32) -> Result<Vec<u32>> {
        let end = self.pages * PAGE;
        let near = |u: &mut Unstructured<'_>, base: u32| -> Result<u32> {
            Ok(base.wrapping_add(u.int_in_range(0..=4u32)?).wrapping_sub(2))
        };
        Ok(vec![match u.int_in_range(0..=15u8)? {
            0 => 0,
            1 => u.int_in_range(0..=9)?,
            2 | 3 => {
                let spans = &self.probe.layout.spans;
                let (pointer, len) = spans[u.choose_index(spans.len())?];
                return Ok(vec![pointer, len]);
            }
            4 => {
                let spans = &self.probe.layout.spans;
                spans[u.choose_index(spans.len())?].0
            }
            5 => OUT_AT + 4 * u.int_in_range(0..=63)?,
            6 => end - u.int_in_range(0..=16)?,
            7 => end + u.int_in_range(0..=16)?,
            8 => u32::MAX - u.int_in_range(0..=16)?,
            9 => near(u, 1 << 31)?,
            // With the previous word as a pointer: a length reaching exactly the end of memory...
            10 => near(u, end.wrapping_sub(previous))?,
            // ...or one whose sum with it wraps around 2^32.
            11 => near(u, 0u32.wrapping_sub(previous))?,
            12 => {
                let pages = u.int_in_range(1..=MAX_PAGES)?;
                near(u, PAGE * pages)?
            }
            13 => HEAP_AT + 16 * u.int_in_range(0..=255)?,
            14 => u.arbitrary()?,
            _ => u.int_in_range(-8..=64i32)? as u32,
        }])
    }

    /// A context id: the stream, the plugin, no context, any live one, or one that never existed.
    fn context(&self, u: &mut Unstructured<'_>) -> Result<u32> {
        Ok(match u.int_in_range(0..=5u8)? {
            0 => self.stream,
            1 => self.root,
            2 => 0,
            3 => {
                let ids = self.vm.context_ids();
                if ids.is_empty() {
                    0
                } else {
                    ids[u.choose_index(ids.len())?]
                }
            }
            4 => u.int_in_range(0..=16)?,
            _ => u.arbitrary()?,
        })
    }

    /// A call made by the driver, as the guest would in a stream callback of `context`.
    fn direct_call(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let context = self.context(u)?;
        let (function, words) = self.call(u)?;
        self.note_exit(function);
        let mut args = vec![function as i32];
        args.extend_from_slice(&words);
        trace!(
            "call {} {words:?} in context {context}",
            FUNCTIONS[function].1
        );
        let result = self.vm.call_export(context, "call", &args);
        if let Some(answers) = self.outcome(result) {
            check_answer(function, answers[0]);
        }
        Ok(())
    }

    /// Arms `slot` with a call the next callback makes.
    fn arm(&mut self, u: &mut Unstructured<'_>, slot: usize) -> Result<()> {
        let (function, words) = self.call(u)?;
        self.note_exit(function);
        let mut args = vec![slot as i32, function as i32];
        args.extend_from_slice(&words);
        trace!("arm slot {slot}: {} {words:?}", FUNCTIONS[function].1);
        let result = self.vm.call_export(self.stream, "arm", &args);
        if self.outcome(result).is_some() {
            self.armed[slot] = Some(function);
        }
        Ok(())
    }

    fn note_exit(&mut self, function: usize) {
        if FUNCTIONS[function].1 == "proc_exit" {
            self.trap_asked = true;
        }
    }

    /// The memory size, which an allocator that grows memory may have changed.
    fn update_pages(&mut self) {
        if self.over {
            return;
        }
        let size = self.vm.call_export(self.stream, "pages", &[]);
        if let Some(size) = self.outcome(size) {
            self.pages = size[0] as u32;
        }
    }

    /// Checks the answers of armed calls that a callback made.
    fn collect_armed(&mut self) {
        for slot in 0..SLOTS {
            if self.over {
                return;
            }
            let Some(function) = self.armed[slot] else {
                continue;
            };
            let result = self.vm.call_export(self.stream, "result", &[slot as i32]);
            if let Some(answer) = self.outcome(result)
                && answer[0] == 0
            {
                check_answer(function, answer[1]);
                self.armed[slot] = None;
            }
        }
    }

    fn stream_callback(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let context = self.context(u)?;
        let end_of_stream = u.arbitrary()?;
        let peer = [PeerType::Unknown, PeerType::Local, PeerType::Remote][u.choose_index(3)?];
        let vm = &mut self.vm;
        let result = match u.int_in_range(0..=10u8)? {
            0 => vm.on_request_headers(context, end_of_stream).map(drop),
            1 => vm.on_request_body(context, end_of_stream).map(drop),
            2 => vm.on_request_trailers(context).map(drop),
            3 => vm.on_response_headers(context, end_of_stream).map(drop),
            4 => vm.on_response_body(context, end_of_stream).map(drop),
            5 => vm.on_response_trailers(context).map(drop),
            6 => vm.on_new_connection(context).map(drop),
            7 => vm.on_downstream_data(context, end_of_stream).map(drop),
            8 => vm.on_upstream_data(context, end_of_stream).map(drop),
            9 => vm.on_downstream_connection_close(context, peer),
            _ => vm.on_upstream_connection_close(context, peer),
        };
        self.outcome(result);
        Ok(())
    }

    /// A token the guest was given, or one it was not.
    fn token(&self, u: &mut Unstructured<'_>, grpc: bool) -> Result<u32> {
        let recorded = self.host.recorded.lock();
        let tokens: Vec<u32> = if grpc {
            let calls = recorded.grpc_calls.iter().map(|(_, token, _)| *token);
            let streams = recorded.grpc_streams.iter().map(|(_, token, _)| *token);
            calls.chain(streams).collect()
        } else {
            recorded.http_calls.iter().map(|(_, t, _)| *t).collect()
        };
        drop(recorded);
        if tokens.is_empty() || u.ratio(1, 8)? {
            return u.int_in_range(0..=8);
        }
        Ok(tokens[u.choose_index(tokens.len())?])
    }

    fn http_call_response(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let token = self.token(u, false)?;
        let outcome = if u.ratio(1, 4)? {
            CallOutcome::Failure {
                message: String::from_utf8_lossy(take(u, 16)).into_owned(),
            }
        } else {
            CallOutcome::Response {
                headers: header_map(u)?,
                body: take(u, 32).to_vec(),
                trailers: header_map(u)?,
            }
        };
        let result = self.vm.on_http_call_response(token, outcome);
        self.outcome(result);
        Ok(())
    }

    fn grpc_event(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let token = self.token(u, true)?;
        let result = match u.int_in_range(0..=4u8)? {
            0 => {
                let metadata = header_map(u)?;
                self.vm.on_grpc_receive_initial_metadata(token, metadata)
            }
            1 => {
                let message = take(u, 32).to_vec();
                self.vm.on_grpc_receive(token, message)
            }
            2 => {
                let metadata = header_map(u)?;
                self.vm.on_grpc_receive_trailing_metadata(token, metadata)
            }
            3 => {
                let status = u.int_in_range(0..=20)?;
                let message = String::from_utf8_lossy(take(u, 16)).into_owned();
                self.vm.on_grpc_close(token, status, &message)
            }
            _ => {
                self.vm.end_grpc_call(token);
                Ok(())
            }
        };
        self.outcome(result);
        Ok(())
    }

    /// Callbacks of a plugin (root context): timers, queues, a new configuration.
    fn root_event(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let root = self.context(u)?;
        match u.int_in_range(0..=2u8)? {
            0 => {
                let result = self.vm.on_tick(root);
                self.outcome(result);
            }
            1 => {
                let result = self.vm.deliver_queue_ready();
                self.outcome(result);
            }
            _ => {
                let configuration = take(u, 16).to_vec();
                let result = self.vm.reconfigure(root, configuration);
                self.outcome(result);
            }
        }
        Ok(())
    }

    /// Replaces one of a stream's maps or buffers, or takes it away.
    fn set_stream_data(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let context = self.context(u)?;
        let which = u.int_in_range(0..=7u8)?;
        let present = !u.ratio(1, 4)?;
        let map = if present {
            Some(header_map(u)?.into())
        } else {
            None
        };
        let bytes = present.then(|| take(u, 48).to_vec());
        let Some(stream) = self.vm.stream_mut(context) else {
            return Ok(());
        };
        match which {
            0 => stream.request_headers = map,
            1 => stream.request_trailers = map,
            2 => stream.response_headers = map,
            3 => stream.response_trailers = map,
            4 => stream.request_body = bytes,
            5 => stream.response_body = bytes,
            6 => stream.downstream_data = bytes,
            _ => stream.upstream_data = bytes,
        }
        Ok(())
    }

    /// The guest's allocator mode and the value its callbacks answer.
    fn guest_setting(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let (what, value) = match u.int_in_range(0..=2u8)? {
            0 => {
                let mode = u.int_in_range(0..=ALLOC_MODES - 1)?;
                if mode == ALLOC_TRAPS {
                    self.trap_asked = true;
                }
                self.allocator_grows |= mode == ALLOC_GROWS;
                (SET_ALLOC_MODE, mode)
            }
            1 => {
                let end = self.pages * PAGE;
                let value = match u.int_in_range(0..=3u8)? {
                    0 => end - u.int_in_range(0..=16)?,
                    1 => u32::MAX - u.int_in_range(0..=16)?,
                    2 => HEAP_AT,
                    _ => u.arbitrary()?,
                };
                (SET_ALLOC_VALUE, value as i32)
            }
            _ => (SET_ANSWER, u.int_in_range(0..=3)?),
        };
        trace!(
            "set {} to {value}",
            ["allocator mode", "allocator answer", "callback answer"][what as usize]
        );
        let result = self.vm.call_export(self.stream, "set", &[what, value]);
        self.outcome(result);
        Ok(())
    }

    /// Grows memory, which moves every boundary, or writes a few bytes where the input says.
    fn memory(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        if u.arbitrary()? {
            let pages = u.int_in_range(0..=2)?;
            let grown = self.vm.call_export(self.stream, "grow", &[pages]);
            self.outcome(grown);
            self.update_pages();
        } else {
            let end = self.pages * PAGE;
            let bytes = take(u, 16);
            let at = u.int_in_range(0..=end - bytes.len() as u32)?;
            for (offset, byte) in bytes.iter().enumerate() {
                let address = (at + offset as u32) as i32;
                let result = self
                    .vm
                    .call_export(self.stream, "poke", &[address, *byte as i32]);
                self.outcome(result);
            }
        }
        Ok(())
    }

    /// Streams and plugins come and go.
    fn lifecycle(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let context = self.context(u)?;
        match u.int_in_range(0..=4u8)? {
            0 => self.new_stream(context),
            1 => {
                let result = self.vm.finish_http_stream(context);
                self.outcome(result);
            }
            2 => {
                let result = self.vm.finish_tcp_stream(context);
                self.outcome(result);
            }
            3 => {
                let result = self.vm.stop_plugin(context);
                self.outcome(result);
            }
            _ => {
                let root_id = ["", "second", "third"][u.choose_index(3)?];
                let plugin = PluginConfig {
                    name: format!("fuzz-{root_id}"),
                    root_id: root_id.into(),
                    configuration: take(u, 16).to_vec(),
                };
                let result = self.vm.start_plugin(plugin);
                self.outcome(result);
            }
        }
        Ok(())
    }

    /// What a VM call may answer. A refusal (an unknown context or token, a plugin that said no)
    /// is the API working; a trap is allowed only when the input asked for one, and ends the run.
    fn outcome<T>(&mut self, result: std::result::Result<T, VmError>) -> Option<T> {
        if let Err(error) = &result {
            trace!("  -> {error}");
        }
        match result {
            Ok(value) => Some(value),
            Err(error @ VmError::Trap { .. }) => {
                assert!(
                    self.trap_asked,
                    "the VM trapped, though the guest neither exited nor made its allocator \
                     trap: {error}"
                );
                self.over = true;
                None
            }
            Err(
                VmError::UnknownContext(_)
                | VmError::UnknownToken(_)
                | VmError::Rejected { .. }
                | VmError::DuplicateRootId { .. },
            ) => None,
            Err(error) => panic!("unexpected VM error: {error}"),
        }
    }
}

/// Checks a host function's answer is one the ABI defines.
fn check_answer(function: usize, answer: i32) {
    let (module, name, _, kind) = FUNCTIONS[function];
    trace!("  {name} answered {answer}");
    match kind {
        // proxy_status_t: OK (0) to UNIMPLEMENTED (12).
        Status => assert!(
            (0..=12).contains(&answer),
            "{module}.{name} answered {answer}, not a proxy_status_t"
        ),
        // WASI preview1 errnos run from SUCCESS (0) to NOTCAPABLE (76).
        Errno => assert!(
            (0..=76).contains(&answer),
            "{module}.{name} answered {answer}, not a WASI errno"
        ),
        Nothing => {}
    }
}

/// Up to `max` bytes of input, fewer when it runs out.
fn take<'a>(u: &mut Unstructured<'a>, max: usize) -> &'a [u8] {
    let len = u.int_in_range(0..=max).unwrap_or(0).min(u.len());
    u.bytes(len).unwrap_or_default()
}

/// A small header map, mostly of names and values the properties and callouts look at.
fn header_map(u: &mut Unstructured<'_>) -> Result<HeaderMap> {
    const NAMES: &[&str] = &[
        ":method",
        ":path",
        ":authority",
        ":status",
        ":scheme",
        "content-length",
        "grpc-status",
        "x-request-id",
        "user-agent",
        "Host",
    ];
    const VALUES: &[&str] = &[
        "GET",
        "/",
        "/a?b=c",
        "200",
        "7",
        "-1",
        "18446744073709551616",
    ];
    let mut map = HeaderMap::new();
    for _ in 0..u.int_in_range(0..=5u8)? {
        let name = if u.ratio(3, 4)? {
            NAMES[u.choose_index(NAMES.len())?].as_bytes()
        } else {
            take(u, 8)
        };
        let value = if u.ratio(1, 2)? {
            VALUES[u.choose_index(VALUES.len())?].as_bytes()
        } else {
            take(u, 16)
        };
        map.add(name, value);
    }
    Ok(map)
}

/// Facts the proxy would know, so the properties that read them have something to answer.
fn stream_info() -> StreamInfo {
    let address = |text: &str| text.parse::<SocketAddr>().ok();
    StreamInfo {
        source: address("10.0.0.1:34567"),
        destination: address("[::1]:8080"),
        connection_id: Some(7),
        mtls: true,
        requested_server_name: Some("example.com".into()),
        protocol: Some("HTTP/1.1".into()),
        start_time: Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
        request_size: Some(4),
        upstream_address: address("127.0.0.1:80"),
        node_id: Some("node".into()),
        ..Default::default()
    }
}
