//! HTTP/1.1 pieces the three HTTP servers of the tree share (control's API server,
//! `control/src/http.rs`; the engine's web route, `engine/src/server/http.rs`; the agent's web
//! app proxy, `agent/src/http_app/wire.rs`): the reason-phrase table and the one reading of
//! `Content-Length` ([`content_length`]), so that the three agree on the field request
//! smuggling hides in. Pure functions, no I/O.
//!
//! Not here (yet): the request/response head parsers and encoders, which each of the three still
//! keeps for itself on top of `httparse` (ARCHITECTURE.md says where and why they differ).

/// The reason phrase of `status` (RFC 9110's names). Clients ignore it; people reading a
/// response do not. A status without a name here gets its class's name.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        100..=199 => "Informational",
        200..=299 => "Success",
        300..=399 => "Redirection",
        400..=499 => "Client Error",
        _ => "Server Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_statuses_and_classes() {
        assert_eq!(reason_phrase(200), "OK");
        assert_eq!(reason_phrase(413), "Content Too Large");
        assert_eq!(reason_phrase(431), "Request Header Fields Too Large");
        assert_eq!(reason_phrase(299), "Success");
        assert_eq!(reason_phrase(418), "Client Error");
        assert_eq!(reason_phrase(599), "Server Error");
    }
}

/// Why a message's `Content-Length` fields cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentLengthError {
    /// An element that is not 1 to 19 ASCII digits (a sign, a space inside, empty, too long).
    Invalid,
    /// Two elements or fields that do not agree.
    Conflicting,
}

impl ContentLengthError {
    /// A short reason for a 400 answer.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentLengthError::Invalid => "an invalid Content-Length",
            ContentLengthError::Conflicting => "conflicting Content-Length values",
        }
    }
}

impl std::fmt::Display for ContentLengthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::error::Error for ContentLengthError {}

/// The `Content-Length` of a message from the values of its `Content-Length` fields (RFC 9112
/// §6.3): `None` without one; repeated fields and comma-separated list elements must all agree;
/// each element is 1 to 19 ASCII digits after trimming spaces and tabs (no sign, so `+5`, `-1`
/// and `5 5` are refused as invalid, as a length two parsers could read differently must be).
pub fn content_length<'a, I>(values: I) -> Result<Option<u64>, ContentLengthError>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let mut found: Option<u64> = None;
    for value in values {
        for element in value.split(|&b| b == b',') {
            let digits = trim_ows(element);
            if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
                return Err(ContentLengthError::Invalid);
            }
            let n = digits
                .iter()
                .fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            match found {
                Some(previous) if previous != n => return Err(ContentLengthError::Conflicting),
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

/// `bytes` without leading and trailing spaces and tabs (HTTP's optional whitespace, OWS).
pub fn trim_ows(mut bytes: &[u8]) -> &[u8] {
    while let Some((b' ' | b'\t', rest)) = bytes.split_first() {
        bytes = rest;
    }
    while let Some((b' ' | b'\t', rest)) = bytes.split_last() {
        bytes = rest;
    }
    bytes
}

#[cfg(test)]
mod content_length_tests {
    use super::*;

    fn cl(values: &[&str]) -> Result<Option<u64>, ContentLengthError> {
        content_length(values.iter().map(|v| v.as_bytes()))
    }

    #[test]
    fn one_reading_of_content_length() {
        assert_eq!(cl(&[]), Ok(None));
        assert_eq!(cl(&["0"]), Ok(Some(0)));
        assert_eq!(cl(&[" 12\t"]), Ok(Some(12)));
        assert_eq!(cl(&["5", "5"]), Ok(Some(5)));
        assert_eq!(cl(&["5, 5"]), Ok(Some(5)));
        assert_eq!(
            cl(&["9999999999999999999"]),
            Ok(Some(9_999_999_999_999_999_999))
        );
        for bad in [
            "+5",
            "-1",
            "5 5",
            "",
            " ",
            "0x10",
            "1e3",
            "5,",
            "12345678901234567890",
            "\u{663}",
        ] {
            assert_eq!(cl(&[bad]), Err(ContentLengthError::Invalid), "{bad:?}");
        }
        assert_eq!(cl(&["5", "6"]), Err(ContentLengthError::Conflicting));
        assert_eq!(cl(&["5, 6"]), Err(ContentLengthError::Conflicting));
    }
}
