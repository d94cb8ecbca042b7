/**
 * Test support shared by the suites: a fresh database per test, embedded (`:memory:`)
 * by default, or behind the Hrana test server when `SYNC_TEST_DATABASE=remote`, so the
 * same tests cover the remote libSQL path; and the real server as a process, for the
 * suites that need a socket (server, stress and browser tests).
 */
import { Db } from "./driver.ts";
import { startHranaServer } from "./tools/hrana_server.ts";
import assert from "node:assert/strict";
import { type AppOptions, createApp } from "./main.ts";

/** Which database path the suite runs against. */
export const TEST_DATABASE = Deno.env.get("SYNC_TEST_DATABASE") === "remote"
  ? "remote"
  : "embedded";

/** A fresh, empty database, and how to close it (and its server). */
export async function freshDb(): Promise<
  { db: Db; close: () => Promise<void> }
> {
  if (TEST_DATABASE === "embedded") {
    const db = new Db({ url: ":memory:" });
    return { db, close: () => Promise.resolve(db.close()) };
  }
  const server = await startHranaServer();
  const db = new Db({ url: server.url });
  return {
    db,
    close: async () => {
      db.close();
      await server.close();
    },
  };
}

const ROOT = new URL(".", import.meta.url).pathname;

/** A running `deno task start`. */
export type Server = {
  url: string;
  /** What the process printed so far. */
  output: () => string;
  /** Sends a signal and waits for the process to exit. */
  stop: (signal?: Deno.Signal) => Promise<Deno.CommandStatus>;
};

/**
 * Runs `deno task start` (or deno with `args`, such as `deno serve`) on a free port of
 * 127.0.0.1 with `env` and waits for it to listen.
 */
export async function startServer(
  env: Record<string, string>,
  args = ["task", "start"],
  /** The open-file limit to run it under (`ulimit -n`), if any. */
  fileLimit?: number,
): Promise<Server> {
  const child = new Deno.Command(fileLimit ? "sh" : Deno.execPath(), {
    args: fileLimit
      ? [
        "-c",
        `ulimit -n ${fileLimit} && exec "$@"`,
        "sh",
        Deno.execPath(),
        ...args,
      ]
      : args,
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
    return { url: server.url, output: () => output, stop };
  } catch (error) {
    await stop("SIGKILL");
    throw error;
  }
}

/** An app as `createApp` makes it. */
export type App = ReturnType<typeof createApp>;

/** What a test of the app gets: the app, its database, and a caller of it. */
export type Api = { app: App; db: Db; call: Call };

/**
 * A test with its own app on a fresh database: the rate limit off, `options` as
 * `createApp` takes them, and with `room` a room of that id made first.
 */
export function appTest(
  name: string,
  fn: (api: Api) => Promise<void>,
  options: Partial<AppOptions> & { room?: string } = {},
): void {
  const { room, ...app } = options;
  Deno.test(name, async () => {
    const { db, close } = await freshDb();
    const made = createApp({ db, rateLimit: null, ...app });
    const call = caller(made);
    try {
      if (room !== undefined) {
        assert.equal((await call("POST", "/rooms", { id: room })).status, 201);
      }
      await fn({ app: made, db, call });
    } finally {
      await close();
    }
  });
}

/** An answer: its body parsed when it is JSON (else the text), and its text. */
export type Reply = {
  status: number;
  body: unknown;
  text: string;
  headers: Headers;
};

/** Calls an app in-process; `env` is what a host would pass as Hono's env. */
export type Call = (
  method: string,
  path: string,
  body?: unknown,
  headers?: Record<string, string>,
  env?: unknown,
) => Promise<Reply>;

/** Calls the app; `body` is sent as JSON unless it is already a string. */
export function caller(app: App): Call {
  return async (method, path, body, headers = {}, env) => {
    const res = await app.request(path, {
      method,
      headers: { "content-type": "application/json", ...headers },
      body: body === undefined
        ? undefined
        : typeof body === "string"
        ? body
        : JSON.stringify(body),
    }, env);
    const text = await res.text();
    const type = res.headers.get("content-type") ?? "";
    return {
      status: res.status,
      // JSON, not NDJSON (an export), which stays text.
      body: /[/+]json\s*(;|$)/.test(type) ? JSON.parse(text) : text,
      text,
      headers: res.headers,
    };
  };
}

const ISO = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;

const TIME_FIELDS = [
  "created_at",
  "joined_at",
  "updated_at",
  "last_seen",
  "claimed_at",
  "lease_expires_at",
  "done_at",
  "expires_at",
];

/**
 * Checks every time field is ISO 8601 UTC (or null) and replaces it with "<time>", and
 * `idle_ms` with "<ms>", and an error's `message` with "<message>" once it is checked
 * to be a sentence (unless `messages: "keep"`): what is left can be compared whole.
 */
export function times(
  value: unknown,
  options: { messages?: "keep" } = {},
): unknown {
  const again = (v: unknown) => times(v, options);
  if (Array.isArray(value)) return value.map(again);
  if (value === null || typeof value !== "object") return value;
  if ("error" in value && "docs" in value) {
    // Every error links to its docs section (checked in openapi_test.ts); compared apart.
    const { docs, ...rest } = value as Record<string, unknown>;
    assert.match(String(docs), /^https?:\/\/[^/]+\/README\.md#[a-z-]+$/);
    return again(rest);
  }
  const isError = "error" in value && options.messages !== "keep";
  return Object.fromEntries(
    Object.entries(value).map(([k, v]) => {
      if (TIME_FIELDS.includes(k) && v !== null) {
        assert.match(String(v), ISO, `${k} is ISO 8601 UTC`);
        return [k, "<time>"];
      }
      if (k === "token" || k === "view_token") {
        assert.match(
          String(v),
          /^(room|view|as)_[A-Za-z0-9_-]{43}$/,
          `${k} is a token`,
        );
        return [k, "<token>"];
      }
      if (k === "idle_ms") {
        assert.ok(
          typeof v === "number" && v >= 0,
          "idle_ms is a count of milliseconds",
        );
        return [k, "<ms>"];
      }
      if (isError && k === "message") {
        assert.ok(
          typeof v === "string" && v.length > 10,
          "an error message says what went wrong",
        );
        return [k, "<message>"];
      }
      return [k, again(v)];
    }),
  );
}

/** A message of room "r" as `times()` leaves it. */
export function message(
  id: number,
  body: unknown,
  more: Record<string, unknown> = {},
) {
  return {
    id,
    room_id: "r",
    from_agent: null,
    to_agent: null,
    kind: "message",
    body,
    created_at: "<time>",
    reply_to: null,
    claimed_by: null,
    claimed_at: null,
    lease_expires_at: null,
    status: "open",
    attempts: 0,
    max_attempts: null,
    done_at: null,
    done_by: null,
    ...more,
  };
}

/** Runs `fn` with a fresh temp folder, removed afterwards. */
export async function withTempDir(fn: (dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "sync-test-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

/**
 * A JSON call over HTTP to a running server, with an optional bearer token; asserts
 * the status and answers the body.
 */
export async function expect(
  base: string,
  method: string,
  path: string,
  status: number,
  body?: unknown,
  token?: string,
  // deno-lint-ignore no-explicit-any
): Promise<any> {
  const headers: Record<string, string> = {
    "content-type": "application/json",
  };
  if (token) headers.authorization = `Bearer ${token}`;
  const res = await fetch(base + path, {
    method,
    headers,
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

/** An agent of room "r" as `times()` leaves it (with `token` when it was just issued). */
/** A state entry of room "r" (scope `_shared`) as `times()` leaves it. */
export function entry(
  key: string,
  value: unknown,
  version: number,
  more: Record<string, unknown> = {},
) {
  return {
    room_id: "r",
    scope: "_shared",
    key,
    value,
    version,
    updated_at: "<time>",
    expires_at: null,
    updated_by: null,
    ...more,
  };
}

export function agent(
  id: string,
  name: string,
  more: Record<string, unknown> = {},
) {
  return {
    id,
    room_id: "r",
    name,
    role: "agent",
    joined_at: "<time>",
    meta: {},
    status: "active",
    last_seen: "<time>",
    idle_ms: "<ms>",
    ...more,
  };
}

/** An MCP `initialize` request (JSON-RPC id 1) from the client `name`. */
export function mcpInitialize(name: string, version: string) {
  return {
    jsonrpc: "2.0",
    id: 1,
    method: "initialize",
    params: {
      protocolVersion: "2025-06-18",
      capabilities: {},
      clientInfo: { name, version },
    },
  };
}
