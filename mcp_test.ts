/**
 * The MCP endpoint, driven by the official SDK's own Client over real HTTP: the tools
 * mirror REST, errors carry REST's codes, and a Bearer token applies as on REST.
 */
import assert from "node:assert/strict";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { createApp } from "./main.ts";
import { freshDb } from "./testing.ts";

type Tool = { structuredContent?: Record<string, unknown>; isError?: boolean };

/** A listed tool, as far as these tests read it (the SDK's result types resolve to any here). */
type Listed = {
  name: string;
  annotations?: { readOnlyHint?: boolean; idempotentHint?: boolean };
  outputSchema?: unknown;
  inputSchema: { required?: string[] };
};

/** A served app on a free port, and MCP clients for it (with a token or without). */
async function withServer(
  fn: (t: {
    base: string;
    connect: (token?: string) => Promise<Client>;
  }) => Promise<void>,
) {
  const { db, close } = await freshDb();
  const app = createApp({ db, rateLimit: null });
  const server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    app.fetch,
  );
  const base = `http://127.0.0.1:${server.addr.port}`;
  const clients: Client[] = [];
  const connect = async (token?: string) => {
    const client = new Client({ name: "test", version: "1.0.0" });
    await client.connect(
      new StreamableHTTPClientTransport(new URL(`${base}/mcp`), {
        requestInit: {
          headers: token ? { authorization: `Bearer ${token}` } : {},
        },
      }),
    );
    clients.push(client);
    return client;
  };
  try {
    await fn({ base, connect });
  } finally {
    for (const client of clients) await client.close();
    await server.shutdown();
    await close();
  }
}

async function call(
  client: Client,
  name: string,
  args: Record<string, unknown>,
): Promise<Tool> {
  return await client.callTool({ name, arguments: args }) as Tool;
}

Deno.test("MCP lists the ten tools, with read-only and idempotent hints", async () => {
  await withServer(async ({ connect }) => {
    const client = await connect();
    const tools = (await client.listTools()).tools as Listed[];
    assert.deepEqual(tools.map((t) => t.name).sort(), [
      "batch",
      "claim_message",
      "create_room",
      "get_context",
      "get_state",
      "heartbeat",
      "join_room",
      "post_message",
      "read_messages",
      "set_state",
    ]);
    const hints = Object.fromEntries(
      tools.map((t) => [t.name, t.annotations?.readOnlyHint]),
    );
    assert.equal(hints.read_messages, true);
    assert.equal(hints.get_state, true);
    assert.equal(hints.get_context, true);
    assert.equal(hints.post_message, false);
    const read = tools.find((t) => t.name === "read_messages")!;
    assert.equal(read.annotations?.idempotentHint, true);
    for (const tool of tools) {
      assert.ok(tool.outputSchema, `${tool.name} declares its output`);
    }
    const room = tools.find((t) => t.name === "post_message")!.inputSchema;
    assert.deepEqual(room.required?.sort(), ["body", "room"]);
  });
});

Deno.test("MCP tools create, join, post, read, wait, claim and write state; REST sees it all", async () => {
  await withServer(async ({ base, connect }) => {
    const anon = await connect();
    const created = await call(anon, "create_room", { id: "m" });
    assert.equal(created.isError, false);
    assert.equal(created.structuredContent?.id, "m");
    assert.match(String(created.structuredContent?.token), /^room_/);
    const joined = await call(anon, "join_room", {
      room: "m",
      id: "alice",
      name: "Alice",
    });
    const token = String(joined.structuredContent?.token);
    assert.match(token, /^as_/);

    // With alice's token, posts are alice's.
    const alice = await connect(token);
    const posted = await call(alice, "post_message", {
      room: "m",
      kind: "task",
      body: { do: "x" },
    });
    assert.equal(posted.structuredContent?.from_agent, "alice");
    const read = await call(alice, "read_messages", {
      room: "m",
      after: 0,
      wait: 0,
    });
    assert.deepEqual(
      (read.structuredContent?.messages as { id: number }[]).map((m) => m.id),
      [posted.structuredContent?.id],
    );

    // A read with wait is woken by a write made over REST.
    const waiting = call(alice, "read_messages", {
      room: "m",
      after: posted.structuredContent?.id,
      wait: 5,
    });
    await new Promise((resolve) => setTimeout(resolve, 100));
    const res = await fetch(`${base}/rooms/m/messages`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ body: "over REST" }),
    });
    assert.equal(res.status, 201);
    const woke = await waiting;
    assert.deepEqual(
      (woke.structuredContent?.messages as { body: unknown }[]).map((m) =>
        m.body
      ),
      [
        "over REST",
      ],
    );

    // Claims: alice wins, bob gets REST's already_claimed as an isError result.
    const claimed = await call(alice, "claim_message", {
      room: "m",
      message_id: posted.structuredContent?.id,
    });
    assert.equal(claimed.structuredContent?.claimed, true);
    const bob = await call(anon, "claim_message", {
      room: "m",
      message_id: posted.structuredContent?.id,
      agent: "bob",
    });
    assert.equal(bob.isError, true);
    assert.equal(bob.structuredContent?.error, "already_claimed");
    assert.equal(bob.structuredContent?.claimed_by, "alice");

    // State, compare-and-set: a conflict is isError with version_conflict and current.
    const set = await call(alice, "set_state", {
      room: "m",
      key: "turn",
      value: "alice",
    });
    assert.equal(set.structuredContent?.version, 1);
    const conflict = await call(alice, "set_state", {
      room: "m",
      key: "turn",
      value: "x",
      if_version: 5,
    });
    assert.equal(conflict.isError, true);
    assert.equal(conflict.structuredContent?.error, "version_conflict");
    assert.equal(
      (conflict.structuredContent?.current as { version: number }).version,
      1,
    );
    const got = await call(anon, "get_state", { room: "m", key: "turn" });
    assert.equal(got.structuredContent?.value, "alice");

    // Batch, heartbeat, context.
    const batch = await call(alice, "batch", {
      room: "m",
      state: [{ key: "n", increment: 2 }],
      messages: [{ body: "in a batch" }],
    });
    assert.equal(batch.isError, false);
    const beat = await call(alice, "heartbeat", {
      room: "m",
      agent: "alice",
      status: "busy",
    });
    assert.equal(beat.structuredContent?.status, "busy");
    const context = await call(anon, "get_context", {
      room: "m",
      messages: 10,
    });
    assert.equal(
      (context.structuredContent?.messages as { total: number }).total,
      3,
    );

    // REST sees what MCP wrote.
    const messages = await (await fetch(`${base}/rooms/m/messages`)).json();
    assert.deepEqual(messages.map((m: { body: unknown }) => m.body), [
      { do: "x" },
      "over REST",
      "in a batch",
    ]);
    const n = await (await fetch(`${base}/rooms/m/state?key=n`)).json();
    assert.equal(n.value, 2);
  });
});

Deno.test("a Bearer token on the MCP request applies exactly as on REST", async () => {
  await withServer(async ({ connect }) => {
    const anon = await connect();
    const room = String(
      (await call(anon, "create_room", { id: "l", locked: true }))
        .structuredContent?.token,
    );
    const locked = await call(anon, "read_messages", { room: "l", wait: 0 });
    assert.equal(locked.isError, true);
    assert.equal(locked.structuredContent?.error, "token_required");
    const admin = await connect(room);
    const agent = String(
      (await call(admin, "join_room", { room: "l", id: "a", name: "A" }))
        .structuredContent?.token,
    );
    const a = await connect(agent);
    const mismatch = await call(a, "post_message", {
      room: "l",
      from: "b",
      body: 1,
    });
    assert.equal(mismatch.isError, true);
    assert.equal(mismatch.structuredContent?.error, "identity_mismatch");
    const garbage = await connect("nope");
    const refused = await call(garbage, "get_context", { room: "l" });
    assert.equal(refused.structuredContent?.error, "invalid_token");
  });
});

Deno.test("the MCP endpoint refuses a browser page of another origin", async () => {
  await withServer(async ({ base }) => {
    const res = await fetch(`${base}/mcp`, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        accept: "application/json, text/event-stream",
        origin: "http://evil.example",
      },
      body: JSON.stringify({ jsonrpc: "2.0", id: 1, method: "tools/list" }),
    });
    assert.equal(res.status, 403);
    const body = await res.json();
    assert.equal(body.error, "forbidden");
    assert.match(body.docs, /\/README\.md#/);
    // Its own origin is refused too: under DNS rebinding the Host is the attacker's.
    const same = await fetch(`${base}/mcp`, {
      method: "POST",
      headers: { "content-type": "application/json", origin: base },
      body: "{}",
    });
    assert.equal(same.status, 403);
    await same.body?.cancel();
  });
});

Deno.test("the MCP endpoint takes one call per request: a JSON-RPC batch is 400", async () => {
  await withServer(async ({ base }) => {
    const calls = Array.from({ length: 3 }, (_, i) => ({
      jsonrpc: "2.0",
      id: i,
      method: "tools/call",
      params: { name: "create_room", arguments: { id: `b${i}` } },
    }));
    const res = await fetch(`${base}/mcp`, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        accept: "application/json, text/event-stream",
      },
      body: JSON.stringify(calls),
    });
    assert.equal(res.status, 400);
    assert.equal((await res.json()).error, "invalid_request");
    const rooms = await (await fetch(`${base}/rooms`)).json();
    assert.deepEqual(rooms, []);
  });
});

Deno.test("post_message passes an idempotency_key on: a retry writes once", async () => {
  await withServer(async ({ base, connect }) => {
    const client = await connect();
    await call(client, "create_room", { id: "i" });
    const args = { room: "i", body: "once", idempotency_key: "k1" };
    const first = await call(client, "post_message", args);
    const again = await call(client, "post_message", args);
    assert.equal(again.structuredContent?.id, first.structuredContent?.id);
    const messages = await (await fetch(`${base}/rooms/i/messages`)).json();
    assert.equal(messages.length, 1);
  });
});
