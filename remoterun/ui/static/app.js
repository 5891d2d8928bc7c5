// remoterun ui: the page. Routes live in the URL's hash; data comes from /api/*.
// Everything a run holds (names, tags, logs) is put in the page as text, never as HTML.
"use strict";

const TOKEN = document.querySelector('meta[name="rr-token"]').content;
const ACTIONS = document.querySelector('meta[name="rr-actions"]').content === "true";
const STATUS_COLORS = {
  COMPLETED: "#2e7d32", FAILED: "#c62828", RUNNING: "#1565c0",
  CANCELLED: "#757575", NOT_STARTED: "#9e9e9e",
};
const SERIES_COLORS = ["#1565c0", "#c62828", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f",
  "#ad1457", "#4e342e", "#283593", "#9e9d24"];

let generation = 0;  // a page's timers stop when the route changes
const timers = [];

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

async function api(path, params) {
  const query = new URLSearchParams(params || {}).toString();
  const reply = await fetch(`/api/${path}${query ? "?" + query : ""}`, {
    headers: { "X-Remoterun-Token": TOKEN },
  });
  const body = await reply.json();
  if (!reply.ok) throw new Error(body.error || reply.statusText);
  return body;
}

function every(ms, fn) {
  const mine = generation;
  let busy = false;
  const id = setInterval(async () => {
    if (mine !== generation) { clearInterval(id); return; }
    if (busy) return;
    busy = true;
    try { await fn(); } finally { busy = false; }
  }, ms);
  timers.push(id);
}

function statusBadge(status) {
  return h("span", { class: `status ${status}`, "data-status": status }, status);
}

function when(text) {
  if (!text) return "-";
  const moment = new Date(text);
  return isNaN(moment) ? text : moment.toLocaleString();
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  if (value < 60) return `${value.toFixed(1)}s`;
  const m = Math.floor(value / 60), s = Math.floor(value % 60);
  return m < 60 ? `${m}m${String(s).padStart(2, "0")}s`
    : `${Math.floor(m / 60)}h${String(m % 60).padStart(2, "0")}m`;
}

function runHref(page, ref) {
  if (ref.source !== null && ref.source !== undefined) {
    return `#/${page}/${encodeURIComponent(ref.source)}/${encodeURIComponent(ref.name)}`;
  }
  return `#/${page}?url=${encodeURIComponent(ref.url)}`;
}

function refParams(ref) {
  return ref.url ? { url: ref.url } : { source: ref.source, name: ref.name };
}

function tags(map) {
  return Object.entries(map || {}).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`));
}

// replaceChildren with the absent parts (null, undefined) left out, not written as text
function fill(node, ...kids) {
  node.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined));
}

function show(...nodes) {
  fill(document.getElementById("main"), ...nodes);
}

function problem(error) {
  return h("p", { class: "problem", id: "problem" }, String(error.message || error));
}

// ---------------------------------------------------------------- the runs

const runsState = { sort: "start", desc: true, status: "", q: "", offset: 0, limit: 50,
  selected: new Set() };

function runsPage() {
  newPage();
  const st = runsState;
  const info = h("span", { class: "muted", id: "runs-info" });
  const problems = h("div", { id: "runs-problems", class: "problem" });
  const body = h("tbody");
  const columns = [["name", "name"], ["status", "status"], ["function", "function"],
    ["host", "host"], ["start", "start"], ["duration", "duration"], [null, "tags"],
    ["source", "system"]];
  const header = h("tr", {}, h("th", {}, ""), columns.map(([key, label]) => h("th", {
    class: key === st.sort ? `sorted ${st.desc ? "" : "asc"}` : null,
    "data-sort": key,
    onclick: () => {
      if (!key) return;
      st.desc = st.sort === key ? !st.desc : key === "start" || key === "duration";
      st.sort = key;
      runsPage();
    },
  }, label)));
  const search = h("input", { type: "search", placeholder: "filter: name, function, host, tag",
    value: st.q, id: "filter" });
  search.addEventListener("input", () => { st.q = search.value; st.offset = 0; load(); });
  const statusSelect = h("select", { id: "status-filter" },
    ["", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "NOT_STARTED"].map(
      (s) => h("option", { value: s, selected: s === st.status }, s || "any status")));
  statusSelect.addEventListener("change", () => {
    st.status = statusSelect.value; st.offset = 0; load();
  });
  const compare = h("button", { id: "compare", onclick: () => {
    location.hash = `#/metrics?runs=${encodeURIComponent([...st.selected].join(","))}`;
  } }, "Compare metrics");
  const prev = h("button", { onclick: () => { st.offset = Math.max(0, st.offset - st.limit); load(); } }, "previous");
  const next = h("button", { onclick: () => { st.offset += st.limit; load(); } }, "next");
  const pageInfo = h("span", { class: "muted", id: "page-info" });
  show(
    h("h1", {}, "Runs"),
    h("div", { class: "toolbar" }, search, statusSelect, compare, info),
    problems,
    h("table", { id: "runs-table" }, h("thead", {}, header), body),
    h("div", { class: "pager" }, prev, next, pageInfo),
  );

  async function load() {
    let answer;
    try {
      answer = await api("runs", { offset: st.offset, limit: st.limit, sort: st.sort,
        desc: st.desc ? 1 : 0, status: st.status, q: st.q });
    } catch (error) {
      problems.replaceChildren(String(error.message || error));
      return;
    }
    problems.replaceChildren(...answer.problems.map((p) => h("div", {}, p)));
    info.textContent = answer.complete
      ? `${answer.total} runs`
      : `${answer.total} runs (read ${answer.known} so far; sorted among those)`;
    pageInfo.textContent = answer.matching
      ? `${st.offset + 1}–${st.offset + answer.runs.length} of ${answer.matching}` : "no runs";
    body.replaceChildren(...answer.runs.map((run) => {
      const ref = `${run.source}:${run.name}`;
      const box = h("input", { type: "checkbox", checked: st.selected.has(ref),
        disabled: run.metrics.length ? null : true,
        title: run.metrics.length ? "select to compare metrics" : "no metrics" });
      box.addEventListener("change", () => {
        if (box.checked) st.selected.add(ref); else st.selected.delete(ref);
      });
      return h("tr", { "data-name": run.name, "data-source": run.source },
        h("td", {}, box),
        h("td", { class: "name" }, h("a", { href: runHref("run", run) }, run.name)),
        h("td", { class: "status-cell" }, statusBadge(run.status)),
        h("td", {}, run.function),
        h("td", {}, run.host),
        h("td", {}, when(run.start)),
        h("td", {}, seconds(run.duration)),
        h("td", {}, tags(run.tags)),
        h("td", { class: "muted" }, run.system));
    }));
    document.body.dataset.runsLoaded = String(Date.now());
  }
  load();
  every(1500, load);
}

// ---------------------------------------------------------------- one run

function runPage(ref) {
  const head = h("div");
  const errorBox = h("div");
  const details = h("div");
  const outs = {};
  const logs = ["stdout", "stderr"].map((stream) => {
    outs[stream] = h("pre", { id: `log-${stream}` });
    return h("div", {}, h("h2", {}, stream), outs[stream]);
  });
  show(head, errorBox, details, h("div", { class: "cols" }, logs));
  const offsets = { stdout: 0, stderr: 0 };
  const done = { stdout: false, stderr: false };
  let terminal = false;

  async function record() {
    let run;
    try { run = await api("run", refParams(ref)); } catch (error) {
      fill(head, problem(error)); return;
    }
    terminal = run.terminal;
    const here = { source: run.source, name: run.name, url: ref.url };
    const actions = run.actions.map((action) => h("button", {
      "data-action": action, onclick: () => act(action, here, run.name),
    }, action === "rerun" ? "re-run" : action === "copy" ? "copy to…" : action));
    fill(head,
      h("h1", {}, run.name, " ", statusBadge(run.status)),
      h("div", { class: "toolbar" },
        h("a", { href: runHref("lineage", here), id: "to-lineage" }, "lineage"),
        run.metrics.length ? h("a", { href: `#/metrics?runs=${encodeURIComponent(`${run.source}:${run.name}`)}` }, "metrics") : null,
        h("span", { class: "muted" }, run.url)),
      actions.length ? h("div", { class: "actions" }, actions) : null,
    );
    fill(errorBox, ...(run.error ? [
      h("h2", {}, "error"),
      h("p", { class: "problem", id: "run-error" }, `${run.error_type || ""}: ${run.error}`),
      run.traceback ? h("pre", { class: "traceback", id: "traceback" }, run.traceback) : null,
    ] : []));
    const inputs = run.inputs || {};
    const inputText = inputs.present === false ? "no inputs.pkl"
      : inputs.problem ? inputs.problem
      : `${inputs.size} bytes, digest ${inputs.digest}; classes: ${(inputs.classes || []).join(", ") || "none"}`;
    const fields = [
      ["function", run.function], ["host", run.host], ["started", when(run.start)],
      ["ended", when(run.end)], ["duration", seconds(run.duration)], ["attempt", run.attempt],
      ["params", JSON.stringify(run.params)], ["tags", tags(run.tags)],
      ["metrics", run.metrics.join(", ") || "-"], ["inputs", inputText],
      ["arguments' fingerprint", inputs.fingerprint || "-"],
      ["parent", run.parent || "-"], ["upstream", run.upstream.length], ["downstream", run.downstream.length],
    ];
    fill(details,
      h("dl", { class: "record", id: "record" }, fields.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      run.attempts.length ? h("div", {}, h("h2", {}, "earlier attempts"), h("table", { id: "attempts" },
        h("tr", {}, ["attempt", "status", "start", "end", "error"].map((t) => h("th", {}, t))),
        run.attempts.map((a) => h("tr", {}, h("td", {}, a.attempt), h("td", {}, statusBadge(a.status)),
          h("td", {}, when(a.start)), h("td", {}, when(a.end)), h("td", {}, a.error || ""))))) : null,
      h("details", {}, h("summary", {}, "the whole record"),
        h("pre", {}, JSON.stringify(run.record, null, 1))),
    );
  }

  async function follow() {
    for (const stream of ["stdout", "stderr"]) {
      if (done[stream]) continue;
      let part;
      try { part = await api("log", { ...refParams(ref), stream, offset: offsets[stream] }); }
      catch (error) { continue; }
      if (part.text) {
        const out = outs[stream];
        const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
        out.append(part.text);
        if (atEnd) out.scrollTop = out.scrollHeight;
      }
      offsets[stream] = part.offset;
      done[stream] = part.terminal;
    }
  }

  (async () => { await record(); await follow(); })();
  every(1000, async () => {
    if (!terminal || !done.stdout || !done.stderr) {
      await follow();
      if (!terminal) await record();
    }
  });
}

async function act(action, ref, name) {
  let target = null;
  if (action === "copy") {
    target = prompt(`Copy run ${name} to (a store URL such as s3://bucket/runs, or a saved cluster):`);
    if (!target) return;
  }
  if (!confirm(`${action} run ${name}${target ? " to " + target : ""}?`)) return;
  const reply = await fetch("/api/action", {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-Remoterun-Token": TOKEN },
    body: JSON.stringify({ action, ...refParams(ref), confirm: name, target }),
  });
  const body = await reply.json();
  if (!reply.ok) { alert(body.error); return; }
  if (action === "rerun" && body.source) {
    location.hash = runHref("run", { source: body.source[0], name: body.source[1] });
  } else {
    alert(`${action}: ${JSON.stringify(body)}`);
  }
}

// ---------------------------------------------------------------- metrics

async function metricsPage(params) {
  const refs = (params.get("runs") || "").split(",").filter(Boolean);
  if (!refs.length) {
    show(h("h1", {}, "Metrics"), h("p", {}, "Select runs on the Runs page (their check boxes) and press “Compare metrics”."));
    return;
  }
  let answer;
  try { answer = await api("metrics", { runs: refs.join(",") }); } catch (error) {
    show(h("h1", {}, "Metrics"), problem(error)); return;
  }
  const plots = h("div", { class: "plots", id: "plots" });
  const singles = h("table", { id: "single-values" });
  show(h("h1", {}, "Metrics"),
    h("p", { class: "muted" }, answer.runs.map((r) => r.name).join(", ")), plots, singles);
  const names = [...new Set(answer.runs.flatMap((r) => Object.keys(r.metrics)))].sort();
  for (const metric of names) {
    const withSeries = answer.runs.filter((r) => r.metrics[metric] && r.metrics[metric].steps);
    if (!withSeries.length) continue;
    const xs = [...new Set(withSeries.flatMap((r) => r.metrics[metric].steps))].sort((a, b) => a - b);
    const data = [xs];
    for (const run of withSeries) {
      const at = new Map(run.metrics[metric].steps.map((s, i) => [s, run.metrics[metric].values[i]]));
      data.push(xs.map((x) => (at.has(x) ? at.get(x) : null)));
    }
    const box = h("div", { class: "plot", "data-metric": metric });
    plots.append(box);
    new uPlot({
      title: metric, width: 520, height: 280,
      scales: { x: { time: false } },
      axes: [{ label: "step" }, {}],
      series: [{ label: "step" }, ...withSeries.map((run, i) => ({
        label: run.name, stroke: SERIES_COLORS[i % SERIES_COLORS.length], width: 2,
        spanGaps: true, points: { show: xs.length < 60 },
      }))],
    }, data, box);
  }
  const singleRows = answer.runs.flatMap((run) => Object.entries(run.metrics)
    .filter(([, m]) => "value" in m).map(([k, m]) => h("tr", {}, h("td", {}, run.name), h("td", {}, k), h("td", {}, m.value))));
  if (singleRows.length) {
    singles.append(h("tr", {}, h("th", {}, "run"), h("th", {}, "metric"), h("th", {}, "value")), ...singleRows);
  }
  document.body.dataset.plotsDrawn = String(plots.querySelectorAll("canvas").length);
}

// ---------------------------------------------------------------- lineage

async function lineagePage(ref) {
  let graph;
  try { graph = await api("graph", refParams(ref)); } catch (error) {
    show(h("h1", {}, "Lineage"), problem(error)); return;
  }
  const rootNode = graph.nodes.find((n) => n.root) || graph.nodes[0];
  // Layers by longest path from the runs nothing points to.
  const layer = new Map(graph.nodes.map((n) => [n.id, 0]));
  for (let pass = 0; pass < graph.nodes.length; pass++) {
    let moved = false;
    for (const e of graph.edges) {
      const want = layer.get(e.from) + 1;
      if (layer.has(e.to) && layer.get(e.to) < want) { layer.set(e.to, want); moved = true; }
    }
    if (!moved) break;
  }
  const columns = new Map();
  for (const n of graph.nodes) {
    const l = layer.get(n.id);
    if (!columns.has(l)) columns.set(l, []);
    columns.get(l).push(n);
  }
  const W = 190, H = 48, GX = 70, GY = 26;
  const pos = new Map();
  let maxRows = 0;
  for (const [l, nodes] of columns) {
    maxRows = Math.max(maxRows, nodes.length);
    nodes.forEach((n, i) => pos.set(n.id, { x: 20 + l * (W + GX), y: 20 + i * (H + GY) }));
  }
  const width = 40 + columns.size * (W + GX), height = 40 + maxRows * (H + GY);
  const NS = "http://www.w3.org/2000/svg";
  const s = (tag, attrs, ...kids) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    node.append(...kids);
    return node;
  };
  const svg = s("svg", { id: "lineage", width, height, viewBox: `0 0 ${width} ${height}` },
    s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "10", refY: "5",
      markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" },
      s("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#6b7580" }))));
  for (const e of graph.edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    if (!a || !b) continue;
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
    svg.append(s("path", { class: `edge ${e.kind}`, d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`,
      fill: "none", stroke: "#6b7580", "stroke-width": "1.5",
      "stroke-dasharray": e.kind === "produced" ? "5,4" : "", "marker-end": "url(#arrow)" },
      s("title", {}, e.kind)));
  }
  for (const n of graph.nodes) {
    const p = pos.get(n.id);
    const color = STATUS_COLORS[n.status] || "#424242";
    const node = s("g", { class: "node", "data-name": n.name, "data-status": n.status,
      transform: `translate(${p.x},${p.y})` },
      s("rect", { width: W, height: H, rx: 6, fill: "#fff", stroke: color,
        "stroke-width": n.root ? 3 : 2 }),
      s("rect", { width: 8, height: H, rx: 3, fill: color }),
      s("text", { x: 16, y: 19, "font-weight": "600" }, n.name.length > 24 ? n.name.slice(0, 23) + "…" : n.name),
      s("text", { x: 16, y: 37, fill: color }, `${n.status} · ${n.function || ""}`),
      s("title", {}, n.url));
    node.addEventListener("click", () => { location.hash = runHref("run", n); });
    svg.append(node);
  }
  show(h("h1", {}, "Lineage of ", rootNode ? rootNode.name : ""),
    h("p", { class: "muted" }, "dashed: started by (produced); solid: result used by. Click a run to open it."),
    svg);
}

// ---------------------------------------------------------------- routing

// A new page (or the runs page drawn again): the old one's timers stop.
function newPage() {
  generation += 1;
  while (timers.length) clearInterval(timers.pop());
}

function route() {
  newPage();
  const hash = location.hash.replace(/^#\/?/, "");
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const page = parts[0] || "runs";
  const ref = params.get("url") ? { url: params.get("url") } : { source: parts[1], name: parts[2] };
  document.getElementById("mode").textContent = ACTIONS ? "actions allowed" : "read-only";
  if (page === "run") runPage(ref);
  else if (page === "metrics") metricsPage(params);
  else if (page === "lineage") lineagePage(ref);
  else runsPage();
}

window.addEventListener("hashchange", route);
route();
