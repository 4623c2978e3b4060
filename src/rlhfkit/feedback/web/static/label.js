// Keyboard shortcuts and timing for the labelling pages. No inline script anywhere: the CSP forbids it.
"use strict";
(function () {
  const form = document.getElementById("judge");
  if (!form) return;
  const started = performance.now();
  const strengths = { z: "negligible", x: "slightly_better", c: "better", v: "significantly_better" };
  const ranked = []; // ranking page: response numbers in the order pressed, best first
  // rubric and attribute pages: one row (.cell) per criterion, or per (response, attribute); the keys answer the
  // highlighted row and move on, so a whole item is labelled without the mouse
  const cells = Array.from(form.querySelectorAll(".cell"));
  const verdictKeys = { "1": "1", "2": "2", "3": "3", t: "3", "4": "4", b: "4" }; // key -> option data-key
  let current = 0;

  function highlight() {
    cells.forEach((cell, i) => cell.classList.toggle("current", i === current));
    if (cells[current]) cells[current].scrollIntoView({ block: "nearest" });
  }

  function move(step) {
    current = Math.max(0, Math.min(cells.length - 1, current + step));
    highlight();
  }

  function hint(text) {
    const el = document.getElementById("hint");
    el.textContent = text;
    el.hidden = !text;
  }

  function answer(optionKey) {
    const select = cells[current].querySelector("select.answer");
    const option = select.querySelector(`option[data-key="${optionKey}"]`);
    if (!option) return false;
    select.value = option.value;
    clearStrengthIfUndirected(cells[current]);
    hint("");
    if (current < cells.length - 1) move(1);
    return true;
  }

  function clearStrengthIfUndirected(cell) {
    // a tie or "both bad" says which is better on nothing, so it takes no strength (the server refuses one)
    const strength = cell.querySelector("select.answer-strength");
    const value = cell.querySelector("select.answer").value;
    if (strength && (value === "tie" || value === "both_bad")) strength.value = "";
  }

  cells.forEach((cell, i) => {
    cell.addEventListener("focusin", () => { current = i; highlight(); });
    cell.querySelector("select.answer").addEventListener("change", () => clearStrengthIfUndirected(cell));
  });
  if (cells.length) highlight();

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
    if (cells.length && !(button && button.value === "skip")) {
      const open = cells.findIndex((cell) => !cell.querySelector("select.answer").value);
      if (open >= 0) {
        event.preventDefault();
        const missing = cells.filter((cell) => !cell.querySelector("select.answer").value);
        hint(`Answer every row first (or skip): ${missing.map((cell) => cell.dataset.label).join(", ")}.`);
        current = open;
        highlight();
        return;
      }
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
    if (form.dataset.mode === "rubric" || form.dataset.mode === "attributes") {
      if (key === "ArrowDown" || key === "ArrowUp") { move(key === "ArrowDown" ? 1 : -1); event.preventDefault(); return; }
      if (form.dataset.mode === "rubric" && strengths[key]) {
        cells[current].querySelector("select.answer-strength").value = strengths[key];
        event.preventDefault();
        return;
      }
      const optionKey = form.dataset.mode === "rubric" ? verdictKeys[key] : key;
      if (optionKey && /^[0-9]$/.test(optionKey) && answer(optionKey)) { event.preventDefault(); return; }
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
