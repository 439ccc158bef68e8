// pointsman's operator dashboard: reads the gateway's JSON API every 2 s and draws it (no library, no outside origin).
"use strict";

(() => {
  const KEY_STORE = "pointsman.dashboard.key";
  const REFRESH_MS = 2000;
  const WINDOW_MIN = 15;
  const SOURCES = {
    models: "/v1/models",
    analytics: `/admin/analytics?since=-${WINDOW_MIN}m&bucket=minute&group_by=model`,
    budgets: "/admin/budgets",
    forecasts: "/admin/analytics/forecast",
    experiments: "/admin/experiments",
  };
  const PALETTE = ["#1f6feb", "#e8710a", "#1a7f37", "#8250df", "#cf222e", "#0a7ea4", "#9a6700", "#bf3989"];
  const SVG_NS = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);

  // ---- small DOM helpers: text only (never innerHTML), so nothing the API returns is ever parsed as markup

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ---- number formats

  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const int = (v) => (isNum(v) ? Math.round(v).toLocaleString("en-US") : "–");
  const ms = (v) => (isNum(v) ? `${v < 10 ? v.toFixed(1) : Math.round(v).toLocaleString("en-US")} ms` : "–");
  const pct = (v) => (isNum(v) ? `${(v * 100).toFixed(v > 0 && v < 0.1 ? 1 : 0)}%` : "–");
  function usd(v) {
    if (!isNum(v)) return "–";
    if (v === 0) return "$0.00";
    const digits = Math.abs(v) >= 1 ? 2 : Math.abs(v) >= 0.01 ? 4 : 6;
    return `$${v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits })}`;
  }
  function rate(v) {
    if (!isNum(v)) return "–";
    return v >= 10 ? Math.round(v).toLocaleString("en-US") : v.toFixed(1);
  }
  function until(iso) {
    const when = Date.parse(iso);
    if (!Number.isFinite(when)) return "";
    let s = Math.max(0, Math.round((when - Date.now()) / 1000));
    const d = Math.floor(s / 86400);
    s -= d * 86400;
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m`;
  }
  const clock = (t) => new Date(t).toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit" });

  /** Writes a number into an element: its text formatted, its raw value in data-value (what tests read). */
  function put(id, value, format) {
    const node = $(id);
    node.textContent = format(value);
    node.dataset.value = isNum(value) ? String(value) : "";
  }

  function metricCell(value, format, metric) {
    return el("td", { class: "num", "data-metric": metric, "data-value": isNum(value) ? value : "", text: format(value) });
  }

  // ---- the API, with the operator's key

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function storedKey() {
    try {
      return localStorage.getItem(KEY_STORE) || "";
    } catch {
      return "";  // storage off (private mode, policy): the field still works for this page's life
    }
  }
  let key = storedKey();

  async function getJSON(path) {
    const headers = { Accept: "application/json" };
    if (key) headers.Authorization = `Bearer ${key}`;
    let response;
    try {
      response = await fetch(path, { headers, cache: "no-store", credentials: "omit" });
    } catch {
      throw new HttpError(0, "the gateway does not answer");
    }
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (!response.ok) {
      const message = body && body.error && body.error.message ? body.error.message : response.statusText;
      throw new HttpError(response.status, message);
    }
    return body;
  }

  const refused = (error) => error instanceof HttpError && (error.status === 401 || error.status === 403);

  // ---- sections: each shows its data, or a short note saying why it has none

  function note(sectionId, error) {
    const section = $(sectionId);
    const p = section.querySelector(".note");
    if (!error) {
      p.hidden = true;
      p.textContent = "";
      section.classList.remove("failed");
      return;
    }
    let text;
    if (refused(error)) text = `Refused (${error.status}): enter a valid API key above.`;
    else if (error.status === 404) text = "Not available on this gateway.";
    else if (error.status === 0) text = "The gateway does not answer.";
    else text = `Not available: ${error.message || `HTTP ${error.status}`}`;
    p.textContent = text;
    p.dataset.status = String(error.status);
    p.hidden = false;
    section.classList.add("failed");
  }

  function stateClass(state) {
    if (["loaded", "available", "running", "ready"].includes(state)) return "ok";
    if (["loading", "unloading", "draining", "paused", "draft"].includes(state)) return "busy";
    if (["unavailable", "error", "failed"].includes(state)) return "bad";
    return "idle";
  }

  function renderModels(list) {
    const body = $("models-body");
    const rows = (list.data || []).map((card) => {
      const p = card.pointsman || {};
      const state = p.status || "unknown";
      const queue = p.queue_length !== undefined ? p.queue_length : null;
      const detail = [];
      if (isNum(p.deployments)) detail.push(`${p.deployments} deployment${p.deployments === 1 ? "" : "s"}`);
      if (isNum(p.tokens_per_s)) detail.push(`${p.tokens_per_s.toFixed(1)} tok/s`);
      if (isNum(p.load_s)) detail.push(`loaded in ${p.load_s.toFixed(1)} s`);
      if (p.version) detail.push(`version ${p.version}`);
      if (p.error) detail.push(p.error);
      const aliases = (p.aliases || []).length ? el("small", { text: (p.aliases || []).join(", ") }) : null;
      return el("tr", { "data-model": card.id },
        el("td", {}, el("span", { class: "model", text: card.id }), aliases),
        el("td", { text: p.backend || "–" }),
        el("td", {}, el("span", { class: `badge ${stateClass(state)}`, "data-metric": "status", text: state })),
        metricCell(p.in_flight, int, "in_flight"),
        metricCell(queue, int, "queue_length"),
        el("td", { class: "detail", text: detail.join(" · ") }));
    });
    body.replaceChildren(...(rows.length ? rows : [emptyRow(6, "No models configured.")]));
    $("models-count").textContent = rows.length ? `${rows.length} served` : "";
    $("models-count").dataset.value = String(rows.length);
  }

  function emptyRow(span, text) {
    return el("tr", { class: "empty" }, el("td", { colspan: span, text }));
  }

  function renderTotals(t) {
    const tokens = (t.prompt_tokens || 0) + (t.completion_tokens || 0);
    put("metric-requests", t.requests, int);
    put("metric-rate", isNum(t.requests) ? t.requests / WINDOW_MIN : null, rate);
    put("metric-errors", t.errors, int);
    put("metric-error-rate", t.requests ? t.errors / t.requests : null, pct);
    put("metric-latency-avg", t.latency_ms_avg, ms);
    put("metric-latency-p50", t.latency_ms_p50, ms);
    put("metric-latency-p95", t.latency_ms_p95, ms);
    put("metric-ttft-avg", t.ttft_ms_avg, ms);
    put("metric-tokens", tokens, int);
    put("metric-prompt-tokens", t.prompt_tokens, int);
    put("metric-completion-tokens", t.completion_tokens, int);
    put("metric-cost", t.cost_usd, usd);
    put("metric-cache-hit-rate", t.requests ? t.cache_hit_rate : null, pct);
    put("metric-cache-hits", t.cache_hits, int);
    $("metric-errors").classList.toggle("alert", (t.errors || 0) > 0);
  }

  const keyName = (key) => (key === null || key === undefined ? "(none)" : String(key));

  function renderGroups(groups) {
    const rows = [...groups].sort((a, b) => (b.requests || 0) - (a.requests || 0)).map((g) =>
      el("tr", { "data-key": keyName(g.key) },
        el("td", {}, el("span", { class: "model", text: keyName(g.key) })),
        metricCell(g.requests, int, "requests"),
        metricCell(g.errors, int, "errors"),
        metricCell(g.latency_ms_p50, ms, "latency_ms_p50"),
        metricCell(g.latency_ms_p95, ms, "latency_ms_p95"),
        metricCell((g.prompt_tokens || 0) + (g.completion_tokens || 0), int, "total_tokens"),
        metricCell(g.cost_usd, usd, "cost_usd"),
        metricCell(g.requests ? g.cache_hit_rate : null, pct, "cache_hit_rate")));
    $("by-model-body").replaceChildren(...(rows.length ? rows : [emptyRow(8, "No requests in the window.")]));
  }

  function renderRoutes(routes) {
    const rows = [...routes].sort((a, b) => (b.requests || 0) - (a.requests || 0)).map((r) =>
      el("tr", {},
        el("td", { text: keyName(r.route) }),
        el("td", { text: keyName(r.model) }),
        metricCell(r.requests, int, "requests")));
    $("routes-body").replaceChildren(...(rows.length ? rows : [emptyRow(3, "No requests in the window.")]));
  }

  // ---- charts: hand-drawn SVG over the whole window, one minute per slot, one colour per model

  const colours = new Map();
  function colour(key) {
    const name = keyName(key);
    if (!colours.has(name)) colours.set(name, PALETTE[colours.size % PALETTE.length]);
    return colours.get(name);
  }

  /** The minutes from `since` to `until`, and each series row's slot among them. */
  function minutes(report) {
    const step = 60000;
    let end = Date.parse(report.until);
    if (!Number.isFinite(end)) end = Date.now();
    end = Math.floor(end / step) * step;
    let start = Date.parse(report.since);
    start = Number.isFinite(start) ? Math.floor(start / step) * step : end - (WINDOW_MIN - 1) * step;
    const count = Math.max(1, Math.min(24 * 60, Math.round((end - start) / step) + 1));
    const slot = (iso) => {
      const i = Math.round((Math.floor(Date.parse(iso) / step) * step - start) / step);
      return i >= 0 && i < count ? i : -1;
    };
    return { start, step, count, slot };
  }

  /** A y axis from 0 past `peak` in 2 to 5 round steps (1, 2, 5 x 10^n; whole steps for counts). */
  function scale(peak, whole) {
    const top = peak > 0 ? peak : whole ? 4 : 1;
    const raw = top / 5;
    const power = 10 ** Math.floor(Math.log10(raw));
    let step = [1, 2, 5, 10].map((m) => m * power).find((candidate) => candidate >= raw);
    if (whole) step = Math.max(1, Math.round(step));
    return { max: Math.ceil(top / step - 1e-9) * step, step };
  }

  const PLOT = { left: 48, right: 12, top: 10, bottom: 24, width: 560, height: 190 };

  /** Axes, grid and time labels; returns the x and y mappings of the plot area. */
  function frame(node, axis, range, yFormat) {
    const w = PLOT.width - PLOT.left - PLOT.right;
    const h = PLOT.height - PLOT.top - PLOT.bottom;
    const x = (i) => PLOT.left + (w * (i + 0.5)) / axis.count;
    const y = (v) => PLOT.top + h - (h * v) / range.max;
    const parts = [];
    for (let k = 0; k * range.step <= range.max + 1e-9; k++) {
      const v = k * range.step;
      parts.push(svg("line", { class: "grid", x1: PLOT.left, x2: PLOT.width - PLOT.right, y1: y(v), y2: y(v) }));
      parts.push(svg("text", { class: "tick", x: PLOT.left - 6, y: y(v) + 4, "text-anchor": "end" }, yFormat(v)));
    }
    const every = Math.max(1, Math.ceil(axis.count / 6));
    for (let i = axis.count - 1; i >= 0; i -= every) {
      parts.push(svg("text", { class: "tick", x: x(i), y: PLOT.height - 6, "text-anchor": "middle" },
        clock(axis.start + i * axis.step)));
    }
    node.replaceChildren(...parts);
    return { x, y, slotWidth: w / axis.count, bottom: PLOT.top + h };
  }

  function legend(id, keys) {
    $(id).replaceChildren(...keys.map((k) =>
      el("span", {}, el("i", { class: `swatch c${PALETTE.indexOf(colour(k))}` }), keyName(k))));
  }

  function drawRequests(report, axis) {
    const node = $("chart-requests");
    const stacks = Array.from({ length: axis.count }, () => []);
    for (const row of report.series || []) {
      const i = axis.slot(row.bucket);
      if (i >= 0 && row.requests > 0) stacks[i].push(row);
    }
    const peak = Math.max(0, ...stacks.map((s) => s.reduce((sum, r) => sum + r.requests, 0)));
    const f = frame(node, axis, scale(peak, true), (v) => String(v));
    let bars = 0;
    stacks.forEach((stack, i) => {
      let base = 0;
      const total = stack.reduce((sum, r) => sum + r.requests, 0);
      for (const row of stack) {
        const top = f.y(base + row.requests);
        const bar = svg("rect", {
          class: "bar", x: f.x(i) - f.slotWidth * 0.35, width: f.slotWidth * 0.7, y: top,
          height: Math.max(0.5, f.y(base) - top), fill: colour(row.key), "data-key": keyName(row.key),
          "data-value": row.requests,
        });
        bar.append(svg("title", {}, `${clock(axis.start + i * axis.step)} · ${keyName(row.key)}: ${row.requests} ` +
          `request${row.requests === 1 ? "" : "s"} (${total} in all)`));
        node.append(bar);
        base += row.requests;
        bars++;
      }
    });
    node.dataset.points = String(bars);
    legend("legend-requests", [...new Set((report.series || []).filter((r) => r.requests > 0).map((r) => r.key))]);
  }

  function drawLatency(report, axis) {
    const node = $("chart-latency");
    const lines = new Map();  // model -> latency per slot (null where it served nothing)
    for (const row of report.series || []) {
      const i = axis.slot(row.bucket);
      if (i < 0 || !isNum(row.latency_ms_avg) || !(row.requests > 0)) continue;
      const name = keyName(row.key);
      if (!lines.has(name)) lines.set(name, { key: row.key, values: new Array(axis.count).fill(null) });
      lines.get(name).values[i] = row.latency_ms_avg;
    }
    const peak = Math.max(0, ...[...lines.values()].flatMap((l) => l.values.filter(isNum)));
    const range = scale(peak, false);
    const decimals = range.step >= 1 ? 0 : Math.ceil(-Math.log10(range.step));
    const f = frame(node, axis, range, (v) => (v >= 1000 ? `${+(v / 1000).toFixed(2)} s` : v.toFixed(decimals)));
    let points = 0;
    for (const line of lines.values()) {
      const c = colour(line.key);
      let path = "";
      line.values.forEach((v, i) => {
        if (!isNum(v)) return;
        path += `${path && isNum(line.values[i - 1]) ? "L" : "M"}${f.x(i).toFixed(1)},${f.y(v).toFixed(1)}`;
      });
      node.append(svg("path", { class: "line", d: path, stroke: c }));
      line.values.forEach((v, i) => {
        if (!isNum(v)) return;
        const dot = svg("circle", { class: "dot", cx: f.x(i), cy: f.y(v), r: 3, fill: c, "data-value": v });
        dot.append(svg("title", {}, `${clock(axis.start + i * axis.step)} · ${keyName(line.key)}: ${ms(v)}`));
        node.append(dot);
        points++;
      });
    }
    node.dataset.points = String(points);
    legend("legend-latency", [...lines.values()].map((l) => l.key));
  }

  function renderAnalytics(report) {
    renderTotals(report.totals || {});
    renderGroups(report.groups || []);
    renderRoutes(report.routes || []);
    const axis = minutes(report);
    drawRequests(report, axis);
    drawLatency(report, axis);
  }

  // ---- budgets and forecasts

  function meter(used, limit, format, metric) {
    const share = isNum(used) && isNum(limit) && limit > 0 ? used / limit : 0;
    const fill = el("div", { class: `fill${share >= 1 ? " over" : share >= 0.8 ? " warn" : ""}` });
    fill.style.width = `${Math.min(100, share * 100).toFixed(1)}%`;  // CSSOM: allowed by the page's CSP
    return el("div", { class: "meter-row" },
      el("div", { class: "meter" }, fill),
      el("span", { class: "meter-text" },
        el("b", { "data-metric": `used_${metric}`, "data-value": isNum(used) ? used : "", text: format(used) }),
        ` of ${format(limit)}`,
        el("small", { text: ` (${pct(share)})` })));
  }

  const memberName = (m) => (m === null || m === undefined || m === "" || m === "*" ? "all" : String(m));

  /** One entry per budget and member: a flat row as it is, or a budget's `members` each with the budget's limits. */
  function budgetEntries(list) {
    const out = [];
    for (const b of list.data || []) {
      if (!Array.isArray(b.members)) {
        out.push({ ...b, member: b.member !== undefined ? b.member : b.match });
        continue;
      }
      if (!b.members.length) out.push({ ...b, member: b.match, idle: true });
      for (const m of b.members) out.push({ ...b, ...m, members: undefined });
    }
    return out;
  }

  function renderBudgets(list) {
    const items = budgetEntries(list).map((b) => {
      const meters = [];
      if (isNum(b.limit_usd)) meters.push(meter(b.idle ? 0 : b.used_usd, b.limit_usd, usd, "usd"));
      if (isNum(b.limit_tokens)) {
        meters.push(meter(b.idle ? 0 : b.used_tokens, b.limit_tokens, (v) => `${int(v)} tok`, "tokens"));
      }
      const resets = b.resets_at ? `resets in ${until(b.resets_at)}` : "never resets";
      return el("div", { class: "budget", "data-scope": b.scope, "data-member": memberName(b.member) },
        el("div", { class: "budget-head" },
          el("span", {}, el("b", { text: b.scope }), ` ${memberName(b.member)}`),
          el("small", { text: `${b.period || ""} · ${resets}${b.idle ? " · no usage yet" : ""}` })),
        ...meters);
    });
    $("budgets-list").replaceChildren(...(items.length ? items : [el("p", { class: "empty", text: "No budgets." })]));
  }

  function amount(kind, v) {
    return kind === "usd" ? usd(v) : `${int(v)}${kind === "tokens" ? " tok" : ""}`;
  }

  function renderForecasts(list) {
    const columns = ["Budget", "Used", "Limit", "Per hour", "Projected", "Runs out", ""];
    $("forecasts-head").replaceChildren(el("tr", {}, ...columns.map((c, i) =>
      el("th", { class: i >= 1 && i <= 4 ? "num" : null, text: c }))));
    const rows = (list.data || []).map((f) => {
      const kind = f.kind || (isNum(f.limit_usd) ? "usd" : "tokens");
      const runsOut = f.runs_out_at ? new Date(f.runs_out_at).toLocaleString("en-GB",
        { day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" }) : "–";
      return el("tr", { class: f.alert ? "alert" : null, "data-alert": f.alert ? "true" : "false",
        "data-scope": f.scope, "data-member": memberName(f.member), "data-kind": kind },
        el("td", {}, el("b", { text: f.scope }), ` ${memberName(f.member)}`,
          el("small", { text: `${f.period || ""} · ${kind}` })),
        metricCell(f.used, (v) => amount(kind, v), "used"),
        metricCell(f.limit, (v) => amount(kind, v), "limit"),
        metricCell(f.rate_per_hour, (v) => amount(kind, v), "rate_per_hour"),
        metricCell(f.projected, (v) => amount(kind, v), "projected"),
        el("td", { class: "num", text: runsOut }),
        el("td", {}, f.alert ? el("span", { class: "badge bad", text: "alert" }) : el("span", { class: "quiet", text: "ok" })));
    });
    $("forecasts-body").replaceChildren(...(rows.length ? rows : [emptyRow(columns.length, "No forecasts.")]));
  }

  // ---- experiments

  function renderExperiments(list) {
    const cards = (list.data || []).map((x) => {
      const variants = x.variants || [];
      const total = variants.reduce((sum, v) => sum + (v.weight || 0), 0) || 1;
      const rows = variants.map((v, i) => {
        const fill = el("div", { class: `fill c${i % PALETTE.length}` });
        fill.style.width = `${(((v.weight || 0) / total) * 100).toFixed(1)}%`;
        return el("div", { class: "variant", "data-variant": v.name },
          el("span", { class: "variant-name" }, el("b", { text: v.name }), el("small", { text: ` → ${v.model}` })),
          el("div", { class: "meter" }, fill),
          el("span", { class: "num", "data-metric": "weight", "data-value": v.weight, text: `${pct((v.weight || 0) / total)} (w ${v.weight})` }));
      });
      const badge = el("span", { class: `badge ${stateClass(x.status)}`, "data-metric": "status", text: x.status });
      const promoted = x.promoted ? el("small", { text: ` · promoted ${x.promoted}` }) : null;
      return el("div", { class: "experiment", "data-experiment": x.name },
        el("div", { class: "budget-head" },
          el("span", {}, el("b", { text: x.name }), " ", badge),
          el("small", {}, `target ${x.target} · ${pct(x.traffic)} of traffic · ${x.primary_metric || ""}`, promoted)),
        ...rows);
    });
    $("experiments-list").replaceChildren(...(cards.length ? cards
      : [el("p", { class: "empty", text: "No experiments." })]));
  }

  // ---- the refresh loop

  const RENDER = {
    models: ["models", renderModels],
    analytics: ["traffic", renderAnalytics],
    budgets: ["budgets", renderBudgets],
    forecasts: ["forecasts", renderForecasts],
    experiments: ["experiments", renderExperiments],
  };

  let timer = null;
  let busy = false;
  let again = false;

  async function refresh() {
    if (busy) {
      again = true;  // a key change mid-refresh: one more round right after this one
      return;
    }
    busy = true;
    clearTimeout(timer);
    const names = Object.keys(SOURCES);
    const results = await Promise.allSettled(names.map((n) => getJSON(SOURCES[n])));
    let denied = null;
    let reached = false;
    results.forEach((result, i) => {
      const [sectionId, render] = RENDER[names[i]];
      if (result.status === "fulfilled") {
        reached = true;
        try {
          render(result.value);
          note(sectionId, null);
          if (sectionId === "traffic") note("by-model", null);
        } catch (error) {
          note(sectionId, new HttpError(-1, `unexpected answer (${error.message})`));
        }
        return;
      }
      const error = result.reason;
      if (refused(error)) denied = denied || error;
      if (error.status !== 0) reached = true;
      note(sectionId, error);
      if (sectionId === "traffic") note("by-model", error);
    });
    const banner = $("auth-note");
    banner.hidden = !denied;
    banner.textContent = !denied ? ""
      : denied.status === 403 ? `This API key may not read every section (403: ${denied.message})`
      : key ? `The gateway refused this API key (${denied.status}: ${denied.message}) Enter a valid key above.`
        : `The gateway asks for an API key (${denied.status}). Enter one above; it is kept in this browser only.`;
    const status = $("status");
    status.dataset.state = !reached ? "down" : denied ? "warn" : "live";
    $("status-text").textContent = !reached ? "gateway unreachable"
      : `${denied ? "key needed" : "live"} · updated ${new Date().toLocaleTimeString("en-GB")}`;
    document.body.dataset.refreshed = String((Number(document.body.dataset.refreshed) || 0) + 1);
    busy = false;
    if (again) {
      again = false;
      refresh();
    } else {
      timer = setTimeout(refresh, REFRESH_MS);
    }
  }

  function useKey(value) {
    key = value.trim();
    try {
      if (key) localStorage.setItem(KEY_STORE, key);
      else localStorage.removeItem(KEY_STORE);
    } catch {
      // storage off: the key lives as long as the page
    }
    refresh();
  }

  document.addEventListener("DOMContentLoaded", () => {
    const field = $("api-key");
    field.value = key;
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      useKey(field.value);
    });
    $("key-clear").addEventListener("click", () => {
      field.value = "";
      useKey("");
    });
    refresh();
  });
})();
