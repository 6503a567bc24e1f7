// Jaunt web UI behaviour. Loaded with `defer` from /web/assets/ (the CSP allows no inline
// script). State-changing requests carry the page's CSRF token in X-CSRF-Token.
"use strict";
(function () {
  function csrf() {
    var meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.getAttribute("content") : "";
  }

  function post(url, body) {
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
      body: JSON.stringify(body || {}),
    });
  }

  // Log in: POST the form as JSON, then go where the page says.
  var form = document.getElementById("login-form");
  if (form) {
    var error = document.getElementById("login-error");
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      error.hidden = true;
      var otp = document.getElementById("otp");
      var body = {
        user: document.getElementById("user").value,
        password: document.getElementById("password").value,
      };
      if (otp) body.otp = otp.value;
      var button = form.querySelector("button");
      button.disabled = true;
      post("/webapi/login", body)
        .then(function (response) {
          if (response.ok) {
            window.location.assign(form.getAttribute("data-next") || "/web/");
            return;
          }
          return response.json().then(function (b) {
            error.textContent = (b && b.error) || "login failed (" + response.status + ")";
            error.hidden = false;
          });
        })
        .catch(function () {
          error.textContent = "cannot reach the server";
          error.hidden = false;
        })
        .finally(function () {
          button.disabled = false;
        });
    });
  }

  // Log out: the server deletes the session; then back to the login page.
  var logout = document.getElementById("logout");
  if (logout) {
    logout.addEventListener("click", function () {
      post("/webapi/logout").finally(function () {
        window.location.assign("/web/login");
      });
    });
  }

  // The resource filter: every word must match the row's kind, name or a label
  // (`key=value` words match labels exactly).
  // A long list comes with its first rows laid out and the rest in <template
  // id="more-resources">: they are moved in (hidden) the first time the filter or "Show all"
  // needs them, and then at most `first` matches show until "Show all".
  var filter = document.getElementById("filter");
  if (filter) {
    var rows = Array.prototype.slice.call(document.querySelectorAll("tr.resource"));
    var none = document.getElementById("no-match");
    var table = document.getElementById("resources");
    var more = document.getElementById("more-resources");
    var partial = document.getElementById("partial");
    var partialCount = document.getElementById("partial-count");
    var showAll = document.getElementById("show-all");
    var total = table ? parseInt(table.getAttribute("data-total"), 10) || rows.length : 0;
    var first = table ? parseInt(table.getAttribute("data-first"), 10) || total : 0;
    var everything = false;
    var expand = function () {
      if (!more) return;
      var extra = Array.prototype.slice.call(more.content.querySelectorAll("tr.resource"));
      extra.forEach(function (row) {
        row.hidden = true;
      });
      more.parentNode.appendChild(more.content);
      more.parentNode.removeChild(more);
      more = null;
      rows = rows.concat(extra);
    };
    var apply = function () {
      var words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
      if (words.length || everything) expand();
      var matched = 0;
      var shown = 0;
      rows.forEach(function (row) {
        var text = row.getAttribute("data-search") || "";
        var terms = text.split(" ");
        var ok = words.every(function (w) {
          return w.indexOf("=") > 0 ? terms.indexOf(w) >= 0 : text.indexOf(w) >= 0;
        });
        if (ok) matched++;
        var show = ok && (everything || shown < first);
        row.hidden = !show;
        if (show) shown++;
      });
      // Not moved in yet (no filter): everything matches.
      if (more) matched = total;
      if (none) none.hidden = matched > 0 || total === 0;
      if (partial) {
        partial.hidden = shown >= matched;
        partialCount.textContent =
          "Showing " + shown + " of " + matched + (words.length ? " matches" : "") +
          "; the filter searches all.";
      }
    };
    if (showAll) {
      showAll.addEventListener("click", function () {
        everything = true;
        apply();
      });
    }
    filter.addEventListener("input", apply);
    if (filter.value) apply();
  }

  // Live sessions: End posts to the server, then the list is reloaded.
  Array.prototype.forEach.call(document.querySelectorAll("button.end-session"), function (button) {
    button.addEventListener("click", function () {
      var id = button.getAttribute("data-id");
      var error = document.getElementById("session-error");
      button.disabled = true;
      post("/webapi/sessions/" + encodeURIComponent(id) + "/end").then(function (response) {
        if (response.ok) {
          window.location.reload();
          return;
        }
        return response.json().then(function (b) {
          error.textContent = (b && b.error) || "cannot end the session (" + response.status + ")";
          error.hidden = false;
          button.disabled = false;
        });
      });
    });
  });

  // The login picker: the Connect link follows the chosen login (one listener for all rows,
  // also those moved in later; on load for pickers a back navigation restored).
  var pick = function (select) {
    var link = select.parentNode.querySelector("a.ssh");
    if (!link) return;
    link.href = "/web/terminal/" + encodeURIComponent(select.getAttribute("data-node")) + "/" +
      encodeURIComponent(select.value);
  };
  document.addEventListener("change", function (event) {
    var target = event.target;
    if (target && target.classList && target.classList.contains("login-picker")) pick(target);
  });
  Array.prototype.forEach.call(document.querySelectorAll("select.login-picker"), pick);
})();
