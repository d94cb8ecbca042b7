/**
 * Real-process tests: `deno task start` on a free port with a temp-file database, for
 * what only shows over a socket (persistence across restarts, SIGTERM, start-up errors).
 */
import assert from "node:assert/strict";

const ROOT = new URL(".", import.meta.url).pathname;

type Server = {
  url: string;
  /** Sends a signal and waits for the process to exit. */
  stop: (signal?: Deno.Signal) => Promise<Deno.CommandStatus>;
};

/** Runs `deno task start` with `env` and waits for it to listen. */
async function start(env: Record<string, string>): Promise<Server> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["task", "start"],
    cwd: ROOT,
    env: { PORT: "0", HOST: "127.0.0.1", NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let output = "";
  const stderr = child.stderr.pipeThrough(new TextDecoderStream()).pipeTo(
    new WritableStream({ write: (text) => void (output += text) }),
  );
  const listening = Promise.withResolvers<{ url: string; pid: number }>();
  const stdout = child.stdout.pipeThrough(new TextDecoderStream()).pipeTo(
    new WritableStream({
      write(text) {
        output += text;
        const match = output.match(
          /listening on (http:\/\/127\.0\.0\.1:\d+) \(pid (\d+)\)/,
        );
        if (match) listening.resolve({ url: match[1], pid: Number(match[2]) });
      },
    }),
  );
  const exited = child.status.then((status) => {
    listening.reject(
      new Error(
        `the server exited (${status.code}) before listening:\n${output}`,
      ),
    );
    return status;
  });
  let pid = child.pid;
  // Signals go to the server itself, not to `deno task`: SIGTERM would be forwarded,
  // but SIGKILL cannot be, and would leave the server running.
  const stop = async (signal: Deno.Signal = "SIGTERM") => {
    try {
      Deno.kill(pid, signal);
    } catch {
      // already gone
    }
    const status = await exited;
    await Promise.all([stdout, stderr]);
    return status;
  };
  try {
    const server = await listening.promise;
    pid = server.pid;
    return { url: server.url, stop };
  } catch (error) {
    await stop("SIGKILL");
    throw error;
  }
}

/** Runs `deno task start` that is expected to exit by itself; returns its status and output. */
async function startAndExit(env: Record<string, string>) {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["task", "start"],
    cwd: ROOT,
    env: { PORT: "0", HOST: "127.0.0.1", NO_COLOR: "1", ...env },
  }).output();
  return { code: out.code, stderr: new TextDecoder().decode(out.stderr) };
}

/** A JSON call over HTTP that asserts the status and returns the body. */
async function call(
  base: string,
  method: string,
  path: string,
  status: number,
  body?: unknown,
): Promise<unknown> {
  const res = await fetch(base + path, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json();
  assert.equal(
    res.status,
    status,
    `${method} ${path}: ${JSON.stringify(json)}`,
  );
  return json;
}

/** Drops `idle_ms`, which changes with every read. */
function withoutIdle(value: unknown): unknown {
  return JSON.parse(
    JSON.stringify(value, (k, v) => k === "idle_ms" ? undefined : v),
  );
}

/** Everything the service holds, read over HTTP. */
async function everything(base: string) {
  const rooms = (await call(base, "GET", "/rooms", 200)) as { id: string }[];
  const out: Record<string, unknown> = { rooms };
  for (const { id } of rooms) {
    out[id] = await Promise.all([
      call(base, "GET", `/rooms/${id}/agents`, 200),
      call(base, "GET", `/rooms/${id}/messages?limit=1000`, 200),
      call(base, "GET", `/rooms/${id}/state`, 200),
    ]);
  }
  return withoutIdle(out);
}

async function withTempDir(fn: (dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "sync-server-test-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
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
    let server = await start(env);
    const base = server.url;
    try {
      // 1. create or join the room: the first agent creates it, the second joins it.
      await call(base, "POST", "/rooms", 201, {
        id: "crew",
        meta: { goal: "ship" },
      });
      await call(base, "POST", "/rooms", 200, { id: "crew" });
      // 2. register self
      await call(base, "POST", "/rooms/crew/agents", 201, {
        id: "alice",
        name: "Alice",
        role: "planner",
      });
      await call(base, "POST", "/rooms/crew/agents", 201, {
        id: "bob",
        name: "Bob",
        role: "worker",
      });
      const cursor = { alice: 0, bob: 0 };
      const poll = async (agent: "alice" | "bob") => {
        const page = (await call(
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
        await call(base, "POST", "/rooms/crew/messages", 201, {
          from: "alice",
          to: "bob",
          kind: "task",
          body: { round, do: "work" },
        });
        const tasks = await poll("bob");
        assert.deepEqual(tasks.map((m) => m.body), [{ round, do: "work" }]);
        // 4. bob posts the result; 5. and updates state
        await call(base, "POST", "/rooms/crew/messages", 201, {
          from: "bob",
          to: "alice",
          kind: "result",
          body: `done ${round}`,
        });
        await call(base, "PUT", "/rooms/crew/state", 200, {
          scope: "bob",
          key: "progress",
          value: round,
        });
        const shared = (await call(base, "PUT", "/rooms/crew/state", 200, {
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
      await call(base, "DELETE", "/rooms/crew/state", 200, {
        scope: "bob",
        key: "progress",
      });
      await call(base, "POST", "/rooms", 201, { id: "other" });
      await call(base, "PUT", "/rooms/other/state", 200, {
        key: "k",
        value: "42",
      });

      const before = await everything(base);
      const status = await server.stop("SIGTERM");
      assert.equal(status.code, 0, "SIGTERM exits cleanly");

      server = await start(env);
      assert.deepEqual(await everything(server.url), before);
      const next =
        (await call(server.url, "POST", "/rooms/crew/messages", 201, {
          body: "after restart",
        })) as Message;
      assert.equal(next.id, 7, "ids continue after the restart");
      const round = (await call(server.url, "PUT", "/rooms/crew/state", 200, {
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
    const server = await start(env);
    try {
      await call(server.url, "POST", "/rooms", 201, { id: "r" });
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
    const again = await start(env);
    try {
      const messages =
        (await call(again.url, "GET", "/rooms/r/messages", 200)) as Message[];
      assert.deepEqual(messages.map((m) => m.body), ["slow write"]);
    } finally {
      await again.stop();
    }
  });
});

Deno.test("a database that cannot be opened stops the start with one clear line", async () => {
  const { code, stderr } = await startAndExit({
    DATABASE_URL: "file:/nonexistent-dir/sync.db",
  });
  assert.equal(code, 1);
  const lines = stderr.split("\n").filter((line) => line.startsWith("sync:"));
  assert.equal(lines.length, 1, stderr);
  assert.match(
    lines[0],
    /^sync: cannot open the database at file:\/nonexistent-dir\/sync\.db: /,
  );
});
