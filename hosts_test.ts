/**
 * Where users deploy it (issue 18): `deno serve main.ts`, `deno serve --parallel`
 * (one worker per core, sharing the database as two instances do), main.ts imported
 * as a module (no listener, no database until the first request), the Val Town call
 * shape, and a host without a writable disk. Real processes on 127.0.0.1.
 */
import assert from "node:assert/strict";
import { type Server, startServer, withTempDir } from "./testing.ts";

/** The permissions `deno task start` runs with. */
const PERMISSIONS = [
  "--allow-net",
  "--allow-env",
  "--allow-read",
  "--allow-write",
];

const ROOT = new URL(".", import.meta.url).pathname;

/**
 * `deno serve` on a free port of 127.0.0.1, with `more` flags before main.ts. A fixed
 * port: with port 0, each worker of `--parallel` would get a port of its own.
 */
function serve(env: Record<string, string>, more: string[] = []) {
  return startServer(env, [
    "serve",
    ...PERMISSIONS,
    "--host",
    "127.0.0.1",
    "--port",
    String(freePort()),
    ...more,
    "main.ts",
  ]);
}

async function send(
  url: string,
  method = "GET",
  body?: unknown,
): Promise<{ status: number; body: unknown }> {
  const res = await fetch(url, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text === "" ? null : JSON.parse(text) };
}

/** A port nothing listens on now. */
function freePort(): number {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr as Deno.NetAddr;
  listener.close();
  return port;
}

/** Whether something accepts connections on the port. */
async function listening(port: number): Promise<boolean> {
  try {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    conn.close();
    return true;
  } catch {
    return false;
  }
}

/** The seed loop: a room, an agent, a message, state, read back. */
async function seedLoop(base: string) {
  assert.equal((await send(`${base}/rooms`, "POST", { id: "r" })).status, 201);
  assert.equal(
    (await send(`${base}/rooms/r/agents`, "POST", { id: "a", name: "A" }))
      .status,
    201,
  );
  const posted = await send(`${base}/rooms/r/messages`, "POST", {
    from: "a",
    body: { n: 1 },
  });
  assert.equal(posted.status, 201);
  assert.equal(
    (await send(`${base}/rooms/r/state`, "PUT", { key: "k", value: 1 })).status,
    200,
  );
  const read = await send(`${base}/rooms/r/messages?after=0`);
  assert.deepEqual(read.body, [posted.body]);
}

async function stop(server: Server) {
  await server.stop("SIGTERM");
}

Deno.test("deno serve main.ts serves the API and listens once, on the port it was given", async () => {
  await withTempDir(async (dir) => {
    // PORT is what `deno task start` listens on: under deno serve nothing may.
    const port = freePort();
    const server = await serve({
      DATABASE_URL: `file:${dir}/sync.db`,
      PORT: String(port),
    });
    try {
      await seedLoop(server.url);
      assert.equal(await listening(port), false, "a second listener on PORT");
      const health = await send(`${server.url}/healthz`);
      assert.deepEqual(health, { status: 200, body: { ok: true } });
      assert.doesNotMatch(server.output(), /warning|error/i, server.output());
    } finally {
      await stop(server);
    }
  });
});

Deno.test("deno serve --parallel: workers share the database: one CAS winner, waits woken across workers", async () => {
  await withTempDir(async (dir) => {
    const server = await serve(
      { DATABASE_URL: `file:${dir}/sync.db`, DENO_JOBS: "2", RATE_LIMIT: "0" },
      ["--parallel"],
    );
    try {
      const base = server.url;
      await seedLoop(base);
      // Twenty writers take version 1 of a key at once: connections spread over both
      // workers, and exactly one wins.
      const writes = await Promise.all(
        Array.from(
          { length: 20 },
          (_, i) =>
            send(`${base}/rooms/r/state`, "PUT", {
              key: "lock",
              value: i,
              if_version: 0,
            }),
        ),
      );
      assert.deepEqual(
        writes.map((w) => w.status).sort(),
        [200, ...Array(19).fill(409)],
      );
      // Eight waiters on their own connections (both workers, but for a 1 in 128
      // chance), then one post: every waiter answers within the cross-instance bound.
      const started = performance.now();
      const waiters = Array.from(
        { length: 8 },
        () => send(`${base}/rooms/r/messages?after=1&wait=10`),
      );
      await new Promise((resolve) => setTimeout(resolve, 300));
      const posted = await send(`${base}/rooms/r/messages`, "POST", {
        body: "wake",
      });
      const answers = await Promise.all(waiters);
      const elapsed = performance.now() - started;
      for (const answer of answers) {
        assert.deepEqual(answer.body, [posted.body]);
      }
      assert.ok(elapsed < 3000, `woken after ${Math.round(elapsed)} ms`);
      assert.equal(
        server.output().match(/listening on/g)?.length,
        1,
        "one start-up line",
      );
    } finally {
      await stop(server);
    }
  });
});

/** Runs a small program that imports main.ts, with `flags`; answers its output. */
async function probe(
  code: string,
  flags: string[],
  env: Record<string, string>,
) {
  const file = `${ROOT}.probe_${crypto.randomUUID()}.ts`;
  await Deno.writeTextFile(file, code);
  try {
    const { code: exit, stdout, stderr } = await new Deno.Command(
      Deno.execPath(),
      {
        args: ["run", ...flags, file],
        cwd: env.CWD ?? ROOT,
        env: { NO_COLOR: "1", ...env },
        stdout: "piped",
        stderr: "piped",
      },
    ).output();
    const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
    return { exit, stdout: text(stdout), stderr: text(stderr) };
  } finally {
    await Deno.remove(file);
  }
}

Deno.test("importing main.ts starts no listener and opens no database; the default export is Val Town's Request → Response and deno serve's fetch", async () => {
  await withTempDir(async (dir) => {
    const file = `${dir}/sync.db`;
    // No --allow-net: listening at import would fail the import.
    const { exit, stdout, stderr } = await probe(
      `import handler from "./main.ts";
const exists = async () => { try { await Deno.stat(${
        JSON.stringify(file)
      }); return true; } catch { return false; } };
console.log("after import", await exists());
const made = await handler(new Request("http://val.test/rooms", {
  method: "POST", headers: { "content-type": "application/json" }, body: '{"id":"v"}',
}));
console.log("function", made.status, (await made.json()).id);
const read = await handler.fetch(new Request("http://val.test/rooms/v"));
console.log("fetch", read.status, (await read.json()).id);
console.log("after requests", await exists());
Deno.exit(0);
`,
      ["--allow-env", "--allow-read", `--allow-write=${dir}`],
      { DATABASE_URL: `file:${file}` },
    );
    assert.equal(exit, 0, stderr);
    assert.equal(
      stdout,
      "after import false\nfunction 201 v\nfetch 200 v\nafter requests true\n",
    );
    assert.equal(stderr, "");
  });
});

Deno.test("without a writable disk or DATABASE_URL: one line says to set DATABASE_URL; requests get 503, not a crash", async () => {
  await withTempDir(async (dir) => {
    const { exit, stdout, stderr } = await probe(
      `import handler from "./main.ts";
for (const path of ["/healthz", "/rooms/r"]) {
  const res = await handler(new Request("http://deploy.test" + path));
  console.log(res.status, (await res.json()).error);
}
`,
      // No --allow-write: Deno Deploy and Val Town have no writable disk.
      ["--allow-env", "--allow-read"],
      { CWD: dir },
    );
    assert.equal(exit, 0, stderr);
    assert.equal(
      stdout,
      "503 database_unavailable\n503 database_unavailable\n",
    );
    const lines = stderr.trim().split("\n");
    assert.equal(lines.length, 1, stderr);
    assert.match(
      lines[0],
      /^sync: cannot open the database at file:sync\.db: .*set DATABASE_URL to a libsql:\/\/ URL/,
    );
  });
  // `deno task start` on such a host stops at start-up with that line.
  await withTempDir(async (dir) => {
    const { code, stderr } = await new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "--allow-net",
        "--allow-env",
        "--allow-read",
        `${ROOT}server.ts`,
      ],
      cwd: dir,
      env: { NO_COLOR: "1", PORT: "0", HOST: "127.0.0.1" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(stderr).trim();
    assert.equal(code, 1);
    assert.equal(text.split("\n").length, 1, text);
    assert.match(text, /set DATABASE_URL to a libsql:\/\//);
  });
});
