;; A plugin whose allocator traps when the host calls it to hand over the request headers:
;; the trap happens inside a host call, nested in on_request_headers, and must fail the VM
;; as any other trap does (then the failure policy applies).
(module
  (import "env" "proxy_get_header_map_pairs"
    (func $get_pairs (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32)
    unreachable)
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $get_pairs (i32.const 0) (i32.const 8) (i32.const 12)))
    (i32.const 0)))
