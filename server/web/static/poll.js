// Refreshes the page's live part every few seconds (data-refresh on <body>) by fetching the page again and swapping
// <main id="live">; the search box keeps what is being typed. Without JavaScript, a <meta refresh> does the same.
(function () {
  "use strict";
  var every = (Number(document.body.dataset.refresh) || 10) * 1000;
  if (!window.fetch || !window.DOMParser) { return; }
  function tick() {
    fetch(location.href, { cache: "no-store", credentials: "same-origin" })
      .then(function (r) {
        document.body.classList.toggle("stale", !r.ok);
        return r.text();
      })
      .then(function (text) {
        var next = new DOMParser().parseFromString(text, "text/html").getElementById("live");
        var live = document.getElementById("live");
        if (next && live) { live.replaceWith(document.importNode(next, true)); }
      })
      .catch(function () { document.body.classList.add("stale"); })
      .finally(function () { setTimeout(tick, every); });
  }
  setTimeout(tick, every);
})();
