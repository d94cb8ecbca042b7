/**
 * In-process tests: every endpoint and every error case through `app.request()`, each
 * test on a fresh `:memory:` database (or a temp file where the file itself matters).
 */
import assert from "node:assert/strict";
import { hc } from "hono/client";
import type { InArgs, InStatement } from "@libsql/client/web";

import type { RouteConfig } from "@hono/zod-openapi";
import { z } from "zod";
import { api, createRoute } from "./api.ts";
import { Db } from "./driver.ts";
import { type AppType, createApp } from "./main.ts";
import {
  agent,
  appTest,
  type Call,
  caller,
  message,
  times as keepingMessagesOf,
} from "./testing.ts";
import { ERRORS } from "./errors.ts";

/** A test with its own app on a fresh in-memory database. */
const test = appTest;

const UUID =
  /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

/** Times and tokens made comparable, error messages kept (they are checked here). */
const times = (value: unknown) =>
  keepingMessagesOf(value, { messages: "keep" });

/** A body as reads show it: tokens appear only in the answer that issues them. */
function withoutTokens(body: unknown): unknown {
  const { token: _t, view_token: _v, ...rest } = body as Record<
    string,
    unknown
  >;
  return rest;
}

/** Everything a room holds, to show that a rejected request changed nothing. */
async function snapshot(call: Call, room: string) {
  const parts = await Promise.all([
    call("GET", "/rooms"),
    call("GET", `/rooms/${room}/agents`),
    call("GET", `/rooms/${room}/messages?limit=1000`),
    call("GET", `/rooms/${room}/state`),
  ]);
  return parts.map((p) => times(p.body));
}

/** A room "r" with agent "a", one message and one state key. */
async function seedRoom(call: Call) {
  assert.equal((await call("POST", "/rooms", { id: "r" })).status, 201);
  assert.equal(
    (await call("POST", "/rooms/r/agents", { id: "a", name: "A" })).status,
    201,
  );
  assert.equal(
    (await call("POST", "/rooms/r/messages", { from: "a", body: "hi" })).status,
    201,
  );
  assert.equal(
    (await call("PUT", "/rooms/r/state", { key: "k", value: 1 })).status,
    200,
  );
}

// ---- rooms ----

test("POST /rooms with an id creates that room", async ({ call }) => {
  const res = await call("POST", "/rooms", {
    id: "demo",
    meta: { purpose: "test" },
  });
  assert.equal(res.status, 201);
  assert.deepEqual(times(res.body), {
    id: "demo",
    created_at: "<time>",
    meta: { purpose: "test" },
    locked: false,
    token: "<token>",
    view_token: "<token>",
  });
});

test("POST /rooms with no body makes a GUID room with empty meta", async ({ call }) => {
  for (const body of [undefined, {}, ""]) {
    const res = await call("POST", "/rooms", body);
    assert.equal(res.status, 201);
    const room = res.body as { id: string; meta: unknown };
    assert.match(room.id, UUID);
    assert.deepEqual(room.meta, {});
  }
});

test("POST /rooms with an existing id joins it: 200 with the room as it was", async ({ call }) => {
  const first = await call("POST", "/rooms", { id: "demo", meta: { v: 1 } });
  const again = await call("POST", "/rooms", { id: "demo", meta: { v: 2 } });
  assert.equal(again.status, 200);
  assert.deepEqual(
    again.body,
    withoutTokens(first.body),
    "no tokens for a joiner",
  );
});

test("POST /rooms works without a JSON content type (curl -d)", async ({ app }) => {
  const res = await app.request("/rooms", {
    method: "POST",
    headers: { "content-type": "application/x-www-form-urlencoded" },
    body: '{"id":"plain"}',
  });
  assert.equal(res.status, 201);
  assert.equal((await res.json()).id, "plain");
});

test("GET /rooms lists every room, oldest first", async ({ call }) => {
  for (const id of ["b", "a", "c"]) await call("POST", "/rooms", { id });
  const res = await call("GET", "/rooms");
  assert.equal(res.status, 200);
  assert.deepEqual(times(res.body), [
    { id: "b", created_at: "<time>", meta: {}, locked: false },
    { id: "a", created_at: "<time>", meta: {}, locked: false },
    { id: "c", created_at: "<time>", meta: {}, locked: false },
  ]);
});

test("GET /rooms/:id returns the room, or 404 room_not_found", async ({ call }) => {
  const created = await call("POST", "/rooms", {
    id: "demo",
    meta: ["any", "json"],
  });
  const res = await call("GET", "/rooms/demo");
  assert.equal(res.status, 200);
  assert.deepEqual(res.body, withoutTokens(created.body));
  const missing = await call("GET", "/rooms/nope");
  assert.equal(missing.status, 404);
  assert.deepEqual(times(missing.body), {
    error: "room_not_found",
    message: 'Room "nope" does not exist',
    room_id: "nope",
  });
});

// ---- agents ----

test("POST /rooms/:id/agents registers an agent", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const res = await call("POST", "/rooms/r/agents", {
    id: "alice",
    name: "Alice",
    role: "planner",
    meta: { model: "x" },
  });
  assert.equal(res.status, 201);
  assert.deepEqual(times(res.body), {
    id: "alice",
    room_id: "r",
    name: "Alice",
    role: "planner",
    joined_at: "<time>",
    meta: { model: "x" },
    status: "active",
    last_seen: "<time>",
    idle_ms: "<ms>",
    token: "<token>",
  });
});

test("POST /rooms/:id/agents without id makes a GUID; role and meta default", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const res = await call("POST", "/rooms/r/agents", { name: "Bob" });
  assert.equal(res.status, 201);
  const made = res.body as Record<string, unknown>;
  assert.match(String(made.id), UUID);
  // role "agent" and meta {}: agent()'s defaults.
  assert.deepEqual(
    times({ ...made, id: "<id>" }),
    agent("<id>", "Bob", { token: "<token>" }),
  );
});

test("registering an agent id twice is 409 agent_exists and changes nothing", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const first = await call("POST", "/rooms/r/agents", {
    id: "a",
    name: "First",
  });
  const again = await call("POST", "/rooms/r/agents", {
    id: "a",
    name: "Second",
  });
  assert.equal(again.status, 409);
  assert.deepEqual(times(again.body), {
    error: "agent_exists",
    message:
      'Agent "a" is already registered in room "r"; use it as it is, register another id, or send its token to register it again',
    agent: times(withoutTokens(first.body)),
  });
  assert.deepEqual(
    times((await call("GET", "/rooms/r/agents")).body),
    times([withoutTokens(first.body)]),
  );
});

test("the same agent id can be registered in two rooms", async ({ call }) => {
  await call("POST", "/rooms", { id: "r1" });
  await call("POST", "/rooms", { id: "r2" });
  assert.equal(
    (await call("POST", "/rooms/r1/agents", { id: "a", name: "A" })).status,
    201,
  );
  assert.equal(
    (await call("POST", "/rooms/r2/agents", { id: "a", name: "A" })).status,
    201,
  );
});

test("GET /rooms/:id/agents lists the room's agents in join order", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  await call("POST", "/rooms", { id: "other" });
  await call("POST", "/rooms/other/agents", { id: "x", name: "X" });
  const a = await call("POST", "/rooms/r/agents", { id: "zed", name: "Z" });
  const b = await call("POST", "/rooms/r/agents", { id: "amy", name: "A" });
  const res = await call("GET", "/rooms/r/agents");
  assert.equal(res.status, 200);
  assert.deepEqual(times(res.body), times([a.body, b.body].map(withoutTokens)));
});

// ---- messages ----

test("POST /rooms/:id/messages appends a message", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const res = await call("POST", "/rooms/r/messages", {
    from: "alice",
    to: "bob",
    kind: "task",
    body: { do: "review" },
  });
  assert.equal(res.status, 201);
  assert.deepEqual(
    times(res.body),
    message(1, { do: "review" }, {
      from_agent: "alice",
      to_agent: "bob",
      kind: "task",
    }),
  );
});

test("a message with only a body is from nobody, to everyone, of kind message", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const res = await call("POST", "/rooms/r/messages", { body: "hello" });
  assert.equal(res.status, 201);
  // From nobody (null), to everyone (null), kind "message": message()'s defaults.
  assert.deepEqual(times(res.body), message(1, "hello"));
  const nulls = await call("POST", "/rooms/r/messages", {
    from: null,
    to: null,
    body: 1,
  });
  assert.equal(nulls.status, 201);
  assert.equal((nulls.body as { to_agent: unknown }).to_agent, null);
});

const JSON_VALUES: [string, unknown][] = [
  ["a string that looks like a number", "42"],
  ["a number", 42],
  ["a float", -0.125],
  ["a big integer", 9007199254740991],
  ["null", null],
  ["true", true],
  ["false", false],
  ["an empty string", ""],
  ["an empty array", []],
  ["an empty object", {}],
  ["unicode", "héllo 🌍 \u2028 ünïcödé"],
  ["markup", "<script>alert(1)</script>"],
  ["a nested value", {
    a: [1, "2", { b: null, c: [true, { d: "e" }] }],
    "key with space": 1,
  }],
];

test("message bodies and state values of every JSON type come back exactly", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  for (const [name, value] of JSON_VALUES) {
    const posted = await call("POST", "/rooms/r/messages", { body: value });
    assert.equal(posted.status, 201, name);
    assert.deepEqual((posted.body as { body: unknown }).body, value, name);
    const put = await call("PUT", "/rooms/r/state", { key: name, value });
    assert.deepEqual((put.body as { value: unknown }).value, value, name);
    const got = await call(
      "GET",
      `/rooms/r/state?key=${encodeURIComponent(name)}`,
    );
    assert.deepEqual((got.body as { value: unknown }).value, value, name);
  }
  const read = await call("GET", "/rooms/r/messages");
  assert.deepEqual(
    (read.body as { body: unknown }[]).map((m) => m.body),
    JSON_VALUES.map(([, v]) => v),
  );
});

test("GET messages?after=2 returns only later messages, ascending", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const posted = [];
  for (let i = 1; i <= 5; i++) {
    posted.push((await call("POST", "/rooms/r/messages", { body: i })).body);
  }
  const res = await call("GET", "/rooms/r/messages?after=2");
  assert.equal(res.status, 200);
  assert.deepEqual(res.body, posted.slice(2));
  assert.deepEqual((await call("GET", "/rooms/r/messages")).body, posted);
  assert.deepEqual((await call("GET", "/rooms/r/messages?after=5")).body, []);
  assert.deepEqual(
    (await call("GET", "/rooms/r/messages?after=1&limit=2")).body,
    posted.slice(1, 3),
  );
});

test("GET messages?kind= returns only that kind", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const task = await call("POST", "/rooms/r/messages", {
    kind: "task",
    body: 1,
  });
  await call("POST", "/rooms/r/messages", { body: 2 });
  const task2 = await call("POST", "/rooms/r/messages", {
    kind: "task",
    body: 3,
  });
  const res = await call("GET", "/rooms/r/messages?kind=task");
  assert.deepEqual(res.body, [task.body, task2.body]);
  const after = await call(
    "GET",
    `/rooms/r/messages?kind=task&after=${(task.body as { id: number }).id}`,
  );
  assert.deepEqual(after.body, [task2.body]);
});

test("GET messages returns 100 by default and at most 1000", async ({ call, db }) => {
  await call("POST", "/rooms", { id: "r" });
  const client = await db.client();
  await client.execute(
    `WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1200)
     INSERT INTO messages (room_id, kind, body, created_at) SELECT 'r', 'message', i, 0 FROM n`,
  );
  const ids = async (q: string) =>
    ((await call("GET", `/rooms/r/messages${q}`)).body as { id: number }[]).map(
      (m) => m.id,
    );
  assert.deepEqual(await ids(""), Array.from({ length: 100 }, (_, i) => i + 1));
  assert.equal((await ids("?limit=1000")).length, 1000);
  const over = await call("GET", "/rooms/r/messages?limit=1001");
  assert.equal(over.status, 400, "1001 is rejected, not clamped");
  assert.deepEqual(
    await ids("?after=1150&limit=1000"),
    Array.from({ length: 50 }, (_, i) => i + 1151),
  );
});

test("message ids only grow, across rooms, and are never reused", async ({ call, db }) => {
  await call("POST", "/rooms", { id: "r1" });
  await call("POST", "/rooms", { id: "r2" });
  const id = async (room: string) =>
    ((await call("POST", `/rooms/${room}/messages`, { body: 0 })).body as {
      id: number;
    }).id;
  assert.deepEqual([await id("r1"), await id("r2"), await id("r1")], [1, 2, 3]);
  // Even with the newest row gone, the next id is higher (AUTOINCREMENT).
  await (await db.client()).execute("DELETE FROM messages WHERE id = 3");
  assert.equal(await id("r2"), 4);
});

test("50 parallel posts get 50 distinct ids in the order they committed", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const results = await Promise.all(
    Array.from(
      { length: 50 },
      (_, i) => call("POST", "/rooms/r/messages", { body: i }),
    ),
  );
  const ids = results.map((r) => (r.body as { id: number }).id);
  assert.equal(new Set(ids).size, 50);
  const read = (await call("GET", "/rooms/r/messages")).body as {
    id: number;
  }[];
  assert.deepEqual(read.map((m) => m.id), [...ids].sort((a, b) => a - b));
});

// ---- state ----

test("PUT state creates version 1 in _shared, then +1 on every write", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const first = await call("PUT", "/rooms/r/state", {
    key: "phase",
    value: "plan",
  });
  assert.equal(first.status, 200);
  assert.deepEqual(times(first.body), {
    room_id: "r",
    scope: "_shared",
    key: "phase",
    value: "plan",
    version: 1,
    updated_at: "<time>",
    expires_at: null,
    updated_by: null,
  });
  const second = await call("PUT", "/rooms/r/state", {
    scope: "_shared",
    key: "phase",
    value: "build",
  });
  assert.deepEqual(times(second.body), {
    room_id: "r",
    scope: "_shared",
    key: "phase",
    value: "build",
    version: 2,
    updated_at: "<time>",
    expires_at: null,
    updated_by: null,
  });
});

test("30 parallel writes to one key take versions 1 to 30, each once", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const results = await Promise.all(
    Array.from(
      { length: 30 },
      (_, i) => call("PUT", "/rooms/r/state", { key: "k", value: i }),
    ),
  );
  const versions = results.map((r) => (r.body as { version: number }).version)
    .sort((a, b) => a - b);
  assert.deepEqual(versions, Array.from({ length: 30 }, (_, i) => i + 1));
});

test("scopes keep keys apart", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  await call("PUT", "/rooms/r/state", { key: "k", value: "shared" });
  await call("PUT", "/rooms/r/state", {
    scope: "alice",
    key: "k",
    value: "mine",
  });
  const shared = await call("GET", "/rooms/r/state?key=k");
  const alice = await call("GET", "/rooms/r/state?scope=alice&key=k");
  assert.equal((shared.body as { value: unknown }).value, "shared");
  assert.equal(
    (alice.body as { value: unknown; version: number }).value,
    "mine",
  );
  assert.equal((alice.body as { version: number }).version, 1);
});

test("GET state lists the whole room, or one scope, ordered by scope and key", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  await call("POST", "/rooms", { id: "other" });
  await call("PUT", "/rooms/other/state", { key: "x", value: 0 });
  const b = await call("PUT", "/rooms/r/state", { key: "b", value: 1 });
  const a = await call("PUT", "/rooms/r/state", { key: "a", value: 2 });
  const z = await call("PUT", "/rooms/r/state", {
    scope: "alice",
    key: "z",
    value: 3,
  });
  const all = await call("GET", "/rooms/r/state");
  assert.equal(all.status, 200);
  assert.deepEqual(
    all.body,
    [a.body, b.body, z.body],
    "_shared sorts before alice",
  );
  assert.deepEqual((await call("GET", "/rooms/r/state?scope=_shared")).body, [
    a.body,
    b.body,
  ]);
  assert.deepEqual((await call("GET", "/rooms/r/state?scope=alice")).body, [
    z.body,
  ]);
  assert.deepEqual((await call("GET", "/rooms/r/state?scope=nobody")).body, []);
});

test("GET state?key= for a missing key is 404 key_not_found", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const res = await call("GET", "/rooms/r/state?scope=s&key=nope");
  assert.equal(res.status, 404);
  assert.deepEqual(times(res.body), {
    error: "key_not_found",
    message: 'Key "nope" does not exist in scope "s" of room "r"',
    scope: "s",
    key: "nope",
  });
});

test("DELETE state removes a key: deleted true, then false; a rewrite goes on from the delete's version (versions never start over)", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  await call("PUT", "/rooms/r/state", { key: "k", value: 1 });
  await call("PUT", "/rooms/r/state", { key: "k", value: 2 });
  const del = await call("DELETE", "/rooms/r/state", { key: "k" });
  assert.equal(del.status, 200);
  assert.deepEqual(del.body, { deleted: true });
  assert.equal((await call("GET", "/rooms/r/state?key=k")).status, 404);
  assert.deepEqual(
    (await call("DELETE", "/rooms/r/state", { scope: "_shared", key: "k" }))
      .body,
    {
      deleted: false,
    },
  );
  // 1, 2, the delete 3: a client that read version 1 before the delete cannot
  // overwrite the new entry by its number.
  const again = await call("PUT", "/rooms/r/state", { key: "k", value: 3 });
  assert.equal((again.body as { version: number }).version, 4);
});

// ---- bad input ----

type BadCase = [string, string, string, unknown, number, string, string?];

/** [name, method, path, body, status, code, field]: each on room "r" seeded by seedRoom. */
const BAD_INPUT: BadCase[] = [
  ["room id .", "POST", "/rooms", { id: "." }, 400, "invalid_request", "id"],
  ["room id ..", "POST", "/rooms", { id: ".." }, 400, "invalid_request", "id"],
  [
    "agent id ..",
    "POST",
    "/rooms/r/agents",
    { id: "..", name: "A" },
    400,
    "invalid_request",
    "id",
  ],
  [
    "agent name with U+0000",
    "POST",
    "/rooms/r/agents",
    '{"name":"\\u0000hidden"}',
    400,
    "invalid_request",
    "name",
  ],
  [
    "agent role with U+0000",
    "POST",
    "/rooms/r/agents",
    '{"name":"A","role":"work\\u0000er"}',
    400,
    "invalid_request",
    "role",
  ],
  [
    "state key with a lone surrogate",
    "PUT",
    "/rooms/r/state",
    '{"key":"\\ud800","value":1}',
    400,
    "invalid_request",
    "key",
  ],
  [
    "agent name with a lone surrogate",
    "POST",
    "/rooms/r/agents",
    '{"name":"a\\udc00"}',
    400,
    "invalid_request",
    "name",
  ],
  [
    "batch keys that SQLite would merge",
    "POST",
    "/rooms/r/batch",
    '{"state":[{"key":"\\ud800","value":1,"if_version":0},{"key":"\\udc00","value":2,"if_version":0}]}',
    400,
    "invalid_request",
    "state.0.key",
  ],
  [
    "room id with a space",
    "POST",
    "/rooms",
    { id: "a b" },
    400,
    "invalid_request",
    "id",
  ],
  [
    "room id too long",
    "POST",
    "/rooms",
    { id: "x".repeat(129) },
    400,
    "invalid_request",
    "id",
  ],
  ["empty room id", "POST", "/rooms", { id: "" }, 400, "invalid_request", "id"],
  [
    "room id a number",
    "POST",
    "/rooms",
    { id: 5 },
    400,
    "invalid_request",
    "id",
  ],
  [
    "unknown room field",
    "POST",
    "/rooms",
    { id: "x", locked: 1 },
    400,
    "invalid_request",
    "locked",
  ],
  ["room body an array", "POST", "/rooms", [], 400, "invalid_request"],
  ["room body a string", "POST", "/rooms", '"r"', 400, "invalid_request"],
  ["room body invalid JSON", "POST", "/rooms", "{id:", 400, "invalid_json"],
  [
    "agent without name",
    "POST",
    "/rooms/r/agents",
    { id: "b" },
    400,
    "invalid_request",
    "name",
  ],
  [
    "agent empty name",
    "POST",
    "/rooms/r/agents",
    { name: "" },
    400,
    "invalid_request",
    "name",
  ],
  [
    "agent name a number",
    "POST",
    "/rooms/r/agents",
    { name: 1 },
    400,
    "invalid_request",
    "name",
  ],
  [
    "agent bad id",
    "POST",
    "/rooms/r/agents",
    { id: "a/b", name: "x" },
    400,
    "invalid_request",
    "id",
  ],
  [
    "agent role null",
    "POST",
    "/rooms/r/agents",
    { name: "x", role: null },
    400,
    "invalid_request",
    "role",
  ],
  [
    "agent unknown field",
    "POST",
    "/rooms/r/agents",
    { name: "x", token: "t" },
    400,
    "invalid_request",
    "token",
  ],
  ["agent invalid JSON", "POST", "/rooms/r/agents", "{", 400, "invalid_json"],
  [
    "agent in missing room",
    "POST",
    "/rooms/nope/agents",
    { name: "x" },
    404,
    "room_not_found",
  ],
  [
    "agents of missing room",
    "GET",
    "/rooms/nope/agents",
    undefined,
    404,
    "room_not_found",
  ],
  [
    "bad room id in path",
    "GET",
    "/rooms/a%20b/agents",
    undefined,
    400,
    "invalid_request",
  ],
  [
    "message without body",
    "POST",
    "/rooms/r/messages",
    { from: "a" },
    400,
    "invalid_request",
    "body",
  ],
  [
    "message empty object",
    "POST",
    "/rooms/r/messages",
    {},
    400,
    "invalid_request",
    "body",
  ],
  [
    "message bad from",
    "POST",
    "/rooms/r/messages",
    { from: "a b", body: 1 },
    400,
    "invalid_request",
    "from",
  ],
  [
    "message to a number",
    "POST",
    "/rooms/r/messages",
    { to: 7, body: 1 },
    400,
    "invalid_request",
    "to",
  ],
  [
    "message kind with comma",
    "POST",
    "/rooms/r/messages",
    { kind: "a,b", body: 1 },
    400,
    "invalid_request",
    "kind",
  ],
  [
    "message kind null",
    "POST",
    "/rooms/r/messages",
    { kind: null, body: 1 },
    400,
    "invalid_request",
    "kind",
  ],
  [
    "message unknown field",
    "POST",
    "/rooms/r/messages",
    { body: 1, reply_too: 1 },
    400,
    "invalid_request",
    "reply_too",
  ],
  [
    "message number too big",
    "POST",
    "/rooms/r/messages",
    '{"body": 1e400}',
    400,
    "invalid_request",
    "body",
  ],
  [
    "message invalid JSON",
    "POST",
    "/rooms/r/messages",
    '{"body": }',
    400,
    "invalid_json",
  ],
  [
    "message trailing garbage",
    "POST",
    "/rooms/r/messages",
    '{"body": 1} x',
    400,
    "invalid_json",
  ],
  [
    "message to missing room",
    "POST",
    "/rooms/nope/messages",
    { body: 1 },
    404,
    "room_not_found",
  ],
  [
    "messages negative after",
    "GET",
    "/rooms/r/messages?after=-1",
    undefined,
    400,
    "invalid_request",
    "after",
  ],
  [
    "messages text after",
    "GET",
    "/rooms/r/messages?after=abc",
    undefined,
    400,
    "invalid_request",
    "after",
  ],
  [
    "messages fractional after",
    "GET",
    "/rooms/r/messages?after=1.5",
    undefined,
    400,
    "invalid_request",
    "after",
  ],
  [
    "messages empty after",
    "GET",
    "/rooms/r/messages?after=",
    undefined,
    400,
    "invalid_request",
    "after",
  ],
  [
    "messages huge after",
    "GET",
    "/rooms/r/messages?after=1e99",
    undefined,
    400,
    "invalid_request",
    "after",
  ],
  [
    "messages repeated after",
    "GET",
    "/rooms/r/messages?after=1&after=2",
    undefined,
    400,
    "invalid_request",
    "after",
  ],
  [
    "messages zero limit",
    "GET",
    "/rooms/r/messages?limit=0",
    undefined,
    400,
    "invalid_request",
    "limit",
  ],
  [
    "messages limit over 1000",
    "GET",
    "/rooms/r/messages?limit=1001",
    undefined,
    400,
    "invalid_request",
    "limit",
  ],
  [
    "messages negative limit",
    "GET",
    "/rooms/r/messages?limit=-5",
    undefined,
    400,
    "invalid_request",
    "limit",
  ],
  [
    "messages bad kind",
    "GET",
    "/rooms/r/messages?kind=a%20b",
    undefined,
    400,
    "invalid_request",
    "kind.0",
  ],
  [
    "messages unknown parameter",
    "GET",
    "/rooms/r/messages?afer=1",
    undefined,
    400,
    "invalid_request",
    "afer",
  ],
  [
    "messages of missing room",
    "GET",
    "/rooms/nope/messages",
    undefined,
    404,
    "room_not_found",
  ],
  [
    "state without key",
    "PUT",
    "/rooms/r/state",
    { value: 1 },
    400,
    "invalid_request",
    "key",
  ],
  [
    "state without value",
    "PUT",
    "/rooms/r/state",
    { key: "k" },
    400,
    "invalid_request",
    "value",
  ],
  [
    "state empty key",
    "PUT",
    "/rooms/r/state",
    { key: "", value: 1 },
    400,
    "invalid_request",
    "key",
  ],
  [
    "state key too long",
    "PUT",
    "/rooms/r/state",
    { key: "k".repeat(513), value: 1 },
    400,
    "invalid_request",
    "key",
  ],
  [
    "state key with newline",
    "PUT",
    "/rooms/r/state",
    { key: "a\nb", value: 1 },
    400,
    "invalid_request",
    "key",
  ],
  [
    "state key a number",
    "PUT",
    "/rooms/r/state",
    { key: 1, value: 1 },
    400,
    "invalid_request",
    "key",
  ],
  [
    "state bad scope",
    "PUT",
    "/rooms/r/state",
    { scope: "a b", key: "k", value: 1 },
    400,
    "invalid_request",
    "scope",
  ],
  [
    "state misspelt field",
    "PUT",
    "/rooms/r/state",
    { key: "k", value: 2, if_verison: 1 },
    400,
    "invalid_request",
    "if_verison",
  ],
  ["state invalid JSON", "PUT", "/rooms/r/state", "nope", 400, "invalid_json"],
  [
    "state in missing room",
    "PUT",
    "/rooms/nope/state",
    { key: "k", value: 1 },
    404,
    "room_not_found",
  ],
  [
    "state read bad scope",
    "GET",
    "/rooms/r/state?scope=a%20b",
    undefined,
    400,
    "invalid_request",
    "scope",
  ],
  [
    "state read unknown parameter",
    "GET",
    "/rooms/r/state?kee=k",
    undefined,
    400,
    "invalid_request",
    "kee",
  ],
  [
    "state read missing room",
    "GET",
    "/rooms/nope/state",
    undefined,
    404,
    "room_not_found",
  ],
  [
    "delete without key",
    "DELETE",
    "/rooms/r/state",
    {},
    400,
    "invalid_request",
    "key",
  ],
  [
    "delete with value",
    "DELETE",
    "/rooms/r/state",
    { key: "k", value: 1 },
    400,
    "invalid_request",
    "value",
  ],
  ["delete invalid JSON", "DELETE", "/rooms/r/state", "[", 400, "invalid_json"],
  [
    "delete in missing room",
    "DELETE",
    "/rooms/nope/state",
    { key: "k" },
    404,
    "room_not_found",
  ],
  [
    "viewer bad room id",
    "GET",
    "/?room=a%20b",
    undefined,
    400,
    "invalid_request",
    "room",
  ],
  ["unknown route", "GET", "/nope", undefined, 404, "not_found"],
  ["unknown method", "PATCH", "/rooms/r/state", { key: "k" }, 404, "not_found"],
];

for (const [name, method, path, body, status, code, field] of BAD_INPUT) {
  test(`bad input is ${status} ${code} and changes nothing: ${name}`, async ({ call }) => {
    await seedRoom(call);
    const before = await snapshot(call, "r");
    const res = await call(method, path, body);
    assert.equal(res.status, status);
    const error = res.body as Record<string, unknown>;
    assert.equal(error.error, code);
    assert.equal(typeof error.message, "string");
    assert.ok(
      String(error.message).length > 10,
      "the message says what went wrong",
    );
    if (field !== undefined) assert.equal(error.field, field);
    assert.deepEqual(await snapshot(call, "r"), before);
  });
}

test("an invalid request names every problem in issues[]", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const res = await call("POST", "/rooms/r/agents", {
    id: "a b",
    role: 5,
    extra: true,
  });
  assert.equal(res.status, 400);
  assert.deepEqual(times(res.body), {
    error: "invalid_request",
    message: 'Invalid request body: unknown field "extra"',
    field: "extra",
    issues: [
      { field: "extra", message: 'unknown field "extra"' },
      {
        field: "id",
        message: 'field "id" must be 1-128 characters of A-Z a-z 0-9 . _ : @ -',
      },
      { field: "name", message: 'field "name" is required' },
      {
        field: "role",
        message: 'field "role": expected string, received number',
      },
    ],
  });
});

test("a body nested deeper than 64 levels is 400, not a crash", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  for (const depth of [65, 10_000, 100_000]) {
    const res = await call(
      "POST",
      "/rooms/r/messages",
      `{"body":${"[".repeat(depth)}${"]".repeat(depth)}}`,
    );
    assert.equal(res.status, 400, `depth ${depth}`);
    assert.equal((res.body as { error: string }).error, "invalid_request");
  }
  const ok = await call("POST", "/rooms/r/messages", {
    body: JSON.parse("[".repeat(63) + "]".repeat(63)),
  });
  assert.equal(ok.status, 201);
});

test("a body over MAX_BODY_BYTES is 413 payload_too_large and writes nothing", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const big = { body: "x".repeat(300 * 1024) };
  const res = await call("POST", "/rooms/r/messages", big);
  assert.equal(res.status, 413);
  assert.deepEqual(times(res.body), {
    error: "payload_too_large",
    message: "The request body is over 262144 bytes",
    max_body_bytes: 262144,
  });
  assert.deepEqual((await call("GET", "/rooms/r/messages")).body, []);
  const fits = await call("POST", "/rooms/r/messages", {
    body: "x".repeat(200 * 1024),
  });
  assert.equal(fits.status, 201);
});

test(
  "the body limit also holds for a streamed body without content-length",
  async ({ app }) => {
    await app.request("/rooms", { method: "POST", body: '{"id":"r"}' });
    const chunk = new TextEncoder().encode("x".repeat(1024));
    let sent = 0;
    const stream = new ReadableStream<Uint8Array>({
      pull(controller) {
        if (sent++ < 2000) controller.enqueue(chunk);
        else controller.close();
      },
    });
    const res = await app.request("/rooms/r/messages", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: stream,
    });
    assert.equal(res.status, 413);
    assert.equal((await res.json()).error, "payload_too_large");
    assert.ok(sent < 2000, "the server stopped reading early");
  },
  { maxBodyBytes: 64 * 1024 },
);

// ---- viewer, usage, health ----

test("GET /?room= renders the room with every value escaped", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  await call("POST", "/rooms/r/agents", {
    id: "alice",
    name: "<b>Alice</b>",
    role: "planner",
  });
  await call("POST", "/rooms/r/messages", {
    from: "alice",
    kind: "task",
    body: "<script>alert(1)</script>",
  });
  await call("PUT", "/rooms/r/state", {
    key: "turn",
    value: { who: "<img src=x onerror=alert(1)>" },
  });
  await call("PUT", "/rooms/r/state", { key: "turn", value: "alice" });
  const res = await call("GET", "/?room=r", undefined, { accept: "text/html" });
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type") ?? "", /text\/html/);
  const html = String(res.body);
  assert.ok(html.startsWith("<!DOCTYPE html>"));
  // The rows travel as JSON for the page's module, with every "<" escaped: nothing
  // from the room is markup in the HTML.
  assert.ok(html.includes("\\u003cscript>alert(1)\\u003c/script>"));
  assert.ok(html.includes("\\u003cb>Alice\\u003c/b>"));
  assert.ok(!html.includes("<script>alert(1)"));
  assert.ok(!html.includes("<b>Alice"));
  const data = island(html);
  assert.deepEqual(
    data.agents.map((a: { name: string; role: string }) => [a.name, a.role]),
    [["<b>Alice</b>", "planner"]],
  );
  assert.deepEqual(
    data.messages.map((m: { id: number; body: unknown }) => [m.id, m.body]),
    [[1, "<script>alert(1)</script>"]],
  );
  assert.deepEqual(
    data.state.map((e: { key: string; version: number }) => [e.key, e.version]),
    [["turn", 2]],
  );
  assert.equal(data.after, 1, "the module resumes after the last message");
  assert.ok(html.includes('<script type="module" src="/viewer.js"'));
});

/** The viewer page's data island, parsed. */
function island(html: string) {
  const found = html.match(
    /<script id="room-data" type="application\/json">(.*?)<\/script>/,
  );
  assert.ok(found, "the page has its data island");
  return JSON.parse(found[1]);
}

test("the viewer's data island cannot be closed by a room id", async ({ call }) => {
  // Room ids cannot hold "<", but the island escapes it anyway; check the one value.
  await call("POST", "/rooms", { id: "r" });
  const html = String((await call("GET", "/?room=r")).body);
  assert.deepEqual(island(html), {
    room: "r",
    locked: false,
    after: 0,
    agents: [],
    messages: [],
    state: [],
  });
});

test("the viewer renders only the newest 200 messages and says how many there are", async ({ call, db }) => {
  await call("POST", "/rooms", { id: "r" });
  await (await db.client()).execute(
    `WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 250)
     INSERT INTO messages (room_id, kind, body, created_at) SELECT 'r', 'message', i, 0 FROM n`,
  );
  const html = String((await call("GET", "/?room=r")).body);
  assert.ok(html.includes("(last 200 of 250)"));
  const ids = island(html).messages.map((m: { id: number }) => m.id);
  assert.deepEqual([ids.length, ids[0], ids.at(-1)], [200, 51, 250]);
});

test("GET /?room= for a missing room is a 404 page", async ({ call }) => {
  const res = await call("GET", "/?room=ghost", undefined, {
    accept: "text/html",
  });
  assert.equal(res.status, 404);
  assert.ok(String(res.body).includes("No room"));
});

test("GET / answers markdown to agents and a page to browsers", async ({ call }) => {
  const md = await call("GET", "/", undefined, { accept: "*/*" });
  assert.equal(md.status, 200);
  assert.equal(md.headers.get("content-type"), "text/markdown; charset=utf-8");
  assert.ok(String(md.body).startsWith("# sync"));
  assert.ok(String(md.body).includes("http://localhost/rooms"));
  const page = await call("GET", "/", undefined, {
    accept: "text/html,application/xhtml+xml,*/*;q=0.8",
  });
  assert.equal(page.status, 200);
  assert.match(page.headers.get("content-type") ?? "", /text\/html/);
  assert.ok(String(page.body).includes('<form method="get" action="/">'));
});

test("the usage docs name every route of the app", async ({ app, call }) => {
  const docs = String((await call("GET", "/")).body);
  for (const route of app.routes) {
    if (route.method === "ALL" || route.path === "/") continue;
    assert.ok(
      docs.includes(`${route.method} ${route.path}`),
      `${route.method} ${route.path}`,
    );
  }
});

test("the usage docs and docs/GUIDE.md list every error code with its status", async ({ call }) => {
  const docs = String((await call("GET", "/")).body);
  const readme = await Deno.readTextFile(
    new URL("./docs/GUIDE.md", import.meta.url),
  );
  for (const [code, [status]] of Object.entries(ERRORS)) {
    const row = new RegExp(`\\|\\s*${status}\\s*\\|\\s*\`${code}\`\\s*\\|`);
    assert.match(docs, row, `docs: ${code}`);
    assert.match(readme, row, `docs/GUIDE.md: ${code}`);
  }
});

test("GET /healthz is 200 when the database answers", async ({ call }) => {
  const res = await call("GET", "/healthz");
  assert.equal(res.status, 200);
  assert.deepEqual(res.body, { ok: true });
});

test("GET /healthz is 503 database_unavailable when it does not", async () => {
  const db = new Db({ url: "file:/nonexistent-dir/x.db" });
  const app = createApp({ db });
  const res = await app.request("/healthz");
  assert.equal(res.status, 503);
  assert.equal((await res.json()).error, "database_unavailable");
});

test("the typed client hc<AppType> reaches the app", async ({ app }) => {
  const client = hc<AppType>("http://localhost", { fetch: app.request });
  const created = await client.rooms.$post({ json: { id: "typed" } });
  assert.equal(created.status, 201);
  const posted = await client.rooms[":id"].messages.$post({
    param: { id: "typed" },
    header: {},
    json: { body: { n: 1 } },
  });
  assert.equal(posted.status, 201);
  const read = await client.rooms[":id"].messages.$get({
    param: { id: "typed" },
    query: {},
  });
  const messages = await read.json();
  assert.ok(Array.isArray(messages));
  assert.deepEqual(messages.map((m) => m.body), [{ n: 1 }]);
});

// ---- queries ----

test("every query the API makes is served by an index, with no sort step", async ({ call, db }) => {
  const client = await db.client();
  const seen = new Map<string, { sql: string; args?: InArgs }>();
  const execute = client.execute.bind(client);
  // Records each distinct statement the handlers run.
  client.execute = ((stmt: InStatement) => {
    const { sql, args } = typeof stmt === "string"
      ? { sql: stmt, args: [] }
      : stmt;
    seen.set(sql, { sql, args });
    return execute(stmt);
  }) as typeof client.execute;
  await seedRoom(call);
  await call("POST", "/rooms", { id: "r" });
  await call("GET", "/rooms");
  await call("GET", "/rooms/r");
  await call("POST", "/rooms/r/agents", { id: "a", name: "again" });
  await call("GET", "/rooms/r/messages?after=0&limit=5");
  await call("GET", "/rooms/r/messages?kind=task");
  await call("GET", "/rooms/r/state?key=k");
  await call("GET", "/rooms/r/state?scope=_shared");
  await call("DELETE", "/rooms/r/state", { key: "k" });
  await call("GET", "/?room=r");
  client.execute = execute;
  assert.ok(seen.size >= 14, `saw ${seen.size} statements`);
  for (const stmt of seen.values()) {
    const plan = await client.execute({
      sql: `EXPLAIN QUERY PLAN ${stmt.sql}`,
      args: stmt.args,
    });
    const steps = plan.rows.map((row) => String(row.detail));
    for (const step of steps) {
      assert.ok(!step.includes("TEMP B-TREE"), `${stmt.sql}: ${step}`);
      // A full scan is right only for listing every room, and it walks an index.
      assert.ok(!/^SCAN \w+$/.test(step), `${stmt.sql}: ${step}`);
    }
  }
});

test("GET /rooms pages in creation order: limit (default 100, at most 1000) and after=<room id>", async ({ call }) => {
  for (let i = 0; i < 105; i++) {
    assert.equal(
      (await call("POST", "/rooms", { id: `p${String(i).padStart(3, "0")}` }))
        .status,
      201,
    );
  }
  await call("POST", "/rooms", { id: "hidden", locked: true });
  const ids = async (query: string) =>
    ((await call("GET", `/rooms${query}`)).body as { id: string }[]).map((r) =>
      r.id
    );
  const first = await ids("");
  assert.equal(first.length, 100);
  assert.equal(first[0], "p000");
  const rest = await ids(`?after=${first.at(-1)}`);
  assert.deepEqual(rest, ["p100", "p101", "p102", "p103", "p104"]);
  assert.deepEqual(await ids("?limit=2&after=p101"), ["p102", "p103"]);
  assert.deepEqual(await ids("?after=p104"), []);
  // A locked room is no cursor for those who cannot list it, as an unknown id is not.
  for (const after of ["hidden", "nope"]) {
    const res = await call("GET", `/rooms?after=${after}`);
    assert.equal(res.status, 400);
    assert.equal((res.body as { field: string }).field, "after");
  }
  for (const bad of ["limit=0", "limit=1001", "limit=x", "after=a%20b"]) {
    assert.equal((await call("GET", `/rooms?${bad}`)).status, 400, bad);
  }
});

test("a page of messages stops at the byte cap, with at least one message, and the cursor continues it", async ({ db }) => {
  const call = caller(
    createApp({ db, rateLimit: null, maxResponseBytes: 1500 }),
  );
  await call("POST", "/rooms", { id: "r" });
  const big = "é".repeat(150); // 300 bytes of UTF-8 in each body
  for (let i = 0; i < 10; i++) {
    await call("POST", "/rooms/r/messages", { body: { i, big } });
  }
  await call("POST", "/rooms/r/messages", { body: "x".repeat(3000) });
  const seen: number[] = [];
  let after = 0;
  for (let page = 0; page < 20; page++) {
    const res = await call("GET", `/rooms/r/messages?after=${after}`);
    const text = JSON.stringify(res.body);
    const messages = res.body as { id: number }[];
    if (messages.length === 0) break;
    // Over the cap only when one message alone is bigger than it.
    assert.ok(
      new TextEncoder().encode(text).length <= 1500 || messages.length === 1,
      `${messages.length} messages, ${text.length} characters`,
    );
    seen.push(...messages.map((m) => m.id));
    after = messages.at(-1)!.id;
  }
  assert.deepEqual(seen, Array.from({ length: 11 }, (_, i) => i + 1));
  // Context and the newest-first page keep the newest that fit.
  const context = await call("GET", "/rooms/r/context?messages=50");
  const items = (context.body as {
    messages: { items: { id: number }[]; total: number; next_after: number };
  }).messages;
  assert.deepEqual(items.items.map((m) => m.id), [11]);
  assert.equal(items.total, 11);
  assert.equal(items.next_after, 11);
  const limits = (await call("GET", "/limits")).body as {
    max_response_bytes: number;
  };
  assert.equal(limits.max_response_bytes, 1500);
});

test(
  "a body that has not arrived within the stall timeout is 408 request_timeout, and nothing is written",
  async ({ app, call }) => {
    assert.equal((await call("POST", "/rooms", { id: "r" })).status, 201);
    // A body that sends its first bytes and then nothing.
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new TextEncoder().encode('{"body":'));
      },
    });
    const started = performance.now();
    const res = await app.request("/rooms/r/messages", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body,
      duplex: "half",
    } as RequestInit);
    assert.equal(res.status, 408);
    assert.equal(res.headers.get("connection"), "close");
    const error = await res.json();
    assert.equal(error.error, "request_timeout");
    assert.ok(performance.now() - started < 2000);
    assert.deepEqual((await call("GET", "/rooms/r/messages")).body, []);
    // Served in-process, no listener of this process holds connections.
    const limits = (await call("GET", "/limits")).body as Record<
      string,
      unknown
    >;
    assert.equal(limits.max_connections, null);
    assert.equal(limits.stall_timeout_seconds, 0.2);
  },
  { stallMs: 200 },
);

Deno.test("a route that the input middleware would read wrongly is refused when it is defined", () => {
  // Never called: only defining the route is tested.
  const handler = (() => new Response()) as never;
  const define = (request: RouteConfig["request"]) =>
    api().openapi(
      createRoute({ method: "get", path: "/x", request, responses: {} }),
      handler,
    );
  // What the routes use is taken: lower-case headers, zod query and JSON body, and a
  // body of another type that its handler reads.
  define({
    headers: z.object({ "idempotency-key": z.string().optional() }),
    query: z.object({ n: z.string() }),
    body: { content: { "application/json": { schema: z.object({}) } } },
  });
  define({
    body: {
      content: { "application/x-ndjson": { schema: { type: "string" } } },
    },
  });
  assert.throws(
    () => define({ headers: z.object({ "Idempotency-Key": z.string() }) }),
    /lower case/,
  );
  assert.throws(
    () =>
      define({
        body: {
          content: { "application/json": { schema: { type: "object" } } },
        },
      }),
    /zod schema/,
  );
  assert.throws(
    () => define({ cookies: z.object({ session: z.string() }) }),
    /cookies/,
  );
});
