/**
 * Every input and answer of the API as a zod schema (routes.ts puts them on the
 * routes), and what a request that does not match them gets: a 400 with the one error
 * shape, before any handler runs.
 */
import type { Context, MiddlewareHandler } from "hono";
import { z } from "zod";
import { STATUSES, TASK_STATUSES } from "./db.ts";
import { ApiError, type ErrorCode, ERRORS } from "./errors.ts";

// ---- building blocks ----

/** Ids of rooms and agents, scopes and kinds. */
export const Id = z.string().regex(/^[A-Za-z0-9._:@-]{1,128}$/, {
  error: "must be 1-128 characters of A-Z a-z 0-9 . _ : @ -",
}).refine((id) => id !== "." && id !== "..", {
  // A path segment of "." or ".." would name another path: /rooms/.. is /.
  error: 'must not be "." or ".."',
}).meta({
  minLength: 1,
  maxLength: 128,
  // The same as the checks above: not only dots, unless three or more.
  pattern: "^([A-Za-z0-9._:@-]*[A-Za-z0-9_:@-][A-Za-z0-9._:@-]*|\\.{3,})$",
});

/** A JSON value, as `JSON.parse` gives it. */
export type JsonValue =
  | null
  | boolean
  | number
  | string
  | JsonValue[]
  | { [key: string]: JsonValue };

/** Whether `value` is JSON with finite numbers (`JSON.parse("1e999")` is Infinity). */
function isJson(value: unknown): value is JsonValue {
  if (value === null || typeof value === "string") return true;
  if (typeof value === "boolean") return true;
  if (typeof value === "number") return Number.isFinite(value);
  if (Array.isArray(value)) return value.every(isJson);
  if (typeof value !== "object") return false;
  return Object.values(value).every(isJson);
}

/**
 * Any JSON value, kept as it was sent: `z.json()` rebuilds objects and silently drops a
 * `"__proto__"` member (fuzz_test.ts). Nesting is bounded separately
 * (`MAX_JSON_DEPTH`) before zod sees it, so the recursion here stays shallow.
 */
// Not narrowed to JsonValue: answers typed from it stay `unknown`, as the rows are.
export const Json = z.unknown().refine((value): boolean => isJson(value), {
  error: (issue) =>
    issue.input === undefined
      ? "is required"
      : "must be a JSON value (numbers must be finite)",
}).meta({ id: "JsonValue", description: "Any JSON value" });

/** A state key: any text without control characters. */
/**
 * Text stored as text (not inside JSON) must be well-formed: SQLite would turn a lone
 * surrogate into U+FFFD, so two different keys could land on one row.
 */
const WellFormed = z.string().refine((s) => s.isWellFormed(), {
  error: "must be well-formed Unicode (no lone surrogates)",
});

export const Key = WellFormed.min(1).max(512).regex(/^\P{Cc}*$/u, {
  error: "must not contain control characters",
}).meta({ pattern: "^\\P{Cc}*$" }); // zod would write the /u flag into the pattern

/** A name or role: any text but U+0000, which SQLite and C clients would cut at. */
export const Name = WellFormed.min(1).max(256).refine(
  (s) => !s.includes("\0"),
  {
    error: "must not contain U+0000 (NUL)",
  },
);

/** The largest id or count a query string takes (15 digits). */
const MAX_COUNT = 999_999_999_999_999;

/**
 * A whole number in a query string or path, from `min` to `max`: the text is checked
 * (no "1e3", no " 5"), then the number; OpenAPI shows it as the integer it is.
 */
function count(min = 0, max = MAX_COUNT) {
  return z.string().regex(/^\d{1,15}$/, {
    error: min > 0
      ? "must be a positive integer"
      : "must be a non-negative integer",
  }).transform(Number).pipe(z.number().min(min).max(max))
    .meta({ type: "integer", minimum: min, maximum: max });
}

/** A message id in a path or a Last-Event-ID header. */
export const PathMessageId = count(1);

// ---- bodies ----

export const CreateRoom = z.strictObject({
  id: Id.optional(),
  meta: Json.optional(),
  locked: z.boolean().optional(),
});
export type CreateRoom = z.infer<typeof CreateRoom>;

export const RegisterAgent = z.strictObject({
  id: Id.optional(),
  name: Name,
  role: Name.optional(),
  meta: Json.optional(),
  rotate_token: z.boolean().optional(),
});
export type RegisterAgent = z.infer<typeof RegisterAgent>;

export const Heartbeat = z.strictObject({
  status: z.enum(STATUSES).optional(),
});
export type Heartbeat = z.infer<typeof Heartbeat>;

/** A message id in a body. */
const MessageId = z.number().int().min(1).max(Number.MAX_SAFE_INTEGER);

/** The most claims a task may allow before it is dead. */
export const MAX_ATTEMPTS = 100;

export const PostMessage = z.strictObject({
  from: Id.nullable().optional(),
  to: Id.nullable().optional(),
  kind: Id.optional(),
  body: Json,
  reply_to: MessageId.nullable().optional(),
  max_attempts: z.number().int().min(1).max(MAX_ATTEMPTS).nullable().optional()
    .describe(
      "Claims allowed before the message is dead (released or lapsed on its last attempt)",
    ),
});
export type PostMessage = z.infer<typeof PostMessage>;

/** Seconds of a lease or a TTL: above zero, at most 30 days. */
const Seconds = z.number().positive().max(30 * 24 * 3600);

export const Claim = z.strictObject({
  agent: Id.optional(),
  lease: Seconds.optional(),
});
export type Claim = z.infer<typeof Claim>;

export const Release = z.strictObject({ agent: Id.optional() });
export type Release = z.infer<typeof Release>;

export const Complete = z.strictObject({
  agent: Id.optional(),
  result: z.strictObject({
    body: Json,
    kind: Id.optional().describe('Default "result"'),
    to: Id.nullable().optional(),
  }).optional().describe(
    "Posted as a reply to the message, from the completing agent, in the same transaction",
  ),
});
export type Complete = z.infer<typeof Complete>;

const Version = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);

/** The scope when none is given: state shared by the whole room. */
export const SHARED = "_shared";

const WRITE_FIELDS = {
  scope: Id.default(SHARED),
  key: Key,
  value: Json.optional(),
  increment: z.union([z.literal(true), z.number()]).transform((n) =>
    n === true ? 1 : n
  )
    .optional(),
  merge: z.boolean().optional(),
  ttl: Seconds.optional(),
  if_version: Version.optional(),
  /** Who writes (`updated_by`): an agent token's own agent, else the one named. */
  agent: Id.optional(),
};

type WriteFields = {
  value?: unknown;
  increment?: unknown;
  merge?: boolean;
  ttl?: number;
  delete?: boolean;
};

/** Whether an object anywhere in `value` has a key with a NUL character in it. */
export function hasNulKey(value: unknown): boolean {
  if (Array.isArray(value)) return value.some(hasNulKey);
  if (value === null || typeof value !== "object") return false;
  return Object.entries(value).some(([key, v]) =>
    key.includes("\0") || hasNulKey(v)
  );
}

/**
 * A write takes exactly one of `value` or `increment`; `merge` goes with `value`. A
 * state value's object keys must not hold NUL: SQLite's `json_patch` compares keys
 * as C strings, so a merge would take `"a\u0000b"` for `"a"` (fuzz_test.ts).
 */
function checkWrite(input: WriteFields, ctx: z.RefinementCtx): void {
  const problem = (path: string, message: string) =>
    ctx.addIssue({ code: "custom", path: [path], message });
  if (input.delete) {
    for (const field of ["value", "increment", "merge", "ttl"] as const) {
      if (input[field] !== undefined) {
        problem(field, "must not be given with delete");
      }
    }
  } else if (input.value === undefined && input.increment === undefined) {
    problem("value", "is required (or increment)");
  } else if (input.value !== undefined && input.increment !== undefined) {
    problem("increment", "must not be given with value");
  } else if (input.merge && input.increment !== undefined) {
    problem("merge", "applies a value; it cannot go with increment");
  } else if (hasNulKey(input.value)) {
    problem(
      "value",
      "must not have object keys containing U+0000 (NUL); state merges cannot tell such keys apart",
    );
  }
}

export const PutState = z.strictObject(WRITE_FIELDS).superRefine(checkWrite);
export type PutState = z.infer<typeof PutState>;

export const DeleteState = z.strictObject({
  scope: Id.default(SHARED),
  key: Key,
  if_version: Version.optional(),
  agent: Id.optional(),
});
export type DeleteState = z.infer<typeof DeleteState>;

/** The most operations one batch may hold. */
export const MAX_BATCH = 100;

export const BatchWrite = z.strictObject({
  ...WRITE_FIELDS,
  delete: z.literal(true).optional(),
}).superRefine(checkWrite);
export type BatchWrite = z.infer<typeof BatchWrite>;

export const Batch = z.strictObject({
  state: z.array(BatchWrite).optional(),
  messages: z.array(PostMessage).optional(),
}).superRefine((input, ctx) => {
  const count = (input.state?.length ?? 0) + (input.messages?.length ?? 0);
  if (count === 0 || count > MAX_BATCH) {
    ctx.addIssue({
      code: "custom",
      path: [],
      message: `A batch holds 1 to ${MAX_BATCH} operations, not ${count}`,
    });
  }
});
export type Batch = z.infer<typeof Batch>;

// ---- query strings and paths ----

/** The longest a long-poll may be held, in seconds. */
export const MAX_WAIT_SECONDS = 50;

/** The most messages one read answers. */
export const MAX_MESSAGES_PER_READ = 1000;

/** The most kinds one read filters on (`kind=a,b,…`). */
export const MAX_KINDS = 50;

/** A comma list of task statuses (`open,held`). */
const Statuses = z.string().transform((s) => s.split(",")).pipe(
  z.array(z.enum(TASK_STATUSES)).min(1).max(TASK_STATUSES.length),
).meta({
  type: "string",
  pattern: `^(${TASK_STATUSES.join("|")})(,(${TASK_STATUSES.join("|")}))*$`,
  description: "A comma list of task statuses: open, held, done, dead",
});

/** Seconds to hold a long-poll: 0 to 50, fractions allowed. */
const Wait = z.string().regex(/^\d{1,3}(\.\d{1,3})?$/, {
  error: "must be a number of seconds",
})
  .transform(Number).pipe(z.number().max(MAX_WAIT_SECONDS))
  .meta({ type: "number", minimum: 0, maximum: MAX_WAIT_SECONDS });

export const ListMessages = z.strictObject({
  after: count().optional(),
  before: count(1).optional(),
  limit: count(1, MAX_MESSAGES_PER_READ).optional(),
  order: z.enum(["asc", "desc"]).optional(),
  kind: z.string().transform((s) => s.split(",")).pipe(
    z.array(Id).max(MAX_KINDS),
  ).optional(),
  from: Id.optional(),
  to: Id.optional(),
  for: Id.optional(),
  thread: count(1).optional(),
  status: Statuses.optional(),
  unclaimed: z.enum(["true", "false"]).transform((s) => s === "true")
    .optional().describe("true: status=open; false: status=held"),
  wait: Wait.optional(),
  agent: Id.optional(),
});
export type ListMessages = z.infer<typeof ListMessages>;

export const GetState = z.strictObject({
  scope: Id.optional(),
  key: Key.optional(),
  after_version: count().optional(),
  wait: Wait.optional(),
  agent: Id.optional(),
  at: count(1).optional().describe(
    "A message id of the room: the state as it was right after it was posted",
  ),
}).superRefine((input, ctx) => {
  if (
    input.key === undefined &&
    (input.after_version !== undefined || input.wait !== undefined)
  ) {
    ctx.addIssue({
      code: "custom",
      path: ["key"],
      message: "is required to wait on a key (after_version, wait)",
    });
  }
  if (
    input.at !== undefined &&
    (input.after_version !== undefined || input.wait !== undefined)
  ) {
    ctx.addIssue({
      code: "custom",
      path: ["at"],
      message: "reads the past: it cannot wait (after_version, wait)",
    });
  }
});

/** The most versions one page of a key's history answers. */
export const MAX_VERSIONS_PER_READ = 1000;

export const StateHistory = z.strictObject({
  scope: Id.default(SHARED),
  key: Key,
  after_version: count().optional(),
  limit: count(1, MAX_VERSIONS_PER_READ).optional().describe("Default 100"),
});
export type StateHistory = z.infer<typeof StateHistory>;
export type GetState = z.infer<typeof GetState>;

/** The most rooms one page of `GET /rooms` answers. */
export const MAX_ROOMS_PER_PAGE = 1000;

export const ListRooms = z.strictObject({
  limit: count(1, MAX_ROOMS_PER_PAGE).optional().describe("Default 100"),
  after: Id.optional().describe(
    "The last room of the page before: rooms made after it, in creation order",
  ),
});

export const GetContext = z.strictObject({
  messages: count(0, MAX_MESSAGES_PER_READ).optional(),
  status: Statuses.optional(),
});

export const GetStream = z.strictObject({
  after: count().optional(),
  status: Statuses.optional().describe(
    "Only messages in these statuses (claim events, which carry status changes, all come)",
  ),
});

export const ImportQuery = z.strictObject({
  id: Id.optional().describe("The new room's id (default: the exported one)"),
});

export const ViewerQuery = z.strictObject({ room: Id.optional() });

/** Idempotency-Key values: printable ASCII, 1-255 characters. */
export const IdempotencyKey = z.string().regex(/^[\x21-\x7e]{1,255}$/, {
  error: "must be 1-255 printable ASCII characters without spaces",
}).meta({ minLength: 1, maxLength: 255 });

/** A Last-Event-ID header: the id of the last message a stream delivered. */
export const LastEventId = count();

// ---- answers ----

export const Time = z.string().meta({
  description: "ISO 8601 UTC",
  format: "date-time",
});
export const RoomOut = z.object({
  id: z.string(),
  created_at: Time,
  meta: Json,
  locked: z.boolean(),
});
export const NewRoomOut = RoomOut.extend({
  token: z.string().describe("room admin token, shown once"),
  view_token: z.string().describe("read-only token, shown once"),
});
export const ImportOut = NewRoomOut.extend({
  imported: z.object({
    agents: z.number().int(),
    messages: z.number().int(),
    state: z.number().int(),
    state_versions: z.number().int(),
  }).describe("How many of each were imported"),
});
export const AgentOut = z.object({
  id: z.string(),
  room_id: z.string(),
  name: z.string(),
  role: z.string(),
  joined_at: Time,
  meta: Json,
  status: z.enum(STATUSES),
  last_seen: Time,
  idle_ms: z.number().int(),
  token: z.string().optional().describe("the agent's token, shown when issued"),
});
export const MessageOut = z.object({
  id: z.number().int(),
  room_id: z.string(),
  from_agent: z.string().nullable(),
  to_agent: z.string().nullable(),
  kind: z.string(),
  body: Json,
  created_at: Time,
  reply_to: z.number().int().nullable(),
  claimed_by: z.string().nullable(),
  claimed_at: Time.nullable(),
  lease_expires_at: Time.nullable(),
  status: z.enum(TASK_STATUSES),
  attempts: z.number().int(),
  max_attempts: z.number().int().nullable(),
  done_at: Time.nullable(),
  done_by: z.string().nullable(),
});
export const EntryOut = z.object({
  room_id: z.string(),
  scope: z.string(),
  key: z.string(),
  value: Json,
  version: z.number().int(),
  updated_at: Time,
  expires_at: Time.nullable(),
  updated_by: z.string().nullable().describe(
    "The agent that wrote this version, when the writer was known",
  ),
});
export const VersionOut = z.object({
  version: z.number().int(),
  value: Json.describe("null when deleted"),
  deleted: z.boolean().describe(
    "Deleted, or expired (TTL) when `updated_by` is null",
  ),
  updated_by: z.string().nullable(),
  updated_at: Time,
  expires_at: Time.nullable(),
  after_message: z.number().int().describe(
    "The newest message id of the room when this version was written (0: none)",
  ),
});
export const ContextOut = z.object({
  room: RoomOut,
  agents: z.array(AgentOut),
  state: z.array(EntryOut),
  messages: z.object({
    items: z.array(MessageOut),
    total: z.number().int(),
    next_after: z.number().int(),
  }),
});
/** A batch's answer for a deleted key. */
export const DeletedOut = z.object({
  room_id: z.string(),
  scope: z.string(),
  key: z.string(),
  deleted: z.boolean(),
});
export const ErrorOut = z.object({
  error: z.enum(Object.keys(ERRORS) as [ErrorCode, ...ErrorCode[]]),
  message: z.string(),
  docs: z.string(),
}).catchall(z.unknown()).meta({ id: "Error" });

// ---- validators ----

/**
 * A request's body must arrive within `ms`, or the answer is 408 `request_timeout`
 * and the connection is closed: a body sent a byte at a time would otherwise hold its
 * request, and a connection, for as long as it likes. Runs before the size limit: a
 * body of declared length (up to `maxBytes`; a longer one is the size limit's 413) is
 * read here, and Hono keeps the text for the route; one of unknown length is timed
 * while the size limit reads it.
 */
export function bodyWithin(ms: number, maxBytes: number): MiddlewareHandler {
  return async (c, next) => {
    const raw = c.req.raw;
    if (raw.body === null) return next();
    const length = raw.headers.get("content-length");
    if (length === null || raw.headers.has("transfer-encoding")) {
      c.req.raw = new Request(raw, {
        body: raw.body.pipeThrough(deadline(ms)),
        duplex: "half",
      } as RequestInit);
      return next();
    }
    if (Number(length) <= maxBytes) {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const late = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(timedOut(ms)), ms);
      });
      try {
        await Promise.race([c.req.text(), late]);
      } finally {
        clearTimeout(timer);
      }
    }
    return next();
  };
}

/** A stream that passes bytes through until `ms` have passed, then fails. */
function deadline(ms: number): TransformStream<Uint8Array, Uint8Array> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  return new TransformStream({
    start(controller) {
      timer = setTimeout(() => controller.error(timedOut(ms)), ms);
    },
    flush() {
      clearTimeout(timer);
    },
    cancel() {
      clearTimeout(timer);
    },
  });
}

function timedOut(ms: number): ApiError {
  return new ApiError(
    "request_timeout",
    `The request body did not arrive within ${ms / 1000} s`,
  );
}

/** How deep a JSON body may nest. */
export const MAX_JSON_DEPTH = 64;

/**
 * The JSON body of a route that takes one, read before its schema is checked (api.ts).
 * Agents forget the content type (curl -d sends a form type), so the body is read as
 * JSON whatever its type; an empty body counts as `{}`; nesting deeper than
 * `MAX_JSON_DEPTH` is refused before zod recurses into it.
 */
export async function readJson(c: Context): Promise<unknown> {
  // Often read already (bodyWithin): Hono keeps the text.
  const text = await c.req.text();
  let value: unknown = {};
  if (text.trim() !== "") {
    try {
      value = JSON.parse(text);
    } catch {
      throw new ApiError("invalid_json", "The request body is not valid JSON");
    }
  }
  if (depth(value) > MAX_JSON_DEPTH) {
    throw new ApiError(
      "invalid_request",
      `Invalid request body: JSON nests deeper than ${MAX_JSON_DEPTH} levels`,
    );
  }
  return value;
}

const WHERE = {
  json: "request body",
  query: "query",
  param: "path",
  header: "header",
};

/**
 * One part of a request parsed with its route's schema (api.ts), or 400
 * `invalid_request` naming the first bad field.
 */
export function parseInput<T extends z.ZodType>(
  part: keyof typeof WHERE,
  schema: T,
  value: unknown,
): z.output<T> {
  return parse(schema, value, WHERE[part]);
}

/** Parses with a schema or throws 400 `invalid_request` naming the first bad field. */
export function parse<T extends z.ZodType>(
  schema: T,
  value: unknown,
  where: string,
): z.output<T> {
  const result = schema.safeParse(value);
  if (result.success) return result.data;
  throw invalid(result.error, where);
}

/** 400 `invalid_request` naming the first bad field of `error`. */
function invalid(error: z.ZodError, where: string): ApiError {
  // An unknown field first: it is usually a misspelling of the field reported missing.
  const issues = error.issues
    .toSorted((a, b) =>
      Number(b.code === "unrecognized_keys") -
      Number(a.code === "unrecognized_keys")
    )
    .map((issue) => describe(issue, where));
  return new ApiError(
    "invalid_request",
    `Invalid ${where}: ${issues[0].message}`,
    {
      field: issues[0].field,
      issues,
    },
  );
}

function describe(
  issue: z.core.$ZodIssue,
  where: string,
): { field: string; message: string } {
  const noun = where === "request body" ? "field" : "parameter";
  if (issue.code === "unrecognized_keys") {
    const field = [...issue.path, issue.keys[0]].join(".");
    return { field, message: `unknown ${noun} "${field}"` };
  }
  const field = issue.path.join(".");
  // zod says "Invalid input: expected string, received undefined" for a missing field.
  const text = issue.code === "invalid_type" &&
      issue.message.endsWith("received undefined")
    ? "is required"
    : issue.message.replace(/^Invalid input: /, "");
  const predicate = /^(is|must) /.test(text)
    ? ` ${text}`
    : `: ${text.toLowerCase()}`;
  return {
    field,
    message: field === "" ? text : `${noun} "${field}"${predicate}`,
  };
}

/** How deep a JSON value nests (stops counting past `MAX_JSON_DEPTH`). */
export function depth(value: unknown): number {
  let deepest = 0;
  const stack: [unknown, number][] = [[value, 1]];
  while (stack.length > 0) {
    const [item, level] = stack.pop()!;
    if (item === null || typeof item !== "object") continue;
    deepest = Math.max(deepest, level);
    if (deepest > MAX_JSON_DEPTH) return deepest;
    for (const child of Object.values(item)) stack.push([child, level + 1]);
  }
  return deepest;
}
