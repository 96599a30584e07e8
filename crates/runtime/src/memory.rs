//! Guest memory access for host functions. Every pointer and length a guest passes is untrusted:
//! each access is bounds-checked and answers INVALID_MEMORY_ACCESS, never a host panic.

use wasmgate_abi::Status;
use wasmtime::Caller;

use crate::state::VmState;

/// A host function's failure: a status for the guest, or a trap that ends the call.
pub(crate) enum HostError {
    Status(Status),
    Trap(wasmtime::Error),
}

impl From<Status> for HostError {
    fn from(status: Status) -> Self {
        HostError::Status(status)
    }
}

pub(crate) type HostResult<T = ()> = Result<T, HostError>;

/// Turns a host function's result into what the guest receives.
pub(crate) fn status(result: HostResult) -> wasmtime::Result<u32> {
    match result {
        Ok(()) => Ok(Status::Ok as u32),
        Err(HostError::Status(status)) => Ok(status as u32),
        Err(HostError::Trap(error)) => Err(error),
    }
}

fn range(ptr: u32, len: u32, memory_len: usize) -> Result<std::ops::Range<usize>, Status> {
    let start = ptr as usize;
    let end = start
        .checked_add(len as usize)
        .ok_or(Status::InvalidMemoryAccess)?;
    if end > memory_len {
        return Err(Status::InvalidMemoryAccess);
    }
    Ok(start..end)
}

fn memory(caller: &Caller<'_, VmState>) -> Result<wasmtime::Memory, Status> {
    caller.data().memory.ok_or(Status::InvalidMemoryAccess)
}

/// Runs `f` on the guest bytes `[ptr, ptr+len)` and the VM state, without copying.
pub(crate) fn with_bytes<R>(
    caller: &mut Caller<'_, VmState>,
    ptr: u32,
    len: u32,
    f: impl FnOnce(&[u8], &mut VmState) -> R,
) -> Result<R, Status> {
    let memory = memory(caller)?;
    let (data, state) = memory.data_and_store_mut(caller);
    let range = range(ptr, len, data.len())?;
    Ok(f(&data[range], state))
}

/// Runs `f` on two guest byte ranges (a key and a value, say) and the VM state, without copying.
pub(crate) fn with_two<R>(
    caller: &mut Caller<'_, VmState>,
    (p1, n1): (u32, u32),
    (p2, n2): (u32, u32),
    f: impl FnOnce(&[u8], &[u8], &mut VmState) -> R,
) -> Result<R, Status> {
    let memory = memory(caller)?;
    let (data, state) = memory.data_and_store_mut(caller);
    let first = range(p1, n1, data.len())?;
    let second = range(p2, n2, data.len())?;
    Ok(f(&data[first], &data[second], state))
}

pub(crate) fn read(
    caller: &mut Caller<'_, VmState>,
    ptr: u32,
    len: u32,
) -> Result<Vec<u8>, Status> {
    with_bytes(caller, ptr, len, |bytes, _| bytes.to_vec())
}

/// Reads a name the ABI defines as text; bytes that are not UTF-8 are a BAD_ARGUMENT.
pub(crate) fn read_string(
    caller: &mut Caller<'_, VmState>,
    ptr: u32,
    len: u32,
) -> Result<String, Status> {
    String::from_utf8(read(caller, ptr, len)?).map_err(|_| Status::BadArgument)
}

pub(crate) fn check(caller: &Caller<'_, VmState>, ptr: u32, len: u32) -> Result<(), Status> {
    let memory = memory(caller)?;
    range(ptr, len, memory.data_size(caller)).map(|_| ())
}

pub(crate) fn write(
    caller: &mut Caller<'_, VmState>,
    ptr: u32,
    bytes: &[u8],
) -> Result<(), Status> {
    let memory = memory(caller)?;
    let data = memory.data_mut(caller);
    let len = u32::try_from(bytes.len()).map_err(|_| Status::InvalidMemoryAccess)?;
    let range = range(ptr, len, data.len())?;
    data[range].copy_from_slice(bytes);
    Ok(())
}

pub(crate) fn write_u32(
    caller: &mut Caller<'_, VmState>,
    ptr: u32,
    value: u32,
) -> Result<(), Status> {
    write(caller, ptr, &value.to_le_bytes())
}

pub(crate) fn write_u64(
    caller: &mut Caller<'_, VmState>,
    ptr: u32,
    value: u64,
) -> Result<(), Status> {
    write(caller, ptr, &value.to_le_bytes())
}

/// Hands `data` to the guest: memory from the guest's allocator, exactly `data.len()` bytes, whose
/// address and length go to `ptr_out` and `len_out`. An empty result writes (0, 0) without
/// allocating, as proxy-wasm-cpp-host does.
///
/// The output pointers are checked before allocating so a bad pointer does not leak guest memory.
/// An allocator that returns 0 or an address outside memory is answered INVALID_MEMORY_ACCESS.
pub(crate) fn return_bytes(
    caller: &mut Caller<'_, VmState>,
    data: &[u8],
    ptr_out: u32,
    len_out: u32,
) -> HostResult {
    check(caller, ptr_out, 4)?;
    check(caller, len_out, 4)?;
    if data.is_empty() {
        write_u32(caller, ptr_out, 0)?;
        write_u32(caller, len_out, 0)?;
        return Ok(());
    }
    let len = u32::try_from(data.len()).map_err(|_| Status::BadArgument)?;
    let allocator = caller
        .data()
        .allocator
        .clone()
        .ok_or(Status::InternalFailure)?;
    let address = allocator.call(&mut *caller, len).map_err(HostError::Trap)?;
    if address == 0 {
        tracing::warn!(
            target: crate::LOG_TARGET,
            plugin = caller.data().plugin_name(),
            size = len,
            "the guest allocator returned 0"
        );
        return Err(Status::InvalidMemoryAccess.into());
    }
    if write(caller, address, data).is_err() {
        tracing::warn!(
            target: crate::LOG_TARGET,
            plugin = caller.data().plugin_name(),
            address,
            size = len,
            "the guest allocator returned memory outside the guest's memory"
        );
        return Err(Status::InvalidMemoryAccess.into());
    }
    write_u32(caller, ptr_out, address)?;
    write_u32(caller, len_out, len)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::range;
    use wasmgate_abi::Status;

    #[test]
    fn ranges_are_checked_without_overflow() {
        assert_eq!(range(0, 10, 10), Ok(0..10));
        assert_eq!(range(10, 0, 10), Ok(10..10));
        assert_eq!(range(10, 1, 10), Err(Status::InvalidMemoryAccess));
        assert_eq!(
            range(u32::MAX, u32::MAX, 1 << 16),
            Err(Status::InvalidMemoryAccess)
        );
        assert_eq!(
            range(1, u32::MAX, usize::MAX),
            Ok(1..(1 + u32::MAX as usize))
        );
    }
}
