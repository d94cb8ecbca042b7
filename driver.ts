/**
 * The database connection: which driver (node:sqlite for files and `:memory:`,
 * sqlite.ts; `@libsql/client` for remote URLs), its settings, time-outs and failure
 * handling, and the schema with its migrations, applied once on the first query.
 * Queries are in db.ts.
 */
// The error classes only: the remote client itself loads when a remote URL is opened.
import { LibsqlError } from "@libsql/core/api";
import { type Driver, openSqlite, sqlitePath } from "./sqlite.ts";

/** How to reach the database; `url` is `file:…`, `:memory:`, `libsql://…` or `https://…`. */
export type DbOptions = {
  url: string;
  authToken?: string;
  /** How long a remote database may take to answer (ms); default 5 s. */
  timeoutMs?: number;
  /** Schema changes after version 1, in order: entry i brings version i+1 to i+2. */
  migrations?: string[][];
};

/**
 * Schema changes after version 1 (`schema.sql`), oldest first: entry i takes a database
 * from version i+1 to i+2. A new database runs `schema.sql` and then every entry, so
 * `schema.sql` itself never changes shape.
 */
/**
 * Keeps the version a trigger on `state` just wrote (a tombstone's without value or
 * expiry), after the newest message of the room.
 */
const KEEP_VERSION = `INSERT OR IGNORE INTO state_versions VALUES (NEW.room_id,
  NEW.scope, NEW.key, NEW.version, CASE WHEN NEW.deleted THEN NULL ELSE NEW.value END,
  NEW.updated_by, NEW.updated_at, CASE WHEN NEW.deleted THEN NULL ELSE NEW.expires_at END,
  (SELECT coalesce(max(id), 0) FROM messages WHERE room_id = NEW.room_id));`;

export const MIGRATIONS: string[][] = [
  // 2: the task lifecycle. A message claimed before counts one attempt; one claimed
  // forever without a lease stays held.
  [
    "ALTER TABLE messages ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE messages ADD COLUMN max_attempts INTEGER",
    "ALTER TABLE messages ADD COLUMN done_at INTEGER",
    "ALTER TABLE messages ADD COLUMN done_by TEXT",
    "UPDATE messages SET attempts = 1 WHERE claimed_by IS NOT NULL",
  ],
  // 3: retention. The highest message id retention has dropped from a room: a
  // cursor below it has missed messages (410 cursor_expired).
  ["ALTER TABLE rooms ADD COLUMN dropped_through INTEGER NOT NULL DEFAULT 0"],
  // 4: history. The writer of each entry; a delete leaves a tombstone (deleted = 1,
  // expired at once, so every read takes it for absent) and a key's versions never
  // start over. Every write of a key is kept in state_versions by the triggers below,
  // with the newest message id of the room at that moment; the entries there are
  // kept as they were, with the newest message before the write as `after_message`.
  [
    "ALTER TABLE state ADD COLUMN updated_by TEXT",
    "ALTER TABLE state ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0",
    `CREATE TABLE state_versions (
      room_id TEXT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
      scope TEXT NOT NULL,
      key TEXT NOT NULL,
      version INTEGER NOT NULL,
      value TEXT, -- null: deleted, or expired (TTL)
      updated_by TEXT,
      updated_at INTEGER NOT NULL,
      expires_at INTEGER,
      after_message INTEGER NOT NULL,
      PRIMARY KEY (room_id, scope, key, version)
    ) STRICT, WITHOUT ROWID`,
    "CREATE INDEX state_versions_by_message ON state_versions (room_id, after_message)",
    `INSERT INTO state_versions
       SELECT room_id, scope, key, version, value, NULL, updated_at, expires_at,
         coalesce((SELECT max(id) FROM messages m
           WHERE m.room_id = state.room_id AND m.created_at <= state.updated_at), 0)
       FROM state`,
    // OR IGNORE: an import writes the versions first, then the entries.
    `CREATE TRIGGER state_insert_version AFTER INSERT ON state BEGIN
       ${KEEP_VERSION}
     END`,
    // A write over an entry whose TTL ran out steps the version by two: the
    // expiry is a version too, deleted by no one when the TTL ran out.
    `CREATE TRIGGER state_update_version AFTER UPDATE ON state BEGIN
       INSERT OR IGNORE INTO state_versions SELECT NEW.room_id, NEW.scope, NEW.key,
         OLD.version + 1, NULL, NULL, OLD.expires_at, NULL,
         (SELECT coalesce(max(id), 0) FROM messages
           WHERE room_id = NEW.room_id AND created_at <= OLD.expires_at)
         WHERE NEW.version = OLD.version + 2;
       ${KEEP_VERSION}
     END`,
  ],
  // 5: each message's wire form, the part that never changes (all but its id and
  // its task fields), written once at insert: a page of messages is then mostly
  // this text joined (db.ts, MESSAGE_JSON).
  [
    "ALTER TABLE messages ADD COLUMN head TEXT",
    `UPDATE messages SET head = trim(json_object('room_id', room_id,
       'from_agent', from_agent, 'to_agent', to_agent, 'kind', kind,
       'body', json(body), 'created_at',
       strftime('%Y-%m-%dT%H:%M:%fZ', created_at / 1000.0, 'unixepoch'),
       'reply_to', reply_to), '{}')`,
  ],
];

/** Busy timeout for local files: a writer waits this long for another one (ms). */
const BUSY_TIMEOUT_MS = 5000;
/**
 * WAL pages between checkpoints (SQLite's default is 1,000). A checkpoint syncs the
 * file and stalls the requests of that moment; smaller, more frequent ones stall them
 * for less, at the same throughput (docs/PERFORMANCE.md).
 */
const CHECKPOINT_PAGES = 256;
/** A remote database that has not answered in this long is unavailable (ms). */
const REMOTE_TIMEOUT_MS = 5000;
/**
 * After a remote database failed to answer, queries fail at once for this long instead
 * of each waiting for it (ms); then the next query tries again.
 */
const REMOTE_RETRY_MS = 500;

/**
 * The database cannot be reached or cannot store anything (network down, server
 * gone, disk full): answered 503 `database_unavailable`, never a 500.
 */
export class DatabaseUnavailable extends Error {
  constructor(cause: unknown) {
    super(
      `The database is unavailable: ${
        cause instanceof Error ? cause.message : String(cause)
      }`,
      { cause },
    );
    this.name = "DatabaseUnavailable";
  }
}

/**
 * Whether an error means the database is out of reach rather than a statement failed:
 * a network failure or timeout of the remote client (wrapped where it is caught, in
 * `Db`), a server or protocol error, or a local file that cannot be read or written (and the writes that shared a transaction
 * with such a failure: `SQLITE_ABORT`, sqlite.ts).
 */
export function isUnavailable(error: unknown): boolean {
  if (error instanceof DatabaseUnavailable || error instanceof CannotOpen) {
    return true;
  }
  if (!(error instanceof LibsqlError)) return false;
  return /^(SERVER_ERROR|HRANA_|STREAM_|PROTOCOL_|SQLITE_(IOERR|FULL|CANTOPEN|READONLY|NOTADB|CORRUPT|ABORT))/
    .test(error.code);
}

/**
 * A lazily opened database: nothing touches the file or the network until the first
 * query, so importing `main.ts` (tests, `deno check`) has no side effects.
 */
export class Db {
  readonly options: DbOptions;
  /** What to run when the database is closed (db.ts, `watch`). */
  readonly #onClose = new Set<() => void>();
  #ready?: Promise<Driver>;
  #client?: Driver;
  /** Until when queries fail at once after a remote failure (ms since the epoch). */
  #downUntil = 0;
  #lastFailure: unknown;
  /** SQLite's `data_version` when last asked (see `othersWrote`). */
  #dataVersion?: number;
  #saidCannotOpen = false;

  constructor(options: DbOptions) {
    this.options = options;
  }

  /** Whether the database is a local file or `:memory:` (one process may share it). */
  get local(): boolean {
    return isLocal(this.options.url);
  }

  /** Runs `fn` when the database is closed, until the returned function is called. */
  onClose(fn: () => void): () => void {
    this.#onClose.add(fn);
    return () => this.#onClose.delete(fn);
  }

  /**
   * The client, once the schema has been applied; every query awaits this. Throws
   * `DatabaseUnavailable` while the database is out of reach.
   */
  client(): Promise<Driver> {
    if (Date.now() < this.#downUntil) {
      return Promise.reject(this.#lastFailure);
    }
    this.#ready ??= this.#open().catch((error) => {
      // A failed open (remote server down) is retried by the next query.
      this.#ready = undefined;
      throw this.#failed(error);
    });
    return this.#ready;
  }

  /** Notes a failure; one that means "out of reach" becomes `DatabaseUnavailable`. */
  #failed(error: unknown): unknown {
    if (!isUnavailable(error)) return error;
    const unavailable = error instanceof DatabaseUnavailable
      ? error
      : new DatabaseUnavailable(error);
    if (error instanceof CannotOpen && !this.#saidCannotOpen) {
      // Said once, in one line: a host without a writable disk answers every request
      // 503 until DATABASE_URL names a server.
      this.#saidCannotOpen = true;
      console.error(`sync: ${error.message}`);
    }
    if (!isLocal(this.options.url)) {
      this.#downUntil = Date.now() + REMOTE_RETRY_MS;
      this.#lastFailure = unavailable;
    }
    return unavailable;
  }

  /** A remote client whose calls time out and fail as `DatabaseUnavailable`. */
  #guarded(client: Driver): Driver {
    const timeoutMs = this.options.timeoutMs ?? REMOTE_TIMEOUT_MS;
    const guard = async <T>(call: () => Promise<T>): Promise<T> => {
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(
          () =>
            reject(
              new DatabaseUnavailable(
                new Error(`no answer in ${timeoutMs} ms`),
              ),
            ),
          timeoutMs,
        );
      });
      try {
        return await Promise.race([call(), timeout]);
      } catch (error) {
        // The remote client's fetch fails with a TypeError (refused, reset, DNS)
        // or a DOMException (aborted): the network, not a statement.
        throw this.#failed(
          error instanceof TypeError || error instanceof DOMException
            ? new DatabaseUnavailable(error)
            : error,
        );
      } finally {
        clearTimeout(timer);
      }
    };
    return {
      execute: (stmt) => guard(() => client.execute(stmt)),
      batch: (stmts, mode) => guard(() => client.batch(stmts, mode)),
      close: () => client.close(),
    };
  }

  /**
   * Whether another connection (another instance on the same file) committed since
   * the last call. SQLite's `data_version` does not move for this connection's own
   * writes, which notify their waiters directly.
   */
  async othersWrote(): Promise<boolean> {
    const { rows } = await (await this.client()).execute("PRAGMA data_version");
    const version = Number(rows[0].data_version);
    const changed = version !== this.#dataVersion;
    this.#dataVersion = version;
    return changed;
  }

  /** Closes the client; later queries open it again. */
  close(): void {
    for (const fn of this.#onClose) fn();
    this.#client?.close();
    this.#client = undefined;
    this.#ready = undefined;
    this.#dataVersion = undefined;
    this.#downUntil = 0;
  }

  async #open(): Promise<Driver> {
    const local = isLocal(this.options.url);
    // An embedded file goes through node:sqlite (one connection: the driver is
    // synchronous, so more add no parallelism, and its PRAGMAs hold); a remote URL
    // through @libsql/client. docs/PERFORMANCE.md says why.
    const client: Driver = local ? openLocal(this.options.url) : this.#guarded(
      (await import("@libsql/client/web")).createClient({
        url: this.options.url,
        authToken: this.options.authToken,
      }),
    );
    this.#client = client;
    try {
      if (local && this.options.url !== ":memory:") {
        // WAL lets readers run beside the writer; NORMAL loses nothing on a process
        // crash (docs/DESIGN.md, "Durability"); the size limit truncates the WAL after each
        // checkpoint so it stays small under sustained writes.
        await client.execute("PRAGMA journal_mode = WAL");
        await client.execute("PRAGMA synchronous = NORMAL");
        await client.execute("PRAGMA journal_size_limit = 67108864");
        await client.execute(`PRAGMA wal_autocheckpoint = ${CHECKPOINT_PAGES}`);
      }
      if (local) {
        await client.execute("PRAGMA foreign_keys = ON");
        await client.execute(`PRAGMA busy_timeout = ${BUSY_TIMEOUT_MS}`);
      }
      await migrate(client, this.options.migrations ?? MIGRATIONS);
    } catch (error) {
      client.close();
      this.#client = undefined;
      throw error;
    }
    return client;
  }
}

/**
 * A local database file that cannot be opened: no permission to write it (Deno
 * Deploy, Val Town: no writable disk), or no such folder. Its message is the one
 * line an operator needs.
 */
export class CannotOpen extends Error {
  constructor(url: string, cause: unknown) {
    super(
      `cannot open the database at ${url}: ${
        cause instanceof Error ? cause.message : String(cause)
      }; on a host without a writable disk, set DATABASE_URL to a libsql:// URL (and DATABASE_AUTH_TOKEN)`,
      { cause },
    );
    this.name = "CannotOpen";
  }
}

/** Opens a local database, or throws `CannotOpen`. */
function openLocal(url: string): Driver {
  // A URL that would open something else is refused as it is (sqlite.ts).
  sqlitePath(url);
  try {
    return openSqlite(url);
  } catch (error) {
    throw new CannotOpen(url, error);
  }
}

function isLocal(url: string): boolean {
  return url === ":memory:" || url.startsWith("file:");
}

const SCHEMA_URL = new URL("./schema.sql", import.meta.url);

/**
 * Splits `schema.sql` into statements: a line ending in `;` ends one, except inside a
 * trigger, which ends at `END;`. (The schema keeps to that layout.)
 */
function statements(sql: string): string[] {
  const out: string[] = [];
  let current = "";
  for (const line of sql.split("\n")) {
    if (line.trimStart().startsWith("--") || line.trim() === "") continue;
    current += line + "\n";
    // A trigger's body holds statements of its own: it ends at "END;".
    const inTrigger = /^CREATE TRIGGER/i.test(current);
    if (inTrigger ? /^END;\s*$/.test(line) : line.trimEnd().endsWith(";")) {
      out.push(current.trim().replace(/;$/, ""));
      current = "";
    }
  }
  return out;
}

/**
 * Applies `schema.sql` and then each migration the database has not seen, each in one
 * atomic batch (remote servers support `batch`, not `executeMultiple`). Safe when
 * several instances start at once on one database.
 */
async function migrate(client: Driver, migrations: string[][]): Promise<void> {
  // From a file when the code is on disk (fetch would load its own machinery at
  // start-up), else from where the code came from (a host serving it by URL).
  const schema = SCHEMA_URL.protocol === "file:"
    ? await Deno.readTextFile(SCHEMA_URL)
    : await (await fetch(SCHEMA_URL)).text();
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

async function readVersion(client: Driver): Promise<number> {
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

/**
 * A database URL as it may be shown (a start-up line, a log): no user, password or
 * query string (which may carry an auth token).
 */
export function shown(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.username !== "" || parsed.password !== "") {
      parsed.username = "";
      parsed.password = "";
    }
    parsed.search = "";
    return parsed.href;
  } catch {
    return url.split("?")[0];
  }
}
