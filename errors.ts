/**
 * The one error shape of the API, `{error, message, ...details}`, made here and only
 * here: handlers throw an `ApiError`, `onError` and `notFound` turn everything into JSON.
 */
import { LibsqlError } from "@libsql/client";
import type { Context, ErrorHandler, NotFoundHandler } from "hono";
import type { ContentfulStatusCode } from "hono/utils/http-status";

/** Every error code the API answers with; the README lists them with their meaning. */
export type ErrorCode =
  | "invalid_json"
  | "invalid_request"
  | "not_found"
  | "room_not_found"
  | "key_not_found"
  | "agent_not_found"
  | "message_not_found"
  | "agent_exists"
  | "already_claimed"
  | "version_conflict"
  | "not_a_number"
  | "out_of_range"
  | "idempotency_key_in_use"
  | "conflict"
  | "payload_too_large"
  | "database_busy"
  | "database_unavailable"
  | "shutting_down"
  | "internal_error";

/** An error a handler means to answer with: status, stable code, one sentence. */
export class ApiError extends Error {
  readonly status: ContentfulStatusCode;
  readonly code: ErrorCode;
  readonly details: Record<string, unknown>;

  constructor(
    status: ContentfulStatusCode,
    code: ErrorCode,
    message: string,
    details: Record<string, unknown> = {},
  ) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }
}

/** The JSON response for an error. */
export function errorResponse(c: Context, error: ApiError): Response {
  return c.json(
    { error: error.code, message: error.message, ...error.details },
    error.status,
  );
}

/** 404 `room_not_found` for a room id. */
export function roomNotFound(id: string): ApiError {
  return new ApiError(404, "room_not_found", `Room "${id}" does not exist`, {
    room_id: id,
  });
}

/**
 * Turns anything thrown into the error shape. Constraint failures are 409 (a client
 * raced another); a busy database is 503 with Retry-After; the rest is a bug in the
 * service, logged and answered without details.
 */
export const onError: ErrorHandler = (error, c) => {
  if (error instanceof ApiError) return errorResponse(c, error);
  if (
    error instanceof LibsqlError && error.code.startsWith("SQLITE_CONSTRAINT")
  ) {
    return errorResponse(
      c,
      new ApiError(
        409,
        "conflict",
        "The write conflicts with existing data; read and retry",
      ),
    );
  }
  if (
    error instanceof LibsqlError && /^SQLITE_(BUSY|LOCKED)/.test(error.code)
  ) {
    c.header("Retry-After", "1");
    return errorResponse(
      c,
      new ApiError(
        503,
        "database_busy",
        "The database is busy; retry in a moment",
      ),
    );
  }
  console.error(`${c.req.method} ${c.req.path}:`, error);
  return errorResponse(
    c,
    new ApiError(
      500,
      "internal_error",
      "The service failed to answer; this is a bug, not your fault",
    ),
  );
};

/** 404 for a path the API does not have. */
export const notFound: NotFoundHandler = (c) =>
  errorResponse(
    c,
    new ApiError(
      404,
      "not_found",
      `There is no route ${c.req.method} ${c.req.path}; GET / lists the API`,
    ),
  );
