//! Plugin configuration values: a YAML string is passed as is, anything else as JSON text.

use serde::{Deserialize, Deserializer};
use serde_json::Value;

const STRING_VALUE: &str = "google.protobuf.StringValue";
const STRUCT: &str = "google.protobuf.Struct";

/// Turns a configuration value into the bytes a plugin reads in `on_configure` / `on_vm_start`:
/// - a string: as is; null (or absent): empty;
/// - a map, list, number or boolean: its JSON text (map keys sorted);
/// - Envoy's `Any` form, so pasted Envoy config works: `{"@type": ".../google.protobuf.StringValue",
///   value: "..."}` gives the string, `{"@type": ".../google.protobuf.Struct", value: {...}}` the
///   JSON of the map.
pub fn configuration_text(value: Value) -> Result<String, String> {
    match value {
        Value::Null => Ok(String::new()),
        Value::String(s) => Ok(s),
        Value::Object(mut map) if map.contains_key("@type") => {
            let type_url = match map.remove("@type") {
                Some(Value::String(s)) => s,
                _ => return Err("\"@type\" must be a string".to_owned()),
            };
            let type_name = type_url.rsplit('/').next().unwrap_or_default();
            let value = map.remove("value").unwrap_or(Value::Null);
            if let Some(extra) = map.keys().next() {
                return Err(format!(
                    "unexpected key {extra:?} beside \"@type\" and \"value\""
                ));
            }
            match (type_name, value) {
                (STRING_VALUE, Value::String(s)) => Ok(s),
                (STRING_VALUE, Value::Null) => Ok(String::new()),
                (STRING_VALUE, _) => Err(format!("the value of a {STRING_VALUE} must be a string")),
                (STRUCT, Value::Object(m)) => to_json(&Value::Object(m)),
                (STRUCT, Value::Null) => Ok(String::new()),
                (STRUCT, _) => Err(format!("the value of a {STRUCT} must be a map")),
                _ => Err(format!(
                    "unsupported \"@type\" {type_url:?}: use {STRING_VALUE} or {STRUCT}, a plain \
                     string, or a map"
                )),
            }
        }
        other => to_json(&other),
    }
}

fn to_json(value: &Value) -> Result<String, String> {
    serde_json::to_string(value).map_err(|e| format!("cannot convert to JSON: {e}"))
}

/// `#[serde(deserialize_with)]` for configuration fields (see [`configuration_text`]).
pub(crate) fn deserialize_configuration<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<String, D::Error> {
    let value = Value::deserialize(d)?;
    configuration_text(value).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_yaml(text: &str) -> Result<String, String> {
        configuration_text(serde_yaml::from_str(text).unwrap())
    }

    #[test]
    fn string_as_is_map_as_json() {
        assert_eq!(from_yaml("\"a string\"").unwrap(), "a string");
        assert_eq!(from_yaml("'{\"k\": 1}'").unwrap(), "{\"k\": 1}");
        assert_eq!(from_yaml("~").unwrap(), "");
        assert_eq!(
            from_yaml("{b: [1, 2.5, x], a: {c: true}}").unwrap(),
            r#"{"a":{"c":true},"b":[1,2.5,"x"]}"#
        );
        assert_eq!(from_yaml("[1, two]").unwrap(), r#"[1,"two"]"#);
        assert_eq!(from_yaml("42").unwrap(), "42");
    }

    #[test]
    fn envoy_any_forms() {
        let s = from_yaml(
            "{\"@type\": type.googleapis.com/google.protobuf.StringValue, value: '{\"a\":1}'}",
        );
        assert_eq!(s.unwrap(), "{\"a\":1}");
        let s = from_yaml("{\"@type\": type.googleapis.com/google.protobuf.Struct, value: {a: 1}}");
        assert_eq!(s.unwrap(), "{\"a\":1}");
        let e = from_yaml("{\"@type\": type.googleapis.com/google.protobuf.BytesValue, value: x}");
        assert!(e.unwrap_err().starts_with("unsupported \"@type\""));
        let e = from_yaml("{\"@type\": type.googleapis.com/google.protobuf.Struct, value: 1}");
        assert!(e.unwrap_err().contains("must be a map"));
    }
}
