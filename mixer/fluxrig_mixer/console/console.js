// fluxrig Mixer console. Vanilla JS, no dependencies, nothing loaded from elsewhere.
// Data comes from the Mixer's API (same origin, session cookie + X-CSRF-Token on every
// state-changing call) and live changes from one EventSource per page (/api/v1/events).
// Untrusted text (names, labels, log lines) only ever goes through textContent/attributes.
"use strict";

const S = {
  me: null, csrf: "", es: null, fleet: new Map(), view: null,
  fleetUI: { q: "", status: "", sort: "name", dir: 1 },
  tail: { paused: false, lines: [] },
};
const LEVELS = ["trace", "debug", "info", "warn", "error", "fatal"];
const RANGES = [["15m", "15 min"], ["1h", "1 hour"], ["6h", "6 hours"], ["24h", "24 hours"], ["168h", "7 days"]];
const STATUSES = ["pending", "active", "offline", "suspended", "removed"];
const SVGNS = "http://www.w3.org/2000/svg";

// -- DOM helpers --------------------------------------------------------------------------------
function build(ns, tag, attrs, kids) {
  const el = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") el.textContent = v;
    else if (k === "on") for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    else if (k === "class") el.setAttribute("class", v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "value" && !ns) el.value = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
const h = (tag, attrs, ...kids) => build(null, tag, attrs, kids);
const s = (tag, attrs, ...kids) => build(SVGNS, tag, attrs, kids);
const put = (el, ...kids) => el.replaceChildren(...kids.flat().filter((k) => k !== null && k !== undefined && k !== false));
// Repaints replace elements; a keyboard user must not lose the focused control to a live update.
function focusKey(el) {
  if (!el || el === document.body) return null;
  if (el.id) return `#${CSS.escape(el.id)}`;
  for (const [k, v] of Object.entries(el.dataset || {})) return `[data-${k.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}="${CSS.escape(v)}"]`;
  return null;
}
function keepFocus(container, fn) {
  const active = document.activeElement;
  const key = container.contains(active) ? focusKey(active) : null;
  fn();
  if (key) { const again = container.querySelector(key); if (again && again !== document.activeElement) again.focus(); }
}
const $ = (sel, root = document) => root.querySelector(sel);
const main = () => $("#main");

function toast(text, err = false) {
  const box = h("div", { class: err ? "err" : "", text });
  $("#toast").append(box);
  setTimeout(() => box.remove(), err ? 9000 : 4000);
}

function ago(iso) {
  if (!iso) return "never";
  const sec = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (sec < 60) return `${Math.round(sec)} s ago`;
  if (sec < 3600) return `${Math.round(sec / 60)} min ago`;
  if (sec < 86400) return `${(sec / 3600).toFixed(1)} h ago`;
  return `${(sec / 86400).toFixed(1)} d ago`;
}
const fmtNum = (v) => (v === null || v === undefined ? "–" : String(v));
const rate = (v) => (v === null || v === undefined ? "–" : v >= 100 ? v.toFixed(0) : v.toFixed(1));
function badge(cls, text) {
  const el = document.createElement("span");
  el.className = `badge ${cls}`;
  el.textContent = text;
  return el;
}
const statusBadge = (st) => badge(`s-${st}`, st);
const applyBadge = (st) => badge(`a-${st}`, st);

// -- API ------------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message, body) { super(message); this.status = status; this.body = body; }
}

async function api(method, path, body, opts = {}) {
  const headers = { Accept: "application/json" };
  if (method !== "GET" && method !== "HEAD") headers["X-CSRF-Token"] = S.csrf;
  let payload;
  if (body !== undefined) {
    if (typeof body === "string") { payload = body; headers["Content-Type"] = opts.type || "text/plain"; }
    else { payload = JSON.stringify(body); headers["Content-Type"] = "application/json"; }
  }
  const r = await fetch(path, { method, headers, body: payload, credentials: "same-origin", cache: "no-store" });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (r.status === 401 && !opts.login) { loggedOut(data && data.error); throw new ApiError(401, "logged out", data); }
  if (!r.ok) throw new ApiError(r.status, (data && (data.error || data.detail)) || `HTTP ${r.status}`, data);
  return data;
}
const enc = encodeURIComponent;
const qs = (o) => Object.entries(o).filter(([, v]) => v !== "" && v !== null && v !== undefined)
  .map(([k, v]) => `${enc(k)}=${enc(v)}`).join("&");

// -- confirmation -------------------------------------------------------------------------------
function confirmAction(title, text, { reason = false, danger = true, ok = "Confirm" } = {}) {
  const dlg = $("#confirm");
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-reason-label").hidden = !reason;
  $("#confirm-reason").value = "operator request";
  const okBtn = $("#confirm-ok");
  okBtn.textContent = ok;
  okBtn.className = danger ? "danger" : "primary";
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve({ ok: dlg.returnValue === "ok", reason: $("#confirm-reason").value }), { once: true });
    dlg.returnValue = "cancel";
    dlg.showModal();
    (reason ? $("#confirm-reason") : $("#confirm-cancel")).focus();
  });
}

async function act(title, text, method, path, body, { reason = false, danger = true, after } = {}) {
  const c = await confirmAction(title, text, { reason, danger });
  if (!c.ok) return null;
  const payload = typeof body === "function" ? body(c.reason) : body;
  try {
    const out = await api(method, path, payload);
    const st = out && (out.status || out.result);
    toast(`${title}: ${st || "done"}`);
    if (after) after(out);
    return out;
  } catch (e) {
    if (e.status !== 401) toast(`${title} failed: ${e.message}`, true);
    return null;
  }
}

// -- live stream ----------------------------------------------------------------------------------
function closeStream() {
  if (S.es) { S.es.close(); S.es = null; }
  setLive(false);
}
function setLive(on) { const l = $("#live"); l.textContent = on ? "live" : "offline"; l.classList.toggle("on", on); }

function openStream(params, handlers) {
  closeStream();
  const es = new EventSource(`/api/v1/events?${qs(params)}`);
  S.es = es;
  es.onopen = () => setLive(true);
  es.onerror = async () => {
    setLive(false);
    if (es !== S.es) return;
    try { await api("GET", "/api/v1/auth/session"); } catch (_) { es.close(); }
  };
  const on = (name, fn) => es.addEventListener(name, (ev) => { if (es === S.es) fn(JSON.parse(ev.data)); });
  on("fleet", (rows) => { S.fleet = new Map(rows.map((r) => [r.id, r])); handlers.fleet && handlers.fleet(); });
  on("racks", (d) => {
    for (const r of d.changed) S.fleet.set(r.id, r);
    for (const id of d.gone) S.fleet.delete(id);
    handlers.fleet && handlers.fleet(d);
  });
  for (const name of ["rack", "logs"]) if (handlers[name]) on(name, handlers[name]);
  on("error", (d) => { toast(d.error, true); es.close(); setLive(false); });
}

// -- login / session ------------------------------------------------------------------------------
function loggedOut(why) {
  closeStream();
  S.me = null;
  S.csrf = "";
  $("#top").hidden = true;
  if (!location.hash.startsWith("#/login")) S.after = location.hash;
  renderLogin(why && why !== "missing or wrong bearer token" ? why : "");
}

function renderLogin(message) {
  const input = h("input", { id: "token", type: "password", autocomplete: "current-password", required: true, "aria-describedby": "login-help" });
  const err = h("p", { id: "login-error", class: "muted", role: "alert", text: message || "" });
  const form = h("form", {
    class: "panel login", "aria-labelledby": "login-title",
    on: {
      submit: async (ev) => {
        ev.preventDefault();
        err.textContent = "";
        try {
          const me = await api("POST", "/api/v1/auth/login", { token: input.value }, { login: true });
          input.value = "";
          await started(me);
        } catch (e) { err.textContent = e.message; input.focus(); }
      },
    },
  },
  h("h1", { id: "login-title", text: "Log in to the Mixer" }),
  h("label", {}, "API token", input),
  h("p", { id: "login-help", class: "muted", text: "The token from <state_dir>/api-token (shown by `fluxrig-mixer up`), or a named token an admin made for you. It is sent once; the session then lives in an HttpOnly cookie." }),
  h("div", { class: "buttons" }, h("button", { type: "submit", class: "primary", id: "login-submit", text: "Log in" })),
  err);
  main().replaceChildren(form);
  document.title = "Log in · fluxrig Mixer";
  input.focus();
}

async function started(me) {
  S.me = me;
  S.csrf = me.csrf || "";
  $("#who").textContent = `${me.name} · ${me.role}`;
  $("#top").hidden = false;
  api("GET", "/api/v1/health").then((hl) => { $("#mixer-name").textContent = hl.name; }).catch(() => { /* shown without */ });
  const to = S.after && !S.after.startsWith("#/login") ? S.after : "#/fleet";
  S.after = null;
  if (location.hash === to) route(); else location.hash = to;
}

async function logout() {
  closeStream();
  try { await api("POST", "/api/v1/auth/logout"); } catch (_) { /* already gone */ }
  S.me = null;
  location.hash = "#/login";
  loggedOut();
}

// -- router ---------------------------------------------------------------------------------------
function route() {
  if (!S.me) return;
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const view = parts[0] || "fleet";
  closeStream();
  for (const a of document.querySelectorAll("nav a[data-nav]")) {
    if (a.dataset.nav === view) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  main().dataset.ready = "";
  const views = { fleet: viewFleet, rack: viewRack, telemetry: viewTelemetry, scenarios: viewScenarios, tokens: viewTokens, audit: viewAudit, login: viewFleet };
  (views[view] || viewFleet)(parts.slice(1));
}
function ready(name) {
  main().dataset.ready = name;
  window.__fluxrigRendered = performance.now();
}
function title(text) { document.title = `${text} · fluxrig Mixer`; }

// -- fleet ----------------------------------------------------------------------------------------
const FLEET_COLS = [
  ["name", "Rack"], ["status", "Status"], ["scenario", "Scenario"], ["apply_state", "Apply"],
  ["last_seen", "Last seen"], ["telemetry_backlog", "Telemetry backlog"], ["lane_backlog", "Lane backlog"],
  ["killed", "Kill switch"], ["host", "Host"], ["labels", "Labels"],
];

function fleetRows() {
  const u = S.fleetUI;
  const q = u.q.trim().toLowerCase();
  let rows = [...S.fleet.values()];
  if (u.status) rows = rows.filter((r) => r.status === u.status);
  if (q) {
    rows = rows.filter((r) => [r.name, r.host, r.scenario, r.apply_state, r.apply_reason, r.version,
      ...Object.entries(r.labels || {}).map(([k, v]) => `${k}=${v}`)].join(" ").toLowerCase().includes(q));
  }
  const key = u.sort;
  rows.sort((a, b) => {
    let x = a[key], y = b[key];
    if (key === "labels") { x = JSON.stringify(x); y = JSON.stringify(y); }
    if (x === y) return a.name < b.name ? -1 : 1;
    if (x === null || x === undefined) return 1;
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * u.dir;
  });
  return rows;
}

function td(tr, text, cls) {
  const c = document.createElement("td");
  if (cls) c.className = cls;
  if (text !== undefined && text !== null) c.textContent = text;
  tr.appendChild(c);
  return c;
}

function fleetRow(r) {
  // Plain DOM calls: 500 rows x 10 cells are painted at once on every change.
  const tr = document.createElement("tr");
  tr.dataset.rack = r.name;
  const a = document.createElement("a");
  a.href = `#/rack/${enc(r.name)}`;
  a.dataset.link = r.name;
  a.textContent = r.name;
  td(tr).appendChild(a);
  const st = td(tr);
  st.appendChild(statusBadge(r.status));
  if (r.storage_failed && r.storage_failed.length) {
    const b = badge("a-rejected", `storage: ${r.storage_failed.join(", ")}`);
    b.title = "a WAL on this Rack refuses writes (its disk is full); it heals by itself once space returns";
    st.append(" ", b);
  }
  td(tr, r.target && r.target !== r.scenario ? `${r.scenario || "none"} → ${r.target}` : r.scenario || "none", "mono");
  const ap = td(tr, null, "wrap");
  ap.appendChild(applyBadge(r.apply_state));
  if (r.apply_reason) ap.appendChild(h("span", { class: "muted", text: ` ${r.apply_reason}` }));
  td(tr, ago(r.last_seen)).title = r.last_seen || "";
  td(tr, fmtNum(r.telemetry_backlog));
  td(tr, fmtNum(r.lane_backlog));
  const k = td(tr);
  if (r.killed) k.appendChild(badge("killed", "killed"));
  else if (r.stopped_gears.length) k.appendChild(badge("a-pending", `${r.stopped_gears.length} gear(s) stopped`));
  else k.textContent = "armed";
  td(tr, r.host || "");
  td(tr, Object.entries(r.labels || {}).map(([kk, v]) => `${kk}=${v}`).join(", "), "wrap mono");
  return tr;
}

function viewFleet() {
  title("Fleet");
  const u = S.fleetUI;
  const counts = h("div", { class: "counts", "aria-live": "polite" });
  const tbody = h("tbody", { id: "fleet-body" });
  const shown = h("span", { class: "muted", id: "fleet-shown" });
  const heads = FLEET_COLS.map(([key, label]) => h("th", { scope: "col", dataset: { key } },
    h("button", { type: "button", class: "sort", text: label, "aria-sort": "none",
      on: { click: () => { if (u.sort === key) u.dir = -u.dir; else { u.sort = key; u.dir = 1; } paint(); } } })));
  const filter = h("input", { type: "search", id: "fleet-filter", value: u.q, placeholder: "name, host, label, version…",
    on: { input: (e) => { u.q = e.target.value; paint(); } } });
  const status = h("select", { id: "fleet-status", on: { change: (e) => { u.status = e.target.value; paint(); } } },
    h("option", { value: "", text: "any" }), STATUSES.map((st) => h("option", { value: st, text: st })));
  status.value = u.status;
  main().replaceChildren(
    h("h1", { text: "Fleet" }), counts,
    h("div", { class: "row panel" }, h("label", {}, "Filter", filter), h("label", {}, "Status", status), shown),
    h("div", { class: "scroll" }, h("table", { id: "fleet" }, h("caption", { class: "muted", text: "Every Rack, live. Sort by a column heading." }), h("thead", {}, h("tr", {}, heads)), tbody)));
  let pending = false;
  function paint() {
    pending = false;
    for (const th of heads) th.setAttribute("aria-sort", th.dataset.key === u.sort ? (u.dir > 0 ? "ascending" : "descending") : "none");
    const rows = fleetRows();
    const frag = document.createDocumentFragment();
    for (const r of rows) frag.append(fleetRow(r));
    keepFocus(tbody, () => tbody.replaceChildren(frag));
    shown.textContent = `${rows.length} of ${S.fleet.size} Racks shown`;
    const by = {};
    for (const r of S.fleet.values()) by[r.status] = (by[r.status] || 0) + 1;
    counts.replaceChildren(...STATUSES.filter((st) => by[st]).map((st) => h("span", {}, statusBadge(st), ` ${by[st]}`)),
      h("span", { class: "muted", text: `${[...S.fleet.values()].filter((r) => r.killed).length} killed` }));
    ready("fleet");
  }
  openStream({}, { fleet: () => { if (!pending) { pending = true; requestAnimationFrame(paint); } } });
}

// -- rack -----------------------------------------------------------------------------------------
const GW = 190, GAP_X = 90, GAP_Y = 44, PORT_H = 16, HEAD_H = 38, LEFT = 44;

function layoutGraph(g) {
  const names = g.gears.map((x) => x.name);
  const succ = new Map(names.map((n) => [n, []]));
  const preds = new Map(names.map((n) => [n, 0]));
  for (const w of g.wires) if (succ.has(w.from) && succ.has(w.to) && w.from !== w.to) { succ.get(w.from).push(w.to); preds.set(w.to, preds.get(w.to) + 1); }
  const layer = new Map(), band = new Map();
  let b = 0;
  const dfs = (n, d) => { if (layer.has(n)) return; layer.set(n, d); band.set(n, b); for (const m of succ.get(n)) dfs(m, d + 1); };
  for (const n of names.filter((n) => preds.get(n) === 0)) if (!layer.has(n)) { dfs(n, 0); b++; }
  for (const n of names) if (!layer.has(n)) { dfs(n, 0); b++; }
  const pos = new Map();
  let y = 16;
  let maxLayer = 0;
  for (let i = 0; i < b; i++) {
    const members = names.filter((n) => band.get(n) === i);
    const perLayer = new Map();
    let bandH = 0;
    for (const n of members) {
      const gear = g.gears.find((x) => x.name === n);
      const hgt = HEAD_H + PORT_H * Math.max(1, gear.inputs.length, gear.outputs.length) + 22;
      const L = layer.get(n);
      maxLayer = Math.max(maxLayer, L);
      const off = perLayer.get(L) || 0;
      pos.set(n, { x: LEFT + L * (GW + GAP_X), y: y + off, h: hgt });
      perLayer.set(L, off + hgt + GAP_Y);
      bandH = Math.max(bandH, off + hgt);
    }
    y += bandH + GAP_Y * 1.5;
  }
  return { pos, width: LEFT + (maxLayer + 1) * (GW + GAP_X) + (g.remote.length ? GW + 20 : 0), height: Math.max(y, 80) };
}

function portY(p, gear, port, side) {
  const list = side === "in" ? gear.inputs : gear.outputs;
  const i = Math.max(0, list.indexOf(port));
  return p.y + HEAD_H + PORT_H * i + PORT_H / 2;
}

function drawGraph(g, onGear) {
  const { pos, width, height } = layoutGraph(g);
  const byName = new Map(g.gears.map((x) => [x.name, x]));
  let peerY = 16;
  const peers = g.remote.map((r) => { const p = { r, y: peerY }; peerY += 46; return p; });
  const H = Math.max(height, peerY + 10);
  const svg = s("svg", { class: "graph", id: "graph", viewBox: `0 0 ${width} ${H}`, role: "img", "aria-label": `Scenario graph: ${g.gears.length} gears, ${g.wires.length} wires, ${g.remote.length} cross-Rack wires` },
    s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" },
      s("path", { d: "M0 0L10 5L0 10z", fill: "#31516b" })),
    s("marker", { id: "arrow-remote", viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" },
      s("path", { d: "M0 0L10 5L0 10z", fill: "#a15c00" }))));
  let lowBy = 40;
  const curve = (x1, y1, x2, y2) => {
    const dx = Math.max(50, Math.abs(x2 - x1) / 2);
    if (x2 <= x1 + 10) { // a wire back to an earlier gear: down, left under both boxes, up into the input
      const low = Math.max(y1, y2) + lowBy;
      return `M${x1} ${y1} C${x1 + 34} ${y1}, ${x1 + 34} ${low}, ${x1} ${low} L${x2} ${low} C${x2 - 34} ${low}, ${x2 - 34} ${y2}, ${x2} ${y2}`;
    }
    return `M${x1} ${y1} C${x1 + dx} ${y1}, ${x2 - dx} ${y2}, ${x2} ${y2}`;
  };
  for (const w of g.wires) {
    const a = pos.get(w.from), b = pos.get(w.to);
    if (!a || !b) continue;
    lowBy = Math.max(a.y + a.h, b.y + b.h) - Math.max(portY(a, byName.get(w.from), w.from_port, "out"), portY(b, byName.get(w.to), w.to_port, "in")) + 14;
    const path = s("path", { class: "wire", d: curve(a.x + GW, portY(a, byName.get(w.from), w.from_port, "out"), b.x - 2, portY(b, byName.get(w.to), w.to_port, "in")), "marker-end": "url(#arrow)", dataset: { wire: `${w.from}.${w.from_port}->${w.to}.${w.to_port}` } },
      s("title", { text: `${w.from}.${w.from_port} → ${w.to}.${w.to_port}` }));
    svg.append(path);
  }
  const px = width - GW - 4;
  for (const { r, y } of peers) {
    const a = pos.get(r.gear);
    const label = `${r.direction === "out" ? "to" : "from"} ${r.peer}`;
    svg.append(s("g", { class: "peer", dataset: { remote: `${r.gear}.${r.port}` } },
      s("rect", { x: px, y, width: GW, height: 36, rx: 5 }),
      s("text", { x: px + 8, y: y + 15, text: "other Rack · guaranteed lane" }),
      s("text", { x: px + 8, y: y + 29, text: label.length > 30 ? label.slice(0, 29) + "…" : label }),
      s("title", { text: `cross-Rack wire ${label} (${r.subject || "subject unknown"})` })));
    if (a) {
      const gear = byName.get(r.gear);
      const d = r.direction === "out"
        ? curve(a.x + GW, portY(a, gear, r.port, "out"), px - 2, y + 18)
        : curve(px + GW, y + 18, a.x - 2, portY(a, gear, r.port, "in"));
      svg.append(s("path", { class: "wire remote", d, "marker-end": "url(#arrow-remote)" }, s("title", { text: `cross-Rack wire ${label}` })));
    }
  }
  for (const gear of g.gears) {
    const p = pos.get(gear.name);
    const grp = s("g", { class: `gear${gear.stopped ? " stopped" : ""}`, tabindex: "0", role: "button", "aria-label": `gear ${gear.name} (${gear.type})`, dataset: { gear: gear.name },
      on: { click: () => onGear(gear.name), keydown: (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); onGear(gear.name); } } } },
    s("rect", { class: "box", x: p.x, y: p.y, width: GW, height: p.h, rx: 6 }),
    s("text", { x: p.x + 10, y: p.y + 16, "font-weight": "600", text: gear.name }),
    s("text", { class: "type", x: p.x + 10, y: p.y + 30, text: gear.type + (gear.stopped ? " · stopped" : "") }));
    gear.inputs.forEach((port, i) => {
      const y = p.y + HEAD_H + PORT_H * i + PORT_H / 2;
      grp.append(s("circle", { class: "port", cx: p.x, cy: y, r: 4 }), s("text", { class: "port-label", x: p.x + 8, y: y + 3, text: port }));
    });
    gear.outputs.forEach((port, i) => {
      const y = p.y + HEAD_H + PORT_H * i + PORT_H / 2;
      grp.append(s("circle", { class: "port", cx: p.x + GW, cy: y, r: 4 }), s("text", { class: "port-label", x: p.x + GW - 8, y: y + 3, "text-anchor": "end", text: port }));
    });
    grp.append(s("text", { class: "rate", x: p.x + 10, y: p.y + p.h - 8, dataset: { rate: gear.name }, text: "in – · out – · err –" }));
    svg.append(grp);
  }
  return svg;
}

const RACK_NAME_RE = /^[a-z0-9_-]{1,63}$/; // fluxrig.wire.subjects.RACK_NAME_RE, checked again by the API

function rackActions(r, reload) {
  const n = r.name, base = `/api/v1/racks/${enc(n)}`;
  const cmd = (reason) => ({ reason, wait: 5 });
  const b = (label, id, fn, show = true) => (show ? h("button", { type: "button", id, text: label, on: { click: fn } }) : null);
  const killed = r.stats && r.stats.ctrl && r.stats.ctrl.killed;
  return h("div", { class: "actions", id: "rack-actions" },
    b("Approve", "act-approve", () => act("Approve", `Approve Rack ${n}: it becomes active, gets a signed passport and runs its part of the active scenario.`, "POST", `${base}/approve`, {}, { danger: false, after: reload }), r.status === "pending"),
    b("Activate", "act-activate", () => act("Activate", `Activate Rack ${n} again: it gets a passport and runs its scenario.`, "POST", `${base}/activate`, undefined, { danger: false, after: reload }), r.status === "suspended" || r.status === "offline"),
    b("Suspend", "act-suspend", () => act("Suspend", `Suspend Rack ${n}: its passport is withdrawn and its gears stop until it is activated again.`, "POST", `${base}/suspend`, undefined, { after: reload }), r.status === "active" || r.status === "offline"),
    b("Kill", "act-kill", () => act("Kill", `Kill Rack ${n}: every gear stops and it refuses all traffic, across restarts, until it is revived.`, "POST", `${base}/kill`, cmd, { reason: true, after: reload }), !killed && r.status !== "removed"),
    b("Revive", "act-revive", () => act("Revive", `Revive Rack ${n}: the kill and any stopped gears are cleared; it runs its passport's scenario again.`, "POST", `${base}/revive`, cmd, { reason: true, danger: false, after: reload }), r.status !== "removed"),
    b("Shut down", "act-shutdown", () => act("Shut down", `Shut down the fluxrig process of Rack ${n}. It stays down unless its service manager restarts it.`, "POST", `${base}/shutdown`, (reason) => ({ reason }), { reason: true, after: reload }), r.status === "active"),
    b("Remove", "act-remove", () => act("Remove", `Remove Rack ${n} from the registry: its bus access is withdrawn and it no longer gets scenarios.`, "DELETE", base, undefined, { after: reload }), r.status !== "removed"),
    h("label", {}, "Log level", h("select", { id: "act-loglevel", on: { change: async (e) => { const lv = e.target.value; if (!lv) return; await act("Log level", `Set the log level of Rack ${n} to ${lv}.`, "POST", `${base}/log-level`, { level: lv }, { danger: false }); e.target.value = ""; } } },
      h("option", { value: "", text: "change…" }), ["debug", "info", "warning", "error"].map((l) => h("option", { value: l, text: l })))));
}

async function viewRack([name]) {
  title(`Rack ${name}`);
  let rack, graph;
  try {
    [rack, graph] = await Promise.all([api("GET", `/api/v1/racks/${enc(name)}`), api("GET", `/api/v1/console/racks/${enc(name)}/graph`)]);
  } catch (e) {
    if (e.status !== 401) main().replaceChildren(h("h1", { text: `Rack ${name}` }), h("p", { role: "alert", text: e.message }), h("a", { href: "#/fleet", text: "Back to the fleet" }));
    return;
  }
  const head = h("div", { id: "rack-head" });
  const actions = h("div", { id: "actions-slot" });
  const gearBody = h("tbody", { id: "gears-body" });
  const events = h("tbody", { id: "events-body" });
  const audit = h("tbody", { id: "rack-audit" });
  const detail = h("div", { id: "gear-detail", class: "muted", text: "Select a gear in the graph (Tab, then Enter) for its counters." });
  const rates = new Map();
  let prev = null;
  let selected = null;
  const showGear = (gname) => {
    selected = gname;
    const st = (rack.stats && rack.stats.gears && rack.stats.gears[gname]) || {};
    detail.replaceChildren(h("h3", { text: `Gear ${gname}` }), h("dl", { class: "kv" }, Object.entries(st).map(([k, v]) => [h("dt", { text: k }), h("dd", { class: "mono", text: String(v) })])));
  };
  const svgBox = h("div", { class: "scroll" }, drawGraph(graph, showGear));
  const connGear = h("select", { id: "conn-gear" }, h("option", { value: "", text: "any gear" }), graph.gears.map((g) => h("option", { value: g.name, text: g.name })));
  const connId = h("input", { id: "conn-id", type: "text", placeholder: "conn.id from the log", size: 36 });
  const chart = h("div", { id: "rack-chart" });
  const range = rangeSelect("rack-range", () => loadChart());
  const chartGear = h("select", { id: "rack-chart-gear", on: { change: () => loadChart() } }, h("option", { value: "", text: "all gears" }), graph.gears.map((g) => h("option", { value: g.name, text: g.name })));

  const renameTo = h("input", { id: "rename-to", type: "text", placeholder: "a-z, 0-9, _ and -", size: 24, maxlength: 63, autocomplete: "off" });
  async function renameRack() {
    const to = renameTo.value.trim();
    if (!RACK_NAME_RE.test(to)) { toast("a Rack name is 1-63 of a-z, 0-9, _ and -", true); renameTo.focus(); return; }
    if (to === rack.name) { toast(`the Rack is already named ${to}`, true); renameTo.focus(); return; }
    const out = await act("Rename", `Rename Rack ${rack.name} to ${to}. Its status stays; it gets a passport with the new name, and its wires and guaranteed-lane backlog follow it.`,
      "POST", `/api/v1/racks/${enc(rack.name)}/rename`, { name: to }, { danger: false });
    if (out) location.hash = `#/rack/${enc(out.name || to)}`;
  }
  function reload() { api("GET", `/api/v1/racks/${enc(name)}`).then((r) => { rack = r; paint(); }).catch(() => {}); }
  function paint() {
    const r = rack;
    const ctrl = (r.stats && r.stats.ctrl) || {};
    const tel = (r.stats && r.stats.telemetry) || {};
    head.replaceChildren(h("dl", { class: "kv" },
      h("dt", { text: "Status" }), h("dd", {}, statusBadge(r.status), ` since ${ago(r.status_since)}`),
      h("dt", { text: "Kill switch" }), h("dd", { id: "kill-state" }, ctrl.killed ? [badge("killed", "killed"), ` ${ctrl.reason || ""}`] : "armed (running)",
        (ctrl.stopped_gears || []).length ? ` · stopped gears: ${ctrl.stopped_gears.join(", ")}` : ""),
      h("dt", { text: "Scenario" }), h("dd", { id: "rack-scenario" }, h("span", { class: "mono", text: r.scenario.version || "none" }), " ", applyBadge(r.scenario.apply_state),
        r.scenario.target && r.scenario.target !== r.scenario.version ? ` target ${r.scenario.target}` : "", r.scenario.reason ? h("span", { class: "muted", text: ` ${r.scenario.reason}` }) : ""),
      h("dt", { text: "Last seen" }), h("dd", { title: r.last_seen || "", text: ago(r.last_seen) }),
      h("dt", { text: "Host · version" }), h("dd", { text: `${r.host || "?"} · fluxrig ${r.version || "?"}` }),
      h("dt", { text: "Telemetry backlog" }), h("dd", { text: fmtNum(tel.backlog) }),
      h("dt", { text: "Labels" }), h("dd", { class: "mono", text: Object.entries(r.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ") || "none" })));
    keepFocus(actions, () => actions.replaceChildren(rackActions(r, reload)));
    const gs = (r.stats && r.stats.gears) || {};
    const t = Date.parse(r.last_seen || "") / 1000;
    if (prev && t > prev.t) {
      for (const [gname, st] of Object.entries(gs)) {
        const p = prev.gears[gname];
        if (!p) continue;
        const dt = t - prev.t;
        const d = (k) => Math.max(0, ((st[k] || 0) - (p[k] || 0)) / dt);
        rates.set(gname, { in: d("messages_in"), out: d("messages_out"), err: d("errors") });
      }
    }
    if (!prev || t > prev.t) prev = { t, gears: gs };
    keepFocus(gearBody, () => gearBody.replaceChildren(...graph.gears.map((g) => {
      const st = gs[g.name] || {};
      const rt = rates.get(g.name);
      const stopped = (ctrl.stopped_gears || []).includes(g.name);
      const label = svgBox.querySelector(`[data-rate="${CSS.escape(g.name)}"]`);
      if (label) label.textContent = rt ? `in ${rate(rt.in)}/s · out ${rate(rt.out)}/s · err ${rate(rt.err)}/s` : `in ${fmtNum(st.messages_in)} · out ${fmtNum(st.messages_out)} · err ${fmtNum(st.errors)}`;
      return h("tr", { dataset: { gear: g.name } }, h("td", { text: g.name }), h("td", { text: g.type }),
        h("td", { text: rt ? rate(rt.in) : "–" }), h("td", { text: rt ? rate(rt.out) : "–" }), h("td", { text: rt ? rate(rt.err) : "–" }),
        h("td", { text: `${fmtNum(st.messages_in)} / ${fmtNum(st.messages_out)} / ${fmtNum(st.errors)}` }),
        h("td", { text: st.connections_active === undefined ? "" : String(st.connections_active) }),
        h("td", {}, stopped ? badge("killed", "stopped") : h("button", { type: "button", text: "Stop gear", dataset: { stop: g.name },
          on: { click: () => act("Stop gear", `Stop gear ${g.name} on Rack ${name}. It stays stopped until the Rack is revived or restarts.`, "POST", `/api/v1/racks/${enc(name)}/gears/${enc(g.name)}/stop`, (reason) => ({ reason, wait: 5 }), { reason: true, after: reload }) } })));
    })));
    events.replaceChildren(...(r.events || []).map((e) => h("tr", {}, h("td", { title: e.ts, text: ago(e.ts) }), h("td", { text: e.event }), h("td", { text: e.from && e.to && e.from !== e.to ? `${e.from} → ${e.to}` : e.to || "" }), h("td", { class: "wrap", text: e.detail || "" }))));
    if (selected) showGear(selected);
    ready("rack");
  }
  async function loadAudit() {
    try {
      const rows = await api("GET", `/api/v1/audit?${qs({ path: `/racks/${name}`, limit: 30 })}`);
      audit.replaceChildren(...rows.map(auditRow));
    } catch (_) { /* shown empty */ }
  }
  async function loadChart() {
    await drawSeries(chart, { rack: name, gear: chartGear.value, since: range.value });
  }
  main().replaceChildren(
    h("h1", {}, `Rack ${rack.name} `, statusBadge(rack.status)),
    h("div", { class: "grid2" }, h("section", { class: "panel", "aria-label": "Rack state" }, head), h("section", { class: "panel", "aria-label": "Actions" }, h("h2", { text: "Operate" }), actions,
      h("h2", { text: "Close a connection" }), h("div", { class: "row" }, h("label", {}, "Gear", connGear), h("label", {}, "Connection id", connId),
        h("button", { type: "button", id: "act-conn-close", text: "Close connection", on: { click: () => {
          if (!connId.value.trim()) { toast("give the connection id (conn.id, in the gear's log lines)", true); connId.focus(); return; }
          act("Close connection", `Close connection ${connId.value.trim()} on ${connGear.value ? `gear ${connGear.value}` : "whichever gear"} of Rack ${name}.`, "POST", `/api/v1/racks/${enc(name)}/connections/${enc(connId.value.trim())}/close`, (reason) => ({ reason, gear: connGear.value, wait: 5 }), { reason: true });
        } } })),
      h("h2", { text: "Rename" }), h("form", { class: "row", on: { submit: (e) => { e.preventDefault(); renameRack(); } } }, h("label", {}, "New name", renameTo),
        h("button", { type: "submit", id: "act-rename", text: "Rename" })))),
    h("section", { class: "panel", "aria-label": "Scenario graph" }, h("h2", { text: `Scenario graph${graph.scenario ? ` · ${graph.scenario.name} ${graph.scenario.version}` : " · no active scenario"}` }),
      h("p", { class: "muted legend", text: "Boxes are gears (inputs left, outputs right), arrows are wires; dashed orange arrows are cross-Rack wires on the guaranteed lane. Rates update with each heartbeat." }), svgBox, detail),
    h("section", { class: "panel" }, h("h2", { text: "Gears" }), h("div", { class: "scroll" }, h("table", { id: "gears" }, h("thead", {}, h("tr", {}, ["Gear", "Type", "In/s", "Out/s", "Errors/s", "In / out / errors", "Connections", ""].map((c) => h("th", { scope: "col", text: c })))), gearBody))),
    h("section", { class: "panel" }, h("h2", { text: "Rates over time" }), h("div", { class: "row" }, h("label", {}, "Range", range), h("label", {}, "Gear", chartGear)), chart),
    h("div", { class: "grid2" },
      h("section", { class: "panel" }, h("h2", { text: "Status history and events" }), h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, ["When", "Event", "Status", "Detail"].map((c) => h("th", { scope: "col", text: c })))), events))),
      h("section", { class: "panel" }, h("h2", { text: "Audit (API calls on this Rack)" }), h("div", { class: "scroll" }, h("table", {}, auditHead(), audit)))));
  paint();
  loadAudit();
  loadChart();
  openStream({ rack: name }, { rack: (r) => { const auditChanged = JSON.stringify(r.events) !== JSON.stringify(rack.events); rack = r; paint(); if (auditChanged) loadAudit(); } });
}

// -- charts ---------------------------------------------------------------------------------------
function rangeSelect(id, onChange, value = "1h") {
  const sel = h("select", { id, on: { change: onChange } }, RANGES.map(([v, l]) => h("option", { value: v, text: l })));
  sel.value = value;
  return sel;
}
const BUCKET_FOR = { "15m": "15s", "1h": "1m", "6h": "5m", "24h": "20m", "168h": "2h" };

async function drawSeries(box, { rack, gear, since, name }) {
  if (!rack) { box.replaceChildren(h("p", { class: "muted", text: "Pick a Rack." })); return; }
  let data;
  try {
    data = await api("GET", `/api/v1/console/series?${qs({ rack, gear, since, bucket: BUCKET_FOR[since] || "1m", name })}`);
  } catch (e) { box.replaceChildren(h("p", { role: "alert", text: e.message })); return; }
  box.replaceChildren(lineChart(data.points, data.series, name ? name : "per second"));
  if (data.truncated) box.append(h("p", { class: "muted", text: "Range truncated to the newest rows: pick a shorter range for all of it." }));
}

function lineChart(points, series, unit) {
  const W = 900, H = 220, L = 54, R = 10, T = 10, B = 26;
  if (!points.length) return h("p", { class: "muted chart-empty", text: "No data in this range yet." });
  const t0 = points[0].t, t1 = points[points.length - 1].t || t0 + 1;
  let max = 0;
  for (const p of points) for (const k of series) max = Math.max(max, p[k] || 0);
  max = max || 1;
  const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - R);
  const y = (v) => T + (1 - v / max) * (H - T - B);
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `chart of ${series.join(", ")} (${unit})` },
    s("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }), s("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    s("text", { x: 4, y: T + 8, text: max >= 100 ? max.toFixed(0) : max.toPrecision(3) }), s("text", { x: 4, y: H - B, text: "0" }),
    s("text", { x: L, y: H - 8, text: new Date(t0 * 1000).toLocaleTimeString() }),
    s("text", { x: W - R, y: H - 8, "text-anchor": "end", text: new Date(t1 * 1000).toLocaleTimeString() }));
  series.forEach((k, i) => {
    svg.append(s("polyline", { class: `c${i % 4}`, points: points.map((p) => `${x(p.t).toFixed(1)},${y(p[k] || 0).toFixed(1)}`).join(" ") }, s("title", { text: k })));
  });
  return h("div", {}, svg, h("p", { class: "legend" }, series.map((k, i) => h("span", { class: `c${i % 4}`, text: `${k} (${unit})` }))));
}

// -- telemetry ------------------------------------------------------------------------------------
function rackOptions(sel, withAny = true) {
  const cur = sel.value;
  const names = [...S.fleet.values()].map((r) => r.name).sort();
  put(sel, withAny ? h("option", { value: "", text: "every Rack" }) : null, ...names.map((n) => h("option", { value: n, text: n })));
  if (names.includes(cur) || (withAny && cur === "")) sel.value = cur;
}

function viewTelemetry() {
  title("Telemetry");
  const t = S.tail;
  t.lines = [];
  const level = h("select", { id: "tail-level" }, LEVELS.map((l) => h("option", { value: l, text: l })));
  level.value = t.level || "info";
  const rackSel = h("select", { id: "tail-rack" }, h("option", { value: "", text: "every Rack" }));
  const text = h("input", { id: "tail-q", type: "search", placeholder: "text in the line", value: t.q || "" });
  const box = h("div", { class: "logs", id: "tail", role: "log", "aria-live": "off", tabindex: "0", "aria-label": "log tail" });
  const pause = h("button", { type: "button", id: "tail-pause", text: "Pause", on: { click: () => { t.paused = !t.paused; pause.textContent = t.paused ? "Resume" : "Pause"; if (!t.paused) paintTail(); } } });
  const chartRack = h("select", { id: "chart-rack", on: { change: () => { loadGears(); loadChart(); } } });
  const chartGear = h("select", { id: "chart-gear", on: { change: () => loadChart() } }, h("option", { value: "", text: "all gears (Rack)" }));
  const metric = h("input", { id: "chart-metric", type: "text", list: "metric-names", placeholder: "rates of in/out/errors", size: 28 });
  const names = h("datalist", { id: "metric-names" });
  const range = rangeSelect("chart-range", () => loadChart());
  const chart = h("div", { id: "chart" });
  const traces = h("tbody", { id: "traces" });
  function start() {
    t.level = level.value; t.q = text.value; t.rack = rackSel.value;
    t.lines = [];
    paintTail();
    openStream({ logs: 1, min_level: level.value, log_rack: rackSel.value, q: text.value.trim(), since: "15m" }, {
      fleet: () => { rackOptions(rackSel); if (!chartRack.value) { rackOptions(chartRack, false); if (chartRack.value) { loadGears(); loadChart(); } } },
      logs: (rows) => { ready("telemetry"); t.lines.push(...rows); if (t.lines.length > 1000) t.lines.splice(0, t.lines.length - 1000); if (!t.paused) paintTail(); },
    });
  }
  function paintTail() {
    const frag = document.createDocumentFragment();
    for (const r of t.lines) frag.append(h("div", { class: `lv-${(r.level || "").toUpperCase()}` }, `${(r.timestamp || "").slice(11, 23)} ${r.rack} ${(r.level || "").padEnd(5)} ${r.body}`));
    box.replaceChildren(frag);
    box.scrollTop = box.scrollHeight;
  }
  async function loadGears() {
    if (!chartRack.value) return;
    try {
      const g = await api("GET", `/api/v1/console/racks/${enc(chartRack.value)}/graph`);
      chartGear.replaceChildren(h("option", { value: "", text: "all gears (Rack)" }), g.gears.map((x) => h("option", { value: x.name, text: x.name })));
      const rows = await api("GET", `/api/v1/telemetry/metrics?${qs({ rack: chartRack.value, since: "15m", limit: 2000 })}`);
      names.replaceChildren(...[...new Set(rows.map((r) => r.name))].sort().map((n) => h("option", { value: n })));
    } catch (_) { /* the chart says why */ }
  }
  async function loadChart() { await drawSeries(chart, { rack: chartRack.value, gear: chartGear.value, since: range.value, name: metric.value.trim() }); }
  async function loadTraces() {
    try {
      const rows = await api("GET", `/api/v1/telemetry/traces?${qs({ since: "24h", limit: 50 })}`);
      traces.replaceChildren(...rows.map((r) => {
        let attrs = {};
        try { attrs = JSON.parse(r.attributes || "{}"); } catch (_) { /* raw */ }
        const what = r.name === "reload" ? `${attrs.old_version || "?"} → ${attrs.new_version || "?"}${attrs.reason ? ` (${attrs.reason})` : ""}`
          : r.name === "reversal" ? `${attrs.gear || "?"}: ${attrs.mti || "?"} STAN ${attrs.stan || "?"}${attrs.rrn ? ` RRN ${attrs.rrn}` : ""} (${attrs.cause || "?"}) ${attrs.outcome || "?"} after ${attrs.attempts ?? "?"} attempt(s)${attrs.code ? `, 39=${attrs.code}` : ""}${attrs.why ? `: ${attrs.why}` : ""}`
          : r.attributes;
        return h("tr", {}, h("td", { title: r.start, text: ago(r.start) }), h("td", { text: r.rack }), h("td", { text: r.name }), h("td", {}, r.status === "ok" ? badge("a-applied", "ok") : badge("a-rejected", r.status || "?")),
          h("td", { text: r.duration_ms === null ? "" : `${r.duration_ms.toFixed(1)} ms` }), h("td", { class: "wrap mono", text: what }));
      }));
    } catch (_) { /* empty */ }
  }
  const form = h("form", { class: "row", on: { submit: (e) => { e.preventDefault(); start(); } } },
    h("label", {}, "Level at least", level), h("label", {}, "Rack", rackSel), h("label", {}, "Text", text),
    h("button", { type: "submit", class: "primary", id: "tail-apply", text: "Apply filters" }), pause,
    h("button", { type: "button", text: "Clear", on: { click: () => { t.lines = []; paintTail(); } } }));
  main().replaceChildren(h("h1", { text: "Telemetry" }),
    h("section", { class: "panel" }, h("h2", { text: "Live log tail" }), form, box),
    h("section", { class: "panel" }, h("h2", { text: "Metrics" }),
      h("form", { class: "row", on: { submit: (e) => { e.preventDefault(); loadChart(); } } }, h("label", {}, "Rack", chartRack), h("label", {}, "Gear", chartGear),
        h("label", {}, "Metric (empty = rates)", metric), names, h("label", {}, "Range", range), h("button", { type: "submit", id: "chart-apply", text: "Show" })), chart),
    h("section", { class: "panel" }, h("h2", { text: "Traces: scenario reloads and reversal sagas" }),
      h("p", { class: "muted", text: "One row per reload and per reversal saga that ended (answered, or parked for settlement by hand: list them with `fluxrig saf list --rack NAME`)." }),
      h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, ["When", "Rack", "Trace", "Status", "Took", "What"].map((c) => h("th", { scope: "col", text: c })))), traces))));
  start();
  loadTraces();
}

// -- scenarios ------------------------------------------------------------------------------------
function viewScenarios() {
  title("Scenarios");
  const rollout = h("tbody", { id: "rollout" });
  const activeBox = h("div", { id: "active-scenario", class: "muted", text: "…" });
  const stored = h("tbody", { id: "stored" });
  const fmt = h("select", { id: "imp-format" }, h("option", { value: "yaml", text: "YAML" }), h("option", { value: "toml", text: "TOML" }));
  const file = h("input", { id: "imp-file", type: "file", accept: ".yaml,.yml,.toml,text/plain" });
  const src = h("textarea", { id: "imp-text", spellcheck: "false", "aria-label": "scenario text", placeholder: "Paste a scenario (YAML or TOML) or choose a file." });
  const report = h("div", { id: "imp-report", "aria-live": "polite" });
  let active = null;
  file.addEventListener("change", async () => {
    const f = file.files[0];
    if (!f) return;
    src.value = await f.text();
    if (/\.toml$/i.test(f.name)) fmt.value = "toml";
    report.replaceChildren();
  });
  async function loadActive() {
    try {
      active = await api("GET", "/api/v1/scenarios/active");
      activeBox.replaceChildren(h("dl", { class: "kv" }, h("dt", { text: "Active" }), h("dd", { class: "mono", id: "active-version", text: `${active.name} ${active.version}` }),
        h("dt", { text: "Digest" }), h("dd", { class: "mono", text: active.digest }),
        h("dt", { text: "Activations" }), h("dd", {}, h("ul", {}, (active.history || []).slice(0, 5).map((x) => h("li", { text: `${ago(x.ts)}: ${x.name} ${x.version}` }))))));
    } catch (e) { active = null; if (e.status === 404) activeBox.textContent = "No active scenario."; }
    paintRollout();
  }
  function paintRollout() {
    const rows = [...S.fleet.values()].sort((a, b) => (a.name < b.name ? -1 : 1));
    rollout.replaceChildren(...rows.map((r) => h("tr", { dataset: { rack: r.name } }, h("td", {}, h("a", { href: `#/rack/${enc(r.name)}`, text: r.name })), h("td", {}, statusBadge(r.status)),
      h("td", { class: "mono", text: r.target || "" }), h("td", { class: "mono", text: r.scenario || "" }), h("td", {}, applyBadge(r.apply_state)), h("td", { class: "wrap", text: r.apply_reason || "" }))));
    if (gotFleet && gotActive && gotStored) ready("scenarios");
  }
  async function loadStored() {
    try {
      const rows = await api("GET", "/api/v1/scenarios");
      stored.replaceChildren(...rows.map((x) => h("tr", {}, h("td", { text: x.name }), h("td", { class: "mono", text: x.version }), h("td", { class: "mono", text: (x.digest || "").slice(0, 12) }),
        h("td", { title: x.imported_at || "", text: x.imported_at ? ago(x.imported_at) : "" }),
        h("td", {}, x.active ? badge("a-applied", "active") : h("button", { type: "button", text: "Activate", dataset: { activate: x.version },
          on: { click: () => act("Activate scenario", `Activate ${x.name} ${x.version}: every Rack gets its part of it in a new signed passport and reloads.`, "POST", `/api/v1/scenarios/${enc(x.digest)}/activate`, undefined, { after: () => { loadActive(); loadStored(); } }) } })))));
    } catch (_) { /* empty */ }
  }
  function showSource(problems, warnings) {
    const lines = src.value.split("\n");
    const at = new Map();
    const loose = [];
    for (const [list, kind] of [[problems, "bad"], [warnings, "warn"]]) {
      for (const p of list) { if (p.line) { if (!at.has(p.line)) at.set(p.line, []); at.get(p.line).push([p, kind]); } else loose.push([p, kind]); }
    }
    const view = h("div", { class: "src", id: "imp-source" });
    lines.forEach((ln, i) => {
      const marks = at.get(i + 1) || [];
      view.append(h("div", { class: marks.length ? marks[0][1] : "", dataset: { line: i + 1 } }, h("span", { text: i + 1 }), h("span", { text: ln || " " })));
      for (const [p, kind] of marks) view.append(h("p", { class: `problem ${kind}`, role: "note", text: `line ${i + 1}: ${p.location}: ${p.message}` }));
    });
    return [loose.length ? h("ul", { class: "problems" }, loose.map(([p, kind]) => h("li", { class: `problem ${kind}`, text: `${p.location}: ${p.message}` }))) : null, at.size ? view : null];
  }
  async function check() {
    const out = await api("POST", `/api/v1/console/check?${qs({ format: fmt.value })}`, src.value);
    if (out.valid) {
      put(report, h("p", { id: "imp-valid", text: `Valid: ${out.name} ${out.version}.${out.warnings.length ? ` ${out.warnings.length} warning(s) for the registered Racks:` : " Every registered Rack's part validates."}` }), ...showSource([], out.warnings));
    } else {
      put(report, h("p", { role: "alert", id: "imp-invalid", text: `${out.problems.length} problem(s): nothing was imported.` }), ...showSource(out.problems, out.warnings));
    }
    return out;
  }
  async function doImport(activate) {
    if (!src.value.trim()) { toast("paste a scenario or choose a file first", true); src.focus(); return; }
    let out;
    try { out = await check(); } catch (e) { if (e.status !== 401) toast(e.message, true); return; }
    if (!out.valid) return;
    const what = activate
      ? `Import ${out.name} ${out.version} and activate it: every Rack gets its part in a new signed passport and reloads.`
      : `Import ${out.name} ${out.version} into the store (it is not activated).`;
    const done = await act(activate ? "Import and activate" : "Import", what, "POST", `/api/v1/scenarios/import?${qs({ format: fmt.value, activate: activate ? "true" : "" })}`, src.value, { danger: activate });
    if (done) { report.append(h("p", { id: "imp-done", text: `${done.status}: ${done.name} ${done.version}` })); loadActive(); loadStored(); }
  }
  main().replaceChildren(h("h1", { text: "Scenarios" }),
    h("div", { class: "grid2" }, h("section", { class: "panel" }, h("h2", { text: "Active scenario" }), activeBox),
      h("section", { class: "panel" }, h("h2", { text: "Roll-out" }), h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, ["Rack", "Status", "Target", "Running", "Apply", "Reason"].map((c) => h("th", { scope: "col", text: c })))), rollout)))),
    h("section", { class: "panel" }, h("h2", { text: "Import" }), h("div", { class: "row" }, h("label", {}, "Format", fmt), h("label", {}, "File", file)), src,
      h("div", { class: "actions" }, h("button", { type: "button", id: "imp-check", text: "Check (dry run)", on: { click: () => check().catch((e) => toast(e.message, true)) } }),
        h("button", { type: "button", id: "imp-import", text: "Import", on: { click: () => doImport(false) } }),
        h("button", { type: "button", id: "imp-activate", class: "primary", text: "Import and activate", on: { click: () => doImport(true) } })), report),
    h("section", { class: "panel" }, h("h2", { text: "Stored scenarios" }), h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Version", "Digest", "Imported", ""].map((c) => h("th", { scope: "col", text: c })))), stored))));
  let gotFleet = false, gotActive = false, gotStored = false;
  loadActive().then(() => { gotActive = true; paintRollout(); });
  loadStored().then(() => { gotStored = true; paintRollout(); });
  openStream({}, { fleet: () => { gotFleet = true; paintRollout(); } });
}

// -- tokens and audit -----------------------------------------------------------------------------
function auditHead() { return h("thead", {}, h("tr", {}, ["When", "Who", "Call", "Status", "Node"].map((c) => h("th", { scope: "col", text: c })))); }
function auditRow(a) {
  return h("tr", {}, h("td", { title: a.ts, text: ago(a.ts) }), h("td", { text: a.principal ? `${a.principal} (${a.role}, ${a.via})` : "refused: no valid credentials" }),
    h("td", { class: "mono wrap", text: `${a.method} ${a.path}` }), h("td", {}, a.status < 400 ? badge("a-applied", String(a.status)) : badge("a-rejected", String(a.status))),
    h("td", { class: "mono", title: "the Mixer node that served the call", text: a.node || "" }));
}

async function viewAudit() {
  title("Audit");
  const who = h("input", { id: "audit-who", type: "search", placeholder: "token name" });
  const path = h("input", { id: "audit-path", type: "search", placeholder: "path contains (e.g. a Rack)" });
  const body = h("tbody", { id: "audit" });
  async function load() {
    try { body.replaceChildren(...(await api("GET", `/api/v1/audit?${qs({ principal: who.value.trim(), path: path.value.trim(), limit: 500 })}`)).map(auditRow)); ready("audit"); } catch (_) { /* logged out */ }
  }
  main().replaceChildren(h("h1", { text: "Audit trail" }), h("p", { class: "muted", text: "Every state-changing API call, refused ones included: when, which token, what, the answer, and which node of the cluster served it (every node lists them all)." }),
    h("form", { class: "row panel", on: { submit: (e) => { e.preventDefault(); load(); } } }, h("label", {}, "Token", who), h("label", {}, "Path", path), h("button", { type: "submit", text: "Filter" })),
    h("div", { class: "scroll" }, h("table", {}, auditHead(), body)));
  load();
}

async function viewTokens() {
  title("Tokens");
  if (S.me.role !== "admin") {
    main().replaceChildren(h("h1", { text: "API tokens" }), h("p", { text: `Your token (${S.me.name}) has the ${S.me.role} role; managing tokens needs admin.` }));
    ready("tokens");
    return;
  }
  const body = h("tbody", { id: "tokens" });
  const name = h("input", { id: "tok-name", type: "text", required: true, maxlength: 64, placeholder: "e.g. night-shift" });
  const role = h("select", { id: "tok-role" }, ["read", "operate", "admin"].map((r) => h("option", { value: r, text: r })));
  const ttl = h("select", { id: "tok-ttl" }, [["", "never expires"], ["86400", "1 day"], ["604800", "7 days"], ["2592000", "30 days"], ["31536000", "1 year"]].map(([v, l]) => h("option", { value: v, text: l })));
  const shown = h("div", { id: "tok-shown", "aria-live": "polite" });
  async function load() {
    const rows = await api("GET", "/api/v1/auth/tokens");
    body.replaceChildren(...rows.map((t) => h("tr", {}, h("td", { text: t.name }), h("td", { text: t.role }), h("td", { text: t.builtin ? "first start (api-token file)" : t.created_by || "" }),
      h("td", { text: t.expires_at ? new Date(t.expires_at * 1000).toISOString() : "never" }),
      h("td", {}, t.revoked_at ? badge("a-rejected", "revoked") : t.builtin ? "" : h("button", { type: "button", text: "Revoke", dataset: { revoke: t.name },
        on: { click: () => act("Revoke token", `Revoke API token ${t.name}: every call and console session using it is refused from now on.`, "DELETE", `/api/v1/auth/tokens/${enc(t.name)}`, undefined, { after: load }) } })))));
    ready("tokens");
  }
  const form = h("form", { class: "row panel", on: { submit: async (e) => {
    e.preventDefault();
    try {
      const out = await api("POST", "/api/v1/auth/tokens", { name: name.value.trim(), role: role.value, ttl: ttl.value ? Number(ttl.value) : null });
      shown.replaceChildren(h("p", { text: `Token ${out.name} (${out.role}). Copy it now: it is shown once and only its digest is kept.` }), h("input", { id: "tok-value", type: "text", readonly: true, value: out.token, size: 60, "aria-label": "the new token" }));
      name.value = "";
      load();
    } catch (err) { if (err.status !== 401) toast(err.message, true); }
  } } }, h("label", {}, "Name", name), h("label", {}, "Role", role), h("label", {}, "Expires", ttl), h("button", { type: "submit", class: "primary", id: "tok-create", text: "Create token" }));
  main().replaceChildren(h("h1", { text: "API tokens" }), h("p", { class: "muted", text: "read: look only; operate: every Rack, scenario and kill-switch action; admin: operate and manage tokens." }), form, shown,
    h("div", { class: "scroll" }, h("table", {}, h("thead", {}, h("tr", {}, ["Name", "Role", "Created by", "Expires", ""].map((c) => h("th", { scope: "col", text: c })))), body)));
  load().catch(() => {});
}

// -- start ----------------------------------------------------------------------------------------
const sessionCheck = fetch("/api/v1/auth/session", { credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } })
  .then((r) => (r.ok ? r.json() : null)).catch(() => null);

async function boot() {
  $("#logout").addEventListener("click", logout);
  window.addEventListener("hashchange", () => { if (S.me) route(); });
  // A page left for another (kept in the back-forward cache) must give its stream back: each
  // open stream holds one of the browser's few connections to the Mixer.
  window.addEventListener("pagehide", closeStream);
  window.addEventListener("pageshow", (e) => { if (e.persisted && S.me) route(); });
  try {
    const me = await sessionCheck;
    if (!me) throw new Error("not logged in");
    if (me.via === "session" || me.via === "open") { S.after = location.hash; await started(me); return; }
  } catch (_) { /* not logged in */ }
  S.after = location.hash;
  renderLogin("");
}
if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot); else boot();
