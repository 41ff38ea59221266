// The chat page: a client of protocol portico.v1 (chat/PROTOCOL.md).
// One WebSocket subscribed to every conversation of the user; after any
// disconnect it says "reconnecting…", gets a fresh token (which also
// rejoins the lobby), resubscribes each conversation from the last offset
// it saw and re-sends what was not acknowledged, with the same ids.
"use strict";
const $ = (id) => document.getElementById(id);
const NAME = /^[A-Za-z0-9_-]{1,32}$/;
const S = {
  user: null, token: null, ws: null, online: false, backoff: 500, waiting: 0,
  convs: new Map(), active: null, pending: new Map(), seq: 0, lastTyping: 0,
};

// ---- login -------------------------------------------------------------
$("login").addEventListener("submit", (e) => { e.preventDefault(); login($("user").value.trim()); });
const saved = localStorage.getItem("portico.name");
if (saved && NAME.test(saved)) { $("user").value = saved; login(saved); }

async function login(name) {
  if (!NAME.test(name)) return fail("login-error", "A name is 1 to 32 letters, digits, - or _.");
  try { await fetchToken(name); } catch (err) { return fail("login-error", err.message); }
  S.user = name;
  localStorage.setItem("portico.name", name);
  $("login").hidden = true; $("app").hidden = false; $("me").textContent = name;
  await loadConversations();
  select(S.convs.has("lobby") ? "lobby" : [...S.convs.keys()][0]);
  connect();
  setInterval(() => { if (S.online) loadConversations(); }, 5000);
}

async function fetchToken(name) {
  const r = await fetch("/demo/token?user=" + encodeURIComponent(name));
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.message || "the server said " + r.status);
  S.token = body.token;
}

async function api(method, path, body) {
  const r = await fetch(path, {
    method,
    headers: { authorization: "Bearer " + S.token, "content-type": "application/json" },
    body: body && JSON.stringify(body),
  });
  return { status: r.status, data: await r.json().catch(() => ({})) };
}

function fail(id, text) { $(id).textContent = text; $(id).hidden = false; }
function clear(id) { $(id).hidden = true; }

// ---- conversations -----------------------------------------------------
function conv(id) {
  let c = S.convs.get(id);
  if (!c) {
    c = { id, last: null, latest: 0, unread: 0, messages: new Map(), readBy: new Map(), subscribed: false, sentRead: 0 };
    S.convs.set(id, c);
  }
  return c;
}

async function loadConversations() {
  const { status, data } = await api("GET", "/api/conversations?limit=100").catch(() => ({}));
  if (status !== 200) return;
  for (const s of data.conversations) {
    const c = conv(s.id);
    c.latest = s.latest_offset;
    if (c.id !== S.active) c.unread = s.unread;
    if (S.online && !c.subscribed) subscribe(c);
  }
  renderConvs();
}

function title(id) {
  const m = /^dm-(.+)$/.exec(id);
  if (!m) return id;
  return m[1].split("-").filter((n) => n !== S.user).join(", ") || id;
}

function renderConvs() {
  const ul = $("convs");
  ul.replaceChildren();
  for (const c of S.convs.values()) {
    const li = document.createElement("li");
    li.dataset.conv = c.id;
    li.className = c.id === S.active ? "active" : "";
    const name = document.createElement("span");
    name.textContent = title(c.id);
    li.append(name);
    if (c.unread > 0 && c.id !== S.active) {
      const n = document.createElement("span");
      n.className = "unread";
      n.textContent = c.unread;
      li.append(n);
    }
    li.addEventListener("click", () => select(c.id));
    ul.append(li);
  }
}

function select(id) {
  if (!id) return;
  S.active = id;
  const c = conv(id);
  c.unread = 0;
  $("title").textContent = title(id);
  $("presence").textContent = "";
  $("typing").textContent = "";
  renderConvs();
  renderLog();
  send({ type: "presence", conv: id });
  markRead(c);
}

$("start").addEventListener("submit", async (e) => {
  e.preventDefault();
  const names = $("with").value.split(",").map((s) => s.trim()).filter(Boolean);
  const others = [...new Set(names)].filter((n) => n !== S.user);
  if (!others.length || !others.every((n) => NAME.test(n))) {
    return fail("start-error", "Name someone else: 1 to 32 letters, digits, - or _ (commas between names).");
  }
  const dm = others.length === 1 ? "dm-" + [S.user, others[0]].sort().join("-") : null;
  const id = dm && dm.length <= 64 ? dm : undefined;
  const { status, data } = await api("POST", "/api/conversations", id ? { id, members: others } : { members: others });
  if (status !== 201 && status !== 409) return fail("start-error", data.message || "the server said " + status);
  clear("start-error");
  $("with").value = "";
  const c = conv(id || data.id);
  if (S.online && !c.subscribed) subscribe(c);
  select(c.id);
});

// ---- the connection ----------------------------------------------------
function status(text, state) { $("status").textContent = text; $("status").dataset.state = state; }

function send(frame) {
  if (S.online && S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(JSON.stringify(frame));
}

function subscribe(c) {
  const sub = { type: "subscribe", conv: c.id };
  // Resume after the last offset seen; the first time, the last 50.
  sub.since = c.last !== null ? c.last : Math.max(0, c.latest - 50);
  S.waiting++;
  S.ws.send(JSON.stringify(sub));
}

function connect() {
  status("connecting…", "connecting");
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws",
    ["portico.v1", "bearer." + S.token]);
  S.ws = ws;
  ws.onopen = () => {
    S.backoff = 500;
    S.online = true;
    S.waiting = 0;
    for (const c of S.convs.values()) subscribe(c);
    if (S.waiting === 0) ready();
  };
  ws.onmessage = (ev) => handle(JSON.parse(ev.data));
  ws.onclose = (ev) => {
    if (ws !== S.ws) return;
    S.online = false;
    for (const c of S.convs.values()) c.subscribed = false;
    if ([1002, 1003, 1008, 1009].includes(ev.code)) return status("disconnected (" + ev.code + ")", "offline");
    status("reconnecting…", "reconnecting");
    const wait = S.backoff * (0.5 + Math.random());
    S.backoff = Math.min(S.backoff * 2, 8000);
    setTimeout(reconnect, wait);
  };
}

async function reconnect() {
  try { await fetchToken(S.user); await loadConversations(); } catch (_) { /* retried below */ }
  connect();
}

function ready() {
  status("online", "online");
  // What was sent but not acknowledged goes again, with the same ids.
  for (const [id, p] of S.pending) send({ type: "publish", conv: p.conv, id, body: p.body });
  if (S.active) send({ type: "presence", conv: S.active });
}

function handle(f) {
  const c = f.conv ? conv(f.conv) : null;
  switch (f.type) {
    case "subscribed":
      c.subscribed = true;
      if (--S.waiting === 0) ready();
      break;
    case "message":
      addMessage(c, f);
      if (f.offset > (c.last ?? 0)) c.last = f.offset;
      if (c.id === S.active) { renderLog(); markRead(c); } else if (f.from !== S.user) { c.unread++; renderConvs(); }
      break;
    case "history":
      f.messages.forEach((m) => addMessage(c, m));
      if (c.id === S.active) renderLog(true);
      break;
    case "ack":
      S.pending.delete(f.id);
      if (c.id === S.active) renderLog();
      break;
    case "presence":
      if (c.id === S.active) {
        const others = f.users.filter((u) => u !== S.user);
        $("presence").textContent = others.length ? "online: " + others.join(", ") : "nobody else is here";
      }
      break;
    case "event":
      onEvent(c, f.user, f.event);
      break;
    case "unsubscribed":
      S.convs.delete(c.id);
      if (S.active === c.id) select([...S.convs.keys()][0]);
      renderConvs();
      break;
    case "error":
      if (f.id) S.pending.delete(f.id);
      if (f.code === "not_member" && c) {
        // Removed meanwhile (or the lobby forgot us): a fresh token rejoins.
        S.waiting = Math.max(0, S.waiting - 1);
        if (c.id === "lobby") reconnectSoon(); else { S.convs.delete(c.id); renderConvs(); }
      } else if (f.code === "resume_too_far" && c) {
        c.last = null; c.latest = 0; c.messages.clear(); S.waiting--; subscribe(c);
      }
      note(c, "(" + f.code + ": " + f.message + ")");
      break;
  }
}

function reconnectSoon() { if (S.ws) S.ws.close(4000, "rejoin"); }

function onEvent(c, user, ev) {
  if (user === S.user || !c) return;
  if (ev.kind === "typing" && c.id === S.active) {
    $("typing").textContent = user + " is typing…";
    clearTimeout(c.typingTimer);
    c.typingTimer = setTimeout(() => { if (S.active === c.id) $("typing").textContent = ""; }, 3000);
  } else if (ev.kind === "read") {
    c.readBy.set(user, Math.max(c.readBy.get(user) || 0, ev.offset));
    if (c.id === S.active) renderLog();
  } else if ((ev.kind === "joined" || ev.kind === "left") && c.id === S.active) {
    send({ type: "presence", conv: c.id });
  }
}

function markRead(c) {
  if (document.visibilityState !== "visible" || c.last === null || c.last <= c.sentRead) return;
  c.sentRead = c.last;
  send({ type: "read", conv: c.id, offset: c.last });
}
document.addEventListener("visibilitychange", () => { if (S.active) markRead(conv(S.active)); });

// ---- messages ------------------------------------------------------------
function addMessage(c, m) { c.messages.set(m.offset, m); }

function note(c, text) {
  const li = document.createElement("li");
  li.className = "meta";
  li.textContent = text;
  $("log").append(li);
}

function renderLog(keepTop) {
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  const before = log.scrollHeight;
  const c = conv(S.active);
  log.replaceChildren();
  const readers = [...c.readBy.entries()];
  for (const m of [...c.messages.values()].sort((a, b) => a.offset - b.offset)) {
    const li = document.createElement("li");
    li.dataset.offset = m.offset;
    if (m.from === S.user) li.className = "mine";
    const from = document.createElement("span");
    from.className = "from";
    from.textContent = m.from;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = new Date(m.ts).toLocaleTimeString();
    if (m.from === S.user) {
      const by = readers.filter(([u, o]) => u !== S.user && o >= m.offset).map(([u]) => u);
      if (by.length) meta.textContent += " ✓ read by " + by.join(", ");
    }
    li.append(from, document.createTextNode(m.body), meta);
    log.append(li);
  }
  for (const [, p] of S.pending) {
    if (p.conv !== c.id) continue;
    const li = document.createElement("li");
    li.className = "mine pending";
    li.append(Object.assign(document.createElement("span"), { className: "from", textContent: S.user }),
      document.createTextNode(p.body),
      Object.assign(document.createElement("span"), { className: "meta", textContent: "sending…" }));
    log.append(li);
  }
  if (keepTop) log.scrollTop = log.scrollHeight - before;
  else if (atBottom || !keepTop) log.scrollTop = log.scrollHeight;
}

// Scrolled to the top: the page of history before the oldest message.
$("log").addEventListener("scroll", () => {
  const c = S.active && conv(S.active);
  if (!c || $("log").scrollTop > 0 || !c.messages.size) return;
  const oldest = Math.min(...c.messages.keys());
  if (oldest > 1 && oldest !== c.askedBefore) {
    c.askedBefore = oldest;
    send({ type: "history", conv: c.id, before: oldest, limit: 50 });
  }
});

$("send").addEventListener("submit", (e) => {
  e.preventDefault();
  const body = $("body").value;
  if (!body.trim() || !S.active) return;
  const id = S.user + "-" + Date.now().toString(36) + "-" + (S.seq++);
  S.pending.set(id, { conv: S.active, body });
  send({ type: "publish", conv: S.active, id, body });
  $("body").value = "";
  renderLog();
});

$("body").addEventListener("input", () => {
  const now = Date.now();
  if (S.active && now - S.lastTyping > 2000) {
    S.lastTyping = now;
    send({ type: "typing", conv: S.active });
  }
});
