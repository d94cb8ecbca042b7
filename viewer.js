// @ts-check
/// <reference lib="dom" />
/**
 * The room viewer's script (served at `/viewer.js`, run as a module by the page
 * view.tsx makes): an overseer's console. It renders every row, the first ones from
 * the data the page carries and later ones from the room's event stream (`GET
 * /rooms/:id/stream`, the endpoint agents use, read with fetch so a token travels in
 * a header), and resumes with the last message id after a drop. A person filters the
 * log, follows a thread, sees the tasks, a key's history and the state as it was at
 * any message, and posts. Everything from the room goes in as text (`append` of
 * strings, `textContent`), which never parses markup.
 */

/**
 * @typedef {{ id: number, from_agent: string | null, to_agent: string | null,
 *   kind: string, body: unknown, created_at: string, reply_to: number | null,
 *   claimed_by: string | null, lease_expires_at: string | null, status: string,
 *   attempts: number, max_attempts: number | null, done_by: string | null }} Message
 * @typedef {{ id: string, name: string, role: string, status: string,
 *   last_seen: string, idle_ms: number }} Agent
 * @typedef {{ scope: string, key: string, value: unknown, version: number,
 *   expires_at: string | null, updated_by?: string | null,
 *   deleted?: boolean }} Entry
 * @typedef {{ version: number, value: unknown, deleted: boolean,
 *   updated_by: string | null, updated_at: string,
 *   after_message: number }} Version
 * @typedef {{ room: string, locked: boolean, after: number, agents: Agent[],
 *   messages: Message[], state: Entry[] }} PageData
 */

/** @param {string} id */
function byId(id) {
  const node = document.getElementById(id);
  if (!node) throw new Error(`the page has no #${id}`);
  return node;
}

/** @type {PageData} */
const data = JSON.parse(byId("room-data").textContent ?? "{}");
const base = "/rooms/" + encodeURIComponent(data.room);
// A locked room's token rides in the URL fragment, which browsers never send. It moves
// to this tab's session storage and out of the address (and history): reply links
// change the fragment, and a reload still has it.
const tokenKey = "sync-token:" + data.room;
const given = new URLSearchParams(location.hash.slice(1)).get("token");
// A token is printable ASCII: anything else could not even be sent as a header.
const malformed = given !== null && !/^[\x21-\x7e]+$/.test(given);
if (given !== null) {
  if (!malformed) sessionStorage.setItem(tokenKey, given);
  history.replaceState(null, "", location.pathname + location.search);
}
const token = sessionStorage.getItem(tokenKey);
/** @type {Record<string, string>} */
let auth = token ? { authorization: "Bearer " + token } : {};
/** The most messages the page keeps; older ones leave as new ones come. */
const MAX_SHOWN = 2000;
/** A body longer than this (characters or lines) is folded until opened. */
const FOLD_CHARS = 280;
const FOLD_LINES = 4;
let after = data.after;

// ---- small helpers ----

/**
 * An element with attributes and children (strings go in as text).
 * @param {string} tag
 * @param {Record<string, string>} attrs
 * @param {(Node | string)[]} children
 */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

/**
 * A button that runs `action`.
 * @param {string} text
 * @param {string} cls
 * @param {() => void} action
 */
function button(text, cls, action) {
  const node = el("button", { type: "button", class: cls }, text);
  node.addEventListener("click", action);
  return node;
}

/**
 * How a JSON value is shown: strings as they are, anything else as indented JSON.
 * @param {unknown} value
 */
const show = (value) =>
  typeof value === "string" ? value : JSON.stringify(value, null, 2);
/**
 * `hh:mm:ss` of an ISO time (UTC, like every time the API returns).
 * @param {string} iso
 */
const clock = (iso) => iso.slice(11, 19);

/**
 * "3s", "4m", "2h": how long ago, for presence.
 * @param {number} ms
 */
function ago(ms) {
  if (ms < 60000) return Math.floor(ms / 1000) + "s";
  if (ms < 3600000) return Math.floor(ms / 60000) + "m";
  return Math.floor(ms / 3600000) + "h";
}

/**
 * A value shown as text, folded to a few lines with a toggle when it is long.
 * @param {unknown} value
 */
function body(value) {
  const text = show(value);
  const pre = el("pre", { class: "body" }, text);
  if (text.length <= FOLD_CHARS && text.split("\n").length <= FOLD_LINES) {
    return pre;
  }
  pre.classList.add("folded");
  const toggle = button("more", "fold", () => {
    const folded = pre.classList.toggle("folded");
    toggle.textContent = folded ? "more" : "less";
  });
  return el("div", {}, pre, toggle);
}

/** @param {string} selector */
const all = (
  selector,
) => /** @type {HTMLElement[]} */ ([...document.querySelectorAll(selector)]);

/**
 * Says something about what a person asked for (a post, a history, a past state).
 * @param {string} id
 * @param {string} text
 */
function say(id, text) {
  byId(id).textContent = text;
}

/**
 * The text of an error answer, or why there was none.
 * @param {Response} res
 */
async function failure(res) {
  try {
    const error = await res.json();
    return `${res.status} ${error.error}: ${error.message}`;
  } catch {
    return `the service answered ${res.status}`;
  }
}

// ---- tasks ----

/**
 * A message's task status in a few words: who holds it and until when, done by whom,
 * dead, or open after attempts; nothing for a message never claimed. `lapsed`: as it
 * reads once the lease runs out.
 * @param {Message} m
 */
function taskText(m, lapsed = false) {
  const tries = m.max_attempts === null
    ? String(m.attempts)
    : m.attempts + "/" + m.max_attempts;
  if (m.status === "done") return "done by " + m.done_by;
  if (m.status === "dead") return "dead after " + tries + " attempts";
  if (m.status === "held" && !lapsed) {
    const until = m.lease_expires_at
      ? " until " + clock(m.lease_expires_at)
      : "";
    return "claimed by " + m.claimed_by + until + " · attempt " + tries;
  }
  if (m.max_attempts !== null && m.attempts >= m.max_attempts) {
    return "dead after " + tries + " attempts";
  }
  return m.attempts === 0 && m.max_attempts === null
    ? ""
    : "open · attempts " + tries;
}

/** @param {Message} m */
const taskSpan = (m) =>
  el("span", {
    class: "claim " + m.status,
    "data-until": m.lease_expires_at ?? "",
    "data-lapsed": taskText(m, true),
  }, taskText(m));

/** A task: a message of kind "task", or one that was ever claimed. */
/** @param {Message} m */
const isTask = (m) =>
  m.kind === "task" || m.attempts > 0 || m.max_attempts !== null;

/** @type {Map<number, Message>} */
const messages = new Map();

/** The tasks panel: how many are in each status, and the ones not done. */
function renderTasks() {
  const tasks = [...messages.values()].filter(isTask);
  /** @type {Record<string, number>} */
  const counts = { open: 0, held: 0, done: 0, dead: 0 };
  for (const m of tasks) counts[m.status] = (counts[m.status] ?? 0) + 1;
  byId("task-counts").replaceChildren(
    ...Object.entries(counts).flatMap(([status, n]) => [
      el("span", { class: "claim " + status }, `${status} ${n}`),
      " ",
    ]),
  );
  const shown = tasks.filter((m) => m.status !== "done").slice(-50);
  byId("tasks").replaceChildren(
    ...shown.map((m) =>
      el(
        "li",
        { "data-task": String(m.id) },
        el("a", { href: "#m-" + m.id, class: "mono" }, "#" + m.id),
        " ",
        el("span", { class: "claim " + m.status }, m.status),
        " ",
        el(
          "span",
          { class: "muted" },
          show(m.body).slice(0, 80),
        ),
      )
    ),
  );
}

// ---- messages ----

/**
 * @param {Message} m
 * @param {number} depth
 */
function messageItem(m, depth) {
  const head = el(
    "div",
    { class: "head" },
    el("span", { class: "muted mono" }, "#" + m.id),
    el("span", { class: "kind" }, m.kind),
    el("span", { class: "from" }, m.from_agent ?? "anonymous"),
    el("span", { class: "muted" }, "→"),
    el("span", { class: "to" }, m.to_agent ?? "everyone"),
  );
  if (m.reply_to !== null) {
    head.append(
      el("a", { class: "muted", href: "#m-" + m.reply_to }, "↳ #" + m.reply_to),
    );
  }
  head.append(
    taskSpan(m),
    el(
      "time",
      { class: "muted", datetime: m.created_at, title: m.created_at },
      clock(m.created_at),
    ),
    el(
      "span",
      { class: "actions" },
      button("thread", "link", () => showThread(m.id)),
      button("state then", "link", () => stateAt(m.id)),
    ),
  );
  const item = el(
    "li",
    {
      id: "m-" + m.id,
      class: m.reply_to === null ? "" : "reply",
      "data-depth": String(depth),
      "data-kind": m.kind,
      "data-from": m.from_agent ?? "",
      "data-to": m.to_agent ?? "",
    },
    head,
    body(m.body),
  );
  item.style.setProperty("--depth", String(Math.min(depth, 6)));
  return item;
}

/** The id of the thread a message belongs to (its first ancestor on the page). */
/** @param {number} id */
function rootOf(id) {
  for (let at = messages.get(id); at;) {
    if (at.reply_to === null || !messages.has(at.reply_to)) return at.id;
    at = messages.get(at.reply_to);
  }
  return id;
}

/** What the filter bar asks for; a thread set by a message's "thread" button. */
const filter = { kind: "", agent: "", status: "", thread: 0 };

/** @param {HTMLElement} item */
function matches(item) {
  const m = messages.get(Number(item.id.slice(2)));
  if (!m) return true;
  if (filter.kind && m.kind !== filter.kind) return false;
  if (
    filter.agent && m.from_agent !== filter.agent &&
    m.to_agent !== filter.agent
  ) return false;
  if (filter.status && (!isTask(m) || m.status !== filter.status)) {
    return false;
  }
  if (filter.thread && rootOf(m.id) !== filter.thread) return false;
  return true;
}

function applyFilter() {
  for (const item of all("#messages > li")) item.hidden = !matches(item);
  const threadNote = byId("thread-note");
  threadNote.hidden = filter.thread === 0;
  byId("thread-id").textContent = "#" + filter.thread;
}

/** @param {number} id */
function showThread(id) {
  filter.thread = rootOf(id);
  applyFilter();
  byId("m-" + filter.thread).scrollIntoView({ block: "start" });
}

/**
 * Adds a kind or an agent to its filter's choices, once.
 * @param {string} selectId
 * @param {string | null} value
 */
function offer(selectId, value) {
  if (!value) return;
  const select = /** @type {HTMLSelectElement} */ (byId(selectId));
  if ([...select.options].some((o) => o.value === value)) return;
  const option = el("option", { value }, value);
  const next = [...select.options].slice(1).find((o) => o.value > value);
  select.insertBefore(option, next ?? null);
}

let unseen = 0;
const nearBottom = () =>
  innerHeight + scrollY >= document.body.scrollHeight - 60;

function showUnseen() {
  const pill = byId("new-messages");
  pill.hidden = unseen === 0;
  pill.textContent = `↓ ${unseen} new message${unseen === 1 ? "" : "s"}`;
}

/**
 * Places a message: a reply right under its parent's thread, anything else last.
 * @param {Message} m
 */
function place(m) {
  const list = byId("messages");
  const parent = m.reply_to === null
    ? null
    : document.getElementById("m-" + m.reply_to);
  if (!parent) return list.append(messageItem(m, 0));
  const depth = Number(parent.dataset.depth ?? 0) + 1;
  let next = /** @type {HTMLElement | null} */ (parent.nextElementSibling);
  while (next && Number(next.dataset.depth ?? 0) >= depth) {
    next = /** @type {HTMLElement | null} */ (next.nextElementSibling);
  }
  list.insertBefore(messageItem(m, depth), next);
}

/** @param {Message} m */
function onMessage(m, quiet = false) {
  fresh.claims.add(m.id);
  if (m.id <= after) return;
  after = m.id;
  const follow = nearBottom();
  messages.set(m.id, m);
  place(m);
  offer("f-kind", m.kind);
  offer("f-agent", m.from_agent);
  offer("f-agent", m.to_agent);
  const item = byId("m-" + m.id);
  item.hidden = !matches(item);
  const list = byId("messages");
  while (list.children.length > MAX_SHOWN) {
    const first = /** @type {HTMLElement} */ (list.firstElementChild);
    messages.delete(Number(first.id.slice(2)));
    first.remove();
  }
  if (isTask(m)) renderTasks();
  if (quiet) return;
  if (follow) scrollTo(0, document.body.scrollHeight);
  else if (!item.hidden) unseen++, showUnseen();
}

/** @param {Message} m */
function onClaim(m) {
  fresh.claims.add(m.id);
  if (messages.has(m.id)) messages.set(m.id, m);
  document.getElementById("m-" + m.id)?.querySelector(".claim")?.replaceWith(
    taskSpan(m),
  );
  renderTasks();
}

// ---- agents ----

/** @param {Agent} a */
const agentRow = (a) =>
  el(
    "tr",
    { id: "a-" + a.id },
    el("td", { class: "mono" }, a.id),
    el("td", {}, a.name),
    el("td", {}, a.role),
    el("td", {}, el("span", { class: "status " + a.status }, a.status)),
    el(
      "td",
      { class: "muted seen", "data-seen": a.last_seen, title: a.last_seen },
      ago(a.idle_ms),
    ),
  );

/** @param {Agent} a */
function onAgent(a) {
  const row = agentRow(a);
  const old = document.getElementById("a-" + a.id);
  if (old) old.replaceWith(row);
  else byId("agents").append(row);
  offer("f-agent", a.id);
}

// ---- state ----

/** The state as it is now, by `scope\nkey`. */
/** @type {Map<string, Entry>} */
const live = new Map();
/** The message the state table shows the room at (0: now). */
let pastAt = 0;

/** @param {Entry} s */
function stateRow(s) {
  const version = el("td", {
    class: "mono",
    title: s.expires_at ? "expires " + s.expires_at : "",
  }, "v" + s.version);
  if (s.expires_at) version.append(" ttl");
  return el(
    "tr",
    { "data-key": s.scope + "\n" + s.key, "data-expires": s.expires_at ?? "" },
    el("td", { class: "mono" }, s.scope),
    el(
      "td",
      { class: "mono" },
      button(s.key, "link key", () => openHistory(s.scope, s.key, s.version)),
    ),
    el("td", {}, body(s.value)),
    version,
  );
}

/**
 * Shows `entries` in the state table, sorted as the API sorts them.
 * @param {Iterable<Entry>} entries
 */
function renderState(entries) {
  const sorted = [...entries].sort((a, b) =>
    (a.scope + "\n" + a.key) < (b.scope + "\n" + b.key) ? -1 : 1
  );
  byId("state").replaceChildren(...sorted.map(stateRow));
}

/** @param {Entry} s */
function onState(s) {
  const id = s.scope + "\n" + s.key;
  fresh.state.add(id);
  if (s.deleted) live.delete(id);
  else live.set(id, s);
  if (pastAt === 0) renderState(live.values());
}

/**
 * Shows the state right after message `id` was posted.
 * @param {number} id
 */
async function stateAt(id) {
  const res = await fetch(base + "/state?at=" + id, { headers: auth });
  if (!res.ok) return say("state-note", await failure(res));
  pastAt = id;
  renderState(await res.json());
  byId("state-mode").hidden = false;
  byId("state-at").textContent = "#" + id;
  showPanel("state");
  byId("p-state").scrollIntoView({ block: "start" });
}

function backToLive() {
  pastAt = 0;
  byId("state-mode").hidden = true;
  renderState(live.values());
}

/** The most versions a key's history shows: the newest ones. */
const HISTORY_SHOWN = 200;

/**
 * Opens the history of a key: its newest versions, who wrote each, when, after which
 * message.
 * @param {string} scope
 * @param {string} key
 * @param {number} version the entry's version as the table shows it
 */
async function openHistory(scope, key, version) {
  const from = Math.max(0, version - HISTORY_SHOWN);
  const query = new URLSearchParams({
    scope,
    key,
    after_version: String(from),
    limit: "1000",
  });
  const res = await fetch(base + "/state/history?" + query, { headers: auth });
  if (!res.ok) return say("state-note", await failure(res));
  /** @type {Version[]} */
  const versions = await res.json();
  byId("history-key").textContent = `${scope} / ${key}`;
  byId("history-note").textContent = from > 0
    ? `the newest ${HISTORY_SHOWN} versions`
    : "";
  byId("history").replaceChildren(
    ...versions.map((v) =>
      el(
        "tr",
        {},
        el("td", { class: "mono" }, "v" + v.version),
        el(
          "td",
          {},
          v.deleted
            ? el(
              "span",
              { class: "muted" },
              v.updated_by === null ? "expired" : "deleted",
            )
            : body(v.value),
        ),
        el("td", {}, v.updated_by ?? "—"),
        el("td", { class: "muted", title: v.updated_at }, clock(v.updated_at)),
        el(
          "td",
          { class: "mono" },
          v.after_message
            ? el("a", { href: "#m-" + v.after_message }, "#" + v.after_message)
            : "—",
        ),
      )
    ),
  );
  byId("history-panel").hidden = false;
  byId("history-panel").scrollIntoView({ block: "nearest" });
}

// ---- posting as a person ----

const nameKey = "sync-person";

/** @param {SubmitEvent} event */
async function post(event) {
  event.preventDefault();
  const form = /** @type {HTMLFormElement} */ (event.target);
  const fields = new FormData(form);
  const name = String(fields.get("name") ?? "").trim() || "person";
  const text = String(fields.get("body") ?? "");
  if (text.trim() === "") return say("compose-note", "Write something first.");
  localStorage.setItem(nameKey, name);
  const to = String(fields.get("to") ?? "").trim();
  const kind = String(fields.get("kind") ?? "").trim();
  const res = await fetch(base + "/messages", {
    method: "POST",
    headers: { "content-type": "application/json", ...auth },
    body: JSON.stringify({
      // An id says it came from a person; ids allow letters, digits and . _ : @ -.
      from: "person:" + name.replace(/[^A-Za-z0-9._@-]/g, "-").slice(0, 100),
      ...(to ? { to } : {}),
      ...(kind ? { kind } : {}),
      body: text,
    }),
  });
  if (!res.ok) return say("compose-note", await failure(res));
  /** @type {HTMLTextAreaElement} */ (form.elements.namedItem("body")).value =
    "";
  say("compose-note", "Posted #" + (await res.json()).id + ".");
}

// ---- panels (a phone shows one at a time) ----

/** @param {string} name */
function showPanel(name) {
  document.body.dataset.panel = name;
  for (const tab of all("nav.tabs button")) {
    tab.classList.toggle("on", tab.dataset.panel === name);
  }
}

// ---- following the room ----

// What this connection's snapshot has said; on "ready", rows it did not mention are
// gone (deleted or released while the page was disconnected).
let fresh = { state: new Set(), claims: new Set() };

// Presence ages tick, and TTLs and leases run out, locally: the server sends no event
// when time alone changes something.
function tickClock() {
  const now = Date.now();
  for (const cell of all(".seen")) {
    cell.textContent = ago(now - Date.parse(cell.dataset.seen ?? ""));
  }
  let expired = false;
  for (const [id, s] of live) {
    if (s.expires_at && Date.parse(s.expires_at) <= now) {
      live.delete(id);
      expired = true;
    }
  }
  if (expired && pastAt === 0) renderState(live.values());
  for (const claim of all(".claim[data-until]")) {
    if (claim.dataset.until && Date.parse(claim.dataset.until) <= now) {
      claim.textContent = claim.dataset.lapsed ?? "";
      claim.dataset.until = "";
    }
  }
}

/**
 * @param {string} text
 * @param {string} cls
 */
function setStatus(text, cls) {
  const node = byId("status");
  node.textContent = text;
  node.className = cls;
}

function onReady() {
  for (const id of [...live.keys()]) {
    if (!fresh.state.has(id)) live.delete(id);
  }
  if (pastAt === 0) renderState(live.values());
  for (const item of all("#messages li")) {
    if (!fresh.claims.has(Number(item.id.slice(2)))) {
      const claim = /** @type {HTMLElement | null} */ (item.querySelector(
        ".claim",
      ));
      if (claim) claim.textContent = claim.dataset.lapsed ?? "";
    }
  }
}

/** @type {Record<string, (value: any) => void>} */
const handlers = {
  message: (m) => onMessage(m),
  claim: onClaim,
  agent: onAgent,
  state: onState,
  ready: onReady,
};

/** Follows the stream until it ends; throws when it cannot, `fatal` to give up. */
async function follow() {
  const res = await fetch(base + "/stream?after=" + after, {
    headers: { accept: "text/event-stream", ...auth },
  });
  if ((res.status === 401 || res.status === 403) && auth.authorization) {
    // A mistyped, rotated or stale token: forget it. An open room needs none.
    sessionStorage.removeItem(tokenKey);
    auth = {};
    if (!data.locked) return;
    return stop(
      "This room is locked and its token was refused: open it again with #token=<a current view, agent or room token>.",
    );
  }
  if (res.status === 401 || res.status === 403) {
    return stop(
      "This room is locked: add #token=<a view, agent or room token> to the address.",
    );
  }
  if (res.status === 404) return stop("This room was deleted.");
  if (!res.ok || !res.body) throw new Error("stream answered " + res.status);
  fresh = { state: new Set(), claims: new Set() };
  setStatus("live", "live");
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", payload = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) payload += line.slice(5).trimStart();
      }
      if (payload && handlers[event]) handlers[event](JSON.parse(payload));
    }
  }
}

/**
 * Says why the page does not follow the room.
 * @param {string} text
 */
function halt(text) {
  byId("room-meta").textContent = text;
  setStatus("stopped", "down");
}

/**
 * Says why the page stopped following, and stops it.
 * @param {string} text
 * @returns {never}
 */
function stop(text) {
  halt(text);
  throw Object.assign(new Error(text), { fatal: true });
}

/** A locked room is rendered here, from the same context endpoint agents use. */
async function loadLocked() {
  const res = await fetch(base + "/context?messages=200", { headers: auth });
  if (!res.ok) return;
  const context = await res.json();
  byId("room-meta").replaceChildren(
    "created " + context.room.created_at + " · locked · meta ",
    el("code", {}, JSON.stringify(context.room.meta)),
  );
  for (const m of context.messages.items) onMessage(m, true);
  for (const a of context.agents) onAgent(a);
  for (const s of context.state) onState(s);
  after = context.messages.next_after;
  scrollTo(0, document.body.scrollHeight);
}

// ---- wiring ----

for (const id of ["f-kind", "f-agent", "f-status"]) {
  byId(id).addEventListener("change", (event) => {
    const select = /** @type {HTMLSelectElement} */ (event.target);
    const key = /** @type {"kind" | "agent" | "status"} */ (id.slice(2));
    filter[key] = select.value;
    applyFilter();
  });
}
byId("thread-clear").addEventListener("click", () => {
  filter.thread = 0;
  applyFilter();
});
byId("state-live").addEventListener("click", backToLive);
byId("history-close").addEventListener("click", () => {
  byId("history-panel").hidden = true;
});
byId("new-messages").addEventListener("click", () => {
  scrollTo(0, document.body.scrollHeight);
});
addEventListener("scroll", () => {
  if (unseen > 0 && nearBottom()) unseen = 0, showUnseen();
});
for (const tab of all("nav.tabs button")) {
  tab.addEventListener("click", () => showPanel(tab.dataset.panel ?? ""));
}
const compose = /** @type {HTMLFormElement} */ (byId("compose"));
compose.addEventListener("submit", post);
/** @type {HTMLInputElement} */ (compose.elements.namedItem("name")).value =
  localStorage.getItem(nameKey) ?? "";
showPanel("messages");

// The rows the page came with, then the room as it goes on.
after = 0;
for (const m of data.messages) onMessage(m, true);
after = Math.max(after, data.after);
for (const a of data.agents) onAgent(a);
for (const s of data.state) onState(s);
renderTasks();
scrollTo(0, document.body.scrollHeight);
setInterval(tickClock, 1000);

(async () => {
  if (malformed && data.locked) {
    return halt(
      "The #token= in the address is malformed: a token is printable characters without spaces. Open the room again with #token=<a view, agent or room token>.",
    );
  }
  if (data.locked) await loadLocked();
  for (let delay = 500;; delay = Math.min(delay * 2, 10000)) {
    try {
      await follow();
      delay = 250;
    } catch (error) {
      console.warn(error);
      if (/** @type {{ fatal?: boolean }} */ (error).fatal) return;
    }
    setStatus("reconnecting…", "down");
    await new Promise((resolve) => setTimeout(resolve, delay));
  }
})();
