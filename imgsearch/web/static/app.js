// The search page: talks only to this server's /api (see imgsearch/web/app.py).
// Text from the index (paths, labels) is only ever set as textContent.
"use strict";

const $ = (id) => document.getElementById(id);
let labelled = false;   // whether the index has labels to vote with
let allLabelled = false;  // whether every image has one (then the voters are the nearest images)
let nextAfter = null;   // the listing's next page
let queryUrl = null;    // the object URL of an uploaded query image

function show(element, visible) { element.hidden = !visible; }

function say(text) { $("status").textContent = text; }

function fail(message) {
  $("error").textContent = message;
  show($("error"), true);
  say("");
}

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

function k() {
  const value = parseInt($("k").value, 10);
  return Number.isFinite(value) && value >= 1 ? Math.min(value, 500) : 12;
}

// -- the index -----------------------------------------------------------------

async function loadInfo() {
  const info = await api("/api/info");
  const labels = Object.entries(info.labels);
  labelled = labels.length > 0;
  allLabelled = labels.reduce((sum, [, count]) => sum + count, 0) === info.count;
  $("summary").textContent =
    `${info.count.toLocaleString()} images · encoder ${info.encoder} · ${labels.length} labels`;
  const shown = labels.map(([label, count]) => `${label} (${count.toLocaleString()})`);
  const select = $("label");
  // Rebuilt only when the labels changed, so that a choice being made stays.
  if (JSON.stringify(shown) !== JSON.stringify([...select.options].slice(1).map((o) => o.text))) {
    const chosen = select.value;
    while (select.options.length > 1) select.remove(1);
    labels.forEach(([label], i) => select.add(new Option(shown[i], label)));
    select.value = labels.some(([label]) => label === chosen) ? chosen : "";
  }
  const facts = $("info");
  facts.replaceChildren();
  for (const key of ["path", "count", "encoder", "dim", "weights", "precision", "index_type",
                     "segments", "created", "updated"]) {
    if (info[key] === null || info[key] === undefined) continue;
    const term = document.createElement("dt");
    term.textContent = key;
    const value = document.createElement("dd");
    value.textContent = String(info[key]);
    facts.append(term, value);
  }
  if (info.server && info.server.load_error) fail(info.server.load_error);
  return info;
}

// -- results -------------------------------------------------------------------

function card(row, extraText) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.dataset.id = row.id;
  button.title = "More like this";
  const image = document.createElement("img");
  image.src = row.thumbnail;
  image.alt = row.label ? `${row.label}: ${row.path}` : row.path;
  // Results are wanted at once; a long listing loads as it scrolls into view.
  image.loading = extraText ? "eager" : "lazy";
  image.decoding = "async";
  button.append(image);
  if (extraText) {
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = extraText;
    button.append(score);
  }
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = row.label || "(no label)";
  const path = document.createElement("span");
  path.className = "path";
  path.textContent = row.path;
  button.append(label, path);
  button.addEventListener("click", () => moreLikeThis(row));
  item.append(button);
  item.dataset.id = row.id;
  item.dataset.label = row.label || "";
  item.dataset.path = row.path;
  return item;
}

function showResults(result, queryName, querySrc) {
  $("query-name").textContent = queryName;
  $("query-image").src = querySrc;
  const list = $("results");
  list.replaceChildren(...result.results.map((row) => {
    const item = card(row, `#${row.rank} · ${row.score.toFixed(3)}`);
    item.dataset.score = row.score;
    return item;
  }));
  show($("query"), true);
  show($("classification"), false);
}

function showVotes(classification) {
  $("predicted").textContent = classification.label || "(none)";
  $("confidence").textContent = `${(classification.confidence * 100).toFixed(1)}%`;
  const votes = $("votes");
  votes.replaceChildren(...Object.entries(classification.votes).map(([label, share]) => {
    const item = document.createElement("li");
    item.dataset.label = label;
    const name = document.createElement("span");
    name.textContent = label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(1, share * 100)}%`;
    const percent = document.createElement("span");
    percent.textContent = `${(share * 100).toFixed(1)}%`;
    item.append(name, bar, percent);
    return item;
  }));
  show($("classification"), true);
}

const VOTERS = 20;  // the neighbours that vote, as classify's default

async function search(ask, queryName, querySrc) {
  show($("error"), false);
  say(`Searching for ${queryName}…`);
  const started = performance.now();
  const wanted = k();
  try {
    // The voters are the nearest labelled images, best first: when every
    // image is labelled they are the neighbours too, and one classify
    // request brings both; more than the voters shown, unlabelled images
    // or no labels take a query of their own.
    const classification = labelled ? await ask.classify(VOTERS) : null;
    const result = classification && allLabelled && wanted <= VOTERS
      ? { results: classification.neighbors.slice(0, wanted) }
      : await ask.query(wanted);
    showResults(result, queryName, querySrc);
    if (classification) showVotes(classification);
    say(`${result.results.length} nearest images in ${Math.round(performance.now() - started)} ms`);
    $("results").querySelector("button")?.focus({ preventScroll: true });
    await loadInfo();  // the index may have grown meanwhile
  } catch (error) {
    fail(error.message);
  }
}

function searchFile(file) {
  if (!file) return;
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = URL.createObjectURL(file);
  const name = encodeURIComponent(file.name || "pasted image");
  const post = (endpoint, params) => api(`/api/${endpoint}?${params}&name=${name}`, {
    method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
  });
  search({
    query: (n) => post("query", `k=${n}`),
    classify: (n) => post("classify", `k=${n}`),
  }, file.name || "pasted image", queryUrl);
}

function moreLikeThis(row) {
  search({
    query: (n) => api(`/api/images/${row.id}/similar?k=${n}`),
    classify: (n) => api(`/api/images/${row.id}/classify?k=${n}`),
  }, row.path, row.thumbnail);
}

// -- browsing --------------------------------------------------------------------

async function browse(more) {
  const label = $("label").value;
  const params = new URLSearchParams({ limit: "60" });
  if (label) params.set("label", label);
  if (more && nextAfter !== null) params.set("after", String(nextAfter));
  try {
    const page = await api(`/api/images?${params}`);
    const list = $("listing");
    const cards = page.images.map((row) => card(row, null));
    if (more) list.append(...cards); else list.replaceChildren(...cards);
    nextAfter = page.next;
    show($("more"), page.next !== null);
    $("browse-count").textContent = `${list.children.length.toLocaleString()} of ${page.total.toLocaleString()}`;
  } catch (error) {
    fail(error.message);
  }
}

// -- input: pick, drop, paste ----------------------------------------------------------

function firstImage(items) {
  for (const file of items || []) {
    if (file && (!file.type || file.type.startsWith("image/"))) return file;
  }
  return null;
}

function wire() {
  $("file").addEventListener("change", (event) => {
    searchFile(event.target.files[0]);
    event.target.value = "";  // choosing the same file again searches again
  });
  const drop = $("drop");
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = firstImage(event.dataTransfer && event.dataTransfer.files);
    if (file) searchFile(file); else fail("Drop an image file.");
  });
  document.addEventListener("paste", (event) => {
    const file = firstImage(event.clipboardData && event.clipboardData.files);
    if (file) { event.preventDefault(); searchFile(file); }
  });
  $("label").addEventListener("change", () => browse(false));
  $("more").addEventListener("click", () => browse(true));
}

wire();
loadInfo().then(() => browse(false)).catch((error) => fail(error.message));
