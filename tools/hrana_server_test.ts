// Proves hrana_server.ts with the real @libsql/client over HTTP, so the rest
// of the suite can trust it as a stand-in for sqld.

import assert from "node:assert/strict";
import {
  type Client,
  type Config,
  createClient,
  LibsqlBatchError,
  LibsqlError,
} from "@libsql/client";
import { type HranaServer, startHranaServer } from "./hrana_server.ts";

async function withServer(
  fn: (client: Client, server: HranaServer) => Promise<void>,
  config: Omit<Config, "url"> = {},
): Promise<void> {
  const server = await startHranaServer();
  const client = createClient({ ...config, url: server.url });
  try {
    await fn(client, server);
  } finally {
    client.close();
    await server.close();
  }
}

/** Asserts that `promise` rejects with a LibsqlError whose code matches. */
async function rejectsWith(
  promise: Promise<unknown>,
  code: string | RegExp,
): Promise<LibsqlError> {
  let error: unknown;
  await assert.rejects(promise, (e) => {
    error = e;
    return true;
  });
  assert.ok(error instanceof LibsqlError, `not a LibsqlError: ${error}`);
  if (typeof code === "string") assert.equal(error.code, code);
  else assert.match(error.code, code);
  return error;
}

Deno.test("execute round-trips every value type", async () => {
  await withServer(async (client) => {
    await client.execute(
      "CREATE TABLE v (i INTEGER, f REAL, t TEXT, n ANY, b BLOB) STRICT",
    );
    const big = 9007199254740993n; // 2^53 + 1: a float would lose the 1
    const min = -(2n ** 63n);
    const text = "héllo 🌍 漢字 'single' \"double\"\nsecond line";
    const blob = new Uint8Array([0, 1, 2, 127, 128, 253, 254, 255]);
    await client.batch([
      {
        sql: "INSERT INTO v VALUES (?, ?, ?, ?, ?)",
        args: [big, 3.25, text, null, blob],
      },
      {
        sql: "INSERT INTO v VALUES (?, ?, ?, ?, ?)",
        args: [min, -0.5, "", 1e300, new Uint8Array([])],
      },
    ], "write");
    const rs = await client.execute(
      "SELECT i, f, t, n, b, typeof(i) AS ti, typeof(n) AS tn FROM v ORDER BY rowid",
    );
    assert.deepEqual(rs.columns, ["i", "f", "t", "n", "b", "ti", "tn"]);
    assert.deepEqual(
      rs.columnTypes,
      ["INTEGER", "REAL", "TEXT", "ANY", "BLOB", "", ""],
    );
    const [first, second] = rs.rows;
    assert.equal(first.i, big);
    assert.equal(first.f, 3.25);
    assert.equal(first.t, text);
    assert.equal(first.n, null);
    assert.deepEqual(new Uint8Array(first.b as ArrayBuffer), blob);
    assert.equal(first.ti, "integer");
    assert.equal(second.i, min);
    assert.equal(second.f, -0.5);
    assert.equal(second.t, "");
    assert.equal(second.n, 1e300);
    assert.equal(second.tn, "real");
    assert.equal((second.b as ArrayBuffer).byteLength, 0);

    // The client sends a JS number as a float, a bigint or boolean as an integer.
    const types = await client.execute({
      sql: "SELECT typeof(?) AS a, typeof(?) AS b, ? AS c, typeof(?) AS d",
      args: [7, 7n, true, null],
    });
    assert.deepEqual(
      { ...types.rows[0] },
      { a: "real", b: "integer", c: 1n, d: "null" },
    );
  }, { intMode: "bigint" });

  // The default intMode gives numbers, and refuses what a number cannot hold.
  await withServer(async (client) => {
    const rs = await client.execute({ sql: "SELECT ? AS n", args: [42n] });
    assert.equal(rs.rows[0].n, 42);
    // The client converts rows as they arrive, so execute itself rejects.
    await assert.rejects(
      client.execute({ sql: "SELECT ? AS n", args: [9007199254740993n] }),
      RangeError,
    );
  });
});

Deno.test("INSERT … RETURNING, rowsAffected and lastInsertRowid", async () => {
  await withServer(async (client) => {
    await client.execute(
      "CREATE TABLE m (id INTEGER PRIMARY KEY AUTOINCREMENT, body TEXT NOT NULL)",
    );
    const inserted = await client.execute({
      sql: "INSERT INTO m (body) VALUES (?), (?) RETURNING id, body",
      args: ["a", "b"],
    });
    assert.deepEqual(inserted.rows.map((r) => ({ ...r })), [
      { id: 1, body: "a" },
      { id: 2, body: "b" },
    ]);
    assert.equal(inserted.rowsAffected, 2);
    assert.equal(inserted.lastInsertRowid, 2n);

    const updated = await client.execute("UPDATE m SET body = body || '!'");
    assert.equal(updated.rowsAffected, 2);
    // sqld reports a rowid for INSERTs only.
    assert.equal(updated.lastInsertRowid, undefined);

    const selected = await client.execute("SELECT * FROM m");
    assert.equal(selected.rowsAffected, 0);
    assert.equal(selected.lastInsertRowid, undefined);

    const deleted = await client.execute({
      sql: "DELETE FROM m WHERE id = ? RETURNING body",
      args: [1],
    });
    assert.equal(deleted.rowsAffected, 1);
    assert.equal(deleted.rows[0].body, "a!");
  });
});

Deno.test("ON CONFLICT … DO UPDATE … RETURNING bumps a version", async () => {
  await withServer(async (client) => {
    await client.execute(
      `CREATE TABLE state (
         room TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
         version INTEGER NOT NULL DEFAULT 1,
         PRIMARY KEY (room, key)
       ) STRICT, WITHOUT ROWID`,
    );
    const upsert = (value: string) =>
      client.execute({
        sql: `INSERT INTO state (room, key, value) VALUES (:room, :key, :value)
              ON CONFLICT (room, key) DO UPDATE
              SET value = excluded.value, version = version + 1
              RETURNING value, version`,
        args: { room: "r", key: "phase", value },
      });
    assert.deepEqual({ ...(await upsert("plan")).rows[0] }, {
      value: "plan",
      version: 1,
    });
    const second = await upsert("build");
    assert.deepEqual({ ...second.rows[0] }, { value: "build", version: 2 });
    assert.equal(second.rowsAffected, 1);
  });
});

Deno.test("a write batch is atomic: a PK violation rolls back earlier statements", async () => {
  await withServer(async (client) => {
    await client.execute(
      "CREATE TABLE agents (id TEXT PRIMARY KEY, name TEXT) STRICT",
    );
    await client.execute("INSERT INTO agents VALUES ('alice', 'Alice')");
    const error = await rejectsWith(
      client.batch([
        { sql: "INSERT INTO agents VALUES (?, ?)", args: ["bob", "Bob"] },
        {
          sql: "UPDATE agents SET name = ? WHERE id = ?",
          args: ["A", "alice"],
        },
        { sql: "INSERT INTO agents VALUES (?, ?)", args: ["alice", "again"] },
        { sql: "INSERT INTO agents VALUES (?, ?)", args: ["carol", "Carol"] },
      ], "write"),
      /^SQLITE_CONSTRAINT/,
    );
    assert.ok(error instanceof LibsqlBatchError);
    assert.equal(error.statementIndex, 2);
    assert.match(error.message, /UNIQUE constraint failed: agents\.id/);

    const rows = await client.execute("SELECT id, name FROM agents");
    assert.deepEqual(rows.rows.map((r) => ({ ...r })), [
      { id: "alice", name: "Alice" },
    ]);
    // The next request starts outside any transaction.
    await rejectsWith(client.execute("COMMIT"), "SQLITE_UNKNOWN");
    await client.batch([
      { sql: "INSERT INTO agents VALUES (?, ?)", args: ["bob", "Bob"] },
    ], "write");
    const count = await client.execute("SELECT count(*) AS n FROM agents");
    assert.equal(count.rows[0].n, 2);
  });
});

Deno.test("deferred and write batches return every statement's result", async () => {
  await withServer(async (client) => {
    const results = await client.batch([
      "CREATE TABLE t (x INTEGER)",
      { sql: "INSERT INTO t VALUES (?)", args: [1n] },
      { sql: "INSERT INTO t VALUES (?)", args: [2n] },
      "SELECT sum(x) AS s FROM t",
    ], "deferred");
    assert.equal(results.length, 4);
    assert.equal(results[1].rowsAffected, 1);
    assert.equal(results[2].lastInsertRowid, 2n);
    assert.equal(results[3].rows[0].s, 3);

    // A statement the batch repeats is stored once and run by sql_id.
    const many = await client.batch(
      Array.from({ length: 40 }, (_, i) => ({
        sql: "INSERT INTO t VALUES (?)",
        args: [BigInt(i)],
      })),
      "write",
    );
    assert.equal(many.length, 40);
    const count = await client.execute("SELECT count(*) AS n FROM t");
    assert.equal(count.rows[0].n, 42);
  });
});

Deno.test("STRICT and WITHOUT ROWID tables keep their rules", async () => {
  await withServer(async (client) => {
    await client.execute(
      "CREATE TABLE s (id INTEGER PRIMARY KEY, n INTEGER NOT NULL) STRICT",
    );
    await client.execute(
      "CREATE TABLE w (k TEXT PRIMARY KEY, v BLOB) WITHOUT ROWID",
    );
    // A float that is a whole number fits an INTEGER column, as in SQLite.
    await client.execute({ sql: "INSERT INTO s (n) VALUES (?)", args: [5] });
    const strict = await rejectsWith(
      client.execute({ sql: "INSERT INTO s (n) VALUES (?)", args: ["five"] }),
      "SQLITE_CONSTRAINT",
    );
    assert.match(strict.message, /cannot store TEXT value in INTEGER column/);
    await rejectsWith(
      client.execute("INSERT INTO s (n) VALUES (NULL)"),
      "SQLITE_CONSTRAINT",
    );

    const put = await client.execute({
      sql: "INSERT INTO w VALUES (?, ?)",
      args: ["k1", new Uint8Array([9])],
    });
    assert.equal(put.rowsAffected, 1);
    await rejectsWith(
      client.execute({
        sql: "INSERT INTO w VALUES (?, ?)",
        args: ["k1", null],
      }),
      "SQLITE_CONSTRAINT",
    );
    const got = await client.execute("SELECT k, v FROM w");
    assert.deepEqual(got.columns, ["k", "v"]);
    assert.deepEqual(
      new Uint8Array(got.rows[0].v as ArrayBuffer),
      Uint8Array.of(9),
    );
  });
});

Deno.test("20 concurrent executes all succeed", async () => {
  await withServer(async (client, server) => {
    await client.execute(
      "CREATE TABLE c (id INTEGER PRIMARY KEY, i INTEGER NOT NULL)",
    );
    const before = server.requests;
    const results = await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        client.execute({
          sql: "INSERT INTO c (i) VALUES (?) RETURNING id",
          args: [i],
        })),
    );
    const ids = results.map((rs) => rs.rows[0].id).sort((a, b) =>
      Number(a) - Number(b)
    );
    assert.deepEqual(ids, Array.from({ length: 20 }, (_, i) => i + 1));
    assert.ok(server.requests - before >= 20);
    const count = await client.execute("SELECT count(DISTINCT i) AS n FROM c");
    assert.equal(count.rows[0].n, 20);
  });
});

Deno.test("errors carry sqld's codes", async () => {
  await withServer(async (client) => {
    await client.execute("CREATE TABLE e (id INTEGER PRIMARY KEY)");
    const cases: [string, unknown[], string][] = [
      ["SELEC 1", [], "SQL_PARSE_ERROR"],
      ["SELECT * FROM missing", [], "SQL_INPUT_ERROR"],
      ["SELECT 1; SELECT 2", [], "SQL_MANY_STATEMENTS"],
      ["  -- only a comment\n ;", [], "SQL_NO_STATEMENT"],
      ["SELECT ?, ?", [1], "ARGS_INVALID"],
      ["SELECT ?", [1, 2], "ARGS_INVALID"],
      // sqld refuses what would only last one stream (one connection).
      ["PRAGMA journal_mode = WAL", [], "SQL_PARSE_ERROR"],
      ["CREATE TEMP TABLE x (y)", [], "SQL_PARSE_ERROR"],
      ["ATTACH 'other.db' AS other", [], "SQL_PARSE_ERROR"],
      // SQLITE_ERROR has no rusqlite name, so sqld says SQLITE_UNKNOWN.
      ["ROLLBACK", [], "SQLITE_UNKNOWN"],
    ];
    for (const [sql, args, code] of cases) {
      await rejectsWith(client.execute({ sql, args: args as [] }), code);
    }
    // Pragmas that only read are allowed.
    const info = await client.execute("PRAGMA table_info(e)");
    assert.equal(info.rows[0].name, "id");
    await client.execute("PRAGMA foreign_keys");
  });
});

Deno.test("named arguments match with or without their prefix", async () => {
  await withServer(async (client) => {
    const rs = await client.execute({
      sql: "SELECT :a AS a, @b AS b, $c AS c, :a || ':' || $c AS joined",
      args: { a: "x", "@b": "y", c: "z" },
    });
    assert.deepEqual({ ...rs.rows[0] }, {
      a: "x",
      b: "y",
      c: "z",
      joined: "x:z",
    });
    const numbered = await client.execute({
      sql: "SELECT ?2 AS two, ?1 AS one, ? AS three",
      args: ["1", "2", "3"],
    });
    assert.deepEqual({ ...numbered.rows[0] }, {
      two: "2",
      one: "1",
      three: "3",
    });
    await rejectsWith(
      client.execute({ sql: "SELECT :a, :b", args: { a: 1 } }),
      "ARGS_INVALID",
    );
  });
});

Deno.test("an interactive transaction keeps its stream by baton", async () => {
  await withServer(async (client) => {
    await client.execute("CREATE TABLE t (x INTEGER)");
    const tx = await client.transaction("write");
    await tx.execute("INSERT INTO t VALUES (1)");
    // Another stream waits for the connection instead of running inside
    // the open transaction.
    const outside = client.execute("SELECT count(*) AS n FROM t");
    const inside = await tx.execute("SELECT count(*) AS n FROM t");
    assert.equal(inside.rows[0].n, 1);
    await tx.rollback();
    assert.equal((await outside).rows[0].n, 0);

    const committed = await client.transaction("write");
    await committed.batch([
      "INSERT INTO t VALUES (2)",
      "INSERT INTO t VALUES (3)",
    ]);
    await committed.commit();
    const sum = await client.execute("SELECT sum(x) AS s FROM t");
    assert.equal(sum.rows[0].s, 5);
  });
});

Deno.test("a stream that ends inside a transaction is rolled back", async () => {
  await withServer(async (client) => {
    await client.execute("CREATE TABLE t (x INTEGER)");
    // Each execute is a stream of its own, closed in the same request.
    await client.execute("BEGIN");
    await client.execute("INSERT INTO t VALUES (1)");
    await rejectsWith(client.execute("ROLLBACK"), "SQLITE_UNKNOWN");
    const count = await client.execute("SELECT count(*) AS n FROM t");
    assert.equal(count.rows[0].n, 1);
  });
});

Deno.test("executeMultiple runs a sequence and stops at the first error", async () => {
  await withServer(async (client) => {
    await client.executeMultiple(`
      CREATE TABLE u (x INTEGER);
      INSERT INTO u VALUES (1); -- a comment; with a semicolon
      CREATE TRIGGER u_double AFTER INSERT ON u BEGIN
        UPDATE u SET x = x * 2 WHERE rowid = new.rowid;
      END;
      INSERT INTO u VALUES (5);
    `);
    const rows = await client.execute("SELECT x FROM u ORDER BY rowid");
    assert.deepEqual(rows.rows.map((r) => r.x), [1, 10]);
    await rejectsWith(
      client.executeMultiple(
        "INSERT INTO u VALUES (7); INSERT INTO missing VALUES (1); INSERT INTO u VALUES (9);",
      ),
      "SQL_INPUT_ERROR",
    );
    const count = await client.execute("SELECT count(*) AS n FROM u");
    assert.equal(count.rows[0].n, 3);
  });
});

Deno.test("protocol: batons, version 3 requests, cursor and malformed input", async () => {
  const server = await startHranaServer();
  const post = async (path: string, body: unknown) => {
    const res = await fetch(server.url + path, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: typeof body === "string" ? body : JSON.stringify(body),
    });
    return { status: res.status, text: await res.text() };
  };
  const stmt = (sql: string) => ({ sql });
  try {
    const version = await fetch(server.url + "/v2");
    assert.equal(version.status, 200);
    await version.body?.cancel();

    let res = await post("/v3/pipeline", {
      requests: [
        { type: "execute", stmt: stmt("CREATE TABLE t (x)") },
        { type: "execute", stmt: stmt("BEGIN") },
        { type: "get_autocommit" },
      ],
    });
    assert.equal(res.status, 200);
    let body = JSON.parse(res.text);
    assert.equal(typeof body.baton, "string");
    assert.deepEqual(body.results[2].response, {
      type: "get_autocommit",
      is_autocommit: false,
    });
    const firstBaton = body.baton;

    res = await post("/v3/pipeline", {
      baton: firstBaton,
      requests: [
        { type: "store_sql", sql_id: 7, sql: "INSERT INTO t VALUES (1)" },
        {
          type: "batch",
          batch: {
            steps: [
              {
                condition: { type: "not", cond: { type: "is_autocommit" } },
                stmt: { sql_id: 7 },
              },
              { condition: { type: "is_autocommit" }, stmt: stmt("SELECT 1") },
              {
                condition: {
                  type: "and",
                  conds: [{ type: "ok", step: 0 }, {
                    type: "or",
                    conds: [{ type: "error", step: 1 }, {
                      type: "ok",
                      step: 0,
                    }],
                  }],
                },
                stmt: stmt("SELECT x FROM t"),
              },
            ],
          },
        },
        { type: "close_sql", sql_id: 7 },
      ],
    });
    body = JSON.parse(res.text);
    const batch = body.results[1].response.result;
    assert.equal(batch.step_results[0].affected_row_count, 1);
    assert.equal(batch.step_results[1], null);
    assert.equal(batch.step_errors[1], null);
    assert.deepEqual(batch.step_results[2].rows, [[{
      type: "integer",
      value: "1",
    }]]);

    // A baton is good for one request only.
    res = await post("/v3/pipeline", { baton: firstBaton, requests: [] });
    assert.equal(res.status, 400);
    assert.match(res.text, /baton/);

    res = await post("/v3/cursor", {
      baton: body.baton,
      batch: {
        steps: [{ stmt: stmt("SELECT x FROM t") }, {
          stmt: stmt("SELECT * FROM missing"),
        }],
      },
    });
    const lines = res.text.trimEnd().split("\n").map((l) => JSON.parse(l));
    assert.equal(typeof lines[0].baton, "string");
    assert.deepEqual(lines.slice(1).map((e) => e.type), [
      "step_begin",
      "row",
      "step_end",
      "step_error",
    ]);
    assert.equal(lines[4].error.code, "SQL_INPUT_ERROR");

    // Closing the stream rolls back the transaction it left open.
    res = await post("/v3/pipeline", {
      baton: lines[0].baton,
      requests: [{ type: "close" }],
    });
    assert.equal(JSON.parse(res.text).baton, null);
    res = await post("/v2/pipeline", {
      requests: [{ type: "execute", stmt: stmt("SELECT count(*) FROM t") }],
    });
    body = JSON.parse(res.text);
    assert.equal(body.results[0].response.result.rows[0][0].value, "0");
    // That stream was left open: close it so nothing is left behind.
    await post("/v2/pipeline", {
      baton: body.baton,
      requests: [{ type: "close" }],
    });

    // Version 2 has no autocommit requests; bad input fails the whole request.
    assert.equal(
      (await post("/v2/pipeline", { requests: [{ type: "get_autocommit" }] }))
        .status,
      400,
    );
    assert.equal((await post("/v2/pipeline", "{not json")).status, 400);
    assert.equal(
      (await post("/v2/pipeline", { requests: [{ type: "nope" }] })).status,
      400,
    );
    assert.equal(
      (await post("/v2/pipeline", {
        requests: [{ type: "execute", stmt: { sql_id: 1 } }],
      })).status,
      400,
    );
    assert.equal((await post("/v3-protobuf/pipeline", {})).status, 404);
  } finally {
    await server.close();
  }
});

Deno.test("a file database outlives its server", async () => {
  const dir = await Deno.makeTempDir();
  const path = `${dir}/hrana.db`;
  try {
    for (const expected of [1, 2]) {
      const server = await startHranaServer({ path });
      const client = createClient({ url: server.url });
      try {
        await client.execute("CREATE TABLE IF NOT EXISTS f (x INTEGER)");
        await client.execute("INSERT INTO f VALUES (1)");
        const count = await client.execute("SELECT count(*) AS n FROM f");
        assert.equal(count.rows[0].n, expected);
      } finally {
        client.close();
        await server.close();
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
