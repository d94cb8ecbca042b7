/**
 * A stateless Model Context Protocol endpoint (Streamable HTTP) whose tools mirror the
 * REST API one to one. Each tool call is the REST request, made in-process with the
 * caller's own Authorization header, so tokens, rules, limits and error codes are
 * exactly those of REST; an error comes back as an `isError` result carrying the same
 * JSON body (`version_conflict` with `current`, and so on).
 */
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { WebStandardStreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/webStandardStreamableHttp.js";
import { z } from "zod";
import {
  Batch,
  Claim,
  CreateRoom,
  Heartbeat,
  Id,
  PostMessage,
  PutState,
  RegisterAgent,
} from "./schemas.ts";
import { STATUSES } from "./db.ts";
import { docsLink, ERRORS } from "./errors.ts";
import {
  AgentOut,
  ContextOut,
  EntryOut,
  MessageOut,
  RoomOut,
} from "./openapi.ts";

// What each tool answers (as REST does), declared so clients can rely on its shape.
const RoomResult = RoomOut.extend({
  token: z.string().optional(),
  view_token: z.string().optional(),
}).shape;
const StateResult = {
  ...EntryOut.partial().shape,
  entries: z.array(EntryOut).optional(),
};

/** Origins whose pages may call `/mcp` (comma-separated); none by default. */
const MCP_ALLOWED_ORIGINS = (Deno.env.get("MCP_ALLOWED_ORIGINS") ?? "").split(
  ",",
)
  .map((o) => o.trim()).filter((o) => o !== "");

/** How long `read_messages` and `get_state` wait by default: below MCP clients' 60 s. */
export const MCP_DEFAULT_WAIT = 20;

type Fetch = (request: Request) => Promise<Response>;

/**
 * A tool's arguments, from its input shape. (Written out: the SDK's own inference
 * from zod 4 shapes does not resolve under Deno's type checker.)
 */
type Args<S extends z.ZodRawShape> = z.infer<z.ZodObject<S>>;

const room = Id.describe("The room id");
/** Seconds as REST takes them: 0 to 50, to the millisecond. */
const Seconds = z.number().min(0).max(50).multipleOf(0.001);
const Count = z.number().int().min(0);

/** Answers a REST call as a tool result: JSON as structured content, errors as isError. */
async function result(res: Response, wrap?: string) {
  const body = await res.json();
  const structured = wrap === undefined || !res.ok ? body : { [wrap]: body };
  return {
    content: [{ type: "text" as const, text: JSON.stringify(structured) }],
    structuredContent: structured as Record<string, unknown>,
    isError: !res.ok,
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

const JoinRoom = { room, ...RegisterAgent.shape };
/** Sent as the Idempotency-Key header: a retry with the same key writes nothing new. */
const idempotency_key = z.string().optional().describe(
  "Idempotency-Key: a retry of the same call with the same key returns the first answer",
);
const PostMessageTool = { room, ...PostMessage.shape, idempotency_key };
/**
 * The REST query strings of these two tools, with numbers as numbers (the REST
 * schemas take the text of a query string); REST validates again.
 */
const ReadMessages = {
  room,
  after: Count.optional(),
  before: Count.min(1).optional(),
  limit: z.number().int().min(1).max(1000).optional(),
  order: z.enum(["asc", "desc"]).optional(),
  kind: z.array(Id).max(50).optional().describe("Only these kinds"),
  from: Id.optional(),
  to: Id.optional(),
  for: Id.optional().describe("Addressed to this agent or to everyone"),
  thread: Count.min(1).optional().describe("This message and its replies"),
  unclaimed: z.boolean().optional(),
  wait: Seconds.optional(),
  agent: Id.optional().describe("Show this agent as waiting meanwhile"),
};
const ClaimMessage = { room, message_id: Count.min(1), ...Claim.shape };
const GetState = {
  room,
  scope: Id.optional(),
  key: z.string().optional(),
  after_version: Count.optional(),
  wait: Seconds.optional(),
  agent: Id.optional().describe("Show this agent as waiting meanwhile"),
};
const SetState = { room, ...PutState.shape };
const BatchTool = { room, ...Batch.shape, idempotency_key };
const GetContext = {
  room,
  messages: z.number().int().min(0).max(1000).optional(),
};
const HeartbeatTool = { room, agent: Id, ...Heartbeat.shape };

/** The MCP server for one request: its tools call `rest` with that request's token. */
/** A REST call: method, path, JSON body, and an Idempotency-Key to send along. */
type Rest = (
  method: string,
  path: string,
  body?: unknown,
  key?: string,
) => Promise<Response>;

function server(rest: Rest) {
  const mcp = new McpServer({ name: "sync", version: "1.0.0" });
  const write = { readOnlyHint: false, openWorldHint: false };
  const read = { readOnlyHint: true, openWorldHint: false };
  const enc = encodeURIComponent;

  mcp.registerTool(
    "create_room",
    {
      description:
        "Create a room (answers its admin token and view token once), or join the one with that id",
      inputSchema: CreateRoom.shape,
      outputSchema: RoomResult,
      annotations: { ...write, idempotentHint: false },
    },
    async (args: Args<typeof CreateRoom.shape>) =>
      result(await rest("POST", "/rooms", args)),
  );

  mcp.registerTool(
    "join_room",
    {
      description:
        "Register as an agent of a room; answers the agent's token once. With that token, posts and claims are made as this agent",
      inputSchema: JoinRoom,
      outputSchema: AgentOut.shape,
      annotations: { ...write, idempotentHint: false },
    },
    async ({ room, ...body }: Args<typeof JoinRoom>) =>
      result(await rest("POST", `/rooms/${enc(room)}/agents`, body)),
  );

  mcp.registerTool(
    "post_message",
    {
      description:
        "Append a message to the room's log (kind defaults to message; no `to` = everyone)",
      inputSchema: PostMessageTool,
      outputSchema: MessageOut.shape,
      annotations: { ...write, idempotentHint: false },
    },
    async ({ room, idempotency_key, ...body }: Args<typeof PostMessageTool>) =>
      result(
        await rest(
          "POST",
          `/rooms/${enc(room)}/messages`,
          body,
          idempotency_key,
        ),
      ),
  );

  mcp.registerTool("read_messages", {
    description:
      `Read messages with an id above after, ascending; if none match, wait up to wait seconds (default ${MCP_DEFAULT_WAIT}) for one`,
    inputSchema: ReadMessages,
    outputSchema: { messages: z.array(MessageOut) },
    annotations: { ...read, idempotentHint: true },
  }, async ({ room, wait, ...args }: Args<typeof ReadMessages>) =>
    result(
      await rest(
        "GET",
        `/rooms/${enc(room)}/messages${
          qs({ ...args, wait: wait ?? MCP_DEFAULT_WAIT })
        }`,
      ),
      "messages",
    ));

  mcp.registerTool(
    "claim_message",
    {
      description:
        "Claim a message (a task) for an agent, for lease seconds or until released; already_claimed if another holds it",
      inputSchema: ClaimMessage,
      outputSchema: { claimed: z.boolean(), message: MessageOut },
      annotations: { ...write, idempotentHint: true },
    },
    async ({ room, message_id, ...body }: Args<typeof ClaimMessage>) =>
      result(
        await rest(
          "POST",
          `/rooms/${enc(room)}/messages/${message_id}/claim`,
          body,
        ),
      ),
  );

  mcp.registerTool(
    "get_state",
    {
      description:
        "Read one state key (with key), or a scope, or the whole room; with key and after_version, wait until its version passes it",
      inputSchema: GetState,
      outputSchema: StateResult,
      annotations: { ...read, idempotentHint: true },
    },
    async (
      { room, key, after_version, wait, scope, agent }: Args<typeof GetState>,
    ) => {
      const waiting = key !== undefined && after_version !== undefined;
      const query = qs({
        scope,
        key,
        after_version,
        wait: waiting ? wait ?? MCP_DEFAULT_WAIT : undefined,
        agent: waiting ? agent : undefined,
      });
      return result(
        await rest("GET", `/rooms/${enc(room)}/state${query}`),
        key === undefined ? "entries" : undefined,
      );
    },
  );

  mcp.registerTool(
    "set_state",
    {
      description:
        "Write a state key: value, or increment; merge applies value as a JSON merge patch; if_version makes it compare-and-set (0 = only if absent); ttl in seconds",
      inputSchema: SetState,
      outputSchema: EntryOut.shape,
      annotations: { ...write, idempotentHint: false },
    },
    async ({ room, ...body }: Args<typeof SetState>) =>
      result(await rest("PUT", `/rooms/${enc(room)}/state`, body)),
  );

  mcp.registerTool(
    "batch",
    {
      description:
        "Apply state writes and message appends all or nothing (at most 100 operations)",
      inputSchema: BatchTool,
      outputSchema: {
        state: z.array(z.record(z.string(), z.unknown())),
        messages: z.array(MessageOut),
      },
      annotations: { ...write, idempotentHint: false },
    },
    async ({ room, idempotency_key, ...body }: Args<typeof BatchTool>) =>
      result(
        await rest("POST", `/rooms/${enc(room)}/batch`, body, idempotency_key),
      ),
  );

  mcp.registerTool(
    "get_context",
    {
      description:
        "All a late joiner needs: the room, agents, state and the newest messages",
      inputSchema: GetContext,
      outputSchema: ContextOut.shape,
      annotations: { ...read, idempotentHint: true },
    },
    async ({ room, messages }: Args<typeof GetContext>) =>
      result(
        await rest("GET", `/rooms/${enc(room)}/context${qs({ messages })}`),
      ),
  );

  mcp.registerTool(
    "heartbeat",
    {
      description: `Mark an agent as seen, with a status (${
        STATUSES.join(", ")
      })`,
      inputSchema: HeartbeatTool,
      outputSchema: AgentOut.shape,
      annotations: { ...write, idempotentHint: true },
    },
    async ({ room, agent, ...body }: Args<typeof HeartbeatTool>) =>
      result(
        await rest(
          "POST",
          `/rooms/${enc(room)}/agents/${enc(agent)}/heartbeat`,
          body,
        ),
      ),
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
  fetch: Fetch,
): Promise<Response> {
  const refuse = (
    code: "forbidden" | "method_not_allowed" | "invalid_request",
    message: string,
  ) =>
    Response.json(
      {
        error: code,
        message,
        docs: docsLink(new URL(request.url).origin, code),
      },
      {
        status: ERRORS[code][0],
        headers: code === "method_not_allowed" ? { allow: "POST" } : {},
      },
    );
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
  if ((await request.clone().text()).trimStart().startsWith("[")) {
    return refuse(
      "invalid_request",
      "Send one JSON-RPC message per request; batches are not accepted",
    );
  }
  const authorization = request.headers.get("authorization");
  const base = new URL(request.url).origin;
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
  await server(rest).connect(transport);
  return transport.handleRequest(request);
}
