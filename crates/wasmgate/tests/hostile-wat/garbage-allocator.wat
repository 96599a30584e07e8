;; A plugin whose allocator answers garbage while the host hands it a header map.
;;
;; The host copies a header map into guest memory through the guest's allocator
;; (proxy_on_memory_allocate). On each request, on_request_headers asks for the request
;; headers five times; the allocator's answers to those five calls are, in order:
;;   1. 0                      the null pointer (address 0 exists in wasm, but no allocator returns it)
;;   2. 0xffffffff             u32::MAX
;;   3. 0x10000000             far past the end of the one-page memory
;;   4. memory size - 1        in bounds, but the map does not fit
;;   5. 8                      in bounds, the very out-parameters the host is about to write
;; Later calls get a sane buffer at 4096. (The fifth answer lets the host write the map over
;; the module's own low memory, which is the module's business; its data lives at 512 and up,
;; out of the way.) The five statuses the host answered go back to the
;; client as `x-alloc-statuses: S1,S2,S3,S4,S5,` on the response.
(module
  (import "env" "proxy_get_header_map_pairs"
    (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value"
    (func $add_value (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; Out-parameters of proxy_get_header_map_pairs: the pointer at 8, the size at 12.
  ;; The header name at 512; the statuses text is built at 640.
  (data (i32.const 512) "x-alloc-statuses")
  (global $allocations (mut i32) (i32.const 0))
  (global $text_len (mut i32) (i32.const 0))

  (func (export "proxy_abi_version_0_2_1"))

  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $n i32)
    (local.set $n (global.get $allocations))
    (global.set $allocations (i32.add (local.get $n) (i32.const 1)))
    (block $sane
      (block $aliased
        (block $straddling
          (block $far
            (block $max
              (block $null
                (br_table $null $max $far $straddling $aliased $sane (local.get $n)))
              (return (i32.const 0)))
            (return (i32.const -1)))
          (return (i32.const 0x10000000)))
        (return (i32.sub (i32.mul (memory.size) (i32.const 65536)) (i32.const 1))))
      (return (i32.const 8)))
    (i32.const 4096))

  ;; Appends `status,` in decimal (statuses are below 100) to the text at 640.
  (func $append (param $status i32)
    (local $at i32)
    (local.set $at (i32.add (i32.const 640) (global.get $text_len)))
    (if (i32.ge_u (local.get $status) (i32.const 10))
      (then
        (i32.store8 (local.get $at)
          (i32.add (i32.const 48) (i32.div_u (local.get $status) (i32.const 10))))
        (local.set $at (i32.add (local.get $at) (i32.const 1)))))
    (i32.store8 (local.get $at)
      (i32.add (i32.const 48) (i32.rem_u (local.get $status) (i32.const 10))))
    (i32.store8 (i32.add (local.get $at) (i32.const 1)) (i32.const 44))
    (global.set $text_len
      (i32.sub (i32.add (local.get $at) (i32.const 2)) (i32.const 640))))

  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))

  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (global.set $allocations (i32.const 0))
    (global.set $text_len (i32.const 0))
    ;; Map type 0: the request headers.
    (call $append (call $get_pairs (i32.const 0) (i32.const 8) (i32.const 12)))
    (call $append (call $get_pairs (i32.const 0) (i32.const 8) (i32.const 12)))
    (call $append (call $get_pairs (i32.const 0) (i32.const 8) (i32.const 12)))
    (call $append (call $get_pairs (i32.const 0) (i32.const 8) (i32.const 12)))
    (call $append (call $get_pairs (i32.const 0) (i32.const 8) (i32.const 12)))
    (i32.const 0))

  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    ;; Map type 2: the response headers. Its status is not checked: the header is the report.
    (drop (call $add_value (i32.const 2) (i32.const 512) (i32.const 16)
      (i32.const 640) (global.get $text_len)))
    (i32.const 0)))
