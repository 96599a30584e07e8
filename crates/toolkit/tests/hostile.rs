//! Hand-written modules doing what no SDK does: out-of-range pointers and lengths for every host
//! function, a lying allocator, malformed pair buffers. The host must answer each with a status
//! (or a trap where the guest itself trapped), never panic, and keep the VM serving.

mod common;

use common::*;
use wasmgate_abi::{HeaderMap, Status, errno, pairs};
use wasmgate_runtime::{Vm, VmError};
use wasmgate_toolkit::harness::RecordingHost;

#[derive(Clone, Copy)]
enum Arg {
    Int(i32),
    /// (pointer, length) of readable ASCII text.
    Data,
    /// (pointer, length) of a well-formed header-pair map.
    Map,
    /// An output pointer.
    Out,
}

use Arg::*;

/// Every host function with a pointer argument, with arguments that are valid unless made bad.
const PROBES: &[(&str, &[Arg])] = &[
    ("proxy_log", &[Int(2), Data]),
    ("proxy_get_log_level", &[Out]),
    ("proxy_get_current_time_nanoseconds", &[Out]),
    ("proxy_get_configuration", &[Out, Out]),
    (
        "proxy_get_buffer_bytes",
        &[Int(0), Int(0), Int(10), Out, Out],
    ),
    ("proxy_set_buffer_bytes", &[Int(0), Int(0), Int(0), Data]),
    ("proxy_get_buffer_status", &[Int(0), Out, Out]),
    ("proxy_get_header_map_size", &[Int(0), Out]),
    ("proxy_get_header_map_pairs", &[Int(0), Out, Out]),
    ("proxy_set_header_map_pairs", &[Int(0), Map]),
    ("proxy_get_header_map_value", &[Int(0), Data, Out, Out]),
    ("proxy_add_header_map_value", &[Int(0), Data, Data]),
    ("proxy_replace_header_map_value", &[Int(0), Data, Data]),
    ("proxy_remove_header_map_value", &[Int(0), Data]),
    ("proxy_get_status", &[Out, Out, Out]),
    (
        "proxy_send_local_response",
        &[Int(200), Data, Data, Map, Int(-1)],
    ),
    ("proxy_http_call", &[Data, Map, Data, Map, Int(1000), Out]),
    (
        "proxy_grpc_call",
        &[Data, Data, Data, Map, Data, Int(1000), Out],
    ),
    ("proxy_grpc_stream", &[Data, Data, Data, Map, Out]),
    ("proxy_grpc_send", &[Int(1), Data, Int(0)]),
    ("proxy_get_shared_data", &[Data, Out, Out, Out]),
    ("proxy_set_shared_data", &[Data, Data, Int(0)]),
    ("proxy_register_shared_queue", &[Data, Out]),
    ("proxy_resolve_shared_queue", &[Data, Data, Out]),
    ("proxy_enqueue_shared_queue", &[Int(1), Data]),
    ("proxy_dequeue_shared_queue", &[Int(1), Out, Out]),
    ("proxy_define_metric", &[Int(0), Data, Out]),
    ("proxy_get_metric", &[Int(1), Out]),
    ("proxy_get_property", &[Data, Out, Out]),
    ("proxy_set_property", &[Data, Data]),
    ("proxy_call_foreign_function", &[Data, Data, Out, Out]),
];

/// Host functions without pointer arguments, probed for their other statuses.
const PLAIN: &[(&str, usize)] = &[
    ("proxy_set_tick_period_milliseconds", 1),
    ("proxy_continue_stream", 1),
    ("proxy_close_stream", 1),
    ("proxy_grpc_cancel", 1),
    ("proxy_grpc_close", 1),
    ("proxy_set_effective_context", 1),
    ("proxy_done", 0),
];

const TEXT: &str = "upstream_cluster";
const DATA_AT: i32 = 1024;
const MAP_AT: i32 = 2048;
const BAD_MAP_AT: i32 = 3072;
const NO_AUTHORITY_MAP_AT: i32 = 3584;
const NON_UTF8_AT: i32 = 3900;
const OUT_AT: i32 = 8192;
const SCRATCH_AT: i32 = 12288;
const BAD_PTR: i32 = 0xFFFF_FF00u32 as i32;

fn good_map() -> Vec<u8> {
    pairs::encode(&[
        (":method", "GET"),
        (":path", "/"),
        (":authority", "a"),
        (TEXT, "v"),
    ])
}

fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

fn arity(args: &[Arg]) -> usize {
    args.iter()
        .map(|a| if matches!(a, Data | Map) { 2 } else { 1 })
        .sum()
}

/// A module that imports every probed function and exports a trampoline `t_<name>` for each, plus
/// an allocator whose honesty the test controls and a few WASI trampolines.
fn probe_module() -> Vec<u8> {
    let mut imports = String::new();
    let mut exports = String::new();
    let all: Vec<(&str, usize)> = PROBES
        .iter()
        .map(|(name, args)| (*name, arity(args)))
        .chain(PLAIN.iter().copied())
        .collect();
    for (name, n) in all {
        let params = "i32 ".repeat(n);
        imports.push_str(&format!(
            "(import \"env\" \"{name}\" (func ${name} (param {params}) (result i32)))\n"
        ));
        let gets: String = (0..n).map(|i| format!("local.get {i} ")).collect();
        exports.push_str(&format!(
            "(func (export \"t_{name}\") (param {params}) (result i32) {gets} call ${name})\n"
        ));
    }
    let bad_map = [5u8, 0, 0, 0, 1, 0, 0, 0];
    let no_authority = pairs::encode(&[(":method", "GET"), (":path", "/")]);
    wat::parse_str(format!(
        r#"(module
  {imports}
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "clock_time_get" (func $clock_time_get (param i32 i64 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const {DATA_AT}) "{TEXT}")
  (data (i32.const {MAP_AT}) "{good}")
  (data (i32.const {BAD_MAP_AT}) "{bad}")
  (data (i32.const {NO_AUTHORITY_MAP_AT}) "{no_authority}")
  (data (i32.const {NON_UTF8_AT}) "\ff\fe\fd")
  (global $next (mut i32) (i32.const 16384))
  (global $mode (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "set_alloc_mode") (param i32) local.get 0 global.set $mode)
  (func (export "load32") (param i32) (result i32) local.get 0 i32.load)
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32) (local $at i32)
    (if (i32.eq (global.get $mode) (i32.const 1)) (then (return (i32.const 0))))
    (if (i32.eq (global.get $mode) (i32.const 2)) (then (return (i32.const {BAD_PTR}))))
    (if (i32.eq (global.get $mode) (i32.const 3)) (then unreachable))
    (local.set $at (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get $size)))
    (local.get $at))
  (func (export "w_fd_write") (param i32 i32 i32 i32) (result i32)
    local.get 0 local.get 1 local.get 2 local.get 3 call $fd_write)
  (func (export "w_clock_time_get") (param i32 i32) (result i32)
    local.get 0 i64.const 0 local.get 1 call $clock_time_get)
  (func (export "w_random_get") (param i32 i32) (result i32) local.get 0 local.get 1 call $random_get)
  (func (export "w_environ_sizes_get") (param i32 i32) (result i32) local.get 0 local.get 1 call $environ_sizes_get)
  (func (export "w_environ_get") (param i32 i32) (result i32) local.get 0 local.get 1 call $environ_get)
  (func (export "w_args_sizes_get") (param i32 i32) (result i32) local.get 0 local.get 1 call $args_sizes_get)
  {exports}
)"#,
        good = wat_bytes(&good_map()),
        bad = wat_bytes(&bad_map),
        no_authority = wat_bytes(&no_authority),
    ))
    .expect("the probe module is valid WAT")
}

/// How one argument group is made bad for a probe.
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    Pointer,
    Length,
}

fn expand(args: &[Arg], bad_index: Option<usize>, fault: Fault) -> Vec<i32> {
    let mut out = Vec::new();
    for (index, arg) in args.iter().enumerate() {
        let bad = bad_index == Some(index);
        match (arg, bad, fault) {
            (Int(v), ..) => out.push(*v),
            (Data, true, Fault::Pointer) | (Map, true, Fault::Pointer) => out.extend([BAD_PTR, 16]),
            (Data, true, Fault::Length) | (Map, true, Fault::Length) => out.extend([DATA_AT, -1]),
            (Data, ..) => out.extend([DATA_AT, TEXT.len() as i32]),
            (Map, ..) => out.extend([MAP_AT, good_map().len() as i32]),
            (Out, true, _) => out.push(0xFFFE),
            (Out, ..) => out.push(OUT_AT + 16 * index as i32),
        }
    }
    out
}

struct Probe {
    vm: Vm,
    ctx: u32,
    host: RecordingHost,
}

fn probe() -> Probe {
    let runtime = runtime();
    let module = runtime.load(&probe_module()).unwrap();
    let host = RecordingHost::new(vec![TEXT.into()]);
    let mut vm = Vm::new(
        &runtime,
        &module,
        vm_config("probe"),
        Box::new(host.clone()),
    )
    .unwrap();
    let root = vm.start_plugin(plugin("probe", "")).unwrap();
    let ctx = vm.create_stream(root).unwrap();
    let stream = vm.stream_mut(ctx).unwrap();
    stream.request_headers =
        Some(HeaderMap::from_pairs([(":path", "/"), (TEXT, "present")]).into());
    stream.request_body = Some(b"body bytes".to_vec());
    Probe { vm, ctx, host }
}

impl Probe {
    fn call(&mut self, name: &str, args: &[i32]) -> i32 {
        let results = self
            .vm
            .call_export(self.ctx, name, args)
            .unwrap_or_else(|e| panic!("{name} trapped: {e}"));
        results.first().copied().unwrap_or_default()
    }

    fn status(&mut self, function: &str, args: &[i32]) -> i32 {
        self.call(&format!("t_{function}"), args)
    }
}

const IMA: i32 = Status::InvalidMemoryAccess as i32;

#[test]
fn every_host_function_answers_bad_pointers_and_lengths_with_invalid_memory_access() {
    let mut p = probe();
    // Things the good calls read must exist, so a status other than IMA means the check was skipped.
    assert_eq!(
        p.status(
            "proxy_set_shared_data",
            &expand(&[Data, Data, Int(0)], None, Fault::None)
        ),
        0
    );
    assert_eq!(
        p.status(
            "proxy_register_shared_queue",
            &expand(&[Data, Out], None, Fault::None)
        ),
        0
    );
    assert_eq!(
        p.status(
            "proxy_define_metric",
            &expand(&[Int(0), Data, Out], None, Fault::None)
        ),
        0
    );
    let mut checked = 0;
    for (function, args) in PROBES {
        let baseline = p.status(function, &expand(args, None, Fault::None));
        assert_ne!(baseline, IMA, "{function} with valid arguments");
        for (index, arg) in args.iter().enumerate() {
            let faults: &[Fault] = match arg {
                Int(_) => continue,
                Out => &[Fault::Pointer],
                Data | Map => &[Fault::Pointer, Fault::Length],
            };
            for &fault in faults {
                let status = p.status(function, &expand(args, Some(index), fault));
                assert_eq!(status, IMA, "{function}: argument {index} out of range");
                checked += 1;
            }
        }
    }
    assert!(checked > 80, "probed {checked} cases");
    assert!(p.vm.failure().is_none(), "no probe trapped the VM");
}

#[test]
fn a_lying_allocator_is_an_error_not_a_crash() {
    let mut p = probe();
    let args = expand(&[Int(0), Out, Out], None, Fault::None);
    for (mode, what) in [(1, "returns 0"), (2, "returns an address outside memory")] {
        p.call("set_alloc_mode", &[mode]);
        assert_eq!(
            p.status("proxy_get_header_map_pairs", &args),
            IMA,
            "an allocator that {what}"
        );
        assert_eq!(
            p.status(
                "proxy_get_buffer_bytes",
                &expand(&[Int(0), Int(0), Int(10), Out, Out], None, Fault::None)
            ),
            IMA
        );
    }
    p.call("set_alloc_mode", &[0]);
    assert_eq!(p.status("proxy_get_header_map_pairs", &args), 0);
    let (ptr, len) = (p.call("load32", &[args[1]]), p.call("load32", &[args[2]]));
    assert_eq!(
        len as usize,
        HeaderMap::from_pairs([(":path", "/"), (TEXT, "present")]).encoded_len(),
        "exactly as long as the data"
    );
    assert!(ptr >= 16384, "from the guest allocator");
    // An allocator that traps is the guest's own trap: reported as one, and the VM is failed.
    p.call("set_alloc_mode", &[3]);
    let error =
        p.vm.call_export(p.ctx, "t_proxy_get_header_map_pairs", &args)
            .unwrap_err();
    assert!(matches!(error, VmError::Trap { .. }), "{error}");
    assert!(p.vm.failure().is_some());
}

#[test]
fn malformed_pair_buffers_get_bad_argument() {
    let mut p = probe();
    let bad = [BAD_MAP_AT, 8];
    assert_eq!(
        p.status("proxy_set_header_map_pairs", &[0, bad[0], bad[1]]),
        Status::BadArgument as i32
    );
    let data = [DATA_AT, TEXT.len() as i32];
    let http = |headers: [i32; 2], trailers: [i32; 2]| {
        [
            data[0],
            data[1],
            headers[0],
            headers[1],
            data[0],
            data[1],
            trailers[0],
            trailers[1],
            1000,
            OUT_AT,
        ]
    };
    let good = [MAP_AT, good_map().len() as i32];
    assert_eq!(
        p.status("proxy_http_call", &http(bad, good)),
        Status::BadArgument as i32
    );
    assert_eq!(
        p.status("proxy_http_call", &http(good, bad)),
        Status::BadArgument as i32
    );
    let no_authority = [
        NO_AUTHORITY_MAP_AT,
        pairs::encode(&[(":method", "GET"), (":path", "/")]).len() as i32,
    ];
    assert_eq!(
        p.status("proxy_http_call", &http(no_authority, good)),
        Status::BadArgument as i32,
        ":authority is required"
    );
    assert_eq!(p.status("proxy_http_call", &http(good, good)), 0);
    assert_eq!(
        p.host.recorded.lock().http_calls.len(),
        1,
        "only the good call reached the host"
    );
    let local = [200, data[0], data[1], data[0], data[1], bad[0], bad[1], -1];
    assert_eq!(
        p.status("proxy_send_local_response", &local),
        Status::BadArgument as i32
    );
    let grpc = [
        data[0], data[1], data[0], data[1], data[0], data[1], bad[0], bad[1], data[0], data[1],
        1000, OUT_AT,
    ];
    assert_eq!(
        p.status("proxy_grpc_call", &grpc),
        Status::BadArgument as i32
    );
    assert!(p.host.recorded.lock().local_responses.is_empty());
    // The map the plugin tried to overwrite is untouched.
    assert_eq!(
        p.vm.stream(p.ctx)
            .unwrap()
            .request_headers
            .as_ref()
            .unwrap()
            .snapshot()
            .get_str(TEXT),
        Some("present")
    );
}

#[test]
fn statuses_for_bad_ids_and_unavailable_maps() {
    let mut p = probe();
    let out = [OUT_AT, OUT_AT + 4];
    let s = |status: Status| status as i32;
    assert_eq!(
        p.status("proxy_log", &[9, DATA_AT, 4]),
        s(Status::BadArgument),
        "unknown log level"
    );
    assert_eq!(
        p.status("proxy_get_header_map_pairs", &[99, out[0], out[1]]),
        s(Status::BadArgument)
    );
    assert_eq!(
        p.status("proxy_get_buffer_bytes", &[99, 0, 1, out[0], out[1]]),
        s(Status::BadArgument)
    );
    assert_eq!(
        p.status("proxy_get_buffer_bytes", &[6, 0, 1, out[0], out[1]]),
        s(Status::NotFound),
        "VM configuration outside on_vm_start"
    );
    // The response map does not exist yet: pairs are OK and empty (the Rust SDK traps otherwise).
    assert_eq!(
        p.status("proxy_get_header_map_pairs", &[2, out[0], out[1]]),
        0
    );
    assert_eq!(
        (p.call("load32", &[out[0]]), p.call("load32", &[out[1]])),
        (0, 0)
    );
    // A value from a map that is not there is BAD_ARGUMENT, as Envoy answers (not NOT_FOUND,
    // which says the map is there and the key is not).
    assert_eq!(
        p.status(
            "proxy_get_header_map_value",
            &[2, DATA_AT, 4, out[0], out[1]]
        ),
        s(Status::BadArgument)
    );
    assert_eq!(
        p.status("proxy_add_header_map_value", &[2, DATA_AT, 4, DATA_AT, 4]),
        s(Status::BadArgument)
    );
    assert_eq!(
        p.status("proxy_add_header_map_value", &[6, DATA_AT, 4, DATA_AT, 4]),
        s(Status::BadArgument),
        "call answers are read-only"
    );
    assert_eq!(
        p.status(
            "proxy_get_header_map_value",
            &[6, DATA_AT, 4, out[0], out[1]]
        ),
        s(Status::BadArgument),
        "no call answer outside its callback (nor after a failed call), as in Envoy"
    );
    assert_eq!(
        p.status("proxy_set_buffer_bytes", &[4, 0, 0, DATA_AT, 4]),
        s(Status::BadArgument)
    );
    assert_eq!(
        p.status("proxy_set_effective_context", &[9999]),
        s(Status::BadArgument)
    );
    assert_eq!(
        p.status("proxy_continue_stream", &[9]),
        s(Status::BadArgument)
    );
    assert_eq!(p.status("proxy_close_stream", &[7]), s(Status::BadArgument));
    assert_eq!(
        p.status("proxy_done", &[]),
        s(Status::NotFound),
        "nothing awaits proxy_done"
    );
    assert_eq!(p.status("proxy_grpc_cancel", &[77]), s(Status::NotFound));
    assert_eq!(p.status("proxy_grpc_close", &[77]), s(Status::NotFound));
    assert_eq!(
        p.status("proxy_grpc_send", &[77, DATA_AT, 4, 0]),
        s(Status::NotFound)
    );
    assert_eq!(
        p.status("proxy_dequeue_shared_queue", &[77, out[0], out[1]]),
        s(Status::NotFound)
    );
    assert_eq!(
        p.status("proxy_enqueue_shared_queue", &[77, DATA_AT, 4]),
        s(Status::NotFound)
    );
    assert_eq!(
        p.status("proxy_define_metric", &[7, DATA_AT, 4, out[0]]),
        s(Status::BadArgument),
        "unknown metric type"
    );
    assert_eq!(
        p.status("proxy_define_metric", &[0, DATA_AT, 0, out[0]]),
        s(Status::BadArgument),
        "empty metric name"
    );
    assert_eq!(
        p.status("proxy_get_metric", &[77, out[0]]),
        s(Status::NotFound)
    );
    assert_eq!(
        p.status(
            "proxy_get_shared_data",
            &[DATA_AT, 3, out[0], out[1], out[0] + 8]
        ),
        s(Status::NotFound)
    );
    assert_eq!(
        p.status("proxy_set_shared_data", &[DATA_AT, 4, DATA_AT, 4, 0]),
        0
    );
    // The key exists now: a CAS that is not its own is refused.
    assert_eq!(
        p.status("proxy_set_shared_data", &[DATA_AT, 4, DATA_AT, 4, 12345]),
        s(Status::CasMismatch)
    );
    assert_eq!(
        p.status(
            "proxy_resolve_shared_queue",
            &[DATA_AT, 3, DATA_AT, 3, out[0]]
        ),
        s(Status::NotFound)
    );
    assert_eq!(
        p.status("proxy_get_property", &[DATA_AT, 3, out[0], out[1]]),
        s(Status::NotFound)
    );
    assert_eq!(
        p.status(
            "proxy_call_foreign_function",
            &[DATA_AT, 3, DATA_AT, 3, out[0], out[1]]
        ),
        s(Status::NotFound)
    );
    // Non-UTF-8 where the ABI wants a name.
    assert_eq!(
        p.status("proxy_define_metric", &[0, NON_UTF8_AT, 3, out[0]]),
        s(Status::BadArgument)
    );
    assert_eq!(p.status("proxy_get_log_level", &[out[0]]), 0);
    assert_eq!(
        p.call("load32", &[out[0]]),
        wasmgate_abi::LogLevel::Trace as i32,
        "the runtime's level"
    );
    assert!(p.vm.failure().is_none());
}

#[test]
fn wasi_faults_and_errnos() {
    let runtime = runtime();
    let module = runtime.load(&probe_module()).unwrap();
    let config = wasmgate_runtime::VmConfig {
        vm_id: "wasi".into(),
        environment: vec![("A".into(), "1".into()), ("LONGER".into(), "value".into())],
        ..Default::default()
    };
    let mut vm = Vm::new(
        &runtime,
        &module,
        config,
        Box::new(RecordingHost::default()),
    )
    .unwrap();
    let root = vm.start_plugin(plugin("wasi", "")).unwrap();
    let mut call = |name: &str, args: &[i32]| vm.call_export(root, name, args).unwrap()[0];
    assert_eq!(
        call("w_fd_write", &[5, SCRATCH_AT, 1, OUT_AT]),
        errno::BADF,
        "only stdout and stderr"
    );
    assert_eq!(
        call("w_fd_write", &[1, BAD_PTR, 1, OUT_AT]),
        errno::FAULT,
        "iovec table out of range"
    );
    assert_eq!(
        call("w_fd_write", &[1, SCRATCH_AT, 0x2000_0000, OUT_AT]),
        errno::FAULT,
        "iovec count out of range"
    );
    assert_eq!(call("w_clock_time_get", &[0, BAD_PTR]), errno::FAULT);
    assert_eq!(call("w_clock_time_get", &[7, OUT_AT]), errno::NOTSUP);
    assert_eq!(call("w_clock_time_get", &[1, OUT_AT]), errno::SUCCESS);
    assert_eq!(call("w_random_get", &[BAD_PTR, 16]), errno::FAULT);
    assert_eq!(call("w_random_get", &[OUT_AT, 1 << 20]), errno::INVAL);
    assert_eq!(
        call("w_environ_sizes_get", &[OUT_AT, OUT_AT + 4]),
        errno::SUCCESS
    );
    assert_eq!(call("load32", &[OUT_AT]), 2);
    assert_eq!(
        call("load32", &[OUT_AT + 4]),
        ("A=1\0".len() + "LONGER=value\0".len()) as i32
    );
    assert_eq!(
        call("w_environ_sizes_get", &[BAD_PTR, OUT_AT]),
        errno::FAULT
    );
    assert_eq!(call("w_environ_get", &[BAD_PTR, SCRATCH_AT]), errno::FAULT);
    assert_eq!(call("w_environ_get", &[OUT_AT, BAD_PTR]), errno::FAULT);
    assert_eq!(call("w_environ_get", &[OUT_AT, SCRATCH_AT]), errno::SUCCESS);
    assert_eq!(call("load32", &[OUT_AT]), SCRATCH_AT, "first entry pointer");
    assert_eq!(call("load32", &[SCRATCH_AT]), i32::from_le_bytes(*b"A=1\0"));
    assert_eq!(
        call("w_args_sizes_get", &[OUT_AT, OUT_AT + 4]),
        errno::SUCCESS
    );
    assert_eq!(
        (call("load32", &[OUT_AT]), call("load32", &[OUT_AT + 4])),
        (0, 0)
    );
    assert_eq!(call("w_args_sizes_get", &[BAD_PTR, OUT_AT]), errno::FAULT);
}
