//! YAML loading with errors that name the file, line, column and key path.
//!
//! Every error a config author sees has the shape `FILE:LINE:COL: PATH: MESSAGE`
//! ([`ConfigError`]), e.g. `jaunt.yaml:12:5: engine.shards: expected a number or "auto"`.
//!
//! How it works, given what serde_yaml_ng 0.10 offers:
//! - Its [`serde_yaml_ng::Error`] has a `location()` (1-based line and column, of the value or
//!   key being read) and a Display of the form `PATH: MESSAGE at line L column C`, where the
//!   path is omitted at the root. [`from_str`] takes the location, strips the suffix, splits the
//!   path off and rewrites serde's stock messages in plain words (`unknown field` becomes
//!   `unknown key (expected one of: ...)` with the key added to the path, `invalid type: X,
//!   expected u32` becomes `expected a whole number, found X`).
//! - A syntax error late in a document can be masked by a type error on the truncated event
//!   stream, so every text first goes through a syntax-only pass (`IgnoredAny`).
//! - Its multi-document iterator never ends after a parse error; every loop here stops at the
//!   first error and is bounded by [`DOCUMENTS_MAX`].
//! - Errors found after deserialization (validation: "engine requires public_addr") have no
//!   position. [`locate`] finds one for a key path such as `agent.services.apps[1].uri` by
//!   re-reading the document with a seeking deserializer that fails exactly at that key, so the
//!   position comes from the same parser and works for block and flow style alike. A path that
//!   does not exist resolves to its longest existing prefix, then to the document start.
//!
//! Not here: the schemas themselves ([`crate::file`], [`crate::resource`]).

use std::fmt;
use std::marker::PhantomData;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde::Deserialize;

/// Upper bound on `---`-separated documents in one text. Far above any real resource file; it
/// keeps a pathological input from turning into an unbounded loop.
pub const DOCUMENTS_MAX: usize = 100_000;

/// A config or resource error with its position: `FILE:LINE:COL: PATH: MESSAGE`.
///
/// `path` is a dotted key path (`engine.shards`, `spec.allow.rules[0].verbs`), empty when the
/// error is not about a key (YAML syntax). `line` and `column` are 1-based; `line == 0` means
/// there is no position (the file could not be read) and Display prints `FILE: MESSAGE`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}{message}", position_prefix(.file, .line, .column), path_prefix(.path))]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub path: String,
    pub message: String,
}

/// A problem found after deserialization, before it has a position: a key path relative to the
/// document root and a message. [`Source::invalid`] locates it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", path_prefix(.path))]
pub struct Invalid {
    pub path: String,
    pub message: String,
}

/// One document of one YAML text, for locating errors found after deserialization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source<'a> {
    pub file: &'a str,
    pub text: &'a str,
    /// Index of the document among the `---`-separated documents of `text` (0 for the first).
    pub document: usize,
}

/// A deserialized document and where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Document<'a, T> {
    pub source: Source<'a>,
    pub value: T,
}

/// Deserializes a single-document YAML text.
///
/// An empty text (or only comments) reads as an empty mapping, so a type whose fields all have
/// defaults loads from an empty file. More than one non-empty document is an error.
pub fn from_str<T: DeserializeOwned>(file_name: &str, text: &str) -> Result<T, ConfigError> {
    let mut documents = documents::<T>(file_name, text)?;
    if documents.len() > 1 {
        let second = &documents[1].source;
        return Err(second.error(
            "",
            format!(
                "expected a single YAML document, found {} (separated by ---)",
                documents.len()
            ),
        ));
    }
    match documents.pop() {
        Some(document) => Ok(document.value),
        None => serde_yaml_ng::from_str::<T>("{}")
            .map_err(|error| convert_error(Source::new(file_name, text), &error)),
    }
}

/// Deserializes every non-empty document of a `---`-separated text, in order.
pub fn from_str_multi<T: DeserializeOwned>(
    file_name: &str,
    text: &str,
) -> Result<Vec<T>, ConfigError> {
    Ok(documents::<T>(file_name, text)?
        .into_iter()
        .map(|document| document.value)
        .collect())
}

/// Like [`from_str_multi`], keeping each document's [`Source`] to locate later validation errors.
pub fn documents<'a, T: DeserializeOwned>(
    file_name: &'a str,
    text: &'a str,
) -> Result<Vec<Document<'a, T>>, ConfigError> {
    documents_seeded(file_name, text, |_| PhantomData::<T>)
}

/// The general form of [`documents`]: `seed_for(index)` says how to read document `index`
/// (e.g. by a `kind` read in an earlier pass). Empty documents are skipped.
pub fn documents_seeded<'a, S, F>(
    file_name: &'a str,
    text: &'a str,
    seed_for: F,
) -> Result<Vec<Document<'a, S::Value>>, ConfigError>
where
    S: DeserializeSeed<'a>,
    F: FnMut(usize) -> S,
{
    check_syntax(file_name, text)?;
    documents_seeded_checked(file_name, text, seed_for)
}

/// [`documents_seeded`] for a text that already passed the syntax-only pass (an earlier
/// [`documents`] of the same text): the same result, one pass over the text fewer.
pub fn documents_seeded_checked<'a, S, F>(
    file_name: &'a str,
    text: &'a str,
    mut seed_for: F,
) -> Result<Vec<Document<'a, S::Value>>, ConfigError>
where
    S: DeserializeSeed<'a>,
    F: FnMut(usize) -> S,
{
    let mut out = Vec::new();
    for (index, deserializer) in serde_yaml_ng::Deserializer::from_str(text)
        .take(DOCUMENTS_MAX)
        .enumerate()
    {
        let source = Source {
            file: file_name,
            text,
            document: index,
        };
        match OptionSeed(seed_for(index)).deserialize(deserializer) {
            Ok(Some(value)) => out.push(Document { source, value }),
            Ok(None) => {}
            Err(error) => return Err(convert_error(source, &error)),
        }
    }
    Ok(out)
}

/// Line and column (1-based) of a dotted key path in the first document of `text`.
/// See [`locate_in`].
pub fn locate(text: &str, path: &str) -> (usize, usize) {
    locate_in(text, 0, path)
}

/// Line and column (1-based) of the key at `path` (`engine.tls.cert_file`, `apps[1].uri`) in
/// document `document` of `text`: the position of the key itself, or of the element for a path
/// ending in an index. When the path does not exist, the position of its longest existing
/// prefix; when nothing matches, the start of the document, else `(1, 1)`.
pub fn locate_in(text: &str, document: usize, path: &str) -> (usize, usize) {
    let segments = parse_path(path);
    for len in (0..=segments.len()).rev() {
        if let Some(position) = seek(text, document, &segments[..len]) {
            return position;
        }
    }
    (1, 1)
}

/// `parent.key`, or `key` at the root.
pub fn join_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

impl ConfigError {
    pub fn new(
        file: impl Into<String>,
        line: usize,
        column: usize,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: file.into(),
            line,
            column,
            path: path.into(),
            message: message.into(),
        }
    }

    /// An error about the whole file (it could not be read): no position, no path.
    pub fn file(file: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::new(file, 0, 0, "", message)
    }
}

impl Invalid {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            path: path.into(),
            message: message.into(),
        }
    }

    /// The same problem seen from a parent: `key` becomes `parent.key`.
    pub fn under(mut self, parent: &str) -> Self {
        self.path = if self.path.is_empty() {
            parent.to_string()
        } else if self.path.starts_with('[') {
            format!("{parent}{}", self.path)
        } else {
            join_path(parent, &self.path)
        };
        self
    }
}

impl<'a> Source<'a> {
    /// The first (or only) document of `text`.
    pub fn new(file: &'a str, text: &'a str) -> Self {
        Source {
            file,
            text,
            document: 0,
        }
    }

    /// Position of `path` in this document; see [`locate_in`].
    pub fn locate(&self, path: &str) -> (usize, usize) {
        locate_in(self.text, self.document, path)
    }

    /// An error about the key at `path` (relative to this document's root), located.
    pub fn error(&self, path: &str, message: impl Into<String>) -> ConfigError {
        let (line, column) = self.locate(path);
        ConfigError::new(self.file, line, column, path, message)
    }

    pub fn invalid(&self, invalid: Invalid) -> ConfigError {
        let (line, column) = self.locate(&invalid.path);
        ConfigError::new(self.file, line, column, invalid.path, invalid.message)
    }
}

fn position_prefix(file: &str, line: &usize, column: &usize) -> String {
    if *line == 0 {
        format!("{file}: ")
    } else {
        format!("{file}:{line}:{column}: ")
    }
}

fn path_prefix(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!("{path}: ")
    }
}

/// Reads every document with `IgnoredAny` so syntax errors are reported as such, before any
/// typed pass can trip over the truncated event stream and report something misleading.
fn check_syntax(file_name: &str, text: &str) -> Result<(), ConfigError> {
    for (index, deserializer) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        if index >= DOCUMENTS_MAX {
            let (line, column) = locate_in(text, index, "");
            return Err(ConfigError::new(
                file_name,
                line,
                column,
                "",
                format!("too many YAML documents (at most {DOCUMENTS_MAX})"),
            ));
        }
        if let Err(error) = IgnoredAny::deserialize(deserializer) {
            let (line, column) = error_position(&error);
            let shown = strip_position(&error.to_string(), line, column);
            return Err(ConfigError::new(
                file_name,
                line,
                column,
                "",
                format!("invalid YAML: {shown}"),
            ));
        }
    }
    Ok(())
}

fn error_position(error: &serde_yaml_ng::Error) -> (usize, usize) {
    error
        .location()
        .map_or((1, 1), |location| (location.line(), location.column()))
}

fn strip_position(shown: &str, line: usize, column: usize) -> String {
    let suffix = format!(" at line {line} column {column}");
    match shown.strip_suffix(&suffix) {
        Some(stripped) => stripped.to_string(),
        // libyaml errors put the position mid-text: "PROBLEM at line L column C, CONTEXT".
        None => shown.replacen(&suffix, "", 1),
    }
}

/// Turns a serde_yaml_ng error on a syntactically valid document into a [`ConfigError`].
fn convert_error(source: Source<'_>, error: &serde_yaml_ng::Error) -> ConfigError {
    let position = match error.location() {
        Some(location) => (location.line(), location.column()),
        None => source.locate(""),
    };
    let shown = strip_position(&error.to_string(), position.0, position.1);
    let (path, message) = split_path(&shown);
    let rewritten = rewrite_message(path, message);
    let (line, column) = match &rewritten.relocate_to {
        Some(path) => source.locate(path),
        None => position,
    };
    ConfigError::new(source.file, line, column, rewritten.path, rewritten.message)
}

/// serde_yaml_ng prints `PATH: MESSAGE`, or only `MESSAGE` at the root. A path never contains
/// whitespace or quotes for our schemas, and serde's own messages begin with two words
/// (`invalid type: ...`), so the first `": "` preceded by a bare token ends the path. A key with
/// spaces would leave the path in the message, which still reads the same.
fn split_path(shown: &str) -> (&str, &str) {
    if let Some(at) = shown.find(": ") {
        let candidate = &shown[..at];
        let bare = !candidate.is_empty()
            && !candidate.contains(|c: char| c.is_whitespace() || matches!(c, '`' | '"' | '\''));
        if bare {
            return (candidate, &shown[at + 2..]);
        }
    }
    ("", shown)
}

struct Rewritten {
    path: String,
    message: String,
    /// Errors raised by serde at the end of a mapping (a missing key) carry the mapping's
    /// position; point at the parent key instead.
    relocate_to: Option<String>,
}

fn rewrite_message(path: &str, message: &str) -> Rewritten {
    let keep = |message: String| Rewritten {
        path: path.to_string(),
        message,
        relocate_to: None,
    };
    let names = backticked(message);
    if message.starts_with("unknown field `") {
        let Some((key, expected)) = names.split_first() else {
            return keep(message.to_string());
        };
        let hint = if expected.is_empty() {
            "no keys are allowed here".to_string()
        } else {
            format!("expected one of: {}", expected.join(", "))
        };
        return Rewritten {
            path: join_path(path, key),
            message: format!("unknown key ({hint})"),
            relocate_to: None,
        };
    }
    if message.starts_with("missing field `") {
        if let Some(key) = names.first() {
            return Rewritten {
                path: join_path(path, key),
                message: "missing required key".to_string(),
                relocate_to: Some(path.to_string()),
            };
        }
    }
    if message.starts_with("duplicate field `") {
        if let Some(key) = names.first() {
            let full = join_path(path, key);
            return Rewritten {
                path: full.clone(),
                message: "key appears more than once".to_string(),
                relocate_to: Some(full),
            };
        }
    }
    if message.starts_with("unknown variant `") {
        if let Some((value, expected)) = names.split_first() {
            return keep(format!(
                "unknown value {value:?} (expected one of: {})",
                expected.join(", ")
            ));
        }
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((found, expected)) = rest.rsplit_once(", expected ") {
                return keep(format!(
                    "expected {}, found {}",
                    plain_expected(expected),
                    plain_found(found)
                ));
            }
        }
    }
    if let Some(rest) = message.strip_prefix("invalid length ") {
        if let Some((found, expected)) = rest.rsplit_once(", expected ") {
            return keep(format!("expected {expected}, found {found} elements"));
        }
    }
    keep(message.to_string())
}

fn backticked(message: &str) -> Vec<&str> {
    message.split('`').skip(1).step_by(2).collect()
}

/// serde's `expecting` texts for std types, in the words of a config author.
fn plain_expected(expected: &str) -> String {
    let plain = match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer",
        "f32" | "f64" => "a number",
        "a map" => "a mapping",
        "a sequence" => "a list",
        "a borrowed string" => "a string",
        "unit" => "nothing (null)",
        other if other.starts_with("struct ") => "a mapping",
        other if other.starts_with("tuple struct ") => "a list",
        other => other,
    };
    plain.to_string()
}

/// serde's `Unexpected` texts, in the words of a config author.
fn plain_found(found: &str) -> String {
    match found {
        "sequence" => return "a list".to_string(),
        "map" => return "a mapping".to_string(),
        "unit value" | "Option value" => return "null".to_string(),
        _ => {}
    }
    if let Some(quoted) = found.strip_prefix("string ") {
        return quoted.to_string();
    }
    for prefix in ["integer `", "floating point `", "boolean `"] {
        if let Some(value) = found
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix('`'))
        {
            return value.to_string();
        }
    }
    found.to_string()
}

/// Reads an optional document: empty or `null` documents are `None`.
struct OptionSeed<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for OptionSeed<S> {
    type Value = Option<S::Value>;

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for OptionSeed<S> {
    type Value = Option<S::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a YAML document")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        self.0.deserialize(deserializer).map(Some)
    }
}

// ---- the locator ----------------------------------------------------------------------------

/// Carried by the error the seeking deserializer raises at its target; never shown to users.
const LOCATE_FOUND: &str = "\u{1}jaunt-locate-found";
const LOCATE_MISSING: &str = "\u{1}jaunt-locate-missing";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment<'p> {
    Key(&'p str),
    Index(usize),
}

fn parse_path(path: &str) -> Vec<Segment<'_>> {
    let mut segments = Vec::new();
    for part in path.split('.').filter(|part| !part.is_empty()) {
        match split_indices(part) {
            Some((key, indices)) => {
                if !key.is_empty() {
                    segments.push(Segment::Key(key));
                }
                segments.extend(indices.into_iter().map(Segment::Index));
            }
            None => segments.push(Segment::Key(part)),
        }
    }
    segments
}

/// `apps[1][2]` → `("apps", [1, 2])`; `None` when the brackets are not all indices.
fn split_indices(part: &str) -> Option<(&str, Vec<usize>)> {
    let open = part.find('[')?;
    let (key, mut rest) = part.split_at(open);
    let mut indices = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let close = inner.find(']')?;
        indices.push(inner[..close].parse().ok()?);
        rest = &inner[close + 1..];
    }
    Some((key, indices))
}

fn seek(text: &str, document: usize, segments: &[Segment<'_>]) -> Option<(usize, usize)> {
    let deserializer = serde_yaml_ng::Deserializer::from_str(text)
        .take(document.saturating_add(1))
        .nth(document)?;
    match (Seek { rest: segments }).deserialize(deserializer) {
        Ok(()) => None,
        Err(error) if error.to_string().contains(LOCATE_FOUND) => error
            .location()
            .map(|location| (location.line(), location.column())),
        Err(_) => None,
    }
}

/// Walks towards `rest` and always fails: at the target with [`LOCATE_FOUND`] (the parser then
/// attaches the target's position), elsewhere with something else.
struct Seek<'s, 'p> {
    rest: &'s [Segment<'p>],
}

impl<'de> DeserializeSeed<'de> for Seek<'_, '_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        if self.rest.is_empty() {
            deserializer.deserialize_any(Found)
        } else {
            deserializer.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for Seek<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(LOCATE_MISSING)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Segment::Key(want), rest)) = self.rest.split_first() else {
            return Err(de::Error::custom(LOCATE_MISSING));
        };
        let seed = KeySeed {
            want,
            last: rest.is_empty(),
        };
        while let Some(hit) = map.next_key_seed(seed)? {
            if hit {
                return map.next_value_seed(Seek { rest });
            }
            map.next_value::<IgnoredAny>()?;
        }
        Err(de::Error::custom(LOCATE_MISSING))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Segment::Index(index), rest)) = self.rest.split_first() else {
            return Err(de::Error::custom(LOCATE_MISSING));
        };
        for _ in 0..*index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom(LOCATE_MISSING));
            }
        }
        match seq.next_element_seed(Seek { rest })? {
            Some(()) => Ok(()),
            None => Err(de::Error::custom(LOCATE_MISSING)),
        }
    }
}

/// Fails on any value; the default `visit_*` errors quote `expecting`, i.e. the marker.
struct Found;

impl Visitor<'_> for Found {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(LOCATE_FOUND)
    }
}

/// Reads a mapping key: `Ok(true)` when it is the wanted one (and more path follows), the
/// marker error when it is the wanted one and the path ends here (position of the key).
#[derive(Clone, Copy)]
struct KeySeed<'p> {
    want: &'p str,
    last: bool,
}

impl KeySeed<'_> {
    fn check<E: de::Error>(self, key: &str) -> Result<bool, E> {
        match (key == self.want, self.last) {
            (true, true) => Err(E::custom(LOCATE_FOUND)),
            (hit, _) => Ok(hit),
        }
    }
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = bool;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<bool, E> {
        self.check(key)
    }

    fn visit_bool<E: de::Error>(self, key: bool) -> Result<bool, E> {
        self.check(&key.to_string())
    }

    fn visit_i64<E: de::Error>(self, key: i64) -> Result<bool, E> {
        self.check(&key.to_string())
    }

    fn visit_u64<E: de::Error>(self, key: u64) -> Result<bool, E> {
        self.check(&key.to_string())
    }

    fn visit_f64<E: de::Error>(self, key: f64) -> Result<bool, E> {
        self.check(&key.to_string())
    }

    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Top {
        engine: Option<Engine>,
        #[serde(default)]
        apps: Vec<App>,
        level: Option<Level>,
        count: Option<u32>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Engine {
        public_addr: String,
        shards: Option<u32>,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct App {
        name: String,
        uri: String,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Level {
        Info,
        Debug,
    }

    fn error(text: &str) -> String {
        from_str::<Top>("t.yaml", text).unwrap_err().to_string()
    }

    #[test]
    fn display_has_the_documented_shape() {
        let with_path = ConfigError::new("jaunt.yaml", 12, 5, "engine.shards", "expected x");
        assert_eq!(
            with_path.to_string(),
            "jaunt.yaml:12:5: engine.shards: expected x"
        );
        let without = ConfigError::new("jaunt.yaml", 3, 1, "", "invalid YAML: oops");
        assert_eq!(without.to_string(), "jaunt.yaml:3:1: invalid YAML: oops");
        let unread = ConfigError::file("/etc/jaunt/jaunt.yaml", "cannot read: denied");
        assert_eq!(
            unread.to_string(),
            "/etc/jaunt/jaunt.yaml: cannot read: denied"
        );
    }

    #[test]
    fn unknown_keys_name_the_key_and_the_alternatives() {
        assert_eq!(
            error("engine:\n  public_addr: x\n  sharts: 4\n"),
            "t.yaml:3:3: engine.sharts: unknown key (expected one of: public_addr, shards, labels)"
        );
        assert_eq!(
            error("apps: [ {name: a, uri: b}, {name: c, urx: d} ]\n"),
            "t.yaml:1:38: apps[1].urx: unknown key (expected one of: name, uri)"
        );
        assert_eq!(
            error("bogus: 1\n"),
            "t.yaml:1:1: bogus: unknown key (expected one of: engine, apps, level, count)"
        );
    }

    #[test]
    fn type_errors_are_in_plain_words() {
        assert_eq!(
            error("engine:\n  public_addr: x\n  shards: lots\n"),
            "t.yaml:3:11: engine.shards: expected a whole number, found \"lots\""
        );
        assert_eq!(
            error("engine:\n  public_addr: [x]\n"),
            "t.yaml:2:16: engine.public_addr: expected a string, found a list"
        );
        assert_eq!(
            error("- a\n"),
            "t.yaml:1:1: expected a mapping, found a list"
        );
        assert_eq!(
            error("level: loud\n"),
            "t.yaml:1:8: level: unknown value \"loud\" (expected one of: info, debug)"
        );
        assert_eq!(
            error("count: -1\n"),
            "t.yaml:1:8: count: expected a whole number, found -1"
        );
    }

    #[test]
    fn missing_keys_point_at_the_parent_key() {
        assert_eq!(
            error("# header\nengine:\n  shards: 4\n"),
            "t.yaml:2:1: engine.public_addr: missing required key"
        );
        assert_eq!(
            error("apps:\n  - name: a\n    uri: b\n  - name: c\n"),
            "t.yaml:4:5: apps[1].uri: missing required key"
        );
    }

    #[test]
    fn syntax_errors_are_not_masked_by_type_errors() {
        assert_eq!(
            error("engine:\n  public_addr: [x\n"),
            "t.yaml:3:1: invalid YAML: did not find expected ',' or ']', \
             while parsing a flow sequence at line 2 column 16"
        );
        assert_eq!(
            error("engine:\n  public_addr: x\n shards: 3\n"),
            "t.yaml:3:2: invalid YAML: did not find expected key, while parsing a block mapping"
        );
        assert!(error("a: *nope\n").starts_with("t.yaml:1:4: invalid YAML: unknown anchor"));
    }

    #[test]
    fn empty_text_reads_as_an_empty_mapping() {
        let empty: Top = from_str("t.yaml", "# nothing here\n").unwrap();
        assert_eq!(
            empty,
            Top {
                engine: None,
                apps: Vec::new(),
                level: None,
                count: None
            }
        );
        let missing = from_str::<App>("t.yaml", "").unwrap_err();
        assert_eq!(
            missing.to_string(),
            "t.yaml:1:1: name: missing required key"
        );
    }

    #[test]
    fn more_than_one_document_is_an_error_for_from_str() {
        assert_eq!(
            error("count: 1\n---\ncount: 2\n"),
            "t.yaml:3:1: expected a single YAML document, found 2 (separated by ---)"
        );
        // A trailing separator is not a second document.
        assert_eq!(
            from_str::<Top>("t.yaml", "count: 1\n---\n").unwrap().count,
            Some(1)
        );
    }

    #[test]
    fn multi_document_errors_use_absolute_lines_and_stop_at_the_first_syntax_error() {
        let docs = from_str_multi::<BTreeMap<String, u32>>("r.yaml", "a: 1\n---\n---\nb: 2\n");
        assert_eq!(docs.unwrap().len(), 2);
        let bad = from_str_multi::<BTreeMap<String, u32>>("r.yaml", "a: 1\n---\nb: x\n");
        assert_eq!(
            bad.unwrap_err().to_string(),
            "r.yaml:3:4: b: expected a whole number, found \"x\""
        );
        // serde_yaml_ng's iterator repeats a parse error forever; this must terminate.
        let broken = from_str_multi::<BTreeMap<String, u32>>("r.yaml", "a: 1\n---\nb: [2\n");
        assert!(broken.unwrap_err().message.starts_with("invalid YAML"));
    }

    #[test]
    fn documents_keep_their_source_for_later_errors() {
        let text = "a: 1\n---\nb:\n  c: 2\n";
        let docs = documents::<BTreeMap<String, serde_yaml_ng::Value>>("r.yaml", text).unwrap();
        assert_eq!(docs[1].source.document, 1);
        let error = docs[1].source.error("b.c", "too big");
        assert_eq!(error.to_string(), "r.yaml:4:3: b.c: too big");
        let invalid = docs[1].source.invalid(Invalid::new("c", "nope").under("b"));
        assert_eq!((invalid.line, invalid.column), (4, 3));
    }

    #[test]
    fn locate_finds_keys_in_block_and_flow_style() {
        let text = "\
# comment
engine:
  public_addr: x
  tls: { cert_file: a, key_file: b }
agent:
  services:
    apps:
      - name: one
        uri: http://a
      - name: two
        uri: ftp://b
    dbs: [ {name: pg, uri: 'x'} ]
";
        assert_eq!(locate(text, "engine"), (2, 1));
        assert_eq!(locate(text, "engine.public_addr"), (3, 3));
        assert_eq!(locate(text, "engine.tls.key_file"), (4, 24));
        assert_eq!(locate(text, "agent.services.apps[1]"), (10, 9));
        assert_eq!(locate(text, "agent.services.apps[1].uri"), (11, 9));
        assert_eq!(locate(text, "agent.services.dbs[0].uri"), (12, 23));
        // Missing keys fall back to the longest existing prefix.
        assert_eq!(locate(text, "engine.shards"), (2, 1));
        assert_eq!(locate(text, "agent.services.apps[7].uri"), (7, 5));
        assert_eq!(locate(text, "control.listen_addr"), (2, 1));
        assert_eq!(locate(text, ""), (2, 1));
        assert_eq!(locate("", "a.b"), (1, 1));
        assert_eq!(locate("a: [1\n", "a"), (1, 1));
    }

    #[test]
    fn locate_in_counts_documents() {
        let text = "kind: role\n---\nkind: user\nspec:\n  roles: [a]\n";
        assert_eq!(locate_in(text, 1, "spec.roles[0]"), (5, 11));
        assert_eq!(locate_in(text, 1, ""), (3, 1));
        assert_eq!(locate_in(text, 9, "spec"), (1, 1));
    }

    #[test]
    fn paths_parse_into_keys_and_indices() {
        use Segment::{Index, Key};
        assert_eq!(
            parse_path("a.b[0][2].c"),
            vec![Key("a"), Key("b"), Index(0), Index(2), Key("c")]
        );
        assert_eq!(parse_path("[3]"), vec![Index(3)]);
        assert_eq!(parse_path("weird[x]"), vec![Key("weird[x]")]);
        assert_eq!(parse_path(""), Vec::<Segment<'_>>::new());
    }

    #[test]
    fn invalid_under_builds_paths() {
        assert_eq!(
            Invalid::new("uri", "m").under("apps[0]").path,
            "apps[0].uri"
        );
        assert_eq!(Invalid::new("[1]", "m").under("logins").path, "logins[1]");
        assert_eq!(Invalid::new("", "m").under("spec").path, "spec");
        assert_eq!(Invalid::new("uri", "m").to_string(), "uri: m");
    }
}
