/* coretask dashboard: confirmation of destructive actions, and live numbers.
   The page names a JSON twin in <body data-live>; every data-interval ms this script fetches it
   and writes what moved: data-text="key" gets the text, <progress data-bar="key"> its value and
   max, data-if="key" / data-unless="key" are shown while the flag is true / false, and
   <svg data-chart="name"> bar charts are redrawn from "charts" (rows of [processed, failed]). */
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

  function redraw(name, rows) {
    var svg = document.querySelector('svg[data-chart="' + CSS.escape(name) + '"]');
    if (!svg) {
      return;
    }
    var height = parseFloat(svg.getAttribute("data-h"));
    var top = 1;
    rows.forEach(function (row) { top = Math.max(top, row[0]); });
    each("data-chart-max", name, function (el) { el.textContent = String(top); });
    var rects = svg.querySelectorAll("rect[data-i]");
    for (var i = 0; i < rects.length; i++) {
      var row = rows[+rects[i].getAttribute("data-i")];
      if (!row) {
        continue;
      }
      var h = (rects[i].getAttribute("class") === "f" ? row[1] : row[0]) / top * (height - 2);
      rects[i].setAttribute("height", h.toFixed(1));
      rects[i].setAttribute("y", (height - h).toFixed(1));
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
    Object.keys(data.charts || {}).forEach(function (name) { redraw(name, data.charts[name]); });
    Object.keys(data.flags || {}).forEach(function (key) {
      var on = !!data.flags[key];
      each("data-if", key, function (el) { el.hidden = !on; });
      each("data-unless", key, function (el) { el.hidden = on; });
    });
  }

  // The page's object is gone (a task finished and not kept, a batch past its retention): say
  // so above what the page last showed, and stop updating it.
  function gone() {
    var note = document.createElement("p");
    note.className = "flash coretask-error";
    note.id = "gone";
    note.setAttribute("role", "status");
    note.textContent = "This is no longer kept (it finished, or was deleted): what follows is its last " +
      "state. Reload the page for the current view.";
    var main = document.querySelector("main");
    main.insertBefore(note, main.firstChild);
    document.querySelectorAll(".live-dot").forEach(function (el) { el.hidden = true; });
    document.body.setAttribute("data-gone", "1");
  }

  function tick() {
    var stop = false;
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (response.status === 404) {
          stop = true;
          gone();
        }
        return response.ok ? response.json() : null;
      })
      .then(function (data) {
        if (data) {
          apply(data);
          document.body.setAttribute("data-updated", String(Date.now()));
        }
      })
      .catch(function () { /* the next tick tries again */ })
      .then(function () { if (!stop) { window.setTimeout(tick, every); } });
  }
  window.setTimeout(tick, every);
})();
