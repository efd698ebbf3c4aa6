// The two-column page: each line on the left is one text; its translation goes on the same line
// on the right. Translates on the button and, debounced, while typing. No libraries, no network
// beyond this server: it works offline.
"use strict";

const DEBOUNCE_MS = 400;  // wait this long after the last keystroke before translating
let maxLines = 32;        // texts per request: the service's limit, read from /readyz below

const source = document.getElementById("source");
const target = document.getElementById("target");
const statusLine = document.getElementById("status");
const notesList = document.getElementById("notes");
let timer = null;
let latest = 0;  // sequence number of the newest request: older answers are ignored

function showStatus(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "muted";
}

function showNotes(lines, notes) {
  notesList.replaceChildren();
  notes.forEach((list, i) => list.forEach((note) => {
    const item = document.createElement("li");
    item.textContent = `line ${i + 1}: ${note}`;
    notesList.appendChild(item);
  }));
}

async function translate() {
  const all = source.value.split("\n");
  const lines = all.slice(0, maxLines);
  if (!source.value.trim()) { target.value = ""; showStatus("", false); notesList.replaceChildren(); return; }
  const seq = ++latest;
  const started = performance.now();
  showStatus("translating…", false);
  try {
    const response = await fetch("/v1/translate", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({texts: lines, beams: 1}),
    });
    const body = await response.json();
    if (seq !== latest) return;
    if (!response.ok) { showStatus(`error ${response.status}: ${JSON.stringify(body.detail)}`, true); return; }
    target.value = body.translations.join("\n");
    const ms = performance.now() - started;
    const cached = body.cached.filter(Boolean).length;
    showStatus(`${ms.toFixed(0)} ms in the browser, ${body.timings_ms.total.toFixed(0)} ms in the server` +
               (cached ? `, ${cached} from cache` : "") +
               (all.length > lines.length ? `; only the first ${lines.length} lines (the service's limit)` : ""), false);
    showNotes(lines, body.notes);
  } catch (err) {
    if (seq === latest) showStatus(`error: ${err}`, true);
  }
}

source.addEventListener("input", () => {
  if (!document.getElementById("live").checked) return;
  clearTimeout(timer);
  timer = setTimeout(translate, DEBOUNCE_MS);
});
document.getElementById("translate").addEventListener("click", () => { clearTimeout(timer); translate(); });
fetch("/readyz").then((r) => r.json()).then((b) => {
  document.getElementById("model").textContent = b.model ? `model: ${b.model}` : `model ${b.status}`;
  if (b.max_texts) maxLines = b.max_texts;
});
