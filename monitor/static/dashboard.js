// The edgefl dashboard's page: draws the document that /events sends (monitor/dashboard.py).
// Everything from the fleet goes in as text (textContent), never as markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => (token ? `${path}?token=${encodeURIComponent(token)}` : path);
let last = null; // the newest document
let receivedAt = 0; // our clock when it came, to age "last heard" between updates

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const text = (id, value) => { document.getElementById(id).textContent = value; };
const num = (v, digits = 1) => (v === null || v === undefined ? "–" : v.toFixed(digits));

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function link(kbps) {
  return kbps >= 1000 ? `${(kbps / 1000).toFixed(1)} Mbit/s` : `${Math.round(kbps)} kbit/s`;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 2) return "just now";
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

// -- the header and the cards ------------------------------------------------------------------

const WAITS = {
  "": "", devices: "waiting for devices to come online", eligible: "waiting for an eligible device",
  updates: "waiting for updates", nothing: "training finished",
};

function drawSummary(doc) {
  const fleet = doc.fleet;
  const agg = fleet.aggregator;
  text("fleet", fleet.fleet);
  const badge = document.getElementById("aggregator-state");
  if (!agg) {
    badge.className = "badge unknown";
    badge.textContent = "aggregator: no status yet";
  } else {
    const waiting = agg.state === "online" && agg.waiting_for !== "updates" && agg.waiting_for;
    badge.className = `badge ${waiting ? "waiting" : agg.state}`;
    badge.textContent = `aggregator ${agg.state}` + (agg.mode === "async" ? " (async)" : "");
  }
  const asyncMode = agg && agg.mode === "async";
  text("round-label", asyncMode ? "Model version" : "Round");
  text("round", agg ? String(asyncMode ? agg.model_version : agg.round) : "–");
  text("round-sub", agg && agg.rounds ? `of ${agg.rounds}` : "");
  text("reported", agg && agg.expected ? `${agg.reported} of ${agg.expected}` : "–");
  text("waiting", agg ? WAITS[agg.waiting_for] || "" : "");
  text("accuracy", agg && agg.accuracy !== null ? agg.accuracy.toFixed(4) : "–");
  text("model-version", agg ? `model v${agg.model_version}` : "");
  const c = fleet.counts;
  const known = c.online + c.offline + c.unknown;
  text("online", `${c.online} of ${known}`);
  text("online-sub", [c.offline ? `${c.offline} offline` : "", c.unknown ? `${c.unknown} never seen` : ""]
    .filter(Boolean).join(", "));
  text("bytes", agg ? `${bytes(agg.uplink_bytes)} / ${bytes(agg.downlink_bytes)}` : "–");
  const missing = agg ? agg.missing.concat(agg.missing_more ? [`and ${agg.missing_more} more`] : []) : [];
  document.getElementById("missing-row").hidden = missing.length === 0;
  text("missing", missing.join(", "));
}

// -- the device grid -------------------------------------------------------------------------------

function batteryCell(t) {
  if (!t || t.battery_percent === null) return document.createTextNode("–");
  const p = t.battery_percent;
  const bar = el("span", { class: `bar ${p < 20 ? "low" : p < 50 ? "mid" : ""}` }, el("span"));
  bar.firstChild.style.width = `${Math.max(0, Math.min(100, p))}%`;
  const wrap = el("span", {}, bar, `${p.toFixed(0)}%`);
  if (t.charging) wrap.append(" ⚡ charging");
  return wrap;
}

function tile(id, d, now) {
  const t = d.telemetry;
  const state = d.state;
  const node = el("div", { class: `tile ${state}`, "data-device": id, "data-state": state });
  node.append(el("div", { class: "top" },
    el("span", { class: "name", text: id }),
    el("span", { class: `badge ${state}`, text: state === "unknown" ? "never seen" : state })));
  const rows = [
    ["battery", batteryCell(t)],
    ["CPU", t ? `${num(t.agent_cpu_percent ?? null)}% agent · ${num(t.cpu_percent)}% host` : "–"],
    ["memory", t && t.agent_rss_mb !== null ? `${t.agent_rss_mb.toFixed(0)} MB agent` : "–"],
    ["link", t && t.link_kbps !== null ? link(t.link_kbps) : "–"],
    ["serves", d.serving !== null && d.serving !== undefined
      ? `model v${d.serving} ${d.serving_variant || ""}`.trim() : "no model yet"],
    ["samples", t ? String(t.samples) : "–"],
    [state === "offline" ? "offline" : "heard", d.received_at ? age(now - d.received_at) : "never"],
  ];
  const figures = el("dl", { class: "figures" });
  for (const [k, v] of rows) figures.append(el("dt", { text: k }), el("dd", {}, v));
  const agg = last.fleet.aggregator;
  const work = agg && agg.devices[id];
  if (work) {
    figures.append(el("dt", { text: "rounds" }),
      el("dd", { text: `${work.rounds ?? 0} of ${work.assigned ?? 0} asked` +
        (work.rejected ? ` · ${work.rejected} rejected` : "") }));
  }
  node.append(figures);
  return node;
}

function drawDevices(doc, now) {
  const grid = document.getElementById("devices");
  const ids = Object.keys(doc.fleet.devices);
  grid.replaceChildren(...ids.map((id) => tile(id, doc.fleet.devices[id], now)));
  if (!ids.length) grid.append(el("p", { class: "dim", text: "no device has spoken yet" }));
}

// -- the charts (inline SVG, drawn here) ---------------------------------------------------------

const W = 420, H = 200, PAD = { l: 48, r: 12, t: 12, b: 28 };

function ticks(lo, hi, n = 4) {
  const step = (hi - lo) / n;
  return Array.from({ length: n + 1 }, (_, i) => lo + i * step);
}

function lineChart(id, series, format) {
  const node = document.getElementById(id);
  node.replaceChildren();
  const pts = series.flatMap((s) => s.points);
  if (!pts.length) {
    node.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" },
      series.empty || "no figures yet"));
    return;
  }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  let [y0, y1] = [Math.min(0, ...ys), Math.max(...ys)];
  if (series.yMax !== undefined) y1 = Math.max(y1, series.yMax);
  if (y0 === y1) y1 = y0 + 1;
  const sx = (x) => PAD.l + ((x - x0) / (x1 - x0)) * (W - PAD.l - PAD.r);
  const sy = (y) => H - PAD.b - ((y - y0) / (y1 - y0)) * (H - PAD.t - PAD.b);
  for (const y of ticks(y0, y1)) {
    node.append(svg("line", { x1: PAD.l, x2: W - PAD.r, y1: sy(y), y2: sy(y), class: "axis" }));
    node.append(svg("text", { x: PAD.l - 6, y: sy(y) + 3, "text-anchor": "end", class: "tick" },
      format(y)));
  }
  // whole versions, a few of them evenly spaced
  const step = Math.max(1, Math.ceil((x1 - x0) / 8));
  const xTicks = [];
  for (let x = Math.ceil(x0); x <= x1; x += step) xTicks.push(x);
  for (const x of xTicks) {
    node.append(svg("text", { x: sx(x), y: H - PAD.b + 14, "text-anchor": "middle", class: "tick" },
      `v${x}`));
  }
  series.forEach((s, i) => {
    if (!s.points.length) return;
    node.append(svg("polyline", {
      class: `series s${i}`, points: s.points.map((p) => `${sx(p[0])},${sy(p[1])}`).join(" "),
    }));
    for (const p of s.points) node.append(svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, class: `s${i}` }));
    if (s.name) {
      node.append(svg("text", { x: PAD.l + 8 + i * 90, y: PAD.t + 10, class: `legend s${i}` }, s.name));
    }
  });
}

function drawCharts(doc) {
  const h = doc.history;
  const acc = h.filter((p) => p.accuracy !== null).map((p) => [p.version, p.accuracy]);
  const accSeries = [{ points: acc }];
  accSeries.yMax = 1;
  lineChart("chart-accuracy", accSeries, (y) => y.toFixed(2));
  lineChart("chart-bytes", [
    { name: "up", points: h.map((p) => [p.version, p.uplink_bytes / 1e6]) },
    { name: "down", points: h.map((p) => [p.version, p.downlink_bytes / 1e6]) },
  ], (y) => y.toFixed(y < 10 ? 2 : 0));
  const energy = [{ points: h.filter((p) => p.energy_j !== null && p.energy_j !== undefined)
    .map((p) => [p.version, p.energy_j]) }];
  energy.empty = h.length ? "the aggregator's status carries no energy figures" : "no figures yet";
  lineChart("chart-energy", energy, (y) => y.toFixed(y < 10 ? 1 : 0));
}

// -- rollout and rejections ------------------------------------------------------------------------

function table(head, rows) {
  return el("table", {},
    el("tr", {}, ...head.map((h) => el("th", { text: h }))),
    ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", { text: String(c) })))));
}

const ROLLOUT = {
  none: "no online device serves a model yet",
  settled: "every online device serves the same deployment",
  "in progress": "devices serve different deployments: a rollout, canary or rollback is under way",
};

function drawRollout(doc) {
  const r = doc.rollout;
  const box = document.getElementById("rollout");
  const parts = [el("p", {}, el("span", { class: `badge ${r.state === "settled" ? "online" : r.state === "none" ? "unknown" : "waiting"}`, text: r.state }),
    ` ${ROLLOUT[r.state]}`)];
  const models = Object.entries(r.models);
  if (models.length) parts.push(table(["model served", "devices"], models));
  if (r.ahead.length) parts.push(el("p", { text: `ahead of the fleet (canary or first to update): ${r.ahead.join(", ")}` }));
  if (r.not_serving.length) parts.push(el("p", { class: "dim", text: `online, no model yet: ${r.not_serving.join(", ")}` }));
  if (r.trained !== null && r.trained !== undefined) parts.push(el("p", { class: "dim", text: `newest trained model: v${r.trained}` }));
  box.replaceChildren(...parts);
}

function drawRejections(doc) {
  const agg = doc.fleet.aggregator;
  const box = document.getElementById("rejections");
  const totals = agg ? Object.entries(agg.rejected) : [];
  const parts = [];
  if (!totals.length) parts.push(el("p", { class: "dim", text: "no update rejected" }));
  else parts.push(table(["reason", "rejected"], totals.sort((a, b) => b[1] - a[1])));
  if (agg && agg.quarantined.length) {
    parts.push(el("p", { text: `quarantined at the broker: ${agg.quarantined.join(", ")}` }));
  }
  if (doc.rejections.length) {
    parts.push(el("h2", { text: "recent" }));
    parts.push(el("ul", { class: "events" }, ...doc.rejections.slice(0, 12).map((e) =>
      el("li", { text: `round ${e.round}: ${e.kind === "device" ? "from" : "reason"} ${e.name} +${e.delta} (${e.total} in all)` }))));
  }
  box.replaceChildren(...parts);
}

function drawFooter(doc) {
  const invalid = Object.values(doc.fleet.invalid).reduce((a, b) => a + b, 0);
  text("footer", `read-only view · updated ${new Date(doc.fleet.taken_at * 1000).toLocaleTimeString()}` +
    (invalid ? ` · ${invalid} invalid message(s) skipped` : ""));
}

function draw() {
  if (!last) return;
  // the server's clock at the snapshot, moved on by the time since it arrived
  const now = last.fleet.taken_at + (Date.now() / 1000 - receivedAt);
  drawSummary(last);
  drawDevices(last, now);
  drawCharts(last);
  drawRollout(last);
  drawRejections(last);
  drawFooter(last);
}

// -- the live link ---------------------------------------------------------------------------------

function setLink(state, label) {
  const badge = document.getElementById("link");
  badge.className = `badge ${state}`;
  badge.textContent = label;
}

function take(json) {
  last = JSON.parse(json);
  receivedAt = Date.now() / 1000;
  draw();
  const broker = last.fleet.connected;
  setLink(broker ? "live" : "lost", broker ? "live" : "dashboard lost the broker");
}

function connect() {
  const events = new EventSource(withToken("/events"));
  events.addEventListener("state", (e) => take(e.data));
  events.onerror = () => setLink("lost", "reconnecting to the dashboard…");
}

fetch(withToken("/api/snapshot"))
  .then((r) => (r.ok ? r.text() : Promise.reject(new Error(r.statusText))))
  .then(take)
  .catch(() => setLink("lost", "dashboard unreachable"));
connect();
setInterval(draw, 5000); // "last heard" keeps ageing between updates
