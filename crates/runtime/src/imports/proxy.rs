//! The `env.proxy_*` host functions. Each one decodes its arguments from guest memory (checked),
//! acts on the VM state or routes to the embedder's [`Host`](wasmgate_abi::Host), and answers a
//! status the SDKs accept (reference §2.3).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::MutexGuard;
use wasmgate_abi::{
    BufferType, GrpcCallRequest, GrpcStreamRequest, HeaderMap, HttpCallRequest, LocalResponse,
    LogLevel, LogRecord, MapType, MetricType, Status, StreamType,
};
use wasmtime::{Caller, Linker};

use crate::memory::{
    HostError, HostResult, check, read, read_string, return_bytes, status, with_bytes, with_two,
    write_u32, write_u64,
};
use crate::properties;
use crate::state::{CalloutKind, Phase, VmState};

type C<'a> = Caller<'a, VmState>;

/// Names of every `env` function defined here, for the import check that runs before linking.
pub(crate) const NAMES: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_configuration",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_get_header_map_size",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_clear_route_cache",
    "proxy_get_status",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_call_foreign_function",
    // Emscripten's runtime imports these into C++ SDK modules; Envoy defines both (see
    // `add_to_linker`).
    "emscripten_notify_memory_growth",
    "pthread_equal",
];

/// The parameter and result letters (`i` i32, `I` i64) of each function in [`NAMES`].
pub(crate) fn signature(name: &str) -> Option<(&'static str, &'static str)> {
    let params = match name {
        "emscripten_notify_memory_growth" => return Some(("i", "")),
        "pthread_equal" => return Some(("ii", "i")),
        "proxy_done" => "",
        "proxy_get_log_level"
        | "proxy_get_current_time_nanoseconds"
        | "proxy_set_tick_period_milliseconds"
        | "proxy_continue_stream"
        | "proxy_close_stream"
        | "proxy_grpc_cancel"
        | "proxy_grpc_close"
        | "proxy_set_effective_context" => "i",
        "proxy_get_configuration" | "proxy_get_header_map_size" | "proxy_get_metric" => "ii",
        "proxy_increment_metric" | "proxy_record_metric" => "iI",
        "proxy_get_buffer_status"
        | "proxy_get_header_map_pairs"
        | "proxy_set_header_map_pairs"
        | "proxy_remove_header_map_value"
        | "proxy_register_shared_queue"
        | "proxy_enqueue_shared_queue"
        | "proxy_dequeue_shared_queue"
        | "proxy_get_status" => "iii",
        "proxy_log" => "iii",
        "proxy_grpc_send" | "proxy_define_metric" | "proxy_get_property" | "proxy_set_property" => {
            "iiii"
        }
        "proxy_get_buffer_bytes"
        | "proxy_set_buffer_bytes"
        | "proxy_get_header_map_value"
        | "proxy_add_header_map_value"
        | "proxy_replace_header_map_value"
        | "proxy_get_shared_data"
        | "proxy_set_shared_data"
        | "proxy_resolve_shared_queue" => "iiiii",
        "proxy_call_foreign_function" => "iiiiii",
        "proxy_send_local_response" => "iiiiiiii",
        "proxy_grpc_stream" => "iiiiiiiii",
        "proxy_http_call" => "iiiiiiiiii",
        "proxy_grpc_call" => "iiiiiiiiiiii",
        _ => return None,
    };
    Some((params, "i"))
}

/// ABI 0.1.0 declares these as returning nothing; later SDKs as returning a status. Both link.
pub(crate) const VOID_OR_STATUS: &[&str] = &[
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_clear_route_cache",
];

pub(crate) fn add_to_linker(
    linker: &mut Linker<VmState>,
    void_legacy: &[&str],
) -> wasmtime::Result<()> {
    macro_rules! def {
        ($name:literal, |$c:ident $(, $arg:ident : $ty:ty)*| $body:expr) => {
            linker.func_wrap("env", $name, |mut caller: C<'_> $(, $arg: $ty)*| -> wasmtime::Result<u32> {
                let watched = caller.data().watched();
                if watched && !caller.data_mut().admit("env", $name, &Status::InternalFailure) {
                    caller.data().trace_host_call("env", $name, &[$($arg as u64),*], &Status::InternalFailure);
                    return Ok(Status::InternalFailure as u32);
                }
                let $c: &mut C<'_> = &mut caller;
                #[allow(clippy::redundant_closure_call, unused_braces)]
                let result: HostResult = (|| -> HostResult { $body })();
                let answer = status(result);
                if watched {
                    caller.data().trace_host_call("env", $name, &[$($arg as u64),*], &Answer(&answer));
                }
                answer
            })?;
        };
    }

    // As proxy-wasm-cpp-host defines them for Emscripten-built modules: a growth notice needs no
    // answer (the host reads memory through its current size on every call), and a module with
    // one thread compares thread ids for equality.
    linker.func_wrap(
        "env",
        "emscripten_notify_memory_growth",
        |_caller: C<'_>, _memory_index: u32| {},
    )?;
    linker.func_wrap(
        "env",
        "pthread_equal",
        |_caller: C<'_>, left: u32, right: u32| -> u32 { u32::from(left == right) },
    )?;

    def!("proxy_log", |c, level: u32, p: u32, n: u32| log(
        c, level, p, n
    ));
    def!("proxy_get_log_level", |c, out: u32| {
        let level = c.data().log_level.get() as u32;
        Ok(write_u32(c, out, level)?)
    });
    def!("proxy_get_current_time_nanoseconds", |c, out: u32| {
        Ok(write_u64(c, out, now_nanos())?)
    });
    def!("proxy_set_tick_period_milliseconds", |c, ms: u32| {
        set_tick_period(c, ms)
    });
    def!("proxy_get_configuration", |c, p: u32, n: u32| {
        get_configuration(c, p, n)
    });
    def!(
        "proxy_get_buffer_bytes",
        |c, t: u32, start: u32, max: u32, p: u32, n: u32| {
            get_buffer_bytes(c, t, start, max, p, n)
        }
    );
    def!(
        "proxy_set_buffer_bytes",
        |c, t: u32, start: u32, size: u32, p: u32, n: u32| {
            set_buffer_bytes(c, t, start, size, p, n)
        }
    );
    def!(
        "proxy_get_buffer_status",
        |c, t: u32, len_out: u32, flags_out: u32| { get_buffer_status(c, t, len_out, flags_out) }
    );
    def!("proxy_get_header_map_size", |c, t: u32, out: u32| {
        let map = map_type(t)?;
        // As Envoy: the size of a map the plugin may write (BAD_ARGUMENT in `on_log`).
        let size = map_mut(c.data_mut(), map)?.encoded_len();
        Ok(write_u32(c, out, size as u32)?)
    });
    def!("proxy_get_header_map_pairs", |c, t: u32, p: u32, n: u32| {
        let map = map_type(t)?;
        // Always OK, empty when the map is not available: the Rust SDK traps on anything else.
        let bytes = map_ref(c.data(), map)
            .map(|m| m.encode())
            .unwrap_or_default();
        return_bytes(c, &bytes, p, n)
    });
    def!("proxy_set_header_map_pairs", |c, t: u32, p: u32, n: u32| {
        let map = map_type(t)?;
        let decoded = with_bytes(c, p, n, |bytes, _| HeaderMap::decode(bytes))?;
        let decoded = decoded.map_err(|error| bad_pairs(c, "proxy_set_header_map_pairs", error))?;
        *map_mut(c.data_mut(), map)? = decoded;
        Ok(())
    });
    def!(
        "proxy_get_header_map_value",
        |c, t: u32, kp: u32, kn: u32, p: u32, n: u32| {
            let map = map_type(t)?;
            let value = with_bytes(c, kp, kn, |key, state| {
                map_ref(state, map).map(|m| m.get(key).map(<[u8]>::to_vec))
            })?;
            match value {
                Some(Some(value)) => return_bytes(c, &value, p, n),
                Some(None) => Err(Status::NotFound.into()),
                // No such map now: a stream map outside its window, or a callout answer outside
                // its callback or from a call that failed. Envoy answers BAD_ARGUMENT.
                None => Err(Status::BadArgument.into()),
            }
        }
    );
    def!(
        "proxy_add_header_map_value",
        |c, t: u32, kp: u32, kn: u32, vp: u32, vn: u32| {
            let map = map_type(t)?;
            with_two(c, (kp, kn), (vp, vn), |key, value, state| {
                map_mut(state, map).map(|mut m| m.add(key, value))
            })??;
            Ok(())
        }
    );
    def!(
        "proxy_replace_header_map_value",
        |c, t: u32, kp: u32, kn: u32, vp: u32, vn: u32| {
            let map = map_type(t)?;
            with_two(c, (kp, kn), (vp, vn), |key, value, state| {
                map_mut(state, map).map(|mut m| m.replace(key, value))
            })??;
            Ok(())
        }
    );
    def!(
        "proxy_remove_header_map_value",
        |c, t: u32, kp: u32, kn: u32| {
            let map = map_type(t)?;
            with_bytes(c, kp, kn, |key, state| {
                map_mut(state, map).map(|mut m| m.remove(key))
            })??;
            Ok(())
        }
    );
    def!("proxy_continue_stream", |c, t: u32| {
        let stream = StreamType::from_raw(t).ok_or(Status::BadArgument)?;
        let status = host_for_effective(c, |host, ctx| host.continue_stream(ctx, stream));
        if status == Status::Ok
            && matches!(stream, StreamType::HttpRequest | StreamType::HttpResponse)
        {
            close_request_windows(c);
        }
        to_result(status)
    });
    def!("proxy_close_stream", |c, t: u32| {
        let stream = StreamType::from_raw(t).ok_or(Status::BadArgument)?;
        to_result(host_for_effective(c, |host, ctx| {
            host.close_stream(ctx, stream)
        }))
    });
    legacy(linker, void_legacy, "proxy_continue_request", |c| {
        let status = host_for_effective(c, |host, ctx| {
            host.continue_stream(ctx, StreamType::HttpRequest)
        });
        if status == Status::Ok {
            close_request_windows(c);
        }
        status
    })?;
    legacy(linker, void_legacy, "proxy_continue_response", |c| {
        let status = host_for_effective(c, |host, ctx| {
            host.continue_stream(ctx, StreamType::HttpResponse)
        });
        if status == Status::Ok {
            close_request_windows(c);
        }
        status
    })?;
    legacy(linker, void_legacy, "proxy_clear_route_cache", |c| {
        host_for_effective(c, |host, ctx| host.clear_route_cache(ctx))
    })?;
    def!("proxy_get_status", |c, code_out: u32, p: u32, n: u32| {
        check(c, code_out, 4)?;
        let (code, message) = c.data().call_status.clone();
        return_bytes(c, &message, p, n)?;
        Ok(write_u32(c, code_out, code)?)
    });
    def!(
        "proxy_send_local_response",
        |c, code: u32, dp: u32, dn: u32, bp: u32, bn: u32, hp: u32, hn: u32, grpc: i32| {
            send_local_response(c, code, (dp, dn), (bp, bn), (hp, hn), grpc)
        }
    );
    def!(
        "proxy_http_call",
        |c,
         up: u32,
         un: u32,
         hp: u32,
         hn: u32,
         bp: u32,
         bn: u32,
         tp: u32,
         tn: u32,
         timeout: u32,
         token_out: u32| {
            http_call(
                c,
                (up, un),
                (hp, hn),
                (bp, bn),
                (tp, tn),
                timeout,
                token_out,
            )
        }
    );
    def!(
        "proxy_grpc_call",
        |c,
         up: u32,
         un: u32,
         sp: u32,
         sn: u32,
         mp: u32,
         mn: u32,
         hp: u32,
         hn: u32,
         gp: u32,
         gn: u32,
         timeout: u32,
         token_out: u32| {
            grpc_call(
                c,
                [(up, un), (sp, sn), (mp, mn), (hp, hn)],
                Some((gp, gn)),
                timeout,
                token_out,
            )
        }
    );
    def!(
        "proxy_grpc_stream",
        |c,
         up: u32,
         un: u32,
         sp: u32,
         sn: u32,
         mp: u32,
         mn: u32,
         hp: u32,
         hn: u32,
         token_out: u32| {
            grpc_call(
                c,
                [(up, un), (sp, sn), (mp, mn), (hp, hn)],
                None,
                0,
                token_out,
            )
        }
    );
    def!("proxy_grpc_send", |c,
                             token: u32,
                             p: u32,
                             n: u32,
                             end: u32| {
        let message = read(c, p, n)?;
        grpc_token(c, token)?;
        to_result(c.data_mut().host.grpc_send(token, message, end != 0))
    });
    def!("proxy_grpc_cancel", |c, token: u32| {
        grpc_token(c, token)?;
        let result = c.data_mut().host.grpc_cancel(token);
        c.data_mut().callouts.remove(&token);
        to_result(result)
    });
    def!("proxy_grpc_close", |c, token: u32| {
        grpc_token(c, token)?;
        to_result(c.data_mut().host.grpc_close(token))
    });
    def!(
        "proxy_get_shared_data",
        |c, kp: u32, kn: u32, p: u32, n: u32, cas_out: u32| {
            check(c, cas_out, 4)?;
            let key = read(c, kp, kn)?;
            let state = c.data();
            let (value, cas) = state
                .shared
                .data
                .get(&state.vm_id, &key)
                .ok_or(Status::NotFound)?;
            return_bytes(c, &value, p, n)?;
            Ok(write_u32(c, cas_out, cas)?)
        }
    );
    def!(
        "proxy_set_shared_data",
        |c, kp: u32, kn: u32, vp: u32, vn: u32, cas: u32| {
            let (key, value) = (read(c, kp, kn)?, read(c, vp, vn)?);
            let state = c.data();
            to_result(state.shared.data.set(&state.vm_id, &key, &value, cas))
        }
    );
    def!(
        "proxy_register_shared_queue",
        |c, np: u32, nn: u32, out: u32| {
            check(c, out, 4)?;
            let name = read_string(c, np, nn)?;
            let state = c.data();
            let owner = state
                .effective_context()
                .map(|ctx| ctx.root)
                .ok_or(Status::BadArgument)?;
            let id = state
                .shared
                .queues
                .register(&state.vm_id, &name, &state.inbox, owner);
            Ok(write_u32(c, out, id)?)
        }
    );
    def!(
        "proxy_resolve_shared_queue",
        |c, vp: u32, vn: u32, np: u32, nn: u32, out: u32| {
            check(c, out, 4)?;
            let vm_id = read_string(c, vp, vn)?;
            let name = read_string(c, np, nn)?;
            let state = c.data();
            // An empty VM id means the caller's own, as a convenience for SDKs that pass "".
            let vm_id = if vm_id.is_empty() {
                state.vm_id.clone()
            } else {
                vm_id
            };
            let id = state
                .shared
                .queues
                .resolve(&vm_id, &name)
                .ok_or(Status::NotFound)?;
            Ok(write_u32(c, out, id)?)
        }
    );
    def!(
        "proxy_enqueue_shared_queue",
        |c, id: u32, p: u32, n: u32| {
            let message = read(c, p, n)?;
            to_result(c.data().shared.queues.enqueue(id, message))
        }
    );
    def!(
        "proxy_dequeue_shared_queue",
        |c, id: u32, p: u32, n: u32| {
            check(c, p, 4)?;
            check(c, n, 4)?;
            let message = c.data().shared.queues.dequeue(id)?;
            return_bytes(c, &message, p, n)
        }
    );
    def!(
        "proxy_define_metric",
        |c, t: u32, np: u32, nn: u32, out: u32| {
            check(c, out, 4)?;
            let kind = MetricType::from_raw(t).ok_or(Status::BadArgument)?;
            let name = read_string(c, np, nn)?;
            if name.is_empty() {
                return Err(Status::BadArgument.into());
            }
            let id = c.data().shared.metrics.define(kind, &name)?;
            Ok(write_u32(c, out, id)?)
        }
    );
    def!("proxy_increment_metric", |c, id: u32, delta: i64| {
        to_result(c.data().shared.metrics.increment(id, delta))
    });
    def!("proxy_record_metric", |c, id: u32, value: u64| {
        to_result(c.data().shared.metrics.record(id, value))
    });
    def!("proxy_get_metric", |c, id: u32, out: u32| {
        check(c, out, 8)?;
        let value = c.data().shared.metrics.value(id)?;
        Ok(write_u64(c, out, value)?)
    });
    def!(
        "proxy_get_property",
        |c, pp: u32, pn: u32, p: u32, n: u32| {
            check(c, p, 4)?;
            check(c, n, 4)?;
            let path = read(c, pp, pn)?;
            let value = get_property(c.data_mut(), &path).ok_or(Status::NotFound)?;
            return_bytes(c, &value, p, n)
        }
    );
    def!(
        "proxy_set_property",
        |c, pp: u32, pn: u32, vp: u32, vn: u32| {
            let (path, value) = (read(c, pp, pn)?, read(c, vp, vn)?);
            let context = c
                .data_mut()
                .effective_context_mut()
                .ok_or(Status::BadArgument)?;
            context.filter_state.insert(path, value);
            Ok(())
        }
    );
    def!("proxy_set_effective_context", |c, id: u32| {
        let state = c.data_mut();
        if !state.contexts.contains_key(&id) {
            return Err(Status::BadArgument.into());
        }
        state.effective = id;
        Ok(())
    });
    def!("proxy_done", |c| {
        let state = c.data_mut();
        let id = state.effective;
        match state.contexts.get_mut(&id) {
            Some(context) if context.awaiting_done => {
                context.awaiting_done = false;
                state.done.push(id);
                Ok(())
            }
            _ => Err(Status::NotFound.into()),
        }
    });
    def!(
        "proxy_call_foreign_function",
        |c, np: u32, nn: u32, ap: u32, an: u32, p: u32, n: u32| {
            check(c, p, 4)?;
            check(c, n, 4)?;
            let name = read_string(c, np, nn)?;
            let arguments = read(c, ap, an)?;
            let result = c.data_mut().host.call_foreign_function(&name, &arguments)?;
            return_bytes(c, &result, p, n)
        }
    );
    Ok(())
}

/// Registers one of the [`VOID_OR_STATUS`] functions with the signature the module imports.
fn legacy(
    linker: &mut Linker<VmState>,
    void_legacy: &[&str],
    name: &'static str,
    f: fn(&mut C<'_>) -> Status,
) -> wasmtime::Result<()> {
    let gated = move |c: &mut C<'_>| -> Status {
        let watched = c.data().watched();
        if watched && !c.data_mut().admit("env", name, &Status::InternalFailure) {
            c.data()
                .trace_host_call("env", name, &[], &Status::InternalFailure);
            return Status::InternalFailure;
        }
        let result = f(c);
        if watched {
            c.data().trace_host_call("env", name, &[], &result);
        }
        result
    };
    if void_legacy.contains(&name) {
        linker.func_wrap("env", name, move |mut c: C<'_>| {
            let result = gated(&mut c);
            if result != Status::Ok {
                tracing::debug!(target: crate::LOG_TARGET, plugin = c.data().plugin_name(), "{name} answered {result}");
            }
        })?;
    } else {
        linker.func_wrap("env", name, move |mut c: C<'_>| -> u32 {
            gated(&mut c) as u32
        })?;
    }
    Ok(())
}

/// A host function's answer as the trace prints it: the status name, or the trap.
struct Answer<'a>(&'a wasmtime::Result<u32>);

impl std::fmt::Display for Answer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Ok(raw) => match Status::from_raw(*raw) {
                Some(status) => status.fmt(f),
                None => raw.fmt(f),
            },
            Err(error) => write!(f, "trap: {error}"),
        }
    }
}

fn to_result(status: Status) -> HostResult {
    match status {
        Status::Ok => Ok(()),
        other => Err(other.into()),
    }
}

/// A continued HTTP stream has passed its request: Envoy closes the request's maps on a continue
/// of either direction (its response maps stay as they were).
fn close_request_windows(c: &mut C<'_>) {
    if let Some(context) = c.data_mut().effective_context_mut() {
        context.windows.close_request();
    }
}

fn host_for_effective(
    c: &mut C<'_>,
    f: impl FnOnce(&mut dyn wasmgate_abi::Host, u32) -> Status,
) -> Status {
    let state = c.data_mut();
    if !state.contexts.contains_key(&state.effective) {
        return Status::BadArgument;
    }
    let context = state.effective;
    f(state.host.as_mut(), context)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn bad_pairs(c: &C<'_>, function: &str, error: wasmgate_abi::pairs::PairsError) -> HostError {
    tracing::debug!(target: crate::LOG_TARGET, plugin = c.data().plugin_name(), "{function}: {error}");
    Status::BadArgument.into()
}

// === logging ===

pub(crate) fn emit(level: LogLevel, plugin: &str, context_id: u32, message: &str) {
    match level {
        LogLevel::Trace => {
            tracing::trace!(target: crate::LOG_TARGET, plugin, context_id, "{message}")
        }
        LogLevel::Debug => {
            tracing::debug!(target: crate::LOG_TARGET, plugin, context_id, "{message}")
        }
        LogLevel::Info => {
            tracing::info!(target: crate::LOG_TARGET, plugin, context_id, "{message}")
        }
        LogLevel::Warn => {
            tracing::warn!(target: crate::LOG_TARGET, plugin, context_id, "{message}")
        }
        LogLevel::Error | LogLevel::Critical => {
            tracing::error!(target: crate::LOG_TARGET, plugin, context_id, critical = level == LogLevel::Critical, "{message}")
        }
    }
}

/// Writes a guest's log line to `tracing` and hands it to the embedder.
pub(crate) fn log_line(state: &mut VmState, level: LogLevel, message: String) {
    if level < state.log_level.get() {
        return;
    }
    let plugin = state.plugin_name().to_owned();
    emit(level, &plugin, state.effective, &message);
    let record = LogRecord {
        level,
        plugin,
        context_id: state.effective,
        message,
    };
    state.host.log(&record);
}

fn log(c: &mut C<'_>, level: u32, p: u32, n: u32) -> HostResult {
    let level = LogLevel::from_raw(level).ok_or(Status::BadArgument)?;
    let message = with_bytes(c, p, n, |bytes, _| {
        String::from_utf8_lossy(bytes).into_owned()
    })?;
    log_line(c.data_mut(), level, message);
    Ok(())
}

// === timers ===

fn set_tick_period(c: &mut C<'_>, ms: u32) -> HostResult {
    let state = c.data_mut();
    let root = state
        .effective_context()
        .map(|ctx| ctx.root)
        .ok_or(Status::BadArgument)?;
    if ms == 0 {
        state.tick_periods.remove(&root);
    } else {
        state
            .tick_periods
            .insert(root, Duration::from_millis(ms.into()));
    }
    Ok(())
}

// === buffers ===

fn buffer_type(raw: u32) -> Result<BufferType, Status> {
    BufferType::from_raw(raw).ok_or(Status::BadArgument)
}

/// Runs `f` on a readable buffer; NOT_FOUND when it does not exist in this callback.
fn with_buffer<R>(
    state: &VmState,
    buffer: BufferType,
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, Status> {
    let stream = state.effective_context().map(|ctx| &ctx.stream);
    let bytes: Option<&[u8]> = match buffer {
        BufferType::HttpRequestBody => stream.and_then(|s| s.request_body.as_deref()),
        BufferType::HttpResponseBody => stream.and_then(|s| s.response_body.as_deref()),
        BufferType::DownstreamData => stream.and_then(|s| s.downstream_data.as_deref()),
        BufferType::UpstreamData => stream.and_then(|s| s.upstream_data.as_deref()),
        BufferType::HttpCallResponseBody => (state.phase == Phase::HttpCallResponse)
            .then_some(())
            .and(state.callout.body.as_deref()),
        BufferType::GrpcReceiveBuffer => (state.phase == Phase::GrpcMessage)
            .then_some(())
            .and(state.grpc_message.as_deref()),
        BufferType::VmConfiguration => {
            (state.phase == Phase::VmStart).then_some(state.vm_configuration.as_slice())
        }
        BufferType::PluginConfiguration => (state.phase == Phase::Configure)
            .then(|| {
                state
                    .effective_context()
                    .map(|ctx| ctx.plugin.configuration.as_slice())
            })
            .flatten(),
        BufferType::CallData => (state.phase == Phase::ForeignFunction)
            .then_some(())
            .and(state.foreign_arguments.as_deref()),
    };
    bytes.map(f).ok_or(Status::NotFound)
}

fn buffer_mut(state: &mut VmState, buffer: BufferType) -> Result<&mut Vec<u8>, Status> {
    let stream = &mut state
        .effective_context_mut()
        .ok_or(Status::NotFound)?
        .stream;
    let slot = match buffer {
        BufferType::HttpRequestBody => &mut stream.request_body,
        BufferType::HttpResponseBody => &mut stream.response_body,
        BufferType::DownstreamData => &mut stream.downstream_data,
        BufferType::UpstreamData => &mut stream.upstream_data,
        _ => return Err(Status::BadArgument),
    };
    slot.as_mut().ok_or(Status::NotFound)
}

fn get_buffer_bytes(c: &mut C<'_>, t: u32, start: u32, max: u32, p: u32, n: u32) -> HostResult {
    let buffer = buffer_type(t)?;
    check(c, p, 4)?;
    check(c, n, 4)?;
    // Clamped like Envoy: a range past the end is empty, not an error.
    let bytes = with_buffer(c.data(), buffer, |bytes| {
        let start = (start as usize).min(bytes.len());
        let end = start.saturating_add(max as usize).min(bytes.len());
        bytes[start..end].to_vec()
    })?;
    return_bytes(c, &bytes, p, n)
}

/// Replaces `[start, start+size)` with the guest's bytes: (0, 0) prepends, a start at or past the
/// end appends, (0, len) replaces everything. Envoy allows only those three; a splice inside the
/// buffer is allowed here too, as the spec describes it.
fn set_buffer_bytes(c: &mut C<'_>, t: u32, start: u32, size: u32, p: u32, n: u32) -> HostResult {
    let buffer = buffer_type(t)?;
    let value = read(c, p, n)?;
    let bytes = buffer_mut(c.data_mut(), buffer)?;
    let start = (start as usize).min(bytes.len());
    let end = start.saturating_add(size as usize).min(bytes.len());
    bytes.splice(start..end, value);
    Ok(())
}

fn get_buffer_status(c: &mut C<'_>, t: u32, len_out: u32, flags_out: u32) -> HostResult {
    let buffer = buffer_type(t)?;
    check(c, len_out, 4)?;
    check(c, flags_out, 4)?;
    let len = with_buffer(c.data(), buffer, <[u8]>::len)?;
    write_u32(c, len_out, len as u32)?;
    Ok(write_u32(c, flags_out, 0)?)
}

/// ABI 0.1.0: the VM configuration in `on_vm_start`, the plugin's in `on_configure`.
fn get_configuration(c: &mut C<'_>, p: u32, n: u32) -> HostResult {
    let state = c.data();
    let buffer = match state.phase {
        Phase::VmStart => BufferType::VmConfiguration,
        _ => BufferType::PluginConfiguration,
    };
    let bytes = with_buffer(state, buffer, <[u8]>::to_vec).unwrap_or_default();
    return_bytes(c, &bytes, p, n)
}

// === maps ===

fn map_type(raw: u32) -> Result<MapType, Status> {
    MapType::from_raw(raw).ok_or(Status::BadArgument)
}

/// A readable map: a stream's (locked for the duration of the host call) or a callout answer's.
enum MapView<'a> {
    Stream(MutexGuard<'a, HeaderMap>),
    Callout(&'a HeaderMap),
}

impl std::ops::Deref for MapView<'_> {
    type Target = HeaderMap;
    fn deref(&self) -> &HeaderMap {
        match self {
            Self::Stream(guard) => guard,
            Self::Callout(map) => map,
        }
    }
}

/// A map the plugin may read now, or `None` (absent, or outside its window: see `MapWindows`).
fn map_ref(state: &VmState, map: MapType) -> Option<MapView<'_>> {
    let stream = state
        .effective_context()
        .filter(|ctx| ctx.windows.readable(map, state.phase == Phase::Log))
        .map(|ctx| &ctx.stream);
    let shared = match map {
        MapType::HttpRequestHeaders => stream?.request_headers.as_ref(),
        MapType::HttpRequestTrailers => stream?.request_trailers.as_ref(),
        MapType::HttpResponseHeaders => stream?.response_headers.as_ref(),
        MapType::HttpResponseTrailers => stream?.response_trailers.as_ref(),
        MapType::HttpCallResponseHeaders | MapType::GrpcReceiveInitialMetadata => {
            return state.callout.headers.as_ref().map(MapView::Callout);
        }
        MapType::HttpCallResponseTrailers | MapType::GrpcReceiveTrailingMetadata => {
            return state.callout.trailers.as_ref().map(MapView::Callout);
        }
    };
    shared?.try_lock().map(MapView::Stream)
}

/// Only the stream's own maps are writable; callout answers are read-only (BAD_ARGUMENT, as Envoy).
fn map_mut(state: &mut VmState, map: MapType) -> Result<MutexGuard<'_, HeaderMap>, Status> {
    let context = state.effective_context().ok_or(Status::BadArgument)?;
    if !context.windows.writable(map) {
        return Err(Status::BadArgument);
    }
    let stream = &context.stream;
    let slot = match map {
        MapType::HttpRequestHeaders => &stream.request_headers,
        MapType::HttpRequestTrailers => &stream.request_trailers,
        MapType::HttpResponseHeaders => &stream.response_headers,
        MapType::HttpResponseTrailers => &stream.response_trailers,
        _ => return Err(Status::BadArgument),
    };
    slot.as_ref()
        .ok_or(Status::BadArgument)?
        .try_lock()
        .ok_or(Status::InternalFailure)
}

// === stream control and callouts ===

fn send_local_response(
    c: &mut C<'_>,
    code: u32,
    details: (u32, u32),
    body: (u32, u32),
    headers: (u32, u32),
    grpc_status: i32,
) -> HostResult {
    let details = read(c, details.0, details.1)?;
    let body = read(c, body.0, body.1)?;
    let headers = with_bytes(c, headers.0, headers.1, |bytes, _| HeaderMap::decode(bytes))?
        .map_err(|error| bad_pairs(c, "proxy_send_local_response", error))?;
    let response = LocalResponse {
        status_code: code,
        // Envoy's response code details cannot hold spaces.
        details: String::from_utf8_lossy(&details).replace(' ', "_"),
        body,
        headers,
        grpc_status: u32::try_from(grpc_status).ok().filter(|s| *s <= 16),
    };
    to_result(host_for_effective(c, |host, ctx| {
        host.send_local_response(ctx, response)
    }))
}

fn http_call(
    c: &mut C<'_>,
    upstream: (u32, u32),
    headers: (u32, u32),
    body: (u32, u32),
    trailers: (u32, u32),
    timeout_ms: u32,
    token_out: u32,
) -> HostResult {
    check(c, token_out, 4)?;
    let upstream = read_string(c, upstream.0, upstream.1)?;
    let headers = with_bytes(c, headers.0, headers.1, |bytes, _| HeaderMap::decode(bytes))?
        .map_err(|error| bad_pairs(c, "proxy_http_call headers", error))?;
    let body = read(c, body.0, body.1)?;
    let trailers = with_bytes(c, trailers.0, trailers.1, |bytes, _| {
        HeaderMap::decode(bytes)
    })?
    .map_err(|error| bad_pairs(c, "proxy_http_call trailers", error))?;
    for required in [":method", ":path", ":authority"] {
        if headers.get(required).is_none_or(<[u8]>::is_empty) {
            let plugin = c.data().plugin_name().to_owned();
            tracing::debug!(target: crate::LOG_TARGET, plugin, "proxy_http_call to {upstream}: missing {required}");
            return Err(Status::BadArgument.into());
        }
    }
    let state = c.data_mut();
    let context = state.effective;
    let root = state
        .context(context)
        .map(|ctx| ctx.root)
        .ok_or(Status::BadArgument)?;
    admit_callout(state, "proxy_http_call")?;
    let token = state.allocate_token(CalloutKind::Http, root);
    let call = HttpCallRequest {
        upstream,
        headers,
        body,
        trailers,
        timeout_ms,
    };
    if let Err(status) = state.host.http_call(context, token, call) {
        state.callouts.remove(&token);
        return Err(status.into());
    }
    Ok(write_u32(c, token_out, token)?)
}

/// `plugin_limits.max_http_calls`: a plugin that dispatches calls faster than they answer is
/// refused more, with one log line per VM until its calls drain.
fn admit_callout(state: &mut VmState, function: &str) -> HostResult {
    if state.callouts.len() < state.max_http_calls {
        state.callouts_full = false;
        return Ok(());
    }
    if !state.callouts_full {
        state.callouts_full = true;
        tracing::warn!(
            target: crate::LOG_TARGET,
            plugin = state.plugin_name(),
            "{function} refused: the plugin already has {} calls in flight \
             (plugin_limits.max_http_calls); it answers INTERNAL_FAILURE",
            state.callouts.len()
        );
    }
    Err(Status::InternalFailure.into())
}

fn grpc_call(
    c: &mut C<'_>,
    [upstream, service, method, metadata]: [(u32, u32); 4],
    message: Option<(u32, u32)>,
    timeout_ms: u32,
    token_out: u32,
) -> HostResult {
    check(c, token_out, 4)?;
    let upstream = read(c, upstream.0, upstream.1)?;
    let service = read_string(c, service.0, service.1)?;
    let method = read_string(c, method.0, method.1)?;
    let initial_metadata = with_bytes(c, metadata.0, metadata.1, |bytes, _| {
        HeaderMap::decode(bytes)
    })?
    .map_err(|error| bad_pairs(c, "proxy_grpc_call metadata", error))?;
    let message = match message {
        Some((p, n)) => Some(read(c, p, n)?),
        None => None,
    };
    let state = c.data_mut();
    let context = state.effective;
    let root = state
        .context(context)
        .map(|ctx| ctx.root)
        .ok_or(Status::BadArgument)?;
    admit_callout(state, "proxy_grpc_call")?;
    let token = state.allocate_token(CalloutKind::Grpc, root);
    let result = match message {
        Some(message) => state.host.grpc_call(
            context,
            token,
            GrpcCallRequest {
                upstream,
                service,
                method,
                initial_metadata,
                message,
                timeout_ms,
            },
        ),
        None => state.host.grpc_stream(
            context,
            token,
            GrpcStreamRequest {
                upstream,
                service,
                method,
                initial_metadata,
            },
        ),
    };
    if let Err(status) = result {
        state.callouts.remove(&token);
        return Err(status.into());
    }
    Ok(write_u32(c, token_out, token)?)
}

fn grpc_token(c: &C<'_>, token: u32) -> Result<(), Status> {
    match c.data().callouts.get(&token) {
        Some((CalloutKind::Grpc, _)) => Ok(()),
        _ => Err(Status::NotFound),
    }
}

// === properties ===

fn get_property(state: &mut VmState, path: &[u8]) -> Option<Vec<u8>> {
    let segments = properties::split_path(path);
    let context_id = state.effective;
    if let Some(value) = state.host.get_property(context_id, &segments) {
        return Some(value.encode());
    }
    let context = state.context(context_id)?;
    if let Some(value) = properties::resolve(state, context, &segments) {
        return Some(value.encode());
    }
    // Properties the plugin set itself: on this context first, then on its root.
    let root = state.context(context.root);
    context
        .filter_state
        .get(path)
        .or_else(|| root?.filter_state.get(path))
        .cloned()
}
