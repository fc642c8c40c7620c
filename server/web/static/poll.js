// Refreshes the page's live part every few seconds (data-refresh on <body>) by fetching the page again and swapping
// <main id="live">; the search box keeps what is being typed. A failed refresh keeps the old figures and says so.
// Without JavaScript, a <meta refresh> inside <noscript> reloads the whole page instead.
(function () {
  "use strict";
  var every = (Number(document.body.dataset.refresh) || 10) * 1000;
  if (!window.fetch || !window.DOMParser) { return; }
  function tick() {
    if (document.hidden) { setTimeout(tick, every); return; } // a background tab does not poll
    fetch(location.href, { cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); } // the store is down, or the sign-in expired
        return r.text();
      })
      .then(function (text) {
        var next = new DOMParser().parseFromString(text, "text/html").getElementById("live");
        var live = document.getElementById("live");
        if (!next || !live) { throw new Error("no live part"); }
        live.replaceWith(document.importNode(next, true));
        document.body.classList.remove("stale");
      })
      .catch(function () { document.body.classList.add("stale"); })
      .finally(function () { setTimeout(tick, every); });
  }
  setTimeout(tick, every);
})();
