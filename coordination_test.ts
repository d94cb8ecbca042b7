/**
 * In-process tests of the coordination features (SPEC §3): compare-and-set, counters,
 * merge, TTL, batches, threads and inbox filters, claims, idempotency, long-polls,
 * presence, context and the event stream. Every test runs on a fresh `:memory:`
 * database through `app.request()`.
 */
import assert from "node:assert/strict";
import { type Agent, type Message, type StateEntry } from "./db.ts";
import { notifierOf } from "./waiting.ts";
import {
  agent,
  type Api,
  appTest,
  type Call,
  entry,
  message,
  type Reply,
  times,
} from "./testing.ts";

/** A test with its own app on a fresh database, with room "r" created. */
function test(name: string, fn: (api: Api) => Promise<void>) {
  appTest(name, fn, { room: "r" });
}

/** The `times()` shape of an error with these details. */
function apiError(code: string, details: Record<string, unknown> = {}) {
  return { error: code, message: "<message>", ...details };
}

/** Asserts a 409 version_conflict naming the version asked for and the current entry. */
function assertConflict(
  res: Reply,
  expected_version: number,
  current: unknown,
) {
  assert.equal(res.status, 409, JSON.stringify(res.body));
  assert.deepEqual(
    times(res.body),
    apiError("version_conflict", { expected_version, current }),
  );
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Everything room "r" holds in messages and state, to show a refusal wrote nothing. */
async function snapshot(call: Call) {
  const [messages, state] = await Promise.all([
    call("GET", "/rooms/r/messages?limit=1000"),
    call("GET", "/rooms/r/state"),
  ]);
  return { messages: messages.body, state: state.body };
}

/** PUT state in room "r"; the reply, whatever its status. */
function putState(call: Call, body: Record<string, unknown>) {
  return call("PUT", "/rooms/r/state", body);
}

/** DELETE state in room "r"; the reply, whatever its status. */
function deleteState(call: Call, body: Record<string, unknown>) {
  return call("DELETE", "/rooms/r/state", body);
}

/** PUT state key "lock" with if_version 0: it takes the lock only when nobody holds it. */
function takeLock(call: Call, value: string) {
  return putState(call, { key: "lock", value, if_version: 0 });
}

/** PUT state in room "r", asserting 200; answers the entry. */
async function put(call: Call, body: Record<string, unknown>) {
  const res = await putState(call, body);
  assert.equal(res.status, 200, JSON.stringify(res.body));
  return res.body as StateEntry;
}

async function post(call: Call, body: Record<string, unknown>, room = "r") {
  const res = await call("POST", `/rooms/${room}/messages`, body);
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return res.body as Message;
}

/** Registers an agent; returns it as reads show it (the token is shown only here). */
async function register(call: Call, id: string) {
  const res = await call("POST", "/rooms/r/agents", { id, name: id });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  const { token, ...agent } = res.body as Agent & { token: string };
  assert.match(token, /^as_[A-Za-z0-9_-]{43}$/);
  return agent as Agent;
}

async function ids(call: Call, query: string): Promise<number[]> {
  const res = await call("GET", `/rooms/r/messages?${query}`);
  assert.equal(res.status, 200, `${query}: ${JSON.stringify(res.body)}`);
  return (res.body as Message[]).map((m) => m.id);
}

function count(replies: Reply[], status: number): number {
  return replies.filter((r) => r.status === status).length;
}

/** [name, method, path, body, status, code, field]: each on room "r". */
type BadCase = [string, string, string, unknown, number, string, string?];

/** Runs each case and checks the error code, the field, and that nothing was written. */
function badInput(section: string, cases: BadCase[]) {
  for (const [name, method, path, body, status, code, field] of cases) {
    test(`${section}: ${name} is ${status} ${code} and writes nothing`, async ({ call }) => {
      await post(call, { kind: "task", body: "seed" });
      await put(call, { key: "k", value: "text" });
      const before = await snapshot(call);
      const res = await call(method, path, body);
      assert.equal(res.status, status, JSON.stringify(res.body));
      const error = times(res.body) as Record<string, unknown>;
      assert.equal(error.error, code);
      if (field !== undefined) assert.equal(error.field, field);
      assert.deepEqual(await snapshot(call), before);
    });
  }
}

// ---- compare-and-set ----

test("PUT state with a matching if_version writes the next version", async ({ call }) => {
  await put(call, { key: "k", value: "a" });
  const res = await putState(call, { key: "k", value: "b", if_version: 1 });
  assert.equal(res.status, 200);
  assert.deepEqual(times(res.body), entry("k", "b", 2));
});

test("PUT state with a stale if_version is 409 version_conflict with the whole current entry and writes nothing", async ({ call }) => {
  await put(call, { key: "k", value: "a" });
  const current = await put(call, { key: "k", value: "b" });
  const res = await putState(call, { key: "k", value: "c", if_version: 1 });
  assertConflict(res, 1, entry("k", "b", 2));
  assert.deepEqual(
    (res.body as { current: unknown }).current,
    current,
    "current is the entry exactly as stored",
  );
  const now = await call("GET", "/rooms/r/state?key=k");
  assert.deepEqual(now.body, current);
});

test("PUT state with if_version on an absent key is 409 with current null", async ({ call }) => {
  const res = await putState(call, { key: "k", value: 1, if_version: 3 });
  assertConflict(res, 3, null);
  assert.equal((await call("GET", "/rooms/r/state?key=k")).status, 404);
});

test("PUT state with if_version 0 writes only when the key is absent", async ({ call }) => {
  const first = await takeLock(call, "me");
  assert.equal(first.status, 200);
  assert.deepEqual(times(first.body), entry("lock", "me", 1));
  const second = await takeLock(call, "you");
  assertConflict(second, 0, entry("lock", "me", 1));
  assert.deepEqual(
    (await call("GET", "/rooms/r/state?key=lock")).body,
    first.body,
  );
});

test("DELETE state with a matching if_version deletes; a stale one is 409 and the key stays", async ({ call }) => {
  await put(call, { key: "k", value: "a" });
  const current = await put(call, { key: "k", value: "b" });
  const stale = await deleteState(call, { key: "k", if_version: 1 });
  assertConflict(stale, 1, entry("k", "b", 2));
  assert.deepEqual((await call("GET", "/rooms/r/state?key=k")).body, current);
  const ok = await deleteState(call, { key: "k", if_version: 2 });
  assert.equal(ok.status, 200);
  assert.deepEqual(ok.body, { deleted: true });
  assert.equal((await call("GET", "/rooms/r/state?key=k")).status, 404);
  const absent = await deleteState(call, { key: "k", if_version: 2 });
  assertConflict(absent, 2, null);
});

test("of 20 parallel if_version 1 writers exactly one wins; the others get 409 with the winner's entry", async ({ call }) => {
  await put(call, { key: "k", value: -1 });
  const replies = await Promise.all(
    Array.from(
      { length: 20 },
      (_, i) => putState(call, { key: "k", value: i, if_version: 1 }),
    ),
  );
  assert.equal(count(replies, 200), 1);
  assert.equal(count(replies, 409), 19);
  const winner = replies.find((r) => r.status === 200)!.body as StateEntry;
  assert.equal(winner.version, 2);
  for (const loser of replies.filter((r) => r.status === 409)) {
    assert.deepEqual((loser.body as { current: unknown }).current, winner);
  }
  assert.deepEqual((await call("GET", "/rooms/r/state?key=k")).body, winner);
});

// ---- increment ----

test("PUT state increment: true adds 1, a number adds it (negative or fractional), a missing key starts at 0", async ({ call }) => {
  const steps: [unknown, number][] = [
    [true, 1],
    [5, 6],
    [-2.5, 3.5],
    [0.25, 3.75],
    [-10, -6.25],
    [0, -6.25],
  ];
  for (const [i, [increment, value]] of steps.entries()) {
    const res = await putState(call, { key: "n", increment });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.deepEqual(times(res.body), entry("n", value, i + 1));
  }
  const fresh = await putState(call, { scope: "s", key: "m", increment: -3 });
  assert.deepEqual(times(fresh.body), entry("m", -3, 1, { scope: "s" }));
});

test("increment adds exactly as a JSON number would, with no digits lost", async ({ call }) => {
  // SQLite's json_quote() prints reals with 15 significant digits, which rounds
  // 0.1 + 0.2 to 0.3 and turns 1/3 + 1 into 1.33333333333333.
  await put(call, { key: "third", value: 1 / 3 });
  const third = await put(call, { key: "third", increment: 1 });
  assert.equal(third.value, 1 / 3 + 1);
  await put(call, { key: "sum", value: 0.1 });
  const sum = await put(call, { key: "sum", increment: 0.2 });
  assert.equal(sum.value, 0.1 + 0.2);
});

test("increment keeps integer counters above 10^15 exact", async ({ call }) => {
  // The operand is bound as a REAL and json_quote() keeps 15 digits, so
  // 1234567890123456 + 1 came back as 1234567890123460.
  for (const start of [1234567890123456, 9007199254740990]) {
    await put(call, { key: `n${start}`, value: start });
    const next = await put(call, { key: `n${start}`, increment: 1 });
    assert.equal(next.value, start + 1);
  }
});

test("an increment past the largest finite number is refused, not stored as null", async ({ call }) => {
  const current = await put(call, { key: "n", value: 1e308 });
  const res = await putState(call, { key: "n", increment: 1e308 });
  assert.ok(
    res.status >= 400 && res.status < 500,
    `${res.status} ${JSON.stringify(res.body)}`,
  );
  assert.deepEqual((await call("GET", "/rooms/r/state?key=n")).body, current);
});

test("increment with if_version adds on a match and is 409 version_conflict on a mismatch", async ({ call }) => {
  await put(call, { key: "n", value: 10 });
  const ok = await putState(call, { key: "n", increment: 2, if_version: 1 });
  assert.deepEqual(times(ok.body), entry("n", 12, 2));
  const stale = await putState(call, { key: "n", increment: 2, if_version: 1 });
  assertConflict(stale, 1, entry("n", 12, 2));
});

for (
  const [name, value] of [
    ["a numeric string", "5"],
    ["an object", { n: 1 }],
    ["an array", [1]],
    ["null", null],
    ["a boolean", true],
  ] as [string, unknown][]
) {
  test(`increment on ${name} is 409 not_a_number with current and writes nothing`, async ({ call }) => {
    const current = await put(call, { key: "n", value });
    const res = await putState(call, { key: "n", increment: 1 });
    assert.equal(res.status, 409);
    assert.deepEqual(
      times(res.body),
      apiError("not_a_number", { current: entry("n", value, 1) }),
    );
    assert.deepEqual((await call("GET", "/rooms/r/state?key=n")).body, current);
  });
}

test("50 parallel increments of 1 add exactly 50", async ({ call }) => {
  await put(call, { key: "n", value: 7 });
  const replies = await Promise.all(
    Array.from(
      { length: 50 },
      () => putState(call, { key: "n", increment: 1 }),
    ),
  );
  assert.equal(count(replies, 200), 50);
  const versions = replies.map((r) => (r.body as StateEntry).version);
  assert.deepEqual(
    versions.toSorted((a, b) => a - b),
    Array.from({ length: 50 }, (_, i) => i + 2),
  );
  const final = await call("GET", "/rooms/r/state?key=n");
  assert.deepEqual(times(final.body), entry("n", 57, 51));
});

badInput("PUT state", [
  [
    "increment with value",
    "PUT",
    "/rooms/r/state",
    { key: "k", value: 1, increment: true },
    400,
    "invalid_request",
    "increment",
  ],
  [
    "merge with increment",
    "PUT",
    "/rooms/r/state",
    { key: "k", increment: 1, merge: true },
    400,
    "invalid_request",
    "merge",
  ],
  [
    "increment false",
    "PUT",
    "/rooms/r/state",
    { key: "k", increment: false },
    400,
    "invalid_request",
    "increment",
  ],
  [
    "increment a string",
    "PUT",
    "/rooms/r/state",
    { key: "k", increment: "1" },
    400,
    "invalid_request",
    "increment",
  ],
  [
    "merge not a boolean",
    "PUT",
    "/rooms/r/state",
    { key: "k", value: {}, merge: "yes" },
    400,
    "invalid_request",
    "merge",
  ],
  [
    "negative if_version",
    "PUT",
    "/rooms/r/state",
    { key: "k", value: 1, if_version: -1 },
    400,
    "invalid_request",
    "if_version",
  ],
  [
    "fractional if_version",
    "PUT",
    "/rooms/r/state",
    { key: "k", value: 1, if_version: 1.5 },
    400,
    "invalid_request",
    "if_version",
  ],
  [
    "if_version a string",
    "PUT",
    "/rooms/r/state",
    { key: "k", value: 1, if_version: "1" },
    400,
    "invalid_request",
    "if_version",
  ],
  [
    "zero ttl",
    "PUT",
    "/rooms/r/state",
    { key: "k", value: 1, ttl: 0 },
    400,
    "invalid_request",
    "ttl",
  ],
  [
    "negative ttl",
    "PUT",
    "/rooms/r/state",
    { key: "k", value: 1, ttl: -5 },
    400,
    "invalid_request",
    "ttl",
  ],
  [
    "delete field on PUT",
    "PUT",
    "/rooms/r/state",
    { key: "k", delete: true },
    400,
    "invalid_request",
    "delete",
  ],
  [
    "DELETE with a string if_version",
    "DELETE",
    "/rooms/r/state",
    { key: "k", if_version: "1" },
    400,
    "invalid_request",
    "if_version",
  ],
  [
    "DELETE with ttl",
    "DELETE",
    "/rooms/r/state",
    { key: "k", ttl: 1 },
    400,
    "invalid_request",
    "ttl",
  ],
]);

// ---- merge ----

test("PUT state merge applies an RFC 7386 merge patch to the current object", async ({ call }) => {
  await put(call, {
    key: "cfg",
    value: { a: 1, b: { c: 2, d: 3 }, e: [1, 2], f: "x" },
  });
  const res = await putState(call, {
    key: "cfg",
    value: { b: { c: null, g: 4 }, e: [3], f: null, h: { i: 1 } },
    merge: true,
  });
  assert.equal(res.status, 200);
  assert.deepEqual(
    times(res.body),
    entry("cfg", { a: 1, b: { d: 3, g: 4 }, e: [3], h: { i: 1 } }, 2),
  );
});

test("merge over a value that is not an object applies the patch to {}", async ({ call }) => {
  for (const [i, value] of [5, "text", [1, 2], null, true].entries()) {
    await put(call, { key: `k${i}`, value });
    const res = await putState(call, {
      key: `k${i}`,
      value: { a: 1, b: null, c: { d: null, e: 2 } },
      merge: true,
    });
    assert.equal(res.status, 200);
    assert.deepEqual(
      times(res.body),
      entry(`k${i}`, { a: 1, c: { e: 2 } }, 2),
      JSON.stringify(value),
    );
  }
});

test("merge on a missing key applies the patch to {}", async ({ call }) => {
  const res = await putState(call, {
    key: "cfg",
    value: { a: { b: null, c: 1 }, d: null, e: [null] },
    merge: true,
  });
  assert.equal(res.status, 200);
  assert.deepEqual(
    times(res.body),
    entry("cfg", { a: { c: 1 }, e: [null] }, 1),
  );
});

test("merge with a patch that is not an object replaces the value", async ({ call }) => {
  await put(call, { key: "cfg", value: { a: 1 } });
  for (const [i, patch] of [[1, 2], 7, "s"].entries()) {
    const res = await putState(call, { key: "cfg", value: patch, merge: true });
    assert.deepEqual(times(res.body), entry("cfg", patch, i + 2));
  }
});

// ---- TTL ----

test("an entry with ttl shows expires_at while live, then reads as absent", async ({ call }) => {
  const live = await put(call, { key: "lock", value: "me", ttl: 0.15 });
  await put(call, { key: "other", value: 1 });
  assert.deepEqual(
    times(live),
    entry("lock", "me", 1, { expires_at: "<time>" }),
  );
  assert.equal(
    Date.parse(live.expires_at!) - Date.parse(live.updated_at),
    150,
  );
  assert.deepEqual((await call("GET", "/rooms/r/state?key=lock")).body, live);
  const listed = await call("GET", "/rooms/r/state");
  assert.deepEqual(
    (listed.body as StateEntry[]).map((e) => e.key),
    ["lock", "other"],
  );
  await sleep(200);
  const gone = await call("GET", "/rooms/r/state?key=lock");
  assert.equal(gone.status, 404);
  assert.deepEqual(
    times(gone.body),
    apiError("key_not_found", { scope: "_shared", key: "lock" }),
  );
  for (const path of ["/rooms/r/state", "/rooms/r/state?scope=_shared"]) {
    const list = await call("GET", path);
    assert.deepEqual(times(list.body), [entry("other", 1, 1)]);
  }
});

test("if_version 0 takes over an expired entry; its expiry is a version, and the new entry the next", async ({ call }) => {
  await put(call, { key: "lock", value: "a", ttl: 0.1, if_version: 0 });
  const renewed = await put(call, {
    key: "lock",
    value: "a",
    ttl: 0.1,
    if_version: 1,
  });
  assert.equal(renewed.version, 2);
  const refused = await takeLock(call, "b");
  assert.equal(refused.status, 409);
  assert.deepEqual((refused.body as { current: unknown }).current, renewed);
  await sleep(150);
  const taken = await takeLock(call, "b");
  assert.equal(taken.status, 200);
  // 1, 2, the expiry 3, then 4.
  assert.deepEqual(times(taken.body), entry("lock", "b", 4));
});

test("a write without ttl clears the expiry", async ({ call }) => {
  await put(call, { key: "k", value: 1, ttl: 0.1 });
  const kept = await put(call, { key: "k", value: 2 });
  assert.deepEqual(times(kept), entry("k", 2, 2));
  await sleep(150);
  assert.deepEqual((await call("GET", "/rooms/r/state?key=k")).body, kept);
});

test("an expired entry is absent to if_version, increment, merge and DELETE", async ({ call }) => {
  for (const key of ["cas", "del", "n", "m", "plain"]) {
    await put(call, { key, value: key === "m" ? { old: 1 } : 10, ttl: 0.05 });
  }
  await sleep(100);
  const cas = await putState(call, { key: "cas", value: 1, if_version: 1 });
  assertConflict(cas, 1, null);
  const del = await deleteState(call, { key: "del", if_version: 1 });
  assertConflict(del, 1, null);
  const plainDelete = await deleteState(call, { key: "del" });
  assert.deepEqual(plainDelete.body, { deleted: false });
  // Each was version 1, its expiry 2; the write is 3.
  assert.deepEqual(
    times(await put(call, { key: "n", increment: 1 })),
    entry("n", 1, 3),
  );
  assert.deepEqual(
    times(await put(call, { key: "m", value: { new: 1 }, merge: true })),
    entry("m", { new: 1 }, 3),
  );
  assert.deepEqual(
    times(await put(call, { key: "plain", value: "x" })),
    entry("plain", "x", 3),
  );
});

// ---- batch ----

/** One conflict of a refused batch (scope `_shared`), as `times()` leaves it. */
function batchConflict(
  index: number,
  key: string,
  reason: "version_conflict" | "not_a_number",
  expected_version: number | null,
  current: unknown,
) {
  return { index, scope: "_shared", key, reason, expected_version, current };
}

test("POST batch applies state writes and appends messages, answering every result", async ({ call }) => {
  await put(call, { key: "a", value: 1 });
  await put(call, { key: "n", value: 5 });
  await put(call, { key: "m", value: { x: 1 } });
  await put(call, { key: "gone", value: true });
  const res = await call("POST", "/rooms/r/batch", {
    state: [
      { key: "a", value: 2, if_version: 1 },
      { key: "n", increment: true },
      { key: "m", value: { y: 2 }, merge: true },
      { key: "gone", delete: true },
      { key: "new", value: "v", if_version: 0, ttl: 60 },
      { key: "never", delete: true },
      { scope: "s", key: "c", increment: 3 },
    ],
    messages: [
      { from: "x", kind: "task", body: { do: 1 } },
      { to: "y", body: "two", reply_to: null },
    ],
  });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  const expected = {
    state: [
      entry("a", 2, 2),
      entry("n", 6, 2),
      entry("m", { x: 1, y: 2 }, 2),
      { room_id: "r", scope: "_shared", key: "gone", deleted: true },
      entry("new", "v", 1, { expires_at: "<time>" }),
      { room_id: "r", scope: "_shared", key: "never", deleted: false },
      entry("c", 3, 1, { scope: "s" }),
    ],
    messages: [
      message(1, { do: 1 }, { from_agent: "x", kind: "task" }),
      message(2, "two", { to_agent: "y" }),
    ],
  };
  assert.deepEqual(times(res.body), expected);
  const stored = await snapshot(call);
  assert.deepEqual(times(stored.messages), expected.messages);
  assert.deepEqual(times(stored.state), [
    entry("a", 2, 2),
    entry("m", { x: 1, y: 2 }, 2),
    entry("n", 6, 2),
    entry("new", "v", 1, { expires_at: "<time>" }),
    entry("c", 3, 1, { scope: "s" }),
  ]);
});

test("a batch with conflicts is 409 version_conflict listing every one, and writes nothing", async ({ call }) => {
  await post(call, { body: "before" });
  await put(call, { key: "a", value: 1 });
  await put(call, { key: "b", value: 1 });
  await put(call, { key: "b", value: 2 });
  await put(call, { key: "s", value: "text" });
  const before = await snapshot(call);
  const res = await call("POST", "/rooms/r/batch", {
    state: [
      { key: "a", value: 9, if_version: 1 },
      { key: "b", value: 9, if_version: 1 },
      { key: "c", value: 9, if_version: 3 },
      { key: "s", increment: 1 },
      { key: "new", value: 1 },
    ],
    messages: [{ body: "during" }],
  });
  assert.equal(res.status, 409);
  assert.deepEqual(
    times(res.body),
    apiError("version_conflict", {
      conflicts: [
        batchConflict(1, "b", "version_conflict", 1, entry("b", 2, 2)),
        batchConflict(2, "c", "version_conflict", 3, null),
        batchConflict(3, "s", "not_a_number", null, entry("s", "text", 1)),
      ],
    }),
  );
  assert.deepEqual(await snapshot(call), before);
});

test("a conflict on a key written earlier in the same batch reports a well-formed current entry", async ({ call }) => {
  const res = await call("POST", "/rooms/r/batch", {
    state: [
      { key: "x", value: 1, if_version: 0 },
      { key: "x", value: 2, if_version: 5 },
    ],
  });
  assert.equal(res.status, 409);
  const body = res.body as {
    conflicts: { current: Record<string, unknown> | null }[];
  };
  const current = body.conflicts[0]?.current;
  // Either what the database holds (nothing: the batch was not applied) or the entry
  // as the batch would have left it, but a real entry of room "r" with real times.
  const expected = current === null ? null : entry("x", 1, 1);
  if (current !== null) assert.deepEqual(times(current), expected);
  assert.deepEqual(times(res.body), {
    ...apiError("version_conflict"),
    conflicts: [batchConflict(1, "x", "version_conflict", 5, expected)],
  });
  assert.equal((await call("GET", "/rooms/r/state?key=x")).status, 404);
});

test("writes in one batch see each other, in order", async ({ call }) => {
  await put(call, { key: "a", value: "v1" });
  const res = await call("POST", "/rooms/r/batch", {
    state: [
      { key: "a", value: "x", if_version: 1 },
      { key: "a", value: "y", if_version: 2 },
      { key: "n", increment: 2 },
      { key: "n", increment: 3, if_version: 1 },
      { key: "m", value: { p: 1 }, merge: true },
      { key: "m", value: { q: 2 }, merge: true },
      { key: "d", value: 1, if_version: 0 },
      { key: "d", delete: true, if_version: 1 },
      { key: "d", value: "again", if_version: 0 },
    ],
  });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.deepEqual(times(res.body), {
    state: [
      entry("a", "x", 2),
      entry("a", "y", 3),
      entry("n", 2, 1),
      entry("n", 5, 2),
      entry("m", { p: 1 }, 1),
      entry("m", { p: 1, q: 2 }, 2),
      entry("d", 1, 1),
      { room_id: "r", scope: "_shared", key: "d", deleted: true },
      // The delete was version 2.
      entry("d", "again", 3),
    ],
    messages: [],
  });
  assert.deepEqual(times((await call("GET", "/rooms/r/state")).body), [
    entry("a", "y", 3),
    entry("d", "again", 3),
    entry("m", { p: 1, q: 2 }, 2),
    entry("n", 5, 2),
  ]);
});

test("a batch increment on a value that is not a number is 409 not_a_number and writes nothing", async ({ call }) => {
  await put(call, { key: "s", value: "text" });
  const before = await snapshot(call);
  const res = await call("POST", "/rooms/r/batch", {
    state: [{ key: "n", increment: 1 }, { key: "s", increment: 1 }],
    messages: [{ body: 1 }],
  });
  assert.equal(res.status, 409);
  assert.deepEqual(
    times(res.body),
    apiError("not_a_number", {
      conflicts: [
        batchConflict(1, "s", "not_a_number", null, entry("s", "text", 1)),
      ],
    }),
  );
  assert.deepEqual(await snapshot(call), before);
});

test("a batch message replying to a message that is not in the room is 400 and writes nothing", async ({ call }) => {
  await call("POST", "/rooms", { id: "other" });
  const foreign = await post(call, { body: "elsewhere" }, "other");
  await post(call, { body: "here" });
  const before = await snapshot(call);
  for (const replyTo of [99, foreign.id]) {
    const res = await call("POST", "/rooms/r/batch", {
      state: [{ key: "k", value: 1 }],
      messages: [{ body: "ok" }, { body: "reply", reply_to: replyTo }],
    });
    assert.equal(res.status, 400);
    assert.deepEqual(
      times(res.body),
      apiError("invalid_request", { field: "reply_to" }),
    );
    assert.deepEqual(await snapshot(call), before);
  }
});

test("a batch of exactly 100 operations is applied", async ({ call }) => {
  const res = await call("POST", "/rooms/r/batch", {
    state: Array.from({ length: 50 }, () => ({ key: "n", increment: 1 })),
    messages: Array.from({ length: 50 }, (_, i) => ({ body: i })),
  });
  assert.equal(res.status, 200);
  const body = res.body as { state: StateEntry[]; messages: Message[] };
  assert.deepEqual(
    body.state.map((e) => e.value),
    Array.from({ length: 50 }, (_, i) => i + 1),
  );
  assert.deepEqual(
    body.messages.map((m) => m.body),
    Array.from({ length: 50 }, (_, i) => i),
  );
});

badInput("POST batch", [
  ["an empty batch", "POST", "/rooms/r/batch", {}, 400, "invalid_request"],
  [
    "empty lists",
    "POST",
    "/rooms/r/batch",
    { state: [], messages: [] },
    400,
    "invalid_request",
  ],
  [
    "101 messages",
    "POST",
    "/rooms/r/batch",
    { messages: Array.from({ length: 101 }, () => ({ body: 1 })) },
    400,
    "invalid_request",
  ],
  [
    "51 writes and 50 messages",
    "POST",
    "/rooms/r/batch",
    {
      state: Array.from({ length: 51 }, (_, i) => ({ key: `k${i}`, value: 1 })),
      messages: Array.from({ length: 50 }, () => ({ body: 1 })),
    },
    400,
    "invalid_request",
  ],
  [
    "a misspelt write field",
    "POST",
    "/rooms/r/batch",
    { state: [{ key: "k", value: 1, if_verison: 1 }] },
    400,
    "invalid_request",
    "state.0.if_verison",
  ],
  [
    "a write without value",
    "POST",
    "/rooms/r/batch",
    { state: [{ key: "x", value: 1 }, { key: "k" }] },
    400,
    "invalid_request",
    "state.1.value",
  ],
  [
    "delete with a value",
    "POST",
    "/rooms/r/batch",
    { state: [{ key: "k", value: 1, delete: true }] },
    400,
    "invalid_request",
    "state.0.value",
  ],
  [
    "delete false",
    "POST",
    "/rooms/r/batch",
    { state: [{ key: "k", delete: false }] },
    400,
    "invalid_request",
    "state.0.delete",
  ],
  [
    "a message without body",
    "POST",
    "/rooms/r/batch",
    { messages: [{ kind: "task" }] },
    400,
    "invalid_request",
    "messages.0.body",
  ],
  [
    "an unknown top-level field",
    "POST",
    "/rooms/r/batch",
    { state: [{ key: "k", value: 1 }], message: [] },
    400,
    "invalid_request",
    "message",
  ],
  [
    "state not a list",
    "POST",
    "/rooms/r/batch",
    { state: { key: "k", value: 1 } },
    400,
    "invalid_request",
    "state",
  ],
  [
    "invalid JSON",
    "POST",
    "/rooms/r/batch",
    '{"state": [',
    400,
    "invalid_json",
  ],
  [
    "a missing room",
    "POST",
    "/rooms/nope/batch",
    { messages: [{ body: 1 }] },
    404,
    "room_not_found",
  ],
]);

test("of 10 parallel batches writing one key at if_version 1, exactly one wins", async ({ call }) => {
  await put(call, { key: "k", value: "start" });
  const replies = await Promise.all(
    Array.from({ length: 10 }, (_, i) =>
      call("POST", "/rooms/r/batch", {
        state: [
          { key: "k", value: i, if_version: 1 },
          { key: "n", increment: 1 },
        ],
        messages: [{ body: i }],
      })),
  );
  assert.equal(
    count(replies, 200),
    1,
    JSON.stringify(replies.map((r) => r.status)),
  );
  assert.equal(count(replies, 409), 9);
  const won = replies.find((r) => r.status === 200)!.body as {
    state: StateEntry[];
    messages: Message[];
  };
  const winner = won.state[0].value;
  for (const lost of replies.filter((r) => r.status === 409)) {
    assert.equal((lost.body as { error: string }).error, "version_conflict");
  }
  const stored = await snapshot(call);
  assert.deepEqual(
    (stored.messages as Message[]).map((m) => m.body),
    [winner],
  );
  assert.deepEqual(
    (stored.state as StateEntry[]).map((e) => [e.key, e.value, e.version]),
    [["k", winner, 2], ["n", 1, 1]],
  );
});

// ---- threads and inbox filters ----

test("reply_to must name a message of the same room", async ({ call }) => {
  await call("POST", "/rooms", { id: "other" });
  const root = await post(call, { body: "root" });
  const foreign = await post(call, { body: "elsewhere" }, "other");
  const before = await snapshot(call);
  for (const replyTo of [99, foreign.id]) {
    const res = await call("POST", "/rooms/r/messages", {
      body: "reply",
      reply_to: replyTo,
    });
    assert.equal(res.status, 400);
    assert.deepEqual(
      times(res.body),
      apiError("invalid_request", { field: "reply_to" }),
    );
  }
  assert.deepEqual(await snapshot(call), before);
  const reply = await call("POST", "/rooms/r/messages", {
    body: "reply",
    reply_to: root.id,
  });
  assert.equal(reply.status, 201);
  assert.deepEqual(times(reply.body), message(3, "reply", { reply_to: 1 }));
});

test("GET messages filters by kind list, from, to and for", async ({ call }) => {
  await post(call, { from: "a", kind: "task", body: 1 });
  await post(call, { from: "b", to: "a", kind: "chat", body: 2 });
  await post(call, { from: "a", to: "b", kind: "result", body: 3 });
  await post(call, { from: "b", kind: "chat", body: 4 });
  await post(call, { from: "c", to: "c", kind: "task", body: 5 });
  const cases: [string, number[]][] = [
    ["kind=task,result", [1, 3, 5]],
    ["kind=chat", [2, 4]],
    ["kind=nothing,chat", [2, 4]],
    ["from=a", [1, 3]],
    ["to=a", [2]],
    ["to=nobody", []],
    ["for=a", [1, 2, 4]],
    ["for=b", [1, 3, 4]],
    ["for=z", [1, 4]],
    ["kind=task&for=a", [1]],
    ["from=b&kind=chat&after=2", [4]],
    ["from=a&to=b", [3]],
  ];
  for (const [query, expected] of cases) {
    assert.deepEqual(await ids(call, query), expected, query);
  }
  const res = await call("GET", "/rooms/r/messages?for=a&kind=chat");
  assert.deepEqual(times(res.body), [
    message(2, 2, { from_agent: "b", to_agent: "a", kind: "chat" }),
    message(4, 4, { from_agent: "b", kind: "chat" }),
  ]);
});

test("GET messages?thread= returns the message and its replies, recursively", async ({ call }) => {
  await post(call, { body: "root" }); // 1
  await post(call, { body: "r1", reply_to: 1 }); // 2
  await post(call, { body: "other" }); // 3
  await post(call, { body: "r2", reply_to: 2 }); // 4
  await post(call, { body: "r3", reply_to: 1 }); // 5
  await post(call, { body: "o1", reply_to: 3 }); // 6
  await post(call, { body: "r4", reply_to: 4 }); // 7
  const cases: [string, number[]][] = [
    ["thread=1", [1, 2, 4, 5, 7]],
    ["thread=2", [2, 4, 7]],
    ["thread=3", [3, 6]],
    ["thread=7", [7]],
    ["thread=99", []],
    ["thread=1&after=4", [5, 7]],
    ["thread=1&limit=2", [1, 2]],
  ];
  for (const [query, expected] of cases) {
    assert.deepEqual(await ids(call, query), expected, query);
  }
  const res = await call("GET", "/rooms/r/messages?thread=2");
  assert.deepEqual(times(res.body), [
    message(2, "r1", { reply_to: 1 }),
    message(4, "r2", { reply_to: 2 }),
    message(7, "r4", { reply_to: 4 }),
  ]);
});

test("order=desc pages backwards from the newest with before", async ({ call }) => {
  for (let i = 1; i <= 5; i++) {
    await post(call, { kind: i % 2 ? "odd" : "even", body: i });
  }
  const cases: [string, number[]][] = [
    ["order=desc", [5, 4, 3, 2, 1]],
    ["order=desc&limit=2", [5, 4]],
    ["order=desc&limit=2&before=4", [3, 2]],
    ["order=desc&limit=2&before=2", [1]],
    ["order=desc&before=1", []],
    ["order=desc&kind=odd&before=5", [3, 1]],
    ["order=asc&before=3", [1, 2]],
    ["before=4&after=1", [2, 3]],
  ];
  for (const [query, expected] of cases) {
    assert.deepEqual(await ids(call, query), expected, query);
  }
});

badInput("GET messages", [
  [
    "an empty kind",
    "GET",
    "/rooms/r/messages?kind=",
    undefined,
    400,
    "invalid_request",
  ],
  [
    "an empty item in the kind list",
    "GET",
    "/rooms/r/messages?kind=a,,b",
    undefined,
    400,
    "invalid_request",
  ],
  [
    "a bad from",
    "GET",
    "/rooms/r/messages?from=a%20b",
    undefined,
    400,
    "invalid_request",
    "from",
  ],
  [
    "an empty to",
    "GET",
    "/rooms/r/messages?to=",
    undefined,
    400,
    "invalid_request",
    "to",
  ],
  [
    "a bad for",
    "GET",
    "/rooms/r/messages?for=a/b",
    undefined,
    400,
    "invalid_request",
    "for",
  ],
  [
    "thread 0",
    "GET",
    "/rooms/r/messages?thread=0",
    undefined,
    400,
    "invalid_request",
    "thread",
  ],
  [
    "a text thread",
    "GET",
    "/rooms/r/messages?thread=x",
    undefined,
    400,
    "invalid_request",
    "thread",
  ],
  [
    "before 0",
    "GET",
    "/rooms/r/messages?before=0",
    undefined,
    400,
    "invalid_request",
    "before",
  ],
  [
    "a negative before",
    "GET",
    "/rooms/r/messages?before=-1",
    undefined,
    400,
    "invalid_request",
    "before",
  ],
  [
    "an unknown order",
    "GET",
    "/rooms/r/messages?order=up",
    undefined,
    400,
    "invalid_request",
    "order",
  ],
  [
    "unclaimed=yes",
    "GET",
    "/rooms/r/messages?unclaimed=yes",
    undefined,
    400,
    "invalid_request",
    "unclaimed",
  ],
  [
    "unclaimed=1",
    "GET",
    "/rooms/r/messages?unclaimed=1",
    undefined,
    400,
    "invalid_request",
    "unclaimed",
  ],
  [
    "wait=51",
    "GET",
    "/rooms/r/messages?wait=51",
    undefined,
    400,
    "invalid_request",
    "wait",
  ],
  [
    "wait=50.5",
    "GET",
    "/rooms/r/messages?wait=50.5",
    undefined,
    400,
    "invalid_request",
    "wait",
  ],
  [
    "a negative wait",
    "GET",
    "/rooms/r/messages?wait=-1",
    undefined,
    400,
    "invalid_request",
    "wait",
  ],
  [
    "a text wait",
    "GET",
    "/rooms/r/messages?wait=soon",
    undefined,
    400,
    "invalid_request",
    "wait",
  ],
  [
    "a bad agent",
    "GET",
    "/rooms/r/messages?wait=1&agent=a%20b",
    undefined,
    400,
    "invalid_request",
    "agent",
  ],
  [
    "state wait=51",
    "GET",
    "/rooms/r/state?key=k&after_version=1&wait=51",
    undefined,
    400,
    "invalid_request",
    "wait",
  ],
  [
    "state wait without key",
    "GET",
    "/rooms/r/state?after_version=1&wait=1",
    undefined,
    400,
    "invalid_request",
    "key",
  ],
  [
    "a negative after_version",
    "GET",
    "/rooms/r/state?key=k&after_version=-1",
    undefined,
    400,
    "invalid_request",
    "after_version",
  ],
  [
    "a reply_to of 0",
    "POST",
    "/rooms/r/messages",
    { body: 1, reply_to: 0 },
    400,
    "invalid_request",
    "reply_to",
  ],
  [
    "a text reply_to",
    "POST",
    "/rooms/r/messages",
    { body: 1, reply_to: "1" },
    400,
    "invalid_request",
    "reply_to",
  ],
  [
    "a fractional reply_to",
    "POST",
    "/rooms/r/messages",
    { body: 1, reply_to: 1.5 },
    400,
    "invalid_request",
    "reply_to",
  ],
]);

// ---- claims ----

type Claimed = { claimed: boolean; message: Message };

/** POST claim on message 1 of room "r"; the reply, whatever its status. */
function claim(call: Call, body: Record<string, unknown>) {
  return call("POST", "/rooms/r/messages/1/claim", body);
}

/** POST release of message 1 of room "r" by `agent`; the reply, whatever its status. */
function release(call: Call, agent: string) {
  return call("POST", "/rooms/r/messages/1/release", { agent });
}

/** Message 1, "job", as `times()` leaves it while `agent` holds it. */
function heldJob(agent: string, more: Record<string, unknown>) {
  return message(1, "job", {
    claimed_by: agent,
    claimed_at: "<time>",
    status: "held",
    ...more,
  });
}

/** Asserts a 409 already_claimed whose body is exactly these holder fields. */
function assertAlreadyClaimed(
  res: Reply,
  holder: Pick<Message, "claimed_by" | "claimed_at" | "lease_expires_at">,
) {
  assert.equal(res.status, 409);
  assert.deepEqual(res.body, {
    docs: "http://localhost/README.md#coordination",
    error: "already_claimed",
    message: (res.body as { message: string }).message,
    ...holder,
  });
}

test("POST claim gives a message to an agent for a lease", async ({ call }) => {
  await post(call, { kind: "task", body: "job" });
  const res = await claim(call, { agent: "w1", lease: 30 });
  assert.equal(res.status, 200);
  const claimed = heldJob("w1", {
    kind: "task",
    lease_expires_at: "<time>",
    attempts: 1,
  });
  assert.deepEqual(times(res.body), { claimed: true, message: claimed });
  const held = (res.body as Claimed).message;
  assert.equal(
    Date.parse(held.lease_expires_at!) - Date.parse(held.claimed_at!),
    30_000,
  );
  assert.deepEqual((await call("GET", "/rooms/r/messages")).body, [held]);
});

test("a claim without lease holds until released", async ({ call }) => {
  await post(call, { body: "job" });
  const res = await claim(call, { agent: "w1" });
  assert.deepEqual(times(res.body), {
    claimed: true,
    message: heldJob("w1", { attempts: 1 }),
  });
});

test("a second agent's claim is 409 already_claimed naming the holder", async ({ call }) => {
  await post(call, { body: "job" });
  const first = await claim(call, { agent: "w1", lease: 30 });
  const held = (first.body as Claimed).message;
  const second = await claim(call, { agent: "w2", lease: 30 });
  assertAlreadyClaimed(second, {
    claimed_by: "w1",
    claimed_at: held.claimed_at,
    lease_expires_at: held.lease_expires_at,
  });
  assert.deepEqual(times(second.body), {
    ...apiError("already_claimed"),
    claimed_by: "w1",
    claimed_at: "<time>",
    lease_expires_at: "<time>",
  });
  assert.deepEqual((await call("GET", "/rooms/r/messages")).body, [held]);
});

test("the holder claiming again renews the lease and keeps claimed_at", async ({ call }) => {
  await post(call, { body: "job" });
  const first = await claim(call, { agent: "w1", lease: 0.2 });
  await sleep(50);
  const again = await claim(call, { agent: "w1", lease: 10 });
  assert.equal(again.status, 200);
  const a = (first.body as Claimed).message;
  const b = (again.body as Claimed).message;
  assert.equal(b.claimed_by, "w1");
  assert.equal(b.claimed_at, a.claimed_at);
  assert.ok(Date.parse(b.lease_expires_at!) > Date.parse(a.lease_expires_at!));
  await sleep(250);
  const other = await claim(call, { agent: "w2" });
  assert.equal(other.status, 409);
});

test("an expired lease frees the message: it reads as free and another agent can claim it", async ({ call }) => {
  await post(call, { body: "job" });
  await claim(call, { agent: "w1", lease: 0.1 });
  await sleep(150);
  assert.deepEqual(times((await call("GET", "/rooms/r/messages")).body), [
    message(1, "job", { attempts: 1 }),
  ]);
  const res = await claim(call, { agent: "w2", lease: 5 });
  assert.equal(res.status, 200);
  assert.deepEqual(times(res.body), {
    claimed: true,
    message: heldJob("w2", { lease_expires_at: "<time>", attempts: 2 }),
  });
});

test("release: the holder frees it, another agent is 409, a free message is released:false", async ({ call }) => {
  await post(call, { body: "job" });
  const held = ((await claim(call, { agent: "w1" })).body as Claimed).message;
  assertAlreadyClaimed(await release(call, "w2"), {
    claimed_by: "w1",
    claimed_at: held.claimed_at,
    lease_expires_at: null,
  });
  for (const released of [true, false]) {
    const res = await release(call, "w1");
    assert.equal(res.status, 200);
    assert.deepEqual(times(res.body), {
      released,
      message: message(1, "job", { attempts: 1 }),
    });
  }
  const reclaim = await claim(call, { agent: "w2" });
  assert.equal(reclaim.status, 200);
});

test("a claim or release of an unknown message is 404 message_not_found", async ({ call }) => {
  await call("POST", "/rooms", { id: "other" });
  const foreign = await post(call, { body: "x" }, "other");
  for (const id of [99, foreign.id]) {
    for (const action of ["claim", "release"]) {
      const res = await call("POST", `/rooms/r/messages/${id}/${action}`, {
        agent: "w1",
      });
      assert.equal(res.status, 404);
      assert.deepEqual(
        times(res.body),
        apiError("message_not_found", { message_id: id }),
      );
    }
  }
  const other = await call("GET", "/rooms/other/messages");
  assert.deepEqual(
    times(other.body),
    [{ ...message(1, "x"), room_id: "other" }],
  );
});

badInput("claims", [
  [
    "a claim without agent",
    "POST",
    "/rooms/r/messages/1/claim",
    {},
    400,
    "invalid_request",
    "agent",
  ],
  [
    "a claim with no body",
    "POST",
    "/rooms/r/messages/1/claim",
    undefined,
    400,
    "invalid_request",
    "agent",
  ],
  [
    "a claim with a bad agent",
    "POST",
    "/rooms/r/messages/1/claim",
    { agent: "a b" },
    400,
    "invalid_request",
    "agent",
  ],
  [
    "a zero lease",
    "POST",
    "/rooms/r/messages/1/claim",
    { agent: "w", lease: 0 },
    400,
    "invalid_request",
    "lease",
  ],
  [
    "a text lease",
    "POST",
    "/rooms/r/messages/1/claim",
    { agent: "w", lease: "10" },
    400,
    "invalid_request",
    "lease",
  ],
  [
    "a misspelt claim field",
    "POST",
    "/rooms/r/messages/1/claim",
    { agent: "w", leese: 10 },
    400,
    "invalid_request",
    "leese",
  ],
  [
    "a text message id",
    "POST",
    "/rooms/r/messages/abc/claim",
    { agent: "w" },
    400,
    "invalid_request",
  ],
  [
    "message id 0",
    "POST",
    "/rooms/r/messages/0/claim",
    { agent: "w" },
    400,
    "invalid_request",
  ],
  [
    "a release without agent",
    "POST",
    "/rooms/r/messages/1/release",
    {},
    400,
    "invalid_request",
    "agent",
  ],
  [
    "a release with a lease",
    "POST",
    "/rooms/r/messages/1/release",
    { agent: "w", lease: 1 },
    400,
    "invalid_request",
    "lease",
  ],
  [
    "a claim in a missing room",
    "POST",
    "/rooms/nope/messages/1/claim",
    { agent: "w" },
    404,
    "room_not_found",
  ],
]);

test("of 20 parallel claimers exactly one wins", async ({ call }) => {
  await post(call, { kind: "task", body: "job" });
  const replies = await Promise.all(
    Array.from(
      { length: 20 },
      (_, i) => claim(call, { agent: `w${i}`, lease: 30 }),
    ),
  );
  assert.equal(count(replies, 200), 1);
  assert.equal(count(replies, 409), 19);
  const winner = (replies.find((r) => r.status === 200)!.body as Claimed)
    .message;
  for (const lost of replies.filter((r) => r.status === 409)) {
    assert.equal(
      (lost.body as { claimed_by: string }).claimed_by,
      winner.claimed_by,
    );
  }
  assert.deepEqual((await call("GET", "/rooms/r/messages")).body, [winner]);
});

test("unclaimed=true leaves out held messages and includes expired claims", async ({ call }) => {
  for (const kind of ["task", "task", "task", "chat"]) {
    await post(call, { kind, body: kind });
  }
  await claim(call, { agent: "w1" });
  await call("POST", "/rooms/r/messages/2/claim", { agent: "w2", lease: 0.1 });
  assert.deepEqual(await ids(call, "unclaimed=true"), [3, 4]);
  assert.deepEqual(await ids(call, "unclaimed=true&kind=task"), [3]);
  assert.deepEqual(await ids(call, "unclaimed=false"), [1, 2]);
  await sleep(150);
  assert.deepEqual(await ids(call, "unclaimed=true"), [2, 3, 4]);
  assert.deepEqual(await ids(call, "unclaimed=false"), [1]);
  await release(call, "w1");
  assert.deepEqual(await ids(call, "unclaimed=true&kind=task"), [1, 2, 3]);
});

// ---- idempotency ----

test("a repeated Idempotency-Key on POST messages replays the first answer and writes nothing", async ({ call }) => {
  const headers = { "Idempotency-Key": "post-1" };
  const first = await call("POST", "/rooms/r/messages", { body: "a" }, headers);
  assert.equal(first.status, 201);
  assert.equal(first.headers.get("Idempotent-Replayed"), null);
  assert.deepEqual(times(first.body), message(1, "a"));
  const again = await call("POST", "/rooms/r/messages", { body: "a" }, headers);
  assert.equal(again.status, 201);
  assert.equal(again.headers.get("Idempotent-Replayed"), "true");
  assert.deepEqual(again.body, first.body);
  assert.deepEqual((await call("GET", "/rooms/r/messages")).body, [first.body]);
});

test("an Idempotency-Key reused for another request is 422 and writes nothing", async ({ call }) => {
  const headers = { "Idempotency-Key": "reuse-1" };
  const first = await call("POST", "/rooms/r/messages", { body: "a" }, headers);
  assert.equal(first.status, 201);
  for (
    const [path, body] of [
      ["/rooms/r/messages", { body: "b" }],
      ["/rooms/r/batch", { messages: [{ body: "a" }] }],
    ] as const
  ) {
    const res = await call("POST", path, body, headers);
    assert.equal(res.status, 422);
    assert.equal(
      (res.body as { error: string }).error,
      "idempotency_key_reused",
    );
  }
  assert.deepEqual((await call("GET", "/rooms/r/messages")).body, [first.body]);
});

test("an Idempotency-Key is scoped to its room", async ({ call }) => {
  await call("POST", "/rooms", { id: "other" });
  const headers = { "Idempotency-Key": "same" };
  const here = await call("POST", "/rooms/r/messages", { body: 1 }, headers);
  const there = await call(
    "POST",
    "/rooms/other/messages",
    { body: 2 },
    headers,
  );
  assert.equal(there.status, 201);
  assert.equal(there.headers.get("Idempotent-Replayed"), null);
  assert.deepEqual(times(there.body), { ...message(2, 2), room_id: "other" });
  assert.deepEqual((await call("GET", "/rooms/r/messages")).body, [here.body]);
  assert.deepEqual((await call("GET", "/rooms/other/messages")).body, [
    there.body,
  ]);
});

test("a repeated Idempotency-Key on POST batch replays the first answer and writes nothing", async ({ call }) => {
  const headers = { "Idempotency-Key": "batch-1" };
  const batch = {
    state: [{ key: "n", increment: 1 }],
    messages: [{ body: "x" }],
  };
  const first = await call("POST", "/rooms/r/batch", batch, headers);
  assert.equal(first.status, 200);
  assert.equal(first.headers.get("Idempotent-Replayed"), null);
  const again = await call("POST", "/rooms/r/batch", batch, headers);
  assert.equal(again.status, 200);
  assert.equal(again.headers.get("Idempotent-Replayed"), "true");
  assert.deepEqual(again.body, first.body);
  assert.deepEqual(times(await snapshot(call)), {
    messages: [message(1, "x")],
    state: [entry("n", 1, 1)],
  });
});

test("10 parallel posts with one Idempotency-Key write one message and all get it", async ({ call }) => {
  const replies = await Promise.all(
    Array.from(
      { length: 10 },
      () =>
        call("POST", "/rooms/r/messages", { body: "once" }, {
          "Idempotency-Key": "k",
        }),
    ),
  );
  assert.deepEqual(replies.map((r) => r.status), Array(10).fill(201));
  const stored = (await call("GET", "/rooms/r/messages")).body as Message[];
  assert.equal(stored.length, 1);
  for (const reply of replies) assert.deepEqual(reply.body, stored[0]);
  assert.equal(
    replies.filter((r) => r.headers.get("Idempotent-Replayed") === "true")
      .length,
    9,
  );
});

test("a retry with the Idempotency-Key of a refused post gets the same answer at once", async ({ call }) => {
  // A post refused after the key was taken (reply_to checked in SQL) must not leave the
  // key pending: a retry would wait and then be told the first request never finished.
  const headers = { "Idempotency-Key": "retry-1" };
  const bad = { body: "reply", reply_to: 99 };
  const first = await call("POST", "/rooms/r/messages", bad, headers);
  assert.equal(first.status, 400);
  const started = performance.now();
  const again = await call("POST", "/rooms/r/messages", bad, headers);
  const elapsed = performance.now() - started;
  assert.equal(again.status, 400, JSON.stringify(again.body));
  assert.deepEqual(again.body, first.body);
  assert.ok(elapsed < 1000, `answered in ${Math.round(elapsed)} ms`);
  assert.deepEqual((await call("GET", "/rooms/r/messages")).body, []);
});

test("an invalid Idempotency-Key is 400 invalid_request and writes nothing", async ({ call }) => {
  const before = await snapshot(call);
  for (
    const key of ["has space", "x".repeat(300), "y".repeat(256), "tab\tkey"]
  ) {
    for (
      const [path, body] of [
        ["/rooms/r/messages", { body: 1 }],
        ["/rooms/r/batch", { messages: [{ body: 1 }] }],
      ] as const
    ) {
      const res = await call("POST", path, body, { "Idempotency-Key": key });
      assert.equal(res.status, 400, `${path} with key ${JSON.stringify(key)}`);
      assert.equal((res.body as { error: string }).error, "invalid_request");
    }
  }
  assert.deepEqual(await snapshot(call), before);
  const longest = await call("POST", "/rooms/r/messages", { body: 1 }, {
    "Idempotency-Key": "z".repeat(255),
  });
  assert.equal(longest.status, 201);
});

// ---- long-poll ----

/** Runs `fn` and measures how long it took, in ms. */
async function timed<T>(fn: () => Promise<T>): Promise<[T, number]> {
  const started = performance.now();
  const result = await fn();
  return [result, performance.now() - started];
}

test("GET messages?wait=0.3 on an empty room answers [] after about 0.3 s", async ({ call }) => {
  const [res, elapsed] = await timed(() =>
    call("GET", "/rooms/r/messages?after=0&wait=0.3")
  );
  assert.equal(res.status, 200);
  assert.deepEqual(res.body, []);
  assert.ok(elapsed >= 250, `waited ${Math.round(elapsed)} ms`);
  assert.ok(elapsed < 2000, `waited ${Math.round(elapsed)} ms`);
});

test("GET messages?wait= answers at once when messages match already", async ({ call }) => {
  await post(call, { body: "here" });
  const [res, elapsed] = await timed(() =>
    call("GET", "/rooms/r/messages?after=0&wait=5")
  );
  assert.deepEqual(times(res.body), [message(1, "here")]);
  assert.ok(elapsed < 500, `answered in ${Math.round(elapsed)} ms`);
});

test("a waiting GET messages is woken by a message posted during the wait", async ({ call }) => {
  await post(call, { body: "old" });
  const [[res, posted], elapsed] = await timed(() =>
    Promise.all([
      call("GET", "/rooms/r/messages?after=1&wait=5"),
      sleep(100).then(() => post(call, { from: "a", body: "new" })),
    ])
  );
  assert.equal(res.status, 200);
  assert.deepEqual(res.body, [posted]);
  assert.deepEqual(times(res.body), [message(2, "new", { from_agent: "a" })]);
  assert.ok(elapsed >= 90, `answered in ${Math.round(elapsed)} ms`);
  assert.ok(elapsed < 1000, `answered in ${Math.round(elapsed)} ms`);
});

// Each waiter is not woken by `skipped`, posted at 50 ms, but is by `woken`, posted at
// `at` ms, and answers it alone.
const FILTERED_WAITERS = [
  {
    name:
      "a waiter filtered by kind=task is not woken by a chat message, but is by a task",
    query: "kind=task",
    skipped: { kind: "chat", body: "hi" },
    woken: { kind: "task", body: "do" },
    at: 300,
    expected: message(2, "do", { kind: "task" }),
  },
  {
    name:
      "a waiter with for=<agent> is woken by a message to it, not by one to another agent",
    query: "for=a",
    skipped: { to: "b", body: "for b" },
    woken: { to: "a", body: "for a" },
    at: 250,
    expected: message(2, "for a", { to_agent: "a" }),
  },
];

for (const { name, query, skipped, woken, at, expected } of FILTERED_WAITERS) {
  test(name, async ({ call }) => {
    const [[res], elapsed] = await timed(() =>
      Promise.all([
        call("GET", `/rooms/r/messages?after=0&${query}&wait=5`),
        sleep(50).then(() => post(call, skipped)),
        sleep(at).then(() => post(call, woken)),
      ])
    );
    assert.equal(res.status, 200);
    assert.deepEqual(times(res.body), [expected]);
    assert.ok(
      elapsed >= at - 20 && elapsed < 1300,
      `answered in ${Math.round(elapsed)} ms`,
    );
  });
}

test("a waiter for unclaimed tasks is woken when a claim is released", async ({ call }) => {
  await post(call, { kind: "task", body: "job" });
  await claim(call, { agent: "w1" });
  const [[res], elapsed] = await timed(() =>
    Promise.all([
      call("GET", "/rooms/r/messages?kind=task&unclaimed=true&wait=5"),
      sleep(100).then(() => release(call, "w1")),
    ])
  );
  assert.deepEqual(times(res.body), [
    message(1, "job", { kind: "task", attempts: 1 }),
  ]);
  assert.ok(elapsed < 1000, `answered in ${Math.round(elapsed)} ms`);
});

test("GET state?after_version=1&wait= answers when the key reaches version 2", async ({ call }) => {
  await put(call, { key: "turn", value: "a" });
  const [[res, written], elapsed] = await timed(() =>
    Promise.all([
      call("GET", "/rooms/r/state?key=turn&after_version=1&wait=5"),
      sleep(100).then(() => put(call, { key: "turn", value: "b" })),
    ])
  );
  assert.equal(res.status, 200);
  assert.deepEqual(res.body, written);
  assert.deepEqual(times(res.body), entry("turn", "b", 2));
  assert.ok(elapsed >= 90 && elapsed < 1000, `${Math.round(elapsed)} ms`);
});

test("a state waiter is not woken by writes to other keys or scopes", async ({ call }) => {
  await put(call, { key: "turn", value: "a" });
  const [[res, , , written], elapsed] = await timed(() =>
    Promise.all([
      call("GET", "/rooms/r/state?key=turn&after_version=1&wait=5"),
      sleep(50).then(() => put(call, { key: "other", value: 1 })),
      sleep(50).then(() => put(call, { scope: "s", key: "turn", value: 1 })),
      sleep(250).then(() => put(call, { key: "turn", value: "b" })),
    ])
  );
  assert.equal(res.status, 200);
  assert.deepEqual(res.body, written);
  assert.ok(elapsed >= 230 && elapsed < 1300, `${Math.round(elapsed)} ms`);
});

test("a state waiter answers 404 key_not_found when the key is deleted", async ({ call }) => {
  await put(call, { key: "lock", value: "a" });
  const [[res], elapsed] = await timed(() =>
    Promise.all([
      call("GET", "/rooms/r/state?key=lock&after_version=1&wait=5"),
      sleep(100).then(() => deleteState(call, { key: "lock" })),
    ])
  );
  assert.equal(res.status, 404);
  assert.deepEqual(
    times(res.body),
    apiError("key_not_found", { scope: "_shared", key: "lock" }),
  );
  assert.ok(elapsed < 1000, `${Math.round(elapsed)} ms`);
});

test("a state wait that times out returns the current entry", async ({ call }) => {
  const current = await put(call, { scope: "s", key: "k", value: 1 });
  const [res, elapsed] = await timed(() =>
    call("GET", "/rooms/r/state?scope=s&key=k&after_version=1&wait=0.3")
  );
  assert.equal(res.status, 200);
  assert.deepEqual(res.body, current);
  assert.ok(elapsed >= 250 && elapsed < 2000, `${Math.round(elapsed)} ms`);
});

test("a state wait on a version already passed answers at once", async ({ call }) => {
  await put(call, { key: "k", value: 1 });
  const current = await put(call, { key: "k", value: 2 });
  const [res, elapsed] = await timed(() =>
    call("GET", "/rooms/r/state?key=k&after_version=1&wait=5")
  );
  assert.deepEqual(res.body, current);
  assert.ok(elapsed < 500, `${Math.round(elapsed)} ms`);
});

test("a state waiter answers 404 when the key's TTL runs out", async ({ call }) => {
  // An expired entry reads as absent, so for a waiter it is gone like a deleted one.
  await put(call, { key: "lock", value: "a", ttl: 0.2 });
  const [res, elapsed] = await timed(() =>
    call("GET", "/rooms/r/state?key=lock&after_version=1&wait=1.5")
  );
  assert.equal(res.status, 404);
  assert.ok(elapsed < 1000, `answered after ${Math.round(elapsed)} ms`);
});

test("a waiter for unclaimed messages answers when a lease runs out", async ({ call }) => {
  await post(call, { kind: "task", body: "job" });
  await claim(call, { agent: "w1", lease: 0.2 });
  const [res, elapsed] = await timed(() =>
    call("GET", "/rooms/r/messages?kind=task&unclaimed=true&wait=1.5")
  );
  assert.deepEqual(times(res.body), [
    message(1, "job", { kind: "task", attempts: 1 }),
  ]);
  assert.ok(elapsed < 1000, `answered after ${Math.round(elapsed)} ms`);
});

test("an agent held in a wait shows as waiting, and afterwards its previous status", async ({ call }) => {
  await register(call, "a");
  await call("POST", "/rooms/r/agents/a/heartbeat", { status: "busy" });
  const statuses = async () =>
    ((await call("GET", "/rooms/r/agents")).body as Agent[]).map((a) =>
      a.status
    );
  const waiter = call("GET", "/rooms/r/messages?after=0&wait=5&agent=a");
  await sleep(100);
  assert.deepEqual(await statuses(), ["waiting"]);
  await post(call, { body: "wake" });
  assert.equal((await waiter).status, 200);
  assert.deepEqual(await statuses(), ["busy"]);
  const stateWaiter = call(
    "GET",
    "/rooms/r/state?key=k&after_version=0&wait=5&agent=a",
  );
  await sleep(100);
  assert.deepEqual(await statuses(), ["waiting"]);
  await put(call, { key: "k", value: 1 });
  assert.equal((await stateWaiter).status, 200);
  assert.deepEqual(await statuses(), ["busy"]);
});

test("a status an agent sends during its wait is the one it keeps afterwards", async ({ call }) => {
  await register(call, "a");
  const waiter = call("GET", "/rooms/r/messages?after=0&wait=5&agent=a");
  await sleep(100);
  const beat = await call("POST", "/rooms/r/agents/a/heartbeat", {
    status: "done",
  });
  assert.equal((beat.body as Agent).status, "done");
  await post(call, { body: "wake" });
  assert.equal((await waiter).status, 200);
  const [agent] = (await call("GET", "/rooms/r/agents")).body as Agent[];
  assert.equal(agent.status, "done");
});

// ---- presence ----

test("agents carry status active, last_seen and a growing idle_ms", async ({ call }) => {
  const res = await call("POST", "/rooms/r/agents", { id: "a", name: "A" });
  assert.equal(res.status, 201);
  assert.deepEqual(times(res.body), agent("a", "A", { token: "<token>" }));
  const registered = res.body as Agent;
  assert.equal(registered.last_seen, registered.joined_at);
  await sleep(60);
  const [listed] = (await call("GET", "/rooms/r/agents")).body as Agent[];
  assert.ok(listed.idle_ms >= 50, `idle_ms ${listed.idle_ms}`);
  assert.equal(listed.last_seen, registered.last_seen);
});

test("POST heartbeat sets status and last_seen; without status it keeps the status", async ({ call }) => {
  const joined = await register(call, "a");
  await sleep(20);
  const res = await call("POST", "/rooms/r/agents/a/heartbeat", {
    status: "busy",
  });
  assert.equal(res.status, 200);
  const beat = res.body as Agent;
  assert.deepEqual(times(beat), times({ ...joined, status: "busy" }));
  assert.ok(Date.parse(beat.last_seen) > Date.parse(joined.last_seen));
  assert.ok(beat.idle_ms < 20, `idle_ms ${beat.idle_ms}`);
  await sleep(20);
  const plain = await call("POST", "/rooms/r/agents/a/heartbeat", {});
  assert.equal((plain.body as Agent).status, "busy");
  assert.ok(
    Date.parse((plain.body as Agent).last_seen) > Date.parse(beat.last_seen),
  );
  for (const status of ["active", "idle", "waiting", "done"]) {
    const next = await call("POST", "/rooms/r/agents/a/heartbeat", { status });
    assert.equal((next.body as Agent).status, status);
  }
  const [listed] = (await call("GET", "/rooms/r/agents")).body as Agent[];
  assert.equal(listed.status, "done");
});

test("heartbeat for an unknown agent is 404 agent_not_found", async ({ call }) => {
  const res = await call("POST", "/rooms/r/agents/ghost/heartbeat", {
    status: "busy",
  });
  assert.equal(res.status, 404);
  assert.deepEqual(
    times(res.body),
    apiError("agent_not_found", { agent_id: "ghost" }),
  );
  assert.deepEqual((await call("GET", "/rooms/r/agents")).body, []);
});

badInput("heartbeat", [
  [
    "an unknown status",
    "POST",
    "/rooms/r/agents/a/heartbeat",
    { status: "sleeping" },
    400,
    "invalid_request",
    "status",
  ],
  [
    "a null status",
    "POST",
    "/rooms/r/agents/a/heartbeat",
    { status: null },
    400,
    "invalid_request",
    "status",
  ],
  [
    "an unknown field",
    "POST",
    "/rooms/r/agents/a/heartbeat",
    { state: "busy" },
    400,
    "invalid_request",
    "state",
  ],
  [
    "a bad agent id",
    "POST",
    "/rooms/r/agents/a%20b/heartbeat",
    {},
    400,
    "invalid_request",
  ],
  [
    "a missing room",
    "POST",
    "/rooms/nope/agents/a/heartbeat",
    {},
    404,
    "room_not_found",
  ],
]);

test("posting a message from an agent, alone or in a batch, updates its last_seen", async ({ call }) => {
  const joined = await register(call, "a");
  const b = await register(call, "b");
  await sleep(20);
  const posted = await post(call, { from: "a", body: 1 });
  const agents = async () =>
    Object.fromEntries(
      ((await call("GET", "/rooms/r/agents")).body as Agent[]).map((
        a,
      ) => [a.id, a.last_seen]),
    );
  const seen = await agents();
  assert.equal(seen.a, posted.created_at);
  assert.ok(Date.parse(seen.a) > Date.parse(joined.last_seen));
  assert.equal(seen.b, b.last_seen);
  await sleep(20);
  const batch = await call("POST", "/rooms/r/batch", {
    messages: [{ from: "b", body: 2 }],
  });
  const sent = (batch.body as { messages: Message[] }).messages[0];
  const after = await agents();
  assert.equal(after.b, sent.created_at);
  assert.equal(after.a, seen.a);
});

test("claiming counts as a heartbeat, and renewing a claim never moves last_seen back", async ({ call }) => {
  await register(call, "w1");
  await post(call, { kind: "task", body: "job" });
  await sleep(20);
  const first = await claim(call, { agent: "w1", lease: 30 });
  const lastSeen = async () =>
    ((await call("GET", "/rooms/r/agents")).body as Agent[])[0].last_seen;
  assert.equal(await lastSeen(), (first.body as Claimed).message.claimed_at);
  await sleep(30);
  const beat = await call("POST", "/rooms/r/agents/w1/heartbeat", {});
  const beatAt = (beat.body as Agent).last_seen;
  await sleep(30);
  const renewed = await claim(call, { agent: "w1", lease: 30 });
  assert.equal(renewed.status, 200);
  const now = await lastSeen();
  assert.ok(
    Date.parse(now) >= Date.parse(beatAt),
    `last_seen went back from ${beatAt} to ${now}`,
  );
});

// ---- context ----

test("GET context returns the room, agents, state and the newest N messages ascending", async ({ call }) => {
  await register(call, "a");
  await put(call, { key: "phase", value: "build" });
  await put(call, { scope: "a", key: "notes", value: [1] });
  for (let i = 1; i <= 5; i++) await post(call, { from: "a", body: i });
  const res = await call("GET", "/rooms/r/context?messages=3");
  assert.equal(res.status, 200);
  assert.deepEqual(times(res.body), {
    room: { id: "r", created_at: "<time>", meta: {}, locked: false },
    agents: [agent("a", "a")],
    state: [
      entry("phase", "build", 1),
      entry("notes", [1], 1, { scope: "a" }),
    ],
    messages: {
      items: [3, 4, 5].map((i) => message(i, i, { from_agent: "a" })),
      total: 5,
      next_after: 5,
    },
  });
  const all = (await call("GET", "/rooms/r/messages")).body as Message[];
  const items = (res.body as { messages: { items: Message[] } }).messages.items;
  assert.deepEqual(items, all.slice(2));
});

test("GET context?messages=0 gives no items and next_after the newest id", async ({ call }) => {
  const empty = await call("GET", "/rooms/r/context?messages=0");
  assert.deepEqual(
    (empty.body as { messages: unknown }).messages,
    { items: [], total: 0, next_after: 0 },
  );
  for (let i = 1; i <= 3; i++) await post(call, { body: i });
  const res = await call("GET", "/rooms/r/context?messages=0");
  assert.equal(res.status, 200);
  assert.deepEqual(
    (res.body as { messages: unknown }).messages,
    { items: [], total: 3, next_after: 3 },
  );
  const none = await call("GET", "/rooms/r/context");
  assert.deepEqual(
    (none.body as { messages: { next_after: number } }).messages.next_after,
    3,
  );
});

test("GET context gives the newest 50 messages by default and leaves out expired state", async ({ call }) => {
  await call("POST", "/rooms/r/batch", {
    messages: Array.from({ length: 60 }, (_, i) => ({ body: i + 1 })),
  });
  await put(call, { key: "brief", value: 1, ttl: 0.05 });
  await sleep(80);
  const res = await call("GET", "/rooms/r/context");
  const body = res.body as {
    state: unknown[];
    messages: { items: Message[]; total: number; next_after: number };
  };
  assert.deepEqual(
    body.messages.items.map((m) => m.id),
    Array.from({ length: 50 }, (_, i) => i + 11),
  );
  assert.equal(body.messages.total, 60);
  assert.equal(body.messages.next_after, 60);
  assert.deepEqual(body.state, []);
});

badInput("GET context", [
  [
    "messages=1001",
    "GET",
    "/rooms/r/context?messages=1001",
    undefined,
    400,
    "invalid_request",
    "messages",
  ],
  [
    "messages=-1",
    "GET",
    "/rooms/r/context?messages=-1",
    undefined,
    400,
    "invalid_request",
    "messages",
  ],
  [
    "messages=many",
    "GET",
    "/rooms/r/context?messages=many",
    undefined,
    400,
    "invalid_request",
    "messages",
  ],
  [
    "an unknown parameter",
    "GET",
    "/rooms/r/context?limit=5",
    undefined,
    400,
    "invalid_request",
    "limit",
  ],
  [
    "a missing room",
    "GET",
    "/rooms/nope/context",
    undefined,
    404,
    "room_not_found",
  ],
]);

// ---- stream (Server-Sent Events) ----

type SseEvent = { event?: string; id?: string; data: string };

/** Reads Server-Sent Events from a response body, one event at a time. */
class SseReader {
  readonly #reader: ReadableStreamDefaultReader<Uint8Array>;
  readonly #decoder = new TextDecoder();
  #buffer = "";

  constructor(body: ReadableStream<Uint8Array>) {
    this.#reader = body.getReader();
  }

  /** The next event (comments skipped); fails after `ms` without one. */
  async next(ms = 2000): Promise<SseEvent> {
    const deadline = Date.now() + ms;
    for (;;) {
      const end = this.#buffer.indexOf("\n\n");
      if (end >= 0) {
        const block = this.#buffer.slice(0, end);
        this.#buffer = this.#buffer.slice(end + 2);
        const event = parseEvent(block);
        if (event) return event;
        continue;
      }
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new Error("no event in time")),
          Math.max(0, deadline - Date.now()),
        );
      });
      try {
        const chunk = await Promise.race([this.#reader.read(), timeout]);
        if (chunk.done) throw new Error("the stream ended");
        this.#buffer += this.#decoder.decode(chunk.value, { stream: true });
      } finally {
        clearTimeout(timer);
      }
    }
  }

  /** Reads events until one matches, returning every event read on the way. */
  async until(match: (e: SseEvent) => boolean): Promise<SseEvent[]> {
    const seen: SseEvent[] = [];
    for (;;) {
      const event = await this.next();
      seen.push(event);
      if (match(event)) return seen;
    }
  }

  /** Cancels the stream, which ends the server's side of it. */
  async cancel(): Promise<void> {
    await this.#reader.cancel();
  }
}

function parseEvent(block: string): SseEvent | null {
  const event: SseEvent = { data: "" };
  const data: string[] = [];
  let fields = 0;
  for (const line of block.split("\n")) {
    if (line.startsWith(":") || line === "") continue;
    const colon = line.indexOf(":");
    const name = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    fields++;
    if (name === "event") event.event = value;
    else if (name === "id") event.id = value;
    else if (name === "data") data.push(value);
  }
  if (fields === 0) return null;
  event.data = data.join("\n");
  return event;
}

/**
 * Opens the room's stream, runs `fn` with a reader, and always cancels it and waits
 * until the server has let go of its subscription, so no timer outlives the test.
 */
async function withStream(
  { app, db }: Api,
  path: string,
  headers: Record<string, string>,
  fn: (events: SseReader, res: Response) => Promise<void>,
): Promise<void> {
  const res = await app.request(path, {
    headers: { "content-type": "application/json", ...headers },
  });
  assert.equal(res.status, 200);
  const events = new SseReader(res.body!);
  try {
    await fn(events, res);
  } finally {
    await events.cancel();
    for (let i = 0; i < 100 && notifierOf(db).size > 0; i++) await sleep(10);
    assert.equal(
      notifierOf(db).size,
      0,
      "the stream let go of its subscription",
    );
  }
}

const isMessage = (e: SseEvent) => e.event === "message";

test("GET stream sends the messages after N as message events with their ids, then new ones", async (api) => {
  const { call } = api;
  for (let i = 1; i <= 3; i++) await post(call, { body: i });
  await withStream(api, "/rooms/r/stream?after=1", {}, async (events, res) => {
    assert.match(res.headers.get("content-type") ?? "", /^text\/event-stream/);
    assert.equal(res.headers.get("X-Accel-Buffering"), "no");
    const backlog = [await events.next(), await events.next()];
    const stored = (await call("GET", "/rooms/r/messages?after=1"))
      .body as Message[];
    assert.deepEqual(
      backlog.map((e) => ({ ...e, data: JSON.parse(e.data) })),
      stored.map((m) => ({ event: "message", id: String(m.id), data: m })),
    );
    const posted = await post(call, { from: "a", body: "live" });
    const seen = await events.until((e) => e.id === String(posted.id));
    assert.deepEqual(seen.filter(isMessage).map((e) => e.id), ["4"]);
    assert.deepEqual(JSON.parse(seen.at(-1)!.data), posted);
  });
});

test("GET stream?status= sends only messages in those statuses; claim events carry every status change", async (api) => {
  const { call } = api;
  const open = await post(call, { kind: "task", body: "open" });
  const done = await post(call, { kind: "task", body: "done" });
  await call("POST", `/rooms/r/messages/${done.id}/claim`, { agent: "w" });
  await call("POST", `/rooms/r/messages/${done.id}/complete`, { agent: "w" });
  await withStream(api, "/rooms/r/stream?status=open", {}, async (events) => {
    const snapshot = await events.until((e) => e.event === "ready");
    assert.deepEqual(snapshot.filter(isMessage).map((e) => e.id), [
      String(open.id),
    ]);
    await call("POST", `/rooms/r/messages/${open.id}/claim`, { agent: "w" });
    const [claim] = await events.until((e) => e.event === "claim");
    assert.equal(JSON.parse(claim.data).status, "held");
    const next = await post(call, { kind: "task", body: "new" });
    const seen = await events.until(isMessage);
    assert.equal(seen.at(-1)!.id, String(next.id));
  });
});

test("GET stream with Last-Event-ID resumes after that id with no duplicate", async (api) => {
  const { call } = api;
  for (let i = 1; i <= 3; i++) await post(call, { body: i });
  await withStream(
    api,
    "/rooms/r/stream?after=0",
    { "Last-Event-ID": "2" },
    async (events) => {
      const first = await events.next();
      assert.equal(first.event, "message");
      assert.equal(first.id, "3");
      await call("POST", "/rooms/r/batch", {
        messages: [{ body: 4 }, { body: 5 }],
      });
      const seen = await events.until((e) => e.id === "5");
      assert.deepEqual(seen.filter(isMessage).map((e) => e.id), ["4", "5"]);
    },
  );
});

test("GET stream sends state events for writes and deletes, agent events for heartbeats", async (api) => {
  const { call } = api;
  const joined = await register(call, "a");
  await withStream(api, "/rooms/r/stream", {}, async (events) => {
    const hello = await events.next();
    assert.equal(hello.event, "agent");
    assert.deepEqual(JSON.parse(hello.data), {
      ...joined,
      idle_ms: JSON.parse(hello.data).idle_ms,
    });
    const written = await put(call, { key: "k", value: { v: 1 } });
    const state = (await events.until((e) => e.event === "state")).at(-1)!;
    assert.deepEqual(JSON.parse(state.data), written);
    const beat = await call("POST", "/rooms/r/agents/a/heartbeat", {
      status: "busy",
    });
    const agent = (await events.until((e) => e.event === "agent")).at(-1)!;
    assert.deepEqual(
      times(JSON.parse(agent.data)),
      times(beat.body),
    );
    assert.equal(JSON.parse(agent.data).status, "busy");
    await deleteState(call, { key: "k" });
    const deleted = (await events.until((e) => e.event === "state")).at(-1)!;
    assert.deepEqual(JSON.parse(deleted.data), {
      room_id: "r",
      scope: "_shared",
      key: "k",
      deleted: true,
    });
  });
});

test("GET stream sends a ready event after the backlog and the snapshot", async (api) => {
  const { call } = api;
  await post(call, { body: 1 });
  await put(call, { key: "k", value: 1 });
  await register(call, "a");
  await withStream(api, "/rooms/r/stream", {}, async (events) => {
    const opening = await events.until((e) => e.event === "ready");
    assert.deepEqual(opening.map((e) => e.event), [
      "message",
      "agent",
      "state",
      "ready",
    ]);
    assert.deepEqual(JSON.parse(opening[3].data), { room_id: "r", after: 1 });
  });
});

test("GET stream sends the current state when it opens", async (api) => {
  const { call } = api;
  const written = await put(call, { key: "k", value: 1 });
  await withStream(api, "/rooms/r/stream", {}, async (events) => {
    const first = await events.next();
    assert.deepEqual(first, { event: "state", data: JSON.stringify(written) });
  });
});

badInput("GET stream", [
  [
    "a text after",
    "GET",
    "/rooms/r/stream?after=x",
    undefined,
    400,
    "invalid_request",
    "after",
  ],
  [
    "an unknown parameter",
    "GET",
    "/rooms/r/stream?since=1",
    undefined,
    400,
    "invalid_request",
    "since",
  ],
  [
    "a missing room",
    "GET",
    "/rooms/nope/stream",
    undefined,
    404,
    "room_not_found",
  ],
]);

test("GET stream with a malformed Last-Event-ID is 400", async ({ call }) => {
  const res = await call("GET", "/rooms/r/stream", undefined, {
    "Last-Event-ID": "abc",
  });
  assert.equal(res.status, 400);
  assert.equal((res.body as { error: string }).error, "invalid_request");
});
