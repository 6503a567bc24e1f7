//! AWS Signature Version 4 for the `s3` recordings backend: the canonical request, the string to
//! sign and the `Authorization` header, written here; HMAC-SHA256 and SHA-256 are ring's.
//!
//! Verified against AWS's published SigV4 test suite (the `v4` cases as kept by aws-c-auth,
//! carried over in `control/tests/fixtures/sigv4/`, run by `control/tests/sigv4.rs`): for every
//! case the canonical request, the string to sign and the signature must match byte for byte.
//!
//! Not here: HTTP (`http1.rs`), S3's requests and XML (`s3.rs`). Presigned URLs (query
//! signing) and chunked payload signing are not implemented: the backend sends each body with
//! its SHA-256 in `x-amz-content-sha256`.

use ring::{digest, hmac};

/// The algorithm name in the string to sign and the header.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// SHA-256 of the empty string, the payload hash of requests without a body.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// An access key. `Debug` does not print the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// A temporary credential's session token (`x-amz-security-token`).
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<hidden>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<hidden>"),
            )
            .finish()
    }
}

/// One request to sign. `path` is the request path as sent, before encoding (S3 object keys
/// are encoded here, once); `query` the raw query string without `?`; `headers` every header
/// to sign (`host` included), names in any case.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the body.
    pub payload_sha256: &'a str,
}

/// Where and when a request is signed.
#[derive(Clone, Debug)]
pub struct Scope<'a> {
    pub region: &'a str,
    pub service: &'a str,
    /// `YYYYMMDD'T'HHMMSS'Z'`, the `x-amz-date` header's value.
    pub amz_date: &'a str,
    /// Remove `.`/`..` segments and repeated slashes from the path (every service but S3).
    pub normalize_path: bool,
}

/// The pieces of one signature (kept for tests and for error messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub canonical_request: String,
    pub string_to_sign: String,
    pub signed_headers: String,
    /// Lowercase hex.
    pub signature: String,
    /// The `Authorization` header's value.
    pub authorization: String,
}

/// Signs `req`: its headers must already hold `host` and `x-amz-date` (and, when the
/// credentials have one, `x-amz-security-token`) as they will be sent.
pub fn sign(req: &Request<'_>, scope: &Scope<'_>, creds: &Credentials) -> Signature {
    let (canonical_request, signed_headers) = canonical_request(req, scope.normalize_path);
    let date = scope.amz_date.get(..8).unwrap_or(scope.amz_date);
    let credential_scope = format!("{date}/{}/{}/aws4_request", scope.region, scope.service);
    let string_to_sign = format!(
        "{ALGORITHM}\n{}\n{credential_scope}\n{}",
        scope.amz_date,
        hex::encode(digest::digest(
            &digest::SHA256,
            canonical_request.as_bytes()
        ))
    );
    let key = signing_key(&creds.secret_access_key, date, scope.region, scope.service);
    let signature = hex::encode(hmac::sign(&key, string_to_sign.as_bytes()));
    let authorization = format!(
        "{ALGORITHM} Credential={}/{credential_scope}, SignedHeaders={signed_headers}, Signature={signature}",
        creds.access_key_id
    );
    Signature {
        canonical_request,
        string_to_sign,
        signed_headers,
        signature,
        authorization,
    }
}

/// `kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), service), "aws4_request")`.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> hmac::Key {
    let mut key = hmac::Key::new(hmac::HMAC_SHA256, format!("AWS4{secret}").as_bytes());
    for part in [date, region, service, "aws4_request"] {
        let tag = hmac::sign(&key, part.as_bytes());
        key = hmac::Key::new(hmac::HMAC_SHA256, tag.as_ref());
    }
    key
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes))
}

/// The canonical request and the signed-headers list.
pub fn canonical_request(req: &Request<'_>, normalize_path: bool) -> (String, String) {
    let uri = canonical_uri(req.path, normalize_path);
    let query = canonical_query(req.query);
    // Headers: lowercase names, sorted; values trimmed with inner runs of spaces made one;
    // repeated headers joined with commas in the order given.
    let mut headers: Vec<(String, String)> = Vec::new();
    for (name, value) in req.headers {
        let name = name.trim().to_ascii_lowercase();
        let value = collapse_spaces(value);
        match headers.iter_mut().find(|(n, _)| *n == name) {
            Some((_, v)) => {
                v.push(',');
                v.push_str(&value);
            }
            None => headers.push((name, value)),
        }
    }
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    let mut canonical_headers = String::new();
    for (name, value) in &headers {
        canonical_headers.push_str(name);
        canonical_headers.push(':');
        canonical_headers.push_str(value);
        canonical_headers.push('\n');
    }
    let signed_headers = headers
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(";");
    (
        format!(
            "{}\n{uri}\n{query}\n{canonical_headers}\n{signed_headers}\n{}",
            req.method, req.payload_sha256
        ),
        signed_headers,
    )
}

/// Trims and turns every run of white space (folded header lines too) into one space.
fn collapse_spaces(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The path, each segment percent-encoded (RFC 3986 unreserved characters kept); normalized
/// (dot segments and empty segments removed, a trailing slash kept) when asked.
pub fn canonical_uri(path: &str, normalize: bool) -> String {
    if path.is_empty() {
        return "/".into();
    }
    if !normalize {
        return encode(path, false);
    }
    let mut out: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    let mut text = String::from("/");
    text.push_str(
        &out.iter()
            .map(|s| encode(s, true))
            .collect::<Vec<_>>()
            .join("/"),
    );
    if trailing && !out.is_empty() {
        text.push('/');
    }
    text
}

/// The query: every name and value decoded, then encoded strictly, sorted by name, then value.
pub fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (
                encode(&percent_decode(k), true),
                encode(&percent_decode(v), true),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes everything but `A-Za-z0-9-._~` (and `/` unless `slash` is set).
pub fn encode(text: &str, slash: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text.as_bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (b == b'/' && !slash)
        {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (malformed ones are kept as written).
pub fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `x-amz-date` for unix seconds `secs`.
pub fn amz_date(secs: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(0))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(amz_date(1_440_938_160), "20150830T123600Z");
        assert_eq!(percent_decode("%E1%88%B4x%2"), "\u{1234}x%2");
        assert_eq!(encode("a b/ሴ", false), "a%20b/%E1%88%B4");
        assert_eq!(canonical_uri("//example//", true), "/example/");
        assert_eq!(canonical_uri("/example1/example2/../..", true), "/");
        assert_eq!(canonical_uri("/example/..", true), "/");
    }
}
