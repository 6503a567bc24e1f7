//! The `s3` recordings backend, for any S3-compatible object store (AWS S3, MinIO, Ceph RGW,
//! Garage, moto in the tests): objects `<prefix><id>.cast` and `<prefix><id>.json`, the `.json`
//! written last so a listed recording is whole.
//!
//! - Addressing: path style (`endpoint/bucket/key`, `path_style: true`) or virtual-hosted
//!   (`bucket.endpoint/key`); endpoint `https://s3.<region>.amazonaws.com` by default.
//! - Credentials: `credentials_file` (AWS's INI format, `[default]`), else `AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`; read per request, so a rotated file is
//!   picked up.
//! - Signing: SigV4 (`sigv4.rs`) with the body's SHA-256 in `x-amz-content-sha256`.
//! - Big recordings: multipart upload in parts of [`DEFAULT_PART_SIZE`], one part in memory at a
//!   time and one multipart upload at a time per control (memory stays at one part).
//! - The upload completer ([`Backend::complete_uploads`]): lists the bucket's unfinished
//!   multipart uploads under the prefix; one whose recording is still staged on this control
//!   (a crash after the check and before the end) is resumed from its last whole part and
//!   completed; one with nothing staged and older than [`S3Backend::abandon_after`] is aborted
//!   (its agent still has the recording and uploads it again).
//!
//! Not here: HTTP (`http1.rs`), the XML answers beyond the few elements read here (no XML
//! library: the fields read are plain text elements of S3's documented answers).

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use jaunt_config::file::S3Config;
use jaunt_config::identity::unix_now;

use super::http1::{self, Endpoint};
use super::sigv4::{self, Credentials};
use super::{Backend, RecordingInfo, Staging, StorageError};

/// Part size of multipart uploads (S3's minimum is 5 MiB for every part but the last); a
/// recording up to this size is one `PUT`.
pub const DEFAULT_PART_SIZE: usize = 8 << 20;
/// Unfinished multipart uploads with nothing staged here are aborted after this long.
pub const DEFAULT_ABANDON_AFTER: Duration = Duration::from_secs(3600);

pub struct S3Backend {
    config: S3Config,
    endpoint: Endpoint,
    client: http1::Client,
    /// Multipart part size.
    pub part_size: usize,
    /// Age past which an unfinished upload with nothing staged is aborted.
    pub abandon_after: Duration,
    /// One big upload at a time (bounds memory to one part).
    upload_lock: Mutex<()>,
    /// Infos already read (they never change once stored).
    cache: Mutex<HashMap<String, RecordingInfo>>,
}

impl std::fmt::Debug for S3Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Backend")
            .field("bucket", &self.config.bucket)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn s3err(e: impl std::fmt::Display) -> StorageError {
    StorageError::S3(e.to_string())
}

impl S3Backend {
    /// A backend for `config`; checks the credentials can be read (not the bucket: see
    /// [`S3Backend::check`]).
    pub fn open(config: &S3Config) -> anyhow::Result<S3Backend> {
        let url = config
            .endpoint
            .clone()
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", config.region));
        let endpoint =
            Endpoint::parse(&url).map_err(|e| anyhow::anyhow!("recordings.endpoint: {e}"))?;
        let backend = S3Backend {
            config: config.clone(),
            endpoint,
            client: http1::Client::new(),
            part_size: DEFAULT_PART_SIZE,
            abandon_after: DEFAULT_ABANDON_AFTER,
            upload_lock: Mutex::new(()),
            cache: Mutex::new(HashMap::new()),
        };
        backend.credentials()?;
        Ok(backend)
    }

    /// The credentials, from the file or the environment.
    pub fn credentials(&self) -> anyhow::Result<Credentials> {
        match &self.config.credentials_file {
            Some(path) => {
                let text = fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("recordings.credentials_file {}: {e}", path.display())
                })?;
                parse_credentials_file(&text).map_err(|e| {
                    anyhow::anyhow!("recordings.credentials_file {}: {e}", path.display())
                })
            }
            None => {
                let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
                match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
                    (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials {
                        access_key_id,
                        secret_access_key,
                        session_token: var("AWS_SESSION_TOKEN"),
                    }),
                    _ => Err(anyhow::anyhow!(
                        "recordings (s3): no credentials: set AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY, or recordings.credentials_file"
                    )),
                }
            }
        }
    }

    /// Checks the bucket answers to these credentials (`HEAD` the bucket): a wrong key or an
    /// unreachable store is a clear error at start-up.
    pub fn check(&self) -> Result<(), StorageError> {
        let r = self.request("HEAD", None, "", &[], &[])?;
        if r.status / 100 == 2 {
            return Ok(());
        }
        Err(StorageError::S3(format!(
            "bucket {:?} at {}: HTTP {}{}",
            self.config.bucket,
            self.endpoint.authority(),
            r.status,
            match r.status {
                403 => " (the credentials are wrong or lack access)",
                404 => " (no such bucket)",
                _ => "",
            }
        )))
    }

    /// Creates the bucket (tests and first set-ups; control itself never does).
    pub fn create_bucket(&self) -> Result<(), StorageError> {
        let r = self.request("PUT", None, "", &[], &[])?;
        ok(&r, "creating the bucket")
    }

    fn key(&self, id: &str, ext: &str) -> String {
        format!("{}{id}.{ext}", self.config.prefix)
    }

    /// One signed request for `key` (or the bucket); `query` already encoded.
    fn request(
        &self,
        method: &str,
        key: Option<&str>,
        query: &str,
        extra: &[(String, String)],
        body: &[u8],
    ) -> Result<http1::Response, StorageError> {
        let creds = self.credentials().map_err(s3err)?;
        let (host, path) = if self.config.path_style {
            (
                self.endpoint.authority(),
                match key {
                    Some(k) => format!("/{}/{k}", self.config.bucket),
                    None => format!("/{}", self.config.bucket),
                },
            )
        } else {
            (
                format!("{}.{}", self.config.bucket, self.endpoint.authority()),
                format!("/{}", key.unwrap_or("")),
            )
        };
        let amz_date = sigv4::amz_date(unix_now());
        let payload = sigv4::sha256_hex(body);
        let mut headers: Vec<(String, String)> = vec![
            ("host".into(), host.clone()),
            ("x-amz-date".into(), amz_date.clone()),
            ("x-amz-content-sha256".into(), payload.clone()),
        ];
        if let Some(token) = &creds.session_token {
            headers.push(("x-amz-security-token".into(), token.clone()));
        }
        headers.extend(extra.iter().cloned());
        let signature = sigv4::sign(
            &sigv4::Request {
                method,
                path: &path,
                query,
                headers: &headers,
                payload_sha256: &payload,
            },
            &sigv4::Scope {
                region: &self.config.region,
                service: "s3",
                amz_date: &amz_date,
                normalize_path: false,
            },
            &creds,
        );
        headers.push(("authorization".into(), signature.authorization));
        let mut target = sigv4::encode(&path, false);
        if !query.is_empty() {
            target.push('?');
            target.push_str(query);
        }
        let mut endpoint = self.endpoint.clone();
        if !self.config.path_style {
            endpoint.host = format!("{}.{}", self.config.bucket, endpoint.host);
        }
        // The Host header goes first, as the signature has it.
        self.client
            .send(&endpoint, method, &target, &headers, body)
            .map_err(|e| {
                StorageError::S3(format!(
                    "{method} {} at {}: {e}",
                    key.unwrap_or(&self.config.bucket),
                    self.endpoint.authority()
                ))
            })
    }

    fn put_object(&self, key: &str, body: &[u8]) -> Result<(), StorageError> {
        let r = self.request("PUT", Some(key), "", &[], body)?;
        ok(&r, &format!("PUT {key}"))
    }

    fn create_multipart(&self, key: &str) -> Result<String, StorageError> {
        let r = self.request("POST", Some(key), "uploads=", &[], &[])?;
        ok(&r, &format!("starting a multipart upload of {key}"))?;
        first_tag(&r.body, "UploadId").ok_or_else(|| s3err("no UploadId in the answer"))
    }

    fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: usize,
        body: &[u8],
    ) -> Result<String, StorageError> {
        let query = format!(
            "partNumber={number}&uploadId={}",
            sigv4::encode(upload_id, true)
        );
        let r = self.request("PUT", Some(key), &query, &[], body)?;
        ok(&r, &format!("uploading part {number} of {key}"))?;
        r.header("etag")
            .map(String::from)
            .ok_or_else(|| s3err("no ETag for an uploaded part"))
    }

    fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), StorageError> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (i, etag) in etags.iter().enumerate() {
            xml.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                i + 1,
                escape(etag)
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let query = format!("uploadId={}", sigv4::encode(upload_id, true));
        let r = self.request("POST", Some(key), &query, &[], xml.as_bytes())?;
        ok(&r, &format!("completing the multipart upload of {key}"))?;
        // S3 may answer 200 with an error document once the work is done.
        if let Some(code) = first_tag(&r.body, "Code") {
            return Err(s3err(format!("completing {key}: {code}")));
        }
        Ok(())
    }

    fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StorageError> {
        let query = format!("uploadId={}", sigv4::encode(upload_id, true));
        let r = self.request("DELETE", Some(key), &query, &[], &[])?;
        if r.status == 404 {
            return Ok(());
        }
        ok(&r, &format!("aborting the multipart upload of {key}"))
    }

    /// The ETags of the parts of an unfinished upload, in order (1, 2, ...: a gap ends it).
    fn list_parts(&self, key: &str, upload_id: &str) -> Result<Vec<String>, StorageError> {
        let query = format!("uploadId={}", sigv4::encode(upload_id, true));
        let r = self.request("GET", Some(key), &query, &[], &[])?;
        ok(&r, &format!("listing the parts of {key}"))?;
        let mut parts: Vec<(usize, String)> = blocks(&r.body, "Part")
            .iter()
            .filter_map(|b| {
                let n = first_tag(b.as_bytes(), "PartNumber")?.parse().ok()?;
                Some((n, first_tag(b.as_bytes(), "ETag")?))
            })
            .collect();
        parts.sort();
        Ok(parts
            .into_iter()
            .enumerate()
            .take_while(|(i, (n, _))| *n == i + 1)
            .map(|(_, (_, etag))| etag)
            .collect())
    }

    /// Unfinished multipart uploads under the prefix: (key, upload id, initiated unix secs).
    pub fn unfinished_uploads(&self) -> Result<Vec<(String, String, u64)>, StorageError> {
        let query = format!(
            "prefix={}&uploads=",
            sigv4::encode(&self.config.prefix, true)
        );
        let r = self.request("GET", None, &query, &[], &[])?;
        ok(&r, "listing unfinished uploads")?;
        Ok(blocks(&r.body, "Upload")
            .iter()
            .filter_map(|b| {
                let key = first_tag(b.as_bytes(), "Key")?;
                let id = first_tag(b.as_bytes(), "UploadId")?;
                let initiated = first_tag(b.as_bytes(), "Initiated")
                    .and_then(|t| {
                        time::OffsetDateTime::parse(
                            &t,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .ok()
                    })
                    .map_or(0, |t| u64::try_from(t.unix_timestamp()).unwrap_or(0));
                Some((key, id, initiated))
            })
            .collect())
    }

    /// Uploads `cast` as `key` in parts, resuming `resume` (an upload id and its parts so far);
    /// with `stop_after`, stops after that many new parts and leaves the upload unfinished
    /// (what a crash leaves; for tests).
    pub fn put_multipart(
        &self,
        key: &str,
        cast: &Path,
        resume: Option<(String, Vec<String>)>,
        stop_after: Option<usize>,
    ) -> Result<(), StorageError> {
        let _g = self.upload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (upload_id, mut etags) = match resume {
            Some(r) => r,
            None => (self.create_multipart(key)?, Vec::new()),
        };
        let mut file = fs::File::open(cast).map_err(s3err)?;
        let skip = (etags.len() * self.part_size) as u64;
        std::io::copy(&mut (&mut file).take(skip), &mut std::io::sink()).map_err(s3err)?;
        let mut buf = vec![0u8; self.part_size];
        let mut new_parts = 0;
        loop {
            let n = read_full(&mut file, &mut buf).map_err(s3err)?;
            if n == 0 && !etags.is_empty() {
                break;
            }
            if stop_after.is_some_and(|s| new_parts >= s) {
                return Ok(());
            }
            let etag = self.upload_part(key, &upload_id, etags.len() + 1, &buf[..n])?;
            etags.push(etag);
            new_parts += 1;
            if n < buf.len() {
                break;
            }
        }
        self.complete_multipart(key, &upload_id, &etags)
    }
}

fn read_full(file: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn ok(r: &http1::Response, doing: &str) -> Result<(), StorageError> {
    if r.status / 100 == 2 {
        return Ok(());
    }
    let code = first_tag(&r.body, "Code").unwrap_or_default();
    let message = first_tag(&r.body, "Message").unwrap_or_default();
    Err(StorageError::S3(format!(
        "{doing}: HTTP {} {code} {message}",
        r.status
    )))
}

impl Backend for S3Backend {
    fn name(&self) -> &'static str {
        "s3"
    }

    fn put(&self, info: &RecordingInfo, cast: &Path) -> Result<(), StorageError> {
        let key = self.key(&info.id, "cast");
        let size = fs::metadata(cast).map_err(s3err)?.len();
        if size as usize <= self.part_size {
            let body = fs::read(cast).map_err(s3err)?;
            self.put_object(&key, &body)?;
        } else {
            self.put_multipart(&key, cast, None, None)?;
        }
        let text = serde_json::to_vec(info).map_err(s3err)?;
        self.put_object(&self.key(&info.id, "json"), &text)
    }

    fn list(&self) -> Result<Vec<RecordingInfo>, StorageError> {
        let mut ids = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut query = format!(
                "list-type=2&prefix={}",
                sigv4::encode(&self.config.prefix, true)
            );
            if let Some(t) = &token {
                query.push_str(&format!("&continuation-token={}", sigv4::encode(t, true)));
            }
            let r = self.request("GET", None, &query, &[], &[])?;
            ok(&r, "listing recordings")?;
            for key in tags(&r.body, "Key") {
                if let Some(id) = key
                    .strip_prefix(&self.config.prefix)
                    .and_then(|k| k.strip_suffix(".json"))
                {
                    ids.push(id.to_string());
                }
            }
            token = first_tag(&r.body, "NextContinuationToken");
            if first_tag(&r.body, "IsTruncated").as_deref() != Some("true") || token.is_none() {
                break;
            }
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(info) = self.info(&id)? {
                out.push(info);
            }
        }
        Ok(out)
    }

    fn info(&self, id: &str) -> Result<Option<RecordingInfo>, StorageError> {
        if let Some(info) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            return Ok(Some(info.clone()));
        }
        let r = self.request("GET", Some(&self.key(id, "json")), "", &[], &[])?;
        if r.status == 404 {
            return Ok(None);
        }
        ok(&r, &format!("reading recording {id}"))?;
        let info: RecordingInfo = serde_json::from_slice(&r.body).map_err(s3err)?;
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), info.clone());
        Ok(Some(info))
    }

    fn read(&self, id: &str, offset: u64, len: u64) -> Result<Vec<u8>, StorageError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let range = vec![(
            "range".to_string(),
            format!("bytes={offset}-{}", offset + len - 1),
        )];
        let r = self.request("GET", Some(&self.key(id, "cast")), "", &range, &[])?;
        match r.status {
            404 => Err(StorageError::NotFound(id.to_string())),
            416 => Ok(Vec::new()),
            200 => Ok(r
                .body
                .into_iter()
                .skip(offset as usize)
                .take(len as usize)
                .collect()),
            _ => {
                ok(&r, &format!("reading recording {id}"))?;
                Ok(r.body)
            }
        }
    }

    fn complete_uploads(
        &self,
        staged: &Staging,
        abort_abandoned: bool,
    ) -> Result<(usize, usize), StorageError> {
        let (mut finished, mut aborted) = (0, 0);
        let now = unix_now();
        for (key, upload_id, initiated) in self.unfinished_uploads()? {
            let id = key
                .strip_prefix(&self.config.prefix)
                .and_then(|k| k.strip_suffix(".cast"));
            match id.and_then(|id| staged.ready_one(id)) {
                Some((info, part)) if part.exists() => {
                    let parts = self.list_parts(&key, &upload_id)?;
                    tracing::info!(id = %info.id, parts = parts.len(), "recordings: finishing an upload a restart interrupted");
                    self.put_multipart(&key, &part, Some((upload_id, parts)), None)?;
                    let text = serde_json::to_vec(&info).map_err(s3err)?;
                    self.put_object(&self.key(&info.id, "json"), &text)?;
                    staged.remove(&info.id);
                    finished += 1;
                }
                _ if abort_abandoned
                    && now.saturating_sub(initiated) >= self.abandon_after.as_secs() =>
                {
                    tracing::info!(key = %key, "recordings: aborting an abandoned upload");
                    self.abort_multipart(&key, &upload_id)?;
                    aborted += 1;
                }
                _ => {}
            }
        }
        Ok((finished, aborted))
    }
}

/// `[default]` of an AWS credentials file.
pub fn parse_credentials_file(text: &str) -> Result<Credentials, String> {
    let mut section = String::new();
    let mut values: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            continue;
        }
        if section != "default" {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            values.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let get = |k: &str| values.get(k).filter(|v| !v.is_empty()).cloned();
    Ok(Credentials {
        access_key_id: get("aws_access_key_id")
            .ok_or("no aws_access_key_id in its [default] section")?,
        secret_access_key: get("aws_secret_access_key")
            .ok_or("no aws_secret_access_key in its [default] section")?,
        session_token: get("aws_session_token"),
    })
}

/// The text of every `<tag>…</tag>` element (entities decoded).
fn tags(xml: &[u8], tag: &str) -> Vec<String> {
    blocks(xml, tag).iter().map(|b| unescape(b)).collect()
}

fn first_tag(xml: &[u8], tag: &str) -> Option<String> {
    tags(xml, tag).into_iter().next()
}

/// The raw inner text of every `<tag>…</tag>` (also `<tag attr="…">`).
fn blocks(xml: &[u8], tag: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(xml);
    let open = format!("<{tag}");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest: &str = &text;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        // `<Key>` but not `<KeyMarker>`.
        let Some(gt) = after.find('>') else { break };
        if !(after.starts_with('>') || after.starts_with(' ')) {
            rest = after;
            continue;
        }
        let body = &after[gt + 1..];
        let Some(end) = body.find(&close) else { break };
        out.push(body[..end].to_string());
        rest = &body[end + close.len()..];
    }
    out
}

fn unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#34;", "\"")
        .replace("&amp;", "&")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn xml_elements_and_credentials_files() {
        let xml = br#"<R><KeyMarker></KeyMarker><Upload><Key>a&amp;b.cast</Key><UploadId>u1</UploadId></Upload><Upload><Key>c.cast</Key><UploadId>u2</UploadId></Upload></R>"#;
        assert_eq!(tags(xml, "Key"), ["a&b.cast", "c.cast"]);
        assert_eq!(blocks(xml, "Upload").len(), 2);
        assert_eq!(first_tag(xml, "UploadId").as_deref(), Some("u1"));
        let creds = parse_credentials_file(
            "[other]\naws_access_key_id = X\n[default]\naws_access_key_id = AK\naws_secret_access_key=SK\n",
        )
        .unwrap();
        assert_eq!(
            (
                creds.access_key_id.as_str(),
                creds.secret_access_key.as_str()
            ),
            ("AK", "SK")
        );
        assert!(parse_credentials_file("[default]\naws_access_key_id=A\n").is_err());
    }
}
