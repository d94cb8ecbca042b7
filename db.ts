/**
 * The database: one libSQL client, the schema applied once on cold start, and one
 * named function per query. All SQL of the service lives in this file.
 */
import {
  type Client,
  createClient,
  type InStatement,
  type Row,
} from "@libsql/client";

/** How to reach the database; `url` is `file:…`, `:memory:`, `libsql://…` or `https://…`. */
export type DbOptions = {
  url: string;
  authToken?: string;
  /** Schema changes after version 1, in order: entry i brings version i+1 to i+2. */
  migrations?: string[][];
};

export type Room = { id: string; created_at: string; meta: unknown };
export type Agent = {
  id: string;
  room_id: string;
  name: string;
  role: string;
  joined_at: string;
  meta: unknown;
};
export type Message = {
  id: number;
  room_id: string;
  from_agent: string | null;
  to_agent: string | null;
  kind: string;
  body: unknown;
  created_at: string;
};
export type StateEntry = {
  room_id: string;
  scope: string;
  key: string;
  value: unknown;
  version: number;
  updated_at: string;
};

/**
 * Schema changes after version 1 (`schema.sql`), oldest first: entry i takes a database
 * from version i+1 to i+2. A new database runs `schema.sql` and then every entry, so
 * `schema.sql` itself never changes shape.
 */
export const MIGRATIONS: string[][] = [];

/** Busy timeout for local files: a writer waits this long for another one (ms). */
const BUSY_TIMEOUT_MS = 5000;

/**
 * A lazily opened database: nothing touches the file or the network until the first
 * query, so importing `main.ts` (tests, `deno check`) has no side effects.
 */
export class Db {
  readonly options: DbOptions;
  #ready?: Promise<Client>;
  #client?: Client;

  constructor(options: DbOptions) {
    this.options = options;
  }

  /** The client, once the schema has been applied; every query awaits this. */
  client(): Promise<Client> {
    this.#ready ??= this.#open().catch((error) => {
      // A failed open (remote server down) is retried by the next query.
      this.#ready = undefined;
      throw error;
    });
    return this.#ready;
  }

  /** Closes the client; later queries open it again. */
  close(): void {
    this.#client?.close();
    this.#client = undefined;
    this.#ready = undefined;
  }

  async #open(): Promise<Client> {
    const local = isLocal(this.options.url);
    const client = createClient({
      url: this.options.url,
      authToken: this.options.authToken,
      // One connection for an embedded file: the driver is synchronous, so more
      // connections add no parallelism, and per-connection PRAGMAs (synchronous,
      // foreign_keys) hold only on the connection that ran them.
      concurrency: local ? 1 : undefined,
      timeout: local ? BUSY_TIMEOUT_MS : undefined,
    });
    this.#client = client;
    try {
      if (local && this.options.url !== ":memory:") {
        // WAL lets readers run beside the writer; NORMAL loses nothing on a process
        // crash (README, "Durability"); the size limit truncates the WAL after each
        // checkpoint so it stays small under sustained writes.
        await client.execute("PRAGMA journal_mode = WAL");
        await client.execute("PRAGMA synchronous = NORMAL");
        await client.execute("PRAGMA journal_size_limit = 67108864");
      }
      if (local) await client.execute("PRAGMA foreign_keys = ON");
      await migrate(client, this.options.migrations ?? MIGRATIONS);
    } catch (error) {
      client.close();
      this.#client = undefined;
      throw error;
    }
    return client;
  }
}

function isLocal(url: string): boolean {
  return url === ":memory:" || url.startsWith("file:");
}

const SCHEMA_URL = new URL("./schema.sql", import.meta.url);

/** Splits `schema.sql` into statements (it has no triggers, so `;` ends each one). */
function statements(sql: string): string[] {
  return sql
    .split("\n")
    .filter((line) => !line.trimStart().startsWith("--"))
    .join("\n")
    .split(/;\s*(?:\n|$)/)
    .map((s) => s.trim())
    .filter((s) => s !== "");
}

/**
 * Applies `schema.sql` and then each migration the database has not seen, each in one
 * atomic batch (remote servers support `batch`, not `executeMultiple`). Safe when
 * several instances start at once on one database.
 */
async function migrate(client: Client, migrations: string[][]): Promise<void> {
  const schema = await (await fetch(SCHEMA_URL)).text();
  await client.batch(statements(schema), "write");
  for (;;) {
    const version = await readVersion(client);
    if (version > migrations.length) return;
    try {
      await client.batch([
        // Takes the step first: if another instance took it already, no row changes,
        // the INSERT then fails on the primary key and the whole batch rolls back.
        {
          sql:
            "UPDATE schema_version SET version = ? WHERE id = 1 AND version = ?",
          args: [version + 1, version],
        },
        "INSERT INTO schema_version (id, version) SELECT 1, 0 WHERE changes() = 0",
        ...migrations[version - 1],
      ], "write");
    } catch (error) {
      if ((await readVersion(client)) === version) throw error;
    }
  }
}

async function readVersion(client: Client): Promise<number> {
  const rs = await client.execute(
    "SELECT version FROM schema_version WHERE id = 1",
  );
  return Number(rs.rows[0].version);
}

/** The schema version the database is at. */
export async function schemaVersion(db: Db): Promise<number> {
  return readVersion(await db.client());
}

/** Answers when the database does (health checks). */
export async function ping(db: Db): Promise<void> {
  await (await db.client()).execute("SELECT 1");
}

// ---- mappers: one per table, explicit conversions ----

function iso(ms: Row[string]): string {
  return new Date(Number(ms)).toISOString();
}

function json(text: Row[string]): unknown {
  return JSON.parse(String(text));
}

function toRoom(row: Row): Room {
  return {
    id: String(row.id),
    created_at: iso(row.created_at),
    meta: json(row.meta),
  };
}

function toAgent(row: Row): Agent {
  return {
    id: String(row.id),
    room_id: String(row.room_id),
    name: String(row.name),
    role: String(row.role),
    joined_at: iso(row.joined_at),
    meta: json(row.meta),
  };
}

function toMessage(row: Row): Message {
  return {
    id: Number(row.id),
    room_id: String(row.room_id),
    from_agent: row.from_agent === null ? null : String(row.from_agent),
    to_agent: row.to_agent === null ? null : String(row.to_agent),
    kind: String(row.kind),
    body: json(row.body),
    created_at: iso(row.created_at),
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
  };
}

async function all(db: Db, stmt: InStatement): Promise<Row[]> {
  return (await (await db.client()).execute(stmt)).rows;
}

// ---- rooms ----

const ROOM_COLUMNS = "id, created_at, meta";

/** Creates a room, or returns the one with that id (`created` says which). */
export async function createRoom(
  db: Db,
  room: { id: string; meta: unknown },
): Promise<{ room: Room; created: boolean }> {
  const [inserted] = await all(db, {
    sql: `INSERT INTO rooms (id, created_at, meta) VALUES (?, ?, ?)
          ON CONFLICT (id) DO NOTHING RETURNING ${ROOM_COLUMNS}`,
    args: [room.id, Date.now(), JSON.stringify(room.meta)],
  });
  if (inserted) return { room: toRoom(inserted), created: true };
  const existing = await getRoom(db, room.id);
  // Only a concurrent room deletion between the two statements gets here.
  if (!existing) return createRoom(db, room);
  return { room: existing, created: false };
}

/** One room, or null. */
export async function getRoom(db: Db, id: string): Promise<Room | null> {
  const [row] = await all(db, {
    sql: `SELECT ${ROOM_COLUMNS} FROM rooms WHERE id = ?`,
    args: [id],
  });
  return row ? toRoom(row) : null;
}

/** Every room, oldest first. */
export async function listRooms(db: Db): Promise<Room[]> {
  const rows = await all(
    db,
    `SELECT ${ROOM_COLUMNS} FROM rooms ORDER BY created_at, rowid`,
  );
  return rows.map(toRoom);
}

// ---- agents ----

const AGENT_COLUMNS = "id, room_id, name, role, joined_at, meta";

/** Registers an agent; null when the id is taken in that room. */
export async function insertAgent(
  db: Db,
  agent: {
    id: string;
    room_id: string;
    name: string;
    role: string;
    meta: unknown;
  },
): Promise<Agent | null> {
  const [row] = await all(db, {
    sql:
      `INSERT INTO agents (id, room_id, name, role, joined_at, meta) VALUES (?, ?, ?, ?, ?, ?)
          ON CONFLICT (room_id, id) DO NOTHING RETURNING ${AGENT_COLUMNS}`,
    args: [
      agent.id,
      agent.room_id,
      agent.name,
      agent.role,
      Date.now(),
      JSON.stringify(agent.meta),
    ],
  });
  return row ? toAgent(row) : null;
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
  return rows.map(toAgent);
}

// ---- messages ----

const MESSAGE_COLUMNS =
  "id, room_id, from_agent, to_agent, kind, body, created_at";

/** Appends a message; SQLite assigns the id. */
export async function insertMessage(
  db: Db,
  message: {
    room_id: string;
    from_agent: string | null;
    to_agent: string | null;
    kind: string;
    body: unknown;
  },
): Promise<Message> {
  const [row] = await all(db, {
    sql:
      `INSERT INTO messages (room_id, from_agent, to_agent, kind, body, created_at)
          VALUES (?, ?, ?, ?, ?, ?) RETURNING ${MESSAGE_COLUMNS}`,
    args: [
      message.room_id,
      message.from_agent,
      message.to_agent,
      message.kind,
      JSON.stringify(message.body),
      Date.now(),
    ],
  });
  return toMessage(row);
}

/** Messages of a room with an id above `after`, ascending, optionally of one kind. */
export async function listMessages(
  db: Db,
  roomId: string,
  filter: { after: number; limit: number; kind?: string },
): Promise<Message[]> {
  const rows = await all(
    db,
    filter.kind === undefined
      ? {
        sql: `SELECT ${MESSAGE_COLUMNS} FROM messages
              WHERE room_id = ? AND id > ? ORDER BY id LIMIT ?`,
        args: [roomId, filter.after, filter.limit],
      }
      : {
        sql: `SELECT ${MESSAGE_COLUMNS} FROM messages
              WHERE room_id = ? AND kind = ? AND id > ? ORDER BY id LIMIT ?`,
        args: [roomId, filter.kind, filter.after, filter.limit],
      },
  );
  return rows.map(toMessage);
}

/** The newest `limit` messages of a room, ascending, and how many it holds in all. */
export async function recentMessages(
  db: Db,
  roomId: string,
  limit: number,
): Promise<{ items: Message[]; total: number }> {
  const [rows, count] = await Promise.all([
    all(db, {
      sql:
        `SELECT ${MESSAGE_COLUMNS} FROM messages WHERE room_id = ? ORDER BY id DESC LIMIT ?`,
      args: [roomId, limit],
    }),
    all(db, {
      sql: "SELECT count(*) AS n FROM messages WHERE room_id = ?",
      args: [roomId],
    }),
  ]);
  return { items: rows.map(toMessage).reverse(), total: Number(count[0].n) };
}

// ---- state ----

const STATE_COLUMNS = "room_id, scope, key, value, version, updated_at";

/** Writes a key: version 1 when new, one more than before otherwise. */
export async function putState(
  db: Db,
  entry: { room_id: string; scope: string; key: string; value: unknown },
): Promise<StateEntry> {
  const [row] = await all(db, {
    sql: `INSERT INTO state (room_id, scope, key, value, version, updated_at)
          VALUES (?, ?, ?, ?, 1, ?)
          ON CONFLICT (room_id, scope, key) DO UPDATE
          SET value = excluded.value, version = state.version + 1, updated_at = excluded.updated_at
          RETURNING ${STATE_COLUMNS}`,
    args: [
      entry.room_id,
      entry.scope,
      entry.key,
      JSON.stringify(entry.value),
      Date.now(),
    ],
  });
  return toStateEntry(row);
}

/** One key, or null. */
export async function getState(
  db: Db,
  roomId: string,
  scope: string,
  key: string,
): Promise<StateEntry | null> {
  const [row] = await all(db, {
    sql:
      `SELECT ${STATE_COLUMNS} FROM state WHERE room_id = ? AND scope = ? AND key = ?`,
    args: [roomId, scope, key],
  });
  return row ? toStateEntry(row) : null;
}

/** Every key of a room, or of one scope, ordered by scope and key. */
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
          `SELECT ${STATE_COLUMNS} FROM state WHERE room_id = ? ORDER BY scope, key`,
        args: [roomId],
      }
      : {
        sql:
          `SELECT ${STATE_COLUMNS} FROM state WHERE room_id = ? AND scope = ? ORDER BY key`,
        args: [roomId, scope],
      },
  );
  return rows.map(toStateEntry);
}

/** Deletes a key; false when it was absent. */
export async function deleteState(
  db: Db,
  roomId: string,
  scope: string,
  key: string,
): Promise<boolean> {
  const rs = await (await db.client()).execute({
    sql: "DELETE FROM state WHERE room_id = ? AND scope = ? AND key = ?",
    args: [roomId, scope, key],
  });
  return rs.rowsAffected > 0;
}
