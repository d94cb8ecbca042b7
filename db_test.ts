/**
 * The database layer below the HTTP API: the embedded driver's group commit (sqlite.ts),
 * the JSON pages SQLite builds (db.ts, listMessagesJson), the file's settings, the
 * schema and its migrations (driver.ts), on the embedded and the remote path alike.
 */
import assert from "node:assert/strict";
import fc from "fast-check";
import { LibsqlBatchError, LibsqlError } from "@libsql/client/web";

import {
  claimMessage,
  completeMessage,
  createRoom,
  insertMessage,
  listMessages,
  listMessagesJson,
  type Message,
  type MessageFilter,
} from "./db.ts";
import {
  DatabaseUnavailable,
  Db,
  isUnavailable,
  MIGRATIONS,
  schemaVersion,
} from "./driver.ts";
import { startHranaServer } from "./tools/hrana_server.ts";
import { createApp } from "./main.ts";
import { sqlitePath } from "./sqlite.ts";
import { caller, freshDb, TEST_DATABASE } from "./testing.ts";

Deno.test("file: URLs name the file node:sqlite opens", () => {
  assert.equal(sqlitePath("file:sync.db"), "sync.db");
  assert.equal(sqlitePath("file:/tmp/a b.db"), "/tmp/a b.db");
  assert.equal(sqlitePath("file:///tmp/a%20b.db"), "/tmp/a b.db");
  assert.equal(sqlitePath("file://localhost/tmp/a.db"), "/tmp/a.db");
  assert.equal(sqlitePath(":memory:"), ":memory:");
  // What would silently open something else is refused.
  for (
    const url of [
      "file:",
      "file:sync.db?mode=ro",
      "file://sync.db",
      "file:/tmp/",
    ]
  ) {
    assert.throws(() => sqlitePath(url), Error, url);
  }
});

Deno.test("only database errors count as the database being unavailable", () => {
  assert.equal(isUnavailable(new TypeError("x is undefined")), false);
  assert.equal(isUnavailable(new DOMException("aborted")), false);
  assert.equal(isUnavailable(new LibsqlError("full", "SQLITE_FULL")), true);
  assert.equal(
    isUnavailable(new LibsqlError("unique", "SQLITE_CONSTRAINT")),
    false,
  );
  assert.equal(isUnavailable(new DatabaseUnavailable(new TypeError())), true);
});

Deno.test({
  name: "closing the database commits the writes still waiting for their group",
  ignore: TEST_DATABASE !== "embedded",
}, async () => {
  const dir = await Deno.makeTempDir();
  const url = `file:${dir}/close.db`;
  try {
    const db = new Db({ url });
    await createRoom(db, ROOM);
    const client = await db.client();
    const writes = Array.from({ length: 20 }, (_, i) =>
      client.execute({
        sql: `INSERT INTO messages (room_id, kind, body, created_at)
              VALUES ('r', 'message', ?, 0)`,
        args: [JSON.stringify(i)],
      }));
    db.close();
    assert.equal((await Promise.all(writes)).length, 20);
    const again = new Db({ url });
    const read = await listMessages(again, "r", { limit: 100, order: "asc" });
    assert.deepEqual(read.map((m) => m.body), [...Array(20).keys()]);
    again.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("writes issued together commit together, and one failing write fails alone", async () => {
  const { db, close } = await freshDb();
  try {
    const client = await db.client();
    await client.execute(
      "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL) STRICT",
    );
    const insert = (id: number, v: string | null) =>
      client.execute({
        sql: "INSERT INTO t (id, v) VALUES (?, ?)",
        args: [id, v],
      });
    const results = await Promise.allSettled([
      insert(1, "a"),
      insert(1, "duplicate"),
      insert(2, null),
      insert(3, "c"),
      client.batch([
        { sql: "INSERT INTO t (id, v) VALUES (?, ?)", args: [4, "d"] },
        { sql: "INSERT INTO t (id, v) VALUES (?, ?)", args: [3, "clash"] },
      ], "write"),
      client.batch([
        { sql: "INSERT INTO t (id, v) VALUES (?, ?)", args: [5, "e"] },
        { sql: "UPDATE t SET v = ? WHERE id = ?", args: ["E", 5] },
      ], "write"),
    ]);
    assert.deepEqual(results.map((r) => r.status), [
      "fulfilled",
      "rejected",
      "rejected",
      "fulfilled",
      "rejected",
      "fulfilled",
    ]);
    const failed = results.flatMap((r) =>
      r.status === "rejected" ? [r.reason] : []
    );
    for (const error of failed) assert.ok(error instanceof LibsqlError);
    assert.match(failed[0].code, /^SQLITE_CONSTRAINT/);
    assert.match(failed[1].code, /^SQLITE_CONSTRAINT/);
    // The batch names the statement that failed, and none of it stays.
    assert.ok(failed[2] instanceof LibsqlBatchError);
    assert.equal(failed[2].statementIndex, 1);
    const rows = (await client.execute("SELECT id, v FROM t ORDER BY id")).rows;
    assert.deepEqual(rows.map((r) => [Number(r.id), r.v]), [
      [1, "a"],
      [3, "c"],
      [5, "E"],
    ]);
  } finally {
    await close();
  }
});

// As @libsql/client binds them on a local file; node:sqlite alone binds every number as
// a real. (Over Hrana the client sends JS numbers as floats: embedded only.)
Deno.test({
  name: "whole numbers bind as integers and booleans as 0 and 1",
  ignore: TEST_DATABASE !== "embedded",
}, async () => {
  const { db, close } = await freshDb();
  try {
    const client = await db.client();
    const rs = await client.execute({
      sql: "SELECT typeof(?1) AS a, typeof(?2) AS b, ?3 AS c, typeof(?4) AS d",
      args: [5, 5.5, true, 7],
    });
    const [row] = rs.rows;
    assert.deepEqual([row.a, row.b, Number(row.c), row.d], [
      "integer",
      "real",
      1,
      "integer",
    ]);
  } finally {
    await close();
  }
});

const ROOM = {
  id: "r",
  meta: {},
  locked: false,
  token_hash: "t",
  view_token_hash: "v",
};

/** Any JSON value a client may send as a body (as it comes back from JSON.parse). */
const body = fc.jsonValue().map((value) => JSON.parse(JSON.stringify(value)));

Deno.test("a page built by SQLite is byte for byte the JSON of listMessages", async () => {
  const { db, close } = await freshDb();
  try {
    await createRoom(db, ROOM);
    const bodies = fc.sample(body, { numRuns: 150, seed: 7 });
    for (const [i, b] of bodies.entries()) {
      await insertMessage(db, "r", {
        from_agent: i % 3 === 0 ? null : `a${i % 4}`,
        to_agent: i % 5 === 0 ? "b" : null,
        kind: i % 2 === 0 ? "task" : "note",
        body: b,
        reply_to: i > 2 && i % 7 === 0 ? i - 2 : null,
        max_attempts: i % 6 === 0 ? 1 : null,
      });
    }
    // Held, expired and released claims: an expired lease reads as unclaimed. A
    // completed message (with a result), and a dead one (its one attempt lapsed).
    await claimMessage(db, "r", 3, "a1");
    await claimMessage(db, "r", 4, "a2", 3600);
    await claimMessage(db, "r", 5, "a3", 0.001);
    await claimMessage(db, "r", 7, "a1", 0.001);
    await claimMessage(db, "r", 8, "a1");
    await completeMessage(db, "r", 8, "a1", {
      body: { ok: true },
      kind: "result",
      to_agent: null,
    });
    await new Promise((resolve) => setTimeout(resolve, 5));
    const filters: MessageFilter[] = [
      { limit: 100, order: "asc", after: 0 },
      { limit: 1000, order: "asc", after: 40 },
      { limit: 7, order: "desc" },
      { limit: 50, order: "asc", kinds: ["task"], from: "a2" },
      { limit: 50, order: "asc", for: "b", statuses: ["open"] },
      { limit: 50, order: "asc", statuses: ["held"] },
      { limit: 50, order: "asc", statuses: ["done", "dead"] },
      { limit: 50, order: "asc", statuses: [] },
      { limit: 1000, order: "asc", after: 0, maxBytes: 4000 },
      { limit: 1000, order: "desc", maxBytes: 2500 },
      { limit: 1000, order: "asc", after: 0, maxBytes: 1 },
      { limit: 50, order: "asc", thread: 5 },
      { limit: 50, order: "asc", after: 10_000 },
    ];
    const compare = async (heads: string) => {
      for (const filter of filters) {
        const objects = await listMessages(db, "r", filter);
        const page = await listMessagesJson(db, "r", filter);
        assert.equal(
          page.json,
          JSON.stringify(objects),
          `${heads}: ${JSON.stringify(filter)}`,
        );
        assert.equal(page.count, objects.length);
      }
    };
    // Each message's head as written at insert (messageHead, in JS); then made by
    // SQLite for a row without one (an older instance's), as migration 5 makes them.
    await compare("heads written at insert");
    const client = await db.client();
    const stored = await client.execute("SELECT id, head FROM messages");
    await client.execute("UPDATE messages SET head = NULL");
    await compare("no heads");
    await client.execute(MIGRATIONS[3][1]);
    const migrated = await client.execute("SELECT id, head FROM messages");
    assert.deepEqual(
      migrated.rows,
      stored.rows,
      "migration 5 makes the same heads",
    );
  } finally {
    await close();
  }
});

Deno.test({
  name:
    "concurrent appends get distinct, increasing ids in the order they commit",
  ignore: TEST_DATABASE !== "embedded",
  async fn() {
    const { db, close } = await freshDb();
    try {
      await createRoom(db, ROOM);
      const inserted = await Promise.all(
        Array.from({ length: 300 }, (_, i) =>
          insertMessage(db, "r", {
            from_agent: null,
            to_agent: null,
            kind: "message",
            body: i,
            reply_to: null,
            max_attempts: null,
          })),
      );
      const ids = inserted.map((m) => m!.id);
      assert.deepEqual(ids, [...ids].sort((a, b) => a - b));
      assert.equal(new Set(ids).size, 300);
      assert.deepEqual(inserted.map((m) => m!.body), [...Array(300).keys()]);
    } finally {
      await close();
    }
  },
});

/** A JSON request to the app. */
function send(
  app: {
    request: (path: string, init?: RequestInit) => Response | Promise<Response>;
  },
  method: string,
  path: string,
  body?: unknown,
) {
  return app.request(path, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

Deno.test("a remote database that goes away answers 503 database_unavailable at once, and the service recovers when it returns", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/remote.db`;
  let server = await startHranaServer({ path });
  const port = Number(new URL(server.url).port);
  const db = new Db({ url: server.url, timeoutMs: 1000 });
  const app = createApp({ db, rateLimit: null });
  const errors = console.error;
  console.error = () => {};
  try {
    assert.equal((await send(app, "POST", "/rooms", { id: "r" })).status, 201);
    assert.equal(
      (await send(app, "POST", "/rooms/r/messages", { body: "before" })).status,
      201,
    );
    await server.close();
    const calls: [string, string, unknown?][] = [
      ["POST", "/rooms/r/messages", { body: "during" }],
      ["GET", "/rooms/r/messages?after=0"],
      ["PUT", "/rooms/r/state", { key: "k", value: 1 }],
      ["POST", "/rooms", { id: "other" }],
      ["GET", "/healthz"],
    ];
    for (const [method, url, body] of calls) {
      const started = performance.now();
      const res = await send(app, method, url, body);
      const ms = performance.now() - started;
      assert.equal(res.status, 503, `${method} ${url}`);
      assert.equal((await res.json()).error, "database_unavailable");
      assert.ok(ms < 500, `${method} ${url} took ${ms} ms`);
    }
    server = await startHranaServer({ path, port });
    // Failures are remembered for half a second; then the next request tries again.
    await new Promise((resolve) => setTimeout(resolve, 600));
    assert.equal((await send(app, "GET", "/healthz")).status, 200);
    const res = await send(app, "GET", "/rooms/r/messages?after=0");
    assert.equal(res.status, 200);
    assert.deepEqual((await res.json()).map((m: Message) => m.body), [
      "before",
    ]);
    assert.equal(
      (await send(app, "POST", "/rooms/r/messages", { body: "after" })).status,
      201,
    );
  } finally {
    console.error = errors;
    db.close();
    await server.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a remote database that accepts connections but never answers times out as 503", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const held: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const conn of listener) held.push(conn);
  })();
  const db = new Db({
    url: `http://127.0.0.1:${listener.addr.port}`,
    timeoutMs: 300,
  });
  const app = createApp({ db, rateLimit: null });
  const errors = console.error;
  console.error = () => {};
  try {
    const started = performance.now();
    const res = await send(app, "POST", "/rooms", { id: "r" });
    const ms = performance.now() - started;
    assert.equal(res.status, 503);
    assert.equal((await res.json()).error, "database_unavailable");
    assert.ok(ms >= 250 && ms < 1500, `took ${ms} ms`);
    // Meanwhile others are answered at once rather than each waiting.
    const again = performance.now();
    assert.equal((await send(app, "GET", "/rooms/r")).status, 503);
    assert.ok(performance.now() - again < 100);
  } finally {
    console.error = errors;
    db.close();
    listener.close();
    for (const conn of held) conn.close();
    await accepting.catch(() => {});
  }
});

Deno.test({
  name:
    "a local database that refuses writes answers 503 database_unavailable, writes nothing, and serves again when it accepts them",
  ignore: TEST_DATABASE !== "embedded",
}, async () => {
  const dir = await Deno.makeTempDir();
  const db = new Db({ url: `file:${dir}/local.db` });
  const app = createApp({ db, rateLimit: null });
  try {
    assert.equal((await send(app, "POST", "/rooms", { id: "r" })).status, 201);
    // As a full disk or a read-only file would: every write fails in SQLite.
    await (await db.client()).execute("PRAGMA query_only = ON");
    const answers = await Promise.all([
      send(app, "POST", "/rooms/r/messages", { body: 1 }),
      send(app, "PUT", "/rooms/r/state", { key: "k", value: 1 }),
      send(app, "POST", "/rooms/r/batch", { messages: [{ body: 2 }] }),
    ]);
    for (const res of answers) {
      assert.equal(res.status, 503);
      assert.equal((await res.json()).error, "database_unavailable");
      assert.equal(res.headers.get("retry-after"), "1");
    }
    await (await db.client()).execute("PRAGMA query_only = OFF");
    assert.deepEqual(
      await (await send(app, "GET", "/rooms/r/messages?after=0")).json(),
      [],
    );
    assert.equal(
      (await send(app, "POST", "/rooms/r/messages", { body: 3 })).status,
      201,
    );
  } finally {
    db.close();
    await Deno.remove(dir, { recursive: true });
  }
});

// ---- the file, the schema and migrations ----

async function tempDb(): Promise<{ url: string; path: string; dir: string }> {
  const dir = await Deno.makeTempDir({ prefix: "sync-test-" });
  return { url: `file:${dir}/sync.db`, path: `${dir}/sync.db`, dir };
}

Deno.test("the schema applies idempotently and data survives reopening a file", async () => {
  const { url, dir } = await tempDb();
  try {
    for (let round = 0; round < 3; round++) {
      const db = new Db({ url });
      const call = caller(createApp({ db, rateLimit: null }));
      assert.equal(
        (await call("POST", "/rooms", { id: "r" })).status,
        round === 0 ? 201 : 200,
      );
      await call("POST", "/rooms/r/messages", { body: round });
      const read = (await call("GET", "/rooms/r/messages")).body as {
        body: number;
      }[];
      assert.deepEqual(
        read.map((m) => m.body),
        Array.from({ length: round + 1 }, (_, i) => i),
      );
      assert.equal(await schemaVersion(db), MIGRATIONS.length + 1);
      db.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a local file runs in WAL mode with synchronous=NORMAL and foreign keys on", async () => {
  const { url, dir } = await tempDb();
  const db = new Db({ url });
  try {
    const client = await db.client();
    const pragma = async (name: string) =>
      Object.values((await client.execute(`PRAGMA ${name}`)).rows[0])[0];
    assert.equal(await pragma("journal_mode"), "wal");
    assert.equal(await pragma("synchronous"), 1, "1 is NORMAL");
    assert.equal(await pragma("foreign_keys"), 1);
    assert.equal(await pragma("busy_timeout"), 5000);
  } finally {
    db.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("migrations run once each, in order, and record the schema version", async () => {
  const { url, dir } = await tempDb();
  const migrations = [
    ["CREATE TABLE m1 (x INTEGER) STRICT", "INSERT INTO m1 VALUES (1)"],
    ["INSERT INTO m1 VALUES (2)"],
  ];
  try {
    const first = new Db({ url, migrations: migrations.slice(0, 1) });
    assert.equal(await schemaVersion(first), 2);
    first.close();
    // Two instances starting at once on one file: each step still runs exactly once.
    const [a, b] = [new Db({ url, migrations }), new Db({ url, migrations })];
    await Promise.all([a.client(), b.client()]);
    assert.equal(await schemaVersion(a), 3);
    const rows =
      (await (await a.client()).execute("SELECT x FROM m1 ORDER BY x")).rows;
    assert.deepEqual(rows.map((r) => r.x), [1, 2]);
    a.close();
    b.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a database of schema 3 migrates to history: each entry becomes its first kept version, after the newest message before it", async () => {
  const { url, dir } = await tempDb();
  try {
    const old = new Db({ url, migrations: MIGRATIONS.slice(0, 2) });
    const client = await old.client();
    await client.batch([
      "INSERT INTO rooms (id, created_at, meta) VALUES ('r', 0, '{}')",
      `INSERT INTO messages (id, room_id, kind, body, created_at)
         VALUES (7, 'r', 'm', '1', 100), (9, 'r', 'm', '2', 300)`,
      `INSERT INTO state (room_id, scope, key, value, version, updated_at)
         VALUES ('r', '_shared', 'k', '"v"', 4, 200)`,
    ], "write");
    old.close();
    const db = new Db({ url });
    assert.equal(await schemaVersion(db), MIGRATIONS.length + 1);
    const app = createApp({ db, rateLimit: null });
    const history = await (await app.request("/rooms/r/state/history?key=k"))
      .json();
    assert.deepEqual(
      history.map((v: Record<string, unknown>) => [
        v.version,
        v.value,
        v.updated_by,
        v.after_message,
      ]),
      [[4, "v", null, 7]],
    );
    // The next write goes on from it, and is kept too.
    const put = await (await app.request("/rooms/r/state", {
      method: "PUT",
      body: JSON.stringify({ key: "k", value: "w", agent: "a" }),
    })).json();
    assert.equal(put.version, 5);
    assert.equal(put.updated_by, "a");
    const at7 = await (await app.request("/rooms/r/state?at=9")).json();
    assert.deepEqual(at7.map((e: { value: unknown }) => e.value), ["v"]);
    db.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a database of schema 1 migrates to the task lifecycle: claims count one attempt, a claim without a lease stays held", async () => {
  const { url, dir } = await tempDb();
  try {
    const old = new Db({ url, migrations: [] });
    const client = await old.client();
    await client.execute(
      "INSERT INTO rooms (id, created_at, meta) VALUES ('r', 0, '{}')",
    );
    const far = Date.now() + 3_600_000;
    for (
      const [claimedBy, lease] of [[null, null], ["w1", null], ["w2", far]]
    ) {
      await client.execute({
        sql: `INSERT INTO messages (room_id, kind, body, created_at, claimed_by,
                claimed_at, lease_expires_at) VALUES ('r', 'task', '1', 0, ?, ?, ?)`,
        args: [claimedBy, claimedBy === null ? null : 0, lease],
      });
    }
    old.close();
    const db = new Db({ url });
    assert.equal(await schemaVersion(db), MIGRATIONS.length + 1);
    const app = createApp({ db, rateLimit: null });
    const read = await (await app.request("/rooms/r/messages")).json();
    assert.deepEqual(
      read.map((m: Message) => [m.status, m.attempts, m.claimed_by]),
      [["open", 0, null], ["held", 1, "w1"], ["held", 1, "w2"]],
    );
    db.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a failed migration rolls back whole and is reported", async () => {
  const { url, dir } = await tempDb();
  try {
    const db = new Db({
      url,
      migrations: [["CREATE TABLE ok (x INTEGER)", "NOT SQL"]],
    });
    await assert.rejects(db.client());
    const plain = new Db({ url, migrations: [] });
    assert.equal(await schemaVersion(plain), 1);
    const tables = await (await plain.client()).execute(
      "SELECT name FROM sqlite_master WHERE name = 'ok'",
    );
    assert.equal(tables.rows.length, 0);
    plain.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("the WAL stays a few MB under sustained writes", async () => {
  const { url, path, dir } = await tempDb();
  const db = new Db({ url });
  try {
    const call = caller(createApp({ db, rateLimit: null }));
    await call("POST", "/rooms", { id: "r" });
    const body = "x".repeat(1000);
    let maxWal = 0;
    // 8,000 posts of 1 KB in waves of 50 concurrent writers, while reads run beside.
    for (let wave = 0; wave < 160; wave++) {
      await Promise.all([
        ...Array.from(
          { length: 50 },
          () => call("POST", "/rooms/r/messages", { body }),
        ),
        call("GET", "/rooms/r/messages?limit=100"),
      ]);
      maxWal = Math.max(maxWal, (await Deno.stat(`${path}-wal`)).size);
    }
    const total =
      (await (await db.client()).execute("SELECT count(*) AS n FROM messages"))
        .rows[0].n;
    assert.equal(total, 8000);
    assert.ok(maxWal < 8 * 1024 * 1024, `WAL peaked at ${maxWal} bytes`);
  } finally {
    db.close();
    await Deno.remove(dir, { recursive: true });
  }
});
