//! The S3 backend's SigV4 signer against AWS's published Signature Version 4 test suite: every
//! `v4` case in `fixtures/sigv4/` (request, context, and the expected canonical request, string
//! to sign and signature, as aws-c-auth keeps them; see `fixtures/sigv4/README.md`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use jaunt_control::recordings::sigv4::{self, Credentials, Request, Scope};

/// One fixture's request: method, raw path, raw query, headers (folded lines joined), body.
fn parse_request(text: &str) -> (String, String, String, Vec<(String, String)>, Vec<u8>) {
    let (head, body) = match text.split_once("\n\n") {
        Some((h, b)) => (h, b.as_bytes().to_vec()),
        None => (text.trim_end_matches('\n'), Vec::new()),
    };
    let mut lines = head.lines();
    let first = lines.next().unwrap();
    let method = first.split(' ').next().unwrap().to_string();
    let target = first
        .strip_prefix(&format!("{method} "))
        .unwrap()
        .strip_suffix(" HTTP/1.1")
        .unwrap();
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.starts_with(' ') || line.starts_with('\t') {
            let last = headers.last_mut().unwrap();
            last.1.push(' ');
            last.1.push_str(line.trim());
        } else {
            let (name, value) = line.split_once(':').unwrap();
            headers.push((name.to_string(), value.to_string()));
        }
    }
    (method, path.to_string(), query.to_string(), headers, body)
}

#[test]
fn every_v4_case_of_the_aws_test_suite_signs_byte_for_byte() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sigv4");
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 30, "the suite is in {}", root.display());
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let read = |f: &str| std::fs::read_to_string(case.join(f)).unwrap();
        let context: serde_json::Value = serde_json::from_str(&read("context.json")).unwrap();
        let (method, path, query, mut headers, body) = parse_request(&read("request.txt"));
        let creds = Credentials {
            access_key_id: context["credentials"]["access_key_id"]
                .as_str()
                .unwrap()
                .into(),
            secret_access_key: context["credentials"]["secret_access_key"]
                .as_str()
                .unwrap()
                .into(),
            session_token: context["credentials"]["token"].as_str().map(String::from),
        };
        let amz_date = "20150830T123600Z";
        assert_eq!(context["timestamp"], "2015-08-30T12:36:00Z", "{name}");
        headers.push(("X-Amz-Date".into(), amz_date.into()));
        let payload = sigv4::sha256_hex(&body);
        if context["sign_body"] == true {
            headers.push(("X-Amz-Content-Sha256".into(), payload.clone()));
        }
        // A session token is signed unless the case says it is added after signing.
        if let Some(token) = &creds.session_token {
            if context["omit_session_token"] != true {
                headers.push(("X-Amz-Security-Token".into(), token.clone()));
            }
        }
        let signed = sigv4::sign(
            &Request {
                method: &method,
                path: &path,
                query: &query,
                headers: &headers,
                payload_sha256: &payload,
            },
            &Scope {
                region: context["region"].as_str().unwrap(),
                service: context["service"].as_str().unwrap(),
                amz_date,
                normalize_path: context["normalize"] != false,
            },
            &creds,
        );
        assert_eq!(
            signed.canonical_request,
            read("header-canonical-request.txt"),
            "{name}: canonical request"
        );
        assert_eq!(
            signed.string_to_sign,
            read("header-string-to-sign.txt"),
            "{name}: string to sign"
        );
        assert_eq!(
            signed.signature,
            read("header-signature.txt").trim(),
            "{name}: signature"
        );
    }
}
