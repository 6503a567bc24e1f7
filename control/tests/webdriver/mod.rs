//! A small W3C WebDriver client for browser tests: starts Debian's `chromedriver` (or
//! `geckodriver` for Debian's `firefox-esr`) on a port reserved by binding 0, opens one headless
//! browser session (fresh profile, insecure certificates accepted for the dev CA, no network
//! services), and speaks the WebDriver HTTP API over a plain `TcpStream` (one request per
//! connection). Only what the tests use.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// The key under which WebDriver returns element references.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long a `wait_*` polls before failing the test.
pub const WAIT: Duration = Duration::from_secs(20);

/// One browser session; the browser and the driver end when it is dropped.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
}

/// An element reference.
#[derive(Clone, Debug)]
pub struct Element(String);

/// Which browser a test drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Debian's `chromium` through `chromium-driver`.
    Chromium,
    /// Debian's `firefox-esr` through `geckodriver` (`cargo install geckodriver`).
    Firefox,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Chromium => "chromium",
            Kind::Firefox => "firefox",
        }
    }
}

/// Firefox preferences that keep a test browser off the network: no updates, telemetry,
/// studies, captive-portal or connectivity probes, Safe Browsing lists, remote settings,
/// add-on or plugin downloads, DNS-over-HTTPS, prefetching or speculative connections.
/// (geckodriver sets many of these too; these do not depend on its version.)
fn firefox_prefs() -> Value {
    let off = [
        "app.update.auto",
        "app.update.enabled",
        "app.update.checkInstallTime",
        "app.normandy.enabled",
        "app.shield.optoutstudies.enabled",
        "browser.discovery.enabled",
        "browser.newtabpage.enabled",
        "browser.newtabpage.activity-stream.feeds.telemetry",
        "browser.newtabpage.activity-stream.telemetry",
        "browser.ping-centre.telemetry",
        "browser.region.update.enabled",
        "browser.safebrowsing.blockedURIs.enabled",
        "browser.safebrowsing.downloads.enabled",
        "browser.safebrowsing.downloads.remote.enabled",
        "browser.safebrowsing.malware.enabled",
        "browser.safebrowsing.phishing.enabled",
        "browser.safebrowsing.update.enabled",
        "browser.search.update",
        "browser.shell.checkDefaultBrowser",
        "browser.topsites.contile.enabled",
        "datareporting.healthreport.uploadEnabled",
        "datareporting.policy.dataSubmissionEnabled",
        "extensions.blocklist.enabled",
        "extensions.getAddons.cache.enabled",
        "extensions.update.enabled",
        "geo.enabled",
        "media.gmp-gmpopenh264.enabled",
        "media.gmp-manager.updateEnabled",
        "media.gmp-widevinecdm.enabled",
        "network.captive-portal-service.enabled",
        "network.connectivity-service.enabled",
        "network.dns.disablePrefetch",
        "network.prefetch-next",
        "security.remote_settings.crlite_filters.enabled",
        "security.remote_settings.intermediates.enabled",
        "services.sync.enabled",
        "toolkit.telemetry.archive.enabled",
        "toolkit.telemetry.enabled",
        "toolkit.telemetry.unified",
        "toolkit.telemetry.updatePing.enabled",
    ];
    let mut prefs = serde_json::Map::new();
    for name in off {
        // `network.dns.disablePrefetch` is the one whose "off" is `true`.
        prefs.insert(name.into(), json!(name == "network.dns.disablePrefetch"));
    }
    // Endpoints that would still be asked point nowhere (a closed local port).
    let nowhere = "http://127.0.0.1:9/";
    for name in [
        "app.update.url",
        "browser.region.network.url",
        "browser.safebrowsing.provider.google4.updateURL",
        "browser.safebrowsing.provider.mozilla.updateURL",
        "browser.search.geoip.url",
        "captivedetect.canonicalURL",
        "extensions.getAddons.get.url",
        "geo.provider.network.url",
        "media.gmp-manager.url",
        "network.connectivity-service.IPv4.url",
        "network.connectivity-service.IPv6.url",
        "services.settings.server",
        "toolkit.telemetry.server",
    ] {
        prefs.insert(name.into(), json!(nowhere));
    }
    prefs.insert("browser.startup.page".into(), json!(0));
    prefs.insert("browser.startup.homepage".into(), json!("about:blank"));
    prefs.insert("network.trr.mode".into(), json!(5));
    prefs.insert("network.http.speculative-parallel-limit".into(), json!(0));
    prefs.insert("security.OCSP.enabled".into(), json!(0));
    prefs.insert("network.proxy.type".into(), json!(0));
    Value::Object(prefs)
}

/// geckodriver: `$JAUNT_GECKODRIVER`, else on `PATH`, else where `cargo install` puts it.
pub fn geckodriver() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("JAUNT_GECKODRIVER") {
        return Some(p.into());
    }
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(std::path::PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(std::path::PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join("geckodriver"))
        .find(|p| p.is_file())
}

impl Browser {
    /// Starts chromedriver and a headless Chromium at 1280x800.
    pub fn start() -> Browser {
        Browser::launch(Kind::Chromium)
    }

    /// Starts the driver for `kind` and a headless browser at 1280x800.
    pub fn launch(kind: Kind) -> Browser {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let profile = tempfile::tempdir().unwrap();
        let driver = match kind {
            Kind::Chromium => Command::new("/usr/bin/chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver (Debian package chromium-driver) must be installed"),
            Kind::Firefox => {
                let gecko = geckodriver().expect(
                    "geckodriver must be installed (`cargo install geckodriver --locked`, as \
                     .ci/run does), or named by JAUNT_GECKODRIVER",
                );
                // geckodriver makes the profile under TMPDIR: inside ours, so it goes with it.
                Command::new(gecko)
                    .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                    .env("TMPDIR", profile.path())
                    .env("MOZ_HEADLESS", "1")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("geckodriver could not start")
            }
        };
        let mut browser = Browser {
            driver,
            port,
            session: String::new(),
            _profile: profile,
        };
        let deadline = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "{} driver did not listen",
                kind.name()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let caps = match kind {
            Kind::Chromium => {
                let args = [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    "--window-size=1280,800",
                    &format!("--user-data-dir={}", browser._profile.path().display()),
                ];
                json!({
                    "capabilities": {"alwaysMatch": {
                        "browserName": "chrome",
                        "acceptInsecureCerts": true,
                        "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
                    }}
                })
            }
            Kind::Firefox => json!({
                "capabilities": {"alwaysMatch": {
                    "browserName": "firefox",
                    "acceptInsecureCerts": true,
                    "moz:firefoxOptions": {
                        "binary": "/usr/bin/firefox-esr",
                        "args": ["-headless", "-no-remote"],
                        "prefs": firefox_prefs(),
                        "env": {"MOZ_HEADLESS": "1"},
                    },
                }}
            }),
        };
        let created = browser.call("POST", "/session", Some(caps));
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        if kind == Kind::Firefox {
            browser.set_window_size(1280, 800);
        }
        browser
    }

    /// Resizes the browser window (the outer size, as WebDriver sets it).
    pub fn set_window_size(&self, width: u32, height: u32) {
        self.call(
            "POST",
            &self.session_path("/window/rect"),
            Some(json!({"width": width, "height": height})),
        );
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.request(method, path, body);
        assert!(status < 300, "WebDriver {method} {path}: {status} {value}");
        value
    }

    /// One WebDriver request; returns the status and the `value` of the answer.
    fn request(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut conn = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        write!(
            conn,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .unwrap();
        // chromedriver keeps the connection open whatever the request says: read the head,
        // then exactly the body it announces.
        let mut raw = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        let (head, body_start) = loop {
            let n = conn.read(&mut chunk).unwrap();
            assert!(n > 0, "chromedriver closed before answering");
            raw.extend_from_slice(&chunk[..n]);
            if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break (String::from_utf8_lossy(&raw[..at]).to_string(), at + 4);
            }
        };
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let lower = head.to_ascii_lowercase();
        let length = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse::<usize>().unwrap());
        let payload = match length {
            Some(len) => {
                while raw.len() < body_start + len {
                    let n = conn.read(&mut chunk).unwrap();
                    assert!(n > 0, "chromedriver closed mid-answer");
                    raw.extend_from_slice(&chunk[..n]);
                }
                String::from_utf8_lossy(&raw[body_start..body_start + len]).to_string()
            }
            None => {
                let mut rest = raw[body_start..].to_vec();
                let _ = conn.read_to_end(&mut rest);
                let rest = String::from_utf8_lossy(&rest).to_string();
                if lower.contains("transfer-encoding: chunked") {
                    dechunk(&rest)
                } else {
                    rest
                }
            }
        };
        let parsed: Value = serde_json::from_str(&payload)
            .unwrap_or_else(|e| panic!("WebDriver answer {payload:?}: {e}"));
        (status, parsed["value"].clone())
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    pub fn goto(&self, url: &str) {
        self.call(
            "POST",
            &self.session_path("/url"),
            Some(json!({ "url": url })),
        );
    }

    pub fn url(&self) -> String {
        self.call("GET", &self.session_path("/url"), None)
            .as_str()
            .unwrap()
            .to_string()
    }

    pub fn title(&self) -> String {
        self.call("GET", &self.session_path("/title"), None)
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The first element matching `css`, if any.
    pub fn find(&self, css: &str) -> Option<Element> {
        let (status, value) = self.request(
            "POST",
            &self.session_path("/element"),
            Some(json!({"using": "css selector", "value": css})),
        );
        if status >= 300 {
            return None;
        }
        Some(Element(value[ELEMENT_KEY].as_str()?.to_string()))
    }

    /// Every element matching `css`.
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        self.call(
            "POST",
            &self.session_path("/elements"),
            Some(json!({"using": "css selector", "value": css})),
        )
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| Some(Element(v[ELEMENT_KEY].as_str()?.to_string())))
        .collect()
    }

    /// Waits until an element matches `css`.
    #[track_caller]
    pub fn wait_for(&self, css: &str) -> Element {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(e) = self.find(css) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no {css} on {} after {WAIT:?}",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `check` holds, with `what` in the failure message.
    #[track_caller]
    pub fn wait_until(&self, what: &str, mut check: impl FnMut(&Browser) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !check(self) {
            assert!(
                Instant::now() < deadline,
                "{what}: not true after {WAIT:?} (at {})",
                self.url()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn text(&self, e: &Element) -> String {
        self.call(
            "GET",
            &self.session_path(&format!("/element/{}/text", e.0)),
            None,
        )
        .as_str()
        .unwrap_or("")
        .to_string()
    }

    pub fn attribute(&self, e: &Element, name: &str) -> Option<String> {
        self.call(
            "GET",
            &self.session_path(&format!("/element/{}/attribute/{name}", e.0)),
            None,
        )
        .as_str()
        .map(str::to_string)
    }

    pub fn displayed(&self, e: &Element) -> bool {
        self.call(
            "GET",
            &self.session_path(&format!("/element/{}/displayed", e.0)),
            None,
        )
        .as_bool()
        .unwrap_or(false)
    }

    pub fn click(&self, e: &Element) {
        self.call(
            "POST",
            &self.session_path(&format!("/element/{}/click", e.0)),
            Some(json!({})),
        );
    }

    pub fn clear(&self, e: &Element) {
        self.call(
            "POST",
            &self.session_path(&format!("/element/{}/clear", e.0)),
            Some(json!({})),
        );
    }

    /// Types `text` into the element (`\u{E007}` is Enter).
    pub fn type_into(&self, e: &Element, text: &str) {
        self.call(
            "POST",
            &self.session_path(&format!("/element/{}/value", e.0)),
            Some(json!({ "text": text })),
        );
    }

    /// Presses and releases each key of `text` in turn (`\u{E004}` is Tab, `\u{E007}` Enter),
    /// sent to whatever has the focus, as a keyboard would.
    pub fn keys(&self, text: &str) {
        let mut actions = Vec::new();
        for c in text.chars() {
            actions.push(json!({"type": "keyDown", "value": c.to_string()}));
            actions.push(json!({"type": "keyUp", "value": c.to_string()}));
        }
        self.call(
            "POST",
            &self.session_path("/actions"),
            Some(json!({"actions": [{"type": "key", "id": "keyboard", "actions": actions}]})),
        );
    }

    /// Runs `script` in the page and returns its value.
    pub fn execute(&self, script: &str) -> Value {
        self.call(
            "POST",
            &self.session_path("/execute/sync"),
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Types `text` as key presses into whatever has the focus (WebDriver actions: real key
    /// events, for widgets such as xterm.js whose input element is hidden). `\u{E007}` is Enter.
    pub fn type_keys(&self, text: &str) {
        let mut actions = Vec::new();
        for c in text.chars() {
            let key = c.to_string();
            actions.push(json!({ "type": "keyDown", "value": key }));
            actions.push(json!({ "type": "keyUp", "value": key }));
        }
        self.call(
            "POST",
            &self.session_path("/actions"),
            Some(json!({ "actions": [{ "type": "key", "id": "keyboard", "actions": actions }] })),
        );
    }

    /// The cookies the browser holds for the current page (HttpOnly ones included).
    pub fn cookies(&self) -> Vec<Value> {
        self.call("GET", &self.session_path("/cookie"), None)
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn delete_cookies(&self) {
        self.call("DELETE", &self.session_path("/cookie"), None);
    }

    /// Saves a PNG of the viewport to `path`.
    pub fn screenshot(&self, path: &Path) {
        let b64 = self.call("GET", &self.session_path("/screenshot"), None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.request("DELETE", &self.session_path(""), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}
