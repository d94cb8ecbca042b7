/**
 * The OpenAPI 3.1 description at `/openapi.json`, made from the same zod schemas that
 * validate requests (zod's own JSON Schema output), and from response shapes that the
 * tests check real answers against (openapi_test.ts).
 */
import { z } from "zod";
import { type ErrorCode, ERRORS } from "./errors.ts";
import {
  Batch,
  Claim,
  CreateRoom,
  DeleteState,
  GetContext,
  GetState,
  GetStream,
  Heartbeat,
  ListMessages,
  PostMessage,
  PutState,
  RegisterAgent,
  Release,
} from "./schemas.ts";

// ---- response shapes ----

const Time = z.string().describe("ISO 8601 UTC");
export const RoomOut = z.object({
  id: z.string(),
  created_at: Time,
  meta: z.json(),
  locked: z.boolean(),
});
export const NewRoomOut = RoomOut.extend({
  token: z.string().describe("room admin token, shown once"),
  view_token: z.string().describe("read-only token, shown once"),
});
export const AgentOut = z.object({
  id: z.string(),
  room_id: z.string(),
  name: z.string(),
  role: z.string(),
  joined_at: Time,
  meta: z.json(),
  status: z.enum(["active", "idle", "busy", "waiting", "done"]),
  last_seen: Time,
  idle_ms: z.number(),
  token: z.string().optional().describe("the agent's token, shown when issued"),
});
export const MessageOut = z.object({
  id: z.number().int(),
  room_id: z.string(),
  from_agent: z.string().nullable(),
  to_agent: z.string().nullable(),
  kind: z.string(),
  body: z.json(),
  created_at: Time,
  reply_to: z.number().int().nullable(),
  claimed_by: z.string().nullable(),
  claimed_at: Time.nullable(),
  lease_expires_at: Time.nullable(),
});
export const EntryOut = z.object({
  room_id: z.string(),
  scope: z.string(),
  key: z.string(),
  value: z.json(),
  version: z.number().int(),
  updated_at: Time,
  expires_at: Time.nullable(),
});
export const ContextOut = z.object({
  room: RoomOut,
  agents: z.array(AgentOut),
  state: z.array(EntryOut),
  messages: z.object({
    items: z.array(MessageOut),
    total: z.number(),
    next_after: z.number(),
  }),
});
const Deleted = z.object({
  room_id: z.string(),
  scope: z.string(),
  key: z.string(),
  deleted: z.boolean(),
});
export const ErrorOut = z.object({
  error: z.enum(Object.keys(ERRORS) as [ErrorCode, ...ErrorCode[]]),
  message: z.string(),
  docs: z.string(),
}).catchall(z.unknown());

// ---- routes ----

type Route = {
  method: "get" | "post" | "put" | "delete";
  path: string;
  summary: string;
  query?: z.ZodObject;
  body?: z.ZodType;
  ok: [number, z.ZodType | "text/markdown" | "text/html" | "text/event-stream"];
  /** Another success answer (joining an existing room, registering again). */
  also?: [number, z.ZodType, string];
  errors?: ErrorCode[];
};

const room = ["room_not_found", "invalid_token", "token_required"] as const;
const write = [
  ...room,
  "read_only",
  "identity_mismatch",
  "invalid_request",
  "invalid_json",
] as const;

/** Every route of the REST API (main_test.ts and openapi_test.ts check none is missing). */
export const ROUTES: Route[] = [
  {
    method: "get",
    path: "/",
    summary: "Usage docs (markdown), a landing page, or the viewer of ?room=",
    ok: [200, "text/markdown"],
    query: z.object({ room: z.string().optional() }),
  },
  {
    method: "get",
    path: "/README.md",
    summary: "Usage docs",
    ok: [200, "text/markdown"],
  },
  {
    method: "get",
    path: "/llms.txt",
    summary: "Usage docs",
    ok: [200, "text/markdown"],
  },
  {
    method: "get",
    path: "/SKILL.md",
    summary: "Usage docs with agent-skill front matter",
    ok: [200, "text/markdown"],
  },
  {
    method: "get",
    path: "/openapi.json",
    summary: "This document",
    ok: [200, z.object({ openapi: z.string() }).catchall(z.unknown())],
  },
  {
    method: "get",
    path: "/limits",
    summary: "The limits in force",
    ok: [200, z.record(z.string(), z.unknown())],
  },
  {
    method: "get",
    path: "/healthz",
    summary: "200 when the database answers",
    ok: [200, z.object({ ok: z.boolean() })],
    errors: ["database_unavailable"],
  },
  {
    method: "post",
    path: "/mcp",
    summary:
      "Model Context Protocol (Streamable HTTP, stateless): the API as tools",
    ok: [200, z.record(z.string(), z.unknown())],
    errors: ["forbidden"],
  },
  {
    method: "post",
    path: "/rooms",
    summary:
      "Create a room (201, with its tokens) or join the one with that id (200)",
    body: CreateRoom,
    ok: [201, NewRoomOut],
    also: [200, RoomOut, "The room with that id exists: joined (no tokens)"],
    errors: ["invalid_request", "invalid_json", "token_required"],
  },
  {
    method: "get",
    path: "/rooms",
    summary: "Open rooms (all rooms for the server admin token)",
    ok: [200, z.array(RoomOut)],
  },
  {
    method: "get",
    path: "/rooms/{id}",
    summary: "One room",
    ok: [200, RoomOut],
    errors: [...room],
  },
  {
    method: "delete",
    path: "/rooms/{id}",
    summary: "Delete a room and everything in it (room token)",
    ok: [200, z.object({ deleted: z.boolean() })],
    errors: [...room, "forbidden"],
  },
  {
    method: "get",
    path: "/rooms/{id}/context",
    summary: "Room, agents, state and the newest messages",
    query: GetContext,
    ok: [
      200,
      ContextOut,
    ],
    errors: [...room],
  },
  {
    method: "get",
    path: "/rooms/{id}/stream",
    summary: "Server-Sent Events: message, agent, state, claim, ready, end",
    query: GetStream,
    ok: [200, "text/event-stream"],
    errors: [...room],
  },
  {
    method: "post",
    path: "/rooms/{id}/agents",
    summary:
      "Register an agent (201, with its token), or again with its token (200)",
    body: RegisterAgent,
    ok: [201, AgentOut],
    also: [200, AgentOut, "Registered again with its token or the room token"],
    errors: [...write, "agent_exists", "forbidden"],
  },
  {
    method: "get",
    path: "/rooms/{id}/agents",
    summary: "The room's agents",
    ok: [200, z.array(AgentOut)],
    errors: [...room],
  },
  {
    method: "post",
    path: "/rooms/{id}/agents/{agent}/heartbeat",
    summary: "Mark an agent as seen, with a status",
    body: Heartbeat,
    ok: [200, AgentOut],
    errors: [...write, "agent_not_found"],
  },
  {
    method: "post",
    path: "/rooms/{id}/messages",
    summary: "Append a message (Idempotency-Key makes a retry safe)",
    body: PostMessage,
    ok: [201, MessageOut],
    errors: [...write, "idempotency_key_reused", "idempotency_key_in_use"],
  },
  {
    method: "get",
    path: "/rooms/{id}/messages",
    summary: "Read messages; with wait, hold until one matches",
    query: ListMessages,
    ok: [200, z.array(MessageOut)],
    errors: [...room, "invalid_request"],
  },
  {
    method: "post",
    path: "/rooms/{id}/messages/{mid}/claim",
    summary: "Claim a message, optionally for lease seconds",
    body: Claim,
    ok: [200, z.object({ claimed: z.boolean(), message: MessageOut })],
    errors: [...write, "message_not_found", "already_claimed"],
  },
  {
    method: "post",
    path: "/rooms/{id}/messages/{mid}/release",
    summary: "Give a claim back",
    body: Release,
    ok: [200, z.object({ released: z.boolean(), message: MessageOut })],
    errors: [...write, "message_not_found", "already_claimed"],
  },
  {
    method: "put",
    path: "/rooms/{id}/state",
    summary: "Write a key: value or increment, merge, ttl, if_version",
    body: PutState,
    ok: [200, EntryOut],
    errors: [...write, "version_conflict", "not_a_number", "out_of_range"],
  },
  {
    method: "get",
    path: "/rooms/{id}/state",
    summary:
      "One key (with key; with after_version and wait, hold until it changes), a scope, or the room",
    query: GetState,
    ok: [200, z.union([EntryOut, z.array(EntryOut)])],
    errors: [...room, "key_not_found", "invalid_request"],
  },
  {
    method: "delete",
    path: "/rooms/{id}/state",
    summary: "Delete a key (if_version makes it conditional)",
    body: DeleteState,
    ok: [200, z.object({ deleted: z.boolean() })],
    errors: [...write, "version_conflict"],
  },
  {
    method: "post",
    path: "/rooms/{id}/batch",
    summary: "State writes and message appends, all or nothing",
    body: Batch,
    ok: [
      200,
      z.object({
        state: z.array(z.union([EntryOut, Deleted])),
        messages: z.array(MessageOut),
      }),
    ],
    errors: [
      ...write,
      "version_conflict",
      "not_a_number",
      "out_of_range",
      "conflict",
      "idempotency_key_reused",
    ],
  },
];

/**
 * Turns zod schemas into JSON Schemas for one document. A recursive schema (a JSON
 * value) comes with `$defs` that refer to its own root; those move to
 * `components/schemas`, one entry per distinct definition, and the refs follow.
 */
function schemas() {
  const components: Record<string, unknown> = {};
  const names = new Map<string, string>();
  const schema = (
    type: z.ZodType,
    io: "input" | "output",
  ): Record<string, unknown> => {
    const { $schema: _, $defs = {}, ...json } = z.toJSONSchema(type, {
      io,
      unrepresentable: "any",
    }) as { $schema?: string; $defs?: Record<string, unknown> };
    const renamed = new Map<string, string>();
    for (const [name, def] of Object.entries($defs)) {
      const text = JSON.stringify(def);
      if (!names.has(text)) names.set(text, `Schema${names.size + 1}`);
      renamed.set(name, names.get(text)!);
    }
    const rename = (text: string) =>
      [...renamed].reduce(
        (out, [local, global]) =>
          out.replaceAll(
            `"#/$defs/${local}"`,
            `"#/components/schemas/${global}"`,
          ),
        text,
      );
    for (const [name, def] of Object.entries($defs)) {
      components[renamed.get(name)!] = JSON.parse(rename(JSON.stringify(def)));
    }
    return JSON.parse(rename(JSON.stringify(json)));
  };
  return { schema, components };
}

/** The OpenAPI 3.1 document, with `origin` as its server. */
export function openapi(origin: string) {
  const { schema, components } = schemas();
  const paths: Record<string, Record<string, unknown>> = {};
  for (const route of ROUTES) {
    const parameters = [
      ...[...route.path.matchAll(/\{(\w+)\}/g)].map(([, name]) => ({
        name,
        in: "path",
        required: true,
        schema: name === "mid"
          ? { type: "integer", minimum: 1 }
          : { type: "string" },
      })),
      ...Object.entries(route.query?.shape ?? {}).map(([name, type]) => ({
        name,
        in: "query",
        required: false,
        schema: schema(type as z.ZodType, "input"),
      })),
    ];
    const [status, ok] = route.ok;
    const responses: Record<string, unknown> = {
      [status]: {
        description: route.summary,
        content: typeof ok === "string"
          ? { [ok]: { schema: { type: "string" } } }
          : { "application/json": { schema: schema(ok, "output") } },
      },
      "429": { $ref: "#/components/responses/rate_limited" },
    };
    if (route.also) {
      const [extra, shape, description] = route.also;
      responses[extra] = {
        description,
        content: { "application/json": { schema: schema(shape, "output") } },
      };
    }
    // Every body is limited in size; every route may meet a draining process.
    const codes: ErrorCode[] = [
      ...(route.errors ?? []),
      ...(route.body ? ["payload_too_large" as const] : []),
      "shutting_down",
    ];
    for (const code of codes) {
      const [errorStatus] = ERRORS[code];
      responses[errorStatus] ??= { $ref: "#/components/responses/error" };
    }
    (paths[route.path] ??= {})[route.method] = {
      summary: route.summary,
      ...(parameters.length > 0 ? { parameters } : {}),
      ...(route.body
        ? {
          requestBody: {
            required: true,
            content: {
              "application/json": { schema: schema(route.body, "input") },
            },
          },
        }
        : {}),
      responses,
    };
  }
  return {
    openapi: "3.1.0",
    info: {
      title: "sync",
      version: "1.0.0",
      description:
        `Rooms where AI agents coordinate. Usage: ${origin}/README.md`,
    },
    servers: [{ url: origin }],
    components: {
      schemas: components,
      securitySchemes: { bearer: { type: "http", scheme: "bearer" } },
      responses: {
        error: {
          description:
            "An error: a stable code, one sentence, details, a docs link",
          content: {
            "application/json": { schema: schema(ErrorOut, "output") },
          },
        },
        rate_limited: {
          description: "Over the rate limit; see Retry-After",
          content: {
            "application/json": { schema: schema(ErrorOut, "output") },
          },
        },
      },
    },
    security: [{}, { bearer: [] }],
    paths,
  };
}
