// The ops console's one script: sends forms to the JSON API with the
// session's CSRF token (refreshing the session once when its access token
// has expired), shows API errors as their message, and follows a
// customer's or an app's task events live over the chat WebSocket.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

function csrf() {
  const m = $('meta[name="csrf-token"]');
  return m ? m.content : "";
}

function flash(text, isError) {
  const f = $("#flash");
  if (!f) return;
  f.textContent = text;
  f.className = isError ? "error" : "ok";
  f.setAttribute("role", isError ? "alert" : "status");
}

function toLogin() {
  location.assign("/console/login?next=" + encodeURIComponent(location.pathname + location.search));
}

// An API error's message, never a bare status.
async function failure(resp) {
  let text = resp.status + " " + resp.statusText;
  try {
    const j = await resp.json();
    if (j && j.message) text = j.message + " (" + j.error + ")";
  } catch (_) { /* not JSON */ }
  return text;
}

async function refreshSession() {
  const r = await fetch("/api/auth/refresh", { method: "POST", credentials: "same-origin" });
  if (!r.ok) return false;
  const j = await r.json();
  const m = $('meta[name="csrf-token"]');
  if (m) m.content = j.csrf;
  return true;
}

// Calls the API; on an expired session, refreshes once and retries.
async function call(method, url, body, contentType) {
  const send = () => {
    const headers = { "X-CSRF-Token": csrf() };
    if (body !== undefined) headers["Content-Type"] = contentType || "application/json";
    return fetch(url, {
      method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : (typeof body === "string" ? body : JSON.stringify(body)),
    });
  };
  let r = await send();
  if (r.status === 401) {
    if (await refreshSession()) r = await send();
    if (r.status === 401) { toLogin(); throw new Error("the session has ended"); }
  }
  if (!r.ok) throw new Error(await failure(r));
  return r;
}

// The JSON body of a form: `a.b` names nest, checkboxes are booleans,
// disabled and empty fields are left out.
function formBody(form) {
  const body = {};
  for (const el of form.elements) {
    if (!el.name || el.disabled || el.closest("fieldset:disabled")) continue;
    if (el.type === "radio" && !el.checked) continue;
    let v = el.type === "checkbox" ? el.checked : el.value;
    if (v === "") continue;
    if (el.type === "number") v = Number(v);
    const path = el.name.split(".");
    let o = body;
    for (const k of path.slice(0, -1)) o = o[k] = o[k] || {};
    o[path[path.length - 1]] = v;
  }
  return body;
}

// Replaces the parts of the page with these ids by their fresh versions.
async function refresh(ids) {
  const r = await fetch(location.href, { credentials: "same-origin" });
  if (!r.ok) return;
  const doc = new DOMParser().parseFromString(await r.text(), "text/html");
  for (const id of ids) {
    const now = document.getElementById(id), fresh = doc.getElementById(id);
    if (now && fresh) now.replaceWith(fresh);
  }
  bind(document);
}

function show(answer) {
  const pre = $("#answer");
  if (!pre) return;
  pre.hidden = false;
  pre.textContent = JSON.stringify(answer, null, 2);
}

async function submitApi(form) {
  const [method, url] = form.dataset.api.split(" ");
  if (form.dataset.confirm && !confirm(form.dataset.confirm)) return;
  let body, type;
  if (form.dataset.raw) {
    body = form.elements[form.dataset.raw].value;
    type = "text/csv";
  } else if (form.dataset.from) {
    body = { [form.dataset.from]: document.getElementById(form.dataset.from).value };
  } else if (method !== "DELETE") {
    body = formBody(form);
  }
  const button = $("button[type=submit]", form);
  if (button) button.disabled = true;
  try {
    const r = await call(method, url, body, type);
    const answer = r.status === 204 ? null : await r.json().catch(() => null);
    flash("Done.", false);
    const then = (form.dataset.then || "").split(" ");
    if (then.includes("show") && answer) show(answer);
    if (then.includes("live")) live.start();
    if (then[0] === "go") location.assign(then[1]);
    const ids = then.slice(then.indexOf("refresh") + 1);
    if (then.includes("refresh")) await refresh(ids);
  } catch (e) {
    flash(e.message, true);
  } finally {
    if (button) button.disabled = false;
  }
}

// ---- live task events over the chat WebSocket ---------------------------
const live = {
  ws: null, backoff: 500, section: null,
  async start() {
    this.section = $("#live");
    if (!this.section || this.ws) return;
    const who = this.section.dataset.customer ? "customer=" + encodeURIComponent(this.section.dataset.customer)
      : "app=" + encodeURIComponent(this.section.dataset.app);
    let t;
    try {
      t = await (await call("GET", "/api/auth/chat-token?" + who)).json();
    } catch (e) {
      this.section.hidden = false;
      $("#live-result").textContent = "Live progress is not available: " + e.message;
      return;
    }
    const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws",
      ["portico.v1", "bearer." + t.token]);
    this.ws = ws;
    ws.onopen = () => { this.backoff = 500; ws.send(JSON.stringify({ type: "subscribe", conv: t.conv })); };
    ws.onmessage = (ev) => {
      const f = JSON.parse(ev.data);
      if (f.type !== "message") return;
      let e;
      try { e = JSON.parse(f.body); } catch (_) { return; }
      this.onEvent(e);
    };
    ws.onclose = () => {
      this.ws = null;
      setTimeout(() => this.start(), this.backoff * (0.5 + Math.random()));
      this.backoff = Math.min(this.backoff * 2, 10000);
    };
  },
  onEvent(e) {
    const s = this.section, ev = e.event || "", d = e.data || {};
    const kind = ev.replace(/-(progress|completed|failed)$/, "");
    s.hidden = false;
    $("#live-kind").textContent = kind + " #" + e.task;
    const bar = $("#live-bar");
    if (ev.endsWith("-progress")) {
      bar.value = d.percent || 0;
      $("#live-step").textContent = d.step || "";
      $("#live-bytes").textContent = fmtBytes(d.bytes || 0) + (d.total_bytes ? " of " + fmtBytes(d.total_bytes) : "");
      $("#live-eta").textContent = d.eta_secs == null ? "—" : d.eta_secs + " s";
      $("#live-result").textContent = "running";
      const log = $("#live-log");
      if (log && d.log) log.textContent = d.log.join("\n");
    } else if (ev.endsWith("-completed") || ev.endsWith("-failed")) {
      const ok = ev.endsWith("-completed");
      if (ok) bar.value = 100;
      $("#live-eta").textContent = "—";
      $("#live-result").textContent = ok ? "completed" : "failed: " + (d.error || "");
      s.dataset.state = ok ? "completed" : "failed";
      refresh(["history", "tasks", "gate", "mailboxes", "apps"]);
    }
  },
};

function fmtBytes(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(1) + " GB";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + " MB";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " kB";
  return n + " B";
}

// ---- wiring ---------------------------------------------------------------
function bind(root) {
  for (const form of $$("form[data-api]", root)) {
    if (form.dataset.bound) continue;
    form.dataset.bound = "1";
    form.addEventListener("submit", (ev) => { ev.preventDefault(); submitApi(form); });
  }
  for (const b of $$("button.download", root)) {
    if (b.dataset.bound) continue;
    b.dataset.bound = "1";
    b.addEventListener("click", async () => {
      try {
        const j = await (await call("POST", b.dataset.links)).json();
        const ul = $("ul.links", b.parentElement);
        ul.replaceChildren(...j.links.map((l) => {
          const li = document.createElement("li"), a = document.createElement("a");
          a.href = l.url; a.textContent = l.file; a.setAttribute("download", l.file);
          li.append(a);
          return li;
        }));
      } catch (e) { flash(e.message, true); }
    });
  }
}

function setupBackupForm() {
  const form = $("form.backup");
  if (!form) return;
  const custom = $("fieldset.custom", form);
  const sync = () => { custom.disabled = form.elements.type.value !== "custom"; };
  form.addEventListener("change", sync);
  sync();
}

function setupLogin() {
  const form = $("#login");
  if (!form) return;
  const next = form.dataset.next;
  $("button[type=submit]", form).disabled = false;
  // A live refresh token (7 days) logs in without a password.
  refreshSession().then((ok) => { if (ok) location.replace(next); });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const err = $("#login-error");
    err.textContent = "";
    let r;
    try {
      r = await fetch("/api/auth/login", {
        method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ account: form.elements.account.value, password: form.elements.password.value }),
      });
    } catch (e) {
      // The network dropped the request (e.g. the machine's network changed).
      err.textContent = "The request did not get through (" + e.message + "): try again.";
      return;
    }
    if (r.ok) location.assign(next);
    else err.textContent = await failure(r);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  bind(document);
  setupBackupForm();
  setupLogin();
  const logout = $("#logout");
  if (logout) logout.addEventListener("click", async () => {
    try { await call("POST", "/api/auth/logout"); } catch (_) { /* gone already */ }
    location.assign("/console/login");
  });
  const plan = $("#plan");
  if (plan) plan.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const out = $("#plan-out");
    try {
      const j = await (await call("GET", plan.dataset.plan + "?to=" + encodeURIComponent($("#to").value))).json();
      out.innerHTML = "";
      const pre = document.createElement("pre");
      pre.textContent = JSON.stringify(j, null, 2);
      out.append(pre);
    } catch (e) { out.textContent = e.message; }
  });
  const logs = $("#logs-load");
  if (logs) logs.addEventListener("click", async () => {
    try { $("#logs").textContent = await (await call("GET", logs.dataset.logs)).text() || "(no output yet)"; }
    catch (e) { $("#logs").textContent = e.message; }
  });
  if ($("#live")) live.start();
  // For whoever drives the page (the browser tests): the forms are wired.
  document.documentElement.dataset.ready = "1";
});
