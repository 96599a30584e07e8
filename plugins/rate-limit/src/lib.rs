//! A token-bucket rate limiter whose buckets live in Proxy-Wasm shared data, so every worker's
//! VM draws from the same buckets. A bucket is refilled lazily from the time stored beside its
//! token count, so no timer is needed, and updated with compare-and-swap, retried when another
//! worker got there first.
//!
//! Plugin configuration (JSON): `{"requests_per_second": 10, "burst": 20}` or
//! `{"tokens_per_fill": 100, "fill_interval_ms": 60000, "burst": 100}`, optionally with
//! `"key_header": "x-api-key"` (a bucket per value) and `"status": 429`. See README.md.

use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{debug, error, info, warn};
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, Status};
use serde::Deserialize;

/// Tokens are counted in millionths, so that slow rates (one request an hour) and fast ones
/// refill smoothly in integer arithmetic.
const MICROS_PER_TOKEN: u64 = 1_000_000;
const NANOS_PER_SECOND: u128 = 1_000_000_000;
/// Far more than two racing workers ever need; a bound so a misbehaving host cannot hold a
/// request in an endless loop.
const MAX_CAS_ATTEMPTS: usize = 100;
/// Keeps `burst` in millionths, and every refill product, far from overflowing.
const MAX_TOKENS: u64 = 1_000_000_000;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(RateLimitRoot { config: None })
    });
}}

/// The configuration as written; [`Config::parse`] checks it and fills in the defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    requests_per_second: Option<f64>,
    tokens_per_fill: Option<u64>,
    fill_interval_ms: Option<u64>,
    burst: Option<u64>,
    key_header: Option<String>,
    status: Option<u16>,
}

/// How fast a bucket refills: `micro_tokens` every `interval_ns`, spread evenly.
#[derive(Debug, Clone, Copy)]
struct Refill {
    micro_tokens: u128,
    interval_ns: u128,
}

impl std::fmt::Display for Refill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tokens = self.micro_tokens as f64 / MICROS_PER_TOKEN as f64;
        if self.interval_ns == NANOS_PER_SECOND {
            write!(f, "{tokens} request(s) per second")
        } else {
            write!(
                f,
                "{tokens} token(s) every {} ms",
                self.interval_ns / 1_000_000
            )
        }
    }
}

#[derive(Debug)]
struct Config {
    refill: Refill,
    burst: u64,
    /// Lower-case; `None` means one bucket for all requests.
    key_header: Option<String>,
    status: u16,
    /// Starts every shared-data key, so that plugins sharing a `vm_id` keep apart buckets.
    key_prefix: String,
}

impl Config {
    fn parse(raw: &[u8], plugin_name: &str) -> Result<Self, String> {
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Err(
                "the configuration is empty; requests_per_second (or tokens_per_fill with \
                 fill_interval_ms) is required"
                    .into(),
            );
        }
        // Unknown fields are refused: a misspelt `burst` or `key_header` silently ignored would
        // limit something other than what was meant.
        let raw: RawConfig = serde_json::from_slice(raw).map_err(|err| err.to_string())?;

        let (refill, default_burst) = match (
            raw.requests_per_second,
            raw.tokens_per_fill,
            raw.fill_interval_ms,
        ) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err("set either requests_per_second, or tokens_per_fill with \
                                fill_interval_ms, not both"
                    .into());
            }
            (Some(rate), None, None) => {
                if !rate.is_finite() || rate <= 0.0 {
                    return Err(format!(
                        "requests_per_second must be greater than 0, not {rate}"
                    ));
                }
                if rate < 0.000_001 {
                    return Err(format!(
                        "requests_per_second must be at least 0.000001, not {rate}"
                    ));
                }
                if rate > MAX_TOKENS as f64 {
                    return Err(format!(
                        "requests_per_second must be at most {MAX_TOKENS}, not {rate}"
                    ));
                }
                let micro_tokens = (rate * MICROS_PER_TOKEN as f64).round() as u128;
                let refill = Refill {
                    micro_tokens,
                    interval_ns: NANOS_PER_SECOND,
                };
                (refill, (rate.ceil() as u64).max(1))
            }
            (None, Some(tokens), Some(interval_ms)) => {
                if tokens == 0 || tokens > MAX_TOKENS {
                    return Err(format!(
                        "tokens_per_fill must be between 1 and {MAX_TOKENS}, not {tokens}"
                    ));
                }
                if interval_ms == 0 {
                    return Err("fill_interval_ms must be at least 1".into());
                }
                let refill = Refill {
                    micro_tokens: u128::from(tokens) * u128::from(MICROS_PER_TOKEN),
                    interval_ns: u128::from(interval_ms) * 1_000_000,
                };
                (refill, tokens)
            }
            (None, Some(_), None) | (None, None, Some(_)) => {
                return Err("tokens_per_fill and fill_interval_ms go together".into());
            }
            (None, None, None) => {
                return Err("requests_per_second (or tokens_per_fill with \
                                fill_interval_ms) is required"
                    .into());
            }
        };
        let burst = raw.burst.unwrap_or(default_burst);
        if burst == 0 || burst > MAX_TOKENS {
            return Err(format!(
                "burst must be between 1 and {MAX_TOKENS}, not {burst}"
            ));
        }
        let key_header = match raw.key_header {
            None => None,
            Some(name) if is_header_name(&name) => Some(name.to_ascii_lowercase()),
            Some(name) => return Err(format!("key_header {name:?} is not a header name")),
        };
        let status = raw.status.unwrap_or(429);
        if !(400..=599).contains(&status) {
            return Err(format!("status must be a 4xx or 5xx status, not {status}"));
        }
        Ok(Config {
            refill,
            burst,
            key_header,
            status,
            key_prefix: format!("rate-limit/{plugin_name}/"),
        })
    }

    fn capacity(&self) -> u64 {
        self.burst * MICROS_PER_TOKEN
    }

    fn global_key(&self) -> String {
        format!("{}global", self.key_prefix)
    }
}

/// An RFC 9110 field name, or a pseudo-header such as `:authority`.
fn is_header_name(name: &str) -> bool {
    let name = name.strip_prefix(':').unwrap_or(name);
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A bucket as stored in shared data: its tokens in millionths and the time (nanoseconds since
/// the epoch) up to which refills have been counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    micro_tokens: u64,
    refilled_at_ns: u64,
}

impl Bucket {
    const ENCODED_LEN: usize = 16;

    fn full(config: &Config, now_ns: u64) -> Self {
        Bucket {
            micro_tokens: config.capacity(),
            refilled_at_ns: now_ns,
        }
    }

    fn encode(self) -> [u8; Self::ENCODED_LEN] {
        let mut bytes = [0; Self::ENCODED_LEN];
        bytes[..8].copy_from_slice(&self.micro_tokens.to_le_bytes());
        bytes[8..].copy_from_slice(&self.refilled_at_ns.to_le_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::ENCODED_LEN] = bytes.try_into().ok()?;
        let (tokens, time) = bytes.split_at(8);
        Some(Bucket {
            micro_tokens: u64::from_le_bytes(tokens.try_into().ok()?),
            refilled_at_ns: u64::from_le_bytes(time.try_into().ok()?),
        })
    }

    /// The bucket at `now_ns`, with what the elapsed time earned, up to the capacity.
    fn refilled(self, now_ns: u64, refill: Refill, capacity: u64) -> Self {
        if now_ns < self.refilled_at_ns {
            // The clock stepped back (or another worker read it a moment later): count from now
            // rather than stall until the clock catches up again.
            return Bucket {
                micro_tokens: self.micro_tokens.min(capacity),
                refilled_at_ns: now_ns,
            };
        }
        if self.micro_tokens >= capacity {
            // A full bucket earns nothing while it stays full.
            return Bucket {
                micro_tokens: capacity,
                refilled_at_ns: now_ns,
            };
        }
        let elapsed = u128::from(now_ns - self.refilled_at_ns);
        let earned = elapsed * refill.micro_tokens / refill.interval_ns;
        let micro_tokens = (u128::from(self.micro_tokens) + earned).min(u128::from(capacity));
        if micro_tokens == u128::from(capacity) {
            return Bucket {
                micro_tokens: capacity,
                refilled_at_ns: now_ns,
            };
        }
        // Only the time that earned whole millionths is counted as used: the rest carries over,
        // or frequent requests at a slow rate would each earn nothing and the bucket never refill.
        let used = earned * refill.interval_ns / refill.micro_tokens;
        Bucket {
            micro_tokens: micro_tokens as u64,
            refilled_at_ns: self.refilled_at_ns + used as u64,
        }
    }

    /// Whole seconds until this bucket holds one token again (at least 1).
    fn seconds_to_next_token(self, now_ns: u64, refill: Refill) -> u64 {
        let missing = u128::from(MICROS_PER_TOKEN.saturating_sub(self.micro_tokens));
        let needed_ns = (missing * refill.interval_ns).div_ceil(refill.micro_tokens);
        let already_ns = u128::from(now_ns.saturating_sub(self.refilled_at_ns));
        let seconds = needed_ns
            .saturating_sub(already_ns)
            .div_ceil(NANOS_PER_SECOND);
        u64::try_from(seconds).unwrap_or(u64::MAX).max(1)
    }
}

enum Decision {
    Allowed { remaining: u64 },
    Limited { retry_after_s: u64 },
}

fn nanos_since_epoch(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    })
}

struct RateLimitRoot {
    /// `None` until a configuration has been accepted; the host never creates HTTP contexts
    /// before that.
    config: Option<Rc<Config>>,
}

impl Context for RateLimitRoot {}

impl RootContext for RateLimitRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let raw = self.get_plugin_configuration().unwrap_or_default();
        let plugin_name = self
            .get_property(vec!["plugin_name"])
            .map(|name| String::from_utf8_lossy(&name).into_owned())
            .unwrap_or_default();
        let config = match Config::parse(&raw, &plugin_name) {
            Ok(config) => config,
            Err(err) => {
                error!("rate-limit: invalid configuration: {err}");
                return false;
            }
        };
        if config.key_header.is_none() {
            // Shared data has no "create if absent": two workers creating a bucket at once would
            // each start from a full one. Workers configure before any request arrives, so
            // creating the one global bucket here leaves requests nothing to race on.
            let key = config.global_key();
            if let (None, _) = self.get_shared_data(&key) {
                let now_ns = nanos_since_epoch(self.get_current_time());
                let bucket = Bucket::full(&config, now_ns);
                if let Err(status) = self.set_shared_data(&key, Some(&bucket.encode()), None) {
                    warn!("rate-limit: creating the shared bucket failed: {status:?}");
                }
            }
        }
        info!(
            "rate-limit: {}, burst {}, {}, answering {} when exhausted",
            config.refill,
            config.burst,
            match &config.key_header {
                Some(name) => format!("a bucket per {name} value"),
                None => "one bucket for all requests".into(),
            },
            config.status
        );
        self.config = Some(Rc::new(config));
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(RateLimit {
            config,
            remaining: None,
        }))
    }

    // Without this the SDK does not know which kind of stream context to create.
    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct RateLimit {
    config: Rc<Config>,
    /// Whole tokens left after this request took one; reported on the response.
    remaining: Option<u64>,
}

impl RateLimit {
    fn bucket_key(&self) -> String {
        let prefix = &self.config.key_prefix;
        let Some(header) = &self.config.key_header else {
            return self.config.global_key();
        };
        // Bytes, not strings: the SDK's string getters panic on a value that is not UTF-8.
        match self.get_http_request_header_bytes(header) {
            // Requests without the header share one bucket, so leaving it out is no way around
            // the limit.
            None => format!("{prefix}none"),
            Some(value) => match String::from_utf8(value) {
                Ok(value) => format!("{prefix}key:{value}"),
                Err(err) => {
                    let hex: String = err.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
                    format!("{prefix}hex:{hex}")
                }
            },
        }
    }

    /// Takes a token from the bucket at `key`; `None` if the shared bucket could not be updated.
    fn take_token(&self, key: &str, now_ns: u64) -> Option<Decision> {
        let config = &self.config;
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (stored, cas) = self.get_shared_data(key);
            // A value this plugin did not write (another plugin's, under the same vm_id and
            // name) is replaced by a full bucket rather than trusted.
            let bucket = stored
                .as_deref()
                .and_then(Bucket::decode)
                .unwrap_or_else(|| Bucket::full(config, now_ns))
                .refilled(now_ns, config.refill, config.capacity());
            if bucket.micro_tokens < MICROS_PER_TOKEN {
                // Nothing to write: the stored state already yields this refill next time.
                return Some(Decision::Limited {
                    retry_after_s: bucket.seconds_to_next_token(now_ns, config.refill),
                });
            }
            let after = Bucket {
                micro_tokens: bucket.micro_tokens - MICROS_PER_TOKEN,
                ..bucket
            };
            // A missing bucket is created unconditionally (cas 0): the host has no "create if
            // absent". See on_configure for why the global bucket never gets here.
            match self.set_shared_data(key, Some(&after.encode()), cas) {
                Ok(()) => {
                    return Some(Decision::Allowed {
                        remaining: after.micro_tokens / MICROS_PER_TOKEN,
                    });
                }
                Err(Status::CasMismatch) => continue,
                Err(status) => {
                    warn!("rate-limit: updating bucket {key:?} failed: {status:?}");
                    return None;
                }
            }
        }
        warn!("rate-limit: bucket {key:?} kept changing under {MAX_CAS_ATTEMPTS} attempts");
        None
    }
}

impl Context for RateLimit {}

impl HttpContext for RateLimit {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let key = self.bucket_key();
        let now_ns = nanos_since_epoch(self.get_current_time());
        match self.take_token(&key, now_ns) {
            Some(Decision::Allowed { remaining }) => {
                self.remaining = Some(remaining);
                Action::Continue
            }
            Some(Decision::Limited { retry_after_s }) => {
                debug!("rate-limit: bucket {key:?} is empty");
                let limit = self.config.burst.to_string();
                let retry_after = retry_after_s.to_string();
                self.send_http_response(
                    u32::from(self.config.status),
                    vec![
                        ("x-ratelimit-limit", &limit),
                        ("x-ratelimit-remaining", "0"),
                        ("retry-after", &retry_after),
                        ("content-type", "text/plain"),
                    ],
                    Some(b"rate limit exceeded\n"),
                );
                Action::Pause
            }
            // Failing open: a limiter that cannot count should not take the service down.
            None => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(remaining) = self.remaining {
            self.set_http_response_header(
                "x-ratelimit-limit",
                Some(&self.config.burst.to_string()),
            );
            self.set_http_response_header("x-ratelimit-remaining", Some(&remaining.to_string()));
        }
        Action::Continue
    }
}
