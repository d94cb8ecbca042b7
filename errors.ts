/**
 * The one error shape of the API, `{error, message, ...details}`, made here and only
 * here: handlers throw an `ApiError`, `onError` and `notFound` turn everything into JSON.
 */
import { LibsqlError } from "@libsql/core/api";

import type { BatchResult, Message, WriteResult } from "./db.ts";
import { isUnavailable } from "./driver.ts";
import type { Context, ErrorHandler, NotFoundHandler } from "hono";
import type { ContentfulStatusCode } from "hono/utils/http-status";

/**
 * Every error code the API answers with, its status and when: the one list that the
 * usage docs render and the README is checked against (main_test.ts).
 */
export const ERRORS = {
  invalid_json: [400, "the body is not valid JSON"],
  invalid_request: [
    400,
    "a field, parameter or header is missing, unknown, of the wrong type or out of range (`field` names it, `issues` lists every problem)",
  ],
  invalid_token: [
    401,
    "the bearer token is malformed, unknown, or not one of this room's (`Authorization: Bearer <token>`)",
  ],
  token_required: [401, "the room is locked: send a token of the room"],
  read_only: [403, "a view token reads only"],
  forbidden: [
    403,
    "this needs the room token (deleting the room, joining a locked room)",
  ],
  identity_mismatch: [
    403,
    "an agent token acts as its agent only: `from`, `agent` or the scope named another",
  ],
  not_found: [404, "no such route (or method)"],
  method_not_allowed: [405, "`/mcp` takes POST only (it is stateless)"],
  room_not_found: [404, "no room has that id: create it with `POST /rooms`"],
  key_not_found: [404, "no live state entry has that scope and key"],
  agent_not_found: [404, "no agent of the room has that id"],
  message_not_found: [404, "no message of the room has that id"],
  room_exists: [
    409,
    "an import names a room that exists: name another with `?id=`",
  ],
  agent_exists: [
    409,
    "that agent id is registered in the room already (`agent` holds it)",
  ],
  already_claimed: [
    409,
    "another agent holds the message (`claimed_by`, `claimed_at`, `lease_expires_at`)",
  ],
  not_holder: [
    409,
    "only the agent holding a live claim completes the message; its lease may have run out: drop the work (`claimed_by`, `claimed_at`, `lease_expires_at`)",
  ],
  already_completed: [
    409,
    "the message is done: it cannot be claimed, released or completed again (`done_by`, `done_at`)",
  ],
  attempts_exhausted: [
    409,
    "the message used its `max_attempts` claims and is dead (`attempts`, `max_attempts`)",
  ],
  version_conflict: [
    409,
    "`if_version` did not match: `expected_version` and `current`, the whole entry or null (a batch lists every one in `conflicts`)",
  ],
  not_a_number: [
    409,
    "`increment` on a value that is not a number (`current` holds it)",
  ],
  out_of_range: [
    409,
    "`increment` whose sum would not be a finite JSON number",
  ],
  idempotency_key_in_use: [
    409,
    "the first request with that Idempotency-Key has not finished; retry",
  ],
  idempotency_key_reused: [
    422,
    "that Idempotency-Key was used for a different request (another path or body)",
  ],
  conflict: [409, "the write raced with another one; read and retry"],
  payload_too_large: [413, "the body is over `MAX_BODY_BYTES`"],
  request_timeout: [
    408,
    "the request body did not arrive within `STALL_TIMEOUT_SECONDS`; the connection is closed",
  ],
  too_many_waits: [
    429,
    "this client (a token, else an address) or this address holds too many long-polls and streams at once (`MAX_WAITS_PER_CLIENT`, `MAX_WAITS_PER_ADDRESS`)",
  ],
  cursor_expired: [
    410,
    "messages after this cursor were dropped by retention: read from `earliest_id` (`after=0` for the oldest kept)",
  ],
  rate_limited: [
    429,
    "too many requests from this token or address; wait `Retry-After` seconds",
  ],
  database_busy: [
    503,
    "the database stayed locked past the busy timeout; retry (`Retry-After`)",
  ],
  database_unavailable: [
    503,
    "the database does not answer (remote server unreachable, disk full); retry after `Retry-After`",
  ],
  over_capacity: [
    503,
    "the process holds `MAX_CONNECTIONS` connections, every one busy; retry (`Retry-After`)",
  ],
  shutting_down: [
    503,
    "the process is draining after SIGTERM; retry (`Retry-After`)",
  ],
  internal_error: [
    500,
    "a bug in the service (logged); never caused by what a client sent",
  ],
} as const satisfies Record<string, readonly [ContentfulStatusCode, string]>;

/** A stable error code of the API. */
export type ErrorCode = keyof typeof ERRORS;

/** An error a handler means to answer with: status, stable code, one sentence. */
export class ApiError extends Error {
  readonly status: ContentfulStatusCode;
  readonly code: ErrorCode;
  readonly details: Record<string, unknown>;

  constructor(
    code: ErrorCode,
    message: string,
    details: Record<string, unknown> = {},
  ) {
    super(message);
    this.status = ERRORS[code][0];
    this.code = code;
    this.details = details;
  }
}

/** Where the usage docs (`/README.md`) explain a code: its part, else the errors table. */
const SECTION: Partial<Record<ErrorCode, string>> = {
  invalid_token: "tokens-and-locked-rooms",
  token_required: "tokens-and-locked-rooms",
  read_only: "tokens-and-locked-rooms",
  forbidden: "tokens-and-locked-rooms",
  identity_mismatch: "tokens-and-locked-rooms",
  agent_exists: "tokens-and-locked-rooms",
  version_conflict: "coordination",
  not_a_number: "coordination",
  out_of_range: "coordination",
  already_claimed: "coordination",
  not_holder: "coordination",
  already_completed: "coordination",
  attempts_exhausted: "coordination",
  conflict: "coordination",
  idempotency_key_in_use: "coordination",
  idempotency_key_reused: "coordination",
  method_not_allowed: "endpoints",
};

/** The link to the docs section about an error code, on this request's host. */
export function docsLink(origin: string, code: ErrorCode): string {
  return `${origin}/README.md#${SECTION[code] ?? "errors"}`;
}

/** The one error body: code, sentence, details, and the docs link on `origin`. */
export function errorBody(origin: string, error: ApiError) {
  return {
    error: error.code,
    message: error.message,
    ...error.details,
    docs: docsLink(origin, error.code),
  };
}

/**
 * The origin of a request's URL, or "" when it has none: a malformed Host header
 * makes a URL no parser takes (the docs link is then relative).
 */
export function originOf(url: string): string {
  try {
    return new URL(url).origin;
  } catch {
    return "";
  }
}

/** The JSON response for an error, with a link to the docs that explain it. */
export function errorResponse(c: Context, error: ApiError): Response {
  return c.json(errorBody(originOf(c.req.url), error), error.status);
}

/** 404 `room_not_found` for a room id. */
export function roomNotFound(id: string): ApiError {
  return new ApiError("room_not_found", `Room "${id}" does not exist`, {
    room_id: id,
  });
}

/**
 * Turns anything thrown into the error shape. Constraint failures are 409 (a client
 * raced another); a busy database is 503 with Retry-After; the rest is a bug in the
 * service, logged (with `where`, the request's method and path) and answered without
 * details. Also the headers the answer carries.
 */
function explain(
  error: unknown,
  where: string,
): { error: ApiError; headers: Record<string, string> } {
  if (error instanceof ApiError) {
    // The rest of a stalled body is not worth waiting for.
    const close = error.code === "request_timeout";
    return { error, headers: close ? { Connection: "close" } : {} };
  }
  if (
    error instanceof LibsqlError && error.code.startsWith("SQLITE_CONSTRAINT")
  ) {
    return {
      error: new ApiError(
        "conflict",
        "The write conflicts with existing data; read and retry",
      ),
      headers: {},
    };
  }
  if (
    error instanceof LibsqlError && /^SQLITE_(BUSY|LOCKED)/.test(error.code)
  ) {
    return {
      error: new ApiError(
        "database_busy",
        "The database is busy; retry in a moment",
      ),
      headers: { "Retry-After": "1" },
    };
  }
  if (isUnavailable(error)) {
    return {
      error: new ApiError(
        "database_unavailable",
        "The database does not answer; retry in a moment",
      ),
      headers: { "Retry-After": "1" },
    };
  }
  console.error(`${where}:`, error);
  return {
    error: new ApiError(
      "internal_error",
      "The service failed to answer; this is a bug, not your fault",
    ),
    headers: {},
  };
}

/** The app's error handler: anything thrown, answered in the error shape. */
export const onError: ErrorHandler = (thrown, c) => {
  const { error, headers } = explain(thrown, `${c.req.method} ${c.req.path}`);
  for (const [name, value] of Object.entries(headers)) c.header(name, value);
  return errorResponse(c, error);
};

/**
 * The same answer as `onError`'s, made without the request's Context: for an answer
 * that comes after the middleware chain has ended (`later`, api.ts).
 */
export function errorAnswer(
  thrown: unknown,
  origin: string,
  where: string,
): Response {
  const { error, headers } = explain(thrown, where);
  return Response.json(errorBody(origin, error), {
    status: error.status,
    headers,
  });
}

/** 404 for a path the API does not have. */
export const notFound: NotFoundHandler = (c) =>
  errorResponse(
    c,
    new ApiError(
      "not_found",
      `There is no route ${c.req.method} ${c.req.path}; GET / lists the API`,
    ),
  );

// ---- the errors of the routes, each built in one place ----

/** Why a claim was refused: done, out of attempts, or held by another agent. */
export function notClaimable(message: Message): ApiError {
  if (message.status === "done") return alreadyCompleted(message);
  if (message.status === "dead") {
    return new ApiError(
      "attempts_exhausted",
      `Message ${message.id} used its ${message.max_attempts} attempts and is dead; it cannot be claimed again`,
      { attempts: message.attempts, max_attempts: message.max_attempts },
    );
  }
  return alreadyClaimed(message);
}

export function alreadyCompleted(message: Message): ApiError {
  return new ApiError(
    "already_completed",
    `Message ${message.id} was completed by "${message.done_by}" at ${message.done_at}`,
    { done_by: message.done_by, done_at: message.done_at },
  );
}

/** The 409 for a complete by an agent without a live claim on the message. */
export function notHolder(message: Message, agent: string): ApiError {
  return new ApiError(
    "not_holder",
    message.claimed_by === null
      ? `Agent "${agent}" does not hold message ${message.id}: nobody does (its lease may have run out); drop the work or claim it again`
      : `Agent "${agent}" does not hold message ${message.id}: "${message.claimed_by}" does; drop the work`,
    {
      claimed_by: message.claimed_by,
      claimed_at: message.claimed_at,
      lease_expires_at: message.lease_expires_at,
    },
  );
}

export function agentNotFound(roomId: string, id: string): ApiError {
  return new ApiError(
    "agent_not_found",
    `Agent "${id}" is not registered in room "${roomId}"`,
    {
      agent_id: id,
    },
  );
}

export function messageNotFound(roomId: string, id: number): ApiError {
  return new ApiError(
    "message_not_found",
    `Message ${id} does not exist in room "${roomId}"`,
    {
      message_id: id,
    },
  );
}

export function keyNotFound(roomId: string, scope: string, key: string) {
  return new ApiError(
    "key_not_found",
    `Key "${key}" does not exist in scope "${scope}" of room "${roomId}"`,
    { scope, key },
  );
}

export function replyNotFound(roomId: string, id: number): ApiError {
  return new ApiError(
    "invalid_request",
    `Invalid request body: reply_to ${id} is not a message of room "${roomId}"`,
    { field: "reply_to" },
  );
}

export function alreadyClaimed(message: Message): ApiError {
  return new ApiError(
    "already_claimed",
    `Message ${message.id} is claimed by "${message.claimed_by}"${
      message.lease_expires_at ? ` until ${message.lease_expires_at}` : ""
    }`,
    {
      claimed_by: message.claimed_by,
      claimed_at: message.claimed_at,
      lease_expires_at: message.lease_expires_at,
    },
  );
}

/** The 409 for a refused state write, with the whole current entry. */
export function refused(
  result: WriteResult & { ok: false },
  expected?: number,
): ApiError {
  if (result.reason === "not_a_number") {
    return new ApiError(
      "not_a_number",
      `Cannot increment: the current value of "${result.current?.key}" is not a number`,
      { current: result.current },
    );
  }
  if (result.reason === "out_of_range") {
    return new ApiError(
      "out_of_range",
      `Cannot increment: the sum would be too large for a JSON number; nothing was written`,
      { current: result.current },
    );
  }
  return new ApiError(
    "version_conflict",
    `Expected version ${expected} but the key is ${
      result.current ? `at version ${result.current.version}` : "absent"
    }; current holds the entry as it is`,
    { expected_version: expected, current: result.current },
  );
}

/** The error of a batch that was not applied: a missing reply, a race, or its conflicts. */
export function batchRefused(
  roomId: string,
  result: BatchResult & { ok: false },
): ApiError {
  if ("missing_reply_to" in result) {
    return replyNotFound(roomId, result.missing_reply_to);
  }
  if (result.conflicts.length === 0) {
    return new ApiError(
      "conflict",
      "The batch raced with other writes on every try; nothing was written, retry",
    );
  }
  const versions = result.conflicts.some((conflict) =>
    conflict.reason === "version_conflict"
  );
  const code = versions ? "version_conflict" : result.conflicts[0].reason;
  return new ApiError(
    code,
    `The batch was not applied: ${result.conflicts.length} of its state writes ${
      {
        version_conflict: "expected another version",
        not_a_number: "would add to a value that is not a number",
        out_of_range: "would make a number too large for JSON",
      }[code]
    }; nothing was written`,
    { conflicts: result.conflicts },
  );
}
