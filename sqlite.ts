/**
 * The embedded driver: Deno's built-in `node:sqlite` behind the two calls of the libSQL
 * client that db.ts makes (`execute`, `batch`), with group commit. The file format is
 * the same as libSQL's; remote URLs use `@libsql/client`. It is here because it costs
 * a fraction of `@libsql/client` on a local file (docs/PERFORMANCE.md).
 */
import { DatabaseSync, type StatementSync } from "node:sqlite";
import { setImmediate } from "node:timers";
import {
  type InStatement,
  type InValue,
  LibsqlBatchError,
  LibsqlError,
} from "@libsql/core/api";

/** A value read from a row: what both drivers can answer. */
export type Value = null | string | number | bigint | ArrayBuffer | Uint8Array;
/** A row by column name. */
export type Row = Record<string, Value>;
/** What a statement answers: its rows, or how many rows it changed. */
export type ResultSet = { rows: Row[]; rowsAffected: number };

/** The part of the libSQL client db.ts uses; `@libsql/client`'s `Client` fits it. */
export interface Driver {
  execute(stmt: InStatement): Promise<ResultSet>;
  batch(stmts: InStatement[], mode: "write"): Promise<ResultSet[]>;
  close(): void;
}

/** Prepared statements kept per connection; SQL built per request (IN lists) is rare. */
const CACHE_LIMIT = 500;

/** Statements that change the database (not a read, not a PRAGMA). */
const WRITES = /^\s*(INSERT|UPDATE|DELETE|REPLACE|CREATE|DROP|ALTER)\b/i;

/** Statements that answer rows; others are run for their change count. */
const READS = /^\s*(SELECT|WITH|PRAGMA|VALUES)\b|\bRETURNING\b/i;

/** Opens a `file:` URL or `:memory:` with `node:sqlite`. */
export function openSqlite(url: string): Driver {
  return new SqliteDriver(new DatabaseSync(sqlitePath(url)));
}

/**
 * The file name of a `file:` URL (`file:a.db`, `file:///tmp/a.db`), or `:memory:`.
 * Throws for what would silently open something else: no path (a private temporary
 * database), a query string (it would become part of the name), a host.
 */
export function sqlitePath(url: string): string {
  if (url === ":memory:") return url;
  if (url.includes("?")) {
    throw new Error(
      "a file: URL takes no query string (options are not supported)",
    );
  }
  let path = url.slice("file:".length);
  if (url.startsWith("file://")) {
    const parsed = new URL(url);
    if (parsed.host !== "" && parsed.host !== "localhost") {
      throw new Error(`a file: URL names no host (got "${parsed.host}")`);
    }
    path = decodeURIComponent(parsed.pathname);
  }
  if (path === "" || path.endsWith("/")) {
    throw new Error("a file: URL needs the path of a file");
  }
  return path;
}

/** A write waiting for the next group commit. */
type Pending = {
  stmts: InStatement[];
  /** A batch (all-or-nothing, in a savepoint) or one statement. */
  batch: boolean;
  resolve: (results: ResultSet[]) => void;
  reject: (error: unknown) => void;
};

/** A group's transaction can no longer be trusted: every write of it fails. */
class GroupLost extends Error {
  constructor(cause: unknown) {
    super("A savepoint could not be set or undone", { cause });
  }
}

/** The most writes one transaction takes; more wait for the next one. */
const GROUP_LIMIT = 256;

class SqliteDriver implements Driver {
  #db: DatabaseSync;
  #cache = new Map<string, StatementSync>();
  #pending: Pending[] = [];
  #scheduled = false;

  constructor(db: DatabaseSync) {
    this.#db = db;
  }

  /** Reads run at once; writes join the next group commit. */
  execute(stmt: InStatement): Promise<ResultSet> {
    const sql = typeof stmt === "string" ? stmt : stmt.sql;
    if (!WRITES.test(sql)) {
      try {
        return Promise.resolve(this.#run(stmt));
      } catch (error) {
        return Promise.reject(libsqlError(error));
      }
    }
    return this.#enqueue([stmt], false).then(([result]) => result);
  }

  /**
   * All statements at once or none (a savepoint inside the group's transaction); the
   * error names the statement that failed, as `@libsql/client`'s does.
   */
  batch(stmts: InStatement[], _mode: "write"): Promise<ResultSet[]> {
    return this.#enqueue(stmts, true);
  }

  #enqueue(stmts: InStatement[], batch: boolean): Promise<ResultSet[]> {
    const { promise, resolve, reject } = Promise.withResolvers<ResultSet[]>();
    this.#pending.push({ stmts, batch, resolve, reject });
    if (!this.#scheduled) {
      this.#scheduled = true;
      // After the requests that are ready now have had their turn: their writes
      // share one transaction (group commit, docs/PERFORMANCE.md).
      setImmediate(() => this.#commit());
    }
    return promise;
  }

  /**
   * Runs the waiting writes in one `BEGIN IMMEDIATE` transaction. Each write succeeds or
   * fails alone (a failed statement undoes only itself; a batch rolls back to its
   * savepoint). Nobody hears anything before the transaction has ended: after `COMMIT`
   * the writes that applied succeed; if the transaction is lost (SQLite rolled it back,
   * `COMMIT` failed, or a savepoint could not be undone), every write of it fails.
   */
  #commit(): void {
    const group = this.#pending.splice(0, GROUP_LIMIT);
    if (this.#pending.length > 0) setImmediate(() => this.#commit());
    else this.#scheduled = false;
    const applied: { write: Pending; results: ResultSet[] }[] = [];
    const refused: { write: Pending; error: unknown }[] = [];
    try {
      this.#db.exec("BEGIN IMMEDIATE");
      for (const write of group) {
        try {
          applied.push({ write, results: this.#apply(write) });
        } catch (error) {
          if (error instanceof GroupLost) throw error.cause;
          refused.push({ write, error });
        }
        if (!this.#db.isTransaction) {
          // An error SQLite answers by rolling back the whole transaction (an I/O
          // error, a full disk): nothing of it stands.
          throw new LibsqlError(
            "The transaction was rolled back",
            "SQLITE_ABORT",
          );
        }
      }
      this.#db.exec("COMMIT");
    } catch (error) {
      try {
        if (this.#db.isOpen && this.#db.isTransaction) {
          this.#db.exec("ROLLBACK");
        }
      } catch {
        // The connection is beyond rolling back; every write below fails anyway.
      }
      for (const write of group) write.reject(libsqlError(error));
      return;
    }
    for (const { write, results } of applied) write.resolve(results);
    for (const { write, error } of refused) write.reject(error);
  }

  /**
   * One write inside the group's transaction; throws a libSQL-shaped error when it
   * fails alone, `GroupLost` when its savepoint could not be set or undone.
   */
  #apply(write: Pending): ResultSet[] {
    if (!write.batch) {
      try {
        return [this.#run(write.stmts[0])];
      } catch (error) {
        throw libsqlError(error);
      }
    }
    this.#savepoint("SAVEPOINT batch");
    const results: ResultSet[] = [];
    for (const [index, stmt] of write.stmts.entries()) {
      try {
        results.push(this.#run(stmt));
      } catch (error) {
        if (this.#db.isTransaction) {
          this.#savepoint("ROLLBACK TO batch");
          this.#savepoint("RELEASE batch");
        }
        throw libsqlError(error, index);
      }
    }
    this.#savepoint("RELEASE batch");
    return results;
  }

  #savepoint(sql: string): void {
    try {
      this.#db.exec(sql);
    } catch (error) {
      throw new GroupLost(error);
    }
  }

  /** Commits the writes still waiting, then closes. */
  close(): void {
    while (this.#pending.length > 0 && this.#db.isOpen) this.#commit();
    this.#cache.clear();
    if (this.#db.isOpen) this.#db.close();
  }

  #run(stmt: InStatement): ResultSet {
    const sql = typeof stmt === "string" ? stmt : stmt.sql;
    const prepared = this.#prepare(sql);
    const args = typeof stmt === "string" ? [] : stmt.args ?? [];
    if (Array.isArray(args)) {
      const bound = args.map(bindable);
      return run(
        sql,
        () => prepared.all(...bound),
        () => prepared.run(...bound),
      );
    }
    const named: Record<string, Bindable> = {};
    for (const [name, value] of Object.entries(args)) {
      named[name] = bindable(value);
    }
    return run(sql, () => prepared.all(named), () => prepared.run(named));
  }

  #prepare(sql: string): StatementSync {
    let prepared = this.#cache.get(sql);
    if (prepared) return prepared;
    if (this.#cache.size >= CACHE_LIMIT) this.#cache.clear();
    prepared = this.#db.prepare(sql);
    // Named arguments may carry a value the statement does not use (db.ts shares them).
    prepared.setAllowUnknownNamedParameters(true);
    this.#cache.set(sql, prepared);
    return prepared;
  }
}

/** `.all()` for statements that answer rows, `.run()` for the others. */
function run(
  sql: string,
  all: () => unknown[],
  write: () => { changes: number | bigint },
): ResultSet {
  if (READS.test(sql)) {
    // `.all()`, never `.get()`: a statement left open stops WAL checkpoints (STYLE.md).
    const rows = all() as Row[];
    return { rows, rowsAffected: rows.length };
  }
  const { changes } = write();
  return { rows: [], rowsAffected: Number(changes) };
}

type Bindable = null | string | number | bigint | Uint8Array;

/**
 * As `@libsql/client` binds: whole numbers as integers (node:sqlite would bind every
 * number as a real), booleans as 0/1, dates as milliseconds.
 */
function bindable(value: InValue | undefined): Bindable {
  if (value === undefined || value === null) return null;
  if (typeof value === "number") {
    return Number.isSafeInteger(value) ? BigInt(value) : value;
  }
  if (typeof value === "boolean") return value ? 1n : 0n;
  if (value instanceof Date) return BigInt(value.getTime());
  if (value instanceof ArrayBuffer) return new Uint8Array(value);
  return value;
}

/** SQLite's primary result codes that callers tell apart (sqlite3.h). */
const CODES: Record<number, string> = {
  1: "SQLITE_ERROR",
  7: "SQLITE_NOMEM",
  5: "SQLITE_BUSY",
  6: "SQLITE_LOCKED",
  8: "SQLITE_READONLY",
  10: "SQLITE_IOERR",
  11: "SQLITE_CORRUPT",
  13: "SQLITE_FULL",
  14: "SQLITE_CANTOPEN",
  18: "SQLITE_TOOBIG",
  19: "SQLITE_CONSTRAINT",
  20: "SQLITE_MISMATCH",
  25: "SQLITE_RANGE",
  26: "SQLITE_NOTADB",
};

/**
 * `DatabaseSync.exec` throws without a result code: SQLite's own message for it
 * (sqlite3_errstr) tells which it was.
 */
const BY_MESSAGE: [RegExp, string][] = [
  [/database is locked/, "SQLITE_BUSY"],
  [/database table is locked/, "SQLITE_LOCKED"],
  [/readonly database/, "SQLITE_READONLY"],
  [/disk I\/O error/, "SQLITE_IOERR"],
  [/malformed/, "SQLITE_CORRUPT"],
  [/database or disk is full/, "SQLITE_FULL"],
  [/unable to open database/, "SQLITE_CANTOPEN"],
  [/constraint failed/, "SQLITE_CONSTRAINT"],
  [/not a database/, "SQLITE_NOTADB"],
  // A write that reached a connection already closed (a drain racing a request).
  [/database is not open/, "SQLITE_CANTOPEN"],
];

/** A node:sqlite error as the libSQL client would raise it, so errors.ts maps both. */
function libsqlError(error: unknown, index?: number): LibsqlError {
  if (error instanceof LibsqlError) return error;
  const errcode = (error as { errcode?: unknown }).errcode;
  const raw = typeof errcode === "number" ? errcode : undefined;
  const message = error instanceof Error ? error.message : String(error);
  const code = raw === undefined
    ? BY_MESSAGE.find(([text]) => text.test(message))?.[1] ?? "SQLITE_UNKNOWN"
    : CODES[raw & 0xff] ?? `SQLITE_${raw & 0xff}`;
  return index === undefined
    ? new LibsqlError(message, code, undefined, raw, error as Error)
    : new LibsqlBatchError(
      message,
      index,
      code,
      undefined,
      raw,
      error as Error,
    );
}
