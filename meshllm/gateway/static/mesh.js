// The mesh page: polls the gateway's status JSON (/v1/mesh) every second and draws it.
// Plain JavaScript, no build step, no dependencies. Everything shown comes from the mesh's MQTT
// records, so text goes in with textContent only, never as HTML.
"use strict";

const POLL_MS = 1000;
const HISTORY = 60; // points of tokens/s kept per replica for the sparkline
const history = new Map(); // replica id -> [tokens/s, ...]
let apiKey = sessionStorage.getItem("meshllm-api-key") || "";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") e.className = v;
    else if (k === "style") e.setAttribute("style", v);
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// one stable colour per node id
function hue(s) {
  let h = 0;
  for (const ch of s) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return h % 360;
}
const colour = (node) => `hsl(${hue(node)}, 62%, 64%)`;

const fmt = {
  num: (v, d = 1) => (typeof v === "number" && isFinite(v) ? v.toFixed(d) : "—"),
  giga: (v) => (typeof v === "number" ? (v / 1e9).toFixed(1) : "—"),
  bytes: (v) => {
    if (typeof v !== "number") return "—";
    return v >= 1e9 ? (v / 1e9).toFixed(1) + " GB" : (v / 1e6).toFixed(0) + " MB";
  },
  layers: (a, b) => (b - a === 1 ? `layer ${a}` : `layers ${a}–${b - 1}`),
};

function setConn(state, text) {
  $("conn").dataset.state = state;
  $("conn-text").textContent = text;
}

function notice(text) {
  const n = $("notice");
  n.hidden = !text;
  n.textContent = text || "";
}

async function poll() {
  try {
    const headers = apiKey ? { Authorization: "Bearer " + apiKey } : {};
    const r = await fetch("v1/mesh", { headers, cache: "no-store" });
    if (r.status === 401) {
      $("auth").hidden = false;
      setConn("error", "API key needed");
      return;
    }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    $("auth").hidden = true;
    render(await r.json());
  } catch (e) {
    setConn("error", "gateway unreachable: " + e.message);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

function render(s) {
  document.title = `meshllm · ${s.mesh}`;
  $("mesh-name").textContent = `mesh ${s.mesh}`;
  const gw = s.gateway || {};
  if (!gw.connected) setConn("error", "gateway not connected to the broker");
  else setConn("live", "live");
  notice(!gw.connected ? gw.error || "connecting to the mesh…" : s.unavailable ? "not serving: " + s.unavailable : "");

  $("broker").textContent = s.broker || "—";
  $("planner").textContent = s.planner || "(none)";
  $("term").textContent = `term ${s.term}`;
  $("model").textContent = s.model ? s.model.id : "—";
  $("context").textContent = s.model && s.model.context_length ? `context ${s.model.context_length} tokens` : "";

  const plan = s.plan;
  $("plan-version").textContent = plan ? `v${plan.version}` : "none";
  $("plan-info").textContent = plan
    ? `${plan.replicas.length} replica${plan.replicas.length === 1 ? "" : "s"}, ${plan.n_layers} layers` +
      (plan.pinned ? ", pinned" : plan.method ? `, ${plan.method}` : "")
    : "";
  const rates = plan ? plan.replicas.map((r) => r.tokens_per_s || 0) : [];
  $("total-rate").textContent = plan ? `${fmt.num(rates.reduce((a, b) => a + b, 0))} tok/s` : "—";
  const sc = s.scheduler;
  $("queue-info").textContent = sc ? `${sc.in_flight} in flight, ${sc.queued} queued` : "";

  renderPlan(plan);
  renderMembers(s.members, plan);
  $("updated").textContent = "updated " + new Date(s.time * 1000).toLocaleTimeString();
}

function renderPlan(plan) {
  const box = $("plan");
  $("plan-title-sub").textContent = plan ? `v${plan.version} · term ${plan.term ?? "—"}` : "";
  if (!plan) {
    box.replaceChildren(el("p", { class: "muted" }, "no plan yet"));
    return;
  }
  const L = plan.n_layers || 1;
  const scale = el("div", { class: "scale", style: `grid-template-columns: repeat(${L}, 1fr)` });
  for (let i = 0; i < L; i++) scale.append(el("span", {}, i % Math.ceil(L / 16) === 0 ? String(i) : ""));
  const order = { prefill: 0, mixed: 1, decode: 2 };
  const replicas = [...plan.replicas].sort((a, b) => (order[a.role] ?? 3) - (order[b.role] ?? 3) || a.id - b.id);
  const rows = [el("div", { class: "muted", style: "font-size:11px;margin-left:220px" }, "layers"), scale];
  let prevRole = null;
  for (const r of replicas) {
    if (prevRole === "prefill" && r.role === "decode") {
      rows.push(el("div", { class: "handoff" }, "↓ KV cache hand-off, layer by layer (prefill → decode)"));
    }
    prevRole = r.role;
    rows.push(renderReplica(r, L));
  }
  if (plan.idle && plan.idle.length) rows.push(el("div", { class: "idle" }, "idle: " + plan.idle.join(", ")));
  box.replaceChildren(...rows);
}

function renderReplica(r, L) {
  const h = history.get(r.id) || [];
  h.push(r.tokens_per_s || 0);
  while (h.length > HISTORY) h.shift();
  history.set(r.id, h);

  const head = el("div", { class: "head" },
    el("div", { class: "title" }, `replica ${r.id}`, el("span", { class: `role ${r.role}` }, r.role.toUpperCase())),
    el("div", { class: "sub" }, `${r.stages.length} stage${r.stages.length === 1 ? "" : "s"} · ${r.slots} slots · ctx ${r.context}`),
    el("div", { class: `state ${r.ready ? "ready" : "loading"}` }, r.ready ? "● ready" : "◌ loading"));

  const stages = el("div", { class: "stages" });
  for (const s of r.stages) {
    const n = s.stop - s.start;
    const busy = typeof s.busy_s === "number" ? Math.min(1, s.busy_s) : 0;
    stages.append(el("div", {
      class: `stage${s.ready && s.member ? "" : " notready"}`, "data-node": s.node_id, "data-replica": String(r.id),
      style: `flex: ${n} 1 0; background: ${colour(s.node_id)}`,
      title: `${s.node_id}: ${fmt.layers(s.start, s.stop)} (stage ${s.index})` +
        (typeof s.inbox === "number" ? `, inbox ${s.inbox}, active ${s.active}` : ""),
    }, el("span", { class: "n" }, s.node_id), el("span", { class: "l" }, fmt.layers(s.start, s.stop)),
       el("span", { class: "busy", style: `width:${(busy * 100).toFixed(0)}%` })));
  }

  const max = Math.max(1, ...h);
  // newest on the right; a page just opened shows a short line ending there
  const pts = h.map((v, i) => `${100 - ((h.length - 1 - i) / (HISTORY - 1)) * 100},${24 - (v / max) * 22}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 100 26");
  svg.setAttribute("preserveAspectRatio", "none");
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", pts);
  line.setAttribute("vector-effect", "non-scaling-stroke");
  svg.append(line);

  const live = el("div", { class: "live" },
    el("span", { class: "k" }, "tokens/s"), el("span", { class: "v", "data-rate": String(r.id) }, fmt.num(r.tokens_per_s)),
    el("span", { class: "k" }, "queue"), el("span", { class: "v" }, r.queue ?? "—"),
    el("span", { class: "k" }, "active"), el("span", { class: "v" }, `${r.active ?? "—"} / ${r.slots}`),
    svg);

  return el("div", { class: "replica", "data-replica": String(r.id), "data-role": r.role }, head, stages, live);
}

function renderMembers(members, plan) {
  const where = new Map();
  if (plan) {
    for (const r of plan.replicas) {
      for (const s of r.stages) where.set(s.node_id, { r, s });
    }
  }
  const ids = Object.keys(members).sort();
  $("members-count").textContent = `${ids.length}`;
  const rows = ids.map((id) => {
    const m = members[id];
    const p = m.profile || {};
    const w = where.get(id);
    const st = m.stats;
    return el("tr", { "data-node": id },
      el("td", {}, el("span", { class: "swatch", style: `background:${colour(id)}` }), id,
        m.name && m.name !== id ? el("span", { class: "muted" }, ` (${m.name})`) : null,
        m.planner ? el("span", { class: "badge planner" }, "planner") : null,
        m.hosts_broker ? el("span", { class: "badge broker" }, "broker") : null,
        p.emulated ? el("span", { class: "badge" }, "emulated") : null),
      el("td", {}, `${m.host ?? "?"}:${m.port ?? "?"}`),
      el("td", { class: "num" }, fmt.giga(p.flops)),
      el("td", { class: "num" }, fmt.giga(p.mem_bandwidth_Bps)),
      el("td", { class: "num" }, fmt.bytes(p.mem_bytes)),
      el("td", {}, w ? `replica ${w.r.id} (${w.r.role}), stage ${w.s.index}, ${fmt.layers(w.s.start, w.s.stop)}`
                     : plan ? "idle" : "—"),
      el("td", { class: "num" }, st ? fmt.num(st.tokens_per_s) : "—"));
  });
  $("members").tBodies[0].replaceChildren(...rows);
}

$("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  apiKey = $("auth-key").value;
  sessionStorage.setItem("meshllm-api-key", apiKey);
  $("auth").hidden = true;
});

poll();
