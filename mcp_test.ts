/**
 * The MCP endpoint, driven by the official SDK's own Client over real HTTP, after
 * `listTools` as every real client calls it first (from then on the client checks
 * structured content against each tool's output schema): the tools mirror REST, a
 * failure is REST's error JSON as the text of an `isError` result, and a Bearer token
 * applies as on REST.
 */
import assert from "node:assert/strict";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { createApp } from "./main.ts";
import { freshDb, mcpInitialize } from "./testing.ts";

/** A tool's result, as far as these tests read it (the SDK's types resolve to any here). */
type Result = {
  content: { type: string; text?: string }[];
  structuredContent?: Record<string, unknown>;
  isError?: boolean;
};

/** A listed tool, as far as these tests read it. */
type Listed = {
  name: string;
  annotations?: Record<string, boolean>;
  outputSchema?: unknown;
  inputSchema: { required?: string[]; additionalProperties?: boolean };
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
    // As every real client does: from here on, the client checks each tool's
    // structured content against its output schema.
    await client.listTools();
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
): Promise<Result> {
  return await client.callTool({ name, arguments: args }) as Result;
}

/** A successful call's structured content, checked to be its text too. */
async function ok(
  client: Client,
  name: string,
  args: Record<string, unknown>,
): Promise<Record<string, unknown>> {
  const result = await call(client, name, args);
  assert.equal(
    result.isError,
    false,
    `${name} failed: ${result.content[0]?.text}`,
  );
  assert.ok(result.structuredContent, `${name} has structured content`);
  assert.deepEqual(result.content, [
    { type: "text", text: JSON.stringify(result.structuredContent) },
  ]);
  return result.structuredContent;
}

/**
 * A failed call's REST error body: the whole result is `isError` and one text, the
 * JSON body, with no structured content (which the client would check against the
 * tool's output schema, and throw).
 */
async function refused(
  client: Client,
  name: string,
  args: Record<string, unknown>,
): Promise<Record<string, unknown>> {
  const result = await call(client, name, args);
  assert.equal(result.isError, true, `${name} succeeded`);
  assert.equal(result.structuredContent, undefined);
  assert.equal(result.content.length, 1);
  assert.equal(result.content[0].type, "text");
  return JSON.parse(result.content[0].text!);
}

/** REST's JSON for a GET. */
async function get(base: string, path: string, token?: string) {
  const res = await fetch(base + path, {
    headers: token ? { authorization: `Bearer ${token}` } : {},
  });
  assert.equal(res.status, 200, path);
  return await res.json();
}

/** An agent without `idle_ms`, which is counted at the moment of each answer. */
function withoutIdle(agent: unknown): unknown {
  const { idle_ms: _, ...rest } = agent as Record<string, unknown>;
  return rest;
}

const TIME = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/;

Deno.test("MCP lists the fourteen tools, with their hints and output schemas", async () => {
  await withServer(async ({ connect }) => {
    const client = await connect();
    const tools = (await client.listTools()).tools as Listed[];
    const read = {
      readOnlyHint: true,
      idempotentHint: true,
      openWorldHint: false,
    };
    const write = (destructiveHint: boolean, idempotentHint: boolean) => ({
      readOnlyHint: false,
      destructiveHint,
      idempotentHint,
      openWorldHint: false,
    });
    assert.deepEqual(
      Object.fromEntries(tools.map((t) => [t.name, t.annotations])),
      {
        create_room: write(false, false),
        // Registering an agent again replaces its name, role, meta (and token).
        join_room: write(true, false),
        heartbeat: write(false, true),
        post_message: write(false, false),
        read_messages: read,
        claim_message: write(false, true),
        release_message: write(false, true),
        complete_message: write(false, false),
        get_state: read,
        state_history: read,
        set_state: write(true, false),
        delete_state: write(true, true),
        batch: write(true, false),
        get_context: read,
      },
    );
    for (const tool of tools) {
      assert.ok(tool.outputSchema, `${tool.name} declares its output`);
      // Strict, as REST bodies are: a client sees that unknown arguments are refused.
      assert.equal(tool.inputSchema.additionalProperties, false, tool.name);
    }
    const required = Object.fromEntries(
      tools.map((t) => [t.name, t.inputSchema.required?.toSorted()]),
    );
    assert.deepEqual(required.post_message, ["body", "room"]);
    assert.deepEqual(required.release_message, ["message_id", "room"]);
    assert.deepEqual(required.complete_message, ["message_id", "room"]);
    assert.deepEqual(required.delete_state, ["key", "room"]);
    assert.deepEqual(required.state_history, ["key", "room"]);
  });
});

Deno.test("the MCP server advertises tools only, without listChanged (it is stateless)", async () => {
  await withServer(async ({ base, connect }) => {
    const res = await fetch(`${base}/mcp`, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        accept: "application/json, text/event-stream",
      },
      body: JSON.stringify(mcpInitialize("test", "1.0.0")),
    });
    assert.equal(res.status, 200);
    assert.deepEqual(await res.json(), {
      jsonrpc: "2.0",
      id: 1,
      result: {
        protocolVersion: "2025-06-18",
        capabilities: { tools: {} },
        serverInfo: { name: "sync", version: "1.0.0" },
      },
    });
    const client = await connect();
    assert.deepEqual(client.getServerCapabilities(), { tools: {} });
  });
});

Deno.test("every MCP tool answers REST's JSON as structured content that its output schema accepts", async () => {
  await withServer(async ({ base, connect }) => {
    const anon = await connect();
    const created = await ok(anon, "create_room", { id: "m", meta: { a: 1 } });
    assert.deepEqual(created, {
      id: "m",
      created_at: created.created_at,
      meta: { a: 1 },
      locked: false,
      token: created.token,
      view_token: created.view_token,
    });
    assert.match(String(created.created_at), TIME);
    assert.match(String(created.token), /^room_/);
    assert.match(String(created.view_token), /^view_/);

    const joined = await ok(anon, "join_room", {
      room: "m",
      id: "alice",
      name: "Alice",
    });
    const token = String(joined.token);
    assert.match(token, /^as_/);
    assert.deepEqual(joined, {
      ...(await get(base, "/rooms/m/agents"))[0],
      idle_ms: joined.idle_ms,
      token,
    });

    // With alice's token, posts and claims are alice's.
    const alice = await connect(token);
    const beat = await ok(alice, "heartbeat", {
      room: "m",
      agent: "alice",
      status: "busy",
    });
    assert.deepEqual(beat, {
      ...(await get(base, "/rooms/m/agents"))[0],
      idle_ms: beat.idle_ms,
    });
    assert.equal(beat.status, "busy");

    const posted = await ok(alice, "post_message", {
      room: "m",
      kind: "task",
      body: { do: "x" },
    });
    const id = posted.id as number;
    const message = async () =>
      (await get(base, `/rooms/m/messages?kind=task`))[0];
    assert.deepEqual(posted, await message());
    assert.equal(posted.from_agent, "alice");

    const read = await ok(alice, "read_messages", {
      room: "m",
      after: 0,
      wait: 0,
    });
    assert.deepEqual(read, { messages: [posted] });

    const claimed = await ok(alice, "claim_message", {
      room: "m",
      message_id: id,
      lease: 60,
    });
    assert.deepEqual(claimed, { claimed: true, message: await message() });
    assert.equal(
      (claimed.message as { claimed_by: string }).claimed_by,
      "alice",
    );

    const released = await ok(alice, "release_message", {
      room: "m",
      message_id: id,
    });
    const tried = { ...posted, attempts: 1 };
    assert.deepEqual(released, { released: true, message: tried });
    // Released again: nothing to give back, and no error.
    assert.deepEqual(
      await ok(alice, "release_message", { room: "m", message_id: id }),
      { released: false, message: tried },
    );

    await ok(alice, "claim_message", { room: "m", message_id: id });
    const completed = await ok(alice, "complete_message", {
      room: "m",
      message_id: id,
      result: { body: { done: true } },
    });
    const thread = await get(base, `/rooms/m/messages?thread=${id}`);
    assert.deepEqual(completed, {
      completed: true,
      message: thread[0],
      result: thread[1],
    });
    assert.equal((completed.message as { status: string }).status, "done");
    assert.equal((completed.result as { reply_to: number }).reply_to, id);
    const open = await ok(alice, "read_messages", {
      room: "m",
      status: ["done"],
      wait: 0,
    });
    assert.deepEqual(open, { messages: [thread[0]] });

    const set = await ok(alice, "set_state", {
      room: "m",
      key: "turn",
      value: "alice",
    });
    assert.deepEqual(set, await get(base, "/rooms/m/state?key=turn"));
    assert.equal(set.version, 1);
    assert.deepEqual(
      await ok(anon, "get_state", { room: "m", key: "turn" }),
      set,
    );
    assert.deepEqual(await ok(anon, "get_state", { room: "m" }), {
      entries: [set],
    });

    const batch = await ok(alice, "batch", {
      room: "m",
      state: [{ key: "n", increment: 2 }, { key: "turn", delete: true }],
      messages: [{ body: "in a batch" }],
    });
    const n = await get(base, "/rooms/m/state?key=n");
    assert.deepEqual(batch, {
      state: [n, {
        room_id: "m",
        scope: "_shared",
        key: "turn",
        deleted: true,
      }],
      messages: await get(
        base,
        "/rooms/m/messages?after=" + (completed.result as { id: number }).id,
      ),
    });

    assert.deepEqual(
      await ok(alice, "delete_state", { room: "m", key: "n", if_version: 1 }),
      { deleted: true },
    );
    assert.deepEqual(
      await ok(alice, "delete_state", { room: "m", key: "n" }),
      { deleted: false },
    );
    assert.deepEqual(await get(base, "/rooms/m/state"), []);

    // History: every version of "turn", written by alice (her token), then deleted
    // in the batch; and the room as it was right after the batch's message.
    const history = await ok(anon, "state_history", { room: "m", key: "turn" });
    assert.deepEqual(history, {
      versions: await get(base, "/rooms/m/state/history?key=turn"),
    });
    const versions = history.versions as Record<string, unknown>[];
    assert.deepEqual(
      versions.map((v) => [v.version, v.value, v.deleted, v.updated_by]),
      [[1, "alice", false, "alice"], [2, null, true, "alice"]],
    );
    const batched = (batch.messages as { id: number }[])[0].id;
    const past = await ok(anon, "get_state", { room: "m", at: batched });
    assert.deepEqual(past, {
      entries: await get(base, `/rooms/m/state?at=${batched}`),
    });
    assert.deepEqual(
      (past.entries as { key: string; value: unknown }[]).map((e) => [
        e.key,
        e.value,
      ]),
      [["n", 2]],
    );

    const context = await ok(anon, "get_context", { room: "m", messages: 10 });
    const rest = await get(base, "/rooms/m/context?messages=10");
    assert.deepEqual(context, {
      ...rest,
      agents: rest.agents.map((a: Record<string, unknown>, i: number) => ({
        ...a,
        idle_ms: (context.agents as { idle_ms: number }[])[i].idle_ms,
      })),
    });
    assert.equal((context.messages as { total: number }).total, 3);
  });
});

Deno.test("read_messages with wait is woken by a message posted over REST", async () => {
  await withServer(async ({ base, connect }) => {
    const client = await connect();
    await ok(client, "create_room", { id: "w" });
    const waiting = ok(client, "read_messages", { room: "w", wait: 5 });
    await new Promise((resolve) => setTimeout(resolve, 100));
    const res = await fetch(`${base}/rooms/w/messages`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ body: "over REST" }),
    });
    assert.equal(res.status, 201);
    assert.deepEqual(await waiting, { messages: [await res.json()] });
  });
});

Deno.test("every MCP tool error is REST's JSON error body as text, with no structured content", async () => {
  await withServer(async ({ base, connect }) => {
    const docs = (section: string) => `${base}/README.md#${section}`;
    const anon = await connect();
    await ok(anon, "create_room", { id: "m" });
    const alice = await connect(
      String(
        (await ok(anon, "join_room", { room: "m", id: "alice", name: "A" }))
          .token,
      ),
    );
    const task = (await ok(alice, "post_message", { room: "m", body: "t" }))
      .id as number;
    const claim = await ok(alice, "claim_message", {
      room: "m",
      message_id: task,
    });
    const held = claim.message as Record<string, unknown>;
    const turn = await ok(anon, "set_state", {
      room: "m",
      key: "turn",
      value: "x",
    });
    await ok(anon, "set_state", { room: "m", key: "word", value: "w" });
    await ok(anon, "post_message", {
      room: "m",
      body: 1,
      idempotency_key: "k",
    });
    const locked = await ok(anon, "create_room", { id: "l", locked: true });
    const admin = await connect(String(locked.token));
    const viewer = await connect(String(locked.view_token));
    const bob = await connect(
      String(
        (await ok(admin, "join_room", { room: "l", id: "bob", name: "B" }))
          .token,
      ),
    );
    const stranger = await connect("as_not-a-token");
    // Carol's arguments for the task alice holds, and the already_claimed she gets.
    const carol = { room: "m", message_id: task, agent: "carol" };
    const claimed = {
      error: "already_claimed",
      message: `Message ${task} is claimed by "alice"`,
      claimed_by: "alice",
      claimed_at: held.claimed_at,
      lease_expires_at: null,
      docs: docs("coordination"),
    };

    const cases: [string, Client, string, Record<string, unknown>, unknown][] =
      [
        ["no such room", anon, "get_context", { room: "nope" }, {
          error: "room_not_found",
          message: 'Room "nope" does not exist',
          room_id: "nope",
          docs: docs("errors"),
        }],
        ["no such key", anon, "get_state", { room: "m", key: "gone" }, {
          error: "key_not_found",
          message: 'Key "gone" does not exist in scope "_shared" of room "m"',
          scope: "_shared",
          key: "gone",
          docs: docs("errors"),
        }],
        ["no such message", alice, "claim_message", {
          room: "m",
          message_id: 999,
        }, {
          error: "message_not_found",
          message: 'Message 999 does not exist in room "m"',
          message_id: 999,
          docs: docs("errors"),
        }],
        ["no such agent", anon, "heartbeat", { room: "m", agent: "zed" }, {
          error: "agent_not_found",
          message: 'Agent "zed" is not registered in room "m"',
          agent_id: "zed",
          docs: docs("errors"),
        }],
        ["a claim on a held message", anon, "claim_message", carol, claimed],
        [
          "a complete by an agent that does not hold it",
          anon,
          "complete_message",
          carol,
          {
            error: "not_holder",
            message:
              `Agent "carol" does not hold message ${task}: "alice" does; drop the work`,
            claimed_by: "alice",
            claimed_at: held.claimed_at,
            lease_expires_at: null,
            docs: docs("coordination"),
          },
        ],
        ["a release by another agent", anon, "release_message", carol, claimed],
        ["a stale if_version", anon, "set_state", {
          room: "m",
          key: "turn",
          value: "y",
          if_version: 5,
        }, {
          error: "version_conflict",
          message:
            "Expected version 5 but the key is at version 1; current holds the entry as it is",
          expected_version: 5,
          current: turn,
          docs: docs("coordination"),
        }],
        ["a stale if_version on delete", anon, "delete_state", {
          room: "m",
          key: "turn",
          if_version: 0,
        }, {
          error: "version_conflict",
          message:
            "Expected version 0 but the key is at version 1; current holds the entry as it is",
          expected_version: 0,
          current: turn,
          docs: docs("coordination"),
        }],
        ["a batch conflict", anon, "batch", {
          room: "m",
          state: [{ key: "turn", value: "z", if_version: 2 }],
        }, {
          error: "version_conflict",
          message:
            "The batch was not applied: 1 of its state writes expected another version; nothing was written",
          conflicts: [{
            index: 0,
            scope: "_shared",
            key: "turn",
            reason: "version_conflict",
            expected_version: 2,
            current: turn,
          }],
          docs: docs("coordination"),
        }],
        ["an increment of text", anon, "set_state", {
          room: "m",
          key: "word",
          increment: true,
        }, {
          error: "not_a_number",
          message:
            'Cannot increment: the current value of "word" is not a number',
          current: await get(base, "/rooms/m/state?key=word"),
          docs: docs("coordination"),
        }],
        ["an invalid body, refused by REST", anon, "set_state", {
          room: "m",
          key: "k",
          value: 1,
          increment: true,
        }, {
          error: "invalid_request",
          message:
            'Invalid request body: field "increment" must not be given with value',
          field: "increment",
          issues: [{
            field: "increment",
            message: 'field "increment" must not be given with value',
          }],
          docs: docs("errors"),
        }],
        ["a reply to no message", anon, "post_message", {
          room: "m",
          body: 1,
          reply_to: 999,
        }, {
          error: "invalid_request",
          message:
            'Invalid request body: reply_to 999 is not a message of room "m"',
          field: "reply_to",
          docs: docs("errors"),
        }],
        // A mistyped argument is refused, not dropped: dropping `if_verison` would
        // write unconditionally.
        ["an unknown argument", anon, "set_state", {
          room: "m",
          key: "turn",
          value: "y",
          if_verison: 1,
        }, {
          error: "invalid_request",
          message:
            'Invalid arguments of set_state: unknown parameter "if_verison"',
          field: "if_verison",
          issues: [{
            field: "if_verison",
            message: 'unknown parameter "if_verison"',
          }],
          docs: docs("errors"),
        }],
        ["an argument of the wrong type", anon, "claim_message", {
          room: "m",
          message_id: "one",
        }, {
          error: "invalid_request",
          message:
            'Invalid arguments of claim_message: parameter "message_id": expected number, received string',
          field: "message_id",
          issues: [{
            field: "message_id",
            message: 'parameter "message_id": expected number, received string',
          }],
          docs: docs("errors"),
        }],
        ["a missing argument", anon, "delete_state", { room: "m" }, {
          error: "invalid_request",
          message:
            'Invalid arguments of delete_state: parameter "key" is required',
          field: "key",
          issues: [{ field: "key", message: 'parameter "key" is required' }],
          docs: docs("errors"),
        }],
        ["an Idempotency-Key on another request", anon, "post_message", {
          room: "m",
          body: 2,
          idempotency_key: "k",
        }, {
          error: "idempotency_key_reused",
          message:
            'Idempotency-Key "k" was used for another request in this room; use a new key',
          docs: docs("coordination"),
        }],
        ["an agent id that is taken", anon, "join_room", {
          room: "m",
          id: "alice",
          name: "Mallory",
        }, {
          error: "agent_exists",
          message:
            'Agent "alice" is already registered in room "m"; use it as it is, register another id, or send its token to register it again',
          agent: withoutIdle((await get(base, "/rooms/m/agents"))[0]),
          docs: docs("tokens-and-locked-rooms"),
        }],
        ["a locked room without a token", anon, "read_messages", {
          room: "l",
          wait: 0,
        }, {
          error: "token_required",
          message:
            'Room "l" is locked: send a room, agent or view token as "Authorization: Bearer <token>"',
          docs: docs("tokens-and-locked-rooms"),
        }],
        ["a token of no one", stranger, "get_context", { room: "l" }, {
          error: "invalid_token",
          message:
            'The token is not one of room "l"; use a token the room or its agent registration gave',
          docs: docs("tokens-and-locked-rooms"),
        }],
        ["posting as another agent", bob, "post_message", {
          room: "l",
          from: "eve",
          body: 1,
        }, {
          error: "identity_mismatch",
          message: `This token is agent "bob"'s; "from" cannot name "eve"`,
          field: "from",
          agent: "bob",
          docs: docs("tokens-and-locked-rooms"),
        }],
        ["a view token writing", viewer, "delete_state", {
          room: "l",
          key: "k",
        }, {
          error: "read_only",
          message: "A view token reads only; write with an agent or room token",
          docs: docs("tokens-and-locked-rooms"),
        }],
        ["an agent joining others to a locked room", bob, "join_room", {
          room: "l",
          id: "eve",
          name: "E",
        }, {
          error: "forbidden",
          message: 'Joining a locked room needs the room token of "l"',
          docs: docs("tokens-and-locked-rooms"),
        }],
      ];
    for (const [what, client, tool, args, expected] of cases) {
      const body = await refused(client, tool, args);
      // An agent's idle_ms is counted at the moment of the answer.
      if (typeof body.agent === "object") body.agent = withoutIdle(body.agent);
      assert.deepEqual(body, expected, what);
    }
    // Nothing refused was written.
    assert.deepEqual(await get(base, "/rooms/m/state?key=turn"), turn);
    assert.equal((await get(base, "/rooms/m/messages")).length, 2);
  });
});

Deno.test("an unknown tool is a JSON-RPC error, as MCP asks", async () => {
  await withServer(async ({ connect }) => {
    const client = await connect();
    await assert.rejects(
      call(client, "no_such_tool", {}),
      /-32602.*There is no tool "no_such_tool"/,
    );
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
    assert.deepEqual(await res.json(), {
      error: "forbidden",
      message:
        'Origin "http://evil.example" may not use this MCP endpoint (MCP_ALLOWED_ORIGINS)',
      docs: `${base}/README.md#tokens-and-locked-rooms`,
    });
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

Deno.test("the MCP endpoint is POST only: GET and DELETE are 405 with Allow", async () => {
  await withServer(async ({ base }) => {
    for (const method of ["GET", "DELETE"]) {
      const res = await fetch(`${base}/mcp`, {
        method,
        headers: { accept: "application/json, text/event-stream" },
      });
      assert.equal(res.status, 405);
      assert.equal(res.headers.get("allow"), "POST");
      assert.deepEqual(await res.json(), {
        error: "method_not_allowed",
        message: "This MCP endpoint is stateless: POST only",
        docs: `${base}/README.md#endpoints`,
      });
    }
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
    assert.deepEqual(await res.json(), {
      error: "invalid_request",
      message:
        "Send one JSON-RPC message per request; batches are not accepted",
      docs: `${base}/README.md#errors`,
    });
    const rooms = await (await fetch(`${base}/rooms`)).json();
    assert.deepEqual(rooms, []);
  });
});

Deno.test("post_message passes an idempotency_key on: a retry writes once", async () => {
  await withServer(async ({ base, connect }) => {
    const client = await connect();
    await ok(client, "create_room", { id: "i" });
    const args = { room: "i", body: "once", idempotency_key: "k1" };
    const first = await ok(client, "post_message", args);
    const again = await ok(client, "post_message", args);
    assert.deepEqual(again, first);
    const messages = await (await fetch(`${base}/rooms/i/messages`)).json();
    assert.deepEqual(messages, [first]);
  });
});
