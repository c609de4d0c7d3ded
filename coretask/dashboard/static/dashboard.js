/* coretask dashboard: confirmation of destructive actions, and live numbers.
   The page names a JSON twin in <body data-live>; every data-interval ms this script fetches it
   and writes what moved: data-text="key" gets the text, <progress data-bar="key"> its value and
   max, data-if="key" / data-unless="key" are shown while the flag is true / false. */
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
    }
  });

  var url = document.body.getAttribute("data-live");
  if (!url) {
    return;
  }
  var every = parseInt(document.body.getAttribute("data-interval"), 10) || 1500;

  function each(attr, key, fn) {
    var nodes = document.querySelectorAll("[" + attr + '="' + CSS.escape(key) + '"]');
    for (var i = 0; i < nodes.length; i++) {
      fn(nodes[i]);
    }
  }

  function apply(data) {
    Object.keys(data.text || {}).forEach(function (key) {
      each("data-text", key, function (el) {
        if (el.textContent !== data.text[key]) {
          el.textContent = data.text[key];
        }
      });
    });
    Object.keys(data.bars || {}).forEach(function (key) {
      var pair = data.bars[key];
      each("data-bar", key, function (el) {
        el.max = pair[1];
        el.value = pair[0];
      });
    });
    Object.keys(data.flags || {}).forEach(function (key) {
      var on = !!data.flags[key];
      each("data-if", key, function (el) { el.hidden = !on; });
      each("data-unless", key, function (el) { el.hidden = on; });
    });
  }

  function tick() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (data) {
        if (data) {
          apply(data);
          document.body.setAttribute("data-updated", String(Date.now()));
        }
      })
      .catch(function () { /* the next tick tries again */ })
      .then(function () { window.setTimeout(tick, every); });
  }
  window.setTimeout(tick, every);
})();
