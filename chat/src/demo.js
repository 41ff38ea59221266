// Demo client of protocol portico.v1 (chat/PROTOCOL.md): join the lobby,
// resume after a reconnect from the last offset seen, publish with ids.
"use strict";
const $ = (id) => document.getElementById(id);
let ws, token, user, conv, lastOffset = null, seq = 0, backoff = 500;

$("login").addEventListener("submit", async (e) => {
  e.preventDefault();
  user = $("user").value;
  const r = await fetch("/demo/token?user=" + encodeURIComponent(user));
  if (!r.ok) { alert((await r.json()).message); return; }
  ({ token, conv } = await r.json());
  $("login").hidden = true;
  $("chat").hidden = false;
  connect();
});

function connect() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  ws = new WebSocket(scheme + location.host + "/ws", ["portico.v1", "bearer." + token]);
  ws.onopen = () => {
    backoff = 500;
    status("online", true);
    const sub = { type: "subscribe", conv };
    if (lastOffset !== null) sub.since = lastOffset; // resume: nothing is missed
    ws.send(JSON.stringify(sub));
    if (lastOffset === null) ws.send(JSON.stringify({ type: "history", conv, limit: 50 }));
  };
  ws.onmessage = (ev) => {
    const f = JSON.parse(ev.data);
    if (f.type === "message") show(f);
    else if (f.type === "history") f.messages.forEach(show);
    else if (f.type === "error") note("error: " + f.code + " (" + f.message + ")");
  };
  ws.onclose = (ev) => {
    status("offline (" + ev.code + ")", false);
    // 1008/1002/1003/1009 mean "fix the client"; everything else: reconnect.
    if ([1002, 1003, 1008, 1009].includes(ev.code)) return;
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 10000);
  };
}

$("send").addEventListener("submit", (e) => {
  e.preventDefault();
  const body = $("body").value;
  if (!body || !ws || ws.readyState !== WebSocket.OPEN) return;
  ws.send(JSON.stringify({ type: "publish", conv, id: user + "-" + Date.now() + "-" + (seq++), body }));
  $("body").value = "";
});

const shown = new Set();
function show(m) {
  if (shown.has(m.offset)) return;
  shown.add(m.offset);
  if (lastOffset === null || m.offset > lastOffset) lastOffset = m.offset;
  const li = document.createElement("li");
  if (m.from === user) li.className = "mine";
  const from = document.createElement("span");
  from.className = "from";
  from.textContent = m.from;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = "#" + m.offset + " " + new Date(m.ts).toLocaleTimeString();
  li.append(from, document.createTextNode(m.body), meta);
  const log = $("log");
  const after = [...log.children].find((c) => Number(c.dataset.offset) > m.offset);
  li.dataset.offset = m.offset;
  log.insertBefore(li, after || null);
  log.scrollTop = log.scrollHeight;
}
function note(text) {
  const li = document.createElement("li");
  li.className = "meta";
  li.textContent = text;
  $("log").append(li);
}
function status(text, online) {
  $("status").textContent = text;
  $("status").className = online ? "online" : "";
}
