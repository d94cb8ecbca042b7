/**
 * Every route of the API, defined once: its path, inputs and answers. main.ts serves
 * each with its handler (the inputs are validated from here), `/openapi.json` is made
 * from here, and so is the endpoint table of the docs (docs.ts).
 */
import type { RouteConfig } from "@hono/zod-openapi";
import { createRoute } from "./api.ts";
import { z } from "zod";
import { type ErrorCode, ERRORS } from "./errors.ts";
import {
  AgentOut,
  Batch,
  Claim,
  Complete,
  ContextOut,
  CreateRoom,
  DeletedOut,
  DeleteState,
  EntryOut,
  ErrorOut,
  GetContext,
  GetState,
  GetStream,
  Heartbeat,
  Id,
  IdempotencyKey,
  ImportOut,
  ImportQuery,
  LastEventId,
  ListMessages,
  ListRooms,
  MessageOut,
  NewRoomOut,
  PathMessageId,
  PostMessage,
  PutState,
  RegisterAgent,
  Release,
  RoomOut,
  StateHistory,
  VersionOut,
  ViewerQuery,
} from "./schemas.ts";

// ---- parts every route is made of ----

type Answer = RouteConfig["responses"][number];

/** A JSON answer. */
function json<T extends z.ZodType>(schema: T, description: string) {
  return {
    description,
    content: { "application/json": { schema } },
  } as const;
}

/** A text answer of a media type. */
function text(type: string, description: string): Answer {
  return {
    description,
    content: { [type]: { schema: { type: "string" as const } } },
  };
}

/** The JSON body of a route: required, read whatever its content type says. */
function body<T extends z.ZodType>(schema: T) {
  return {
    required: true,
    content: { "application/json": { schema } },
  } as const;
}

/**
 * What every route may answer: over the rate limit, a body over the size limit or too
 * slow (any request with a body is refused before routing), no connection free, or a
 * database or process away.
 */
const ALWAYS: ErrorCode[] = [
  "rate_limited",
  "payload_too_large",
  "request_timeout",
  "over_capacity",
  "database_busy",
  "database_unavailable",
  "shutting_down",
];
/** What a route with input may answer when the input is wrong. */
const INPUT: ErrorCode[] = ["invalid_request"];
/** What a route with a JSON body may answer besides. */
const BODY: ErrorCode[] = [...INPUT, "invalid_json"];
/** Reading a room: it must exist, and a locked one needs a token of it. */
const READ: ErrorCode[] = [
  ...INPUT,
  "room_not_found",
  "invalid_token",
  "token_required",
];
/** Writing in a room: as reading, and the token must be allowed to write. */
const WRITE: ErrorCode[] = [
  ...READ,
  ...BODY,
  "read_only",
  "identity_mismatch",
];

/**
 * The error answers of a route, one per status, each listing its codes (the error
 * catalogue, errors.ts, gives each code's status).
 */
function errors(...codes: ErrorCode[]): Record<number, Answer> {
  const byStatus = new Map<number, Set<ErrorCode>>();
  for (const code of [...codes, ...ALWAYS]) {
    const status = ERRORS[code][0];
    byStatus.set(status, (byStatus.get(status) ?? new Set()).add(code));
  }
  return Object.fromEntries(
    [...byStatus].map(([status, set]) => [status, {
      description: `An error: ${[...set].join(", ")}`,
      content: {
        "application/json": {
          schema: { $ref: "#/components/schemas/Error" },
        },
      },
    }]),
  );
}

const RoomParams = z.object({ id: Id });
const MessageParams = z.object({ id: Id, mid: PathMessageId });
/** The header that makes a write safe to retry. */
const IdempotencyHeaders = z.object({
  "idempotency-key": IdempotencyKey.optional().meta({
    description:
      "A retry with the same key gets the first answer and writes nothing",
  }),
});

// ---- docs and service ----

export const getIndex = createRoute({
  method: "get",
  path: "/",
  operationId: "getIndex",
  summary:
    "Usage docs (markdown), a landing page (HTML), or the viewer of ?room=",
  request: { query: ViewerQuery },
  responses: {
    200: {
      description: "The docs as markdown, or HTML for a browser",
      content: {
        "text/markdown": { schema: { type: "string" } },
        "text/html": { schema: { type: "string" } },
      },
    },
    404: text("text/html", "The viewer of a room that does not exist"),
    ...errors(...INPUT),
  },
});

export const getViewerScript = createRoute({
  method: "get",
  path: "/viewer.js",
  operationId: "getViewerScript",
  summary: "The viewer page's script (a JavaScript module)",
  responses: {
    200: text("text/javascript", "The module"),
    ...errors(),
  },
});

export const getReadme = docsRoute("/README.md", "getReadme", "Usage docs");
export const getLlmsTxt = docsRoute("/llms.txt", "getLlmsTxt", "Usage docs");
export const getSkill = docsRoute(
  "/SKILL.md",
  "getSkill",
  "Usage docs with agent-skill front matter",
);

function docsRoute<P extends string>(path: P, id: string, summary: string) {
  return createRoute({
    method: "get",
    path,
    operationId: id,
    summary,
    responses: { 200: text("text/markdown", summary), ...errors() },
  });
}

export const getOpenApi = createRoute({
  method: "get",
  path: "/openapi.json",
  operationId: "getOpenApi",
  summary: "This document",
  responses: {
    200: json(
      z.object({ openapi: z.string() }).catchall(z.unknown()),
      "The OpenAPI 3.1 document",
    ),
    ...errors(),
  },
});

export const getLimits = createRoute({
  method: "get",
  path: "/limits",
  operationId: "getLimits",
  summary: "The limits in force (body size, rate, batch size, wait)",
  responses: {
    200: json(
      z.object({
        max_body_bytes: z.number().int(),
        max_connections: z.number().int().nullable().describe(
          "Connections served at once (null: the host's server holds them, not this process)",
        ),
        stall_timeout_seconds: z.number().describe(
          "Seconds a request's headers or body may take before its connection is closed",
        ),
        rate_limit: z.object({
          per_second: z.number(),
          burst: z.number(),
        }).nullable(),
        rate_limit_per_address: z.object({
          per_second: z.number(),
          burst: z.number(),
        }).nullable(),
        max_waits_per_client: z.number().int(),
        max_waits_per_address: z.number().int(),
        trust_proxy: z.number().int().nullable().describe(
          "X-Forwarded-For entries trusted (null: no rate limit)",
        ),
        max_batch_operations: z.number().int(),
        max_wait_seconds: z.number(),
        max_json_depth: z.number().int(),
        max_messages_per_read: z.number().int(),
        max_response_bytes: z.number().int(),
        retain_messages: z.number().int().nullable().describe(
          "Messages kept per room (null: all)",
        ),
        retain_days: z.number().int().nullable().describe(
          "Days of messages kept, and of inactivity before a room is deleted (null: forever)",
        ),
        idempotency_ttl_seconds: z.number(),
      }),
      "The limits",
    ),
    ...errors(),
  },
});

export const getHealth = createRoute({
  method: "get",
  path: "/healthz",
  operationId: "getHealth",
  summary: "200 `{ok: true}` when the database answers",
  responses: {
    200: json(z.object({ ok: z.boolean() }), "The database answers"),
    ...errors(),
  },
});

/** A JSON-RPC error, as the MCP transport answers a request it cannot take. */
const JsonRpcError = z.object({
  jsonrpc: z.literal("2.0"),
  error: z.object({ code: z.number().int(), message: z.string() }),
  id: z.union([z.string(), z.number(), z.null()]),
});

export const postMcp = createRoute({
  method: "post",
  path: "/mcp",
  operationId: "postMcp",
  summary:
    "Model Context Protocol (Streamable HTTP, stateless): the same API as tools; your Bearer token applies as on REST",
  responses: {
    200: json(
      z.object({ jsonrpc: z.literal("2.0") }).catchall(z.unknown()),
      "A JSON-RPC answer",
    ),
    202: { description: "A notification, accepted" },
    ...errors("forbidden"),
    // The MCP transport answers JSON-RPC errors of its own; the endpoint, REST's.
    400: json(
      z.union([ErrorOut, JsonRpcError]),
      "A JSON-RPC batch (invalid_request), or a message the MCP transport cannot parse (a JSON-RPC error)",
    ),
    406: json(
      JsonRpcError,
      "Accept must list application/json and text/event-stream",
    ),
    415: json(JsonRpcError, "Content-Type must be application/json"),
  },
});

// ---- rooms ----

export const createRoom = createRoute({
  method: "post",
  path: "/rooms",
  operationId: "createRoom",
  summary:
    "Create a room (201, with its tokens) or join the one with that id (200)",
  request: { body: body(CreateRoom) },
  responses: {
    201: json(
      NewRoomOut,
      "Created: the room with `token` and `view_token` (shown once)",
    ),
    200: json(RoomOut, "The room with that id exists: joined (no tokens)"),
    ...errors(...BODY, "invalid_token", "token_required"),
  },
});

export const importRoom = createRoute({
  method: "post",
  path: "/rooms/import",
  operationId: "importRoom",
  summary:
    "Make a room from an export (NDJSON): all or nothing, with new tokens (shown once); `id` names it (default: the exported id)",
  request: {
    query: ImportQuery,
    body: {
      required: true,
      content: {
        "application/x-ndjson": {
          schema: { type: "string" as const },
        },
      },
    },
  },
  responses: {
    201: json(ImportOut, "Made: the room with `token` and `view_token`"),
    ...errors(...INPUT, "room_exists"),
  },
});

export const listRooms = createRoute({
  method: "get",
  path: "/rooms",
  operationId: "listRooms",
  summary:
    "Open rooms (all rooms for the server admin token), oldest first, a page at a time",
  request: { query: ListRooms },
  responses: {
    200: json(z.array(RoomOut), "`[room]`"),
    ...errors(...INPUT, "invalid_token"),
  },
});

export const getRoom = createRoute({
  method: "get",
  path: "/rooms/{id}",
  operationId: "getRoom",
  summary: "One room",
  request: { params: RoomParams },
  responses: {
    200: json(RoomOut, "`{id, created_at, meta, locked}`"),
    ...errors(...READ),
  },
});

export const deleteRoom = createRoute({
  method: "delete",
  path: "/rooms/{id}",
  operationId: "deleteRoom",
  summary: "Delete a room and everything in it (room token)",
  request: { params: RoomParams },
  responses: {
    200: json(z.object({ deleted: z.boolean() }), "`{deleted: true}`"),
    ...errors(...READ, "forbidden", "read_only"),
  },
});

export const getContext = createRoute({
  method: "get",
  path: "/rooms/{id}/context",
  operationId: "getContext",
  summary: "All a late joiner needs: the room, agents, state, newest messages",
  request: { params: RoomParams, query: GetContext },
  responses: {
    200: json(
      ContextOut,
      "`{room, agents, state, messages: {items, total, next_after}}`",
    ),
    ...errors(...READ),
  },
});

export const streamRoom = createRoute({
  method: "get",
  path: "/rooms/{id}/stream",
  operationId: "streamRoom",
  summary:
    "Server-Sent Events: `message` (SSE id = message id), a snapshot then `ready`, then `state`, `agent`, `claim`; `end` if access ends",
  request: {
    params: RoomParams,
    query: GetStream,
    headers: z.object({
      "last-event-id": LastEventId.optional().meta({
        description:
          "Resume after this message id (EventSource sends it on reconnect)",
      }),
    }),
  },
  responses: {
    200: text("text/event-stream", "The room's events"),
    ...errors(...READ, "too_many_waits", "cursor_expired"),
  },
});

// ---- agents ----

export const registerAgent = createRoute({
  method: "post",
  path: "/rooms/{id}/agents",
  operationId: "registerAgent",
  summary:
    "Register an agent (201, with its token), or again with its token (200)",
  request: { params: RoomParams, body: body(RegisterAgent) },
  responses: {
    201: json(AgentOut, "The agent with its `token` (shown once)"),
    200: json(AgentOut, "Registered again with its token or the room token"),
    ...errors(...WRITE, "agent_exists", "forbidden"),
  },
});

export const listAgents = createRoute({
  method: "get",
  path: "/rooms/{id}/agents",
  operationId: "listAgents",
  summary: "The room's agents, with presence",
  request: { params: RoomParams },
  responses: {
    200: json(z.array(AgentOut), "`[agent]`"),
    ...errors(...READ),
  },
});

export const heartbeat = createRoute({
  method: "post",
  path: "/rooms/{id}/agents/{agent}/heartbeat",
  operationId: "heartbeat",
  summary:
    "Mark an agent as seen, with a status (`active`, `idle`, `busy`, `waiting`, `done`)",
  request: {
    params: z.object({ id: Id, agent: Id }),
    body: body(Heartbeat),
  },
  responses: {
    200: json(AgentOut, "The agent"),
    ...errors(...WRITE, "agent_not_found"),
  },
});

// ---- messages ----

export const postMessage = createRoute({
  method: "post",
  path: "/rooms/{id}/messages",
  operationId: "postMessage",
  summary: "Append a message (`Idempotency-Key` makes a retry safe)",
  request: {
    params: RoomParams,
    headers: IdempotencyHeaders,
    body: body(PostMessage),
  },
  responses: {
    201: json(MessageOut, "The message"),
    ...errors(...WRITE, "idempotency_key_reused", "idempotency_key_in_use"),
  },
});

export const listMessages = createRoute({
  method: "get",
  path: "/rooms/{id}/messages",
  operationId: "listMessages",
  summary: "Read messages; with `wait`, hold until one matches",
  request: { params: RoomParams, query: ListMessages },
  responses: {
    200: json(z.array(MessageOut), "`[message]`, ascending (or `order=desc`)"),
    ...errors(
      ...READ,
      "read_only",
      "identity_mismatch",
      "too_many_waits",
      "cursor_expired",
    ),
  },
});

export const claimMessage = createRoute({
  method: "post",
  path: "/rooms/{id}/messages/{mid}/claim",
  operationId: "claimMessage",
  summary: "Claim a message, optionally for `lease` seconds",
  request: { params: MessageParams, body: body(Claim) },
  responses: {
    200: json(
      z.object({ claimed: z.boolean(), message: MessageOut }),
      "`{claimed: true, message}`",
    ),
    ...errors(
      ...WRITE,
      "message_not_found",
      "already_claimed",
      "already_completed",
      "attempts_exhausted",
    ),
  },
});

export const releaseMessage = createRoute({
  method: "post",
  path: "/rooms/{id}/messages/{mid}/release",
  operationId: "releaseMessage",
  summary: "Give a claim back",
  request: { params: MessageParams, body: body(Release) },
  responses: {
    200: json(
      z.object({ released: z.boolean(), message: MessageOut }),
      "`{released, message}`",
    ),
    ...errors(
      ...WRITE,
      "message_not_found",
      "already_claimed",
      "already_completed",
    ),
  },
});

export const completeMessage = createRoute({
  method: "post",
  path: "/rooms/{id}/messages/{mid}/complete",
  operationId: "completeMessage",
  summary:
    "Mark a claimed message done (its holder only), posting `result` as a reply in the same transaction",
  request: {
    params: MessageParams,
    headers: IdempotencyHeaders,
    body: body(Complete),
  },
  responses: {
    200: json(
      z.object({
        completed: z.boolean(),
        message: MessageOut,
        result: MessageOut.nullable(),
      }),
      "`{completed: true, message, result}`",
    ),
    ...errors(
      ...WRITE,
      "message_not_found",
      "not_holder",
      "already_completed",
      "idempotency_key_reused",
      "idempotency_key_in_use",
    ),
  },
});

// ---- state ----

export const putState = createRoute({
  method: "put",
  path: "/rooms/{id}/state",
  operationId: "putState",
  summary:
    "Write a key: `value` or `increment`, with `merge`, `ttl`, `if_version`",
  request: { params: RoomParams, body: body(PutState) },
  responses: {
    200: json(EntryOut, "The entry as written"),
    ...errors(...WRITE, "version_conflict", "not_a_number", "out_of_range"),
  },
});

export const getState = createRoute({
  method: "get",
  path: "/rooms/{id}/state",
  operationId: "getState",
  summary:
    "One entry when `key` is given (scope `_shared` by default; with `after_version` and `wait`, hold until it changes), else a list; `at` reads them as they were right after a message",
  request: { params: RoomParams, query: GetState },
  responses: {
    200: json(z.union([EntryOut, z.array(EntryOut)]), "An entry or a list"),
    ...errors(
      ...READ,
      "key_not_found",
      "message_not_found",
      "read_only",
      "identity_mismatch",
      "too_many_waits",
    ),
  },
});

export const getStateHistory = createRoute({
  method: "get",
  path: "/rooms/{id}/state/history",
  operationId: "getStateHistory",
  summary:
    "The versions of one key, oldest first: who wrote what, when, after which message (deletes and expiries included)",
  request: { params: RoomParams, query: StateHistory },
  responses: {
    200: json(z.array(VersionOut), "The versions (empty past the last)"),
    ...errors(...READ),
  },
});

export const exportRoom = createRoute({
  method: "get",
  path: "/rooms/{id}/export",
  operationId: "exportRoom",
  summary:
    "The whole room as NDJSON, streamed: room, agent, message, state and state_version lines (no tokens)",
  request: { params: RoomParams },
  responses: {
    200: text("application/x-ndjson", "One JSON object per line"),
    ...errors(...READ),
  },
});

export const deleteState = createRoute({
  method: "delete",
  path: "/rooms/{id}/state",
  operationId: "deleteState",
  summary: "Delete a key (`if_version` makes it conditional)",
  request: { params: RoomParams, body: body(DeleteState) },
  responses: {
    200: json(
      z.object({ deleted: z.boolean() }),
      "`{deleted: true}` (`false` if it was absent)",
    ),
    ...errors(...WRITE, "version_conflict"),
  },
});

// ---- batch ----

export const batch = createRoute({
  method: "post",
  path: "/rooms/{id}/batch",
  operationId: "batch",
  summary:
    "State writes and message appends, all or nothing (at most 100 operations)",
  request: {
    params: RoomParams,
    headers: IdempotencyHeaders,
    body: body(Batch),
  },
  responses: {
    200: json(
      z.object({
        state: z.array(z.union([EntryOut, DeletedOut])),
        messages: z.array(MessageOut),
      }),
      "`{state, messages}`",
    ),
    ...errors(
      ...WRITE,
      "version_conflict",
      "not_a_number",
      "out_of_range",
      "conflict",
      "idempotency_key_reused",
      "idempotency_key_in_use",
    ),
  },
});
