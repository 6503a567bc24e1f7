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
  var filter = document.getElementById("filter");
  if (filter) {
    var rows = Array.prototype.slice.call(document.querySelectorAll("tr.resource"));
    var none = document.getElementById("no-match");
    var apply = function () {
      var words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
      var shown = 0;
      rows.forEach(function (row) {
        var text = row.getAttribute("data-search") || "";
        var terms = text.split(" ");
        var ok = words.every(function (w) {
          return w.indexOf("=") > 0 ? terms.indexOf(w) >= 0 : text.indexOf(w) >= 0;
        });
        row.hidden = !ok;
        if (ok) shown++;
      });
      if (none) none.hidden = shown > 0 || rows.length === 0;
    };
    filter.addEventListener("input", apply);
    apply();
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

  // The login picker: the Connect link follows the chosen login.
  Array.prototype.forEach.call(document.querySelectorAll("select.login-picker"), function (select) {
    var link = select.parentNode.querySelector("a.ssh");
    var update = function () {
      link.href = "/web/terminal/" + encodeURIComponent(select.getAttribute("data-node")) + "/" +
        encodeURIComponent(select.value);
    };
    select.addEventListener("change", update);
    update();
  });
})();
