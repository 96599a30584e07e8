//! Configuration errors: where (file, field path) and why.

use std::fmt;

/// One configuration problem: the file (or source name) it is in, the field path inside it
/// (`listeners[0].routes[1].cluster`, `spec.vmConfig.env[0].name`; empty when the problem is not
/// about one field, such as a YAML syntax error) and the reason.
///
/// Displays as `"{source}: {field}: {reason}"`, or `"{source}: {reason}"` when `field` is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file path or source name; for a WasmPlugin manifest, `"dir/a.yaml (document 2)"`.
    pub source: String,
    /// The field path, in the spelling the file uses; may be empty.
    pub field: String,
    /// What is wrong, for a person to read. YAML syntax and type errors end with
    /// `(line L, column C)` when the position is known.
    pub reason: String,
}

impl ConfigError {
    pub fn new(
        source: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            source: source.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Converts a typed-deserialisation error (with the path serde_path_to_error tracked) into a
    /// `ConfigError`.
    pub(crate) fn from_serde(
        source: &str,
        prefix: &str,
        err: serde_path_to_error::Error<serde_yaml::Error>,
    ) -> Self {
        let path = err.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let inner = err.into_inner();
        let (field, reason) = split_serde_message(&path, &inner);
        Self::new(source, join_field(prefix, &field), reason)
    }

    /// A YAML error that is not about one field (syntax, several documents).
    pub(crate) fn from_yaml(source: &str, err: &serde_yaml::Error) -> Self {
        let (_, reason) = split_serde_message("", err);
        Self::new(source, "", reason)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.source, self.reason)
        } else {
            write!(f, "{}: {}: {}", self.source, self.field, self.reason)
        }
    }
}

impl std::error::Error for ConfigError {}

/// Several configuration problems, as [`GatewayConfig::validate`](crate::GatewayConfig::validate)
/// collects them. Displays one [`ConfigError`] per line. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// The first problem (the one to show when only one fits).
    pub fn first(&self) -> Option<&ConfigError> {
        self.0.first()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn push(&mut self, error: ConfigError) {
        self.0.push(error);
    }

    pub(crate) fn into_result(self) -> Result<(), ConfigErrors> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(error: ConfigError) -> Self {
        Self(vec![error])
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a ConfigError;
    type IntoIter = std::slice::Iter<'a, ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Collects validation problems for one source.
pub(crate) struct Report<'a> {
    pub source: &'a str,
    pub errors: ConfigErrors,
}

impl<'a> Report<'a> {
    pub fn new(source: &'a str) -> Self {
        Self {
            source,
            errors: ConfigErrors::default(),
        }
    }

    pub fn push(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.errors
            .push(ConfigError::new(self.source, field, reason));
    }
}

/// `prefix` + `field` as one path (`spec` + `url` = `spec.url`, `a` + `[0]` = `a[0]`).
pub(crate) fn join_field(prefix: &str, field: &str) -> String {
    match (prefix.is_empty(), field.is_empty()) {
        (true, _) => field.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) if field.starts_with('[') => format!("{prefix}{field}"),
        (false, false) => format!("{prefix}.{field}"),
    }
}

/// serde_yaml renders errors as `"{its own path}: {message} at line L column C"`. Returns the field
/// path to report and the bare message, with the position re-attached as `(line L, column C)`.
/// `missing field `x`` becomes field `path.x` with reason `required field is missing`.
fn split_serde_message(path: &str, err: &serde_yaml::Error) -> (String, String) {
    let location = err.location();
    let mut message = err.to_string();
    if let Some(loc) = &location {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        message = message.replacen(&suffix, "", 1);
    }
    if !path.is_empty()
        && let Some(colon) = message.find(": ")
    {
        let head = &message[..colon];
        if !head.contains(char::is_whitespace) && first_segment(head) == first_segment(path) {
            message = message[colon + 2..].to_owned();
        }
    }
    let mut field = path.to_owned();
    if let Some(name) = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        field = join_field(path, name);
        message = "required field is missing".to_owned();
    }
    if let Some(loc) = location {
        message = format!("{message} (line {}, column {})", loc.line(), loc.column());
    }
    (field, message)
}

fn first_segment(path: &str) -> &str {
    let end = path.find(['.', '[']).unwrap_or(path.len());
    &path[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_with_and_without_field() {
        let e = ConfigError::new("gw.yaml", "listeners[0].address", "bad address");
        assert_eq!(e.to_string(), "gw.yaml: listeners[0].address: bad address");
        let e = ConfigError::new("gw.yaml", "", "did not find expected node content");
        assert_eq!(e.to_string(), "gw.yaml: did not find expected node content");
        let all = ConfigErrors(vec![
            ConfigError::new("a", "x", "one"),
            ConfigError::new("a", "y", "two"),
        ]);
        assert_eq!(all.to_string(), "a: x: one\na: y: two");
    }

    #[test]
    fn join_fields() {
        assert_eq!(join_field("", "a"), "a");
        assert_eq!(join_field("a", ""), "a");
        assert_eq!(join_field("spec", "url"), "spec.url");
        assert_eq!(join_field("env", "[0]"), "env[0]");
    }
}
