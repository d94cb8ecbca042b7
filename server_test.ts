/**
 * Real-process tests: `deno task start` on a free port with a temp-file database, for
 * what only shows over a socket (persistence across restarts, SIGTERM, start-up errors).
 */
import assert from "node:assert/strict";
import { expect, startServer, withTempDir } from "./testing.ts";

const ROOT = new URL(".", import.meta.url).pathname;

/** Runs `deno task start` that is expected to exit by itself; returns its status and output. */
async function startAndExit(env: Record<string, string>) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["task", "start"],
    cwd: ROOT,
    env: { PORT: "0", HOST: "127.0.0.1", NO_COLOR: "1", ...env },
  }).output();
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
}

/**
 * Starts with this DATABASE_URL, which cannot be opened: asserts the process exits 1
 * having printed exactly one `sync:` line, matching `line`; answers all it printed.
 */
async function assertStartFails(url: string, line: RegExp): Promise<string> {
  const { code, stderr } = await startAndExit({ DATABASE_URL: url });
  assert.equal(code, 1);
  const lines = stderr.split("\n").filter((l) => l.startsWith("sync:"));
  assert.equal(lines.length, 1, stderr);
  assert.match(lines[0], line);
  return stderr;
}

/** Drops `idle_ms`, which changes with every read. */
function withoutIdle(value: unknown): unknown {
  return JSON.parse(
    JSON.stringify(value, (k, v) => k === "idle_ms" ? undefined : v),
  );
}

/** Everything the service holds, read over HTTP. */
async function everything(base: string) {
  const rooms = (await expect(base, "GET", "/rooms", 200)) as { id: string }[];
  const out: Record<string, unknown> = { rooms };
  for (const { id } of rooms) {
    out[id] = await Promise.all([
      expect(base, "GET", `/rooms/${id}/agents`, 200),
      expect(base, "GET", `/rooms/${id}/messages?limit=1000`, 200),
      expect(base, "GET", `/rooms/${id}/state`, 200),
    ]);
  }
  return withoutIdle(out);
}

type Message = {
  id: number;
  from_agent: string;
  to_agent: string;
  kind: string;
  body: unknown;
};

Deno.test("the seed agent loop with two agents survives a restart of deno task start", async () => {
  await withTempDir(async (dir) => {
    const env = { DATABASE_URL: `file:${dir}/sync.db` };
    let server = await startServer(env);
    const base = server.url;
    try {
      // 1. create or join the room: the first agent creates it, the second joins it.
      await expect(base, "POST", "/rooms", 201, {
        id: "crew",
        meta: { goal: "ship" },
      });
      await expect(base, "POST", "/rooms", 200, { id: "crew" });
      // 2. register self
      await expect(base, "POST", "/rooms/crew/agents", 201, {
        id: "alice",
        name: "Alice",
        role: "planner",
      });
      await expect(base, "POST", "/rooms/crew/agents", 201, {
        id: "bob",
        name: "Bob",
        role: "worker",
      });
      const cursor = { alice: 0, bob: 0 };
      const poll = async (agent: "alice" | "bob") => {
        const page = (await expect(
          base,
          "GET",
          `/rooms/crew/messages?after=${cursor[agent]}`,
          200,
        )) as Message[];
        if (page.length > 0) cursor[agent] = page[page.length - 1].id;
        return page.filter((m) => m.to_agent === agent);
      };
      for (let round = 1; round <= 3; round++) {
        // 4. alice posts a task; 3. bob polls and finds it
        await expect(base, "POST", "/rooms/crew/messages", 201, {
          from: "alice",
          to: "bob",
          kind: "task",
          body: { round, do: "work" },
        });
        const tasks = await poll("bob");
        assert.deepEqual(tasks.map((m) => m.body), [{ round, do: "work" }]);
        // 4. bob posts the result; 5. and updates state
        await expect(base, "POST", "/rooms/crew/messages", 201, {
          from: "bob",
          to: "alice",
          kind: "result",
          body: `done ${round}`,
        });
        await expect(base, "PUT", "/rooms/crew/state", 200, {
          scope: "bob",
          key: "progress",
          value: round,
        });
        const shared = (await expect(base, "PUT", "/rooms/crew/state", 200, {
          key: "round",
          value: round,
        })) as {
          version: number;
        };
        assert.equal(shared.version, round);
        // 6. alice polls again and sees the result
        const results = await poll("alice");
        assert.deepEqual(results.map((m) => m.body), [`done ${round}`]);
      }
      await expect(base, "DELETE", "/rooms/crew/state", 200, {
        scope: "bob",
        key: "progress",
      });
      await expect(base, "POST", "/rooms", 201, { id: "other" });
      await expect(base, "PUT", "/rooms/other/state", 200, {
        key: "k",
        value: "42",
      });

      const before = await everything(base);
      const status = await server.stop("SIGTERM");
      assert.equal(status.code, 0, "SIGTERM exits cleanly");

      server = await startServer(env);
      assert.deepEqual(await everything(server.url), before);
      const next =
        (await expect(server.url, "POST", "/rooms/crew/messages", 201, {
          body: "after restart",
        })) as Message;
      assert.equal(next.id, 7, "ids continue after the restart");
      const round = (await expect(server.url, "PUT", "/rooms/crew/state", 200, {
        key: "round",
        value: 4,
      })) as {
        version: number;
      };
      assert.equal(round.version, 4, "versions continue after the restart");
    } finally {
      await server.stop("SIGKILL");
    }
  });
});

Deno.test("SIGTERM lets an in-flight request finish before the process exits", async () => {
  await withTempDir(async (dir) => {
    const env = { DATABASE_URL: `file:${dir}/sync.db` };
    const server = await startServer(env);
    try {
      await expect(server.url, "POST", "/rooms", 201, { id: "r" });
      // A request whose body is still arriving when SIGTERM lands.
      const rest = Promise.withResolvers<void>();
      const encoder = new TextEncoder();
      const body = new ReadableStream<Uint8Array>({
        async start(controller) {
          controller.enqueue(encoder.encode('{"body": "slow'));
          await rest.promise;
          controller.enqueue(encoder.encode(' write"}'));
          controller.close();
        },
      });
      const pending = fetch(`${server.url}/rooms/r/messages`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body,
      });
      await new Promise((resolve) => setTimeout(resolve, 200));
      const stopped = server.stop("SIGTERM");
      await new Promise((resolve) => setTimeout(resolve, 300));
      // While it drains, new requests are refused with a clear retryable error.
      const refused = await fetch(`${server.url}/rooms/r/messages`);
      assert.equal(refused.status, 503);
      assert.equal(refused.headers.get("retry-after"), "1");
      assert.equal((await refused.json()).error, "shutting_down");
      rest.resolve();
      const res = await pending;
      assert.equal(res.status, 201);
      assert.equal((await res.json()).body, "slow write");
      assert.equal((await stopped).code, 0);
    } finally {
      await server.stop("SIGKILL");
    }
    const again = await startServer(env);
    try {
      const messages =
        (await expect(again.url, "GET", "/rooms/r/messages", 200)) as Message[];
      assert.deepEqual(messages.map((m) => m.body), ["slow write"]);
    } finally {
      await again.stop();
    }
  });
});

Deno.test("a database that cannot be opened stops the start with one clear line", async () => {
  await assertStartFails(
    "file:/nonexistent-dir/sync.db",
    /^sync: cannot open the database at file:\/nonexistent-dir\/sync\.db: /,
  );
});

/** Milliseconds at percentile p of sorted samples. */
function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))];
}

Deno.test("the start-up line never shows a user, password or token from DATABASE_URL", async () => {
  // Port 1 refuses at once: the start fails, and says where it tried.
  const stderr = await assertStartFails(
    "http://someone:hunter2@127.0.0.1:1/?authToken=sekrit",
    /^sync: cannot open the database at http:\/\/127\.0\.0\.1:1\/: /,
  );
  assert.doesNotMatch(stderr, /someone|hunter2|sekrit/);
});

/** Runs `fn` on a server of its own (a temp-file database) with room "r"; then stops it. */
async function withRoom(fn: (base: string) => Promise<void>) {
  await withTempDir(async (dir) => {
    const server = await startServer({ DATABASE_URL: `file:${dir}/sync.db` });
    try {
      await expect(server.url, "POST", "/rooms", 201, { id: "r" });
      await fn(server.url);
    } finally {
      await server.stop();
    }
  });
}

/**
 * `rounds` times: a long-poll of room "r" on `waitOn`, then, `pause` ms later, a message
 * posted through `postTo`; asserts each poll answers with that message. Answers the ms
 * from sending each post to its poll answering, sorted.
 */
async function wakeTimes(
  waitOn: string,
  postTo: string,
  rounds: number,
  pause: number,
): Promise<number[]> {
  const samples: number[] = [];
  let after = 0;
  for (let i = 0; i < rounds; i++) {
    const waiter = fetch(`${waitOn}/rooms/r/messages?after=${after}&wait=10`)
      .then((r) => r.json());
    await new Promise((resolve) => setTimeout(resolve, pause));
    const t0 = performance.now();
    const posted = (await expect(postTo, "POST", "/rooms/r/messages", 201, {
      body: i,
    })) as Message;
    const woke = (await waiter) as Message[];
    samples.push(performance.now() - t0);
    assert.deepEqual(woke.map((m) => m.id), [posted.id]);
    after = posted.id;
  }
  return samples.sort((a, b) => a - b);
}

Deno.test("a long-poll is held, woken within milliseconds by a write, and times out near the asked time", async () => {
  await withRoom(async (base) => {
    // Timeout: an empty wait of 1 s answers [] after about 1 s.
    const t0 = performance.now();
    assert.deepEqual(
      await expect(base, "GET", "/rooms/r/messages?wait=1", 200),
      [],
    );
    const held = performance.now() - t0;
    assert.ok(held >= 950 && held < 2000, `held ${held} ms for wait=1`);
    // Wake: 30 rounds of waiter, then write; the waiter answers with that message.
    const samples = await wakeTimes(base, base, 30, 20);
    console.log(
      `same-process wake (write sent → waiter answered), 30 samples: p50 ${
        percentile(samples, 0.5).toFixed(1)
      } ms, max ${samples.at(-1)!.toFixed(1)} ms`,
    );
    assert.ok(
      percentile(samples, 0.5) < 100,
      "woken by the write, not by a timer",
    );
  });
});

/** Reads SSE events from a response until `count` message events arrived; returns those. */
async function readEvents(res: Response, count: number) {
  const events: { event: string; id?: string; data: unknown }[] = [];
  const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  while (events.filter((e) => e.event === "message").length < count) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const fields = Object.fromEntries(
        block.split("\n").filter((l) => !l.startsWith(":")).map((l) => {
          const i = l.indexOf(":");
          return [l.slice(0, i), l.slice(i + 1).trimStart()];
        }),
      );
      if (fields.data !== undefined) {
        events.push({
          event: fields.event ?? "message",
          id: fields.id,
          data: JSON.parse(fields.data),
        });
      }
    }
  }
  await reader.cancel();
  return events.filter((e) => e.event === "message");
}

Deno.test("the SSE stream sends messages in order and Last-Event-ID resumes with no gap or duplicate", async () => {
  await withRoom(async (base) => {
    for (let i = 1; i <= 3; i++) {
      await expect(base, "POST", "/rooms/r/messages", 201, { body: i });
    }
    const res = await fetch(`${base}/rooms/r/stream?after=1`);
    assert.equal(res.headers.get("content-type"), "text/event-stream");
    assert.equal(res.headers.get("x-accel-buffering"), "no");
    const live = (async () => {
      await new Promise((resolve) => setTimeout(resolve, 100));
      await expect(base, "POST", "/rooms/r/messages", 201, { body: 4 });
    })();
    const first = await readEvents(res, 3);
    await live;
    assert.deepEqual(first.map((e) => [e.event, e.id]), [
      ["message", "2"],
      ["message", "3"],
      ["message", "4"],
    ]);
    // The client "drops" after id 3 and resumes: it gets 4, then 5 posted later.
    await expect(base, "POST", "/rooms/r/messages", 201, { body: 5 });
    const resumed = await fetch(`${base}/rooms/r/stream`, {
      headers: { "last-event-id": "3" },
    });
    const next = await readEvents(resumed, 2);
    assert.deepEqual(next.map((e) => [e.id, (e.data as Message).body]), [
      ["4", 4],
      ["5", 5],
    ]);
  });
});

Deno.test("two instances on one database file: waiters are woken across them, CAS and claims stay exclusive", async () => {
  await withTempDir(async (dir) => {
    const env = { DATABASE_URL: `file:${dir}/sync.db` };
    const a = await startServer(env);
    const b = await startServer(env);
    try {
      await expect(a.url, "POST", "/rooms", 201, { id: "r" });
      await expect(b.url, "POST", "/rooms", 200, { id: "r" });
      // A waiter on A, a write on B.
      const samples = await wakeTimes(a.url, b.url, 5, 50);
      console.log(
        `cross-instance wake, 5 samples: p50 ${
          percentile(samples, 0.5).toFixed(0)
        } ms, max ${samples.at(-1)!.toFixed(0)} ms`,
      );
      assert.ok(samples.at(-1)! < 2000, "woken within about a second");
      // A state waiter on B, a write on A.
      await expect(a.url, "PUT", "/rooms/r/state", 200, {
        key: "turn",
        value: "a",
      });
      const stateWaiter = fetch(
        `${b.url}/rooms/r/state?key=turn&after_version=1&wait=10`,
      ).then((r) => r.json());
      await new Promise((resolve) => setTimeout(resolve, 50));
      await expect(a.url, "PUT", "/rooms/r/state", 200, {
        key: "turn",
        value: "b",
      });
      assert.equal((await stateWaiter).value, "b");

      // 20 CAS writers split over both instances: exactly one wins.
      await expect(a.url, "PUT", "/rooms/r/state", 200, {
        key: "lock",
        value: "free",
      });
      const writers = await Promise.all(
        Array.from(
          { length: 20 },
          (_, i) =>
            fetch(`${i % 2 ? a.url : b.url}/rooms/r/state`, {
              method: "PUT",
              headers: { "content-type": "application/json" },
              body: JSON.stringify({
                key: "lock",
                value: `w${i}`,
                if_version: 1,
              }),
            }).then(async (r) => ({ status: r.status, body: await r.json() })),
        ),
      );
      assert.equal(writers.filter((w) => w.status === 200).length, 1);
      assert.equal(writers.filter((w) => w.status === 409).length, 19);
      // 20 claimers of one task split over both instances: exactly one holds it.
      const task = (await expect(a.url, "POST", "/rooms/r/messages", 201, {
        kind: "task",
        body: "t",
      })) as Message;
      const claims = await Promise.all(
        Array.from(
          { length: 20 },
          (_, i) =>
            fetch(
              `${i % 2 ? a.url : b.url}/rooms/r/messages/${task.id}/claim`,
              {
                method: "POST",
                headers: { "content-type": "application/json" },
                body: JSON.stringify({ agent: `w${i}` }),
              },
            ).then(async (r) => ({ status: r.status, body: await r.json() })),
        ),
      );
      assert.equal(claims.filter((c) => c.status === 200).length, 1);
      assert.equal(claims.filter((c) => c.status === 409).length, 19);
      // 40 increments split over both instances add exactly 40.
      await Promise.all(
        Array.from(
          { length: 40 },
          (_, i) =>
            expect(i % 2 ? a.url : b.url, "PUT", "/rooms/r/state", 200, {
              key: "n",
              increment: true,
            }),
        ),
      );
      assert.equal(
        ((await expect(b.url, "GET", "/rooms/r/state?key=n", 200)) as {
          value: number;
        }).value,
        40,
      );
    } finally {
      await a.stop();
      await b.stop();
    }
  });
});

Deno.test("SIGTERM ends open long-polls and streams at once and exits within a few seconds", async () => {
  await withTempDir(async (dir) => {
    const server = await startServer({ DATABASE_URL: `file:${dir}/sync.db` });
    const base = server.url;
    await expect(base, "POST", "/rooms", 201, { id: "r" });
    await expect(base, "PUT", "/rooms/r/state", 200, { key: "k", value: 1 });
    const polls = Array.from(
      { length: 5 },
      () =>
        fetch(`${base}/rooms/r/messages?wait=50`).then(async (
          r,
        ) => [r.status, await r.json()]),
    );
    const stateWait = fetch(
      `${base}/rooms/r/state?key=k&after_version=1&wait=50`,
    ).then(async (
      r,
    ) => [r.status, await r.json()]);
    const stream = await fetch(`${base}/rooms/r/stream`);
    const streamText = stream.text();
    await new Promise((resolve) => setTimeout(resolve, 300));
    const t0 = performance.now();
    const status = await server.stop("SIGTERM");
    const took = performance.now() - t0;
    assert.equal(status.code, 0);
    assert.ok(took < 3000, `exited after ${took} ms`);
    for (const poll of await Promise.all(polls)) {
      assert.deepEqual(poll, [200, []]);
    }
    const [code, entry] = await stateWait;
    assert.equal(code, 200);
    assert.equal((entry as { version: number }).version, 1);
    assert.ok(
      (await streamText).includes("event: state"),
      "the stream ended cleanly",
    );
  });
});

Deno.test("SIGTERM exits even when a stream's client stopped reading", async () => {
  await withTempDir(async (dir) => {
    const server = await startServer({ DATABASE_URL: `file:${dir}/sync.db` });
    const base = server.url;
    await expect(base, "POST", "/rooms", 201, { id: "r" });
    const { port } = new URL(base);
    const conn = await Deno.connect({
      hostname: "127.0.0.1",
      port: Number(port),
    });
    await conn.write(
      new TextEncoder().encode(
        `GET /rooms/r/stream HTTP/1.1\r\nHost: x\r\n\r\n`,
      ),
    );
    // 12 MB of messages the client never reads fill every buffer on the way.
    const big = "x".repeat(200_000);
    for (let i = 0; i < 60; i++) {
      await expect(base, "POST", "/rooms/r/messages", 201, { body: big });
    }
    const t0 = performance.now();
    const status = await server.stop("SIGTERM");
    const took = performance.now() - t0;
    conn.close();
    assert.equal(status.code, 0);
    assert.ok(took < 4_000, `exited after ${took.toFixed(0)} ms`);
    console.log(`exit with a stalled stream open: ${took.toFixed(0)} ms`);
  });
});

Deno.test("a malformed Host header is a 400 invalid_request on every route, never a 500", async () => {
  await withTempDir(async (dir) => {
    const server = await startServer({ DATABASE_URL: `file:${dir}/sync.db` });
    try {
      const { port } = new URL(server.url);
      for (const host of ["x:99999", "a b", "[::1"]) {
        for (const path of ["/rooms/nope", "/README.md", "/healthz"]) {
          const conn = await Deno.connect({
            hostname: "127.0.0.1",
            port: Number(port),
          });
          await conn.write(
            new TextEncoder().encode(
              `GET ${path} HTTP/1.1\r\nHost: ${host}\r\nConnection: close\r\n\r\n`,
            ),
          );
          let text = "";
          const decoder = new TextDecoder();
          for await (const chunk of conn.readable) {
            text += decoder.decode(chunk, { stream: true });
          }
          const [head, body] = text.split("\r\n\r\n");
          const where = `Host ${host}, ${path}`;
          assert.match(head, /^HTTP\/1\.1 400 /, where);
          assert.deepEqual(JSON.parse(body), {
            error: "invalid_request",
            message:
              "The Host header is malformed: send a host name or address, and a port from 1 to 65535",
            field: "Host",
            docs: "/README.md#errors",
          }, where);
        }
      }
      assert.doesNotMatch(server.output(), /TypeError|Invalid URL/);
    } finally {
      await server.stop();
    }
  });
});
