/**
 * The Idempotency-Key protocol of the writes that take one (POST messages, batch,
 * complete): the first answer is stored and given again for a repeat of the same
 * request by the same caller; the key on another request is refused.
 */
import type { Context, TypedResponse } from "hono";
import type { JSONParsed } from "hono/utils/types";
import type { Caller } from "./auth.ts";
import { sha256 } from "./auth.ts";
import {
  getIdempotent,
  type Idempotency,
  isKeyTaken,
  saveIdempotent,
} from "./db.ts";
import { type Db } from "./driver.ts";
import { ApiError } from "./errors.ts";
import { IdempotencyKey, parse } from "./schemas.ts";

/**
 * Runs a write once per Idempotency-Key of a caller: a repeat of the same request gets
 * the stored first answer (with `Idempotent-Replayed: true`) and writes nothing; the
 * key on another request (path or body) of the same caller is 422
 * `idempotency_key_reused`.
 */
export async function once<T extends object, S extends 200 | 201>(
  db: Db,
  c: Context,
  roomId: string,
  caller: Caller,
  write: (
    idempotency?: Idempotency,
  ) => Promise<{ status: S; body: T; stored?: boolean }>,
): Promise<Response & TypedResponse<JSONParsed<T>, S, "json">> {
  const header = c.req.header("idempotency-key");
  if (header === undefined) {
    const { status, body } = await write();
    return c.json(body, status);
  }
  const given = parse(IdempotencyKey, header, "Idempotency-Key header");
  // A key belongs to its caller: another agent using the same key makes its own
  // request, and learns nothing of the other's (callers without a proven agent
  // share a key by their kind).
  const who = caller.kind === "agent" ? `agent ${caller.id}` : caller.kind;
  const key = `${who}\n${given}`;
  const request = await sha256(
    `${c.req.method} ${c.req.path}\n${await c.req.text()}`,
  );
  const replay = async () => {
    // The first request may still be running: its answer is stored when it ends.
    for (let tries = 0; tries < 200; tries++) {
      const stored = await getIdempotent(db, roomId, key);
      if (stored !== null && stored.request !== request) {
        throw new ApiError(
          "idempotency_key_reused",
          `Idempotency-Key "${given}" was used for another request in this room; use a new key`,
        );
      }
      if (stored?.answer) {
        c.header("Idempotent-Replayed", "true");
        // The answer stored for this very request: the same shape.
        return c.json(stored.answer.response as T, stored.answer.status as S);
      }
      await new Promise((resolve) => setTimeout(resolve, 25));
    }
    throw new ApiError(
      "idempotency_key_in_use",
      `Idempotency-Key "${given}" belongs to a request that has not finished; retry later or use a new key`,
    );
  };
  if (await getIdempotent(db, roomId, key) !== null) return replay();
  let result;
  try {
    result = await write({ key, request });
  } catch (error) {
    if (isKeyTaken(error)) return replay();
    throw error;
  }
  // A write that stored its answer in its own transaction says so (messages); the
  // rest store it now, a moment after their commit (docs/DESIGN.md, "Choices").
  if (!result.stored) {
    await saveIdempotent(db, roomId, key, result.status, result.body);
  }
  return c.json(result.body, result.status);
}
