// {{name}}: a Proxy-Wasm HTTP filter that adds one header to every response, written with the
// Go SDK (github.com/proxy-wasm/proxy-wasm-go-sdk) and built with Go 1.24 or later:
//
//	GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o {{module}} .
//
// Plugin configuration (JSON, both fields optional):
// {"header": "x-{{name}}", "value": "hello"}
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/proxy-wasm/proxy-wasm-go-sdk/proxywasm"
	"github.com/proxy-wasm/proxy-wasm-go-sdk/proxywasm/types"
)

// main is never called: the module is a WASI reactor (-buildmode=c-shared). init registers the
// plugin when the host initializes the module.
func main() {}

func init() {
	proxywasm.SetVMContext(&vmContext{})
}

type vmContext struct {
	types.DefaultVMContext
}

func (*vmContext) NewPluginContext(contextID uint32) types.PluginContext {
	return &pluginContext{config: defaultConfig()}
}

type config struct {
	header string
	value  string
}

func defaultConfig() config {
	return config{header: "x-{{name}}", value: "hello"}
}

// parseConfig reads the JSON object the gateway passes as the plugin configuration.
func parseConfig(raw []byte) (config, error) {
	cfg := defaultConfig()
	if len(bytes.TrimSpace(raw)) == 0 {
		return cfg, nil
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			return cfg, errors.New("the configuration is not a JSON object")
		}
		return cfg, err
	}
	if fields == nil {
		// JSON null decodes to a nil map without an error.
		return cfg, errors.New("the configuration is not a JSON object")
	}
	for key, rawValue := range fields {
		var text string
		if len(rawValue) == 0 || rawValue[0] != '"' || json.Unmarshal(rawValue, &text) != nil {
			return cfg, fmt.Errorf("%q is not a string", key)
		}
		switch key {
		case "header":
			cfg.header = text
		case "value":
			cfg.value = text
		default:
			return cfg, fmt.Errorf("unknown field %q", key)
		}
	}
	return cfg, nil
}

type pluginContext struct {
	types.DefaultPluginContext
	config config
}

func (p *pluginContext) OnPluginStart(pluginConfigurationSize int) types.OnPluginStartStatus {
	var raw []byte
	if pluginConfigurationSize > 0 {
		data, err := proxywasm.GetPluginConfiguration()
		if err != nil && !errors.Is(err, types.ErrorStatusNotFound) {
			proxywasm.LogErrorf("{{name}}: invalid configuration: cannot read it: %v", err)
			return types.OnPluginStartStatusFailed
		}
		raw = data
	}
	cfg, err := parseConfig(raw)
	if err != nil {
		// Returning failed rejects the configuration: the gateway reports it.
		proxywasm.LogErrorf("{{name}}: invalid configuration: %v", err)
		return types.OnPluginStartStatusFailed
	}
	p.config = cfg
	proxywasm.LogInfof("{{name}}: adding %s: %s", cfg.header, cfg.value)
	return types.OnPluginStartStatusOK
}

func (p *pluginContext) NewHttpContext(contextID uint32) types.HttpContext {
	return &httpContext{config: p.config}
}

type httpContext struct {
	types.DefaultHttpContext
	config config
}

func (h *httpContext) OnHttpResponseHeaders(numHeaders int, endOfStream bool) types.Action {
	if err := proxywasm.AddHttpResponseHeader(h.config.header, h.config.value); err != nil {
		proxywasm.LogErrorf("{{name}}: adding %s: %v", h.config.header, err)
	}
	return types.ActionContinue
}
