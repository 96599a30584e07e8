// Wasmgate test plugin written with the AssemblyScript Proxy-Wasm SDK
// (@solo-io/proxy-runtime). Exercises a second, independent SDK against the host.

// Exports the proxy_* entry points, malloc/free and the ABI version marker.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext, Context, registerRootContext, log, LogLevelValues,
  FilterHeadersStatusValues, GrpcStatusValues, HeaderPair, Headers,
  stream_context, send_local_response,
} from "@solo-io/proxy-runtime";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

class AsRoot extends RootContext {
  config: string = "";

  constructor(context_id: u32) {
    super(context_id);
  }

  createContext(context_id: u32): Context {
    return new AsHttp(context_id, this);
  }

  // The SDK's RootContext.onConfigure passes the configuration size where the
  // host expects a pointer for the returned size, so read the buffer ourselves.
  onConfigure(configuration_size: u32): bool {
    let config = "";
    if (configuration_size > 0) {
      config = String.UTF8.decode(
        get_buffer_bytes(BufferTypeValues.PluginConfiguration, 0, configuration_size));
    }
    if (config == "fail") {
      return false;
    }
    this.config = config;
    log(LogLevelValues.info, "as configured: " + config);
    return true;
  }

  getConfiguration(): string {
    return this.config;
  }
}

class AsHttp extends Context {
  root: AsRoot;

  constructor(context_id: u32, root_context: AsRoot) {
    super(context_id, root_context);
    this.root = root_context;
  }

  onRequestHeaders(headers: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.request.add("x-as-seen", "1");
    stream_context.headers.request.replace("x-as-config", this.root.getConfiguration());
    if (stream_context.headers.request.get(":path") == "/as-deny") {
      let extra: Headers = [
        new HeaderPair(String.UTF8.encode("x-as-reason"), String.UTF8.encode("denied")),
      ];
      send_local_response(403, "", String.UTF8.encode("denied by as"), extra,
        GrpcStatusValues.InvalidCode);
      return FilterHeadersStatusValues.StopIteration;
    }
    log(LogLevelValues.info, "as request headers");
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(headers: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add("x-as-response", "1");
    return FilterHeadersStatusValues.Continue;
  }

  onLog(): void {
    log(LogLevelValues.info, "as on_log");
  }
}

// Root id "" (the default). The SDK picks the factory by the `plugin_root_id`
// property when proxy_on_context_create(id, 0) creates a root context.
registerRootContext((context_id: u32): RootContext => { return new AsRoot(context_id); }, "");
