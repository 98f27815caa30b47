// setpoint dashboard: live updates without a reload. The server says (server-sent events on
// /stream) when something this page shows has changed; we fetch the page's live part again
// and swap it in. Without this script the pages refresh themselves (<noscript> meta refresh).
(function () {
  "use strict";
  var body = document.body;
  var page = body.dataset.page;
  if (!page || page === "login" || !window.EventSource || !window.fetch) {
    return;
  }
  var indicator = document.getElementById("live-indicator");
  var url = "/stream?page=" + encodeURIComponent(page);
  if (body.dataset.device) {
    url += "&device=" + encodeURIComponent(body.dataset.device);
  }
  var busy = false;
  var again = false;

  function say(text) {
    if (indicator) {
      indicator.textContent = text;
    }
  }

  function refresh() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    fetch(window.location.href, {
      headers: { "X-Setpoint-Fragment": "1" },
      credentials: "same-origin",
      cache: "no-store",
    })
      .then(function (response) {
        if (!response.ok) {
          throw new Error("HTTP " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
        var live = document.getElementById("live");
        if (fresh && live) {
          live.replaceWith(document.importNode(fresh, true));
          body.dataset.updated = String(Date.now());
        }
        say("live");
      })
      .catch(function (error) {
        say("update failed (" + error.message + "), retrying");
      })
      .finally(function () {
        busy = false;
        if (again) {
          again = false;
          refresh();
        }
      });
  }

  var source = new EventSource(url);
  source.addEventListener("change", refresh);
  source.onopen = function () {
    say("live");
    refresh(); // catch up on whatever changed while we were not listening
  };
  source.onerror = function () {
    say("reconnecting…");
  };
})();
