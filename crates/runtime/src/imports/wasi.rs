//! The WASI preview1 subset the Proxy-Wasm spec expects (also under `wasi_unstable`, as
//! proxy-wasm-cpp-host registers it): stdout/stderr to the plugin log, clocks, randomness, the
//! plugin's own environment, empty arguments, `proc_exit` ending the VM, and what Go's wasip1
//! runtime needs besides (`poll_oneoff` for its sleeps, `fd_fdstat_set_flags` on the standard
//! streams, `sched_yield`). Every other preview1 name links and answers BADF (descriptors: there
//! are none) or NOSYS, so SDK start-up code links.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmgate_abi::{LogLevel, errno};
use wasmtime::{Caller, FuncType, Linker, Val, ValType};

use super::proxy::log_line;
use crate::memory::{check, with_bytes, write, write_u32, write_u64};
use crate::state::VmState;

pub(crate) const MODULES: [&str; 2] = ["wasi_snapshot_preview1", "wasi_unstable"];

/// Functions with a real implementation.
pub(crate) const IMPLEMENTED: &[&str] = &[
    "fd_write",
    "fd_fdstat_get",
    "clock_time_get",
    "clock_res_get",
    "random_get",
    "environ_get",
    "environ_sizes_get",
    "args_get",
    "args_sizes_get",
    "proc_exit",
    "sched_yield",
    "poll_oneoff",
    "fd_fdstat_set_flags",
];

/// The rest of preview1, each answering a fixed errno.
pub(crate) const STUBS: &[(&str, i32)] = &[
    ("fd_advise", errno::BADF),
    ("fd_allocate", errno::BADF),
    ("fd_close", errno::BADF),
    ("fd_datasync", errno::BADF),
    ("fd_fdstat_set_rights", errno::BADF),
    ("fd_filestat_get", errno::BADF),
    ("fd_filestat_set_size", errno::BADF),
    ("fd_filestat_set_times", errno::BADF),
    ("fd_pread", errno::BADF),
    ("fd_prestat_get", errno::BADF),
    ("fd_prestat_dir_name", errno::BADF),
    ("fd_pwrite", errno::BADF),
    ("fd_read", errno::BADF),
    ("fd_readdir", errno::BADF),
    ("fd_renumber", errno::BADF),
    ("fd_seek", errno::BADF),
    ("fd_sync", errno::BADF),
    ("fd_tell", errno::BADF),
    ("path_create_directory", errno::BADF),
    ("path_filestat_get", errno::BADF),
    ("path_filestat_set_times", errno::BADF),
    ("path_link", errno::BADF),
    ("path_open", errno::BADF),
    ("path_readlink", errno::BADF),
    ("path_remove_directory", errno::BADF),
    ("path_rename", errno::BADF),
    ("path_symlink", errno::BADF),
    ("path_unlink_file", errno::BADF),
    ("proc_raise", errno::NOSYS),
    ("sock_accept", errno::BADF),
    ("sock_recv", errno::BADF),
    ("sock_send", errno::BADF),
    ("sock_shutdown", errno::BADF),
];

/// Parameter and result letters of the implemented functions (`i` i32, `I` i64).
pub(crate) fn signature(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "fd_write" => ("iiii", "i"),
        "fd_fdstat_get" | "clock_res_get" | "random_get" | "environ_get" | "environ_sizes_get"
        | "args_get" | "args_sizes_get" => ("ii", "i"),
        "clock_time_get" => ("iIi", "i"),
        "proc_exit" => ("i", ""),
        "sched_yield" => ("", "i"),
        "poll_oneoff" => ("iiii", "i"),
        "fd_fdstat_set_flags" => ("ii", "i"),
        _ => return None,
    })
}

pub(crate) fn defines(name: &str) -> bool {
    IMPLEMENTED.contains(&name) || STUBS.iter().any(|(stub, _)| *stub == name)
}

/// Largest `random_get` request answered; more is INVAL (as in proxy-wasm-cpp-host).
const MAX_RANDOM_BYTES: u32 = 64 * 1024;

/// `proc_exit` as a trap: the guest asked to end, and the VM cannot serve after that.
#[derive(Debug)]
pub struct ProcExit(pub i32);

impl std::fmt::Display for ProcExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the plugin called proc_exit({})", self.0)
    }
}

impl std::error::Error for ProcExit {}

type C<'a> = Caller<'a, VmState>;

fn errno_of(result: Result<(), wasmgate_abi::Status>) -> i32 {
    match result {
        Ok(()) => errno::SUCCESS,
        Err(_) => errno::FAULT,
    }
}

/// Adds the implemented functions, and a stub for every stub name `imports` asks for, typed as the
/// module imports it (preview1 and `wasi_unstable` differ in a few signatures).
pub(crate) fn add_to_linker(
    linker: &mut Linker<VmState>,
    imports: &[(String, String, FuncType)],
) -> wasmtime::Result<()> {
    for module in MODULES {
        // Each function passes the capability allow-list and the host/VM trace first.
        macro_rules! wasi {
            ($name:literal, |$c:ident $(, $arg:ident : $ty:ty)*| $body:expr) => {
                linker.func_wrap(module, $name, move |mut caller: C<'_> $(, $arg: $ty)*| -> i32 {
                    let watched = caller.data().watched();
                    if watched && !caller.data_mut().admit(module, $name, &"NOTCAPABLE") {
                        caller.data().trace_host_call(module, $name, &[$($arg as u64),*], &errno::NOTCAPABLE);
                        return errno::NOTCAPABLE;
                    }
                    let $c: &mut C<'_> = &mut caller;
                    #[allow(clippy::redundant_closure_call, unused_braces)]
                    let answer: i32 = (|| -> i32 { $body })();
                    if watched {
                        caller.data().trace_host_call(module, $name, &[$($arg as u64),*], &answer);
                    }
                    answer
                })?;
            };
        }

        wasi!("fd_write", |c, fd: u32, iovs: u32, count: u32, out: u32| {
            fd_write(c, fd, iovs, count, out)
        });
        wasi!("fd_fdstat_get", |c, fd: u32, out: u32| {
            if !(1..=2).contains(&fd) {
                return errno::BADF;
            }
            // filetype CHARACTER_DEVICE, no flags, no rights: enough for "is this a terminal" checks.
            let mut fdstat = [0u8; 24];
            fdstat[0] = 2;
            errno_of(write(c, out, &fdstat))
        });
        wasi!("clock_time_get", |c, id: u32, _precision: u64, out: u32| {
            match clock_now(id) {
                Some(nanos) => errno_of(write_u64(c, out, nanos)),
                None => errno::NOTSUP,
            }
        });
        wasi!("clock_res_get", |c, id: u32, out: u32| {
            match clock_now(id) {
                Some(_) => errno_of(write_u64(c, out, 1)),
                None => errno::NOTSUP,
            }
        });
        wasi!("random_get", |c, buf: u32, len: u32| {
            if len > MAX_RANDOM_BYTES {
                return errno::INVAL;
            }
            let mut bytes = vec![0u8; len as usize];
            if getrandom::fill(&mut bytes).is_err() {
                return errno::INVAL;
            }
            errno_of(write(c, buf, &bytes))
        });
        wasi!("environ_sizes_get", |c, count_out: u32, size_out: u32| {
            let env = &c.data().environment;
            let count = env.len() as u32;
            let size = env.iter().map(|e| e.len() + 1).sum::<usize>() as u32;
            errno_of(write_u32(c, count_out, count).and_then(|()| write_u32(c, size_out, size)))
        });
        wasi!("environ_get", |c, pointers: u32, buffer: u32| {
            environ_get(c, pointers, buffer)
        });
        wasi!("args_sizes_get", |c, count_out: u32, size_out: u32| {
            errno_of(write_u32(c, count_out, 0).and_then(|()| write_u32(c, size_out, 0)))
        });
        wasi!("args_get", |c, pointers: u32, buffer: u32| {
            errno_of(check(c, pointers, 0).and_then(|()| check(c, buffer, 0)))
        });
        wasi!("sched_yield", |_c| errno::SUCCESS);
        wasi!(
            "poll_oneoff",
            |c, subscriptions: u32, events: u32, count: u32, count_out: u32| {
                // wasi_unstable's clock subscription has one more field.
                let size = if module == "wasi_unstable" { 56 } else { 48 };
                poll_oneoff(c, size, subscriptions, events, count, count_out)
            }
        );
        // Go's runtime sets its standard streams' flags at start-up (as proxy-wasm-cpp-host
        // answers for the Go SDK): accepted, and changing nothing, on stdin, stdout and stderr.
        wasi!("fd_fdstat_set_flags", |_c, fd: u32, _flags: u32| {
            if fd <= 2 { errno::SUCCESS } else { errno::BADF }
        });
        // Not gated: a plugin that wants to end itself may.
        linker.func_wrap(
            module,
            "proc_exit",
            |mut c: C<'_>, code: i32| -> wasmtime::Result<()> {
                c.data_mut().exit_code = Some(code);
                Err(wasmtime::Error::new(ProcExit(code)))
            },
        )?;
    }
    for (module, name, ty) in imports {
        let Some(&(_, answer)) = STUBS.iter().find(|(stub, _)| stub == name) else {
            continue;
        };
        if !MODULES.contains(&module.as_str()) {
            continue;
        }
        let returns_errno = matches!(ty.results().collect::<Vec<_>>().as_slice(), [ValType::I32]);
        linker.func_new(
            module,
            name,
            ty.clone(),
            move |_, _, results: &mut [Val]| {
                if returns_errno {
                    results[0] = Val::I32(answer);
                }
                Ok(())
            },
        )?;
    }
    Ok(())
}

/// Bytes of an `event` (a `subscription` is 48 in preview1, 56 in `wasi_unstable`).
const EVENT_SIZE: u32 = 32;

/// `poll_oneoff`, for what a plugin can wait on here: clock subscriptions fire at once (a plugin
/// never puts a worker thread to sleep; Go's runtime, which sleeps through this call between its
/// own looks at the clock, then waits by looking again), stdout and stderr are always writable,
/// and any other descriptor is BADF in its event.
fn poll_oneoff(
    c: &mut C<'_>,
    subscription_size: u32,
    subscriptions: u32,
    events: u32,
    count: u32,
    count_out: u32,
) -> i32 {
    if count == 0 {
        return errno::INVAL;
    }
    let (Some(table_len), Some(events_len)) = (
        count.checked_mul(subscription_size),
        count.checked_mul(EVENT_SIZE),
    ) else {
        return errno::FAULT;
    };
    let Ok(table) = with_bytes(c, subscriptions, table_len, |bytes, _| bytes.to_vec()) else {
        return errno::FAULT;
    };
    let mut answer = Vec::with_capacity(events_len as usize);
    for subscription in table.chunks_exact(subscription_size as usize) {
        const CLOCK: u8 = 0;
        const FD_WRITE: u8 = 2;
        let kind = subscription[8];
        let fd = u32::from_le_bytes(subscription[16..20].try_into().expect("4 bytes"));
        let error = match kind {
            CLOCK => errno::SUCCESS,
            FD_WRITE if (1..=2).contains(&fd) => errno::SUCCESS,
            1 | FD_WRITE => errno::BADF,
            _ => errno::INVAL,
        };
        let mut event = [0u8; EVENT_SIZE as usize];
        event[..8].copy_from_slice(&subscription[..8]); // userdata
        event[8..10].copy_from_slice(&(error as u16).to_le_bytes());
        event[10] = kind;
        answer.extend_from_slice(&event);
    }
    errno_of(write(c, events, &answer).and_then(|()| write_u32(c, count_out, count)))
}

fn clock_now(id: u32) -> Option<u64> {
    static BASE: OnceLock<Instant> = OnceLock::new();
    match id {
        0 => Some(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .ok()?
                .as_nanos() as u64,
        ),
        // Monotonic time counts from a process-wide base; only differences mean anything.
        1 => Some(BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1),
        _ => None,
    }
}

fn fd_write(c: &mut C<'_>, fd: u32, iovs: u32, count: u32, written_out: u32) -> i32 {
    let level = match fd {
        1 => LogLevel::Info,
        2 => LogLevel::Error,
        _ => return errno::BADF,
    };
    let Some(table_len) = count.checked_mul(8) else {
        return errno::FAULT;
    };
    let Ok(table) = with_bytes(c, iovs, table_len, |bytes, _| bytes.to_vec()) else {
        return errno::FAULT;
    };
    let mut message = Vec::new();
    for entry in table.chunks_exact(8) {
        let ptr = u32::from_le_bytes(entry[..4].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(entry[4..].try_into().expect("4 bytes"));
        if with_bytes(c, ptr, len, |bytes, _| message.extend_from_slice(bytes)).is_err() {
            return errno::FAULT;
        }
    }
    if write_u32(c, written_out, message.len() as u32).is_err() {
        return errno::FAULT;
    }
    let text = String::from_utf8_lossy(&message);
    for line in text.trim_end_matches('\n').split('\n') {
        log_line(c.data_mut(), level, line.to_owned());
    }
    errno::SUCCESS
}

fn environ_get(c: &mut C<'_>, pointers: u32, buffer: u32) -> i32 {
    let env = c.data().environment.clone();
    let mut offset = buffer;
    for (index, entry) in env.iter().enumerate() {
        let Some(slot) = (index as u32)
            .checked_mul(4)
            .and_then(|o| pointers.checked_add(o))
        else {
            return errno::FAULT;
        };
        let mut bytes = entry.clone();
        bytes.push(0);
        if write_u32(c, slot, offset).is_err() || write(c, offset, &bytes).is_err() {
            return errno::FAULT;
        }
        let Some(next) = offset.checked_add(bytes.len() as u32) else {
            return errno::FAULT;
        };
        offset = next;
    }
    errno::SUCCESS
}
