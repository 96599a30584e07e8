// {{name}}: a Proxy-Wasm HTTP filter that adds one header to every response,
// written with the AssemblyScript SDK (@solo-io/proxy-runtime).
//
// Plugin configuration (JSON, both fields optional):
// {"header": "x-{{name}}", "value": "hello"}  (string values without escapes)

// Exports the proxy_* entry points, malloc/free and the ABI version marker.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, log, LogLevelValues,
  FilterHeadersStatusValues, stream_context,
} from "@solo-io/proxy-runtime";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

// The string value of "key" in a flat JSON object, or `fallback` if it is absent.
function jsonString(json: string, key: string, fallback: string): string {
  let at = json.indexOf("\"" + key + "\"");
  if (at < 0) return fallback;
  at = json.indexOf(":", at + key.length + 2);
  if (at < 0) return fallback;
  let start = json.indexOf("\"", at + 1);
  if (start < 0) return fallback;
  let end = json.indexOf("\"", start + 1);
  if (end < 0) return fallback;
  return json.substring(start + 1, end);
}

class PluginRoot extends RootContext {
  header: string = "x-{{name}}";
  value: string = "hello";

  constructor(context_id: u32) {
    super(context_id);
  }

  createContext(context_id: u32): Context {
    return new PluginHttp(context_id, this);
  }

  // The SDK's RootContext.onConfigure mishandles the configuration size, so read the buffer here.
  onConfigure(configuration_size: u32): bool {
    if (configuration_size > 0) {
      let config = String.UTF8.decode(
        get_buffer_bytes(BufferTypeValues.PluginConfiguration, 0, configuration_size));
      if (config.trim().length > 0 && !config.trim().startsWith("{")) {
        log(LogLevelValues.error, "{{name}}: invalid configuration: not a JSON object");
        return false;
      }
      this.header = jsonString(config, "header", this.header);
      this.value = jsonString(config, "value", this.value);
    }
    log(LogLevelValues.info, "{{name}}: adding " + this.header + ": " + this.value);
    return true;
  }
}

class PluginHttp extends Context {
  root: PluginRoot;

  constructor(context_id: u32, root_context: PluginRoot) {
    super(context_id, root_context);
    this.root = root_context;
  }

  onResponseHeaders(headers: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add(this.root.header, this.root.value);
    return FilterHeadersStatusValues.Continue;
  }
}

// Root id "" (the default).
registerRootContext((context_id: u32): RootContext => { return new PluginRoot(context_id); }, "");
