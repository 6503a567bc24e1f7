// The web terminal on /web/terminal/NODE/LOGIN: xterm.js over the engine's WebSocket. Loaded
// with `defer` after xterm.js (the CSP allows no inline script).
//
// 1. POST data-ticket (with the page's CSRF token) for a one-time ticket.
// 2. Open the WebSocket at data-ws on this host and send {"ticket": T} as the first message
//    (nothing secret is ever in the URL; the session cookie is HttpOnly).
// 3. Text messages are notices ({"type":"ready"} or {"type":"refused","message":...}); binary
//    messages are terminal output. We send binary messages: [0] + UTF-8 input, or
//    [1, cols u16 BE, rows u16 BE] when the terminal's size changes.
//
// The size follows the window: columns and rows are computed from the element's size and
// xterm.js's cell size (no fit addon), on load and on every resize of the element.
//
// With data-readonly (an observer on /web/sessions/ID/join) nothing is ever sent after the
// ticket: no input, no size (the watched session's PTY keeps its own).
//
// When the WebSocket closes, the page says so, with the close frame's reason when there is one
// (who ended the session, or that the watched session ended).
"use strict";
(function () {
  var root = document.getElementById("terminal");
  if (!root || typeof Terminal === "undefined") return;

  // xterm.js creates <style> elements; the page's CSP admits them by this response's nonce.
  var nonceMeta = document.querySelector('meta[name="style-nonce"]');
  var nonce = nonceMeta ? nonceMeta.getAttribute("content") : "";
  if (nonce) {
    var create = Document.prototype.createElement;
    Document.prototype.createElement = function () {
      var element = create.apply(this, arguments);
      if (element.tagName === "STYLE") {
        element.nonce = nonce;
        element.setAttribute("nonce", nonce);
      }
      return element;
    };
  }

  var MAX_MESSAGE = 16 * 1024 - 1; // input bytes per message (the engine's bound less the type)
  var MAX_CELLS = 1000;
  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";
  var status = document.getElementById("terminal-status");
  var screen = document.getElementById("term-screen");
  var target = root.getAttribute("data-login") + "@" + root.getAttribute("data-node");
  var readOnly = root.getAttribute("data-readonly") === "true";
  var watchedUser = root.getAttribute("data-user") || "";
  var encoder = new TextEncoder();

  var term = new Terminal({
    cursorBlink: !readOnly,
    disableStdin: readOnly,
    scrollback: 5000,
    fontSize: 14,
  });
  term.open(screen);

  var ws = null;
  var ready = false;
  var refused = false;

  function setState(state, text) {
    root.setAttribute("data-state", state);
    status.textContent = text;
  }

  function send(bytes) {
    if (readOnly) return;
    if (ws && ready && ws.readyState === WebSocket.OPEN) ws.send(bytes);
  }

  function sendSize() {
    var b = new Uint8Array(5);
    b[0] = 1;
    b[1] = term.cols >> 8;
    b[2] = term.cols & 255;
    b[3] = term.rows >> 8;
    b[4] = term.rows & 255;
    send(b);
  }

  // One cell's size in CSS pixels: xterm.js's own measure when it has one, else a probe.
  function cellSize() {
    try {
      var cell = term._core._renderService.dimensions.css.cell;
      if (cell.width > 0 && cell.height > 0) return cell;
    } catch (e) {
      // fall through
    }
    var probe = document.createElement("span");
    probe.textContent = "WWWWWWWWWW";
    probe.style.position = "absolute";
    probe.style.visibility = "hidden";
    probe.style.fontFamily = term.options.fontFamily;
    probe.style.fontSize = term.options.fontSize + "px";
    probe.style.lineHeight = "normal";
    screen.appendChild(probe);
    var rect = probe.getBoundingClientRect();
    screen.removeChild(probe);
    return { width: rect.width / 10 || 9, height: rect.height || 17 };
  }

  function fit() {
    var cell = cellSize();
    var box = screen.getBoundingClientRect();
    var style = window.getComputedStyle(screen);
    var width = box.width - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    var height = box.height - parseFloat(style.paddingTop) - parseFloat(style.paddingBottom);
    var cols = Math.max(2, Math.min(MAX_CELLS, Math.floor(width / cell.width)));
    var rows = Math.max(1, Math.min(MAX_CELLS, Math.floor(height / cell.height)));
    if (cols !== term.cols || rows !== term.rows) {
      term.resize(cols, rows);
      sendSize();
    }
    root.setAttribute("data-cols", String(term.cols));
    root.setAttribute("data-rows", String(term.rows));
  }

  fit();
  // The first render measures the real cell size (the probe above is an estimate).
  term.onRender(fit);
  if (typeof ResizeObserver !== "undefined") {
    new ResizeObserver(fit).observe(screen);
  } else {
    window.addEventListener("resize", fit);
  }

  function input(data) {
    var bytes = typeof data === "string" ? encoder.encode(data) : data;
    for (var at = 0; at < bytes.length; at += MAX_MESSAGE) {
      var part = bytes.subarray(at, Math.min(bytes.length, at + MAX_MESSAGE));
      var message = new Uint8Array(part.length + 1);
      message[0] = 0;
      message.set(part, 1);
      send(message);
    }
  }
  term.onData(input);
  term.onBinary(function (data) {
    var bytes = new Uint8Array(data.length);
    for (var i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 255;
    input(bytes);
  });

  function fail(state, text) {
    refused = true;
    setState(state, text);
    term.options.disableStdin = true;
  }

  function connect(ticket) {
    ws = new WebSocket("wss://" + window.location.host + root.getAttribute("data-ws"));
    ws.binaryType = "arraybuffer";
    ws.onopen = function () {
      ws.send(JSON.stringify({ ticket: ticket }));
    };
    ws.onmessage = function (event) {
      if (typeof event.data !== "string") {
        term.write(new Uint8Array(event.data));
        return;
      }
      var notice;
      try {
        notice = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      if (notice.type === "ready") {
        ready = true;
        root.setAttribute("data-session", notice.session_id || "");
        if (readOnly) {
          setState("open", "Watching " + watchedUser + "'s session on " + target + " (read-only).");
        } else {
          setState("open", "Connected to " + target + ".");
          sendSize();
        }
        term.focus();
      } else if (notice.type === "refused") {
        fail("refused", notice.message || "The terminal was refused.");
      }
    };
    ws.onclose = function (event) {
      ready = false;
      if (!refused) {
        // A reason is given when the session was ended from outside (a kill, a lock): for an
        // observer, that is its own view that ended, not the watched session.
        var why = event && event.reason ? event.reason : "";
        var what;
        if (readOnly) {
          what = why
            ? "Stopped watching " + watchedUser + "'s session on " + target + ": " + why
            : "The session of " + watchedUser + " on " + target + " ended";
        } else {
          what = "The session to " + target + " ended" + (why ? ": " + why : "");
        }
        setState("closed", what + ".");
        root.setAttribute("data-close-code", String(event ? event.code : ""));
        root.setAttribute("data-close-reason", why);
        term.options.disableStdin = true;
      }
    };
    ws.onerror = function () {
      if (!refused && !ready) fail("failed", "Cannot reach the terminal service.");
    };
  }

  fetch(root.getAttribute("data-ticket"), {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: "{}",
  })
    .then(function (response) {
      return response.json().then(function (body) {
        if (!response.ok || !body.ticket) {
          throw new Error(body.error || "the terminal ticket was refused (" + response.status + ")");
        }
        return body.ticket;
      });
    })
    .then(connect)
    .catch(function (e) {
      fail("failed", String(e.message || e));
    });
})();
