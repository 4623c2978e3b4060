// Keyboard shortcuts and timing for the labelling pages. No inline script anywhere: the CSP forbids it.
"use strict";
(function () {
  const form = document.getElementById("judge");
  if (!form) return;
  const started = performance.now();
  const strengths = { z: "negligible", x: "slightly_better", c: "better", v: "significantly_better" };
  const ranked = []; // ranking page: response numbers in the order pressed, best first

  function setRanks() {
    form.querySelectorAll("select.rank").forEach((sel) => {
      const pos = ranked.indexOf(sel.dataset.number);
      sel.value = pos >= 0 ? String(pos + 1) : "";
    });
  }

  form.addEventListener("submit", (event) => {
    const button = event.submitter;
    if (button && button.dataset.needsStrength && !form.querySelector("input[name=strength]:checked")) {
      event.preventDefault();
      document.getElementById("hint").hidden = false;
      return;
    }
    form.querySelector("input[name=time_spent_ms]").value = String(Math.round(performance.now() - started));
    form.querySelectorAll("button[type=submit]").forEach((b) => { b.disabled = false; });
  });

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target.matches("textarea, input[type=text], input[type=password], select")) return;
    const key = event.key.length === 1 ? event.key.toLowerCase() : event.key;
    if (form.dataset.mode === "pairwise" && strengths[key]) {
      form.querySelector(`input[name=strength][value=${strengths[key]}]`).checked = true;
      document.getElementById("hint").hidden = true;
      event.preventDefault();
      return;
    }
    if (form.dataset.mode === "ranking") {
      if (/^[1-9]$/.test(key) && form.querySelector(`section[data-number="${key}"]`)) {
        if (!ranked.includes(key)) ranked.push(key);
        setRanks();
        event.preventDefault();
        return;
      }
      if (key === "Backspace") { ranked.pop(); setRanks(); event.preventDefault(); return; }
    }
    const wanted = key === "Enter" ? "enter" : key;
    const button = form.querySelector(`button[data-key="${wanted}"]`);
    if (button) {
      event.preventDefault();
      form.requestSubmit(button);
    }
  });
})();
