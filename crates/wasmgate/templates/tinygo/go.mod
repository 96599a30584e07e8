module {{name}}

// The SDK builds with the upstream Go toolchain, 1.24 or later (WASI reactors, go:wasmexport).
go 1.24

// The SDK publishes no tagged releases: this pins a commit (update with
// `go get github.com/proxy-wasm/proxy-wasm-go-sdk@latest`).
require github.com/proxy-wasm/proxy-wasm-go-sdk v0.0.0-20260105142703-44c7d5847745
