// Recording playback on /web/recordings/ID: xterm.js fed the asciicast v2 events, with
// play/pause, seek and speed. Loaded with `defer` after xterm.js (the CSP allows no inline
// script). The recording comes from GET /webapi/recordings/ID/cast?offset=N in ranges.
//
// Timeline: pauses longer than MAX_PAUSE seconds are shortened to it (as `jaunt play` does), so
// positions and the duration shown are of that timeline. Seeking back resets the terminal and
// replays the output up to the new position at once.
"use strict";
(function () {
  var root = document.getElementById("player");
  if (!root || typeof Terminal === "undefined") return;
  var MAX_PAUSE = 2;

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

  var castUrl = root.getAttribute("data-cast");
  var size = Number(root.getAttribute("data-size")) || 0;
  var lineMode = root.getAttribute("data-convert-eol") === "true";
  var playButton = document.getElementById("play");
  var seek = document.getElementById("seek");
  var clock = document.getElementById("clock");
  var speedSelect = document.getElementById("speed");
  var status = document.getElementById("player-status");

  var term = new Terminal({
    cols: Number(root.getAttribute("data-cols")) || 80,
    rows: Number(root.getAttribute("data-rows")) || 24,
    convertEol: lineMode,
    disableStdin: true,
    cursorBlink: false,
    scrollback: 5000,
  });
  term.open(document.getElementById("screen"));

  // Events: parallel arrays of time (shortened timeline), code and data.
  var times = [];
  var codes = [];
  var datas = [];
  var duration = 0;
  var next = 0; // index of the first event not yet applied
  var position = 0; // seconds on the timeline
  var playing = false;
  var lastTick = 0;
  var timer = null;

  // Writes are applied in order: a resize waits for the writes before it.
  var queue = [];
  var busy = false;
  function pump() {
    if (busy) return;
    var op = queue.shift();
    if (!op) return;
    busy = true;
    var done = function () {
      busy = false;
      pump();
    };
    if (op.reset) {
      term.reset();
      done();
    } else if (op.call) {
      op.call();
      done();
    } else if (op.resize) {
      term.resize(op.resize[0], op.resize[1]);
      done();
    } else {
      term.write(op.write, done);
    }
  }

  function setState(state) {
    root.setAttribute("data-state", state);
    playButton.textContent = state === "playing" ? "Pause" : "Play";
    playButton.setAttribute("aria-pressed", state === "playing" ? "true" : "false");
  }

  function fmt(seconds) {
    var s = Math.floor(seconds);
    var m = Math.floor(s / 60);
    s = s % 60;
    return m + ":" + (s < 10 ? "0" : "") + s;
  }

  function showPosition() {
    seek.value = String(duration > 0 ? Math.min(position, duration) : 0);
    clock.textContent = fmt(position) + " / " + fmt(duration);
    root.setAttribute("data-position", position.toFixed(3));
  }

  // Queues the events up to `until` (inclusive), coalescing output between resizes.
  function applyUntil(until) {
    var text = "";
    while (next < times.length && times[next] <= until) {
      var code = codes[next];
      if (code === "o") {
        text += datas[next];
      } else if (code === "r") {
        var m = /^(\d+)x(\d+)$/.exec(datas[next]);
        if (m) {
          if (text) queue.push({ write: text });
          text = "";
          queue.push({ resize: [Math.max(2, Number(m[1])), Math.max(1, Number(m[2]))] });
        }
      }
      next++;
    }
    if (text) queue.push({ write: text });
    pump();
  }

  function seekTo(target) {
    target = Math.max(0, Math.min(duration, target));
    if (target < position || target === 0) {
      queue = [{ reset: true }];
      next = 0;
    }
    position = target;
    applyUntil(position);
    showPosition();
  }

  function tick() {
    var now = performance.now();
    position += ((now - lastTick) / 1000) * Number(speedSelect.value || 1);
    lastTick = now;
    if (position >= duration) {
      position = duration;
      applyUntil(position);
      pause();
      // "ended" once the last output is in the terminal, not when it was queued.
      queue.push({ call: function () { setState("ended"); } });
      pump();
    } else {
      applyUntil(position);
    }
    showPosition();
  }

  function play() {
    if (!times.length && duration === 0) {
      seekTo(0);
      applyUntil(Infinity);
      setState("ended");
      return;
    }
    if (position >= duration) seekTo(0);
    playing = true;
    lastTick = performance.now();
    timer = window.setInterval(tick, 40);
    setState("playing");
  }

  function pause() {
    playing = false;
    if (timer !== null) window.clearInterval(timer);
    timer = null;
    setState("paused");
  }

  function parse(text) {
    var lines = text.split("\n");
    var last = 0;
    var skipped = 0;
    var bad = 0;
    for (var i = 1; i < lines.length; i++) {
      var line = lines[i];
      if (!line.trim()) continue;
      var event;
      try {
        event = JSON.parse(line);
      } catch (e) {
        bad++;
        continue;
      }
      if (!Array.isArray(event) || event.length < 3 || typeof event[0] !== "number") {
        bad++;
        continue;
      }
      var gap = Math.max(0, event[0] - last);
      if (gap > MAX_PAUSE) skipped += gap - MAX_PAUSE;
      last = Math.max(last, event[0]);
      times.push(Math.max(0, event[0] - skipped));
      codes.push(String(event[1]));
      datas.push(String(event[2]));
    }
    duration = times.length ? times[times.length - 1] : 0;
    return bad;
  }

  // Fetches the whole .cast in ranges (the server answers at most a few MiB a call).
  function load() {
    var chunks = [];
    var offset = 0;
    var step = function () {
      if (offset >= size) return Promise.resolve();
      return fetch(castUrl + "?offset=" + offset, { credentials: "same-origin" }).then(function (response) {
        if (!response.ok) {
          return response.json().then(
            function (b) {
              throw new Error((b && b.error) || "HTTP " + response.status);
            },
            function () {
              throw new Error("HTTP " + response.status);
            }
          );
        }
        return response.arrayBuffer().then(function (buffer) {
          if (buffer.byteLength === 0) throw new Error("the recording ended early");
          chunks.push(new Uint8Array(buffer));
          offset += buffer.byteLength;
          status.textContent = "Loading… " + Math.floor((100 * offset) / Math.max(1, size)) + "%";
          return step();
        });
      });
    };
    setState("loading");
    step()
      .then(function () {
        var all = new Uint8Array(offset);
        var at = 0;
        chunks.forEach(function (c) {
          all.set(c, at);
          at += c.length;
        });
        var bad = parse(new TextDecoder("utf-8").decode(all));
        seek.max = String(duration);
        seek.disabled = false;
        playButton.disabled = false;
        speedSelect.disabled = false;
        status.textContent = bad ? bad + " unreadable event line(s) skipped" : "";
        showPosition();
        setState("ready");
        if (root.getAttribute("data-autoplay") === "true") play();
      })
      .catch(function (e) {
        status.textContent = "Cannot load the recording: " + e.message;
        status.classList.add("error");
        setState("failed");
      });
  }

  playButton.addEventListener("click", function () {
    if (playing) pause();
    else play();
  });
  seek.addEventListener("input", function () {
    // The range snaps to its step (0.01 s): its top means the end.
    var to = Number(seek.value);
    seekTo(to >= Number(seek.max) - 0.011 ? duration : to);
  });
  speedSelect.addEventListener("change", function () {
    lastTick = performance.now();
  });
  document.getElementById("screen").addEventListener("keydown", function (event) {
    if (event.key === " ") {
      event.preventDefault();
      playButton.click();
    }
  });
  load();
})();
