/**
 * In-process tests of identity, access and limits (SPEC §4): tokens, who a request acts
 * as, open and locked rooms, room deletion, the rate limit, CORS and the viewer's
 * headers. Every test runs on a fresh database through `app.request()`.
 */
import { createHash } from "node:crypto";
import assert from "node:assert/strict";
import { Db } from "./driver.ts";
import { notifierOf } from "./waiting.ts";
import { createApp } from "./main.ts";
import { caller, freshDb } from "./testing.ts";
import type { RateLimit } from "./limits.ts";

const ADMIN = "admin-secret";

type App = ReturnType<typeof createApp>;
type Body = Record<string, unknown>;
type Reply = { status: number; body: Body; text: string; headers: Headers };
type Options = {
  body?: unknown;
  /** Sent as `Authorization: Bearer <token>`. */
  token?: string;
  /** The whole Authorization header, as is. */
  auth?: string;
  headers?: Record<string, string>;
  env?: unknown;
};
type Call = (
  method: string,
  path: string,
  options?: Options,
) => Promise<Reply>;
type Api = { app: App; db: Db; call: Call; texts: string[] };

/** The request headers of a call: always JSON, plus the Authorization header asked for. */
function headersOf(options: Options): Record<string, string> {
  const headers: Record<string, string> = {
    "content-type": "application/json",
    ...options.headers,
  };
  if (options.token !== undefined) {
    headers.authorization = `Bearer ${options.token}`;
  }
  if (options.auth !== undefined) headers.authorization = options.auth;
  return headers;
}

/** Calls the app and records every response text in `texts`. */
function callerOf(app: App, texts: string[]): Call {
  const call = caller(app);
  return async (method, path, options = {}) => {
    const reply = await call(
      method,
      path,
      options.body === undefined ? undefined : JSON.stringify(options.body),
      headersOf(options),
      options.env,
    );
    texts.push(reply.text);
    const json = typeof reply.body !== "string";
    return { ...reply, body: json ? reply.body as Body : {} };
  };
}

/** A test with its own app (rate limit off, admin token set) on a fresh database. */
function test(
  name: string,
  fn: (api: Api) => Promise<void>,
  options: { rateLimit?: RateLimit | null } = {},
) {
  Deno.test(name, async () => {
    const { db, close } = await freshDb();
    const app = createApp({
      db,
      rateLimit: options.rateLimit ?? null,
      adminToken: ADMIN,
    });
    const texts: string[] = [];
    try {
      await fn({ app, db, call: callerOf(app, texts), texts });
    } finally {
      await close();
    }
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Waits until no stream or long-poll holds a subscription, so no timer outlives a test. */
async function settled(db: Db): Promise<void> {
  for (let i = 0; i < 100 && notifierOf(db).size > 0; i++) await sleep(10);
  assert.equal(notifierOf(db).size, 0, "every subscription was let go");
}

/** Asserts a status, showing the body when it differs. */
function expect(reply: Reply, status: number): Body {
  assert.equal(reply.status, status, `${status} expected, got ${reply.text}`);
  return reply.body;
}

/** Asserts an error answer: its status, its code, and a message. */
function expectError(reply: Reply, status: number, code: string): Body {
  assert.equal(
    reply.status,
    status,
    `${status} ${code} expected: ${reply.text}`,
  );
  assert.equal(reply.body.error, code);
  assert.equal(typeof reply.body.message, "string");
  return reply.body;
}

const TOKEN = {
  room: /^room_[A-Za-z0-9_-]{43}$/,
  view: /^view_[A-Za-z0-9_-]{43}$/,
  as: /^as_[A-Za-z0-9_-]{43}$/,
};

/** The hex SHA-256 of a text, computed here (with node:crypto) rather than with auth.ts. */
function sha256Hex(text: string): string {
  return createHash("sha256").update(text).digest("hex");
}

/** Creates a room and returns its two tokens. */
async function createRoom(
  call: Call,
  id: string,
  extra: Body = {},
): Promise<{ room: string; view: string }> {
  const body = expect(
    await call("POST", "/rooms", { body: { id, ...extra } }),
    201,
  );
  return { room: body.token as string, view: body.view_token as string };
}

/** Registers an agent and returns its token. */
async function join(
  call: Call,
  room: string,
  body: Body,
  token?: string,
): Promise<string> {
  const reply = await call("POST", `/rooms/${room}/agents`, { body, token });
  return expect(reply, 201).token as string;
}

/** PUT state in `room` sending `token`; asserts 200. */
async function putAs(call: Call, room: string, body: Body, token: string) {
  return expect(
    await call("PUT", `/rooms/${room}/state`, { body, token }),
    200,
  );
}

/** Re-registers agent "a" of room "r" as `name` with `rotate_token`, sending `token`. */
async function rotate(call: Call, token: string, name = "A"): Promise<Body> {
  const body = { id: "a", name, rotate_token: true };
  return expect(await call("POST", "/rooms/r/agents", { body, token }), 200);
}

/** The status of agent `id` of room "r", as GET agents shows it. */
async function statusOf(call: Call, id: string): Promise<unknown> {
  const agents = (await call("GET", "/rooms/r/agents"))
    .body as unknown as Body[];
  return agents.find((agent) => agent.id === id)?.status;
}

/**
 * Starts a long-poll of `path` with agent `id`'s token and waits until that agent shows
 * as waiting; answers the pending poll.
 */
async function waitingPoll(
  { app, call }: Api,
  path: string,
  id: string,
  token: string,
): Promise<{ poll: Response | Promise<Response> }> {
  const poll = app.request(path, { headers: headersOf({ token }) });
  let seen: unknown;
  for (let i = 0; i < 100 && seen !== "waiting"; i++) {
    await sleep(10);
    seen = await statusOf(call, id);
  }
  assert.equal(seen, "waiting", `${id} shows as waiting during the wait`);
  return { poll };
}

/** Reads the stream of `room` as `token` up to its `ready` event, then lets it go. */
async function streamToReady(
  app: App,
  db: Db,
  room: string,
  token: string,
): Promise<string> {
  const res = await app.request(`/rooms/${room}/stream`, {
    headers: headersOf({ token }),
  });
  assert.equal(res.status, 200);
  const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
  let streamed = "";
  while (!streamed.includes("event: ready")) {
    const { value, done } = await reader.read();
    if (done) break;
    streamed += value;
  }
  await reader.cancel();
  await settled(db);
  return streamed;
}

// ---- the authorization matrix ----

const CALLERS = [
  "anonymous",
  "view",
  "agent",
  "room",
  "other_room",
  "admin",
  "garbage",
  "malformed",
] as const;
type CallerName = typeof CALLERS[number];

/**
 * Room "r" (open or locked) with agents "a" and "b", one message and the `_shared` key
 * "k"; room "other" gives a token of another room. Returns the Authorization header
 * of each caller (the agent is "a") and the message id.
 */
async function matrixFixture(call: Call, locked: boolean) {
  const other = await createRoom(call, "other");
  const r = await createRoom(call, "r", { locked, meta: { m: 1 } });
  const a = await join(call, "r", { id: "a", name: "A" }, r.room);
  await join(call, "r", { id: "b", name: "B" }, r.room);
  const message = expect(
    await call("POST", "/rooms/r/messages", { body: { body: "hi" }, token: a }),
    201,
  );
  await putAs(call, "r", { key: "k", value: 1 }, a);
  const auth: Record<CallerName, string | undefined> = {
    anonymous: undefined,
    view: `Bearer ${r.view}`,
    agent: `Bearer ${a}`,
    room: `Bearer ${r.room}`,
    other_room: `Bearer ${other.room}`,
    admin: `Bearer ${ADMIN}`,
    garbage: "Bearer nope",
    malformed: "Basic x",
  };
  return { auth, mid: message.id as number };
}

type Row = {
  name: string;
  method: string;
  path: (mid: number) => string;
  body?: unknown;
  /** One outcome per caller, in the order of CALLERS: "200" or "403 read_only". */
  open: string[];
  locked: string[];
};

// Columns: anonymous, view, agent "a", room, other room's token, admin, "nope", "Basic x".
// deno-fmt-ignore
const READ_OPEN = ["200", "200", "200", "200", "401 invalid_token", "200", "401 invalid_token", "401 invalid_token"];
// deno-fmt-ignore
const READ_LOCKED = ["401 token_required", "200", "200", "200", "401 invalid_token", "200", "401 invalid_token", "401 invalid_token"];

// Open or locked, only the room and admin tokens may (deleting the room).
// deno-fmt-ignore
const ROOM_OR_ADMIN = ["401 token_required", "403 forbidden", "403 forbidden", "200", "401 invalid_token", "200", "401 invalid_token", "401 invalid_token"];

/**
 * A write in an open room: refused to the view token (read-only), `ok` for anonymous,
 * the room and admin tokens, and `agent` (by default `ok` too) for the agent's token.
 */
// deno-fmt-ignore
function writeOpen(ok: string, agent = ok): string[] {
  return [ok, "403 read_only", agent, ok, "401 invalid_token", ok, "401 invalid_token", "401 invalid_token"];
}

/** The same write in a locked room, where a caller without a token is refused first. */
function writeLocked(ok: string, agent = ok): string[] {
  return ["401 token_required", ...writeOpen(ok, agent).slice(1)];
}

/** The expected outcome of every endpoint for every caller; test names spell out each cell. */
// deno-fmt-ignore
const MATRIX: Row[] = [
  { name: "GET /rooms/:id", method: "GET", path: () => "/rooms/r", open: READ_OPEN, locked: READ_LOCKED },
  { name: "GET agents", method: "GET", path: () => "/rooms/r/agents", open: READ_OPEN, locked: READ_LOCKED },
  { name: "GET messages", method: "GET", path: () => "/rooms/r/messages", open: READ_OPEN, locked: READ_LOCKED },
  { name: "GET messages?wait=0.05", method: "GET", path: (mid) => `/rooms/r/messages?after=${mid}&wait=0.05`, open: READ_OPEN, locked: READ_LOCKED },
  { name: "GET state", method: "GET", path: () => "/rooms/r/state", open: READ_OPEN, locked: READ_LOCKED },
  { name: "GET state?key=k", method: "GET", path: () => "/rooms/r/state?key=k", open: READ_OPEN, locked: READ_LOCKED },
  { name: "GET context", method: "GET", path: () => "/rooms/r/context", open: READ_OPEN, locked: READ_LOCKED },
  { name: "GET stream", method: "GET", path: () => "/rooms/r/stream", open: READ_OPEN, locked: READ_LOCKED },
  { name: "POST messages without from", method: "POST", path: () => "/rooms/r/messages", body: { body: "x" }, open: writeOpen("201"), locked: writeLocked("201") },
  { name: "POST messages with from = another agent", method: "POST", path: () => "/rooms/r/messages", body: { from: "b", body: "x" }, open: writeOpen("201", "403 identity_mismatch"), locked: writeLocked("201", "403 identity_mismatch") },
  { name: "PUT state in _shared", method: "PUT", path: () => "/rooms/r/state", body: { key: "k", value: 2 }, open: writeOpen("200"), locked: writeLocked("200") },
  { name: "PUT state in the agent's own scope", method: "PUT", path: () => "/rooms/r/state", body: { scope: "a", key: "k", value: 2 }, open: writeOpen("200"), locked: writeLocked("200") },
  { name: "PUT state in another agent's scope", method: "PUT", path: () => "/rooms/r/state", body: { scope: "b", key: "k", value: 2 }, open: writeOpen("200"), locked: writeLocked("200", "403 identity_mismatch") },
  { name: "DELETE state", method: "DELETE", path: () => "/rooms/r/state", body: { key: "k" }, open: writeOpen("200"), locked: writeLocked("200") },
  { name: "POST batch", method: "POST", path: () => "/rooms/r/batch", body: { state: [{ key: "k2", value: 1 }], messages: [{ body: "x" }] }, open: writeOpen("200"), locked: writeLocked("200") },
  { name: "POST agents with a new id", method: "POST", path: () => "/rooms/r/agents", body: { id: "c", name: "C" }, open: writeOpen("201"), locked: writeLocked("201", "403 forbidden") },
  {
    // Re-registering "a" with a's own token is not joining: SPEC §4 lets an agent's
    // token register it again, locked room or not.
    name: "POST agents with the existing id a, no rotate_token",
    method: "POST",
    path: () => "/rooms/r/agents",
    body: { id: "a", name: "A2" },
    open: ["409 agent_exists", "403 read_only", "200", "200", "401 invalid_token", "200", "401 invalid_token", "401 invalid_token"],
    locked: writeLocked("200"),
  },
  { name: "POST claim without an agent field", method: "POST", path: (mid) => `/rooms/r/messages/${mid}/claim`, body: {}, open: writeOpen("400 invalid_request", "200"), locked: writeLocked("400 invalid_request", "200") },
  { name: "POST heartbeat for the agent itself", method: "POST", path: () => "/rooms/r/agents/a/heartbeat", body: { status: "busy" }, open: writeOpen("200"), locked: writeLocked("200") },
  { name: "POST heartbeat for another agent", method: "POST", path: () => "/rooms/r/agents/b/heartbeat", body: { status: "busy" }, open: writeOpen("200", "403 identity_mismatch"), locked: writeLocked("200", "403 identity_mismatch") },
  { name: "DELETE /rooms/:id", method: "DELETE", path: () => "/rooms/r", open: ROOM_OR_ADMIN, locked: ROOM_OR_ADMIN },
];

/** One cell: a fresh database and fixture, one request; "200" or "403 read_only". */
async function outcome(
  row: Row,
  locked: boolean,
  who: CallerName,
): Promise<string> {
  const { db, close } = await freshDb();
  const app = createApp({ db, rateLimit: null, adminToken: ADMIN });
  try {
    const call = callerOf(app, []);
    const { auth, mid } = await matrixFixture(call, locked);
    const headers: Record<string, string> = {
      "content-type": "application/json",
    };
    if (auth[who] !== undefined) headers.authorization = auth[who];
    const res = await app.request(row.path(mid), {
      method: row.method,
      headers,
      body: row.body === undefined ? undefined : JSON.stringify(row.body),
    });
    if (res.status < 300) {
      // A stream never ends by itself: its status is all that is checked.
      await res.body?.cancel();
      await settled(db);
      return String(res.status);
    }
    const body = await res.json();
    assert.equal(typeof body.message, "string", "an error has a message");
    return `${res.status} ${body.error}`;
  } finally {
    await close();
  }
}

for (const locked of [false, true]) {
  for (const row of MATRIX) {
    const expected = locked ? row.locked : row.open;
    const summary = CALLERS.map((who, i) => `${who} ${expected[i]}`).join(", ");
    Deno.test(
      `${locked ? "locked" : "open"} room: ${row.name} answers ${summary}`,
      async () => {
        const actual: Record<string, string> = {};
        for (const who of CALLERS) {
          actual[who] = await outcome(row, locked, who);
        }
        assert.deepEqual(
          actual,
          Object.fromEntries(CALLERS.map((who, i) => [who, expected[i]])),
        );
      },
    );
  }
}

// ---- identity defaults ----

test("with an agent token, POST messages without from is stored as from that agent", async ({ call }) => {
  await createRoom(call, "r");
  const a = await join(call, "r", { id: "a", name: "A" });
  const posted = expect(
    await call("POST", "/rooms/r/messages", { body: { body: "hi" }, token: a }),
    201,
  );
  assert.equal(posted.from_agent, "a");
  const read = expect(await call("GET", "/rooms/r/messages"), 200);
  assert.deepEqual(
    (read as unknown as Body[]).map((m) => m.from_agent),
    ["a"],
  );
});

test("with the room token, POST messages keeps from as sent (or null)", async ({ call }) => {
  const r = await createRoom(call, "r");
  await join(call, "r", { id: "a", name: "A" });
  const none = expect(
    await call("POST", "/rooms/r/messages", {
      body: { body: 1 },
      token: r.room,
    }),
    201,
  );
  assert.equal(none.from_agent, null);
  const named = expect(
    await call("POST", "/rooms/r/messages", {
      body: { from: "a", body: 2 },
      token: r.room,
    }),
    201,
  );
  assert.equal(named.from_agent, "a");
});

test("with an agent token, claim and release without agent act as that agent", async ({ call }) => {
  await createRoom(call, "r");
  const a = await join(call, "r", { id: "a", name: "A" });
  const m = expect(
    await call("POST", "/rooms/r/messages", { body: { body: "task" } }),
    201,
  );
  for (
    const [action, done, holder] of [
      ["claim", "claimed", "a"],
      ["release", "released", null],
    ] as const
  ) {
    const path = `/rooms/r/messages/${m.id}/${action}`;
    const reply = expect(await call("POST", path, { body: {}, token: a }), 200);
    assert.equal(reply[done], true);
    assert.equal((reply.message as Body).claimed_by, holder);
  }
});

test("a long-poll with an agent token and no agent parameter shows that agent as waiting", async (api) => {
  const { call, db } = api;
  await createRoom(call, "r");
  const a = await join(call, "r", { id: "a", name: "A" });
  await join(call, "r", { id: "b", name: "B" });
  const { poll } = await waitingPoll(api, "/rooms/r/messages?wait=5", "a", a);
  assert.equal(await statusOf(call, "b"), "active", "nobody else does");
  const posted = expect(
    await call("POST", "/rooms/r/messages", { body: { body: "wake" } }),
    201,
  );
  const res = await poll;
  assert.equal(res.status, 200);
  assert.deepEqual((await res.json()).map((m: Body) => m.id), [posted.id]);
  assert.equal(
    await statusOf(call, "a"),
    "active",
    "the status comes back after it",
  );
  await settled(db);
});

test("a long-poll on a state key with an agent token shows that agent as waiting", async (api) => {
  const { call, db } = api;
  await createRoom(call, "r");
  const a = await join(call, "r", { id: "a", name: "A" });
  const { poll } = await waitingPoll(
    api,
    "/rooms/r/state?key=k&wait=5",
    "a",
    a,
  );
  expect(
    await call("PUT", "/rooms/r/state", { body: { key: "k", value: 1 } }),
    200,
  );
  const res = await poll;
  assert.equal(res.status, 200);
  assert.equal((await res.json()).value, 1);
  await settled(db);
});

/** A read with `idle_ms` (which grows by itself) left out. */
function withoutIdle(body: unknown): unknown {
  return JSON.parse(
    JSON.stringify(body, (k, v) => k === "idle_ms" ? undefined : v),
  );
}

type Case = [
  name: string,
  method: string,
  path: (mid: number) => string,
  body: unknown,
  status: number,
  code: string,
];

test("an agent token naming another agent anywhere is 403 identity_mismatch and writes nothing", async ({ call }) => {
  const r = await createRoom(call, "r", { locked: true });
  const a = await join(call, "r", { id: "a", name: "A" }, r.room);
  await join(call, "r", { id: "b", name: "B" }, r.room);
  const m = expect(
    await call("POST", "/rooms/r/messages", { body: { body: 1 }, token: a }),
    201,
  );
  expect(
    await call("POST", `/rooms/r/messages/${m.id}/claim`, {
      body: { agent: "b" },
      token: r.room,
    }),
    200,
  );
  const before = await Promise.all(
    ["/rooms/r/messages", "/rooms/r/state", "/rooms/r/agents"].map(async (
      path,
    ) => withoutIdle((await call("GET", path, { token: r.room })).body)),
  );
  // deno-fmt-ignore
  const cases: Case[] = [
    ["claim for b", "POST", (id) => `/rooms/r/messages/${id}/claim`, { agent: "b" }, 403, "identity_mismatch"],
    ["release for b", "POST", (id) => `/rooms/r/messages/${id}/release`, { agent: "b" }, 403, "identity_mismatch"],
    ["heartbeat of b", "POST", () => "/rooms/r/agents/b/heartbeat", { status: "done" }, 403, "identity_mismatch"],
    ["a message from b", "POST", () => "/rooms/r/messages", { from: "b", body: 2 }, 403, "identity_mismatch"],
    ["a batch message from b", "POST", () => "/rooms/r/batch", { messages: [{ from: "b", body: 2 }] }, 403, "identity_mismatch"],
    ["a batch write to b's scope", "POST", () => "/rooms/r/batch", { state: [{ key: "k", value: 1 }, { scope: "b", key: "k", value: 1 }] }, 403, "identity_mismatch"],
    ["a write to b's scope", "PUT", () => "/rooms/r/state", { scope: "b", key: "k", value: 1 }, 403, "identity_mismatch"],
    ["a delete in b's scope", "DELETE", () => "/rooms/r/state", { scope: "b", key: "k" }, 403, "identity_mismatch"],
    ["a long-poll waiting as b", "GET", (id) => `/rooms/r/messages?after=${id}&wait=0.05&agent=b`, undefined, 403, "identity_mismatch"],
    ["a state long-poll waiting as b", "GET", () => "/rooms/r/state?key=k&wait=0.05&agent=b", undefined, 403, "identity_mismatch"],
  ];
  for (const [name, method, path, body, status, code] of cases) {
    const reply = await call(method, path(m.id as number), { body, token: a });
    const error = expectError(reply, status, code);
    assert.equal(error.agent, "a", name);
  }
  const after = await Promise.all(
    ["/rooms/r/messages", "/rooms/r/state", "/rooms/r/agents"].map(async (
      path,
    ) => withoutIdle((await call("GET", path, { token: r.room })).body)),
  );
  assert.deepEqual(after, before);
});

test("a token that is not one of the room's is 401 invalid_token, even in an open room", async ({ call }) => {
  const r = await createRoom(call, "r");
  const s = await createRoom(call, "s");
  const sa = await join(call, "s", { id: "a", name: "A" });
  await join(call, "r", { id: "a", name: "A" });
  const body = r.room.slice("room_".length);
  // deno-fmt-ignore
  const cases: [name: string, auth: string][] = [
    ["another room's room token", `Bearer ${s.room}`],
    ["another room's view token", `Bearer ${s.view}`],
    ["an agent token of another room, same agent id", `Bearer ${sa}`],
    ["the room token under the view prefix", `Bearer view_${body}`],
    ["the room token under the agent prefix", `Bearer as_${body}`],
    ["the room token with a character changed", `Bearer ${r.room.slice(0, -1)}${r.room.endsWith("A") ? "B" : "A"}`],
    ["a bare token without a scheme", r.room],
    ["Bearer with no token", "Bearer"],
    ["Bearer with two words", `Bearer ${r.room} x`],
    ["an empty header", ""],
  ];
  for (const [name, auth] of cases) {
    for (const [method, body] of [["GET", undefined], ["POST", { body: 1 }]]) {
      const path = method === "GET" ? "/rooms/r" : "/rooms/r/messages";
      const reply = await call(method as string, path, { auth, body });
      assert.equal(reply.status, 401, `${name}, ${method}: ${reply.text}`);
      assert.equal(reply.body.error, "invalid_token", name);
    }
  }
  assert.deepEqual((await call("GET", "/rooms/r/messages")).body, []);
  // The scheme is case-insensitive, as RFC 9110 says.
  expect(await call("GET", "/rooms/r", { auth: `bearer ${r.room}` }), 200);
});

// ---- registering again ----

test("re-registering an existing agent id without its token is 409 agent_exists and changes nothing", async ({ call }) => {
  await createRoom(call, "r");
  await join(call, "r", { id: "a", name: "A", role: "worker", meta: { v: 1 } });
  const b = await join(call, "r", { id: "b", name: "B" });
  const before = (await call("GET", "/rooms/r/agents")).body;
  const cases: [string, string | undefined][] = [
    ["anonymous", undefined],
    ["another agent's token", b],
  ];
  for (const [who, token] of cases) {
    const reply = await call("POST", "/rooms/r/agents", {
      body: { id: "a", name: "Z", role: "thief", meta: { v: 9 } },
      token,
    });
    const body = expectError(reply, 409, "agent_exists");
    assert.equal((body.agent as Body).name, "A", who);
    assert.equal("token" in body, false, who);
    assert.equal("token" in (body.agent as Body), false, who);
  }
  const after = (await call("GET", "/rooms/r/agents"))
    .body as unknown as Body[];
  assert.deepEqual(
    after.map(({ id, name, role, meta }) => ({ id, name, role, meta })),
    (before as unknown as Body[]).map(({ id, name, role, meta }) => ({
      id,
      name,
      role,
      meta,
    })),
  );
});

test("re-registering with the agent's own token updates it and keeps the token", async ({ call }) => {
  await createRoom(call, "r");
  const a = await join(call, "r", {
    id: "a",
    name: "A",
    role: "worker",
    meta: { v: 1 },
  });
  const reply = await call("POST", "/rooms/r/agents", {
    body: { id: "a", name: "A2", role: "lead", meta: { v: 2 } },
    token: a,
  });
  const body = expect(reply, 200);
  assert.equal(body.id, "a");
  assert.equal(body.name, "A2");
  assert.equal(body.role, "lead");
  assert.deepEqual(body.meta, { v: 2 });
  assert.equal("token" in body, false, "no token unless rotate_token");
  const listed = (await call("GET", "/rooms/r/agents"))
    .body as unknown as Body[];
  assert.deepEqual(
    listed.map(({ id, name, role, meta }) => ({ id, name, role, meta })),
    [{ id: "a", name: "A2", role: "lead", meta: { v: 2 } }],
  );
  const posted = expect(
    await call("POST", "/rooms/r/messages", { body: { body: 1 }, token: a }),
    201,
  );
  assert.equal(posted.from_agent, "a", "the old token still works");
});

test("re-registering with rotate_token: true gives a new token and retires the old one", async ({ call }) => {
  await createRoom(call, "r");
  const old = await join(call, "r", { id: "a", name: "A" });
  const body = await rotate(call, old);
  const fresh = body.token as string;
  assert.match(fresh, TOKEN.as);
  assert.notEqual(fresh, old);
  expectError(
    await call("GET", "/rooms/r", { token: old }),
    401,
    "invalid_token",
  );
  expectError(
    await call("POST", "/rooms/r/messages", { body: { body: 1 }, token: old }),
    401,
    "invalid_token",
  );
  const posted = expect(
    await call("POST", "/rooms/r/messages", {
      body: { body: 2 },
      token: fresh,
    }),
    201,
  );
  assert.equal(posted.from_agent, "a", "the new token acts as a");
});

test("re-registering with the room token is 200, and rotate_token then retires the agent's token", async ({ call }) => {
  const r = await createRoom(call, "r");
  const a = await join(call, "r", { id: "a", name: "A" });
  const kept = expect(
    await call("POST", "/rooms/r/agents", {
      body: { id: "a", name: "A3" },
      token: r.room,
    }),
    200,
  );
  assert.equal(kept.name, "A3");
  assert.equal("token" in kept, false);
  expect(await call("GET", "/rooms/r", { token: a }), 200);
  const rotated = await rotate(call, r.room, "A3");
  assert.match(rotated.token as string, TOKEN.as);
  expectError(
    await call("GET", "/rooms/r", { token: a }),
    401,
    "invalid_token",
  );
  expect(
    await call("GET", "/rooms/r", { token: rotated.token as string }),
    200,
  );
});

test("re-registering itself in a locked room with the agent's own token is 200", async ({ call }) => {
  const r = await createRoom(call, "r", { locked: true });
  const a = await join(call, "r", { id: "a", name: "A" }, r.room);
  const body = await rotate(call, a, "A2");
  assert.equal(body.name, "A2");
  assert.match(body.token as string, TOKEN.as);
});

// ---- tokens ----

test("tokens are a kind prefix and 256 random bits in base64url, all distinct", async ({ call }) => {
  const tokens: string[] = [];
  for (const id of ["r1", "r2"]) {
    const { room, view } = await createRoom(call, id);
    assert.match(room, TOKEN.room);
    assert.match(view, TOKEN.view);
    tokens.push(room, view);
    for (const agent of ["a", "b"]) {
      const token = await join(call, id, { id: agent, name: agent });
      assert.match(token, TOKEN.as);
      tokens.push(token);
    }
  }
  for (const token of tokens) {
    const text = token.slice(token.indexOf("_") + 1);
    const bytes = atob(text.replaceAll("-", "+").replaceAll("_", "/") + "=");
    assert.equal(bytes.length, 32, "256 bits");
  }
  assert.equal(new Set(tokens).size, tokens.length);
});

test("POST /rooms for an existing id is 200 with the room and no tokens", async ({ call }) => {
  await createRoom(call, "r", { meta: { v: 1 } });
  for (const token of [undefined, ADMIN]) {
    const body = expect(
      await call("POST", "/rooms", {
        body: { id: "r", meta: { v: 2 } },
        token,
      }),
      200,
    );
    assert.deepEqual(Object.keys(body).sort(), [
      "created_at",
      "id",
      "locked",
      "meta",
    ]);
    assert.deepEqual(body.meta, { v: 1 });
  }
});

test("a token appears only in the one response that issued it", async ({ app, call, db, texts }) => {
  const issued = new Map<string, number>();
  /** Notes the tokens of the last response as issued by it. */
  const issuer = (...tokens: unknown[]) => {
    for (const token of tokens) {
      assert.equal(typeof token, "string");
      issued.set(token as string, texts.length - 1);
    }
  };
  const r = expect(
    await call("POST", "/rooms", { body: { id: "r", meta: { x: 1 } } }),
    201,
  );
  issuer(r.token, r.view_token);
  const s = expect(
    await call("POST", "/rooms", { body: { id: "s", locked: true } }),
    201,
  );
  issuer(s.token, s.view_token);
  const room = r.token as string;
  const view = r.view_token as string;
  expect(await call("POST", "/rooms", { body: { id: "r" } }), 200);
  // Joining a locked room without a token of it shows nothing of it.
  expect(await call("POST", "/rooms", { body: { id: "s" } }), 401);
  const a = expect(
    await call("POST", "/rooms/r/agents", { body: { id: "a", name: "A" } }),
    201,
  );
  issuer(a.token);
  const b = expect(
    await call("POST", "/rooms/r/agents", {
      body: { id: "b", name: "B" },
      token: room,
    }),
    201,
  );
  issuer(b.token);
  const c = expect(
    await call("POST", "/rooms/s/agents", {
      body: { id: "c", name: "C" },
      token: s.token as string,
    }),
    201,
  );
  issuer(c.token);
  const a2 = await rotate(call, a.token as string);
  issuer(a2.token);
  const ta = a2.token as string;
  const tb = b.token as string;
  const tc = c.token as string;
  const html = { headers: { accept: "text/html" } };
  // Answers that issue no token, then errors, some sending a token that is not the
  // room's: none is echoed back. [method, path, options, status, error code]
  // deno-fmt-ignore
  const calls: [string, string, Options, number, string?][] = [
    ["POST", "/rooms/r/agents", { body: { id: "a", name: "A" }, token: ta }, 200],
    ["POST", "/rooms/r/messages", { body: { body: "hi" }, token: ta }, 201],
    ["POST", "/rooms/r/batch", { body: { messages: [{ body: 2 }], state: [{ key: "k", value: 1 }] }, token: tb }, 200],
    ["PUT", "/rooms/r/state", { body: { scope: "b", key: "k", value: 2 }, token: tb }, 200],
    ["POST", "/rooms/r/agents/a/heartbeat", { body: {}, token: ta }, 200],
    ["GET", "/rooms/r", { token: room }, 200],
    ["GET", "/rooms/r/agents", { token: view }, 200],
    ["GET", "/rooms/r/messages", { token: ta }, 200],
    ["GET", "/rooms/r/state", { token: tb }, 200],
    ["GET", "/rooms/r/context", { token: room }, 200],
    ["GET", "/rooms/s/context", { token: tc }, 200],
    ["GET", "/rooms", {}, 200],
    ["GET", "/rooms", { token: ADMIN }, 200],
    ["GET", "/limits", {}, 200],
    ["GET", "/?room=r", html, 200],
    ["GET", "/?room=s", html, 200],
    ["POST", "/rooms/r/agents", { body: { id: "a", name: "A" } }, 409, "agent_exists"],
    ["POST", "/rooms/r/agents", { body: { id: "a", name: "A" }, token: tb }, 409, "agent_exists"],
    ["GET", "/rooms/r", { token: s.token as string }, 401, "invalid_token"],
    ["GET", "/rooms/r", { token: a.token as string }, 401, "invalid_token"],
    ["GET", "/rooms/s", { token: ta }, 401, "invalid_token"],
    ["GET", "/rooms/s", {}, 401, "token_required"],
    ["POST", "/rooms/r/messages", { body: { from: "b", body: 1 }, token: ta }, 403, "identity_mismatch"],
    ["PUT", "/rooms/r/state", { body: { key: "k", value: 1 }, token: view }, 403, "read_only"],
    ["DELETE", "/rooms/r", { token: ta }, 403, "forbidden"],
    ["POST", "/rooms/s/agents", { body: { name: "D" }, token: tc }, 403, "forbidden"],
    ["GET", "/rooms/r", { auth: `Basic ${room}` }, 401, "invalid_token"],
  ];
  for (const [method, path, options, status, code] of calls) {
    const reply = await call(method, path, options);
    if (code === undefined) expect(reply, status);
    else expectError(reply, status, code);
  }
  // The stream's first events: the backlog, the snapshot, then `ready`.
  const streamed = await streamToReady(app, db, "r", room);
  assert.match(streamed, /event: message/);
  assert.match(streamed, /event: agent/);
  texts.push(streamed);

  assert.equal(issued.size, 8);
  const hashes = await Promise.all([...issued.keys()].map(sha256Hex));
  for (const [i, text] of texts.entries()) {
    for (const [token, at] of issued) {
      if (i !== at) {
        assert.equal(
          text.includes(token),
          false,
          `response ${i} holds ${token}: ${text}`,
        );
      }
    }
    for (const hash of hashes) {
      assert.equal(
        text.includes(hash),
        false,
        `response ${i} holds a token hash`,
      );
    }
  }
});

test("the database file holds the SHA-256 of each token, never the token", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sync_auth_test_" });
  try {
    const db = new Db({ url: `file:${dir}/t.db` });
    const app = createApp({ db, rateLimit: null, adminToken: ADMIN });
    const call = callerOf(app, []);
    let live: string[];
    let retired: string;
    try {
      const r = await createRoom(call, "r");
      const s = await createRoom(call, "s", { locked: true });
      const a = await join(call, "r", { id: "a", name: "A" });
      const b = await join(call, "s", { id: "b", name: "B" }, s.room);
      const rotated = await rotate(call, a);
      expect(
        await call("POST", "/rooms/r/messages", {
          body: { body: "hi" },
          token: rotated.token as string,
          headers: { "idempotency-key": "k1" },
        }),
        201,
      );
      live = [r.room, r.view, s.room, s.view, b, rotated.token as string];
      retired = a;
    } finally {
      db.close();
    }
    let text = "";
    for (const name of ["t.db", "t.db-wal"]) {
      try {
        text += new TextDecoder("latin1").decode(
          await Deno.readFile(`${dir}/${name}`),
        );
      } catch (error) {
        if (!(error instanceof Deno.errors.NotFound)) throw error;
      }
    }
    assert.ok(text.length > 0);
    for (const token of [...live, retired]) {
      assert.equal(text.includes(token), false, `the file holds ${token}`);
    }
    for (const token of live) {
      assert.ok(text.includes(await sha256Hex(token)), `the hash of ${token}`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- listing and deleting rooms ----

test("GET /rooms lists open rooms only, locked ones too for the admin token", async ({ call }) => {
  await createRoom(call, "o1");
  const l = await createRoom(call, "l1", { locked: true });
  await createRoom(call, "o2");
  const la = await join(call, "l1", { id: "a", name: "A" }, l.room);
  const ids = async (token?: string) => {
    const reply = await call("GET", "/rooms", { token });
    return (expect(reply, 200) as unknown as Body[]).map((room) => room.id);
  };
  assert.deepEqual(await ids(), ["o1", "o2"]);
  assert.deepEqual(await ids(ADMIN), ["o1", "l1", "o2"]);
  for (const token of [l.room, l.view, la, "nope"]) {
    assert.deepEqual(await ids(token), ["o1", "o2"], `with ${token}`);
  }
});

test("DELETE /rooms/:id with the room token deletes the room and everything in it", async ({ call }) => {
  await createRoom(call, "other");
  expect(
    await call("POST", "/rooms/other/messages", { body: { body: "keep" } }),
    201,
  );
  const r = await createRoom(call, "r", { meta: { v: 1 } });
  const a = await join(call, "r", { id: "a", name: "A" });
  let last = 0;
  for (let i = 0; i < 3; i++) {
    const m = expect(
      await call("POST", "/rooms/r/messages", { body: { body: i }, token: a }),
      201,
    );
    last = m.id as number;
  }
  expect(
    await call("PUT", "/rooms/r/state", { body: { key: "k", value: 1 } }),
    200,
  );
  expect(
    await call("PUT", "/rooms/r/state", {
      body: { scope: "a", key: "k", value: 1 },
    }),
    200,
  );

  const deleted = await call("DELETE", "/rooms/r", { token: r.room });
  assert.equal(deleted.status, 200);
  assert.deepEqual(deleted.body, { deleted: true });

  for (
    const path of [
      "/rooms/r",
      "/rooms/r/agents",
      "/rooms/r/messages",
      "/rooms/r/state",
      "/rooms/r/state?key=k",
      "/rooms/r/context",
      "/rooms/r/stream",
    ]
  ) {
    expectError(await call("GET", path), 404, "room_not_found");
    expectError(
      await call("GET", path, { token: r.room }),
      404,
      "room_not_found",
    );
  }
  expectError(
    await call("DELETE", "/rooms/r", { token: r.room }),
    404,
    "room_not_found",
  );
  assert.deepEqual(
    ((await call("GET", "/rooms", { token: ADMIN })).body as unknown as Body[])
      .map((x) => x.id),
    ["other"],
  );
  const kept = (await call("GET", "/rooms/other/messages"))
    .body as unknown as Body[];
  assert.deepEqual(
    kept.map((m) => m.body),
    ["keep"],
    "other rooms are untouched",
  );

  const again = await createRoom(call, "r", { meta: { v: 2 } });
  assert.notEqual(again.room, r.room);
  const room = expect(await call("GET", "/rooms/r"), 200);
  assert.deepEqual(room.meta, { v: 2 }, "a new room, not the old one");
  assert.deepEqual((await call("GET", "/rooms/r/agents")).body, []);
  assert.deepEqual((await call("GET", "/rooms/r/messages")).body, []);
  assert.deepEqual((await call("GET", "/rooms/r/state")).body, []);
  expectError(
    await call("GET", "/rooms/r", { token: r.room }),
    401,
    "invalid_token",
  );
  expectError(
    await call("GET", "/rooms/r", { token: a }),
    401,
    "invalid_token",
  );
  expect(
    await call("POST", "/rooms/r/agents", { body: { id: "a", name: "A" } }),
    201,
  );
  const fresh = expect(
    await call("POST", "/rooms/r/messages", { body: { body: "new" } }),
    201,
  );
  assert.ok((fresh.id as number) > last, `${fresh.id} > ${last}`);
});

// ---- rate limit ----

const LIMIT = { rateLimit: { per_second: 5, burst: 10 } };

test(
  "over the rate limit a client gets 429 rate_limited with Retry-After",
  async ({ call }) => {
    // A token proves itself by being admitted to its room (from another address).
    const other = { remoteAddr: { hostname: "10.0.0.9" } };
    const { room } = await createRoom(call, "lim", {});
    expect(await call("GET", "/rooms/lim", { env: other, token: room }), 200);
    const first = { remoteAddr: { hostname: "10.0.0.1" } };
    for (let i = 0; i < 10; i++) {
      expect(await call("GET", "/limits", { env: first }), 200);
    }
    const limited = await call("GET", "/limits", { env: first });
    const body = expectError(limited, 429, "rate_limited");
    const retry = Number(limited.headers.get("retry-after"));
    assert.ok(Number.isInteger(retry) && retry >= 1, `Retry-After ${retry}`);
    assert.equal(body.retry_after, retry);
    // Another address, or a proven token from the same address, has its own
    // allowance; a made-up token counts as its address.
    expect(
      await call("GET", "/limits", {
        env: { remoteAddr: { hostname: "10.0.0.2" } },
      }),
      200,
    );
    expect(await call("GET", "/limits", { env: first, token: room }), 200);
    expectError(
      await call("GET", "/limits", { env: first, token: "nope" }),
      429,
      "rate_limited",
    );
    // A request comes back every 0.2 s.
    await sleep(250);
    expect(await call("GET", "/limits", { env: first }), 200);
    expectError(
      await call("GET", "/limits", { env: first }),
      429,
      "rate_limited",
    );
  },
  LIMIT,
);

test("the rate limit counts each proven token apart", async ({ call }) => {
  const { room, view } = await createRoom(call, "r", {});
  const env = { remoteAddr: { hostname: "10.0.0.5" } };
  for (const token of [room, view]) {
    expect(await call("GET", "/rooms/r", { env, token }), 200);
  }
  for (let i = 0; i < 10; i++) {
    expect(await call("GET", "/rooms", { env, token: room }), 200);
  }
  expectError(
    await call("GET", "/rooms", { env, token: room }),
    429,
    "rate_limited",
  );
  expect(await call("GET", "/rooms", { env, token: view }), 200);
  expect(await call("GET", "/rooms", { env }), 200);
}, LIMIT);

test(
  "tokens that prove nothing, however spelled, count as their address",
  async ({ call }) => {
    const env = { remoteAddr: { hostname: "10.0.0.6" } };
    const answers: number[] = [];
    for (let i = 0; i < 12; i++) {
      const reply = await call("POST", "/rooms", {
        env,
        token: i % 2 ? `junk${i}` : undefined,
        auth: i % 3 === 0 ? `bearer    junk${i}` : undefined,
      });
      answers.push(reply.status);
    }
    assert.deepEqual(answers.slice(0, 10), Array(10).fill(201));
    assert.deepEqual(answers.slice(10), [429, 429]);
  },
  LIMIT,
);

test(
  "made-up tokens from one address cannot dodge the rate limit",
  async ({ call }) => {
    await createRoom(call, "r", {});
    const env = { remoteAddr: { hostname: "10.0.0.3" } };
    const answers: string[] = [];
    for (let i = 0; i < 12; i++) {
      const reply = await call("GET", "/rooms/r", {
        env,
        token: `made_up_${i}`,
      });
      answers.push(`${reply.status} ${reply.body.error}`);
    }
    assert.deepEqual(answers.slice(0, 10), Array(10).fill("401 invalid_token"));
    assert.deepEqual(answers.slice(10), Array(2).fill("429 rate_limited"));
    expect(
      await call("GET", "/rooms/r", {
        env: { remoteAddr: { hostname: "10.0.0.4" } },
      }),
      200,
    );
  },
  LIMIT,
);

test(
  "twenty proven tokens from one address stay under the address's ceiling",
  async ({ call }) => {
    await createRoom(call, "many", {});
    // Twenty agent tokens, each joined and proven from an address of its own.
    const tokens: string[] = [];
    for (let i = 0; i < 20; i++) {
      const env = { remoteAddr: { hostname: `10.0.1.${100 + i}` } };
      const token = expect(
        await call("POST", "/rooms/many/agents", {
          env,
          body: { id: `a${i}`, name: "A" },
        }),
        201,
      ).token as string;
      expect(await call("GET", "/rooms/many", { env, token }), 200);
      tokens.push(token);
    }
    const env = { remoteAddr: { hostname: "10.0.1.2" } };
    const started = performance.now();
    let ok = 0;
    for (let i = 0; i < 200; i++) {
      const reply = await call("GET", "/rooms/many", {
        env,
        token: tokens[i % 20],
      });
      if (reply.status === 200) ok++;
      else expectError(reply, 429, "rate_limited");
    }
    const seconds = (performance.now() - started) / 1000;
    // Each token alone would allow its burst of 5 (100 in all); the address allows
    // its burst of 50 and 50 a second after that.
    assert.ok(ok <= 50 + Math.ceil(50 * seconds) + 1, `${ok} in ${seconds} s`);
    assert.ok(ok >= 50, `${ok} in ${seconds} s`);
  },
  { rateLimit: { per_second: 5, burst: 5 } },
);

test(
  "making rooms is charged to the address, whatever token comes with it",
  async ({ call }) => {
    const { room } = await createRoom(call, "home", {});
    // The room token proves itself (from another address), so reads count as it...
    expect(
      await call("GET", "/rooms/home", {
        env: { remoteAddr: { hostname: "10.0.2.9" } },
        token: room,
      }),
      200,
    );
    const env = { remoteAddr: { hostname: "10.0.2.1" } };
    expect(await call("GET", "/rooms/home", { env, token: room }), 200);
    const made: number[] = [];
    for (let i = 0; i < 12; i++) {
      made.push((await call("POST", "/rooms", { env, token: room })).status);
    }
    // ...but new rooms (and their tokens) are the address's: 10, then 429.
    assert.deepEqual(made, [...Array(10).fill(201), 429, 429]);
    expect(await call("GET", "/rooms/home", { env, token: room }), 200);
  },
  LIMIT,
);

test(
  "behind a proxy, TRUST_PROXY=1 takes the client from X-Forwarded-For; unset, every client is the proxy",
  async ({ db }) => {
    const proxy = { remoteAddr: { hostname: "10.0.3.1" } };
    for (const trustProxy of [1, 0]) {
      const call = callerOf(
        createApp({
          db,
          rateLimit: { per_second: 5, burst: 3 },
          trustProxy,
        }),
        [],
      );
      const statuses = async (client: string) => {
        const out: number[] = [];
        for (let i = 0; i < 4; i++) {
          out.push(
            (await call("GET", "/limits", {
              env: proxy,
              headers: { "x-forwarded-for": `203.0.113.9, ${client}` },
            })).status,
          );
        }
        return out;
      };
      const first = await statuses("198.51.100.1");
      const second = await statuses("198.51.100.2");
      assert.deepEqual(first, [200, 200, 200, 429], `trust ${trustProxy}`);
      assert.deepEqual(
        second,
        trustProxy === 1 ? [200, 200, 200, 429] : [429, 429, 429, 429],
        `trust ${trustProxy}`,
      );
      const limits = expect(
        await call("GET", "/limits", {
          env: { remoteAddr: { hostname: "10.0.3.2" } },
        }),
        200,
      );
      assert.equal(limits.trust_proxy, trustProxy);
      assert.deepEqual(limits.rate_limit_per_address, {
        per_second: 50,
        burst: 30,
      });
    }
  },
);

test(
  "one address holds at most its share of long-polls and streams: 429 too_many_waits, and a finished wait gives its place back",
  async ({ db }) => {
    const app = createApp({
      db,
      rateLimit: null,
      maxWaits: { per_client: 10, per_address: 15 },
    });
    const call = callerOf(app, []);
    const { room } = await createRoom(call, "w", {});
    const a = await join(call, "w", { id: "a", name: "A" }, room);
    const env = { remoteAddr: { hostname: "10.0.4.1" } };
    // Fifteen anonymous waits from one address: ten are held, five refused at once.
    const anonymous = Array.from(
      { length: 15 },
      () => call("GET", "/rooms/w/messages?wait=5", { env }),
    );
    await sleep(100);
    // A token is a client of its own, within the address's ceiling of 15.
    const withToken = Array.from(
      { length: 7 },
      () => call("GET", "/rooms/w/messages?wait=5", { env, token: a }),
    );
    await sleep(100);
    const stream = await call("GET", "/rooms/w/stream", { env, token: a });
    expectError(stream, 429, "too_many_waits");
    expect(
      await call("POST", "/rooms/w/messages", { body: { body: "go" } }),
      201,
    );
    const statuses = async (replies: Promise<Reply>[]) =>
      (await Promise.all(replies)).map((r) =>
        `${r.status}${r.body.error ? " " + r.body.error : ""}`
      ).sort();
    assert.deepEqual(await statuses(anonymous), [
      ...Array(10).fill("200"),
      ...Array(5).fill("429 too_many_waits"),
    ]);
    assert.deepEqual(await statuses(withToken), [
      ...Array(5).fill("200"),
      ...Array(2).fill("429 too_many_waits"),
    ]);
    // Every place was given back: ten more waits from the address are held.
    const again = Array.from(
      { length: 10 },
      () => call("GET", "/rooms/w/messages?after=1&wait=0.2", { env }),
    );
    assert.deepEqual(await statuses(again), Array(10).fill("200"));
    await settled(db);
  },
);

test(
  "GET /limits shows the rate limit and the body limit",
  async ({ call }) => {
    const body = expect(await call("GET", "/limits"), 200);
    assert.deepEqual(body.rate_limit, { per_second: 5, burst: 10 });
    assert.equal(typeof body.max_body_bytes, "number");
  },
  LIMIT,
);

test("GET /limits shows rate_limit: null when it is off", async ({ db }) => {
  const app = createApp({ db, rateLimit: null, maxBodyBytes: 1000 });
  const res = await app.request("/limits", {
    headers: { "content-type": "application/json" },
  });
  const body = await res.json();
  assert.equal(body.rate_limit, null);
  assert.equal(body.max_body_bytes, 1000);
  for (let i = 0; i < 30; i++) {
    assert.equal(
      (await app.request("/limits", {
        headers: { "content-type": "application/json" },
      })).status,
      200,
    );
  }
});

// ---- CORS ----

test("an OPTIONS preflight allows any origin and the Authorization, Content-Type and Idempotency-Key headers", async ({ app }) => {
  const res = await app.request("/rooms/x/messages", {
    method: "OPTIONS",
    headers: {
      "content-type": "application/json",
      origin: "https://example.com",
      "access-control-request-method": "POST",
      "access-control-request-headers":
        "authorization,content-type,idempotency-key",
    },
  });
  assert.equal(res.status, 204);
  assert.equal(res.headers.get("access-control-allow-origin"), "*");
  const allowed = (res.headers.get("access-control-allow-headers") ?? "")
    .toLowerCase().split(",").map((h) => h.trim());
  for (const header of ["authorization", "content-type", "idempotency-key"]) {
    assert.ok(allowed.includes(header), `${header} in ${allowed}`);
  }
  const methods = (res.headers.get("access-control-allow-methods") ?? "")
    .split(",");
  for (const method of ["GET", "POST", "PUT", "DELETE"]) {
    assert.ok(methods.includes(method), `${method} in ${methods}`);
  }
  await res.body?.cancel();
});

test("a GET carries Access-Control-Allow-Origin: * and exposes Retry-After", async ({ call }) => {
  await createRoom(call, "r");
  const reply = await call("GET", "/rooms/r", {
    headers: { origin: "https://example.com" },
  });
  assert.equal(reply.status, 200);
  assert.equal(reply.headers.get("access-control-allow-origin"), "*");
  assert.match(
    reply.headers.get("access-control-expose-headers") ?? "",
    /Retry-After/i,
  );
});

test("a held long-poll's answer carries the CORS headers as any answer does: woken, timed out, refused while waiting, and to HEAD", async ({ app, call }) => {
  const { room } = await createRoom(call, "r");
  const cors = (res: Response) => {
    assert.equal(res.headers.get("access-control-allow-origin"), "*");
    assert.match(
      res.headers.get("access-control-expose-headers") ?? "",
      /Retry-After/i,
    );
    // The placeholder's marker (api.ts, `later`) never reaches a client.
    assert.deepEqual(
      [...res.headers.keys()].filter((name) => name.includes("later")),
      [],
    );
  };
  const held = (path: string, method = "GET") =>
    app.request(path, { method, headers: { origin: "https://example.com" } });
  const woken = held("/rooms/r/messages?after=0&wait=5");
  await sleep(50);
  expect(
    await call("POST", "/rooms/r/messages", { body: { body: "hi" } }),
    201,
  );
  const answer = await woken;
  assert.equal(answer.status, 200);
  assert.equal(answer.headers.get("content-type"), "application/json");
  cors(answer);
  assert.equal((await answer.json())[0].body, "hi");

  const timedOut = await held("/rooms/r/state?key=k&wait=0.1");
  assert.equal(timedOut.status, 404);
  cors(timedOut);
  assert.equal((await timedOut.json()).error, "key_not_found");

  const head = await held("/rooms/r/messages?after=1&wait=0.1", "HEAD");
  assert.equal(head.status, 200);
  assert.equal(head.headers.get("content-type"), "application/json");
  cors(head);
  assert.equal(await head.text(), "");

  const refused = held("/rooms/r/messages?after=1&wait=5");
  await sleep(50);
  expect(await call("DELETE", "/rooms/r", { token: room }), 200);
  const gone = await refused;
  assert.equal(gone.status, 404);
  assert.equal(gone.headers.get("content-type"), "application/json");
  cors(gone);
  assert.equal((await gone.json()).error, "room_not_found");
});

// ---- the viewer ----

test("the viewer's CSP runs only the script that carries its nonce, with nosniff and no referrer", async ({ call }) => {
  await createRoom(call, "r");
  const reply = await call("GET", "/?room=r", {
    headers: { accept: "text/html" },
  });
  assert.equal(reply.status, 200);
  const csp = reply.headers.get("content-security-policy") ?? "";
  const directives = new Map(
    csp.split(";").map((d) => d.trim().split(/\s+/)).map((
      [name, ...values],
    ) => [name, values]),
  );
  const scriptSrc = directives.get("script-src") ?? [];
  assert.equal(scriptSrc.length, 1, csp);
  const nonce = scriptSrc[0].match(/^'nonce-([^']+)'$/)?.[1];
  assert.ok(nonce, `script-src is a nonce: ${csp}`);
  const scripts = [...reply.text.matchAll(/<script\b([^>]*)>/g)].map((m) =>
    m[1]
  );
  const executable = scripts.filter((attrs) =>
    !/type="application\/json"/.test(attrs)
  );
  assert.equal(executable.length, 1, `one executable script: ${scripts}`);
  assert.equal(executable[0].match(/nonce="([^"]+)"/)?.[1], nonce);
  assert.equal(reply.headers.get("x-content-type-options"), "nosniff");
  assert.equal(reply.headers.get("referrer-policy"), "no-referrer");
});

test("a locked room's viewer page shows none of the room, only that it is locked", async ({ call }) => {
  const l = await createRoom(call, "l", {
    locked: true,
    meta: { note: "meta-secret-1" },
  });
  const a = await join(
    call,
    "l",
    { id: "spy-7", name: "name-secret-2" },
    l.room,
  );
  expect(
    await call("POST", "/rooms/l/messages", {
      body: { body: "message-secret-3" },
      token: a,
    }),
    201,
  );
  await putAs(call, "l", { key: "key-secret-4", value: "value-secret-5" }, a);
  const reply = await call("GET", "/?room=l", {
    headers: { accept: "text/html" },
  });
  assert.equal(reply.status, 200);
  for (
    const secret of [
      "meta-secret-1",
      "name-secret-2",
      "spy-7",
      "message-secret-3",
      "key-secret-4",
      "value-secret-5",
    ]
  ) {
    assert.equal(
      reply.text.includes(secret),
      false,
      `the page shows ${secret}`,
    );
  }
  assert.match(reply.text, /locked/);
  assert.equal(reply.headers.get("referrer-policy"), "no-referrer");
});

// ---- reads that wait or stream in a locked room ----

test("in a locked room, long-polls, the stream and context need a token: anonymous 401, view token 200", async ({ app, call, db }) => {
  const l = await createRoom(call, "l", { locked: true });
  const a = await join(call, "l", { id: "a", name: "A" }, l.room);
  const first = expect(
    await call("POST", "/rooms/l/messages", { body: { body: 1 }, token: a }),
    201,
  );
  await putAs(call, "l", { key: "k", value: 1 }, a);
  const paths = [
    `/rooms/l/messages?after=${first.id}&wait=0.05`,
    "/rooms/l/state?key=k&after_version=1&wait=0.05",
    "/rooms/l/stream",
    "/rooms/l/context",
  ];
  for (const path of paths) {
    expectError(await call("GET", path), 401, "token_required");
  }

  // A view token's long-poll is woken by an agent's write.
  const poll = app.request(`/rooms/l/messages?after=${first.id}&wait=5`, {
    headers: headersOf({ token: l.view }),
  });
  await sleep(20);
  const second = expect(
    await call("POST", "/rooms/l/messages", { body: { body: 2 }, token: a }),
    201,
  );
  const res = await poll;
  assert.equal(res.status, 200);
  assert.deepEqual((await res.json()).map((m: Body) => m.id), [second.id]);

  const state = expect(
    await call("GET", "/rooms/l/state?key=k&after_version=0&wait=0.05", {
      token: l.view,
    }),
    200,
  );
  assert.equal(state.value, 1);

  const context = expect(
    await call("GET", "/rooms/l/context", { token: l.view }),
    200,
  );
  assert.equal((context.room as Body).id, "l");
  assert.deepEqual((context.agents as Body[]).map((x) => x.id), ["a"]);
  assert.equal((context.messages as Body).total, 2);

  const streamed = await streamToReady(app, db, "l", l.view);
  assert.match(streamed, new RegExp(`id: ${second.id}\n`));
});

// ---- what the security review found ----

test("joining an existing locked room without a token of it is 401 and shows nothing of it", async ({ call }) => {
  const { view } = await createRoom(call, "ops", {
    locked: true,
    meta: { secret: "launch codes" },
  });
  const refused = expectError(
    await call("POST", "/rooms", { body: { id: "ops" } }),
    401,
    "token_required",
  );
  assert.ok(!JSON.stringify(refused).includes("launch codes"));
  expectError(
    await call("POST", "/rooms", { body: { id: "ops" }, token: "nope" }),
    401,
    "invalid_token",
  );
  const joined = expect(
    await call("POST", "/rooms", { body: { id: "ops" }, token: view }),
    200,
  );
  assert.deepEqual(joined.meta, { secret: "launch codes" });
  assert.equal(joined.token, undefined);
});

test("a view token cannot show an agent as waiting", async ({ call, db }) => {
  const { room, view } = await createRoom(call, "r", { locked: true });
  await join(call, "r", { id: "a", name: "A" }, room);
  expect(
    await call("POST", "/rooms/r/agents/a/heartbeat", {
      body: { status: "done" },
      token: room,
    }),
    200,
  );
  const before = expect(
    await call("GET", "/rooms/r/agents", { token: view }),
    200,
  );
  for (
    const path of [
      "/rooms/r/messages?wait=0.1&agent=a",
      "/rooms/r/state?key=k&wait=0.1&agent=a",
    ]
  ) {
    expectError(await call("GET", path, { token: view }), 403, "read_only");
  }
  await settled(db);
  const after = expect(
    await call("GET", "/rooms/r/agents", { token: view }),
    200,
  );
  assert.deepEqual(withoutIdle(after), withoutIdle(before));
});

test("an Idempotency-Key belongs to its caller: another agent's same key and body makes its own request", async ({ call }) => {
  const { room } = await createRoom(call, "r", { locked: true });
  const a = await join(call, "r", { id: "a", name: "A" }, room);
  const b = await join(call, "r", { id: "b", name: "B" }, room);
  const headers = { "idempotency-key": "task-1" };
  const first = expect(
    await call("POST", "/rooms/r/messages", {
      body: { body: "done" },
      token: a,
      headers,
    }),
    201,
  );
  assert.equal(first.from_agent, "a");
  const other = await call("POST", "/rooms/r/messages", {
    body: { body: "done" },
    token: b,
    headers,
  });
  assert.equal(other.status, 201);
  assert.equal(other.headers.get("idempotent-replayed"), null);
  assert.equal(other.body.from_agent, "b");
  assert.notEqual(other.body.id, first.id);
  const replay = await call("POST", "/rooms/r/messages", {
    body: { body: "done" },
    token: a,
    headers,
  });
  assert.equal(replay.headers.get("idempotent-replayed"), "true");
  assert.deepEqual(replay.body, first);
  // b's own repeat replays b's answer; a's key on another body is still refused.
  const again = await call("POST", "/rooms/r/messages", {
    body: { body: "done" },
    token: b,
    headers,
  });
  assert.deepEqual(again.body, other.body);
  expectError(
    await call("POST", "/rooms/r/messages", {
      body: { body: "changed" },
      token: a,
      headers,
    }),
    422,
    "idempotency_key_reused",
  );
  const all = expect(
    await call("GET", "/rooms/r/messages", { token: a }),
    200,
  ) as unknown as unknown[];
  assert.equal(all.length, 2);
});

test("a long-poll of a room that is deleted meanwhile answers 404 room_not_found", async ({ call }) => {
  const { room } = await createRoom(call, "x", {});
  const waiting = call("GET", "/rooms/x/messages?wait=5");
  await sleep(50);
  expect(await call("DELETE", "/rooms/x", { token: room }), 200);
  const t0 = performance.now();
  expectError(await waiting, 404, "room_not_found");
  assert.ok(performance.now() - t0 < 1000);
});

test("a long-poll with a token rotated meanwhile answers 401 invalid_token", async ({ call }) => {
  const { room } = await createRoom(call, "r", {});
  const a = await join(call, "r", { id: "a", name: "A" }, room);
  const waiting = call("GET", "/rooms/r/state?key=k&wait=5", { token: a });
  await sleep(50);
  await rotate(call, a);
  expectError(await waiting, 401, "invalid_token");
});

test("a stream ends when its room is deleted, and when its token is rotated", async ({ app, call, db }) => {
  const { room } = await createRoom(call, "gone", {});
  await createRoom(call, "r", {});
  const a = await join(call, "r", { id: "a", name: "A" });
  const cases = [
    {
      path: "/rooms/gone/stream",
      token: undefined,
      revoke: () => call("DELETE", "/rooms/gone", { token: room }),
    },
    {
      path: "/rooms/r/stream",
      token: a,
      revoke: () =>
        call("POST", "/rooms/r/agents", {
          body: { id: "a", name: "A", rotate_token: true },
          token: a,
        }),
    },
  ];
  for (const { path, token, revoke } of cases) {
    const res = await app.request(path, {
      headers: token ? { authorization: `Bearer ${token}` } : {},
    });
    assert.equal(res.status, 200);
    const text = res.text();
    await sleep(50);
    await revoke();
    assert.match(
      await text,
      /event: end\ndata: \{"room_id":"[a-z]+","reason":"access"\}/,
    );
    await settled(db);
  }
});

test("GET / tells caches not to keep the docs (they name the request's host)", async ({ call }) => {
  const reply = await call("GET", "/", {
    headers: { accept: "text/markdown" },
  });
  assert.equal(reply.headers.get("cache-control"), "no-store");
});
