// The page calls the public API exactly as a web app would, and shows what it answers,
// errors included, word for word (docs/architecture.md, "The page"). No framework, no build.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "inception-api-key";
let images = []; // the Files or Blobs to classify: one is a raw body, several one batch
let previewUrl = null;

// ---- talking to the API -------------------------------------------------------------

/** fetch with the API key, if any; answers the JSON body or throws the API's own error. */
async function api(path, init = {}) {
  const headers = new Headers(init.headers);
  const key = $("key").value.trim();
  if (key) headers.set("X-API-Key", key);
  let answer;
  try {
    answer = await fetch(path, { ...init, headers });
  } catch (failure) {
    throw new Error(`The gateway did not answer (${failure.message}).`);
  }
  const body = await answer.json().catch(() => null);
  if (answer.ok) return body;
  const error = body && body.error;
  const retry = answer.headers.get("Retry-After");
  throw new Error(
    `${answer.status} ${error ? `${error.code}: ${error.message}` : answer.statusText}` +
      (retry ? ` (retry after ${retry} s)` : ""),
  );
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// ---- the form: models, members, crops, key --------------------------------------------

async function loadModels() {
  let listing;
  try {
    listing = await api("/v1/models");
  } catch (failure) {
    showError(`Cannot list the models: ${failure.message}`);
    if (failure.message.startsWith("401")) $("key").focus();
    return;
  }
  showError("");
  const select = $("model");
  select.replaceChildren();
  const list = $("member-list");
  list.replaceChildren();
  for (const m of listing.models) {
    const notes = [m.default ? "default" : "",
      m.weights === "random-init" ? "random init" : "", m.state !== "ready" ? "unavailable" : ""];
    const option = new Option([m.name, ...notes.filter(Boolean)].join(" · "), m.name, m.default, m.default);
    select.add(option);
    if (m.kind === "model") list.append(memberRow(m.name));
  }
  select.add(new Option("members and weights of my choice…", "custom"));
  showMembers();
  // The multi-crop protocols, when the listing advertises them: {"10": "its source", ...}.
  if (listing.crops && typeof listing.crops === "object") {
    offerCrops(Object.entries(listing.crops).map(([n, about]) => [Number(n), `${n}: ${about}`]));
  }
}

function memberRow(name) {
  const row = document.createElement("div");
  row.className = "member";
  row.innerHTML = `<input type="checkbox" checked><label></label>
    <label class="weight">weight <input type="number" min="0" step="any" value="1"></label>`;
  const [check, weight] = row.querySelectorAll("input");
  check.id = `member-${name}`;
  check.value = name;
  row.querySelector("label").htmlFor = check.id;
  row.querySelector("label").textContent = name;
  weight.setAttribute("aria-label", `weight of ${name}`);
  return row;
}

function showMembers() {
  $("members").hidden = $("model").value !== "custom";
}

/** The crops control appears only when the API says it takes `crops`: in its listing
 * (above) or, failing that, as an enumerated option of POST /v1/classify in its OpenAPI. */
async function loadCrops() {
  const spec = await fetch("/openapi.json").then((r) => (r.ok ? r.json() : null)).catch(() => null);
  $("docs").hidden = !spec; // GATEWAY_DOCS=false: no reference to link to
  const post = spec && spec.paths && spec.paths["/v1/classify"] && spec.paths["/v1/classify"].post;
  if (!post || $("crops").options.length) return;
  const query = (post.parameters || []).find((p) => p.name === "crops");
  const form = post.requestBody && post.requestBody.content["multipart/form-data"];
  const schemas = [query && query.schema, form && form.schema.properties && form.schema.properties.crops];
  const values = schemas.filter(Boolean).flatMap((s) => s.enum || (s.anyOf || []).flatMap((a) => a.enum || []));
  if (query && values.length) offerCrops([...new Set(values)].map((n) => [n, String(n)]));
}

function offerCrops(choices) {
  $("crops").replaceChildren(...choices.map(([n, text], i) => new Option(text, String(n), i === 0, i === 0)));
  $("crops-field").hidden = false;
}

// ---- choosing an image: file, drop, paste ---------------------------------------------

/** One file or several (a batch): the first is previewed, all are sent. */
function choose(blobs) {
  blobs = [...(blobs || [])].filter(Boolean);
  if (!blobs.length) return;
  images = blobs;
  const [blob] = blobs;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(blob);
  const preview = $("preview");
  preview.src = previewUrl;
  preview.alt = `Preview of ${blob.name || "the pasted image"}`;
  preview.hidden = false;
  $("status").textContent = blobs.length === 1
    ? `${blob.name || "Pasted image"}: ${blob.size} bytes, ready to classify.`
    : `${blobs.length} images, ${blobs.reduce((n, b) => n + b.size, 0)} bytes, ready to classify as one batch.`;
}

// ---- the answer -------------------------------------------------------------------------

function pairs(target, entries) {
  target.replaceChildren();
  for (const [name, value] of entries) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    target.append(dt, dd);
  }
}

function bars(list, predictions) {
  list.replaceChildren();
  for (const p of predictions) {
    const percent = `${(p.score * 100).toFixed(2)} %`;
    const item = document.createElement("li");
    item.innerHTML = `<span class="label"></span><span class="pct"></span>
      <span class="bar" aria-hidden="true"><span></span></span>`;
    item.querySelector(".label").textContent = p.label;
    item.querySelector(".pct").textContent = percent;
    item.querySelector(".bar span").style.width = `${Math.min(100, p.score * 100)}%`;
    item.title = `class ${p.class_id}`;
    list.append(item);
  }
}

function render(answer, sent = images) {
  const warning = $("warning");
  warning.hidden = !answer.warning && !answer.random_init;
  warning.querySelector("strong").textContent = answer.random_init
    ? "Random initialisation: these predictions carry no meaning."
    : "Warning:";
  $("warning-text").textContent = answer.warning || "";

  // One image: its bars; a batch: one article per image, in the order sent, each its
  // bars or its own error as the API words it.
  const single = !answer.results;
  $("predictions").hidden = !single;
  bars($("predictions"), single ? answer.predictions : []);
  const batch = $("batch");
  batch.replaceChildren();
  (answer.results || []).forEach((result, i) => {
    const article = document.createElement("article");
    article.className = "image-result";
    const title = document.createElement("h3");
    title.textContent = `${i + 1}. ${(sent[i] && sent[i].name) || "image"}`;
    if (result.cached) title.append(Object.assign(document.createElement("span"), { className: "cached", textContent: " (cached)" }));
    article.append(title);
    if (result.error) {
      const error = document.createElement("p");
      error.className = "error";
      error.textContent = `${result.error.code}: ${result.error.message}`;
      article.append(error);
    } else {
      const list = document.createElement("ol");
      list.className = "predictions";
      bars(list, result.predictions);
      article.append(list);
    }
    batch.append(article);
  });

  const provenance = [["model", answer.model], ["weights", answer.weights]];
  for (const m of answer.members || []) {
    provenance.push([`member ${m.model}`, `× ${Number(m.weight.toPrecision(4))} · ${m.weights}`]);
  }
  if (answer.crops !== undefined) provenance.push(["crops", String(answer.crops)]);
  if (answer.cached) provenance.push(["cached", "yes"]);
  provenance.push(["request id", answer.request_id]);
  pairs($("provenance"), provenance);
  pairs($("timings"), Object.entries(answer.timing_ms).map(([stage, ms]) => [stage, ms.toFixed(1)]));

  $("result").hidden = false;
  $("result-title").focus();
}

async function classify(event) {
  event.preventDefault();
  showError("");
  if (!images.length) {
    showError("Choose, drop or paste an image first.");
    $("file").focus();
    return;
  }
  const query = new URLSearchParams({ top_k: $("top_k").value });
  if ($("model").value === "custom") {
    const rows = [...$("member-list").querySelectorAll(".member")].filter((r) => r.querySelector("input").checked);
    query.set("models", rows.map((r) => r.querySelector("input").value).join(","));
    query.set("weights", rows.map((r) => r.querySelector(".weight input").value).join(","));
  } else if ($("model").value) {
    query.set("model", $("model").value);
  }
  if (!$("crops-field").hidden) query.set("crops", $("crops").value);

  $("submit").disabled = true;
  $("result").setAttribute("aria-busy", "true");
  $("status").textContent = "Classifying…";
  try {
    const sent = images;
    let init;
    if (sent.length === 1) {
      // The file as it is, with its own type: the API judges it (415 for a non-image).
      const type = sent[0].type || "application/octet-stream";
      init = { method: "POST", body: sent[0], headers: { "Content-Type": type } };
    } else {
      // A batch: the multipart field `image` repeated, one part per file, in order.
      const form = new FormData();
      for (const blob of sent) form.append("image", blob, blob.name || "pasted");
      init = { method: "POST", body: form };
    }
    render(await api(`/v1/classify?${query}`, init), sent);
    $("status").textContent = "Done.";
  } catch (failure) {
    $("status").textContent = "";
    showError(failure.message);
  } finally {
    $("submit").disabled = false;
    $("result").removeAttribute("aria-busy");
  }
}

// ---- wiring ---------------------------------------------------------------------------------

$("key").value = sessionStorage.getItem(KEY_STORE) || "";
$("key").addEventListener("change", () => {
  sessionStorage.setItem(KEY_STORE, $("key").value.trim());
  loadModels();
});
$("file").addEventListener("change", () => choose($("file").files));
$("model").addEventListener("change", showMembers);
$("form").addEventListener("submit", classify);
const drop = $("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  choose(e.dataTransfer.files);
});
document.addEventListener("paste", (e) => {
  const item = [...e.clipboardData.items].find((i) => i.kind === "file");
  if (item) choose([item.getAsFile()]);
});
loadModels();
loadCrops();
