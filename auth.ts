/**
 * Identity and access: tokens, who a request acts as, and what it may do.
 *
 * - `room_…` (room admin) and `view_…` (read-only) come back once from `POST /rooms`;
 *   `as_…` (one agent) once from registering the agent. 256 random bits each, stored
 *   only as SHA-256 hashes, sent as `Authorization: Bearer <token>`.
 * - Open rooms (the default): anyone may read and write, but a request
 *   with an agent token acts as that agent only. Locked rooms: reads need a token of
 *   the room, writes an agent or room token, joining the room token, and an agent
 *   writes only its own scope and `_shared`. A view token never writes.
 * - `SYNC_ADMIN_TOKEN` (if set) acts as the admin of every room and lists locked rooms.
 */
import type { Context } from "hono";
import { createMiddleware } from "hono/factory";
import {
  type Agent,
  agentByToken,
  findRoom,
  getAgent,
  insertAgent,
  type Room,
  type RoomRecord,
  updateAgent,
} from "./db.ts";
import { type Db } from "./driver.ts";
import { agentNotFound, ApiError, roomNotFound } from "./errors.ts";
import { Id, parse, type RegisterAgent } from "./schemas.ts";

const SYNC_ADMIN_TOKEN = Deno.env.get("SYNC_ADMIN_TOKEN") || undefined;
// It opens every room; one short enough to guess would open them to anyone.
if (SYNC_ADMIN_TOKEN !== undefined && SYNC_ADMIN_TOKEN.length < 32) {
  throw new Error("SYNC_ADMIN_TOKEN must be at least 32 characters");
}

/** Who a request acts as. */
export type Caller =
  | { kind: "anonymous" }
  | { kind: "view" }
  | { kind: "agent"; id: string }
  | { kind: "room" }
  | { kind: "admin" };

export type TokenKind = "room" | "view" | "as";

/** A new token: its kind as a prefix, then 256 random bits in base64url. */
export function newToken(kind: TokenKind): string {
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  const base64 = btoa(String.fromCharCode(...bytes));
  return `${kind}_${
    base64.replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "")
  }`;
}

/** The hex SHA-256 of a text. */
export async function sha256(text: string): Promise<string> {
  const digest = await crypto.subtle.digest(
    "SHA-256",
    new TextEncoder().encode(text),
  );
  return Array.from(
    new Uint8Array(digest),
    (b) => b.toString(16).padStart(2, "0"),
  ).join("");
}

/** The hash of a token: all the database ever holds of it. */
export function hashToken(token: string): Promise<string> {
  return sha256(token);
}

/** Compares two strings in time that does not depend on where they differ. */
function same(a: string, b: string): boolean {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return diff === 0;
}

/** The token of an `Authorization: Bearer <token>` header; undefined for any other. */
export function bearerToken(header: string | undefined): string | undefined {
  return header?.match(/^Bearer\s+(\S+)\s*$/i)?.[1];
}

/** The bearer token of a request, if it sends one; a malformed header is 401. */
export function bearer(header: string | undefined): string | undefined {
  if (header === undefined) return undefined;
  const token = bearerToken(header);
  if (token === undefined) {
    throw new ApiError(
      "invalid_token",
      'The Authorization header must be "Bearer <token>"',
    );
  }
  return token;
}

/** Whether a token is the server admin token (compared as hashes: no length leaks). */
export async function isAdmin(
  token: string | undefined,
  admin = SYNC_ADMIN_TOKEN,
): Promise<boolean> {
  if (token === undefined || admin === undefined) return false;
  return same(await hashToken(token), await hashToken(admin));
}

/**
 * Who a request with `token` acts as in this room. A token that is not one of this
 * room's (unknown, or another room's) is 401 `invalid_token`.
 */
export async function identify(
  db: Db,
  record: RoomRecord,
  token: string | undefined,
  admin = SYNC_ADMIN_TOKEN,
): Promise<Caller> {
  if (token === undefined) return { kind: "anonymous" };
  if (await isAdmin(token, admin)) return { kind: "admin" };
  const hash = await hashToken(token);
  if (
    token.startsWith("room_") && record.token_hash &&
    same(hash, record.token_hash)
  ) {
    return { kind: "room" };
  }
  if (
    token.startsWith("view_") && record.view_token_hash &&
    same(hash, record.view_token_hash)
  ) {
    return { kind: "view" };
  }
  if (token.startsWith("as_")) {
    const id = await agentByToken(db, record.room.id, hash);
    if (id !== null) return { kind: "agent", id };
  }
  throw new ApiError(
    "invalid_token",
    `The token is not one of room "${record.room.id}"; use a token the room or its agent registration gave`,
  );
}

/** Reads: anyone in an open room; a token of the room in a locked one. */
export function mayRead(room: Room, caller: Caller): void {
  if (room.locked && caller.kind === "anonymous") {
    throw new ApiError(
      "token_required",
      `Room "${room.id}" is locked: send a room, agent or view token as "Authorization: Bearer <token>"`,
    );
  }
}

/** Writes: never with a view token; with an agent or room token in a locked room. */
export function mayWrite(room: Room, caller: Caller): void {
  if (caller.kind === "view") {
    throw new ApiError(
      "read_only",
      "A view token reads only; write with an agent or room token",
    );
  }
  if (room.locked && caller.kind === "anonymous") {
    throw new ApiError(
      "token_required",
      `Room "${room.id}" is locked: writing needs an agent or room token`,
    );
  }
}

/** Room administration (deleting the room, joining a locked room): the room token. */
export function mayAdminister(room: Room, caller: Caller, what: string): void {
  if (caller.kind === "room" || caller.kind === "admin") return;
  if (caller.kind === "anonymous") {
    throw new ApiError(
      "token_required",
      `${what} needs the room token of "${room.id}"`,
    );
  }
  throw new ApiError(
    "forbidden",
    `${what} needs the room token of "${room.id}"`,
  );
}

/**
 * The agent a request acts as, for a field that names one (`from`, `agent`): with an
 * agent token the field defaults to that agent and may not name another; without one
 * (or with the room token) it is what the request says.
 */
export function actingAs<T extends string | null | undefined>(
  caller: Caller,
  named: T,
  field: string,
): T | string {
  if (caller.kind !== "agent") return named;
  if (named === undefined || named === null) return caller.id;
  if (named !== caller.id) {
    throw new ApiError(
      "identity_mismatch",
      `This token is agent "${caller.id}"'s; "${field}" cannot name "${named}"`,
      { field, agent: caller.id },
    );
  }
  return named;
}

/** In a locked room, an agent writes only its own scope and `_shared`. */
export function mayWriteScope(room: Room, caller: Caller, scope: string): void {
  if (!room.locked || caller.kind !== "agent") return;
  if (scope === "_shared" || scope === caller.id) return;
  throw new ApiError(
    "identity_mismatch",
    `Agent "${caller.id}" writes only its own scope and "_shared" in a locked room, not "${scope}"`,
    { field: "scope", agent: caller.id },
  );
}

/** What a room route knows once `inRoom` has let its request in. */
export type RoomEnv = {
  Variables: {
    room: Room;
    caller: Caller;
    /** The highest message id retention dropped from the room (0: none). */
    dropped: number;
  };
};

/**
 * The room routes' access: `admit` finds the room and who a request with this
 * Authorization header acts as in it, once it may read the room (else 404, 401 or
 * 403); `inRoom` does that for the room in the path and sets `c.var`; `writer`, after
 * it, checks that the caller may write; `readable` makes the check that a held
 * request runs again (the room deleted, a token rotated). A token that proves itself
 * is told to `trust` (the rate limit counts it as itself from then on, not as its
 * address).
 */
export function roomAccess(
  db: Db,
  adminToken: string | undefined,
  trust?: (token: string) => Promise<void>,
) {
  async function admit(id: string, authorization: string | undefined) {
    const found = await findRoom(db, id);
    if (!found) throw roomNotFound(id);
    const token = bearer(authorization);
    const caller = await identify(db, found, token, adminToken);
    mayRead(found.room, caller);
    if (token !== undefined) await trust?.(token);
    return { room: found.room, caller, dropped: found.dropped_through };
  }
  const pathRoom = (c: Context) =>
    admit(
      parse(Id, c.req.param("id"), "room id"),
      c.req.header("authorization"),
    );
  return {
    admit,
    inRoom: createMiddleware<RoomEnv>(async (c, next) => {
      const { room, caller, dropped } = await pathRoom(c);
      c.set("room", room);
      c.set("caller", caller);
      c.set("dropped", dropped);
      // Handed on, not awaited: a held request keeps no frame of this one.
      return next();
    }),
    /** The check of `c`'s access, to run again later (made now: it holds no `c`). */
    readable: (c: Context) => {
      const id = parse(Id, c.req.param("id"), "room id");
      const authorization = c.req.header("authorization");
      return async () => void await admit(id, authorization);
    },
    writer: createMiddleware<RoomEnv>((c, next) => {
      mayWrite(c.var.room, c.var.caller);
      return next();
    }),
  };
}

/**
 * Registers an agent in a room, issuing its token (201), or registers it again (200):
 * joining a locked room takes the room token, an agent registering itself again (with
 * its own token) is not joining; registering an id that is taken needs the agent's own
 * token or the room's (else 409 `agent_exists`), and keeps the token unless
 * `rotate_token` asks for a new one.
 */
export async function registerAgent(
  db: Db,
  room: Room,
  caller: Caller,
  input: RegisterAgent,
): Promise<{ status: 200 | 201; agent: Agent & { token?: string } }> {
  const id = input.id ?? crypto.randomUUID();
  const itself = caller.kind === "agent" && caller.id === id;
  if (room.locked && !itself) {
    mayAdminister(room, caller, "Joining a locked room");
  }
  const fields = {
    id,
    room_id: room.id,
    name: input.name,
    role: input.role ?? "agent",
    meta: input.meta === undefined ? {} : input.meta,
  };
  const token = newToken("as");
  const agent = await insertAgent(db, {
    ...fields,
    token_hash: await hashToken(token),
  });
  if (agent) return { status: 201, agent: { ...agent, token } };
  if (!itself && caller.kind !== "room" && caller.kind !== "admin") {
    throw new ApiError(
      "agent_exists",
      `Agent "${id}" is already registered in room "${room.id}"; use it as it is, register another id, or send its token to register it again`,
      { agent: await getAgent(db, room.id, id) },
    );
  }
  const rotated = input.rotate_token ? newToken("as") : undefined;
  const updated = await updateAgent(db, {
    ...fields,
    token_hash: rotated === undefined ? undefined : await hashToken(rotated),
  });
  if (!updated) throw agentNotFound(room.id, id);
  return {
    status: 200,
    agent: rotated === undefined ? updated : { ...updated, token: rotated },
  };
}
