/**
 * A stateless Model Context Protocol endpoint (Streamable HTTP) whose tools mirror the
 * REST API one to one. Each tool call is the REST request, made in-process with the
 * caller's own Authorization header, so tokens, rules, limits and error codes are
 * exactly those of REST. A call that fails is an `isError` result whose text is REST's
 * JSON error body (`version_conflict` with `current`, and so on) and which carries no
 * structured content: the official client checks structured content against the
 * tool's output schema even on errors, and throws when it does not match (issue 11;
 * mcp_test.ts, mcp_inspector_test.ts).
 */
// The SDK's low-level `Server`, not its `McpServer`: McpServer strips arguments it does
// not know (a mistyped `if_verison` would be dropped and the write made anyway),
// answers a bad argument in a text of its own instead of REST's `invalid_request`, and
// advertises `tools.listChanged`, which a stateless server can never send. (The SDK
// marks `Server` deprecated "for the high-level API", and keeps it for cases like this.)
import { Server } from "@modelcontextprotocol/sdk/server/index.js";
import { WebStandardStreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/webStandardStreamableHttp.js";
import {
  type CallToolRequest,
  CallToolRequestSchema,
  type CallToolResult,
  ErrorCode as RpcError,
  ListToolsRequestSchema,
  McpError,
  type Tool,
  type ToolAnnotations,
} from "@modelcontextprotocol/sdk/types.js";
import { z } from "zod";
import {
  AgentOut,
  Batch,
  Claim,
  Complete,
  ContextOut,
  CreateRoom,
  DeleteState,
  EntryOut,
  Heartbeat,
  Id,
  MAX_KINDS,
  MAX_MESSAGES_PER_READ,
  MAX_WAIT_SECONDS,
  MessageOut,
  parse,
  PostMessage,
  PutState,
  RegisterAgent,
  Release,
  RoomOut,
  StateHistory,
  VersionOut,
} from "./schemas.ts";
import { STATUSES, TASK_STATUSES } from "./db.ts";
import { ApiError, errorBody } from "./errors.ts";

/** Origins whose pages may call `/mcp` (comma-separated); none by default. */
const MCP_ALLOWED_ORIGINS = (Deno.env.get("MCP_ALLOWED_ORIGINS") ?? "").split(
  ",",
)
  .map((o) => o.trim()).filter((o) => o !== "");

/** How long `read_messages` and `get_state` wait by default: below MCP clients' 60 s. */
export const MCP_DEFAULT_WAIT = 20;

type Fetch = (request: Request) => Promise<Response>;

/** A REST call: method, path, JSON body, and an Idempotency-Key to send along. */
type Rest = (
  method: string,
  path: string,
  body?: unknown,
  key?: string,
) => Promise<Response>;

/** A failed call: REST's error body as text, and no structured content (see above). */
function failed(body: unknown): CallToolResult {
  return {
    content: [{ type: "text", text: JSON.stringify(body) }],
    isError: true,
  };
}

/**
 * Answers a REST call as a tool result: the JSON as structured content (under `wrap`
 * when it is a list, as structured content is an object), an error as `failed`.
 */
async function answer(res: Response, wrap?: string): Promise<CallToolResult> {
  const body = await res.json();
  if (!res.ok) return failed(body);
  const structured = wrap === undefined ? body : { [wrap]: body };
  return {
    content: [{ type: "text", text: JSON.stringify(structured) }],
    structuredContent: structured,
    isError: false,
  };
}

/** The query string of the arguments that are set. */
function qs(args: Record<string, unknown>): string {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(args)) {
    if (v !== undefined && v !== null) {
      params.set(k, Array.isArray(v) ? v.join(",") : String(v));
    }
  }
  const text = params.toString();
  return text === "" ? "" : `?${text}`;
}

/**
 * A schema as `tools/list` shows it: JSON Schema draft-07, as the SDK's McpServer
 * writes it and its client's validator (Ajv) reads it.
 */
function jsonSchema(
  schema: z.ZodObject,
  io: "input" | "output",
): Tool["inputSchema"] {
  return z.toJSONSchema(schema, { target: "draft-7", io }) as Tool[
    "inputSchema"
  ];
}

/** One tool: what it takes and answers, its hints, and the REST call behind it. */
type Definition<S extends z.ZodRawShape> = {
  description: string;
  input: S;
  output: z.ZodRawShape;
  annotations: ToolAnnotations;
  call: (args: z.output<z.ZodObject<S>>, rest: Rest) => Promise<CallToolResult>;
};

/** A tool as the server keeps it: its entry in `tools/list`, and its call. */
type Entry = {
  listing: Tool;
  call: (args: unknown, rest: Rest, origin: string) => Promise<CallToolResult>;
};

/** Makes a tool: its listing, and a call that checks the arguments as REST checks a body. */
function tool<S extends z.ZodRawShape>(
  name: string,
  { description, input, output, annotations, call }: Definition<S>,
): Entry {
  // Strict, as REST bodies are: an unknown argument is refused, naming it (a mistyped
  // `if_version` must not be ignored).
  const schema = z.strictObject(input);
  return {
    listing: {
      name,
      description,
      inputSchema: jsonSchema(schema, "input"),
      outputSchema: jsonSchema(z.object(output), "output"),
      annotations,
    },
    call(args, rest, origin) {
      let valid: z.output<z.ZodObject<S>>;
      try {
        valid = parse(schema, args, `arguments of ${name}`);
      } catch (error) {
        if (!(error instanceof ApiError)) throw error;
        return Promise.resolve(failed(errorBody(origin, error)));
      }
      return call(valid, rest);
    },
  };
}

// ---- what the tools take and answer ----

const room = Id.describe("The room id");
/** Seconds as REST takes them, to the millisecond. */
const Seconds = z.number().min(0).max(MAX_WAIT_SECONDS).multipleOf(0.001);
const Count = z.number().int().min(0);
const MessageId = Count.min(1).describe("The message's id");
/** Sent as the Idempotency-Key header: a retry with the same key writes nothing new. */
const idempotency_key = z.string().optional().describe(
  "Idempotency-Key: a retry of the same call with the same key returns the first answer",
);

const RoomResult = RoomOut.extend({
  token: z.string().optional(),
  view_token: z.string().optional(),
}).shape;
const StateResult = {
  ...EntryOut.partial().shape,
  entries: z.array(EntryOut).optional(),
};

/** The hints of a tool that only reads (MCP's defaults are the opposite). */
const read = { readOnlyHint: true, idempotentHint: true, openWorldHint: false };
/** The hints of a tool that writes: whether it can lose data, and whether a repeat does anything. */
const write = (destructiveHint: boolean, idempotentHint: boolean) => ({
  readOnlyHint: false,
  destructiveHint,
  idempotentHint,
  openWorldHint: false,
});

const enc = encodeURIComponent;

// ---- the tools, in the order of the REST routes ----

const TOOLS = new Map([
  tool("create_room", {
    description:
      "Create a room (answers its admin token and view token once), or join the one with that id",
    input: CreateRoom.shape,
    output: RoomResult,
    annotations: write(false, false),
    call: async (args, rest) => answer(await rest("POST", "/rooms", args)),
  }),
  tool("join_room", {
    description:
      "Register as an agent of a room; answers the agent's token once. With that token, posts and claims are made as this agent",
    input: { room, ...RegisterAgent.shape },
    output: AgentOut.shape,
    // Registering an agent again replaces its name, role and meta (and its token).
    annotations: write(true, false),
    call: async ({ room, ...body }, rest) =>
      answer(await rest("POST", `/rooms/${enc(room)}/agents`, body)),
  }),
  tool("heartbeat", {
    description: `Mark an agent as seen, with a status (${
      STATUSES.join(", ")
    })`,
    input: { room, agent: Id, ...Heartbeat.shape },
    output: AgentOut.shape,
    annotations: write(false, true),
    call: async ({ room, agent, ...body }, rest) =>
      answer(
        await rest(
          "POST",
          `/rooms/${enc(room)}/agents/${enc(agent)}/heartbeat`,
          body,
        ),
      ),
  }),
  tool("post_message", {
    description:
      "Append a message to the room's log (kind defaults to message; no `to` = everyone)",
    input: { room, ...PostMessage.shape, idempotency_key },
    output: MessageOut.shape,
    annotations: write(false, false),
    call: async ({ room, idempotency_key, ...body }, rest) =>
      answer(
        await rest(
          "POST",
          `/rooms/${enc(room)}/messages`,
          body,
          idempotency_key,
        ),
      ),
  }),
  tool("read_messages", {
    description:
      `Read messages with an id above after, ascending; if none match, wait up to wait seconds (default ${MCP_DEFAULT_WAIT}) for one`,
    // REST's query string, with numbers as numbers (REST's schema takes the text of a
    // query string); REST validates again.
    input: {
      room,
      after: Count.optional(),
      before: Count.min(1).optional(),
      limit: z.number().int().min(1).max(MAX_MESSAGES_PER_READ).optional(),
      order: z.enum(["asc", "desc"]).optional(),
      kind: z.array(Id).max(MAX_KINDS).optional().describe("Only these kinds"),
      from: Id.optional(),
      to: Id.optional(),
      for: Id.optional().describe("Addressed to this agent or to everyone"),
      thread: Count.min(1).optional().describe("This message and its replies"),
      status: z.array(z.enum(TASK_STATUSES)).min(1).optional().describe(
        "Only messages in these task statuses (open, held, done, dead)",
      ),
      unclaimed: z.boolean().optional().describe(
        "true: status open; false: status held",
      ),
      wait: Seconds.optional(),
      agent: Id.optional().describe("Show this agent as waiting meanwhile"),
    },
    output: { messages: z.array(MessageOut) },
    annotations: read,
    call: async ({ room, wait, ...args }, rest) =>
      answer(
        await rest(
          "GET",
          `/rooms/${enc(room)}/messages${
            qs({ ...args, wait: wait ?? MCP_DEFAULT_WAIT })
          }`,
        ),
        "messages",
      ),
  }),
  tool("claim_message", {
    description:
      "Claim a message (a task) for an agent, for lease seconds or until released (each claim is an attempt); already_claimed if another holds it, already_completed if done, attempts_exhausted if dead",
    input: { room, message_id: MessageId, ...Claim.shape },
    output: { claimed: z.boolean(), message: MessageOut },
    annotations: write(false, true),
    call: async ({ room, message_id, ...body }, rest) =>
      answer(
        await rest(
          "POST",
          `/rooms/${enc(room)}/messages/${message_id}/claim`,
          body,
        ),
      ),
  }),
  tool("release_message", {
    description:
      "Give a claimed message back, so another agent can claim it; released is false if it was not claimed; already_claimed if another agent holds it",
    input: { room, message_id: MessageId, ...Release.shape },
    output: { released: z.boolean(), message: MessageOut },
    annotations: write(false, true),
    call: async ({ room, message_id, ...body }, rest) =>
      answer(
        await rest(
          "POST",
          `/rooms/${enc(room)}/messages/${message_id}/release`,
          body,
        ),
      ),
  }),
  tool("complete_message", {
    description:
      "Mark a message you hold done, posting result (if given) as a reply in the same transaction; not_holder if your claim ran out (drop the work), already_completed if done",
    input: { room, message_id: MessageId, ...Complete.shape, idempotency_key },
    output: {
      completed: z.boolean(),
      message: MessageOut,
      result: MessageOut.nullable(),
    },
    annotations: write(false, false),
    call: async ({ room, message_id, idempotency_key, ...body }, rest) =>
      answer(
        await rest(
          "POST",
          `/rooms/${enc(room)}/messages/${message_id}/complete`,
          body,
          idempotency_key,
        ),
      ),
  }),
  tool("get_state", {
    description:
      "Read one state key (with key), or a scope, or the whole room; with key and after_version, wait until its version passes it",
    input: {
      room,
      scope: Id.optional(),
      key: z.string().optional(),
      after_version: Count.optional(),
      wait: Seconds.optional(),
      agent: Id.optional().describe("Show this agent as waiting meanwhile"),
      at: Count.optional().describe(
        "A message id: the state as it was right after that message was posted",
      ),
    },
    output: StateResult,
    annotations: read,
    call: async (
      { room, key, after_version, wait, scope, agent, at },
      rest,
    ) => {
      const waiting = key !== undefined && after_version !== undefined;
      const query = qs({
        scope,
        key,
        after_version,
        wait: waiting ? wait ?? MCP_DEFAULT_WAIT : undefined,
        agent: waiting ? agent : undefined,
        at,
      });
      return answer(
        await rest("GET", `/rooms/${enc(room)}/state${query}`),
        key === undefined ? "entries" : undefined,
      );
    },
  }),
  tool("state_history", {
    description:
      "The versions of one state key, oldest first: value, deleted, updated_by, updated_at, after_message (the newest message id when written)",
    input: { room, ...StateHistory.shape },
    output: { versions: z.array(VersionOut) },
    annotations: read,
    call: async ({ room, ...query }, rest) =>
      answer(
        await rest("GET", `/rooms/${enc(room)}/state/history${qs(query)}`),
        "versions",
      ),
  }),
  tool("set_state", {
    description:
      "Write a state key: value, or increment; merge applies value as a JSON merge patch; if_version makes it compare-and-set (0 = only if absent); ttl in seconds",
    input: { room, ...PutState.shape },
    output: EntryOut.shape,
    annotations: write(true, false),
    call: async ({ room, ...body }, rest) =>
      answer(await rest("PUT", `/rooms/${enc(room)}/state`, body)),
  }),
  tool("delete_state", {
    description:
      "Delete a state key; deleted is false if it was absent; if_version makes it compare-and-set",
    input: { room, ...DeleteState.shape },
    output: { deleted: z.boolean() },
    annotations: write(true, true),
    call: async ({ room, ...body }, rest) =>
      answer(await rest("DELETE", `/rooms/${enc(room)}/state`, body)),
  }),
  tool("batch", {
    description:
      "Apply state writes and message appends all or nothing (at most 100 operations)",
    input: { room, ...Batch.shape, idempotency_key },
    output: {
      state: z.array(z.record(z.string(), z.unknown())),
      messages: z.array(MessageOut),
    },
    annotations: write(true, false),
    call: async ({ room, idempotency_key, ...body }, rest) =>
      answer(
        await rest("POST", `/rooms/${enc(room)}/batch`, body, idempotency_key),
      ),
  }),
  tool("get_context", {
    description:
      "All a late joiner needs: the room, agents, state and the newest messages",
    input: {
      room,
      messages: z.number().int().min(0).max(MAX_MESSAGES_PER_READ).optional(),
    },
    output: ContextOut.shape,
    annotations: read,
    call: async ({ room, messages }, rest) =>
      answer(
        await rest("GET", `/rooms/${enc(room)}/context${qs({ messages })}`),
      ),
  }),
].map((entry) => [entry.listing.name, entry]));

const LISTING = [...TOOLS.values()].map((entry) => entry.listing);

/** The MCP server for one request: its tools call `rest` with that request's token. */
function server(rest: Rest, origin: string): Server {
  // Tools and nothing else; no `listChanged`: the list never changes, and a stateless
  // server has no stream to say so on.
  const mcp = new Server({ name: "sync", version: "1.0.0" }, {
    capabilities: { tools: {} },
  });
  mcp.setRequestHandler(ListToolsRequestSchema, () => ({ tools: LISTING }));
  mcp.setRequestHandler(
    CallToolRequestSchema,
    ({ params }: CallToolRequest) => {
      const tool = TOOLS.get(params.name);
      if (tool === undefined) {
        // A protocol error, as MCP asks for an unknown tool.
        throw new McpError(
          RpcError.InvalidParams,
          `There is no tool "${params.name}"; tools/list names them`,
        );
      }
      return tool.call(params.arguments ?? {}, rest, origin);
    },
  );
  return mcp;
}

/**
 * Serves one MCP request (stateless: a fresh server and transport each time). `fetch`
 * reaches the REST API in-process. A browser page of another origin is refused, as
 * the MCP spec asks servers to check Origin.
 */
export async function handleMcp(
  request: Request,
  /** The request's body, read already (bodyWithin). */
  text: string,
  fetch: Fetch,
): Promise<Response> {
  const base = new URL(request.url).origin;
  const refuse = (
    code: "forbidden" | "method_not_allowed" | "invalid_request",
    message: string,
  ) => {
    const error = new ApiError(code, message);
    return Response.json(errorBody(base, error), {
      status: error.status,
      headers: code === "method_not_allowed" ? { allow: "POST" } : {},
    });
  };
  // MCP clients send no Origin; a browser always does. Only origins the operator
  // allows may call from a page, which also stops DNS rebinding (the Host header,
  // and so the request's own origin, is the attacker's choice there).
  const origin = request.headers.get("origin");
  if (origin !== null && !MCP_ALLOWED_ORIGINS.includes(origin)) {
    return refuse(
      "forbidden",
      `Origin "${origin}" may not use this MCP endpoint (MCP_ALLOWED_ORIGINS)`,
    );
  }
  // Stateless: no stream of server-initiated messages (GET) and no session (DELETE).
  // A 405 tells clients so; an open GET stream would also hold the server's shutdown.
  if (request.method !== "POST") {
    return refuse(
      "method_not_allowed",
      "This MCP endpoint is stateless: POST only",
    );
  }
  // One call per request: a JSON-RPC batch would run many tool calls on one request's
  // share of the rate limit.
  if (text.trimStart().startsWith("[")) {
    return refuse(
      "invalid_request",
      "Send one JSON-RPC message per request; batches are not accepted",
    );
  }
  const authorization = request.headers.get("authorization");
  const rest: Rest = (method, path, body, key) =>
    fetch(
      new Request(base + path, {
        method,
        headers: {
          "content-type": "application/json",
          ...(authorization === null ? {} : { authorization }),
          ...(key === undefined ? {} : { "idempotency-key": key }),
        },
        body: body === undefined ? undefined : JSON.stringify(body),
        // A client that goes away ends the REST call too (a long-poll stops waiting).
        signal: request.signal,
      }),
    );
  const transport = new WebStandardStreamableHTTPServerTransport({
    sessionIdGenerator: undefined,
    enableJsonResponse: true,
  });
  await server(rest, base).connect(transport);
  const { url, method, headers, signal } = request;
  return transport.handleRequest(
    new Request(url, { method, headers, signal, body: text }),
  );
}
