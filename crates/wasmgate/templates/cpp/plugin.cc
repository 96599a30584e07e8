// {{name}}: a Proxy-Wasm HTTP filter that adds one header to every response, written with the
// C++ SDK (https://github.com/proxy-wasm/proxy-wasm-cpp-sdk) and built with Emscripten.
//
// Plugin configuration (JSON, both fields optional):
// {"header": "x-{{name}}", "value": "hello"}

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "proxy_wasm_intrinsics.h"

namespace {

struct Config {
  std::string header = "x-{{name}}";
  std::string value = "hello";
};

// Reads a flat JSON object whose values are strings: {"key": "value", ...}. The SDK has no JSON
// parser, and this is all the configuration needs. Returns false with a reason on anything else.
class FlatJsonObject {
public:
  explicit FlatJsonObject(std::string_view text) : text_(text) {}

  bool parse(std::vector<std::pair<std::string, std::string>> *fields, std::string *error) {
    skipSpace();
    if (!consume('{')) {
      *error = "the configuration is not a JSON object";
      return false;
    }
    skipSpace();
    if (!consume('}')) {
      while (true) {
        std::string key, value;
        skipSpace();
        if (!readString(&key, error)) {
          return false;
        }
        skipSpace();
        if (!consume(':')) {
          *error = "expected ':' after \"" + key + "\"";
          return false;
        }
        skipSpace();
        if (peek() != '"') {
          *error = "\"" + key + "\" is not a string";
          return false;
        }
        if (!readString(&value, error)) {
          return false;
        }
        fields->emplace_back(std::move(key), std::move(value));
        skipSpace();
        if (consume('}')) {
          break;
        }
        if (!consume(',')) {
          *error = "expected ',' or '}' at offset " + std::to_string(pos_);
          return false;
        }
      }
    }
    skipSpace();
    if (pos_ != text_.size()) {
      *error = "unexpected text after the JSON object";
      return false;
    }
    return true;
  }

private:
  char peek() const { return pos_ < text_.size() ? text_[pos_] : '\0'; }

  bool consume(char c) {
    if (pos_ < text_.size() && text_[pos_] == c) {
      pos_++;
      return true;
    }
    return false;
  }

  void skipSpace() {
    while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' ||
                                   text_[pos_] == '\n' || text_[pos_] == '\r')) {
      pos_++;
    }
  }

  bool readHex4(uint32_t *out) {
    if (text_.size() - pos_ < 4) {
      return false;
    }
    uint32_t code = 0;
    for (int i = 0; i < 4; i++) {
      char c = text_[pos_++];
      code <<= 4;
      if (c >= '0' && c <= '9') {
        code |= c - '0';
      } else if (c >= 'a' && c <= 'f') {
        code |= c - 'a' + 10;
      } else if (c >= 'A' && c <= 'F') {
        code |= c - 'A' + 10;
      } else {
        return false;
      }
    }
    *out = code;
    return true;
  }

  static void appendUtf8(uint32_t code, std::string *out) {
    if (code < 0x80) {
      out->push_back(static_cast<char>(code));
    } else if (code < 0x800) {
      out->push_back(static_cast<char>(0xC0 | (code >> 6)));
      out->push_back(static_cast<char>(0x80 | (code & 0x3F)));
    } else if (code < 0x10000) {
      out->push_back(static_cast<char>(0xE0 | (code >> 12)));
      out->push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (code & 0x3F)));
    } else {
      out->push_back(static_cast<char>(0xF0 | (code >> 18)));
      out->push_back(static_cast<char>(0x80 | ((code >> 12) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | ((code >> 6) & 0x3F)));
      out->push_back(static_cast<char>(0x80 | (code & 0x3F)));
    }
  }

  bool readString(std::string *out, std::string *error) {
    if (!consume('"')) {
      *error = "expected a string at offset " + std::to_string(pos_);
      return false;
    }
    while (pos_ < text_.size()) {
      char c = text_[pos_++];
      if (c == '"') {
        return true;
      }
      if (static_cast<unsigned char>(c) < 0x20) {
        *error = "a control character inside a string";
        return false;
      }
      if (c != '\\') {
        out->push_back(c);
        continue;
      }
      if (pos_ == text_.size()) {
        break;
      }
      char escape = text_[pos_++];
      switch (escape) {
      case '"':
      case '\\':
      case '/':
        out->push_back(escape);
        break;
      case 'b':
        out->push_back('\b');
        break;
      case 'f':
        out->push_back('\f');
        break;
      case 'n':
        out->push_back('\n');
        break;
      case 'r':
        out->push_back('\r');
        break;
      case 't':
        out->push_back('\t');
        break;
      case 'u': {
        uint32_t code = 0;
        if (!readHex4(&code)) {
          *error = "a bad \\u escape";
          return false;
        }
        // A surrogate pair: \uD83D\uDE00.
        if (code >= 0xD800 && code <= 0xDBFF) {
          uint32_t low = 0;
          if (!consume('\\') || !consume('u') || !readHex4(&low) || low < 0xDC00 || low > 0xDFFF) {
            *error = "a bad \\u surrogate pair";
            return false;
          }
          code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
        } else if (code >= 0xDC00 && code <= 0xDFFF) {
          *error = "a bad \\u surrogate pair";
          return false;
        }
        appendUtf8(code, out);
        break;
      }
      default:
        *error = "a bad escape in a string";
        return false;
      }
    }
    *error = "an unterminated string";
    return false;
  }

  std::string_view text_;
  size_t pos_ = 0;
};

// Reads the JSON object the gateway passes as the plugin configuration.
bool parseConfig(std::string_view raw, Config *config, std::string *error) {
  if (raw.find_first_not_of(" \t\r\n") == std::string_view::npos) {
    return true; // No configuration: the defaults.
  }
  std::vector<std::pair<std::string, std::string>> fields;
  if (!FlatJsonObject(raw).parse(&fields, error)) {
    return false;
  }
  for (auto &[key, value] : fields) {
    if (key == "header") {
      config->header = value;
    } else if (key == "value") {
      config->value = value;
    } else {
      *error = "unknown field \"" + key + "\"";
      return false;
    }
  }
  return true;
}

class AddHeaderRoot : public RootContext {
public:
  explicit AddHeaderRoot(uint32_t id, std::string_view root_id) : RootContext(id, root_id) {}

  bool onConfigure(size_t configuration_size) override {
    Config config;
    std::string error;
    std::string raw;
    if (configuration_size > 0) {
      raw = getBufferBytes(WasmBufferType::PluginConfiguration, 0, configuration_size)->toString();
    }
    if (!parseConfig(raw, &config, &error)) {
      // Returning false rejects the configuration: the gateway reports it.
      logError("{{name}}: invalid configuration: " + error);
      return false;
    }
    logInfo("{{name}}: adding " + config.header + ": " + config.value);
    config_ = std::move(config);
    return true;
  }

  const Config &config() const { return config_; }

private:
  Config config_;
};

class AddHeaderContext : public Context {
public:
  explicit AddHeaderContext(uint32_t id, RootContext *root)
      : Context(id, root), root_(static_cast<AddHeaderRoot *>(root)) {}

  FilterHeadersStatus onResponseHeaders(uint32_t, bool) override {
    addResponseHeader(root_->config().header, root_->config().value);
    return FilterHeadersStatus::Continue;
  }

private:
  AddHeaderRoot *root_;
};

// Root id "" (the default).
static RegisterContextFactory register_AddHeader(CONTEXT_FACTORY(AddHeaderContext),
                                                 ROOT_FACTORY(AddHeaderRoot));

} // namespace
