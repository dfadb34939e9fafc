// tbps search page: no framework, no external assets.
// State lives in the address bar (?q=&k=&where=, and rescore=0 when re-scoring is switched off)
// so a result list can be shared; loading such a URL runs the search. The "Re-score" box shows
// only when /stats says the server can re-score (`tbps serve --rescore`); it starts checked. Auth: opening /?token=T makes the server set an HttpOnly cookie, so
// fetch() and <img> authenticate by themselves; we drop `token` from the address bar at once.
"use strict";

const $ = (id) => document.getElementById(id);
const els = {
  form: $("search-form"), q: $("q"), k: $("k"), where: $("where"), filtersBox: $("filters-box"),
  status: $("status"), error: $("error"), results: $("results"), empty: $("empty"),
  viewer: $("viewer"), vImg: $("viewer-img"), vTitle: $("viewer-title"), vScore: $("viewer-score"),
  vMeta: $("viewer-meta"), vOpen: $("viewer-open"), similar: $("similar"), file: $("image-file"),
  columnsHint: $("columns-hint"), gallerySize: $("gallery-size"), rescore: $("rescore"), rescoreBox: $("rescore-box"),
};
let canRescore = false;  // from /stats
let current = [];      // hits of the last search, in rank order
let shown = null;      // hit open in the viewer
let seq = 0;           // drops answers to superseded searches

function readUrl() {
  const p = new URLSearchParams(location.search);
  if (p.has("token")) {  // the cookie now holds it; never keep it in a shareable URL
    p.delete("token");
    history.replaceState(null, "", location.pathname + (p.toString() ? "?" + p : ""));
  }
  return { q: p.get("q") || "", k: p.get("k") || "", where: p.get("where") || "", rescore: p.get("rescore") !== "0" };
}

function writeUrl(state, push) {
  const p = new URLSearchParams();
  if (state.q) p.set("q", state.q);
  if (state.k) p.set("k", state.k);
  if (state.where) p.set("where", state.where);
  if (canRescore && !state.rescore) p.set("rescore", "0");
  const url = location.pathname + (p.toString() ? "?" + p : "");
  if (url !== location.pathname + location.search) history[push ? "pushState" : "replaceState"](null, "", url);
}

function applyState(state) {
  els.q.value = state.q;
  if (state.k) {
    if (![...els.k.options].some((o) => o.value === state.k)) els.k.add(new Option(state.k, state.k));
    els.k.value = state.k;
  }
  els.where.value = state.where;
  if (state.where) els.filtersBox.open = true;
  els.rescore.checked = state.rescore;
}

async function api(path, options = {}) {
  const resp = await fetch(path, { credentials: "same-origin", ...options });
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  if (!resp.ok) {
    const msg = body && body.detail ? body.detail : `${resp.status} ${resp.statusText}`;
    throw new Error(resp.status === 401 ? `${msg} (open this page as /?token=YOUR_TOKEN)` : msg);
  }
  return body;
}

function showError(msg) {
  els.error.textContent = msg;
  els.error.hidden = !msg;
}

async function runSearch(state) {
  const mine = ++seq;
  showError("");
  els.status.textContent = "Searching…";
  document.body.classList.add("busy");
  try {
    const body = { text: state.q, k: parseInt(state.k || els.k.value, 10) };
    if (state.where) body.filters = state.where;
    if (canRescore && state.rescore) body.rescore = true;
    const data = await api("search", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    });
    if (mine === seq) render(data);
  } catch (e) {
    if (mine === seq) { render(null); showError(e.message); }
  } finally {
    if (mine === seq) document.body.classList.remove("busy");
  }
}

async function runImageSearch(blob, name) {
  const mine = ++seq;
  showError("");
  els.status.textContent = "Searching by image…";
  document.body.classList.add("busy");
  try {
    const fd = new FormData();
    fd.append("file", blob, name);
    fd.append("k", els.k.value);
    if (els.where.value.trim()) fd.append("filters", els.where.value.trim());
    const data = await api("search/image", { method: "POST", body: fd });
    if (mine === seq) render(data);
  } catch (e) {
    if (mine === seq) { render(null); showError(e.message); }
  } finally {
    if (mine === seq) document.body.classList.remove("busy");
  }
}

function fmtScore(s) { return s.toFixed(3); }

function fmtMeta(key, value) {
  if (value === null || value === undefined) return "—";
  if (key === "mtime" && typeof value === "number") {
    return new Date(value * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
  }
  if (key === "size" && typeof value === "number") {
    return value < 1024 ? `${value} B` : value < 1048576 ? `${(value / 1024).toFixed(1)} KB` : `${(value / 1048576).toFixed(1)} MB`;
  }
  return String(value);
}

function render(data) {
  current = data ? data.results : [];
  els.results.replaceChildren();
  els.empty.hidden = !!data;
  if (!data) { els.status.textContent = ""; return; }
  const n = current.length;
  const where = data.where ? ` · filter: ${data.where}` : "";
  const rescored = data.rescored ? ` · re-scored (${data.rescore_ms.toFixed(1)} ms)` : "";
  const read = Object.entries(data.unknown_words || {}).map(([word, near]) => {
    const as = Object.keys(near);
    return as.length ? `“${word}” read as ${as.join(" / ")}` : `“${word}” left out`;
  });
  const unknown = read.length ? ` · ${read.join(", ")} (not in the training captions)` : "";
  els.status.textContent = `${n} result${n === 1 ? "" : "s"} for “${data.query}” · ${data.took_ms.toFixed(1)} ms${rescored}${where}${unknown}`;
  const top = n ? current[0].score : 1, bottom = n ? current[n - 1].score : 0;
  current.forEach((hit, i) => {
    const card = document.createElement("button");
    card.type = "button";
    card.className = "card";
    card.dataset.id = hit.id;
    card.dataset.score = hit.score;
    card.setAttribute("aria-label", `Result ${hit.rank}, score ${fmtScore(hit.score)}`);
    const img = document.createElement("img");
    img.src = hit.thumb_url;
    img.alt = hit.name;
    img.loading = "lazy";
    img.decoding = "async";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${hit.rank}`;
    const foot = document.createElement("div");
    foot.className = "foot";
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("i");
    // relative bar: best hit full, worst shown still visible
    const rel = top > bottom ? (hit.score - bottom) / (top - bottom) : 1;
    fill.style.width = `${Math.round(15 + 85 * rel)}%`;
    bar.append(fill);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = fmtScore(hit.score);
    foot.append(bar, score);
    card.append(img, rank, foot);
    card.addEventListener("click", () => openViewer(i));
    els.results.append(card);
  });
}

function openViewer(i) {
  shown = current[i];
  if (!shown) return;
  els.vImg.src = shown.image_url;
  els.vImg.alt = shown.name;
  els.vTitle.textContent = shown.name;
  els.vScore.innerHTML = "";
  const b = document.createElement("b");
  b.textContent = fmtScore(shown.score);
  els.vScore.append(`Rank #${shown.rank} · score `, b, ` · id ${shown.id}`);
  els.vMeta.replaceChildren();
  for (const [key, value] of Object.entries(shown.metadata)) {
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    const td = document.createElement("td");
    th.textContent = key;
    td.textContent = fmtMeta(key, value);
    if (key === "mtime" && typeof value === "number") td.title = String(value);
    if (key === "sha256") td.className = "mono";
    tr.append(th, td);
    els.vMeta.append(tr);
  }
  els.vOpen.href = shown.image_url;
  if (!els.viewer.open) els.viewer.showModal();
}

function step(delta) {
  if (!shown) return;
  const i = current.indexOf(shown) + delta;
  if (i >= 0 && i < current.length) openViewer(i);
}

els.form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const state = { q: els.q.value.trim(), k: els.k.value, where: els.where.value.trim(), rescore: els.rescore.checked };
  if (!state.q) { showError("Type a description first."); els.q.focus(); return; }
  writeUrl(state, true);
  runSearch(state);
});
els.where.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter") { ev.preventDefault(); els.form.requestSubmit(); }
});
els.k.addEventListener("change", () => { if (els.q.value.trim()) els.form.requestSubmit(); });
els.rescore.addEventListener("change", () => { if (els.q.value.trim()) els.form.requestSubmit(); });
els.file.addEventListener("change", () => {
  const f = els.file.files[0];
  if (f) runImageSearch(f, f.name);
  els.file.value = "";
});
els.similar.addEventListener("click", async () => {
  if (!shown) return;
  const hit = shown;
  els.viewer.close();
  try {
    const resp = await fetch(hit.image_url, { credentials: "same-origin" });
    if (!resp.ok) throw new Error(`could not load image ${hit.id}`);
    runImageSearch(await resp.blob(), hit.name);
  } catch (e) { showError(e.message); }
});
els.viewer.addEventListener("click", (ev) => { if (ev.target === els.viewer) els.viewer.close(); });
els.viewer.addEventListener("close", () => { shown = null; });
document.addEventListener("keydown", (ev) => {
  if (!els.viewer.open) return;
  if (ev.key === "ArrowRight") step(1);
  if (ev.key === "ArrowLeft") step(-1);
});
// drop an image anywhere to search by example
document.addEventListener("dragover", (ev) => { ev.preventDefault(); });
document.addEventListener("drop", (ev) => {
  ev.preventDefault();
  const f = ev.dataTransfer && ev.dataTransfer.files[0];
  if (f && f.type.startsWith("image/")) runImageSearch(f, f.name);
});
window.addEventListener("popstate", () => {
  const state = readUrl();
  applyState(state);
  if (state.q) runSearch(state); else render(null);
});

(async function init() {
  const state = readUrl();
  applyState(state);
  try {  // first: whether the server can re-score decides what a shared URL's search asks for
    const s = await api("stats");
    els.gallerySize.textContent = `Gallery: ${s.items.toLocaleString()} images · model ${s.model.arch || "?"}`;
    if (s.columns.length) els.columnsHint.textContent = "Columns: " + s.columns.join(", ");
    canRescore = !!(s.rescore && s.rescore.available);
    els.rescoreBox.hidden = !canRescore;
    if (canRescore) els.rescoreBox.title += ` (top ${s.rescore.k}, ${s.rescore.mode})`;
  } catch (e) {
    if (!state.q) showError(e.message);
  }
  if (state.q) runSearch(state);
})();
