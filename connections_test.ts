/**
 * The listener (listener.ts), over real sockets against `deno task start`: the cap on
 * connections, stalled requests closed, and a process that outlives clients holding
 * every file descriptor.
 */
import assert from "node:assert/strict";
import { expect, type Server, startServer, withTempDir } from "./testing.ts";

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));
const encoder = new TextEncoder();

/** Opens a connection and sends the start of a request that never finishes. */
async function halfSent(server: Server): Promise<Deno.Conn> {
  const conn = await Deno.connect({
    hostname: "127.0.0.1",
    port: Number(new URL(server.url).port),
  });
  await conn.write(encoder.encode("GET /healthz HTTP/1.1\r\nHost: x\r\n"));
  return conn;
}

/** Reads until the server closes the connection; the text read and when it closed. */
async function untilClosed(conn: Deno.Conn, started = performance.now()) {
  const buffer = new Uint8Array(4096);
  let text = "";
  for (;;) {
    const n = await conn.read(buffer).catch(() => null);
    if (n === null) break;
    text += new TextDecoder().decode(buffer.subarray(0, n));
  }
  try {
    conn.close();
  } catch {
    // closed already
  }
  return { text, ms: performance.now() - started };
}

/** Waits until `server` answers `/healthz` with 200, for at most `ms`. */
async function servesWithin(server: Server, ms: number): Promise<void> {
  const started = performance.now();
  let status = 0;
  while (performance.now() - started < ms && status !== 200) {
    try {
      status = (await fetch(`${server.url}/healthz`)).status;
    } catch {
      await sleep(100);
    }
  }
  assert.equal(status, 200, server.output());
}

/** Serves with a temporary database and `env`, then stops. */
async function serving(
  env: Record<string, string>,
  run: (server: Server) => Promise<void>,
  fileLimit?: number,
) {
  await withTempDir(async (dir) => {
    const server = await startServer(
      { DATABASE_URL: `file:${dir}/sync.db`, RATE_LIMIT: "0", ...env },
      ["task", "start"],
      fileLimit,
    );
    try {
      await run(server);
    } finally {
      await server.stop("SIGKILL");
    }
  });
}

Deno.test("/limits shows the connection cap and the stall timeout in force", async () => {
  await serving(
    { MAX_CONNECTIONS: "7", STALL_TIMEOUT_SECONDS: "3" },
    async (server) => {
      const limits = await expect(server.url, "GET", "/limits", 200) as Record<
        string,
        unknown
      >;
      assert.equal(limits.max_connections, 7);
      assert.equal(limits.stall_timeout_seconds, 3);
    },
  );
});

Deno.test("a request whose headers never finish is closed after the stall timeout", async () => {
  await serving({ STALL_TIMEOUT_SECONDS: "1" }, async (server) => {
    const { text, ms } = await untilClosed(await halfSent(server));
    assert.equal(text, "", "closed without an answer");
    assert.ok(ms > 800 && ms < 5000, `closed after ${ms} ms`);
    // The process serves on.
    await expect(server.url, "GET", "/healthz", 200);
  });
});

Deno.test("a body that stalls is answered 408 request_timeout and its connection closed", async () => {
  await serving({ STALL_TIMEOUT_SECONDS: "1" }, async (server) => {
    await expect(server.url, "POST", "/rooms", 201, { id: "r" });
    const conn = await Deno.connect({
      hostname: "127.0.0.1",
      port: Number(new URL(server.url).port),
    });
    await conn.write(encoder.encode(
      'POST /rooms/r/messages HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: 40\r\n\r\n{"bo',
    ));
    // A byte every 200 ms: never idle, never done.
    const drip = setInterval(
      () => conn.write(encoder.encode(" ")).catch(() => {}),
      200,
    );
    const { text, ms } = await untilClosed(conn);
    clearInterval(drip);
    assert.match(text, /^HTTP\/1\.1 408 /);
    const body = JSON.parse(text.slice(text.indexOf("{")));
    assert.equal(body.error, "request_timeout");
    assert.ok(ms < 5000, `answered after ${ms} ms`);
    // Nothing was written.
    assert.deepEqual(
      await expect(server.url, "GET", "/rooms/r/messages", 200),
      [],
    );
  });
});

Deno.test("held long-polls are not stalled requests: a wait longer than the stall timeout is answered", async () => {
  await serving({ STALL_TIMEOUT_SECONDS: "1" }, async (server) => {
    await expect(server.url, "POST", "/rooms", 201, { id: "r" });
    const started = performance.now();
    const poll = fetch(`${server.url}/rooms/r/messages?after=0&wait=3`);
    await sleep(2000);
    await expect(server.url, "POST", "/rooms/r/messages", 201, {
      from: "a",
      body: "late",
    });
    const response = await poll;
    assert.equal(response.status, 200);
    const messages = await response.json() as { body: string }[];
    assert.equal(messages[0].body, "late");
    assert.ok(performance.now() - started > 1900);
  });
});

Deno.test("at the cap a new client closes the longest-idle connection; with every one busy it gets 503 over_capacity", async () => {
  await serving({ MAX_CONNECTIONS: "3" }, async (server) => {
    await expect(server.url, "POST", "/rooms", 201, { id: "r" });
    // Three half-sent requests fill the cap; a real client still gets in.
    const idle = [
      await halfSent(server),
      await halfSent(server),
      await halfSent(server),
    ];
    await sleep(200);
    await expect(server.url, "GET", "/healthz", 200);
    const first = await untilClosed(idle[0]);
    assert.equal(first.text, "", "the oldest idle connection was closed");
    for (const conn of idle.slice(1)) conn.close();

    // Three held long-polls: busy, never closed for a newcomer.
    const stop = new AbortController();
    const polls = [1, 2, 3].map(() =>
      fetch(`${server.url}/rooms/r/messages?after=0&wait=20`, {
        signal: stop.signal,
      }).catch(() => null)
    );
    await sleep(500);
    const refused = await fetch(`${server.url}/healthz`);
    assert.equal(refused.status, 503);
    assert.equal(refused.headers.get("retry-after"), "1");
    const body = await refused.json();
    assert.equal(body.error, "over_capacity");
    assert.equal(body.max_connections, 3);
    stop.abort();
    await Promise.all(polls);
    // Once they let go, it serves again.
    await sleep(200);
    await expect(server.url, "GET", "/healthz", 200);
  });
});

Deno.test("1,300 half-sent connections under ulimit -n 1024: the process stays up and serves a new client within seconds", async () => {
  await serving({}, async (server) => {
    const held: Deno.Conn[] = [];
    try {
      for (let i = 0; i < 1300; i++) {
        try {
          held.push(await halfSent(server));
        } catch {
          // Refused or reset while the server is out of descriptors: keep going.
        }
      }
      const started = performance.now();
      await servesWithin(server, 5000);
      assert.match(
        server.output(),
        /out of file descriptors at \d+ connections: serving at most \d+/,
      );
      assert.doesNotMatch(server.output(), /Uncaught|panicked/);
      const limits = await (await fetch(`${server.url}/limits`)).json();
      assert.ok(
        limits.max_connections < 1024,
        `the cap became ${limits.max_connections}`,
      );
      console.log(
        `1,300 half-sent under ulimit -n 1024: served a new client ${
          Math.round(performance.now() - started)
        } ms after the last one; the cap became ${limits.max_connections}`,
      );
    } finally {
      for (const conn of held) {
        try {
          conn.close();
        } catch {
          // closed by the server
        }
      }
    }
  }, 1024);
});

Deno.test("with no cap (MAX_CONNECTIONS=0, plain Deno.serve), clients holding every descriptor do not kill the process: it listens again", async () => {
  // The cap off leaves Deno.serve, whose accept loop fails on "Too many open files":
  // the process must not exit (a proxy in front is then expected to cap connections).
  await serving({ MAX_CONNECTIONS: "0" }, async (server) => {
    const held: Deno.Conn[] = [];
    try {
      for (let i = 0; i < 300; i++) {
        try {
          held.push(await halfSent(server));
        } catch {
          break;
        }
      }
      await sleep(500);
      assert.match(server.output(), /out of file descriptors/);
      for (const conn of held.splice(0)) conn.close();
      await servesWithin(server, 5000);
      assert.doesNotMatch(server.output(), /Uncaught/);
    } finally {
      for (const conn of held) conn.close();
    }
  }, 256);
});

Deno.test("150 long-polls from one address: 100 are held (MAX_WAITS_PER_CLIENT), 50 meet 429 too_many_waits at once, and a message releases the held", async () => {
  await serving({}, async (server) => {
    await expect(server.url, "POST", "/rooms", 201, { id: "r" });
    const stop = new AbortController();
    const answers: { status: number; at: number }[] = [];
    const started = performance.now();
    const polls = Array.from(
      { length: 150 },
      () =>
        fetch(`${server.url}/rooms/r/messages?after=0&wait=20`, {
          signal: stop.signal,
        }).then(async (res) => {
          await res.body?.cancel();
          answers.push({ status: res.status, at: performance.now() - started });
        }).catch(() => {}),
    );
    try {
      const until = performance.now() + 10_000;
      while (answers.length < 50 && performance.now() < until) await sleep(50);
      await sleep(300);
      assert.deepEqual(
        answers.map((a) => a.status),
        Array(50).fill(429),
        "only the 50 past the cap answered, with 429",
      );
      await expect(server.url, "POST", "/rooms/r/messages", 201, { body: 1 });
      await Promise.all(polls);
      const held = answers.slice(50).map((a) => a.status);
      assert.deepEqual(held, Array(100).fill(200), "the held were released");
    } finally {
      stop.abort();
      await Promise.allSettled(polls);
    }
  });
});
