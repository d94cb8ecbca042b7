/**
 * History (who wrote each version of a key, the room's state at any message) and
 * export/import of a room, in-process on both database paths.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import { createApp } from "./main.ts";
import { sweep } from "./retention.ts";
import {
  appTest,
  type Call,
  caller,
  entry,
  freshDb,
  times,
} from "./testing.ts";

/** A test with its own app on a fresh database. */
const test = appTest;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

type Version = {
  version: number;
  value: unknown;
  deleted: boolean;
  updated_by: string | null;
  after_message: number;
};

/** The versions of a key, without their times. */
async function history(call: Call, key: string, query = "") {
  const res = await call("GET", `/rooms/r/state/history?key=${key}${query}`);
  assert.equal(res.status, 200, res.text);
  return (res.body as Version[]).map((v) => ({
    version: v.version,
    value: v.value,
    deleted: v.deleted,
    updated_by: v.updated_by,
    after_message: v.after_message,
  }));
}

async function post(call: Call, body: unknown = "m"): Promise<number> {
  const res = await call("POST", "/rooms/r/messages", { body });
  assert.equal(res.status, 201, res.text);
  return (res.body as { id: number }).id;
}

test("every write of a key is a version: who wrote it, and the newest message before it", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const joined = await call("POST", "/rooms/r/agents", {
    id: "ann",
    name: "A",
  });
  const token = (joined.body as { token: string }).token;
  const auth = { authorization: `Bearer ${token}` };
  const m1 = await post(call);
  // An agent token writes as its agent; `agent` names the writer otherwise.
  await call("PUT", "/rooms/r/state", { key: "n", value: 1 }, auth);
  await call("PUT", "/rooms/r/state", { key: "n", increment: 2, agent: "bob" });
  const m2 = await post(call);
  await call("PUT", "/rooms/r/state", { key: "n", value: { a: 1 } });
  await call("PUT", "/rooms/r/state", {
    key: "n",
    value: { b: 2 },
    merge: true,
    agent: "ann",
  }, auth);
  const batch = await call("POST", "/rooms/r/batch", {
    state: [{ key: "n", delete: true, agent: "bob" }],
    messages: [{ body: "done" }],
  });
  assert.equal(batch.status, 200, batch.text);
  const m3 = (batch.body as { messages: { id: number }[] }).messages[0].id;
  const written = await call("PUT", "/rooms/r/state", { key: "n", value: 9 });
  // The entry says who wrote it; versions went on past the delete.
  assert.deepEqual(times(written.body), {
    room_id: "r",
    scope: "_shared",
    key: "n",
    value: 9,
    version: 6,
    updated_at: "<time>",
    expires_at: null,
    updated_by: null,
  });
  assert.deepEqual(await history(call, "n"), [
    {
      version: 1,
      value: 1,
      deleted: false,
      updated_by: "ann",
      after_message: m1,
    },
    {
      version: 2,
      value: 3,
      deleted: false,
      updated_by: "bob",
      after_message: m1,
    },
    {
      version: 3,
      value: { a: 1 },
      deleted: false,
      updated_by: null,
      after_message: m2,
    },
    {
      version: 4,
      value: { a: 1, b: 2 },
      deleted: false,
      updated_by: "ann",
      after_message: m2,
    },
    // The batch's write comes before its message.
    {
      version: 5,
      value: null,
      deleted: true,
      updated_by: "bob",
      after_message: m2,
    },
    {
      version: 6,
      value: 9,
      deleted: false,
      updated_by: null,
      after_message: m3,
    },
  ]);
  // Pages: after a version, and a limit.
  assert.deepEqual(
    (await history(call, "n", "&after_version=2&limit=2")).map((v) =>
      v.version
    ),
    [3, 4],
  );
  assert.deepEqual(await history(call, "n", "&after_version=6"), []);
  assert.deepEqual(await history(call, "never"), []);
  // An agent token cannot name another writer.
  const mismatch = await call("PUT", "/rooms/r/state", {
    key: "n",
    value: 1,
    agent: "bob",
  }, auth);
  assert.equal(mismatch.status, 403);
  assert.equal((await history(call, "n")).length, 6, "nothing written");
});

test("a TTL that runs out is a version of its own, deleted by no one, before and after the key is written again", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  const m = await post(call);
  await call("PUT", "/rooms/r/state", { key: "lock", value: "a", ttl: 0.05 });
  await sleep(100);
  const expired = await call("GET", "/rooms/r/state/history?key=lock");
  const [first, expiry] = expired.body as (Version & {
    updated_at: string;
    expires_at: string | null;
  })[];
  assert.equal(
    first.expires_at,
    expiry.updated_at,
    "expired when its TTL said",
  );
  assert.deepEqual(
    { ...expiry, updated_at: "<time>" },
    {
      version: 2,
      value: null,
      deleted: true,
      updated_by: null,
      updated_at: "<time>",
      expires_at: null,
      after_message: m,
    },
  );
  const again = await call("PUT", "/rooms/r/state", {
    key: "lock",
    value: "b",
  });
  assert.equal((again.body as { version: number }).version, 3);
  const after = (await call("GET", "/rooms/r/state/history?key=lock"))
    .body as unknown[];
  assert.deepEqual(
    after.slice(0, 2),
    expired.body,
    "the same expiry, now kept",
  );
  assert.equal(after.length, 3);
});

test("state?at= reads the room as it was right after a message; a message of another room is 404", async ({ call }) => {
  await call("POST", "/rooms", { id: "r" });
  await call("POST", "/rooms", { id: "other" });
  await call("PUT", "/rooms/r/state", { key: "plan", value: "v1" });
  await call("PUT", "/rooms/r/state", { scope: "s", key: "x", value: 1 });
  const m1 = await post(call);
  await call("PUT", "/rooms/r/state", { key: "plan", value: "v2" });
  await call("DELETE", "/rooms/r/state", { scope: "s", key: "x" });
  await call("PUT", "/rooms/r/state", { key: "later", value: true });
  const m2 = await post(call);
  const at = async (query: string) => {
    const res = await call("GET", `/rooms/r/state?${query}`);
    return { status: res.status, body: times(res.body) };
  };
  const inScope = (
    scope: string,
    key: string,
    value: unknown,
    version: number,
  ) => entry(key, value, version, { scope });
  assert.deepEqual(await at(`at=${m1}`), {
    status: 200,
    body: [inScope("_shared", "plan", "v1", 1), inScope("s", "x", 1, 1)],
  });
  assert.deepEqual(await at(`at=${m2}`), {
    status: 200,
    body: [
      inScope("_shared", "later", true, 1),
      inScope("_shared", "plan", "v2", 2),
    ],
  });
  assert.deepEqual(await at(`at=${m1}&scope=s`), {
    status: 200,
    body: [inScope("s", "x", 1, 1)],
  });
  assert.deepEqual(await at(`at=${m1}&key=plan`), {
    status: 200,
    body: inScope("_shared", "plan", "v1", 1),
  });
  assert.equal((await at(`at=${m1}&key=later`)).status, 404);
  assert.equal((await at(`at=${m2}&scope=s&key=x`)).status, 404);
  const elsewhere = await call("POST", "/rooms/other/messages", { body: 1 });
  const foreign = (elsewhere.body as { id: number }).id;
  const missing = await at(`at=${foreign}`);
  assert.equal(missing.status, 404);
  assert.equal((missing.body as { error: string }).error, "message_not_found");
  const waits = await at(`at=${m1}&key=plan&after_version=1&wait=1`);
  assert.equal(waits.status, 400);
});

// ---- at= against a model ----

type Write =
  | { type: "put"; key: number; value: number | string; agent: boolean }
  | { type: "increment"; key: number; by: number; agent: boolean }
  | { type: "delete"; key: number; agent: boolean };
type Step =
  | Write
  | { type: "post" }
  | { type: "batch"; writes: Write[] };

/** Keys 0 and 1 hold numbers (incremented), key 2 text, in two scopes. */
const KEYS = [
  { scope: "_shared", key: "a" },
  { scope: "s1", key: "b" },
  { scope: "_shared", key: "c" },
];

const write: fc.Arbitrary<Write> = fc.oneof(
  fc.record({
    type: fc.constant("put" as const),
    key: fc.constantFrom(0, 1),
    value: fc.integer({ min: -5, max: 5 }),
    agent: fc.boolean(),
  }),
  fc.record({
    type: fc.constant("put" as const),
    key: fc.constant(2),
    value: fc.string({ maxLength: 3 }),
    agent: fc.boolean(),
  }),
  fc.record({
    type: fc.constant("increment" as const),
    key: fc.constantFrom(0, 1),
    by: fc.integer({ min: -3, max: 3 }),
    agent: fc.boolean(),
  }),
  fc.record({
    type: fc.constant("delete" as const),
    key: fc.constantFrom(0, 1, 2),
    agent: fc.boolean(),
  }),
);
const step: fc.Arbitrary<Step> = fc.oneof(
  { weight: 4, arbitrary: write },
  { weight: 2, arbitrary: fc.constant({ type: "post" as const }) },
  {
    weight: 1,
    arbitrary: fc.record({
      type: fc.constant("batch" as const),
      writes: fc.array(write, { minLength: 1, maxLength: 4 }),
    }),
  },
);

type ModelEntry = {
  value: unknown;
  version: number;
  updated_by: string | null;
};

/** The model: live entries, the version each absent key was deleted at, the log. */
class Model {
  entries = new Map<number, ModelEntry>();
  gone = new Map<number, number>();
  versions = new Map<number, unknown[]>(KEYS.map((_, i) => [i, []]));

  apply(w: Write): void {
    const was = this.entries.get(w.key);
    const by = w.agent ? "agent-x" : null;
    if (w.type === "delete") {
      if (!was) return;
      this.entries.delete(w.key);
      this.gone.set(w.key, was.version + 1);
      this.versions.get(w.key)!.push([was.version + 1, null, true, by]);
      return;
    }
    const version = (was?.version ?? this.gone.get(w.key) ?? 0) + 1;
    const value = w.type === "put"
      ? w.value
      : ((was?.value as number | undefined) ?? 0) + w.by;
    this.entries.set(w.key, { value, version, updated_by: by });
    this.versions.get(w.key)!.push([version, value, false, by]);
  }

  /** The live entries as `GET state` lists them (by scope, then key). */
  listed(): unknown[] {
    return [...this.entries]
      .map((
        [i, e],
      ) => [KEYS[i].scope, KEYS[i].key, e.value, e.version, e.updated_by])
      .sort((x, y) => `${x[0]}\n${x[1]}` < `${y[0]}\n${y[1]}` ? -1 : 1);
  }
}

function body(w: Write): Record<string, unknown> {
  const where = KEYS[w.key];
  const agent = w.agent ? { agent: "agent-x" } : {};
  if (w.type === "put") return { ...where, value: w.value, ...agent };
  if (w.type === "increment") return { ...where, increment: w.by, ...agent };
  return { ...where, ...agent };
}

Deno.test("state?at= for every message, and each key's history, equal a model of random writes, deletes, batches and posts", async () => {
  const { db, close } = await freshDb();
  const app = createApp({ db, rateLimit: null });
  const call = caller(app);
  let run = 0;
  try {
    await fc.assert(
      fc.asyncProperty(fc.array(step, { maxLength: 25 }), async (steps) => {
        const room = `m${++run}`;
        await call("POST", "/rooms", { id: room });
        const model = new Model();
        const seen: { id: number; listed: unknown[] }[] = [];
        for (const s of steps) {
          if (s.type === "post") {
            const res = await call("POST", `/rooms/${room}/messages`, {
              body: 1,
            });
            seen.push({
              id: (res.body as { id: number }).id,
              listed: model.listed(),
            });
          } else if (s.type === "batch") {
            const res = await call("POST", `/rooms/${room}/batch`, {
              state: s.writes.map((w) =>
                w.type === "delete" ? { ...body(w), delete: true } : body(w)
              ),
              messages: [{ body: "b" }],
            });
            assert.equal(res.status, 200, res.text);
            for (const w of s.writes) model.apply(w);
            const id =
              (res.body as { messages: { id: number }[] }).messages[0].id;
            seen.push({ id, listed: model.listed() });
          } else {
            const res = await call(
              s.type === "delete" ? "DELETE" : "PUT",
              `/rooms/${room}/state`,
              body(s),
            );
            assert.equal(res.status, 200, res.text);
            model.apply(s);
          }
        }
        for (const { id, listed } of seen) {
          const res = await call("GET", `/rooms/${room}/state?at=${id}`);
          assert.equal(res.status, 200, res.text);
          assert.deepEqual(
            (res.body as Record<string, unknown>[]).map((e) => [
              e.scope,
              e.key,
              e.value,
              e.version,
              e.updated_by,
            ]),
            listed,
            `at=${id}`,
          );
        }
        for (const [i, expected] of model.versions) {
          const { scope, key } = KEYS[i];
          const res = await call(
            "GET",
            `/rooms/${room}/state/history?scope=${scope}&key=${key}&limit=1000`,
          );
          assert.deepEqual(
            (res.body as Version[]).map((v) => [
              v.version,
              v.value,
              v.deleted,
              v.updated_by,
            ]),
            expected,
            `history of ${key}`,
          );
        }
      }),
      { numRuns: 40 },
    );
  } finally {
    await close();
  }
});

test("retention drops history older than the oldest kept message, and at= of kept messages is unchanged", async ({ call, db }) => {
  await call("POST", "/rooms", { id: "r" });
  const ids: number[] = [];
  for (let i = 1; i <= 5; i++) {
    await call("PUT", "/rooms/r/state", { key: "k", value: i });
    await call("PUT", "/rooms/r/state", { key: `only${i}`, value: i });
    ids.push(await post(call));
  }
  const before = await Promise.all(
    ids.slice(-2).map(async (id) =>
      (await call("GET", `/rooms/r/state?at=${id}`)).body
    ),
  );
  await sweep(db, { messages: 2, days: 0 });
  const after = await Promise.all(
    ids.slice(-2).map(async (id) =>
      (await call("GET", `/rooms/r/state?at=${id}`)).body
    ),
  );
  assert.deepEqual(after, before);
  // Version 4 of "k" was written before message 4, the oldest kept: it is the state
  // there, and versions 1-3 are no state at any kept message.
  assert.deepEqual((await history(call, "k")).map((v) => v.version), [4, 5]);
  assert.deepEqual((await history(call, "only1")).map((v) => v.version), [1]);
});

// ---- export and import ----

/** A room with agents, a thread, claims, a done task, state with history. */
async function seed(call: Call, id = "r", locked = false) {
  const made = await call("POST", "/rooms", {
    id,
    meta: { goal: "ship" },
    locked,
  });
  const token = (made.body as { token: string }).token;
  const auth = { authorization: `Bearer ${token}` };
  await call("POST", `/rooms/${id}/agents`, {
    id: "ann",
    name: "Ann",
    role: "lead",
  }, auth);
  await call("POST", `/rooms/${id}/agents`, { id: "bob", name: "Bob" }, auth);
  const task = await call("POST", `/rooms/${id}/messages`, {
    from: "ann",
    kind: "task",
    body: { do: "build" },
    max_attempts: 3,
  }, auth);
  const t = (task.body as { id: number }).id;
  await call("PUT", `/rooms/${id}/state`, {
    key: "phase",
    value: "plan",
    agent: "ann",
  }, auth);
  await call(
    "POST",
    `/rooms/${id}/messages/${t}/claim`,
    { agent: "bob" },
    auth,
  );
  await call("POST", `/rooms/${id}/messages`, {
    from: "bob",
    body: "on it",
    reply_to: t,
  }, auth);
  await call("POST", `/rooms/${id}/messages/${t}/complete`, {
    agent: "bob",
    result: { body: "built" },
  }, auth);
  await call(
    "PUT",
    `/rooms/${id}/state`,
    { key: "phase", value: "review" },
    auth,
  );
  await call("PUT", `/rooms/${id}/state`, {
    scope: "bob",
    key: "n",
    increment: 2,
  }, auth);
  await call("PUT", `/rooms/${id}/state`, { key: "gone", value: 1 }, auth);
  await call(
    "DELETE",
    `/rooms/${id}/state`,
    { key: "gone", agent: "ann" },
    auth,
  );
  await call("PUT", `/rooms/${id}/state`, {
    key: "lease",
    value: "x",
    ttl: 3600,
  }, auth);
  const open = await call("POST", `/rooms/${id}/messages`, {
    kind: "task",
    body: "open",
  }, auth);
  await call(
    "POST",
    `/rooms/${id}/messages/${(open.body as { id: number }).id}/claim`,
    {
      agent: "ann",
      lease: 600,
    },
    auth,
  );
  return auth;
}

async function exported(call: Call, id: string, headers = {}) {
  const res = await call("GET", `/rooms/${id}/export`, undefined, headers);
  assert.equal(res.status, 200, res.text);
  assert.match(res.headers.get("content-type") ?? "", /^application\/x-ndjson/);
  return res.text.trimEnd().split("\n").map((line) => JSON.parse(line));
}

/** An export with its room id and message ids made relative (they differ on import). */
function relative(lines: Record<string, unknown>[]) {
  const ids = lines.filter((l) => l.type === "message").map((l) =>
    l.id as number
  );
  const at = (id: unknown) => id === null ? null : ids.indexOf(id as number);
  const below = (id: number) => ids.filter((m) => m <= id).length;
  return lines.map((l) => {
    if (l.type === "room") return { ...l, id: "<room>" };
    if (l.type === "message") {
      return { ...l, id: at(l.id), reply_to: at(l.reply_to) };
    }
    if (l.type === "state_version") {
      return { ...l, after_message: below(l.after_message as number) };
    }
    return l;
  });
}

test("export → import → export is the same room but for its id, message ids and tokens", async ({ call }) => {
  await seed(call);
  const first = await exported(call, "r");
  assert.deepEqual(
    [...new Set(first.map((l) => l.type))],
    ["room", "agent", "message", "state", "state_version"],
  );
  const text = first.map((l) => JSON.stringify(l)).join("\n") + "\n";
  assert.ok(!/token|hash/.test(text), "no token or hash is exported");
  const made = await call("POST", "/rooms/import?id=copy", text, {
    "content-type": "application/x-ndjson",
  });
  assert.equal(made.status, 201, made.text);
  assert.deepEqual(times(made.body), {
    id: "copy",
    created_at: "<time>",
    meta: { goal: "ship" },
    locked: false,
    token: "<token>",
    view_token: "<token>",
    imported: { agents: 2, messages: 4, state: 4, state_versions: 6 },
  });
  const second = await exported(call, "copy");
  assert.deepEqual(relative(second), relative(first));
  // The room reads the same: messages with their status, state, and the past.
  const strip = (value: unknown) =>
    JSON.parse(
      JSON.stringify(value).replaceAll('"room_id":"copy"', '"room_id":"r"'),
    );
  const messages = async (id: string) =>
    ((await call("GET", `/rooms/${id}/messages`)).body as Record<
      string,
      unknown
    >[])
      .map(({ id: _, reply_to: __, ...m }) => m);
  assert.deepEqual(strip(await messages("copy")), await messages("r"));
  assert.deepEqual(
    strip((await call("GET", "/rooms/copy/state")).body),
    (await call("GET", "/rooms/r/state")).body,
  );
  const ids = async (id: string) =>
    ((await call("GET", `/rooms/${id}/messages`)).body as { id: number }[]).map(
      (m) => m.id,
    );
  const [old, fresh] = [await ids("r"), await ids("copy")];
  for (let i = 0; i < old.length; i++) {
    assert.deepEqual(
      strip((await call("GET", `/rooms/copy/state?at=${fresh[i]}`)).body),
      (await call("GET", `/rooms/r/state?at=${old[i]}`)).body,
      `the state at message ${i}`,
    );
  }
  // The new token is the room's; without ?id= the exported id is taken.
  const taken = await call("POST", "/rooms/import", text);
  assert.equal(taken.status, 409);
  assert.equal((taken.body as { error: string }).error, "room_exists");
});

test("a locked room exports only with a token of it, and comes back locked with new tokens", async ({ call }) => {
  const auth = await seed(call, "secret", true);
  assert.equal((await call("GET", "/rooms/secret/export")).status, 401);
  const lines = await exported(call, "secret", auth);
  const made = await call(
    "POST",
    "/rooms/import?id=secret2",
    lines.map((l) => JSON.stringify(l)).join("\n"),
  );
  assert.equal(made.status, 201, made.text);
  const { token, locked } = made.body as { token: string; locked: boolean };
  assert.equal(locked, true);
  assert.equal((await call("GET", "/rooms/secret2/messages")).status, 401);
  assert.equal(
    (await call("GET", "/rooms/secret2/messages", undefined, {
      authorization: `Bearer ${token}`,
    })).status,
    200,
  );
  // The old room's token is not the new room's.
  assert.equal(
    (await call("GET", "/rooms/secret2/messages", undefined, auth)).status,
    401,
  );
});

test(
  "an export is streamed in pages of at most MAX_RESPONSE_BYTES and holds every line",
  async ({ app, call }) => {
    await call("POST", "/rooms", { id: "r" });
    for (let i = 0; i < 30; i++) await post(call, "x".repeat(300));
    const res = await app.request("/rooms/r/export");
    const reader = res.body!.getReader();
    let chunks = 0;
    let text = "";
    const decoder = new TextDecoder();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks++;
      text += decoder.decode(value, { stream: true });
    }
    assert.ok(chunks >= 10, `${chunks} chunks`);
    const lines = text.trimEnd().split("\n").map((l) => JSON.parse(l));
    assert.equal(lines.filter((l) => l.type === "message").length, 30);
  },
  { maxResponseBytes: 1500 },
);

test("an import that is not a valid export is a 400 naming the first bad line, and writes nothing", async ({ call }) => {
  await seed(call);
  const lines = (await exported(call, "r")).map((l) => JSON.stringify(l));
  const message = lines.findIndex((l) => l.includes('"type":"message"'));
  const cases: [string, string, number][] = [
    ["empty", "", 1],
    ["not JSON", [lines[0], "{nope"].join("\n"), 2],
    ["no room first", lines.slice(1).join("\n"), 1],
    ["an unknown type", [lines[0], '{"type":"secret"}'].join("\n"), 2],
    [
      "a bad field",
      lines.map((l, i) =>
        i === message ? l.replace('"kind":"task"', '"kind":""') : l
      )
        .join("\n"),
      message + 1,
    ],
    [
      "an unknown field",
      lines.map((l, i) => i === 1 ? l.replace("{", '{"token":"x",') : l).join(
        "\n",
      ),
      2,
    ],
    [
      "messages out of order",
      [
        ...lines.slice(0, message),
        lines[message + 1],
        lines[message],
        ...lines.slice(message + 2),
      ]
        .join("\n"),
      message + 2,
    ],
    ["an agent twice", [lines[0], lines[1], lines[1]].join("\n"), 3],
    [
      "a format from the future",
      lines[0].replace('"format":1', '"format":2'),
      1,
    ],
  ];
  const rooms = (await call("GET", "/rooms")).body;
  for (const [name, text, line] of cases) {
    const res = await call("POST", "/rooms/import?id=bad", text);
    assert.equal(res.status, 400, `${name}: ${res.text}`);
    const error = res.body as { error: string; line: number; message: string };
    assert.equal(error.error, "invalid_request", name);
    assert.equal(error.line, line, `${name}: ${error.message}`);
    assert.match(error.message, new RegExp(`^Line ${line}: `), name);
  }
  assert.deepEqual(
    (await call("GET", "/rooms")).body,
    rooms,
    "nothing written",
  );
  assert.equal((await call("GET", "/rooms/bad")).status, 404);
});

test(
  "an import over MAX_IMPORT_BYTES is 413 and writes nothing",
  async ({ call }) => {
    await seed(call);
    const text = (await exported(call, "r")).map((l) => JSON.stringify(l)).join(
      "\n",
    );
    const res = await call("POST", "/rooms/import?id=big", text);
    assert.equal(res.status, 413);
    assert.equal(
      (res.body as { max_import_bytes: number }).max_import_bytes,
      1000,
    );
    assert.equal((await call("GET", "/rooms/big")).status, 404);
  },
  { maxImportBytes: 1000 },
);

test("an export read while the room was written imports as a consistent room: versions newer than their entry are left out, and the key takes writes", async ({ call }) => {
  await seed(call);
  const lines = (await exported(call, "r")).map((l) => JSON.stringify(l));
  // As if "phase" got version 3 between reading the entries and the versions, and
  // a key was made after the entries were read.
  const extra = [
    {
      type: "state_version",
      scope: "_shared",
      key: "phase",
      version: 3,
      value: "later",
      deleted: false,
      updated_by: null,
      updated_at: "2026-01-01T00:00:00.000Z",
      expires_at: null,
      after_message: 0,
    },
    {
      type: "state_version",
      scope: "_shared",
      key: "newer",
      version: 1,
      value: 1,
      deleted: false,
      updated_by: null,
      updated_at: "2026-01-01T00:00:00.000Z",
      expires_at: null,
      after_message: 0,
    },
  ].map((l) => JSON.stringify(l));
  const made = await call(
    "POST",
    "/rooms/import?id=racy",
    [...lines, ...extra].join("\n"),
  );
  assert.equal(made.status, 201, made.text);
  assert.equal(
    (made.body as { imported: { state_versions: number } }).imported
      .state_versions,
    6,
  );
  const put = await call("PUT", "/rooms/racy/state", {
    key: "phase",
    value: "next",
  });
  assert.equal(put.status, 200, put.text);
  assert.equal((put.body as { version: number }).version, 3);
  const versions = (await call(
    "GET",
    "/rooms/racy/state/history?key=phase",
  )).body as { version: number; value: unknown }[];
  assert.deepEqual(versions.map((v) => [v.version, v.value]), [
    [1, "plan"],
    [2, "review"],
    [3, "next"],
  ]);
});

test("an import nesting deeper than MAX_JSON_DEPTH is a 400 naming the line", async ({ call }) => {
  const room = JSON.stringify({
    type: "room",
    format: 1,
    id: "deep",
    created_at: "2026-01-01T00:00:00.000Z",
    meta: {},
    locked: false,
  });
  const deep = `{"type":"message","id":1,"body":${"[".repeat(100)}1${
    "]".repeat(100)
  }}`;
  const res = await call("POST", "/rooms/import", `${room}\n${deep}`);
  assert.equal(res.status, 400);
  assert.equal((res.body as { line: number }).line, 2);
  assert.equal((await call("GET", "/rooms/deep")).status, 404);
});

test("retention keeps every version of a room that dropped no message", async ({ call, db }) => {
  await call("POST", "/rooms", { id: "r" });
  for (let i = 1; i <= 3; i++) {
    await call("PUT", "/rooms/r/state", { key: "k", value: i });
  }
  await sweep(db, { messages: 1000, days: 0 });
  assert.deepEqual((await history(call, "k")).map((v) => v.version), [1, 2, 3]);
});
