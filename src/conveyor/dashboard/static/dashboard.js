// Keep a followed log scrolled to its end when new lines come in, unless the reader
// has scrolled up to read.
(function () {
  var pinned = true;
  document.addEventListener("scroll", function (e) {
    var el = e.target;
    if (el && el.classList && el.classList.contains("log")) {
      pinned = el.scrollTop + el.clientHeight >= el.scrollHeight - 8;
    }
  }, true);
  document.addEventListener("htmx:afterSwap", function () {
    var log = document.querySelector("#log-view pre.log");
    if (log && pinned) { log.scrollTop = log.scrollHeight; }
  });
})();
