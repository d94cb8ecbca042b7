/**
 * The pages people see: a landing page and the live room viewer. Every value from the
 * database goes through JSX interpolation, which escapes it; the page script renders
 * later updates with `textContent`, which never parses markup.
 */
import type { Child } from "hono/jsx";
import { raw } from "hono/html";
import type { Agent, Message, Room, StateEntry } from "./db.ts";

const STYLE = `
:root { color-scheme: light dark; --line: #8884; --muted: #888; --accent: #2a7ae2; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1200px; padding: 1rem; }
h1 { font-size: 1.3rem; margin: 0 0 .25rem; } h2 { font-size: 1rem; margin: 1rem 0 .5rem; }
code, pre, .mono { font-family: ui-monospace, monospace; font-size: 12.5px; }
pre { margin: 0; white-space: pre-wrap; word-break: break-word; }
.muted { color: var(--muted); }
.grid { display: grid; grid-template-columns: minmax(0, 2fr) minmax(0, 1fr); gap: 1.5rem; }
@media (max-width: 800px) { .grid { grid-template-columns: minmax(0, 1fr); } }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .25rem .4rem; border-bottom: 1px solid var(--line); vertical-align: top; overflow-wrap: anywhere; }
ol.messages { list-style: none; margin: 0; padding: 0; }
ol.messages li { border-bottom: 1px solid var(--line); padding: .4rem 0; }
.head { display: flex; gap: .5rem; flex-wrap: wrap; align-items: baseline; }
.kind { background: #8882; border-radius: 3px; padding: 0 .35rem; }
.from { font-weight: 600; }
#status { float: right; }
#status.live { color: #2a2; } #status.down { color: #c33; }
li.reply { margin-left: 1.5rem; }
.claim { color: #b60; }
.claim.done { color: #080; }
.claim.dead { color: #b00; }
.status.waiting { color: #2a7ae2; } .status.busy { color: #b60; } .status.done { color: var(--muted); }
`;

/** The page frame; `nonce` lets its inline style and script past the CSP. */
function Layout(props: { title: string; nonce: string; children: Child }) {
  return (
    <>
      {raw("<!DOCTYPE html>")}
      <html lang="en">
        <head>
          <meta charset="utf-8" />
          <meta name="viewport" content="width=device-width, initial-scale=1" />
          <link rel="icon" href="data:," />
          <title>{props.title}</title>
          <style nonce={props.nonce}>{raw(STYLE)}</style>
        </head>
        <body>{props.children}</body>
      </html>
    </>
  );
}

/** The page a browser gets at `/` without a room. */
export function Landing(props: { docs: string; nonce: string }) {
  return (
    <Layout title="sync" nonce={props.nonce}>
      <h1>sync</h1>
      <p>A coordination service for AI agents. Open a room to watch it live:</p>
      <form method="get" action="/">
        <input name="room" placeholder="room id" required />{" "}
        <button type="submit">Open</button>
      </form>
      <h2>Usage</h2>
      <pre>{props.docs}</pre>
    </Layout>
  );
}

/** The viewer's answer for a room id that does not exist. */
export function MissingRoom(props: { id: string; nonce: string }) {
  return (
    <Layout title="sync: no such room" nonce={props.nonce}>
      <h1>No room "{props.id}"</h1>
      <p>
        Nobody has created it yet. Agents create it with{" "}
        <code>POST /rooms</code>; <a href="/">back</a>
      </p>
    </Layout>
  );
}

/** How a JSON value is shown: strings as they are, anything else as indented JSON. */
function show(value: unknown): string {
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

/** `hh:mm:ss` of an ISO time (UTC, like every time the API returns). */
function clock(iso: string): string {
  return iso.slice(11, 19);
}

// The markup of MessageItem, AgentRow and StateRow is built again by the page script
// (VIEWER_SCRIPT) for live updates: change them together.

/** "3s", "4m", "2h": how long ago, for presence. */
function ago(ms: number): string {
  if (ms < 60_000) return `${Math.floor(ms / 1000)}s`;
  if (ms < 3_600_000) return `${Math.floor(ms / 60_000)}m`;
  return `${Math.floor(ms / 3_600_000)}h`;
}

/**
 * A message's task status in a few words: who holds it and until when, done by whom,
 * dead, or open after attempts; nothing for a message never claimed. `lapsed`: as it
 * reads once the lease runs out. (The page's script says the same: `taskText`.)
 */
function taskText(m: Message, lapsed = false): string {
  const tries = m.max_attempts === null
    ? `${m.attempts}`
    : `${m.attempts}/${m.max_attempts}`;
  if (m.status === "done") return `done by ${m.done_by}`;
  if (m.status === "dead") return `dead after ${tries} attempts`;
  if (m.status === "held" && !lapsed) {
    const until = m.lease_expires_at
      ? ` until ${clock(m.lease_expires_at)}`
      : "";
    return `claimed by ${m.claimed_by}${until} · attempt ${tries}`;
  }
  if (m.max_attempts !== null && m.attempts >= m.max_attempts) {
    return `dead after ${tries} attempts`;
  }
  return m.attempts === 0 && m.max_attempts === null
    ? ""
    : `open · attempts ${tries}`;
}

function MessageItem({ m }: { m: Message }) {
  return (
    <li id={`m-${m.id}`} class={m.reply_to === null ? "" : "reply"}>
      <div class="head">
        <span class="muted mono">#{m.id}</span>
        <span class="kind">{m.kind}</span>
        <span class="from">{m.from_agent ?? "anonymous"}</span>
        <span class="muted">→</span>
        <span class="to">{m.to_agent ?? "everyone"}</span>
        {m.reply_to === null
          ? ""
          : <a class="muted" href={`#m-${m.reply_to}`}>↳ #{m.reply_to}</a>}
        <span
          class={`claim ${m.status}`}
          data-until={m.lease_expires_at ?? ""}
          data-lapsed={taskText(m, true)}
        >
          {taskText(m)}
        </span>
        <time class="muted" datetime={m.created_at} title={m.created_at}>
          {clock(m.created_at)}
        </time>
      </div>
      <pre>{show(m.body)}</pre>
    </li>
  );
}

function AgentRow({ a }: { a: Agent }) {
  return (
    <tr id={`a-${a.id}`}>
      <td class="mono">{a.id}</td>
      <td>{a.name}</td>
      <td>{a.role}</td>
      <td>
        <span class={`status ${a.status}`}>{a.status}</span>
      </td>
      <td class="muted seen" data-seen={a.last_seen} title={a.last_seen}>
        {ago(a.idle_ms)}
      </td>
    </tr>
  );
}

function StateRow({ s }: { s: StateEntry }) {
  return (
    <tr data-expires={s.expires_at ?? ""}>
      <td class="mono">{s.scope}</td>
      <td class="mono">{s.key}</td>
      <td>
        <pre>{show(s.value)}</pre>
      </td>
      <td class="mono" title={s.expires_at ? `expires ${s.expires_at}` : ""}>
        v{s.version}
        {s.expires_at ? " ttl" : ""}
      </td>
    </tr>
  );
}

/**
 * The live viewer: renders the room now, then keeps it current from the room's event
 * stream (`GET /rooms/:id/stream`), the same endpoint agents use, resuming after the
 * last message it has.
 */
export function RoomPage(props: {
  room: Room;
  nonce: string;
  /** What the server may show; absent for a locked room (the page loads it with its token). */
  data?: {
    agents: Agent[];
    messages: { items: Message[]; total: number };
    state: StateEntry[];
  };
}) {
  const { room, nonce } = props;
  const { agents, messages, state } = props.data ??
    { agents: [], messages: { items: [], total: 0 }, state: [] };
  const last = messages.items.at(-1)?.id ?? 0;
  const data = JSON.stringify({
    room: room.id,
    after: last,
    locked: room.locked,
  })
    .replaceAll("<", "\\u003c");
  return (
    <Layout title={`sync: ${room.id}`} nonce={nonce}>
      <span id="status" class="muted">loaded</span>
      <h1>
        Room <span class="mono">{room.id}</span>
      </h1>
      <div class="muted" id="room-meta">
        {room.locked
          ? "locked: open it with #token=<a view, agent or room token> at the end of the address"
          : (
            <>
              created {room.created_at} · meta{" "}
              <code>{JSON.stringify(room.meta)}</code>
            </>
          )}
      </div>
      <div class="grid">
        <section>
          <h2>
            Messages{" "}
            <span class="muted" id="message-count">
              {messages.total > messages.items.length
                ? `(last ${messages.items.length} of ${messages.total})`
                : ""}
            </span>
          </h2>
          <ol class="messages" id="messages">
            {messages.items.map((m) => <MessageItem key={m.id} m={m} />)}
          </ol>
        </section>
        <section>
          <h2>Agents</h2>
          <table>
            <thead>
              <tr>
                <th>id</th>
                <th>name</th>
                <th>role</th>
                <th>status</th>
                <th>seen</th>
              </tr>
            </thead>
            <tbody id="agents">
              {agents.map((a) => <AgentRow key={a.id} a={a} />)}
            </tbody>
          </table>
          <h2>State</h2>
          <table>
            <thead>
              <tr>
                <th>scope</th>
                <th>key</th>
                <th>value</th>
                <th>version</th>
              </tr>
            </thead>
            <tbody id="state">
              {state.map((s) => <StateRow key={`${s.scope}/${s.key}`} s={s} />)}
            </tbody>
          </table>
        </section>
      </div>
      <script id="room-data" type="application/json">{raw(data)}</script>
      <script nonce={nonce}>{raw(VIEWER_SCRIPT)}</script>
    </Layout>
  );
}

/**
 * Follows the room's event stream with fetch (so a token can later travel in a header)
 * and renders each event with textContent only; reconnects with Last-Event-ID.
 */
const VIEWER_SCRIPT = `
"use strict";
const data = JSON.parse(document.getElementById("room-data").textContent);
const base = "/rooms/" + encodeURIComponent(data.room);
// A locked room's token rides in the URL fragment, which browsers never send. It moves
// to this tab's session storage and out of the address (and history): reply links
// change the fragment, and a reload still has it.
const tokenKey = "sync-token:" + data.room;
const given = new URLSearchParams(location.hash.slice(1)).get("token");
// A token is printable ASCII: anything else could not even be sent as a header.
const malformed = given !== null && !/^[\\x21-\\x7e]+$/.test(given);
if (given !== null) {
  if (!malformed) sessionStorage.setItem(tokenKey, given);
  history.replaceState(null, "", location.pathname + location.search);
}
const token = sessionStorage.getItem(tokenKey);
let auth = token ? { authorization: "Bearer " + token } : {};
const MAX_SHOWN = 2000;
let after = data.after;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}
const show = (v) => typeof v === "string" ? v : JSON.stringify(v, null, 2);
const clock = (iso) => iso.slice(11, 19);
function ago(ms) {
  if (ms < 60000) return Math.floor(ms / 1000) + "s";
  if (ms < 3600000) return Math.floor(ms / 60000) + "m";
  return Math.floor(ms / 3600000) + "h";
}
function taskText(m, lapsed = false) {
  const tries = m.max_attempts === null ? String(m.attempts) : m.attempts + "/" + m.max_attempts;
  if (m.status === "done") return "done by " + m.done_by;
  if (m.status === "dead") return "dead after " + tries + " attempts";
  if (m.status === "held" && !lapsed) {
    return "claimed by " + m.claimed_by + (m.lease_expires_at ? " until " + clock(m.lease_expires_at) : "") +
      " · attempt " + tries;
  }
  if (m.max_attempts !== null && m.attempts >= m.max_attempts) return "dead after " + tries + " attempts";
  return m.attempts === 0 && m.max_attempts === null ? "" : "open · attempts " + tries;
}
const taskSpan = (m) => el("span", { class: "claim " + m.status, "data-until": m.lease_expires_at ?? "",
  "data-lapsed": taskText(m, true) }, taskText(m));

function messageItem(m) {
  const head = el("div", { class: "head" },
    el("span", { class: "muted mono" }, "#" + m.id),
    el("span", { class: "kind" }, m.kind),
    el("span", { class: "from" }, m.from_agent ?? "anonymous"),
    el("span", { class: "muted" }, "→"),
    el("span", { class: "to" }, m.to_agent ?? "everyone"));
  if (m.reply_to !== null) head.append(el("a", { class: "muted", href: "#m-" + m.reply_to }, "↳ #" + m.reply_to));
  head.append(taskSpan(m),
    el("time", { class: "muted", datetime: m.created_at, title: m.created_at }, clock(m.created_at)));
  return el("li", { id: "m-" + m.id, class: m.reply_to === null ? "" : "reply" }, head, el("pre", {}, show(m.body)));
}
const agentRow = (a) => el("tr", { id: "a-" + a.id },
  el("td", { class: "mono" }, a.id), el("td", {}, a.name), el("td", {}, a.role),
  el("td", {}, el("span", { class: "status " + a.status }, a.status)),
  el("td", { class: "muted seen", "data-seen": a.last_seen, title: a.last_seen }, ago(a.idle_ms)));
function stateRow(s) {
  const version = el("td", { class: "mono", title: s.expires_at ? "expires " + s.expires_at : "" }, "v" + s.version);
  if (s.expires_at) version.append(" ttl");
  return el("tr", { "data-key": s.scope + "\\n" + s.key, "data-expires": s.expires_at ?? "" },
    el("td", { class: "mono" }, s.scope), el("td", { class: "mono" }, s.key),
    el("td", {}, el("pre", {}, show(s.value))), version);
}

// What this connection's snapshot has said; on "ready", rows it did not mention are
// gone (deleted or released while the page was disconnected).
let fresh = { state: new Set(), claims: new Set() };

function onMessage(m) {
  fresh.claims.add(m.id);
  if (m.id <= after) return;
  after = m.id;
  const list = document.getElementById("messages");
  const nearBottom = innerHeight + scrollY >= document.body.scrollHeight - 40;
  list.append(messageItem(m));
  while (list.children.length > MAX_SHOWN) list.firstElementChild.remove();
  if (nearBottom) scrollTo(0, document.body.scrollHeight);
}
function onClaim(m) {
  fresh.claims.add(m.id);
  const item = document.getElementById("m-" + m.id);
  if (!item) return;
  item.querySelector(".claim").replaceWith(taskSpan(m));
}
function onAgent(a) {
  const row = agentRow(a);
  const old = document.getElementById("a-" + a.id);
  if (old) old.replaceWith(row); else document.getElementById("agents").append(row);
}
function onState(s) {
  const body = document.getElementById("state");
  const id = s.scope + "\\n" + s.key;
  fresh.state.add(id);
  const old = [...body.children].find((row) => row.dataset.key === id);
  if (s.deleted) return old && old.remove();
  const row = stateRow(s);
  if (old) return old.replaceWith(row);
  const next = [...body.children].find((r) => r.dataset.key > id);
  body.insertBefore(row, next || null);
}
// Server-rendered state rows get their keys for onState.
for (const row of document.getElementById("state").children) {
  row.dataset.key = row.children[0].textContent + "\\n" + row.children[1].textContent;
}
// Presence ages tick, and TTLs and leases run out, locally: the server sends no event
// when time alone changes something.
function tickClock() {
  const now = Date.now();
  for (const cell of document.querySelectorAll(".seen")) {
    cell.textContent = ago(now - Date.parse(cell.dataset.seen));
  }
  for (const row of document.querySelectorAll("tr[data-expires]")) {
    if (row.dataset.expires && Date.parse(row.dataset.expires) <= now) row.remove();
  }
  for (const claim of document.querySelectorAll(".claim[data-until]")) {
    if (claim.dataset.until && Date.parse(claim.dataset.until) <= now) {
      claim.textContent = claim.dataset.lapsed;
      claim.dataset.until = "";
    }
  }
}
setInterval(tickClock, 1000);

function setStatus(text, cls) {
  const node = document.getElementById("status");
  node.textContent = text;
  node.className = cls;
}

function onReady() {
  for (const row of [...document.getElementById("state").children]) {
    if (!fresh.state.has(row.dataset.key)) row.remove();
  }
  for (const item of document.querySelectorAll("#messages li")) {
    if (!fresh.claims.has(Number(item.id.slice(2)))) {
      const claim = item.querySelector(".claim");
      claim.textContent = claim.dataset.lapsed;
    }
  }
}

const handlers = { message: onMessage, claim: onClaim, agent: onAgent, state: onState, ready: onReady };

async function follow() {
  const res = await fetch(base + "/stream?after=" + after, { headers: { accept: "text/event-stream", ...auth } });
  if ((res.status === 401 || res.status === 403) && auth.authorization) {
    // A mistyped, rotated or stale token: forget it. An open room needs none.
    sessionStorage.removeItem(tokenKey);
    auth = {};
    if (!data.locked) return;
    return stop("This room is locked and its token was refused: open it again with #token=<a current view, agent or room token>.");
  }
  if (res.status === 401 || res.status === 403) {
    return stop("This room is locked: add #token=<a view, agent or room token> to the address.");
  }
  if (res.status === 404) return stop("This room was deleted.");
  if (!res.ok || !res.body) throw new Error("stream answered " + res.status);
  fresh = { state: new Set(), claims: new Set() };
  setStatus("live", "live");
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\\n\\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", payload = "";
      for (const line of block.split("\\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) payload += line.slice(5).trimStart();
      }
      if (payload && handlers[event]) handlers[event](JSON.parse(payload));
    }
  }
}

/** Says why the page does not follow the room. */
function halt(text) {
  document.getElementById("room-meta").textContent = text;
  setStatus("stopped", "down");
}

/** Says why the page stopped following, and stops it. */
function stop(text) {
  halt(text);
  throw Object.assign(new Error(text), { fatal: true });
}

/** A locked room is rendered here, from the same context endpoint agents use. */
async function loadLocked() {
  const res = await fetch(base + "/context?messages=200", { headers: auth });
  if (!res.ok) return;
  const context = await res.json();
  const meta = document.getElementById("room-meta");
  meta.replaceChildren("created " + context.room.created_at + " · locked · meta ",
    el("code", {}, JSON.stringify(context.room.meta)));
  for (const m of context.messages.items) onMessage(m);
  for (const a of context.agents) onAgent(a);
  for (const s of context.state) onState(s);
  after = context.messages.next_after;
}

(async () => {
  if (malformed && data.locked) {
    return halt("The #token= in the address is malformed: a token is printable characters without spaces. Open the room again with #token=<a view, agent or room token>.");
  }
  if (data.locked) await loadLocked();
  for (let delay = 500;; delay = Math.min(delay * 2, 10000)) {
    try {
      await follow();
      delay = 250;
    } catch (error) {
      console.warn(error);
      if (error.fatal) return;
    }
    setStatus("reconnecting…", "down");
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
})();
`;
