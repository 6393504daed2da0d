// Keeps the dashboard current: polls /api/grants every few seconds and
// ticks the countdowns every second. Builds the DOM with textContent only,
// so nothing from the server is ever parsed as HTML.
"use strict";

const POLL_MS = 3000;
const csrf = document.querySelector('meta[name="csrf-token"]').content;
// The countdowns run on the server's clock, not this browser's.
let skew = Number(document.getElementById("updated").dataset.now || Date.now()) - Date.now();
let connectEnabled = false;

function fmt(ms) {
  const s = Math.floor(ms / 1000);
  if (s >= 2 * 86400) return Math.floor(s / 86400) + "d";
  if (s >= 3600) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
  if (s >= 60) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  return s + "s";
}

function until(ts, now) {
  if (!ts) return "-";
  const d = ts - now;
  return d < 0 ? "expired " + fmt(-d) + " ago" : fmt(d);
}

function ms(t) { return t ? Date.parse(t) : 0; }

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function countdown(ts, level) {
  const td = el("td", "countdown level-" + (level || "ok"));
  td.dataset.ts = String(ts);
  return td;
}

function row(g) {
  const tr = el("tr", "level-" + g.level);
  tr.dataset.grant = g.grant;
  const name = el("td", "grant", g.grant);
  name.append(el("div", "sub", g.registration));
  const state = el("td", "state", g.state);
  if (g.refresh_holder) state.append(el("div", "sub", "by " + g.refresh_holder));
  if (g.reason) state.append(el("div", "reason", g.reason));
  const rotated = el("td", "rotated");
  rotated.dataset.ago = String(ms(g.rotated_at));
  rotated.append(el("span"), el("div", "sub", g.rotated_by || ""));
  const action = el("td", "action");
  if (g.connect) {
    const form = el("form");
    form.method = "post";
    form.action = "connect/" + encodeURIComponent(g.grant); // relative: works under a proxy's path
    const token = el("input");
    token.type = "hidden";
    token.name = "csrf";
    token.value = csrf;
    const button = el("button", "reconnect", g.state === "not connected" ? "Connect" : "Re-connect");
    button.type = "submit";
    form.append(token, button);
    action.append(form);
  }
  tr.append(name, state, el("td", "version", String(g.version)),
    countdown(ms(g.expiry), g.expiry_level), rotated, el("td", "refreshes", g.refreshes_last_hour == null ? "?" : String(g.refreshes_last_hour)),
    countdown(ms(g.idle_expiry), g.idle_level), countdown(ms(g.absolute_expiry), g.absolute_level), action);
  return tr;
}

let polling = false;
let lastPoll = 0;

function tick() {
  const now = Date.now() + skew;
  let crossed = false;
  for (const td of document.querySelectorAll("td[data-ts]")) {
    const ts = Number(td.dataset.ts);
    td.textContent = until(ts, now);
    // Expired since the last update: red now, and ask for fresh figures
    // rather than show a stale "expired" until the next poll.
    if (ts && ts <= now && !td.classList.contains("level-crit")) {
      td.classList.add("level-crit");
      crossed = true;
    }
  }
  for (const td of document.querySelectorAll("td[data-ago]")) {
    const ts = Number(td.dataset.ago);
    td.firstChild.textContent = ts ? fmt(now - ts) + " ago" : "-";
  }
  if (crossed && Date.now() - lastPoll > 1000) poll();
}

function render(data) {
  skew = Date.parse(data.now) - Date.now();
  connectEnabled = data.connect_enabled;
  const error = document.getElementById("error");
  error.hidden = !data.error;
  error.textContent = data.error || "";
  if (data.error) return; // keep the last known rows
  const body = document.getElementById("grants");
  const rows = data.grants.map(row);
  if (rows.length === 0) {
    const empty = el("tr", "empty");
    const td = el("td", "", "No grants yet. Seed one with 'refresher seed --grant NAME'" + (connectEnabled ? " or open /connect/NAME." : "."));
    td.colSpan = 9;
    empty.append(td);
    rows.push(empty);
  }
  body.replaceChildren(...rows);
  document.getElementById("updated").textContent = "as of " + new Date(data.now).toISOString().slice(11, 19) + " UTC";
  document.body.classList.remove("stale");
  tick();
}

// apiURL is the JSON's address next to the page's, without the user and
// password of a page opened as http://admin:...@host/ (fetch refuses URLs
// with credentials; the browser sends the ones it logged in with).
function apiURL() {
  const u = new URL("api/grants", location.href);
  u.username = "";
  u.password = "";
  return u.href;
}

async function poll() {
  if (polling) return;
  polling = true;
  lastPoll = Date.now();
  try {
    const resp = await fetch(apiURL(), { cache: "no-store", credentials: "same-origin", signal: AbortSignal.timeout(2 * POLL_MS) });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
  } catch (e) {
    document.body.classList.add("stale");
    document.getElementById("updated").textContent = "cannot reach the refresher (" + e.message + "): showing the last known state";
  } finally {
    polling = false;
  }
}

tick();
setInterval(tick, 1000);
setInterval(poll, POLL_MS);
poll();
