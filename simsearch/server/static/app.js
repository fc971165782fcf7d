// The page of `simsearch serve`: search, clusters, duplicates, failed files and the index
// run, over the HTTP API of the same server. Plain DOM: every piece of data (paths are user
// data) goes in through textContent or attributes, never as HTML. URLs are relative, so
// the page works behind a prefix, and the token cookie (?token=) rides along by itself.

const $ = (selector) => document.querySelector(selector);

// -- DOM -------------------------------------------------------------------------------------

/** An element: h("a", {href, class, onclick, dataset: {...}}, child, "text", ...). */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child)); // strings become text nodes
  }
  return el;
}

function clear(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

// -- formatting ------------------------------------------------------------------------------

const baseName = (path) => String(path).split(/[\\/]/).filter(Boolean).pop() || String(path);

function bytes(size) {
  if (size === null || size === undefined) return null;
  if (size >= 1e9) return `${(size / 1e9).toFixed(1)} GB`;
  if (size >= 1e6) return `${(size / 1e6).toFixed(1)} MB`;
  if (size >= 1e3) return `${Math.round(size / 1e3)} KB`;
  return `${size} B`;
}

const pixels = (w, h) => (w && h ? `${w}×${h}` : null);
const score = (value) => Number(value).toFixed(4);
const plural = (n, one, many = `${one}s`) => `${n.toLocaleString()} ${n === 1 ? one : many}`;

/** A file's facts as dedup compared them: "4000×3000 JPEG lossy, 3.1 MB". */
function factsText(facts) {
  if (!facts) return "facts unknown";
  const encoding = facts.lossless === true ? " lossless" : facts.lossless === false ? " lossy" : "";
  return `${pixels(facts.width, facts.height) || "?"} ${facts.format || "?"}${encoding}, ${bytes(facts.size)}`;
}

function when(seconds) {
  if (!seconds) return null;
  return new Date(seconds * 1000).toLocaleString();
}

// -- the API -----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body) {
    super(body.error || `the server answered ${status}`);
    this.status = status;
    this.type = body.type || "HTTPError";
    this.param = body.param || null;
    this.fix = body.fix || null;
  }
}

/** JSON from the API; an ApiError ({error, type, param, fix}) for any failure. */
async function api(path, { method = "GET", json, form } = {}) {
  const init = { method, headers: { accept: "application/json" }, credentials: "same-origin" };
  if (json !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form;
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (exc) {
    throw new ApiError(0, { error: `cannot reach the server (${exc.message})`, type: "NetworkError" });
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    const text = body && typeof body.error === "string" ? body : { error: `the server answered ${response.status} ${response.statusText}` };
    throw new ApiError(response.status, text);
  }
  return body;
}

const thumbUrl = (id, size = 256) => `api/images/${encodeURIComponent(Number(id))}/thumbnail?size=${size}`;
const originalUrl = (id) => `api/images/${encodeURIComponent(Number(id))}`;

// -- the banner ----------------------------------------------------------------------------------

function showError(error) {
  const banner = $("#banner");
  $("#banner-text").textContent = error instanceof Error ? error.message : String(error);
  let fix = error instanceof ApiError ? error.fix : null;
  if (!fix && error instanceof ApiError && error.status === 401) {
    fix = "open the page with ?token=YOUR_TOKEN (the token simsearch serve was given)";
  }
  $("#banner-fix").textContent = fix ? `Fix: ${fix}` : "";
  $("#banner-fix").hidden = !fix;
  banner.hidden = false;
}

function dismissError() {
  $("#banner").hidden = true;
}

/** Run `work`; an error goes to the banner instead of being lost. */
async function guarded(work) {
  try {
    return await work();
  } catch (error) {
    showError(error);
    return undefined;
  }
}

// -- pieces ------------------------------------------------------------------------------------

function thumb(id, alt = "", size = 256) {
  const img = h("img", { src: thumbUrl(id, size), alt, loading: "lazy", decoding: "async" });
  img.addEventListener("error", () => {
    img.replaceWith(h("span", { class: "missing", role: "img", "aria-label": "no preview" }, "no preview"));
  }, { once: true });
  return img;
}

/** One search hit or cluster member: the thumbnail searches by it, the name opens it. */
function hitCard(hit, { rank, scoreLabel = "score" } = {}) {
  const name = baseName(hit.path);
  const facts = [pixels(hit.width, hit.height), bytes(hit.size)].filter(Boolean).join(" · ");
  const chips = [
    ...(hit.labels || []).map((l) => h("span", { class: "chip", title: `label score ${score(l.score)}` }, l.label)),
    hit.cluster ? h("a", { class: "chip", href: `#clusters?c=${Number(hit.cluster)}` }, `cluster ${hit.cluster}`) : null,
  ];
  return h("li", { class: "card", dataset: { id: hit.id, path: hit.path } },
    h("button", {
      type: "button", class: "thumb", title: "Search by this image",
      "aria-label": `Search by ${name} (id ${hit.id})`,
      onclick: () => searchByIds([hit.id]),
    }, thumb(hit.id)),
    h("div", { class: "meta" },
      h("p", { class: "line" },
        rank ? h("span", { class: "rank" }, `#${rank}`) : null,
        h("span", { class: "score", title: scoreLabel }, score(hit.score)),
        h("span", { class: "id" }, `id ${hit.id}`)),
      h("p", { class: "line" },
        h("a", { class: "name", href: originalUrl(hit.id), target: "_blank", rel: "noopener", title: hit.path }, name)),
      facts ? h("p", { class: "line facts" }, facts) : null,
      chips.some(Boolean) ? h("p", { class: "line chips" }, chips) : null));
}

/** "21–40 of 57" with Previous and Next buttons; `go(offset)` loads a page. */
function pager(total, offset, limit, go) {
  if (total <= limit && offset === 0) return h("span");
  const last = Math.min(offset + limit, total);
  return h("nav", { class: "pager", "aria-label": "Pages" },
    h("button", { type: "button", disabled: offset <= 0, onclick: () => go(Math.max(0, offset - limit)) }, "← Previous"),
    h("span", {}, `${(offset + 1).toLocaleString()}–${last.toLocaleString()} of ${total.toLocaleString()}`),
    h("button", { type: "button", disabled: last >= total, onclick: () => go(offset + limit) }, "Next →"));
}

// -- views and the address -------------------------------------------------------------------

const VIEWS = ["search", "clusters", "duplicates", "failed", "index"];
let currentView = null;

/** The view and its parameters in the address: #search?id=3&k=20, #duplicates?threshold=0.95. */
function route() {
  const [name, query = ""] = location.hash.replace(/^#/, "").split("?");
  return { view: VIEWS.includes(name) ? name : "search", params: new URLSearchParams(query) };
}

function go(view, params = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== null && v !== undefined && v !== ""));
  const hash = `#${view}${query.toString() ? `?${query}` : ""}`;
  if (location.hash === hash) onRoute();
  else location.hash = hash;
}

function setView(view) {
  if (view === currentView) return;
  for (const name of VIEWS) $(`#view-${name}`).hidden = name !== view;
  for (const link of document.querySelectorAll("nav [data-view]")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  currentView = view;
}

function onRoute() {
  const { view, params } = route();
  setView(view);
  const show = { search: showSearch, clusters: showClusters, duplicates: showDuplicates, failed: showFailed, index: showIndex };
  guarded(() => show[view](params));
  followIndexRun();
}

// -- header ----------------------------------------------------------------------------------

async function loadInfo() {
  const info = await api("api/info");
  const model = baseName(info.model);
  clear($("#info"),
    h("strong", {}, plural(info.indexed, "image")), " indexed",
    info.failed ? [" · ", h("a", { href: "#failed" }, `${info.failed.toLocaleString()} failed`)] : null,
    " · model ", h("span", { title: info.model }, model),
    ` · ${info.dim} dimensions · ${info.index_built}`);
}

async function loadFilters() {
  const [labels, clusters] = await Promise.all([api("api/labels"), api("api/clusters?top=0")]);
  const labelSelect = $("#label");
  const labelValue = labelSelect.value;
  clear(labelSelect, h("option", { value: "" }, "any label"),
    labels.labels.map((name) => h("option", { value: name }, name)));
  labelSelect.value = labels.labels.includes(labelValue) ? labelValue : "";
  $("#label-field").hidden = labels.labels.length === 0;

  const clusterSelect = $("#cluster");
  const clusterValue = clusterSelect.value;
  clear(clusterSelect, h("option", { value: "" }, "any cluster"),
    clusters.clusters.map((c) => h("option", { value: c.id }, `${c.id} (${plural(c.size, "image")})`)));
  clusterSelect.value = clusters.clusters.some((c) => String(c.id) === clusterValue) ? clusterValue : "";
  $("#cluster-field").hidden = clusters.clusters.length === 0;
}

function refreshCollection() {
  guarded(loadInfo);
  guarded(loadFilters);
}

// -- search ----------------------------------------------------------------------------------

let lastFiles = null; // the images of the last upload, so that changing k searches again
let previews = [];

function filters() {
  return { k: $("#k").value, label: $("#label").value, cluster: $("#cluster").value };
}

function parseIds(text) {
  const parts = text.split(/[\s,]+/).map((p) => p.replace(/^id:/i, "")).filter(Boolean);
  if (!parts.length) throw new Error("type an image id to search by (a number), or drop an image");
  if (!parts.every((p) => /^\d+$/.test(p))) throw new Error(`image ids are numbers, not “${text.trim()}”`);
  return parts.map(Number);
}

function searchByIds(ids) {
  $("#qid").value = ids.join(", ");
  go("search", { id: ids.join(","), ...filters() });
}

async function showSearch(params) {
  for (const [key, select] of [["k", "#k"], ["label", "#label"], ["cluster", "#cluster"]]) {
    const value = params.get(key);
    if (value === null) continue;
    if (![...$(select).options].some((o) => o.value === value)) {
      $(select).append(h("option", { value }, value)); // before the filters have loaded
    }
    $(select).value = value;
  }
  const ids = params.get("id");
  if (!ids) {
    if (params.get("cluster")) $("#qid").focus(); // "search within this cluster": by what?
    return;
  }
  lastFiles = null;
  $("#qid").value = ids.replaceAll(",", ", ");
  const query = new URLSearchParams();
  for (const id of parseIds(ids)) query.append("id", id);
  for (const [key, value] of Object.entries(filters())) if (value) query.set(key, value);
  setBusy(true);
  try {
    render(await api(`api/search?${query}`));
  } finally {
    setBusy(false);
  }
}

async function searchByFiles(files) {
  const images = [...files].filter((f) => f.type.startsWith("image/") || !f.type);
  if (!images.length) throw new Error("that is not an image file");
  lastFiles = images;
  const form = new FormData();
  images.forEach((file, n) => form.append("images", file, file.name || `pasted-${n + 1}.png`));
  for (const [key, value] of Object.entries(filters())) if (value) form.append(key, value);
  if (currentView !== "search" || route().params.get("id")) {
    history.pushState(null, "", "#search"); // the upload is not in the address; no hashchange
    setView("search");
  }
  setBusy(true);
  try {
    render(await api("api/search", { method: "POST", form }), images);
  } finally {
    setBusy(false);
  }
}

function setBusy(busy) {
  $("#results").setAttribute("aria-busy", busy ? "true" : "false");
  $("#search-form").classList.toggle("busy", busy);
  $("#search-status").textContent = busy ? "Searching…" : "";
}

/** The results: one section per query, its hits in the order the server returned them. */
function render(answer, files = []) {
  for (const url of previews) URL.revokeObjectURL(url);
  previews = [];
  const sections = answer.results.map((result, n) => {
    let picture = null;
    if (result.query.startsWith("id:")) {
      picture = thumb(result.query.slice(3), `query ${result.query}`, 128);
    } else if (result.query.startsWith("image:") && files[n]) {
      const url = URL.createObjectURL(files[n]);
      previews.push(url);
      picture = h("img", { src: url, alt: `query ${result.query}` });
    }
    const grid = h("ol", { class: "grid" }, result.hits.map((hit, i) => hitCard(hit, { rank: i + 1 })));
    return h("section", { class: "result", dataset: { query: result.query } },
      h("header", { class: "result-head" },
        picture ? h("figure", { class: "query-thumb" }, picture) : null,
        h("div", {},
          h("h3", { class: "query", tabindex: "-1" }, `Nearest to ${result.query}`),
          h("p", { class: "muted" }, result.hits.length ? plural(result.hits.length, "result") : "no results (try another filter)"))),
      grid);
  });
  clear($("#results"), sections);
  if ($("#results").getBoundingClientRect().top < 0) $("#results").scrollIntoView({ block: "start" });
  if (!document.activeElement || document.activeElement === document.body) {
    $("#results .query")?.focus({ preventScroll: true }); // the clicked result is gone
  }
}

function setUpSearch() {
  $("#search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded(async () => searchByIds(parseIds($("#qid").value)));
  });
  $("#file").addEventListener("change", () => {
    const files = [...$("#file").files];
    $("#file").value = ""; // choosing the same file again searches again
    if (files.length) guarded(() => searchByFiles(files));
  });
  for (const select of ["#k", "#label", "#cluster"]) {
    $(select).addEventListener("change", () => {
      if (lastFiles) guarded(() => searchByFiles(lastFiles));
      else if (route().params.get("id")) go("search", { id: route().params.get("id"), ...filters() });
    });
  }
  // Drop an image anywhere on the page (or a thumbnail dragged from the page itself).
  const drop = $("#drop");
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) drop.classList.remove("over");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const files = [...(event.dataTransfer?.files || [])];
    if (files.length) {
      guarded(() => searchByFiles(files));
      return;
    }
    const uri = event.dataTransfer?.getData("text/uri-list") || event.dataTransfer?.getData("text/plain") || "";
    const found = uri.match(/api\/images\/(\d+)/);
    if (found) searchByIds([Number(found[1])]);
  });
  // Paste an image (a screenshot), or an id into the id box as usual.
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      event.preventDefault();
      guarded(() => searchByFiles(files));
    }
  });
}

// -- clusters --------------------------------------------------------------------------------

const MEMBERS_PAGE = 60;

async function showClusters(params) {
  const answer = await api("api/clusters?top=8");
  const run = answer.run;
  $("#cluster-run").textContent = run
    ? `${plural(run.clusters, "cluster")} of ${plural(run.images, "image")} (k=${run.k}, ${run.chosen_by}), made ${when(run.created_at)}.`
    : "No clustering yet: run simsearch cluster on this index, then reload.";
  clear($("#cluster-list"), answer.clusters.map((c) =>
    h("li", { class: "cluster", dataset: { cluster: c.id } },
      h("div", { class: "cluster-head" },
        h("h3", {}, `Cluster ${c.id}`),
        h("p", { class: "muted" }, `${plural(c.size, "image")} · cohesion ${score(c.cohesion)}`)),
      h("ol", { class: "strip", "aria-label": `Central images of cluster ${c.id}` },
        c.central.map((hit) => h("li", {},
          h("button", {
            type: "button", class: "thumb small", title: `${hit.path} — search by it`,
            "aria-label": `Search by ${baseName(hit.path)} (id ${hit.id})`, onclick: () => searchByIds([hit.id]),
          }, thumb(hit.id, "", 128))))),
      h("p", { class: "actions" },
        h("a", { class: "button", href: `#clusters?c=${c.id}` }, `Show its ${plural(c.size, "image")}`),
        h("a", { class: "button", href: `#search?cluster=${c.id}` }, "Search within it")))));
  const chosen = Number(params.get("c"));
  if (chosen) await showMembers(chosen, Number(params.get("offset")) || 0);
  else $("#members").hidden = true;
}

async function showMembers(cluster, offset) {
  const answer = await api(`api/clusters/${cluster}?offset=${offset}&limit=${MEMBERS_PAGE}`);
  $("#members").hidden = false;
  $("#members-title").textContent = `Cluster ${cluster}: ${plural(answer.total, "image")}, nearest its centre first`;
  clear($("#members-grid"), answer.items.map((hit) => hitCard(hit, { scoreLabel: "similarity to the centre" })));
  clear($("#members-pager"), pager(answer.total, offset, MEMBERS_PAGE, (next) => go("clusters", { c: cluster, offset: next })));
  for (const li of document.querySelectorAll("#cluster-list .cluster")) {
    li.classList.toggle("chosen", li.dataset.cluster === String(cluster));
  }
  $("#members").scrollIntoView({ block: "nearest" });
  $("#members-title").focus({ preventScroll: true });
}

// -- duplicates ------------------------------------------------------------------------------

const GROUPS_PAGE = 20;
let duplicatesShown = null; // {threshold, groups}: what the page lists now
let moveOff = false;

async function showDuplicates(params) {
  const given = params.get("threshold");
  const offset = Number(params.get("offset")) || 0;
  const query = new URLSearchParams({ offset, limit: GROUPS_PAGE });
  if (given) query.set("threshold", given);
  $("#threshold").value = given || $("#threshold").value;
  clear($("#move-panel"));
  $("#move-panel").hidden = true;
  guarded(loadMoves);
  let answer;
  try {
    answer = await api(`api/duplicates?${query}`);
  } catch (error) {
    if (error instanceof ApiError && error.fix === "calibrate") {
      duplicatesShown = null;
      $("#calibrate-note").hidden = false;
      $("#dup-summary").textContent = "";
      $("#move-page").hidden = true;
      clear($("#groups"));
      clear($("#groups-pager"));
      $("#threshold").focus();
      return;
    }
    throw error;
  }
  if (!answer.items.length && answer.total && offset > 0) {
    go("duplicates", { threshold: given, offset: Math.max(0, offset - GROUPS_PAGE) });
    return;
  }
  $("#calibrate-note").hidden = true;
  $("#threshold").value = answer.threshold;
  duplicatesShown = { threshold: answer.threshold, groups: answer.items };
  const copies = answer.items.reduce((n, g) => n + g.duplicates.length, 0);
  $("#dup-summary").textContent = answer.total
    ? `${plural(answer.total, "group")} at threshold ${answer.threshold}; this page: ${plural(copies, "duplicate")}.`
    : `No duplicates at threshold ${answer.threshold}.`;
  $("#move-page").hidden = answer.items.length === 0;
  $("#move-page").disabled = moveOff;
  clear($("#groups"), answer.items.map(groupItem));
  clear($("#groups-pager"), pager(answer.total, offset, GROUPS_PAGE,
    (next) => go("duplicates", { threshold: given, offset: next })));
}

function member({ id, path, facts, kept, dupScore, why }) {
  const name = baseName(path);
  return h("figure", { class: `member ${kept ? "keep" : "dup"}`, dataset: { id, path } },
    h("a", { class: "thumb", href: originalUrl(id), target: "_blank", rel: "noopener", title: `Open ${path}` },
      thumb(id, name)),
    h("figcaption", {},
      h("p", { class: "line" },
        kept ? h("span", { class: "badge keep" }, "keep") : h("span", { class: "badge dup" }, "duplicate"),
        kept ? null : h("span", { class: "score", title: "similarity to the kept image" }, score(dupScore)),
        h("span", { class: "id" }, `id ${id}`)),
      h("p", { class: "line path", title: path }, path),
      h("p", { class: "line facts" }, factsText(facts)),
      why ? h("p", { class: "line why" }, `Kept the other: ${why}`) : null));
}

function groupItem(group) {
  return h("li", { class: "group", dataset: { keep: group.keep_id } },
    h("div", { class: "members-row" },
      member({ id: group.keep_id, path: group.keep_path, facts: group.keep_facts, kept: true }),
      group.duplicates.map((d) => member({ id: d.id, path: d.path, facts: d.facts, dupScore: d.score, why: d.why }))),
    group.aliases.length
      ? h("p", { class: "muted" }, "The same file under other paths: ", group.aliases.join(", "))
      : null,
    h("p", { class: "actions" },
      h("button", {
        type: "button", class: "move-group", disabled: moveOff,
        onclick: () => guarded(() => planMove([group.keep_id])),
      }, `Move ${group.duplicates.length === 1 ? "the duplicate" : "its duplicates"} aside`)));
}

function panel(...children) {
  const box = $("#move-panel");
  clear(box, children);
  box.hidden = false;
  box.scrollIntoView({ block: "nearest" });
  return box;
}

function closePanel() {
  $("#move-panel").hidden = true;
  clear($("#move-panel"));
}

function moveRefused(error) {
  if (error instanceof ApiError && error.param === "move_to") {
    moveOff = true;
    for (const button of document.querySelectorAll(".move-group, #move-page")) button.disabled = true;
    panel(
      h("h3", {}, "Moving duplicates is off"),
      h("p", {}, "This server was started without a folder to move them to. Start it with ",
        h("kbd", {}, "simsearch serve --move-to FOLDER"), " to move them aside from this page."),
      h("p", { class: "actions" }, h("button", { type: "button", onclick: closePanel }, "Close")));
    return true;
  }
  return false;
}

/** The dry run: what would move; then a button that moves it. */
async function planMove(keepIds) {
  if (!duplicatesShown) return;
  const threshold = duplicatesShown.threshold;
  let plan;
  try {
    plan = await api("api/duplicates/move", { method: "POST", json: { keep_ids: keepIds, threshold, confirm: false } });
  } catch (error) {
    if (moveRefused(error)) return;
    throw error;
  }
  const confirm = h("button", {
    type: "button", class: "primary danger", id: "move-confirm",
    onclick: () => guarded(() => doMove(keepIds, threshold)),
  }, `Move ${plural(plan.files, "file")}`);
  panel(
    h("h3", {}, "Dry run: nothing has moved yet"),
    h("p", {}, `${plural(plan.files, "file")} (${bytes(plan.bytes)}) would move to the server's move folder, out of the index; the kept images stay.`),
    h("ul", { class: "paths plan" }, plan.moves.map((m) =>
      h("li", {}, h("span", { class: "path" }, m.path), h("span", { class: "muted" }, ` (${score(m.score)}, duplicate of ${baseName(m.keep_path)})`)))),
    h("p", { class: "actions" }, confirm,
      h("button", { type: "button", onclick: closePanel }, "Cancel")));
  confirm.focus();
}

async function doMove(keepIds, threshold) {
  const done = await api("api/duplicates/move", { method: "POST", json: { keep_ids: keepIds, threshold, confirm: true } });
  const manifest = done.manifest;
  panel(
    h("h3", {}, `Moved ${plural(done.files, "file")} (${bytes(done.bytes)})`),
    manifest ? h("p", {}, "Logged in ", h("code", {}, manifest), "; undo it from Past moves below.") : null,
    skippedList(done.skipped),
    h("p", { class: "actions" }, h("button", { type: "button", onclick: closePanel }, "Close")));
  refreshCollection();
  await reloadDuplicates();
}

function skippedList(skipped) {
  if (!skipped || !skipped.length) return null;
  return [h("p", {}, `${plural(skipped.length, "file")} left where it was:`),
    h("ul", { class: "paths" }, skipped.map(([path, why]) => h("li", {}, h("span", { class: "path" }, path), ` — ${why}`)))];
}

async function reloadDuplicates() {
  const { params } = route();
  const keep = $("#move-panel").hidden ? null : [...$("#move-panel").childNodes];
  await showDuplicates(params);
  if (keep) panel(keep); // the result of the move stays on screen
}

async function loadMoves() {
  const manifests = await api("api/moves");
  if (!manifests.length) {
    clear($("#moves"), h("p", { class: "muted" }, "No moves yet."));
    return;
  }
  clear($("#moves"), h("div", { class: "table-wrap" }, h("table", { class: "table moves" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Manifest"), h("th", { scope: "col" }, "Made"),
      h("th", { scope: "col" }, "Files"), h("th", { scope: "col" }, h("span", { class: "visually-hidden" }, "Action")))),
    h("tbody", {}, manifests.map((m) => h("tr", { dataset: { manifest: m.name } },
      h("td", {}, h("code", {}, m.name)),
      h("td", {}, madeAt(m.created)),
      h("td", {}, m.moves.toLocaleString()),
      h("td", {}, h("button", { type: "button", class: "undo", onclick: () => guarded(() => planUndo(m.name)) }, "Undo"))))))));
}

function madeAt(created) {
  const date = new Date(created);
  return created && !Number.isNaN(date.getTime()) ? date.toLocaleString() : created || "?";
}

async function planUndo(name) {
  const plan = await api("api/moves/undo", { method: "POST", json: { manifest: name, confirm: false } });
  const confirm = h("button", {
    type: "button", class: "primary", id: "undo-confirm", onclick: () => guarded(() => doUndo(name)),
  }, `Put back ${plural(plan.files, "file")}`);
  panel(
    h("h3", {}, "Undo a move"),
    h("p", {}, `${plural(plan.files, "file")} logged in `, h("code", {}, name), " would go back where they were, into the index."),
    h("p", { class: "actions" }, confirm, h("button", { type: "button", onclick: closePanel }, "Cancel")));
  confirm.focus();
}

async function doUndo(name) {
  const done = await api("api/moves/undo", { method: "POST", json: { manifest: name, confirm: true } });
  panel(
    h("h3", {}, `Put back ${plural(done.files, "file")}`),
    skippedList(done.skipped),
    h("p", { class: "actions" }, h("button", { type: "button", onclick: closePanel }, "Close")));
  refreshCollection();
  await reloadDuplicates();
}

function setUpDuplicates() {
  $("#threshold-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("#threshold").value.trim();
    const number = Number(value);
    if (value === "" || !Number.isFinite(number) || number < 0 || number > 1) {
      showError(new Error("the threshold is a number from 0 to 1, e.g. 0.95"));
      return;
    }
    go("duplicates", { threshold: value });
  });
  $("#move-page").addEventListener("click", () => {
    if (duplicatesShown) guarded(() => planMove(duplicatesShown.groups.map((g) => g.keep_id)));
  });
  $("#calibrate").addEventListener("click", () => guarded(async () => {
    const button = $("#calibrate");
    button.disabled = true;
    button.textContent = "Calibrating…";
    try {
      await api("api/duplicates/calibrate", { method: "POST" });
    } finally {
      button.disabled = false;
      button.textContent = "Calibrate it";
    }
    go("duplicates", {});
  }));
}

// -- failed files ----------------------------------------------------------------------------

const FAILED_PAGE = 100;

async function showFailed(params) {
  const offset = Number(params.get("offset")) || 0;
  const answer = await api(`api/failed?offset=${offset}&limit=${FAILED_PAGE}`);
  $("#failed-summary").textContent = answer.total
    ? `${plural(answer.total, "file")} could not be indexed.`
    : "Every file found was indexed.";
  $("#failed-table").hidden = answer.total === 0;
  clear($("#failed-table tbody"), answer.items.map((f) =>
    h("tr", {}, h("td", { class: "path" }, f.path), h("td", {}, f.error))));
  clear($("#failed-pager"), pager(answer.total, offset, FAILED_PAGE, (next) => go("failed", { offset: next })));
}

// -- the index run ---------------------------------------------------------------------------

let events = null;
let polling = null;
let indexRunning = false;
let shownVersion = -1; // the version of the run state on screen

async function showIndex() {
  renderIfNewer(await api("api/index"));
}

/** Render a one-off answer (a GET, the POST that starts a run) unless the events or polls
 * have already shown a newer state: a short run can end, and its last event arrive, before
 * such an answer does, and an older answer would show the run still going with no event
 * left to correct it. Events and polls always render (a restarted server counts from 0). */
function renderIfNewer(state) {
  if (state.version >= shownVersion) renderIndex(state);
}

function renderIndex(state) {
  shownVersion = state.version;
  const wasRunning = indexRunning;
  indexRunning = state.running;
  const badge = $("#index-badge");
  badge.hidden = !state.running;
  badge.textContent = state.running ? (state.total ? `${state.done}/${state.total}` : "…") : "";
  $("#index-start").disabled = state.running;
  const progress = $("#index-progress");
  progress.hidden = !state.running && !state.finished;
  progress.max = state.total || 1;
  progress.value = state.total ? state.done : state.finished ? 1 : 0;
  let text;
  if (state.running) text = state.total ? `Indexing: ${state.done.toLocaleString()} of ${state.total.toLocaleString()} files` : "Indexing: listing the files…";
  else if (state.finished) text = `The last run finished ${when(state.finished)}${state.error ? " with an error" : ""}.`;
  else text = "No run since the server started.";
  $("#index-state").textContent = text;
  $("#index-error").hidden = !state.error;
  $("#index-error").textContent = state.error || "";
  if (state.roots) clear($("#index-roots"), state.roots.map((r) => h("li", { class: "path" }, r)));
  const summary = state.summary || {};
  const rows = Object.entries(summary).filter(([, v]) => typeof v === "number");
  clear($("#index-summary"), rows.length
    ? rows.map(([key, value]) => [h("dt", {}, key.replaceAll("_", " ")),
      h("dd", {}, key === "seconds" ? `${value.toFixed(1)} s` : value.toLocaleString())])
    : h("dd", { class: "muted" }, "Nothing yet."));
  if (wasRunning && !state.running) refreshCollection();
  followIndexRun();
}

/** Follow the run by server-sent events while it runs or the index view is open. */
function followIndexRun() {
  const wanted = indexRunning || currentView === "index";
  if (!wanted) {
    events?.close();
    events = null;
    clearInterval(polling);
    polling = null;
    return;
  }
  if (events || polling) return;
  if (!("EventSource" in window)) {
    startPolling();
    return;
  }
  events = new EventSource("api/index/events");
  events.addEventListener("message", (event) => {
    try {
      renderIndex(JSON.parse(event.data));
    } catch (error) {
      showError(error);
    }
  });
  events.addEventListener("error", () => {
    // The stream broke (a proxy that buffers, the server restarting): poll instead.
    events?.close();
    events = null;
    startPolling();
  });
}

function startPolling() {
  if (polling) return;
  polling = setInterval(async () => {
    try {
      renderIndex(await api("api/index"));
    } catch {
      // the next poll tries again; the banner would only repeat itself
    }
  }, 1000);
}

function setUpIndex() {
  $("#index-start").addEventListener("click", () => guarded(async () => {
    $("#index-start").disabled = true;
    try {
      renderIfNewer(await api("api/index", { method: "POST" }));
    } catch (error) {
      $("#index-start").disabled = false;
      throw error;
    }
  }));
}

// -- start -----------------------------------------------------------------------------------

function setUpKeys() {
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !$("#banner").hidden) {
      dismissError();
      return;
    }
    const typing = event.target.closest?.("input, textarea, select, [contenteditable]");
    if (event.key === "/" && !typing && !event.ctrlKey && !event.metaKey && !event.altKey) {
      event.preventDefault();
      if (currentView !== "search") go("search");
      $("#qid").focus();
      $("#qid").select();
    }
  });
}

function start() {
  $("#banner-close").addEventListener("click", dismissError);
  window.addEventListener("error", (event) => showError(event.error || event.message));
  window.addEventListener("unhandledrejection", (event) => showError(event.reason));
  setUpKeys();
  setUpSearch();
  setUpDuplicates();
  setUpIndex();
  window.addEventListener("hashchange", onRoute);
  refreshCollection();
  guarded(async () => renderIfNewer(await api("api/index"))); // a run already going shows in the nav
  onRoute();
  document.documentElement.dataset.ready = "true";
}

start();
