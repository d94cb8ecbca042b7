/**
 * The database: one libSQL client, the schema applied once on cold start, and one
 * named function per query. All SQL of the service lives in this file.
 */
import {
  type InStatement,
  type InValue,
  LibsqlBatchError,
} from "@libsql/core/api";

import type { Db } from "./driver.ts";
import type { Driver, Row } from "./sqlite.ts";

/**
 * What a write changed, reported after it commits to whoever watches the database
 * (`Db.watch`; the notifier, waiting.ts): storage knows nothing of who listens.
 */
export type Change =
  | { type: "message"; message: Message }
  | { type: "claim"; message: Message }
  | { type: "state"; scope: string; key: string; entry: StateEntry | null }
  | { type: "agent"; agent: Agent }
  /** Who may read the room changed (deleted, a token rotated). */
  | { type: "access" };

/** One who watches a database: told each change, and when it closes. */
export type Watcher = {
  changed: (room: string, change: Change) => void;
  closed: () => void;
};

const watchers = new WeakMap<Db, Set<Watcher>>();

/** Tells `watcher` of every change of `db` from now on, and when it closes. */
export function watch(db: Db, watcher: Watcher): void {
  let set = watchers.get(db);
  if (set === undefined) watchers.set(db, set = new Set());
  set.add(watcher);
  db.onClose(() => watcher.closed());
}

/** Reports a change that has committed. */
function changed(db: Db, room: string, change: Change): void {
  for (const watcher of watchers.get(db) ?? []) watcher.changed(room, change);
}

export type Room = {
  id: string;
  created_at: string;
  meta: unknown;
  locked: boolean;
};

/** A room and the hashes of its tokens (null for a room made before tokens). */
export type RoomRecord = {
  room: Room;
  token_hash: string | null;
  view_token_hash: string | null;
  /** The highest message id retention dropped from the room (0: none). */
  dropped_through: number;
};

/** What an agent says it is doing; `waiting` is set by the server during a wait. */
export const STATUSES = ["active", "idle", "busy", "waiting", "done"] as const;
export type Status = typeof STATUSES[number];

export type Agent = {
  id: string;
  room_id: string;
  name: string;
  role: string;
  joined_at: string;
  meta: unknown;
  status: Status;
  last_seen: string;
  /** Milliseconds since `last_seen`, computed when read. */
  idle_ms: number;
};
/**
 * Where a message stands as a task: `open` (no live claim), `held` (claimed, the lease
 * has not run out), `done` (completed), `dead` (its last allowed attempt was released
 * or lapsed). Computed when read: a lease runs out without any write.
 */
export const TASK_STATUSES = ["open", "held", "done", "dead"] as const;
export type TaskStatus = typeof TASK_STATUSES[number];

export type Message = {
  id: number;
  room_id: string;
  from_agent: string | null;
  to_agent: string | null;
  kind: string;
  body: unknown;
  created_at: string;
  reply_to: number | null;
  claimed_by: string | null;
  claimed_at: string | null;
  lease_expires_at: string | null;
  status: TaskStatus;
  /** Claims so far (renewing a live claim is not another). */
  attempts: number;
  max_attempts: number | null;
  done_at: string | null;
  done_by: string | null;
};
export type StateEntry = {
  room_id: string;
  scope: string;
  key: string;
  value: unknown;
  version: number;
  updated_at: string;
  expires_at: string | null;
  /** The agent that wrote this version, when the writer was known. */
  updated_by: string | null;
};

/** Seconds to whole milliseconds, at least 1, so a tiny TTL or lease is not already over. */
function millis(seconds: number): number {
  return Math.max(1, Math.ceil(seconds * 1000));
}

// ---- mappers: one per table, explicit conversions ----

function iso(ms: Row[string]): string {
  return new Date(Number(ms)).toISOString();
}

function isoOrNull(ms: Row[string]): string | null {
  return ms === null ? null : iso(ms);
}

function textOrNull(value: Row[string]): string | null {
  return value === null ? null : String(value);
}

function json(text: Row[string]): unknown {
  return JSON.parse(String(text));
}

function toRoom(row: Row): Room {
  return {
    id: String(row.id),
    created_at: iso(row.created_at),
    meta: json(row.meta),
    locked: Boolean(row.locked),
  };
}

function toAgent(row: Row, now = Date.now()): Agent {
  return {
    id: String(row.id),
    room_id: String(row.room_id),
    name: String(row.name),
    role: String(row.role),
    joined_at: iso(row.joined_at),
    meta: json(row.meta),
    status: String(row.status) as Status,
    last_seen: iso(row.last_seen),
    idle_ms: Math.max(0, now - Number(row.last_seen)),
  };
}

/** A claim whose lease has run out reads as no claim. */
function toMessage(row: Row, now = Date.now()): Message {
  const lease = row.lease_expires_at === null
    ? null
    : Number(row.lease_expires_at);
  const held = row.claimed_by !== null && (lease === null || lease > now);
  const attempts = Number(row.attempts);
  const max = row.max_attempts === null ? null : Number(row.max_attempts);
  return {
    id: Number(row.id),
    room_id: String(row.room_id),
    from_agent: textOrNull(row.from_agent),
    to_agent: textOrNull(row.to_agent),
    kind: String(row.kind),
    body: json(row.body),
    created_at: iso(row.created_at),
    reply_to: row.reply_to === null ? null : Number(row.reply_to),
    claimed_by: held ? String(row.claimed_by) : null,
    claimed_at: held ? isoOrNull(row.claimed_at) : null,
    lease_expires_at: held ? isoOrNull(row.lease_expires_at) : null,
    status: row.done_at !== null
      ? "done"
      : held
      ? "held"
      : max !== null && attempts >= max
      ? "dead"
      : "open",
    attempts,
    max_attempts: max,
    done_at: isoOrNull(row.done_at),
    done_by: textOrNull(row.done_by),
  };
}

function toStateEntry(row: Row): StateEntry {
  return {
    room_id: String(row.room_id),
    scope: String(row.scope),
    key: String(row.key),
    value: json(row.value),
    version: Number(row.version),
    updated_at: iso(row.updated_at),
    expires_at: isoOrNull(row.expires_at),
    updated_by: textOrNull(row.updated_by),
  };
}

async function all(db: Db, stmt: InStatement): Promise<Row[]> {
  return (await (await db.client()).execute(stmt)).rows;
}

// ---- rooms ----

const ROOM_COLUMNS = "id, created_at, meta, locked";

/**
 * Creates a room with the hashes of its tokens, or returns the one with that id
 * (`created` says which; an existing room keeps its meta, lock and tokens).
 */
export async function createRoom(
  db: Db,
  room: {
    id: string;
    meta: unknown;
    locked: boolean;
    token_hash: string;
    view_token_hash: string;
  },
): Promise<{ room: Room; created: boolean }> {
  const [inserted] = await all(db, {
    sql:
      `INSERT INTO rooms (id, created_at, meta, locked, token_hash, view_token_hash)
          VALUES (?, ?, ?, ?, ?, ?)
          ON CONFLICT (id) DO NOTHING RETURNING ${ROOM_COLUMNS}`,
    args: [
      room.id,
      Date.now(),
      JSON.stringify(room.meta),
      room.locked ? 1 : 0,
      room.token_hash,
      room.view_token_hash,
    ],
  });
  if (inserted) return { room: toRoom(inserted), created: true };
  const existing = await getRoom(db, room.id);
  // Only a concurrent room deletion between the two statements gets here.
  if (!existing) return createRoom(db, room);
  return { room: existing, created: false };
}

/** One room with its token hashes, or null. */
export async function findRoom(db: Db, id: string): Promise<RoomRecord | null> {
  const [row] = await all(db, {
    sql: `SELECT ${ROOM_COLUMNS}, token_hash, view_token_hash, dropped_through
       FROM rooms WHERE id = ?`,
    args: [id],
  });
  if (!row) return null;
  return {
    room: toRoom(row),
    token_hash: textOrNull(row.token_hash),
    view_token_hash: textOrNull(row.view_token_hash),
    dropped_through: Number(row.dropped_through),
  };
}

/** One room, or null. */
export async function getRoom(db: Db, id: string): Promise<Room | null> {
  return (await findRoom(db, id))?.room ?? null;
}

/** Every room, oldest first; locked ones only when asked for. */
export async function listRooms(
  db: Db,
  withLocked: boolean,
  page: { limit: number; after?: string },
): Promise<Room[] | null> {
  const where = withLocked ? [] : ["locked = 0"];
  const args: InValue[] = [];
  if (page.after !== undefined) {
    // Creation order, ties in insertion order: the page goes on after that room
    // (one this caller may list: a locked room is no cursor, as it is no room).
    const [from] = await all(db, {
      sql: `SELECT created_at, rowid AS seq FROM rooms WHERE id = ?
            ${withLocked ? "" : "AND locked = 0"}`,
      args: [page.after],
    });
    if (!from) return null;
    where.push("(created_at, rowid) > (?, ?)");
    args.push(from.created_at, from.seq);
  }
  const rows = await all(db, {
    sql: `SELECT ${ROOM_COLUMNS} FROM rooms
          ${where.length > 0 ? `WHERE ${where.join(" AND ")}` : ""}
          ORDER BY created_at, rowid LIMIT ?`,
    args: [...args, page.limit],
  });
  return rows.map((row) => toRoom(row));
}

/** Deletes a room and everything in it, in one transaction; false if it was absent. */
export async function deleteRoom(db: Db, id: string): Promise<boolean> {
  const results = await (await db.client()).batch(
    [
      "DELETE FROM idempotency WHERE room_id = ?",
      "DELETE FROM state WHERE room_id = ?",
      "DELETE FROM state_versions WHERE room_id = ?",
      "DELETE FROM messages WHERE room_id = ?",
      "DELETE FROM agents WHERE room_id = ?",
      "DELETE FROM rooms WHERE id = ?",
    ].map((sql) => ({ sql, args: [id] })),
    "write",
  );
  changed(db, id, { type: "access" });
  return results.at(-1)!.rowsAffected > 0;
}

/** The change counter of each room named (rooms that do not exist are left out). */
export async function roomRevs(
  db: Db,
  ids: string[],
): Promise<Map<string, number>> {
  const revs = new Map<string, number>();
  // SQLite allows 32,766 parameters; stay far below it.
  for (let i = 0; i < ids.length; i += 500) {
    const chunk = ids.slice(i, i + 500);
    const rows = await all(db, {
      sql: `SELECT id, rev FROM rooms WHERE id IN (${
        chunk.map(() => "?").join(", ")
      })`,
      args: chunk,
    });
    for (const row of rows) revs.set(String(row.id), Number(row.rev));
  }
  return revs;
}

/** The change counter of one room (0 when it does not exist). */
export async function roomRev(db: Db, id: string): Promise<number> {
  return (await roomRevs(db, [id])).get(id) ?? 0;
}

// ---- agents ----

const AGENT_COLUMNS =
  "id, room_id, name, role, joined_at, meta, status, last_seen";

/** Registers an agent with the hash of its token; null when the id is taken in that room. */
export async function insertAgent(
  db: Db,
  agent: {
    id: string;
    room_id: string;
    name: string;
    role: string;
    meta: unknown;
    token_hash: string;
  },
): Promise<Agent | null> {
  const now = Date.now();
  const [row] = await all(db, {
    sql: `INSERT INTO agents
            (id, room_id, name, role, joined_at, meta, status, last_seen, token_hash)
          VALUES (?, ?, ?, ?, ?, ?, 'active', ?, ?)
          ON CONFLICT (room_id, id) DO NOTHING RETURNING ${AGENT_COLUMNS}`,
    args: [
      agent.id,
      agent.room_id,
      agent.name,
      agent.role,
      now,
      JSON.stringify(agent.meta),
      now,
      agent.token_hash,
    ],
  });
  if (!row) return null;
  const registered = toAgent(row, now);
  changed(db, agent.room_id, { type: "agent", agent: registered });
  return registered;
}

/**
 * Registers an existing agent again: new name, role and meta, and a new token hash
 * when one is given (else the token is kept); it counts as being seen.
 */
export async function updateAgent(
  db: Db,
  agent: {
    id: string;
    room_id: string;
    name: string;
    role: string;
    meta: unknown;
    token_hash?: string;
  },
): Promise<Agent | null> {
  const now = Date.now();
  const [row] = await all(db, {
    sql:
      `UPDATE agents SET name = ?, role = ?, meta = ?, last_seen = max(last_seen, ?),
            token_hash = coalesce(?, token_hash)
          WHERE room_id = ? AND id = ? RETURNING ${AGENT_COLUMNS}`,
    args: [
      agent.name,
      agent.role,
      JSON.stringify(agent.meta),
      now,
      agent.token_hash ?? null,
      agent.room_id,
      agent.id,
    ],
  });
  if (!row) return null;
  const updated = toAgent(row, now);
  changed(db, agent.room_id, { type: "agent", agent: updated });
  // A rotated token must stop working for waits and streams already open too.
  if (agent.token_hash !== undefined) {
    changed(db, agent.room_id, { type: "access" });
  }
  return updated;
}

/** The id of the agent of a room whose token has this hash, or null. */
export async function agentByToken(
  db: Db,
  roomId: string,
  tokenHash: string,
): Promise<string | null> {
  const [row] = await all(db, {
    sql: "SELECT id FROM agents WHERE token_hash = ? AND room_id = ?",
    args: [tokenHash, roomId],
  });
  return row ? String(row.id) : null;
}

/** One agent of a room, or null. */
export async function getAgent(
  db: Db,
  roomId: string,
  id: string,
): Promise<Agent | null> {
  const [row] = await all(db, {
    sql: `SELECT ${AGENT_COLUMNS} FROM agents WHERE room_id = ? AND id = ?`,
    args: [roomId, id],
  });
  return row ? toAgent(row) : null;
}

/** The agents of a room, in the order they joined. */
export async function listAgents(db: Db, roomId: string): Promise<Agent[]> {
  const rows = await all(db, {
    sql:
      `SELECT ${AGENT_COLUMNS} FROM agents WHERE room_id = ? ORDER BY joined_at, rowid`,
    args: [roomId],
  });
  const now = Date.now();
  return rows.map((row) => toAgent(row, now));
}

/** Marks an agent as seen now, with a new status if one is given; null if unknown. */
export async function touchAgent(
  db: Db,
  roomId: string,
  id: string,
  status?: Status,
): Promise<Agent | null> {
  const now = Date.now();
  const [row] = await all(db, {
    sql: `UPDATE agents SET last_seen = ?, status = coalesce(?, status)
          WHERE room_id = ? AND id = ? RETURNING ${AGENT_COLUMNS}`,
    args: [now, status ?? null, roomId, id],
  });
  if (!row) return null;
  const agent = toAgent(row, now);
  changed(db, roomId, { type: "agent", agent });
  return agent;
}

/** Puts back an agent's status after a wait, unless it sent another one meanwhile. */
export async function endWaiting(
  db: Db,
  roomId: string,
  id: string,
  status: Status,
): Promise<void> {
  const now = Date.now();
  const [row] = await all(db, {
    sql: `UPDATE agents SET status = ?, last_seen = max(last_seen, ?)
          WHERE room_id = ? AND id = ? AND status = 'waiting' RETURNING ${AGENT_COLUMNS}`,
    args: [status, now, roomId, id],
  });
  if (row) {
    changed(db, roomId, { type: "agent", agent: toAgent(row, now) });
  }
}

/** The earliest time (ms) a lease on a message above `after` runs out, if any is held. */
export async function nextLeaseExpiry(
  db: Db,
  roomId: string,
  after: number,
  now = Date.now(),
): Promise<number | undefined> {
  const [row] = await all(db, {
    sql: `SELECT min(lease_expires_at) AS at FROM messages
          WHERE room_id = ? AND id > ? AND lease_expires_at > ?`,
    args: [roomId, after, now],
  });
  return row?.at === null || row?.at === undefined ? undefined : Number(row.at);
}

// ---- messages ----

const MESSAGE_COLUMNS =
  "id, room_id, from_agent, to_agent, kind, body, created_at, " +
  "reply_to, claimed_by, claimed_at, lease_expires_at, " +
  "attempts, max_attempts, done_at, done_by";

/** A live claim, in SQL; its `?` is the time (ms) leases are judged at. */
const HELD =
  "(claimed_by IS NOT NULL AND (lease_expires_at IS NULL OR lease_expires_at > ?))";

/** A message's task status in SQL, as `toMessage` computes it; one `?`: the time. */
const STATUS_SQL = `(CASE WHEN done_at IS NOT NULL THEN 'done'
  WHEN ${HELD} THEN 'held'
  WHEN max_attempts IS NOT NULL AND attempts >= max_attempts THEN 'dead'
  ELSE 'open' END)`;

/** A message to append; `reply_to` must name a message of the same room. */
export type NewMessage = {
  from_agent: string | null;
  to_agent: string | null;
  kind: string;
  body: unknown;
  reply_to: number | null;
  /** Claims allowed before the message is dead (null: no limit). */
  max_attempts: number | null;
};

/** Inserts the message only if what it replies to exists in the room (else no row). */
function insertMessageStatement(
  roomId: string,
  m: NewMessage,
  now: number,
): InStatement {
  const body = JSON.stringify(m.body);
  return {
    sql:
      `INSERT INTO messages (room_id, from_agent, to_agent, kind, body, created_at, reply_to,
            max_attempts, head)
          SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9
          WHERE ?7 IS NULL OR EXISTS (SELECT 1 FROM messages WHERE id = ?7 AND room_id = ?1)
          RETURNING ${MESSAGE_COLUMNS}`,
    args: [
      roomId,
      m.from_agent,
      m.to_agent,
      m.kind,
      body,
      now,
      m.reply_to,
      m.max_attempts,
      messageHead(roomId, m, body, now),
    ],
  };
}

/**
 * The part of a message's JSON that never changes, as stored in `head`: its fields
 * from `room_id` to `reply_to`, in `toMessage`'s order, without braces. `body` is its
 * JSON text as stored.
 */
function messageHead(
  roomId: string,
  m: {
    from_agent: string | null;
    to_agent: string | null;
    kind: string;
    reply_to: number | null;
  },
  body: string,
  createdAt: number,
): string {
  return `"room_id":${JSON.stringify(roomId)},"from_agent":${
    JSON.stringify(m.from_agent)
  },"to_agent":${JSON.stringify(m.to_agent)},"kind":${
    JSON.stringify(m.kind)
  },"body":${body},"created_at":"${
    new Date(createdAt).toISOString()
  }","reply_to":${JSON.stringify(m.reply_to)}`;
}

/**
 * Appends a message; SQLite assigns the id. Null when `reply_to` names no message of
 * the room. With an idempotency key, the key is taken in the same transaction (see
 * `takeKeyStatements`).
 */
export async function insertMessage(
  db: Db,
  roomId: string,
  message: NewMessage,
  idempotency?: Idempotency,
): Promise<Message | null> {
  const now = Date.now();
  const insert = insertMessageStatement(roomId, message, now);
  const client = await db.client();
  let rows: Row[];
  if (idempotency === undefined) {
    rows = (await client.execute(insert)).rows;
  } else {
    // A reply to a missing message must not leave the key taken: the guard rolls back.
    // The answer is stored in the same transaction: a crash cannot leave the key
    // taken without it (stress_test.ts).
    const stmts = [
      ...takeKeyStatements(roomId, idempotency, now),
      insert,
      GUARD,
      {
        sql: `UPDATE idempotency SET status = 201, response = (
                SELECT ${MESSAGE_JSON} FROM messages WHERE id = last_insert_rowid()
              ) WHERE room_id = ? AND key = ?`,
        args: [...messageJsonArgs(now), roomId, idempotency.key],
      },
    ];
    try {
      rows = (await client.batch(stmts, "write"))[stmts.length - 3].rows;
    } catch (error) {
      if (
        error instanceof LibsqlBatchError &&
        error.statementIndex === stmts.length - 2
      ) return null;
      throw error;
    }
  }
  if (rows.length === 0) return null;
  const inserted = toMessage(rows[0], now);
  changed(db, roomId, { type: "message", message: inserted });
  return inserted;
}

/** One message of a room, or null. */
export async function getMessage(
  db: Db,
  roomId: string,
  id: number,
): Promise<Message | null> {
  const [row] = await all(db, {
    sql: `SELECT ${MESSAGE_COLUMNS} FROM messages WHERE room_id = ? AND id = ?`,
    args: [roomId, id],
  });
  return row ? toMessage(row) : null;
}

/** Which messages to read; every field narrows the list. */
export type MessageFilter = {
  after?: number;
  before?: number;
  limit: number;
  order: "asc" | "desc";
  kinds?: string[];
  from?: string;
  to?: string;
  /** Addressed to this agent or to nobody. */
  for?: string;
  /** This message and every reply below it. */
  thread?: number;
  /** Only messages in these task statuses. */
  statuses?: TaskStatus[];
  /**
   * The most bytes the page's JSON array may take: it ends early, always with at
   * least one message, and the cursor continues it.
   */
  maxBytes?: number;
};

/** The WHERE clause and arguments that select a filter's messages. */
function messageQuery(
  roomId: string,
  filter: MessageFilter,
  now: number,
  columns = MESSAGE_COLUMNS,
): { sql: string; args: InValue[] } {
  const where = ["room_id = ?"];
  const args: InValue[] = [roomId];
  if (filter.after !== undefined) where.push("id > ?"), args.push(filter.after);
  if (filter.before !== undefined) {
    where.push("id < ?"), args.push(filter.before);
  }
  if (filter.kinds !== undefined) {
    where.push(`kind IN (${filter.kinds.map(() => "?").join(", ")})`);
    args.push(...filter.kinds);
  }
  if (filter.from !== undefined) {
    where.push("from_agent = ?"), args.push(filter.from);
  }
  if (filter.to !== undefined) where.push("to_agent = ?"), args.push(filter.to);
  if (filter.for !== undefined) {
    where.push("(to_agent = ? OR to_agent IS NULL)");
    args.push(filter.for);
  }
  if (filter.thread !== undefined) {
    where.push(`id IN (WITH RECURSIVE t(id) AS (
        VALUES (?) UNION SELECT m.id FROM messages AS m JOIN t ON m.reply_to = t.id
      ) SELECT id FROM t)`);
    args.push(filter.thread);
  }
  if (filter.statuses?.length === 0) where.push("0");
  else if (filter.statuses !== undefined) {
    where.push(
      `${STATUS_SQL} IN (${filter.statuses.map(() => "?").join(", ")})`,
    );
    args.push(now, ...filter.statuses);
  }
  // `CAST(? AS INTEGER)`, not a bare `?`: SQLite read a page through a bare bound
  // LIMIT 2-3× slower (a literal, `+?` and the cast, all alike; docs/PERFORMANCE.md).
  return {
    sql: `SELECT ${columns} FROM messages WHERE ${where.join(" AND ")}
          ORDER BY id ${filter.order === "desc" ? "DESC" : "ASC"}
          LIMIT CAST(? AS INTEGER)`,
    args: [...args, filter.limit],
  };
}

/** Messages of a room matching the filter, by id in the order asked. */
export async function listMessages(
  db: Db,
  roomId: string,
  filter: MessageFilter,
): Promise<Message[]> {
  const now = Date.now();
  const rows = await all(db, messageQuery(roomId, filter, now));
  const messages = rows.map((row) => toMessage(row, now));
  if (filter.maxBytes === undefined) return messages;
  // As the SQL of `listMessagesJson` counts: each message's JSON and its comma.
  const encoder = new TextEncoder();
  let bytes = 1;
  const fits = messages.findIndex((message, i) => {
    bytes += encoder.encode(JSON.stringify(message)).length + 1;
    return i > 0 && bytes > filter.maxBytes!;
  });
  return fits === -1 ? messages : messages.slice(0, fits);
}

/** A page of messages as the JSON text of the array `listMessages` would answer. */
export type MessagePage = {
  count: number;
  json: string;
  /** The time the page was read at (ms): lapsed leases are judged against it. */
  now: number;
};

/** An ISO 8601 time, as `Date.toISOString` writes it, from integer ms in SQL. */
function isoSql(ms: string): string {
  return `strftime('%Y-%m-%dT%H:%M:%fZ', ${ms} / 1000.0, 'unixepoch')`;
}

/**
 * A message's `head` made from its columns (`messageHead` makes it at insert): for
 * rows written before it was stored, and for imports, whose replies get their ids
 * inside the import's transaction.
 */
const HEAD_SQL = `trim(json_object('room_id', room_id,
    'from_agent', from_agent, 'to_agent', to_agent, 'kind', kind,
    'body', json(body), 'created_at', ${isoSql("created_at")},
    'reply_to', reply_to), '{}')`;

/** A time (ms, or null) as a JSON value: an ISO 8601 string, or null. */
function isoJson(ms: string): string {
  return `CASE WHEN ${ms} IS NULL THEN 'null' ELSE '"' || ${
    isoSql(ms)
  } || '"' END`;
}

/** The task fields of a message as JSON (after `reply_to`); each `?` is the time. */
const TASK_JSON =
  `',"claimed_by":' || CASE WHEN ${HELD} THEN json_quote(claimed_by) ELSE 'null' END ||
    ',"claimed_at":' || CASE WHEN ${HELD} THEN ${
    isoJson("claimed_at")
  } ELSE 'null' END ||
    ',"lease_expires_at":' || CASE WHEN ${HELD} THEN ${
    isoJson("lease_expires_at")
  } ELSE 'null' END ||
    ',"status":"' || ${STATUS_SQL} || '","attempts":' || attempts ||
    ',"max_attempts":' || coalesce(max_attempts, 'null') ||
    ',"done_at":' || ${isoJson("done_at")} ||
    ',"done_by":' || json_quote(done_by) || '}'`;

/** The same for a message never claimed nor done, as most are: no time, no CASE. */
const UNTOUCHED_TASK_JSON =
  `',"claimed_by":null,"claimed_at":null,"lease_expires_at":null,"status":"open","attempts":0,"max_attempts":' ||
    coalesce(max_attempts, 'null') || ',"done_at":null,"done_by":null}'`;

/**
 * A message row as the JSON text `toMessage` makes of it (`JSON.stringify`), built
 * by SQLite: its stored `head` (what never changes, written at insert), then the
 * task fields as they are now. A second mapper for the messages table, kept because
 * pages built this way cost a fraction of rows mapped in JS (docs/PERFORMANCE.md);
 * db_test.ts holds the two equal. A row without `head` (written by an older
 * instance) has it made on the spot. Its `?`s are all the current time (ms),
 * `messageJsonArgs`: a lapsed lease reads as no claim. The task fields are made on
 * their own (parenthesized) and then appended to the head: SQLite copies the left
 * side of every `||`, and the head is the long part.
 */
const MESSAGE_JSON = `'{"id":' || id || ',' || coalesce(head, ${HEAD_SQL}) || (
    CASE WHEN claimed_by IS NULL AND attempts = 0 AND done_at IS NULL
      AND done_by IS NULL AND (max_attempts IS NULL OR max_attempts > 0)
    THEN ${UNTOUCHED_TASK_JSON}
    ELSE ${TASK_JSON} END)`;

const MESSAGE_JSON_TIMES = MESSAGE_JSON.split("?").length - 1;

/** The arguments of `MESSAGE_JSON`: the time, once per `?`. */
function messageJsonArgs(now: number): number[] {
  return Array(MESSAGE_JSON_TIMES).fill(now);
}

/**
 * `listMessages`, with the JSON built by SQLite: a page of 100 costs no object per
 * message or field on the way out (docs/PERFORMANCE.md). Same shape, byte for byte
 * (tested against `listMessages` in db_test.ts). Each message's JSON is made inside
 * the page's query, not over its rows: a row then reads only the columns the JSON
 * needs (not the body, when the head is stored), ~25% less time in SQLite.
 */
export async function listMessagesJson(
  db: Db,
  roomId: string,
  filter: MessageFilter,
): Promise<MessagePage> {
  const now = Date.now();
  const page = messageQuery(roomId, filter, now, `${MESSAGE_JSON} AS j, id`);
  const [row] = await all(db, {
    sql: `SELECT count(*) AS count,
            '[' || coalesce(group_concat(j, ','), '') || ']' AS json
          FROM (${page.sql})`,
    args: [...messageJsonArgs(now), ...page.args],
  });
  const json = String(row.json);
  // Three bytes a UTF-16 unit at most: a page this short is under the cap for sure.
  if (filter.maxBytes === undefined || json.length * 3 <= filter.maxBytes) {
    return { count: Number(row.count), json, now };
  }
  // Read again, cut where the bytes run out (each message's JSON and its comma).
  const [capped] = await all(db, {
    sql: `SELECT count(*) AS count,
            coalesce('[' || group_concat(j, ',') || ']', '[]') AS json
          FROM (
            SELECT j, row_number() OVER w AS n,
              sum(length(CAST(j AS BLOB)) + 1) OVER w AS bytes
            FROM (${page.sql})
            WINDOW w AS (ORDER BY id ${filter.order === "desc" ? "DESC" : "ASC"}
              ROWS UNBOUNDED PRECEDING)
          )
          WHERE n = 1 OR bytes + 1 <= ?`,
    args: [...messageJsonArgs(now), ...page.args, filter.maxBytes],
  });
  return { count: Number(capped.count), json: String(capped.json), now };
}

/**
 * The newest `limit` messages of a room (in `statuses`, when given), ascending, and how
 * many it holds in all (in those statuses).
 */
export async function recentMessages(
  db: Db,
  roomId: string,
  limit: number,
  statuses?: TaskStatus[],
  maxBytes?: number,
): Promise<{ items: Message[]; total: number }> {
  const now = Date.now();
  const [items, count] = await Promise.all([
    listMessages(db, roomId, { limit, order: "desc", statuses, maxBytes }),
    all(
      db,
      statuses === undefined
        ? {
          sql: "SELECT count(*) AS n FROM messages WHERE room_id = ?",
          args: [roomId],
        }
        : {
          sql: `SELECT count(*) AS n FROM messages WHERE room_id = ?
                AND ${STATUS_SQL} IN (${statuses.map(() => "?").join(", ")})`,
          args: [roomId, now, ...statuses],
        },
    ),
  ]);
  return { items: items.reverse(), total: Number(count[0].n) };
}

/** The agent renews the claim it holds (`:agent`, `:now`). */
const RENEWAL =
  "(claimed_by = :agent AND (lease_expires_at IS NULL OR lease_expires_at > :now))";

/** The outcome of a claim or a release; `message` is null when there is no such message. */
export type ClaimResult = { ok: boolean; message: Message | null };

/**
 * Claims a message for an agent, for `lease` seconds or until released. Succeeds when
 * it is free, its lease ran out, or the agent holds it already (which renews the lease);
 * never on a done message, nor on one whose attempts are used up. Each claim but a
 * renewal is one more attempt.
 */
export async function claimMessage(
  db: Db,
  roomId: string,
  id: number,
  agent: string,
  lease?: number,
): Promise<ClaimResult> {
  const now = Date.now();
  const [claimed] = await (await db.client()).batch([
    {
      sql: `UPDATE messages SET
            claimed_at = CASE WHEN claimed_by = :agent
              AND (lease_expires_at IS NULL OR lease_expires_at > :now)
              THEN claimed_at ELSE :now END,
            claimed_by = :agent,
            lease_expires_at = :expires,
            attempts = attempts + CASE WHEN ${RENEWAL} THEN 0 ELSE 1 END,
            claim_rev = (SELECT rev + 1 FROM rooms WHERE id = :room)
          WHERE room_id = :room AND id = :id AND done_at IS NULL
            AND (claimed_by IS NULL OR claimed_by = :agent OR lease_expires_at <= :now)
            AND (${RENEWAL} OR max_attempts IS NULL OR attempts < max_attempts)
          RETURNING ${MESSAGE_COLUMNS}`,
      args: {
        agent,
        now,
        expires: lease === undefined ? null : now + millis(lease),
        room: roomId,
        id,
      },
    },
    // Claiming counts as being seen (a renewal too, though it keeps claimed_at).
    {
      sql: `UPDATE agents SET last_seen = max(last_seen, :now)
            WHERE room_id = :room AND id = :agent AND changes() > 0`,
      args: { now, room: roomId, agent },
    },
  ], "write");
  const row = claimed.rows[0];
  return claimOutcome(db, roomId, id, row, now);
}

/** A claim or release statement's result: its row, or else the message as it is. */
async function claimOutcome(
  db: Db,
  roomId: string,
  id: number,
  row: Row | undefined,
  now: number,
): Promise<ClaimResult> {
  if (!row) return { ok: false, message: await getMessage(db, roomId, id) };
  const message = toMessage(row, now);
  changed(db, roomId, { type: "claim", message });
  return { ok: true, message };
}

/** Gives a claim back; only its holder can, while it holds it. */
export async function releaseMessage(
  db: Db,
  roomId: string,
  id: number,
  agent: string,
): Promise<ClaimResult> {
  const now = Date.now();
  const [row] = await all(db, {
    sql:
      `UPDATE messages SET claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL,
            claim_rev = (SELECT rev + 1 FROM rooms WHERE id = :room)
          WHERE room_id = :room AND id = :id AND ${RENEWAL}
          RETURNING ${MESSAGE_COLUMNS}`,
    args: { room: roomId, id, agent, now },
  });
  return claimOutcome(db, roomId, id, row, now);
}

/** A completed task and the reply it was completed with (null when none was given). */
export type CompleteResult = {
  ok: boolean;
  message: Message | null;
  result: Message | null;
};

/**
 * Completes a message for the agent that holds its claim: marks it done and, in the
 * same transaction, posts `result` (if any) as a reply from that agent. Fails, writing
 * nothing (not even the idempotency key), when the agent does not hold a live claim on
 * it or it is done already.
 */
export async function completeMessage(
  db: Db,
  roomId: string,
  id: number,
  agent: string,
  result?: { body: unknown; kind: string; to_agent: string | null },
  idempotency?: Idempotency,
): Promise<CompleteResult> {
  const now = Date.now();
  const taken = idempotency ? takeKeyStatements(roomId, idempotency, now) : [];
  const stmts: InStatement[] = [
    ...taken,
    {
      sql: `UPDATE messages SET done_at = :now, done_by = :agent,
              claimed_by = NULL, claimed_at = NULL, lease_expires_at = NULL,
              claim_rev = (SELECT rev + 1 FROM rooms WHERE id = :room)
            WHERE room_id = :room AND id = :id AND done_at IS NULL AND ${RENEWAL}
            RETURNING ${MESSAGE_COLUMNS}`,
      args: { room: roomId, id, agent, now },
    },
    // Not the holder, or done already: everything above rolls back.
    GUARD,
    ...(result === undefined ? [] : [insertMessageStatement(roomId, {
      from_agent: agent,
      to_agent: result.to_agent,
      kind: result.kind,
      body: result.body,
      reply_to: id,
      max_attempts: null,
    }, now)]),
    // Completing counts as being seen.
    {
      sql: `UPDATE agents SET last_seen = max(last_seen, :now)
            WHERE room_id = :room AND id = :agent`,
      args: { now, room: roomId, agent },
    },
  ];
  let answers;
  try {
    answers = await (await db.client()).batch(stmts, "write");
  } catch (error) {
    if (
      error instanceof LibsqlBatchError &&
      error.statementIndex === taken.length + 1
    ) {
      return {
        ok: false,
        message: await getMessage(db, roomId, id),
        result: null,
      };
    }
    throw error;
  }
  const message = toMessage(answers[taken.length].rows[0], now);
  const reply = result === undefined
    ? null
    : toMessage(answers[taken.length + 2].rows[0], now);
  if (reply) changed(db, roomId, { type: "message", message: reply });
  changed(db, roomId, { type: "claim", message });
  return { ok: true, message, result: reply };
}

/**
 * Claims changed since room rev `since` (released ones included), or with `since` 0
 * the claims held now; and the rev to ask from next time.
 */
export async function changedClaims(
  db: Db,
  roomId: string,
  since: number,
): Promise<{ messages: Message[]; rev: number }> {
  const now = Date.now();
  if (since > 0) {
    const rows = await all(db, {
      sql: `SELECT ${MESSAGE_COLUMNS}, claim_rev FROM messages
            WHERE room_id = ? AND claim_rev > ? ORDER BY claim_rev`,
      args: [roomId, since],
    });
    return {
      messages: rows.map((row) => toMessage(row, now)),
      rev: rows.reduce(
        (top, row) => Math.max(top, Number(row.claim_rev)),
        since,
      ),
    };
  }
  // The rev first: a claim made between the two reads is sent now and again later,
  // never missed.
  const [top] = await all(db, {
    sql:
      "SELECT max(claim_rev) AS rev FROM messages WHERE room_id = ? AND claim_rev IS NOT NULL",
    args: [roomId],
  });
  const rows = await all(db, {
    sql: `SELECT ${MESSAGE_COLUMNS} FROM messages
          WHERE room_id = ? AND claimed_by IS NOT NULL ORDER BY id`,
    args: [roomId],
  });
  return {
    messages: rows.map((row) => toMessage(row, now)).filter((m) =>
      m.claimed_by !== null
    ),
    rev: Number(top?.rev ?? 0),
  };
}

// ---- state ----

const STATE_COLUMNS =
  "room_id, scope, key, value, version, updated_at, expires_at, updated_by";

/**
 * A live entry: one whose TTL has not run out. A deleted key is a tombstone that
 * expired when it was deleted, so it is never live either.
 */
const LIVE = "(NOT deleted AND (expires_at IS NULL OR expires_at > :now))";
const EXPIRED =
  "(state.deleted OR (state.expires_at IS NOT NULL AND state.expires_at <= :now))";
const NUMERIC = "json_type(state.value) IN ('integer', 'real')";
/** The largest finite double: a sum beyond it is refused, not stored as infinity. */
const MAX_DOUBLE = "1.7976931348623157e308";

/**
 * The JSON text of a number computed in SQL: integers as they are, reals with 17
 * significant digits (json_quote keeps 15 and loses digits a JS number has).
 */
function numberText(x: string): string {
  return `CASE typeof(${x}) WHEN 'integer' THEN CAST(${x} AS TEXT) ELSE printf('%!.17g', ${x}) END`;
}

/** One key, or null (also when its TTL ran out). */
export async function getState(
  db: Db,
  roomId: string,
  scope: string,
  key: string,
): Promise<StateEntry | null> {
  const [row] = await all(db, {
    sql: `SELECT ${STATE_COLUMNS} FROM state
          WHERE room_id = :room AND scope = :scope AND key = :key AND ${LIVE}`,
    args: { room: roomId, scope, key, now: Date.now() },
  });
  return row ? toStateEntry(row) : null;
}

/** Every live key of a room, or of one scope, ordered by scope and key. */
export async function listState(
  db: Db,
  roomId: string,
  scope?: string,
): Promise<StateEntry[]> {
  const rows = await all(
    db,
    scope === undefined
      ? {
        sql:
          `SELECT ${STATE_COLUMNS} FROM state WHERE room_id = :room AND ${LIVE}
              ORDER BY scope, key`,
        args: { room: roomId, now: Date.now() },
      }
      : {
        sql: `SELECT ${STATE_COLUMNS} FROM state
              WHERE room_id = :room AND scope = :scope AND ${LIVE} ORDER BY key`,
        args: { room: roomId, scope, now: Date.now() },
      },
  );
  return rows.map(toStateEntry);
}

// ---- history ----

/** One version of a key (`GET /rooms/:id/state/history`). */
export type StateVersion = {
  version: number;
  value: unknown;
  deleted: boolean;
  updated_by: string | null;
  updated_at: string;
  expires_at: string | null;
  /** The newest message id of the room when this version was written (0: none). */
  after_message: number;
};

/**
 * The versions of one key after `after` (a version), oldest first. An entry whose TTL
 * ran out, not written since, ends with its expiry: a deleted version by no one.
 */
export async function stateHistory(
  db: Db,
  roomId: string,
  scope: string,
  key: string,
  page: { after: number; limit: number },
): Promise<StateVersion[]> {
  const args = { room: roomId, scope, key, after: page.after };
  const [rows, [expiry]] = await Promise.all([
    all(db, {
      sql:
        `SELECT version, value, updated_by, updated_at, expires_at, after_message
            FROM state_versions
            WHERE room_id = :room AND scope = :scope AND key = :key
              AND version > :after
            ORDER BY version LIMIT :limit`,
      args: { ...args, limit: page.limit },
    }),
    all(db, {
      sql: `SELECT version + 1 AS version, NULL AS value, NULL AS updated_by,
              expires_at AS updated_at, NULL AS expires_at,
              coalesce((SELECT max(id) FROM messages m WHERE m.room_id = state.room_id
                AND m.created_at <= state.expires_at), 0) AS after_message
            FROM state
            WHERE room_id = :room AND scope = :scope AND key = :key
              AND NOT deleted AND ${EXPIRED} AND version + 1 > :after`,
      args: { ...args, now: Date.now() },
    }),
  ]);
  if (expiry && rows.length < page.limit) rows.push(expiry);
  return rows.map((row) => ({
    version: Number(row.version),
    value: row.value === null ? null : json(row.value),
    deleted: row.value === null,
    updated_by: textOrNull(row.updated_by),
    updated_at: iso(row.updated_at),
    expires_at: isoOrNull(row.expires_at),
    after_message: Number(row.after_message),
  }));
}

/**
 * The live entries as they were right after message `at` of the room was posted (of
 * one scope, or one key): for each key its last version written before that message,
 * unless that version deleted it or its TTL had run out by then. Null when the room
 * has no such message.
 */
export async function stateAt(
  db: Db,
  roomId: string,
  at: number,
  where: { scope?: string; key?: string } = {},
): Promise<StateEntry[] | null> {
  const [posted] = await all(db, {
    sql: "SELECT created_at FROM messages WHERE room_id = ? AND id = ?",
    args: [roomId, at],
  });
  if (!posted) return null;
  const filters = [
    where.scope === undefined ? "" : "AND v.scope = :scope",
    where.key === undefined ? "" : "AND v.key = :key",
  ].join(" ");
  const rows = await all(db, {
    sql: `SELECT v.room_id, v.scope, v.key, v.value, v.version, v.updated_at,
            v.expires_at, v.updated_by
          FROM state_versions v
          WHERE v.room_id = :room AND v.after_message < :at ${filters}
            AND v.version = (SELECT max(w.version) FROM state_versions w
              WHERE w.room_id = v.room_id AND w.scope = v.scope AND w.key = v.key
                AND w.after_message < :at)
            AND v.value IS NOT NULL
            AND (v.expires_at IS NULL OR v.expires_at > :posted)
          ORDER BY v.scope, v.key`,
    args: {
      room: roomId,
      at,
      posted: Number(posted.created_at),
      ...(where.scope === undefined ? {} : { scope: where.scope }),
      ...(where.key === undefined ? {} : { key: where.key }),
    },
  });
  return rows.map(toStateEntry);
}

/**
 * One write to a key. Exactly one of `value` or `increment` for a write; `merge` applies
 * `value` as an RFC 7386 merge patch; `delete` removes the key. `if_version` makes it
 * conditional (0: only if absent); `ttl` (seconds) makes the entry expire.
 */
export type StateWrite = {
  scope: string;
  key: string;
  /** The agent writing, when known (`updated_by`). */
  by?: string | null;
  value?: unknown;
  increment?: number;
  merge?: boolean;
  delete?: boolean;
  if_version?: number;
  ttl?: number;
};

/**
 * Why a state write was refused: `if_version` did not match, an increment met a value
 * that is not a number, or its sum would not be a finite number.
 */
export type Refusal = "version_conflict" | "not_a_number" | "out_of_range";

/** The outcome of one state write: the entry, or why it was refused. */
export type WriteResult =
  | { ok: true; entry: StateEntry | null; deleted?: boolean }
  | {
    ok: false;
    reason: Refusal;
    current: StateEntry | null;
  };

/** The key a write names, as a join condition on `state`. */
const KEY_ROW =
  "state.room_id = :room AND state.scope = :scope AND state.key = :key";

/** The key's row is there and live (false, not NULL, when there is no row). */
const LIVE_ROW = `(state.version IS NOT NULL AND NOT ${EXPIRED})`;

/**
 * The rules of a state write, written once: an SQL expression over the key's row
 * (`state.*`, all NULL when the key has no row) that names the refusal, or is NULL
 * when the write may go ahead. A write tests it in its WHERE, a batch in its guards,
 * and a write that changed nothing asks it why. Null: the write cannot be refused.
 */
function rules(
  op: StateWrite,
): { sql: string; args: Record<string, InValue> } | null {
  const cases: string[] = [];
  const args: Record<string, InValue> = {};
  if (op.if_version !== undefined) {
    cases.push(
      `WHEN CASE WHEN ${LIVE_ROW} THEN state.version ELSE 0 END != :if_version
         THEN 'version_conflict'`,
    );
    args.if_version = op.if_version;
  }
  if (op.increment !== undefined) {
    // Not abs(): the exact sum -2^63 makes SQLite's abs() fail with an overflow.
    cases.push(
      `WHEN ${LIVE_ROW} AND NOT ${NUMERIC} THEN 'not_a_number'`,
      `WHEN ${LIVE_ROW} AND NOT (${SUM} BETWEEN -${MAX_DOUBLE} AND ${MAX_DOUBLE})
         THEN 'out_of_range'`,
    );
    args.value = operand(op);
  }
  if (cases.length === 0) return null;
  return { sql: `CASE ${cases.join(" ")} END`, args };
}

/** The sum of an increment over the key's row. */
const SUM = "(json_extract(state.value, '$') + :value)";

/** The `:value` of a write: the JSON text, or the increment as SQLite adds it. */
function operand(op: StateWrite): InValue {
  if (op.increment === undefined) return JSON.stringify(op.value);
  // A whole number goes in as an integer, so integer counters add exactly.
  return Number.isSafeInteger(op.increment)
    ? BigInt(op.increment)
    : op.increment;
}

/**
 * The single SQL statement of a write. It changes nothing when `rules` refuse it; a
 * put returns the entry written, a delete `live` when it deleted a live entry.
 */
function stateStatement(
  roomId: string,
  op: StateWrite,
  now: number,
): InStatement {
  const rule = rules(op);
  const args = {
    room: roomId,
    scope: op.scope,
    key: op.key,
    now,
    by: op.by ?? null,
    ...rule?.args,
  };
  const allowed = rule === null ? "1" : `(${rule.sql}) IS NULL`;
  if (op.delete) {
    // A tombstone: the next version, deleted, expired now (see schema.sql).
    return {
      sql: `UPDATE state SET version = version + 1, deleted = 1,
              updated_at = :now, expires_at = :now, updated_by = :by
            WHERE ${KEY_ROW} AND ${LIVE_ROW} AND ${allowed}
            RETURNING 1 AS live`,
      args,
    };
  }
  const [absent, fromCurrent] = op.increment !== undefined
    ? [numberText("(0 + :value)"), numberText(SUM)]
    : op.merge
    ? ["json_patch('{}', :value)", "json_patch(state.value, :value)"]
    : [":value", ":value"];
  // The key's row is read once, by the SELECT, and the rules judged there. A deleted
  // or expired entry is replaced as if absent; its versions go on (after an expiry by
  // two: the expiry is a version of its own, schema.sql).
  return {
    sql: `INSERT INTO state (room_id, scope, key, value, version, updated_at,
            expires_at, updated_by)
          SELECT :room, :scope, :key, ${absent}, 1, :now, :expires, :by
            FROM (SELECT 1) LEFT JOIN state ON ${KEY_ROW}
            WHERE ${allowed}
          ON CONFLICT (room_id, scope, key) DO UPDATE SET
            value = CASE WHEN ${EXPIRED} THEN excluded.value ELSE ${fromCurrent} END,
            version = state.version +
              CASE WHEN ${EXPIRED} AND NOT state.deleted THEN 2 ELSE 1 END,
            deleted = 0,
            updated_at = excluded.updated_at,
            expires_at = excluded.expires_at,
            updated_by = excluded.updated_by
          RETURNING ${STATE_COLUMNS}`,
    args: {
      ...args,
      value: operand(op),
      expires: op.ttl === undefined ? null : now + millis(op.ttl),
    },
  };
}

/** Why `rules` refuse a write now (`reason`, NULL if they do not), and the live entry. */
function whyStatement(
  roomId: string,
  op: StateWrite,
  now: number,
): { sql: string; args: Record<string, InValue> } {
  const rule = rules(op);
  return {
    sql: `SELECT ${rule?.sql ?? "NULL"} AS reason, ${LIVE_ROW} AS live,
            ${STATE_COLUMNS} FROM (SELECT 1) LEFT JOIN state ON ${KEY_ROW}`,
    args: { room: roomId, scope: op.scope, key: op.key, now, ...rule?.args },
  };
}

/** The live entry a `whyStatement` read, or null. */
function liveEntry(row: Row): StateEntry | null {
  return row.live ? toStateEntry(row) : null;
}

/** Publishes the event of a state write that succeeded. */
function publishState(
  db: Db,
  roomId: string,
  op: StateWrite,
  result: WriteResult,
): void {
  if (!result.ok || (op.delete && !result.deleted)) return;
  changed(db, roomId, {
    type: "state",
    scope: op.scope,
    key: op.key,
    entry: result.entry,
  });
}

/** Applies one write atomically (compare-and-set and arithmetic happen in SQL). */
export async function writeState(
  db: Db,
  roomId: string,
  op: StateWrite,
): Promise<WriteResult> {
  const now = Date.now();
  const client = await db.client();
  const [row] = (await client.execute(stateStatement(roomId, op, now))).rows;
  let result: WriteResult;
  if (row !== undefined) {
    result = op.delete
      ? { ok: true, entry: null, deleted: true }
      : { ok: true, entry: toStateEntry(row) };
  } else {
    const [why] = (await client.execute(whyStatement(roomId, op, now))).rows;
    const current = liveEntry(why);
    if (why.reason !== null) {
      result = { ok: false, reason: why.reason as Refusal, current };
    } else if (op.delete && !op.if_version) {
      // Nothing live to delete, and nothing asked of it.
      result = { ok: true, entry: null, deleted: false };
    } else {
      // Refused when written, allowed now: the entry changed in between.
      result = { ok: false, reason: "version_conflict", current };
    }
  }
  publishState(db, roomId, op, result);
  return result;
}

// ---- batches ----

/** A refused write of a batch, by its index in `state`. */
export type Conflict = {
  index: number;
  scope: string;
  key: string;
  reason: Refusal;
  expected_version: number | null;
  current: StateEntry | null;
};

/** A state write's result in a batch: the entry, or for a delete whether it was there. */
export type BatchStateResult = StateEntry | {
  room_id: string;
  scope: string;
  key: string;
  deleted: boolean;
};

export type BatchResult =
  | { ok: true; state: BatchStateResult[]; messages: Message[] }
  | { ok: false; conflicts: Conflict[] }
  | { ok: false; missing_reply_to: number };

/** Fails (NOT NULL) when the statement before it changed no row: see schema.sql. */
const GUARD = "INSERT INTO batch_guard (ok) SELECT NULL WHERE changes() = 0";

/** Fails (NOT NULL) when `rules` refuse the write (`whyStatement` names a reason). */
function ruleGuard(roomId: string, op: StateWrite, now: number): InStatement {
  const why = whyStatement(roomId, op, now);
  return {
    sql: `INSERT INTO batch_guard (ok) SELECT NULL FROM (${why.sql})
            WHERE reason IS NOT NULL`,
    args: why.args,
  };
}

/** How often a batch is tried again when a concurrent write beats it between read and write. */
const BATCH_ATTEMPTS = 5;

/**
 * Applies state writes and message appends all-or-nothing in one transaction, each
 * write guarded by its rules. When a guard refuses, nothing is written, and the
 * batch is played once more in a savepoint that is undone, to list every conflict.
 */
export async function applyBatch(
  db: Db,
  roomId: string,
  ops: StateWrite[],
  messages: NewMessage[],
  idempotency?: Idempotency,
): Promise<BatchResult> {
  const client = await db.client();
  for (let attempt = 1;; attempt++) {
    const now = Date.now();
    const stmts: InStatement[] = idempotency === undefined
      ? []
      : takeKeyStatements(roomId, idempotency, now);
    const opAt: number[] = [];
    const guards = new Set<number>();
    for (const op of ops) {
      if (rules(op) !== null) {
        guards.add(stmts.length);
        stmts.push(ruleGuard(roomId, op, now));
      }
      opAt.push(stmts.length);
      stmts.push(stateStatement(roomId, op, now));
    }
    const messageAt: number[] = [];
    for (const m of messages) {
      messageAt.push(stmts.length);
      stmts.push(insertMessageStatement(roomId, m, now));
      if (m.reply_to !== null) guards.add(stmts.length), stmts.push(GUARD);
    }
    let results;
    try {
      results = await client.batch(stmts, "write");
    } catch (error) {
      const index = error instanceof LibsqlBatchError
        ? error.statementIndex
        : -1;
      if (!guards.has(index)) throw error;
      const replies = [...new Set(messages.flatMap((m) => m.reply_to ?? []))];
      const existing = await existingMessageIds(db, roomId, replies);
      const missing = replies.find((id) => !existing.has(id));
      if (missing !== undefined) {
        return { ok: false, missing_reply_to: missing };
      }
      const conflicts = await conflictsOf(client, roomId, ops);
      if (conflicts.length > 0) return { ok: false, conflicts };
      // Beaten by a concurrent write; on the last attempt, a race with no conflict to name.
      if (attempt < BATCH_ATTEMPTS) continue;
      return { ok: false, conflicts: [] };
    }
    const state = ops.map((op, i): BatchStateResult => {
      const [row] = results[opAt[i]].rows;
      if (!op.delete) return toStateEntry(row);
      return {
        room_id: roomId,
        scope: op.scope,
        key: op.key,
        deleted: row !== undefined,
      };
    });
    const appended = messageAt.map((at) => toMessage(results[at].rows[0], now));
    ops.forEach((op, i) => {
      const entry = state[i];
      const deleted = "deleted" in entry;
      if (deleted && !entry.deleted) return;
      changed(db, roomId, {
        type: "state",
        scope: op.scope,
        key: op.key,
        entry: deleted ? null : entry,
      });
    });
    for (const message of appended) {
      changed(db, roomId, { type: "message", message });
    }
    return { ok: true, state, messages: appended };
  }
}

/**
 * Every write of a batch that its rules refuse, played in order (a refused write is
 * left out, as it would be) inside a savepoint that is then undone. A conflict's
 * `current` is the entry as it is in the database, before the batch.
 */
async function conflictsOf(
  client: Driver,
  roomId: string,
  ops: StateWrite[],
): Promise<Conflict[]> {
  const now = Date.now();
  const stmts: InStatement[] = ["SAVEPOINT dry_run"];
  for (const op of ops) {
    stmts.push(whyStatement(roomId, op, now), stateStatement(roomId, op, now));
  }
  stmts.push("ROLLBACK TO dry_run", "RELEASE dry_run");
  const results = await client.batch(stmts, "write");
  const before = new Map<string, StateEntry | null>();
  const conflicts: Conflict[] = [];
  ops.forEach((op, index) => {
    const [why] = results[1 + 2 * index].rows;
    const id = `${op.scope}\n${op.key}`;
    if (!before.has(id)) before.set(id, liveEntry(why));
    if (why.reason === null) return;
    conflicts.push({
      index,
      scope: op.scope,
      key: op.key,
      reason: why.reason as Refusal,
      expected_version: op.if_version ?? null,
      current: before.get(id)!,
    });
  });
  return conflicts;
}

/** Which of these message ids exist in the room. */
async function existingMessageIds(
  db: Db,
  roomId: string,
  ids: number[],
): Promise<Set<number>> {
  if (ids.length === 0) return new Set();
  const rows = await all(db, {
    sql: `SELECT id FROM messages WHERE room_id = ? AND id IN (${
      ids.map(() => "?").join(", ")
    })`,
    args: [roomId, ...ids],
  });
  return new Set(rows.map((row) => Number(row.id)));
}

// ---- idempotency ----

/** How long an Idempotency-Key is remembered (ms). */
export const IDEMPOTENCY_TTL_MS = 24 * 60 * 60 * 1000;

/** An Idempotency-Key and the hash of the request that carries it. */
export type Idempotency = { key: string; request: string };

/**
 * Statements that take an Idempotency-Key inside a write's transaction (and forget
 * keys past their time): a key taken already fails the transaction on the primary key.
 */
function takeKeyStatements(
  roomId: string,
  idem: Idempotency,
  now: number,
): InStatement[] {
  return [
    {
      sql: "DELETE FROM idempotency WHERE created_at < ?",
      args: [now - IDEMPOTENCY_TTL_MS],
    },
    {
      sql:
        "INSERT INTO idempotency (room_id, key, request, created_at) VALUES (?, ?, ?, ?)",
      args: [roomId, idem.key, idem.request, now],
    },
  ];
}

/**
 * True when an error is the failure of `takeKeyStatements` on a key in use (not the
 * room's foreign key: a room deleted meanwhile takes no key; fuzz_test.ts).
 */
export function isKeyTaken(error: unknown): boolean {
  return error instanceof LibsqlBatchError && error.statementIndex === 1 &&
    error.code.startsWith("SQLITE_CONSTRAINT") &&
    !/FOREIGN KEY/i.test(error.message);
}

/** Stores the answer given for a key. */
export async function saveIdempotent(
  db: Db,
  roomId: string,
  key: string,
  status: number,
  response: unknown,
): Promise<void> {
  await (await db.client()).execute({
    sql:
      "UPDATE idempotency SET status = ?, response = ? WHERE room_id = ? AND key = ?",
    args: [status, JSON.stringify(response), roomId, key],
  });
}

/**
 * What is stored for a key: the request it was taken for, and its answer (null while
 * the first request runs); null when the key is unknown.
 */
export async function getIdempotent(
  db: Db,
  roomId: string,
  key: string,
): Promise<
  | { request: string; answer: { status: number; response: unknown } | null }
  | null
> {
  const [row] = await all(db, {
    sql: `SELECT request, status, response FROM idempotency
          WHERE room_id = ? AND key = ? AND created_at >= ?`,
    args: [roomId, key, Date.now() - IDEMPOTENCY_TTL_MS],
  });
  if (!row) return null;
  return {
    request: String(row.request),
    answer: row.status === null
      ? null
      : { status: Number(row.status), response: json(row.response) },
  };
}

// ---- retention ----

/**
 * Drops the messages past what is kept: all but the newest `keep` of each room, and
 * those older than `before` (ms); each room remembers the highest id it dropped. One
 * transaction per rule. Answers how many messages were dropped.
 */
export async function dropMessages(
  db: Db,
  rule: { keep?: number; before?: number },
): Promise<number> {
  const doomed = rule.keep !== undefined
    ? `SELECT room_id, id FROM (
         SELECT room_id, id,
           row_number() OVER (PARTITION BY room_id ORDER BY id DESC) AS newer
         FROM messages)
       WHERE newer > ${Number(rule.keep)}`
    : `SELECT room_id, id FROM messages WHERE created_at < ${
      Number(rule.before)
    }`;
  const results = await (await db.client()).batch([
    `UPDATE rooms SET dropped_through = max(dropped_through, d.top)
     FROM (SELECT room_id, max(id) AS top FROM (${doomed}) GROUP BY room_id) AS d
     WHERE d.room_id = rooms.id`,
    `DELETE FROM messages WHERE id IN (SELECT id FROM (${doomed}))`,
    // History lives as long as the messages: a version that a newer one replaced
    // before the oldest kept message is no room's state at any kept message. The
    // next version is the one to ask (after_message only grows with the version),
    // one index step each; rooms that never dropped a message keep everything.
    `DELETE FROM state_versions
     WHERE room_id IN (SELECT id FROM rooms WHERE dropped_through > 0)
       AND (SELECT w.after_message FROM state_versions AS w
             WHERE w.room_id = state_versions.room_id
               AND w.scope = state_versions.scope AND w.key = state_versions.key
               AND w.version > state_versions.version
             ORDER BY w.version LIMIT 1)
         <= (SELECT dropped_through FROM rooms WHERE id = state_versions.room_id)`,
  ], "write");
  return Number(results[1].rowsAffected);
}

/**
 * The rooms with no activity (a message, a state write, an agent seen, or the room's
 * making) since `before` (ms): retention deletes them.
 */
export async function idleRooms(db: Db, before: number): Promise<string[]> {
  const rows = await all(db, {
    sql: `SELECT id FROM rooms WHERE created_at < :before
          AND NOT EXISTS (SELECT 1 FROM messages
            WHERE room_id = rooms.id AND created_at >= :before)
          AND NOT EXISTS (SELECT 1 FROM state
            WHERE room_id = rooms.id AND updated_at >= :before)
          AND NOT EXISTS (SELECT 1 FROM agents
            WHERE room_id = rooms.id AND last_seen >= :before)`,
    args: { before },
  });
  return rows.map((row) => String(row.id));
}

/** The oldest message id a room still holds (0: none). */
export async function earliestId(db: Db, roomId: string): Promise<number> {
  const [row] = await all(db, {
    sql: "SELECT min(id) AS id FROM messages WHERE room_id = ?",
    args: [roomId],
  });
  return Number(row?.id ?? 0);
}

// ---- export and import ----

/** The tables an export holds besides the room, in the order it writes them. */
export const EXPORTED = [
  "agents",
  "messages",
  "state",
  "state_versions",
] as const;
export type Exported = typeof EXPORTED[number];

/** Each exported table's columns, and the key its pages go by. */
const EXPORT_COLUMNS: Record<Exported, { key: string[]; columns: string }> = {
  agents: {
    key: ["rowid"],
    columns: "id, name, role, joined_at, meta, status, last_seen",
  },
  messages: {
    key: ["id"],
    columns:
      `from_agent, to_agent, kind, body, created_at, reply_to, claimed_by,
      claimed_at, lease_expires_at, attempts, max_attempts, done_at, done_by`,
  },
  state: {
    key: ["scope", "key"],
    columns: "value, version, updated_at, expires_at, updated_by, deleted",
  },
  state_versions: {
    key: ["scope", "key", "version"],
    columns: "value, updated_by, updated_at, expires_at, after_message",
  },
};

/**
 * One page of a room's rows of `table` as stored (times in ms, JSON as text), after
 * the row whose key is `after` (null: from the start); each with its key.
 */
export async function exportPage(
  db: Db,
  roomId: string,
  table: Exported,
  after: InValue[] | null,
  limit: number,
): Promise<{ row: Row; key: InValue[] }[]> {
  const { key, columns } = EXPORT_COLUMNS[table];
  const keys = key.join(", ");
  const rows = await all(db, {
    sql: `SELECT ${keys}, ${columns} FROM ${table} WHERE room_id = ?
          ${after ? `AND (${keys}) > (${key.map(() => "?").join(", ")})` : ""}
          ORDER BY ${keys} LIMIT ?`,
    args: [roomId, ...(after ?? []), limit],
  });
  return rows.map((row) => ({ row, key: key.map((k) => row[k] as InValue) }));
}

/** A room to import, as stored (times in ms, JSON as text); messages ascending. */
export type Imported = {
  room: {
    id: string;
    created_at: number;
    meta: string;
    locked: boolean;
    token_hash: string;
    view_token_hash: string;
  };
  agents: InValue[][];
  /** Without id: ids are given anew; `reply_to` is the index of an earlier message. */
  messages: {
    reply_to: number | null;
    values: InValue[];
  }[];
  state: InValue[][];
  /** `after_message`: the index of the newest message before it, or -1 (none). */
  versions: { after_message: number; values: InValue[] }[];
};

/**
 * Writes an imported room in one transaction, or nothing (false: the id is taken).
 * Message ids are given in order after the highest ever given, so each reply and
 * version points at its message by that offset.
 */
export async function importRoom(db: Db, data: Imported): Promise<boolean> {
  const { room } = data;
  const roomId = room.id;
  // The highest message id given so far, as the next statement sees it.
  const seq = `max(
    coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0),
    coalesce((SELECT max(id) FROM messages), 0))`;
  const total = data.messages.length;
  const stmts: InStatement[] = [
    {
      sql:
        `INSERT INTO rooms (id, created_at, meta, locked, token_hash, view_token_hash)
            VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING`,
      args: [
        roomId,
        room.created_at,
        room.meta,
        room.locked ? 1 : 0,
        room.token_hash,
        room.view_token_hash,
      ],
    },
    // A taken id writes nothing at all.
    GUARD,
    ...data.agents.map((values) => ({
      sql:
        `INSERT INTO agents (room_id, id, name, role, joined_at, meta, status,
              last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
      args: [roomId, ...values],
    })),
    // The k-th message gets the id after the highest so far; message j of this
    // import is then that id less k, plus j.
    ...data.messages.map(({ reply_to, values }, k) => ({
      sql:
        `INSERT INTO messages (id, room_id, reply_to, from_agent, to_agent, kind,
              body, created_at, claimed_by, claimed_at, lease_expires_at, attempts,
              max_attempts, done_at, done_by)
            VALUES (${seq} + 1, ?, ${
          reply_to === null ? "NULL" : `${seq} - ${k} + ${reply_to} + 1`
        }, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      args: [roomId, ...values],
    })),
    // Versions before entries: the entries' trigger then adds none of its own.
    ...data.versions.map(({ after_message, values }) => ({
      sql:
        `INSERT INTO state_versions (room_id, after_message, scope, key, version,
              value, updated_by, updated_at, expires_at)
            VALUES (?, ${
          after_message < 0 ? "0" : `${seq} - ${total} + ${after_message} + 1`
        }, ?, ?, ?, ?, ?, ?, ?)`,
      args: [roomId, ...values],
    })),
    ...data.state.map((values) => ({
      sql: `INSERT INTO state (room_id, scope, key, value, version, updated_at,
              expires_at, updated_by, deleted) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      args: [roomId, ...values],
    })),
    {
      sql: `UPDATE messages SET head = ${HEAD_SQL} WHERE room_id = ?`,
      args: [roomId],
    },
  ];
  try {
    await (await db.client()).batch(stmts, "write");
  } catch (error) {
    if (error instanceof LibsqlBatchError && error.statementIndex === 1) {
      return false;
    }
    throw error;
  }
  changed(db, roomId, { type: "access" });
  return true;
}
