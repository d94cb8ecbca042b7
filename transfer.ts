/**
 * Export and import of a room (`GET /rooms/:id/export`, `POST /rooms/import`): one
 * NDJSON line per thing, `room` first, then `agent`, `message` (ascending), `state`
 * and `state_version` lines. Times are ISO 8601 as everywhere in the API; tokens and
 * their hashes are never written. An export streams page by page (constant memory,
 * each page at most `maxBytes`); an import is checked whole before anything is
 * written, then written in one transaction.
 */
import type { InValue } from "@libsql/core/api";
import { z } from "zod";
import {
  EXPORTED,
  type Exported,
  exportPage,
  type Imported,
  STATUSES,
} from "./db.ts";
import type { Db } from "./driver.ts";
import type { Row } from "./sqlite.ts";
import { ApiError } from "./errors.ts";
import {
  depth,
  Id,
  Json,
  Key,
  MAX_ATTEMPTS,
  MAX_JSON_DEPTH,
  Name,
  parse,
} from "./schemas.ts";

/** The export format's version, on the `room` line. */
export const FORMAT = 1;

/** The most rows one page of an export reads. */
const PAGE_ROWS = 500;

const iso = (ms: unknown) =>
  ms === null ? null : new Date(Number(ms)).toISOString();
const text = (value: unknown) => value === null ? null : String(value);
const int = (value: unknown) => value === null ? null : Number(value);
const json = (value: unknown) => JSON.parse(String(value));

/** One stored row of `table` as its export line (without the newline). */
function line(table: Exported, row: Row): string {
  switch (table) {
    case "agents":
      return JSON.stringify({
        type: "agent",
        id: String(row.id),
        name: String(row.name),
        role: String(row.role),
        joined_at: iso(row.joined_at),
        meta: json(row.meta),
        status: String(row.status),
        last_seen: iso(row.last_seen),
      });
    case "messages":
      return JSON.stringify({
        type: "message",
        id: Number(row.id),
        from_agent: text(row.from_agent),
        to_agent: text(row.to_agent),
        kind: String(row.kind),
        body: json(row.body),
        created_at: iso(row.created_at),
        reply_to: int(row.reply_to),
        claimed_by: text(row.claimed_by),
        claimed_at: iso(row.claimed_at),
        lease_expires_at: iso(row.lease_expires_at),
        attempts: Number(row.attempts),
        max_attempts: int(row.max_attempts),
        done_at: iso(row.done_at),
        done_by: text(row.done_by),
      });
    case "state":
      return JSON.stringify({
        type: "state",
        scope: String(row.scope),
        key: String(row.key),
        value: row.deleted ? null : json(row.value),
        version: Number(row.version),
        updated_at: iso(row.updated_at),
        expires_at: iso(row.expires_at),
        updated_by: text(row.updated_by),
        deleted: Boolean(row.deleted),
      });
    case "state_versions":
      return JSON.stringify({
        type: "state_version",
        scope: String(row.scope),
        key: String(row.key),
        version: Number(row.version),
        value: row.value === null ? null : json(row.value),
        deleted: row.value === null,
        updated_by: text(row.updated_by),
        updated_at: iso(row.updated_at),
        expires_at: iso(row.expires_at),
        after_message: Number(row.after_message),
      });
  }
}

/**
 * A room's export, as chunks of whole lines: the `room` line, then each table page by
 * page; a page ends early past `maxBytes` (always with one line) and the next page
 * goes on from its last line. Only one page is held at a time.
 */
export async function* exportRoom(
  db: Db,
  room: { id: string; created_at: string; meta: unknown; locked: boolean },
  maxBytes: number,
): AsyncGenerator<string> {
  yield JSON.stringify({ type: "room", format: FORMAT, ...room }) + "\n";
  const encoder = new TextEncoder();
  for (const table of EXPORTED) {
    let after: InValue[] | null = null;
    // Rows to read next: as many as the last page's lines suggest fit in
    // `maxBytes`, so big rows are not read (and held) many more times than written.
    let rows = 50;
    for (;;) {
      const page = await exportPage(db, room.id, table, after, rows);
      if (page.length === 0) break;
      let chunk = "";
      let bytes = 0;
      let written = 0;
      for (const { row, key } of page) {
        const next = line(table, row) + "\n";
        const size = encoder.encode(next).length;
        if (written > 0 && bytes + size > maxBytes) break;
        chunk += next;
        bytes += size;
        after = key;
        written++;
      }
      yield chunk;
      if (written === page.length && page.length < rows) break;
      rows = Math.max(
        1,
        Math.min(PAGE_ROWS, Math.floor(maxBytes * written / bytes)),
      );
    }
  }
}

// ---- import ----

const Instant = z.iso.datetime().transform((s) => Date.parse(s));
const MaybeInstant = Instant.nullable();
const Count = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);

const RoomLine = z.strictObject({
  type: z.literal("room"),
  format: z.literal(FORMAT),
  id: Id,
  created_at: Instant,
  meta: Json,
  locked: z.boolean(),
});
const AgentLine = z.strictObject({
  type: z.literal("agent"),
  id: Id,
  name: Name,
  role: Name,
  joined_at: Instant,
  meta: Json,
  status: z.enum(STATUSES),
  last_seen: Instant,
});
const MessageLine = z.strictObject({
  type: z.literal("message"),
  id: Count.min(1),
  from_agent: Id.nullable(),
  to_agent: Id.nullable(),
  kind: Id,
  body: Json,
  created_at: Instant,
  reply_to: Count.min(1).nullable(),
  claimed_by: Id.nullable(),
  claimed_at: MaybeInstant,
  lease_expires_at: MaybeInstant,
  attempts: Count,
  max_attempts: z.number().int().min(1).max(MAX_ATTEMPTS).nullable(),
  done_at: MaybeInstant,
  done_by: Id.nullable(),
});
const StateLine = z.strictObject({
  type: z.literal("state"),
  scope: Id,
  key: Key,
  value: Json,
  version: Count.min(1),
  updated_at: Instant,
  expires_at: MaybeInstant,
  updated_by: Id.nullable(),
  deleted: z.boolean(),
});
const VersionLine = z.strictObject({
  type: z.literal("state_version"),
  scope: Id,
  key: Key,
  version: Count.min(1),
  value: Json,
  deleted: z.boolean(),
  updated_by: Id.nullable(),
  updated_at: Instant,
  expires_at: MaybeInstant,
  after_message: Count,
});
const Line = z.discriminatedUnion("type", [
  AgentLine,
  MessageLine,
  StateLine,
  VersionLine,
]);

/** 400 `invalid_request` naming line `n` (1-based). */
function badLine(n: number, message: string, field?: string): ApiError {
  return new ApiError("invalid_request", `Line ${n}: ${message}`, {
    line: n,
    ...(field === undefined ? {} : { field }),
  });
}

/** Parses line `n` with `schema`, or throws the 400 that names it. */
function parseLine<T extends z.ZodType>(
  schema: T,
  value: unknown,
  n: number,
): z.output<T> {
  try {
    return parse(schema, value, "request body");
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    throw new ApiError(
      error.code,
      error.message.replace(/^Invalid request body/, `Line ${n}`),
      { ...error.details, line: n },
    );
  }
}

/**
 * Reads an export: checks every line (the first bad one is the 400), and answers the
 * room as `importRoom` writes it, under `id` with these token hashes.
 */
export function readExport(
  body: string,
  target: { id?: string; token_hash: string; view_token_hash: string },
): Imported & {
  counts: {
    agents: number;
    messages: number;
    state: number;
    state_versions: number;
  };
} {
  const lines = body.split("\n");
  if (lines.at(-1) === "") lines.pop();
  if (lines.length === 0) throw badLine(1, "the export is empty");
  const values = lines.map((text, i) => {
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch {
      throw badLine(i + 1, "not valid JSON");
    }
    if (depth(value) > MAX_JSON_DEPTH) {
      throw badLine(i + 1, `JSON nests deeper than ${MAX_JSON_DEPTH} levels`);
    }
    return value;
  });
  const room = parseLine(RoomLine, values[0], 1);
  const agents = new Map<string, z.output<typeof AgentLine>>();
  const messages: (z.output<typeof MessageLine> & { n: number })[] = [];
  const state = new Map<string, z.output<typeof StateLine>>();
  const versions = new Map<string, z.output<typeof VersionLine>>();
  values.slice(1).forEach((value, i) => {
    const n = i + 2;
    const item = parseLine(Line, value, n);
    switch (item.type) {
      case "agent":
        if (agents.has(item.id)) throw badLine(n, `agent "${item.id}" twice`);
        agents.set(item.id, item);
        break;
      case "message":
        if (messages.length > 0 && item.id <= messages.at(-1)!.id) {
          throw badLine(n, "messages must come in ascending id order", "id");
        }
        if (item.reply_to !== null && item.reply_to >= item.id) {
          throw badLine(n, "reply_to must be an earlier message", "reply_to");
        }
        messages.push({ ...item, n });
        break;
      case "state": {
        const id = `${item.scope}\n${item.key}`;
        if (state.has(id)) throw badLine(n, `key "${item.key}" twice`);
        state.set(id, item);
        break;
      }
      case "state_version": {
        const id = `${item.scope}\n${item.key}\n${item.version}`;
        if (versions.has(id)) {
          throw badLine(n, `version ${item.version} of "${item.key}" twice`);
        }
        versions.set(id, item);
        break;
      }
    }
  });
  // An export read while the room was written may hold versions written after its
  // entry was read (or of a key made after): they are left out, so every entry's
  // version is its newest, as the triggers that keep versions expect.
  const kept = [...versions.values()].filter((v) => {
    const entry = state.get(`${v.scope}\n${v.key}`);
    return entry !== undefined && v.version <= entry.version;
  });
  // Each old id's place in the import; a reply to a message not exported (dropped
  // by retention) is no reply.
  const index = new Map(messages.map((m, i) => [m.id, i]));
  const ids = messages.map((m) => m.id);
  /** The place of the newest exported message at or before `id` (-1: none). */
  const atOrBefore = (id: number) => {
    let low = 0, high = ids.length - 1, found = -1;
    while (low <= high) {
      const mid = (low + high) >> 1;
      if (ids[mid] <= id) found = mid, low = mid + 1;
      else high = mid - 1;
    }
    return found;
  };
  const store = (value: unknown) => JSON.stringify(value);
  return {
    room: {
      id: target.id ?? room.id,
      created_at: room.created_at,
      meta: store(room.meta),
      locked: room.locked,
      token_hash: target.token_hash,
      view_token_hash: target.view_token_hash,
    },
    agents: [...agents.values()].map((a) => [
      a.id,
      a.name,
      a.role,
      a.joined_at,
      store(a.meta),
      a.status,
      a.last_seen,
    ]),
    messages: messages.map((m) => ({
      reply_to: m.reply_to === null ? null : index.get(m.reply_to) ?? null,
      values: [
        m.from_agent,
        m.to_agent,
        m.kind,
        store(m.body),
        m.created_at,
        m.claimed_by,
        m.claimed_at,
        m.lease_expires_at,
        m.attempts,
        m.max_attempts,
        m.done_at,
        m.done_by,
      ],
    })),
    state: [...state.values()].map((e) => [
      e.scope,
      e.key,
      store(e.deleted ? null : e.value),
      e.version,
      e.updated_at,
      e.deleted ? e.updated_at : e.expires_at,
      e.updated_by,
      e.deleted ? 1 : 0,
    ]),
    versions: kept.map((v) => ({
      after_message: atOrBefore(v.after_message),
      values: [
        v.scope,
        v.key,
        v.version,
        v.deleted ? null : store(v.value),
        v.updated_by,
        v.updated_at,
        v.expires_at,
      ],
    })),
    counts: {
      agents: agents.size,
      messages: messages.length,
      state: state.size,
      state_versions: kept.length,
    },
  };
}
