/**
 * The pages people see: a landing page and the live room viewer's frame. Every value
 * from the database goes through JSX interpolation, which escapes it, or into the
 * page's JSON data (with `<` escaped), which its module (viewer.js) renders as text.
 */
import type { Child } from "hono/jsx";
import { raw } from "hono/html";
import type { Agent, Message, Room, StateEntry } from "./db.ts";

const STYLE = `
:root { color-scheme: light dark; --line: #8884; --muted: #888; --accent: #2a7ae2; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1400px; padding: 1rem; }
h1 { font-size: 1.3rem; margin: 0 0 .25rem; } h2 { font-size: 1rem; margin: 1rem 0 .5rem; }
code, pre, .mono { font-family: ui-monospace, monospace; font-size: 12.5px; }
pre { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.muted { color: var(--muted); }
a { color: var(--accent); }
.grid { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 1.5rem; }
nav.tabs { display: none; }
@media (max-width: 800px) {
  body { padding: .5rem; }
  .grid { grid-template-columns: minmax(0, 1fr); gap: 0; }
  nav.tabs { display: flex; gap: .25rem; position: sticky; top: 0; z-index: 2; padding: .4rem 0;
    background: Canvas; border-bottom: 1px solid var(--line); }
  nav.tabs button { flex: 1; padding: .45rem 0; border: 1px solid var(--line); border-radius: 6px;
    background: none; color: inherit; font: inherit; }
  nav.tabs button.on { background: var(--accent); color: white; border-color: var(--accent); }
  body[data-panel="messages"] .panel:not(#p-messages),
  body[data-panel="tasks"] .panel:not(#p-tasks),
  body[data-panel="agents"] .panel:not(#p-agents),
  body[data-panel="state"] .panel:not(#p-state) { display: none; }
}
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .25rem .4rem; border-bottom: 1px solid var(--line); vertical-align: top; overflow-wrap: break-word; }
th, td.mono, td:has(> .status) { white-space: nowrap; }
.scroll { overflow-x: auto; }
ol.messages { list-style: none; margin: 0; padding: 0; }
ol.messages li { border-bottom: 1px solid var(--line); padding: .4rem 0; }
li.reply { margin-left: calc(var(--depth, 1) * 1.25rem); border-left: 2px solid var(--line); padding-left: .5rem !important; }
.head { display: flex; gap: .5rem; flex-wrap: wrap; align-items: baseline; }
.kind { background: #8882; border-radius: 3px; padding: 0 .35rem; }
.from { font-weight: 600; }
.actions { margin-left: auto; display: flex; gap: .6rem; font-size: 12px; }
button.link { background: none; border: none; padding: 0; color: var(--accent); cursor: pointer; font: inherit; }
button.key { font-family: ui-monospace, monospace; font-size: 12.5px; }
pre.folded { max-height: 5.8em; overflow: hidden; }
button.fold { background: none; border: none; padding: 0; color: var(--accent); cursor: pointer; font-size: 12px; }
#status { float: right; }
#status.live { color: #2a2; } #status.down { color: #c33; }
.claim { color: #b60; }
.claim.done { color: #080; }
.claim.dead { color: #b00; }
.claim.open { color: #2a7ae2; }
.status.waiting { color: #2a7ae2; } .status.busy { color: #b60; } .status.done { color: var(--muted); }
.filters { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; margin-bottom: .5rem; }
.filters select, .compose input, .compose textarea, .compose button { font: inherit; }
.note { background: #8881; border-radius: 4px; padding: .3rem .5rem; margin: .3rem 0; }
.compose { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: .4rem; margin-top: .8rem; }
.compose input, .compose textarea { min-width: 0; width: 100%; }
.compose textarea { grid-column: 1 / -1; min-height: 4rem; }
.filters select { max-width: 100%; }
h1, #room-meta { overflow-wrap: anywhere; }
.compose .row { grid-column: 1 / -1; display: flex; gap: .5rem; align-items: center; }
#new-messages { position: fixed; right: 1rem; bottom: 1rem; z-index: 3; padding: .4rem .8rem;
  border-radius: 999px; border: none; background: var(--accent); color: white; font: inherit; cursor: pointer; }
ul.tasks { list-style: none; margin: 0; padding: 0; }
ul.tasks li { padding: .2rem 0; border-bottom: 1px solid var(--line); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
ul.rooms { padding-left: 1.2rem; }
.docs pre { background: #8881; padding: .5rem; border-radius: 4px; overflow-x: auto; white-space: pre; }
.docs table { margin: .5rem 0; }
.docs td, .docs th { white-space: normal; }
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
/**
 * The usage docs as HTML: markdown rendered by `marked`, loaded when a browser first
 * asks (agents never need it). Raw HTML in the markdown is shown as text, not markup:
 * the docs name the request's host.
 */
export async function docsHtml(markdown: string): Promise<string> {
  const { Marked } = await import("marked");
  const escape = (text: string) =>
    text.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(
      ">",
      "&gt;",
    );
  const marked = new Marked({
    renderer: { html: ({ text }: { text: string }) => escape(text) },
  });
  return await marked.parse(markdown);
}

/** The page a browser gets at `/`: the open rooms, a room box, and the docs. */
export function Landing(
  props: { docs: string; rooms: Room[]; more: boolean; nonce: string },
) {
  return (
    <Layout title="sync" nonce={props.nonce}>
      <h1>sync</h1>
      <p>A coordination service for AI agents. Open a room to watch it live:</p>
      <form method="get" action="/">
        <input name="room" placeholder="room id" required />{" "}
        <button type="submit">Open</button>
      </form>
      <h2>Open rooms</h2>
      {props.rooms.length === 0
        ? (
          <p class="muted" id="rooms">
            None yet: agents make them with POST /rooms.
          </p>
        )
        : (
          <ul class="rooms" id="rooms">
            {props.rooms.map((room) => (
              <li>
                <a class="mono" href={`/?room=${encodeURIComponent(room.id)}`}>
                  {room.id}
                </a>{" "}
                <span class="muted">
                  {room.created_at.slice(0, 16).replace("T", " ")} ·{" "}
                  {JSON.stringify(room.meta).slice(0, 120)}
                </span>
              </li>
            ))}
          </ul>
        )}
      {props.more
        ? (
          <p class="muted">
            More: <code>GET /rooms?after=&lt;the last id&gt;</code>
          </p>
        )
        : ""}
      <h2>Usage</h2>
      <div class="docs" id="docs">{raw(props.docs)}</div>
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

/**
 * The live viewer: the page's frame, and the room as it is now as data for its module
 * (viewer.js), which renders it and keeps it current from the room's event stream.
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
  // The rows go to the page's module (viewer.js), which renders them as it renders
  // every later one: one renderer.
  const data = JSON.stringify({
    room: room.id,
    locked: room.locked,
    after: messages.items.at(-1)?.id ?? 0,
    agents,
    messages: messages.items,
    state,
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
      <nav class="tabs">
        <button type="button" data-panel="messages">Messages</button>
        <button type="button" data-panel="tasks">Tasks</button>
        <button type="button" data-panel="agents">Agents</button>
        <button type="button" data-panel="state">State</button>
      </nav>
      <div class="grid">
        <section class="panel" id="p-messages">
          <h2>
            Messages{" "}
            <span class="muted" id="message-count">
              {messages.total > messages.items.length
                ? `(last ${messages.items.length} of ${messages.total})`
                : ""}
            </span>
          </h2>
          <div class="filters">
            <select id="f-kind" aria-label="kind">
              <option value="">every kind</option>
            </select>
            <select id="f-agent" aria-label="agent">
              <option value="">every agent</option>
            </select>
            <select id="f-status" aria-label="task status">
              <option value="">any status</option>
              <option value="open">open tasks</option>
              <option value="held">held tasks</option>
              <option value="done">done tasks</option>
              <option value="dead">dead tasks</option>
            </select>
            <span id="thread-note" class="note" hidden>
              thread <span id="thread-id" class="mono"></span>{" "}
              <button type="button" class="link" id="thread-clear">
                show all
              </button>
            </span>
          </div>
          <ol class="messages" id="messages"></ol>
          <form id="compose" class="compose">
            <input name="name" placeholder="your name" maxlength={64} />
            <input name="kind" placeholder="kind (message)" maxlength={128} />
            <input name="to" placeholder="to (everyone)" maxlength={128} />
            <textarea name="body" placeholder="Post to the room as a person">
            </textarea>
            <div class="row">
              <button type="submit">Post</button>
              <span id="compose-note" class="muted">
                {room.locked
                  ? "Posting needs a room or agent token in the address."
                  : ""}
              </span>
            </div>
          </form>
          <button type="button" id="new-messages" hidden></button>
        </section>
        <aside>
          <section class="panel" id="p-tasks">
            <h2>Tasks</h2>
            <div id="task-counts"></div>
            <ul class="tasks" id="tasks"></ul>
          </section>
          <section class="panel" id="p-agents">
            <h2>Agents</h2>
            <div class="scroll">
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
                <tbody id="agents"></tbody>
              </table>
            </div>
          </section>
          <section class="panel" id="p-state">
            <h2>State</h2>
            <div id="state-mode" class="note" hidden>
              as it was right after message{" "}
              <span id="state-at" class="mono">
              </span>{" "}
              <button type="button" class="link" id="state-live">
                back to live
              </button>
            </div>
            <div id="state-note" class="muted"></div>
            <div class="scroll">
              <table>
                <thead>
                  <tr>
                    <th>scope</th>
                    <th>key</th>
                    <th>value</th>
                    <th>version</th>
                  </tr>
                </thead>
                <tbody id="state"></tbody>
              </table>
            </div>
            <div id="history-panel" hidden>
              <h2>
                History of <span id="history-key" class="mono"></span>{" "}
                <button type="button" class="link" id="history-close">
                  close
                </button>
              </h2>
              <div id="history-note" class="muted"></div>
              <div class="scroll">
                <table>
                  <thead>
                    <tr>
                      <th>version</th>
                      <th>value</th>
                      <th>by</th>
                      <th>at</th>
                      <th>after</th>
                    </tr>
                  </thead>
                  <tbody id="history"></tbody>
                </table>
              </div>
            </div>
          </section>
        </aside>
      </div>
      <script id="room-data" type="application/json">{raw(data)}</script>
      <script type="module" src="/viewer.js" nonce={nonce}></script>
    </Layout>
  );
}
