/**
 * A small Hrana-over-HTTP server for tests, so the suite can exercise the
 * remote path of @libsql/client (`http:`, `https:`, `libsql:` URLs) without a
 * real sqld, which cannot be installed here.
 *
 * It follows libsql-server (sqld): the same endpoints, JSON shapes, batons,
 * batch conditions, error codes and messages, argument binding rules and the
 * statements sqld refuses. @libsql/client 0.18.0 speaks protocol version 2
 * over JSON (`POST /v2/pipeline`) and never probes for another; version 3
 * JSON (`/v3/pipeline`, `/v3/cursor`, `get_autocommit`, `is_autocommit`) is
 * served too, Protobuf (`/v3-protobuf`) is not, so a probing client falls
 * back to version 2.
 *
 * Where it differs from sqld, because it has one SQLite connection where sqld
 * has one per stream: a stream that keeps a transaction open between HTTP
 * requests (`client.transaction()`) holds that connection, and requests of
 * other streams wait until it commits, rolls back, closes or expires (10 s
 * idle), where sqld would let reads see the last commit at once. SQL input
 * errors carry no "(at offset N)", since node:sqlite does not expose the
 * offset; `describe` is not implemented, as no client call uses it.
 *
 * @module
 */

import { DatabaseSync, type StatementSync } from "node:sqlite";

/** A running test server, from {@link startHranaServer}. */
export interface HranaServer {
  /** Base URL for `createClient({ url })`, e.g. "http://127.0.0.1:34567". */
  readonly url: string;
  /** Pipeline requests served so far. */
  readonly requests: number;
  /** Stops serving, rolls back any open transaction and closes the database. */
  close(): Promise<void>;
}

/**
 * Starts a Hrana-over-HTTP server on 127.0.0.1 (a free port unless `port` is given)
 * backed by a fresh in-memory SQLite database, or by the file at `path`.
 */
export function startHranaServer(
  options: { path?: string; port?: number } = {},
): Promise<HranaServer> {
  const hrana = new Hrana(new DatabaseSync(options.path ?? ":memory:"));
  return new Promise((resolve) => {
    const server = Deno.serve({
      hostname: "127.0.0.1",
      port: options.port ?? 0,
      onListen({ port }) {
        resolve({
          url: `http://127.0.0.1:${port}`,
          get requests() {
            return hrana.requests;
          },
          async close() {
            hrana.closing();
            await server.shutdown();
            hrana.closed();
          },
        });
      },
    }, (req) => hrana.handle(req));
  });
}

// sqld's limits and timings (libsql-server/src/hrana/http/).
const STREAM_EXPIRY_MS = 10_000;
const MAX_STORED_SQLS = 50;
const MAX_STORED_SQL_BYTES = 5_000;

// ---------------------------------------------------------------------------
// Protocol types (the JSON encoding of Hrana 2 and 3)

type SqlValue = null | bigint | number | string | Uint8Array;

type ProtoValue =
  | { type: "null" }
  | { type: "integer"; value: string }
  | { type: "float"; value: number }
  | { type: "text"; value: string }
  | { type: "blob"; base64: string };

interface ProtoError {
  message: string;
  code: string;
}

interface ProtoCol {
  name: string | null;
  decltype: string | null;
}

interface StmtResult {
  cols: ProtoCol[];
  rows: ProtoValue[][];
  affected_row_count: number;
  last_insert_rowid: string | null;
  // Newer sqld reports these; no client version parses them. node:sqlite has
  // no sqlite3_stmt_status, so the counts are approximations.
  rows_read: number;
  rows_written: number;
  query_duration_ms: number;
}

interface BatchResult {
  step_results: (StmtResult | null)[];
  step_errors: (ProtoError | null)[];
}

type StreamResponse =
  | { type: "close" }
  | { type: "execute"; result: StmtResult }
  | { type: "batch"; result: BatchResult }
  | { type: "sequence" }
  | { type: "store_sql" }
  | { type: "close_sql" }
  | { type: "get_autocommit"; is_autocommit: boolean };

type StreamResult =
  | { type: "ok"; response: StreamResponse }
  | { type: "error"; error: ProtoError };

type CursorEntry =
  | { type: "step_begin"; step: number; cols: ProtoCol[] }
  | {
    type: "step_end";
    affected_row_count: number;
    last_insert_rowid: string | null;
  }
  | { type: "step_error"; step: number; error: ProtoError }
  | { type: "row"; row: ProtoValue[] }
  | { type: "error"; error: ProtoError };

interface Stmt {
  sql?: string;
  sqlId?: number;
  args: SqlValue[];
  // sqld collects named arguments in a map: a repeated name keeps its last value.
  named: Map<string, SqlValue>;
}

type Cond =
  | { type: "ok" | "error"; step: number }
  | { type: "not"; cond: Cond }
  | { type: "and" | "or"; conds: Cond[] }
  | { type: "is_autocommit" };

interface BatchStep {
  condition?: Cond;
  stmt: Stmt;
}

type StreamRequest =
  | { type: "close" }
  | { type: "execute"; stmt: Stmt }
  | { type: "batch"; steps: BatchStep[] }
  | { type: "sequence" | "describe"; sql?: string; sqlId?: number }
  | { type: "store_sql"; sqlId: number; sql: string }
  | { type: "close_sql"; sqlId: number }
  | { type: "get_autocommit" };

/** sqld's ProtocolError: the whole HTTP request fails with 400 and the stream is dropped. */
class ProtocolError extends Error {}

/** sqld's StreamError: answered with 500 and a JSON error the client maps to a code. */
class StreamExpiredError extends Error {
  constructor() {
    super("The stream has expired due to inactivity");
  }
}

/** An error answered in place of one request's or one batch step's result. */
class HranaError extends Error {
  constructor(message: string, readonly code: string) {
    super(message);
  }

  toProto(): ProtoError {
    return { message: this.message, code: this.code };
  }
}

// ---------------------------------------------------------------------------
// Decoding requests. Everything is checked before anything runs, as serde
// does in sqld: a malformed request executes nothing.

type Obj = Record<string, unknown>;

function malformed(detail: string): ProtocolError {
  return new ProtocolError(
    `Cannot deserialize client message from JSON: ${detail}`,
  );
}

function object(v: unknown, what: string): Obj {
  if (typeof v === "object" && v !== null && !Array.isArray(v)) return v as Obj;
  throw malformed(`${what} must be an object`);
}

function array(v: unknown, what: string): unknown[] {
  if (v === undefined || v === null) return [];
  if (Array.isArray(v)) return v;
  throw malformed(`${what} must be an array`);
}

function string(v: unknown, what: string): string {
  if (typeof v === "string") return v;
  throw malformed(`${what} must be a string`);
}

function optString(v: unknown, what: string): string | undefined {
  return v === undefined || v === null ? undefined : string(v, what);
}

function int(v: unknown, what: string, min: number, max: number): number {
  if (Number.isInteger(v) && (v as number) >= min && (v as number) <= max) {
    return v as number;
  }
  throw malformed(`${what} must be an integer in [${min}, ${max}]`);
}

function optSqlId(v: unknown): number | undefined {
  return v === undefined || v === null
    ? undefined
    : int(v, "sql_id", -(2 ** 31), 2 ** 31 - 1);
}

const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;

function decodeValue(v: unknown): SqlValue {
  const o = object(v, "value");
  switch (o.type) {
    case "null":
      return null;
    case "integer": {
      const text = string(o.value, "integer value");
      if (!/^[+-]?\d+$/.test(text)) {
        throw malformed(`"${text}" is not a decimal integer as a string`);
      }
      const n = BigInt(text);
      if (n < I64_MIN || n > I64_MAX) throw malformed(`${text} overflows i64`);
      return n;
    }
    case "float":
      if (typeof o.value === "number") return o.value;
      throw malformed("float value must be a number");
    case "text":
      return string(o.value, "text value");
    case "blob":
      return fromBase64(string(o.base64, "blob base64"));
    default:
      throw malformed(`unknown value type ${JSON.stringify(o.type)}`);
  }
}

function decodeStmt(v: unknown): Stmt {
  const o = object(v, "stmt");
  const named = new Map<string, SqlValue>();
  for (const arg of array(o.named_args, "named_args")) {
    const a = object(arg, "named arg");
    named.set(string(a.name, "named arg name"), decodeValue(a.value));
  }
  return {
    sql: optString(o.sql, "sql"),
    sqlId: optSqlId(o.sql_id),
    args: array(o.args, "args").map(decodeValue),
    named,
  };
}

function decodeCond(v: unknown): Cond {
  const o = object(v, "condition");
  switch (o.type) {
    case "ok":
    case "error":
      return { type: o.type, step: int(o.step, "step", 0, 2 ** 32 - 1) };
    case "not":
      return { type: "not", cond: decodeCond(o.cond) };
    case "and":
    case "or":
      return { type: o.type, conds: array(o.conds, "conds").map(decodeCond) };
    case "is_autocommit":
      return { type: "is_autocommit" };
    default:
      throw malformed(`unknown condition type ${JSON.stringify(o.type)}`);
  }
}

function decodeBatch(v: unknown): BatchStep[] {
  return array(object(v, "batch").steps, "steps").map((s) => {
    const step = object(s, "step");
    return {
      condition: step.condition == null
        ? undefined
        : decodeCond(step.condition),
      stmt: decodeStmt(step.stmt),
    };
  });
}

function decodeRequest(v: unknown): StreamRequest {
  const o = object(v, "request");
  switch (o.type) {
    case "close":
    case "get_autocommit":
      return { type: o.type };
    case "execute":
      return { type: "execute", stmt: decodeStmt(o.stmt) };
    case "batch":
      return { type: "batch", steps: decodeBatch(o.batch) };
    case "sequence":
    case "describe":
      return {
        type: o.type,
        sql: optString(o.sql, "sql"),
        sqlId: optSqlId(o.sql_id),
      };
    case "store_sql": {
      const sqlId = optSqlId(o.sql_id);
      if (sqlId === undefined) throw malformed("store_sql needs sql_id");
      return { type: "store_sql", sqlId, sql: string(o.sql, "sql") };
    }
    case "close_sql": {
      const sqlId = optSqlId(o.sql_id);
      if (sqlId === undefined) throw malformed("close_sql needs sql_id");
      return { type: "close_sql", sqlId };
    }
    default:
      throw malformed(`unknown request type ${JSON.stringify(o.type)}`);
  }
}

async function readJson(req: Request): Promise<Obj> {
  let body: unknown;
  try {
    body = await req.json();
  } catch (e) {
    throw malformed(e instanceof Error ? e.message : String(e));
  }
  return object(body, "request body");
}

function decodeBaton(v: unknown): string | undefined {
  return optString(v, "baton");
}

// ---------------------------------------------------------------------------
// Values

function fromBase64(text: string): Uint8Array {
  // sqld writes base64 without padding and accepts it with or without.
  const bare = text.replace(/=+$/, "");
  if (!/^[A-Za-z0-9+/]*$/.test(bare) || bare.length % 4 === 1) {
    throw malformed("blob is not valid base64");
  }
  const binary = atob(bare + "=".repeat((4 - bare.length % 4) % 4));
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

function toBase64(bytes: Uint8Array): string {
  let binary = "";
  // Chunked, as String.fromCharCode takes its bytes as arguments.
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary).replace(/=+$/, "");
}

function encodeValue(v: unknown): ProtoValue {
  if (v === null || v === undefined) return { type: "null" };
  // Integers are read as bigint (setReadBigInts), so a number is a REAL.
  if (typeof v === "bigint") return { type: "integer", value: v.toString() };
  if (typeof v === "number") return { type: "float", value: v };
  if (typeof v === "string") return { type: "text", value: v };
  if (v instanceof Uint8Array) return { type: "blob", base64: toBase64(v) };
  throw new Error(`unexpected value from SQLite: ${typeof v}`);
}

// ---------------------------------------------------------------------------
// A little SQL lexer, after SQLite's tokenize.c. It finds what sqld learns
// from its own parser and node:sqlite does not expose: where a statement
// starts (preparing an empty statement crashes Deno's node:sqlite), which
// kind it is, and its parameters (sqlite3_bind_parameter_count and _name).

interface Token {
  kind:
    | "word"
    | "ident"
    | "string"
    | "var"
    | "semi"
    | "lparen"
    | "rparen"
    | "op";
  text: string;
  start: number;
}

function isIdChar(c: string | undefined): boolean {
  return c !== undefined &&
    (/[A-Za-z0-9_$]/.test(c) || c.charCodeAt(0) >= 0x80);
}

function endOfQuoted(sql: string, i: number, close: string): number {
  for (let j = i + 1; j < sql.length; j++) {
    if (sql[j] !== close) continue;
    // A doubled quote is an escaped quote, except for [brackets].
    if (close !== "]" && sql[j + 1] === close) j++;
    else return j + 1;
  }
  return sql.length;
}

function tokenize(sql: string): Token[] {
  const tokens: Token[] = [];
  let i = 0;
  const push = (kind: Token["kind"], end: number) => {
    tokens.push({ kind, text: sql.slice(i, end), start: i });
    i = end;
  };
  while (i < sql.length) {
    const c = sql[i];
    if (/\s/.test(c)) {
      i++;
    } else if (c === "-" && sql[i + 1] === "-") {
      const end = sql.indexOf("\n", i);
      i = end < 0 ? sql.length : end + 1;
    } else if (c === "/" && sql[i + 1] === "*") {
      const end = sql.indexOf("*/", i + 2);
      i = end < 0 ? sql.length : end + 2;
    } else if (c === "'") {
      push("string", endOfQuoted(sql, i, "'"));
    } else if (c === '"' || c === "`") {
      push("ident", endOfQuoted(sql, i, c));
    } else if (c === "[") {
      push("ident", endOfQuoted(sql, i, "]"));
    } else if (c === "?") {
      let j = i + 1;
      while (/\d/.test(sql[j] ?? "")) j++;
      push("var", j);
    } else if (c === ":" || c === "@" || c === "$" || c === "#") {
      // Named parameters, including Tcl-style `$a::b(c)` as SQLite allows.
      let j = i + 1;
      let n = 0;
      while (j < sql.length) {
        if (isIdChar(sql[j])) {
          n++;
          j++;
        } else if (sql[j] === "(" && n > 0) {
          while (j < sql.length && !/\s/.test(sql[j]) && sql[j] !== ")") j++;
          if (sql[j] === ")") j++;
          break;
        } else if (sql[j] === ":" && sql[j + 1] === ":") {
          j += 2;
        } else {
          break;
        }
      }
      push(n > 0 ? "var" : "op", n > 0 ? j : i + 1);
    } else if (isIdChar(c) || (c === "." && /\d/.test(sql[i + 1] ?? ""))) {
      // Keywords, identifiers and numbers (with their exponent sign).
      let j = i + 1;
      while (isIdChar(sql[j]) || sql[j] === ".") {
        j += /[eE]/.test(sql[j]) && /[+-]/.test(sql[j + 1] ?? "") ? 2 : 1;
      }
      push("word", j);
    } else {
      push(
        c === ";" ? "semi" : c === "(" ? "lparen" : c === ")" ? "rparen" : "op",
        i + 1,
      );
    }
  }
  return tokens;
}

interface Kind {
  /** sqld's parser accepts it (it refuses statements that would break across streams). */
  supported: boolean;
  /** INSERT, UPDATE or DELETE: the only statements sqld reports changes() for. */
  iud: boolean;
  /** INSERT: the only statement sqld reports last_insert_rowid() for. */
  insert: boolean;
  explain: boolean;
}

// libsql-server/src/query_analysis.rs, StmtKind::pragma_kind.
// deno-fmt-ignore
const PRAGMAS_ANY_BODY = new Set([
  "table_list", "index_list", "table_info", "table_xinfo", "index_xinfo",
  "pragma_list", "compile_options", "database_list", "function_list",
  "module_list", "encoding", "defer_foreign_keys", "foreign_keys",
  "foreign_key_list", "foreign_key_check", "collation_list", "data_version",
  "freelist_count", "integrity_check", "legacy_file_format", "page_count",
  "quick_check", "stats", "user_version",
]);
// deno-fmt-ignore
const PRAGMAS_NO_BODY = new Set([
  "analysis_limit", "application_id", "auto_vacuum", "automatic_index",
  "busy_timeout", "cache_size", "cache_spill", "cell_size_check",
  "checkpoint_fullfsync", "fullfsync", "hard_heap_limit", "journal_mode",
  "journal_size_limit", "legacy_alter_table", "locking_mode",
  "max_page_count", "mmap_size", "page_size", "query_only",
  "read_uncommitted", "recursive_triggers", "reverse_unordered_selects",
  "schema_version", "secure_delete", "soft_heap_limit", "synchronous",
  "temp_store", "threads", "trusted_schema", "wal_autocheckpoint",
]);

function bareName(t: Token | undefined): string {
  if (t === undefined) return "";
  return (t.kind === "ident" ? t.text.slice(1, -1) : t.text).toLowerCase();
}

function pragmaSupported(tokens: Token[], at: number): boolean {
  let name = at;
  if (tokens[name + 1]?.text === ".") name += 2; // schema-qualified
  const next = tokens[name + 1];
  const body = next?.text === "=" || next?.kind === "lparen";
  const pragma = bareName(tokens[name]);
  return PRAGMAS_ANY_BODY.has(pragma) || (!body && PRAGMAS_NO_BODY.has(pragma));
}

/** Classifies the statement that starts at tokens[0], as sqld's query analysis does. */
function classify(tokens: Token[]): Kind {
  const word = (i: number) =>
    tokens[i]?.kind === "word" ? tokens[i].text.toUpperCase() : "";
  const kind: Kind = {
    supported: true,
    iud: false,
    insert: false,
    explain: false,
  };
  let first = word(0);
  if (first === "EXPLAIN") {
    let at = word(1) === "QUERY" && word(2) === "PLAN" ? 3 : 1;
    if (word(at) === "PRAGMA") kind.supported = pragmaSupported(tokens, ++at);
    return { ...kind, explain: true };
  }
  if (first === "WITH") {
    // The statement's verb is the first one after the CTEs' parentheses.
    let depth = 0;
    for (const t of tokens.slice(1)) {
      if (t.kind === "semi" && depth === 0) break;
      if (t.kind === "lparen") depth++;
      if (t.kind === "rparen") depth--;
      const w = t.kind === "word" ? t.text.toUpperCase() : "";
      if (
        depth === 0 && /^(SELECT|VALUES|INSERT|REPLACE|UPDATE|DELETE)$/.test(w)
      ) {
        first = w;
        break;
      }
    }
  }
  switch (first) {
    case "INSERT":
    case "REPLACE":
      return { ...kind, iud: true, insert: true };
    case "UPDATE":
    case "DELETE":
      return { ...kind, iud: true };
    case "CREATE": {
      // A TEMP object lives on one connection, i.e. one stream: sqld refuses them.
      if (/^TEMP(ORARY)?$/.test(word(1))) return { ...kind, supported: false };
      if (word(1) === "TABLE") {
        const at = word(2) === "IF" ? 5 : 2;
        if (tokens[at + 1]?.text === "." && bareName(tokens[at]) === "temp") {
          return { ...kind, supported: false };
        }
      }
      return kind;
    }
    case "PRAGMA":
      return { ...kind, supported: pragmaSupported(tokens, 1) };
    case "ATTACH":
    case "DETACH":
    case "VACUUM":
    case "ANALYZE":
    case "REINDEX":
      return { ...kind, supported: false };
    default:
      // SELECT, VALUES, BEGIN, COMMIT, ALTER, DROP, ...; SQLite judges the rest.
      return kind;
  }
}

interface Params {
  /** sqlite3_bind_parameter_count: the largest index. */
  count: number;
  /** sqlite3_bind_parameter_name by index; undefined for a bare `?`. */
  names: (string | undefined)[];
}

/** Numbers parameters as SQLite's sqlite3ExprAssignVarNumber does. */
function paramsOf(tokens: Token[]): Params {
  const params: Params = { count: 0, names: [] };
  for (const t of tokens) {
    if (t.kind !== "var") continue;
    if (t.text === "?") {
      params.count++;
    } else if (t.text.startsWith("?")) {
      const index = Number(t.text.slice(1));
      params.names[index] ??= t.text;
      params.count = Math.max(params.count, index);
    } else if (!params.names.includes(t.text)) {
      params.names[++params.count] = t.text;
    }
  }
  return params;
}

// ---------------------------------------------------------------------------
// Errors, as sqld words and codes them (libsql-server/src/hrana/stmt.rs)

// rusqlite's ErrorCode names by primary result code. SQLITE_ERROR has no
// variant there, so sqld reports it as SQLITE_UNKNOWN, as do codes it omits.
// deno-fmt-ignore
const SQLITE_CODES: Record<number, string> = {
  2: "SQLITE_INTERNAL", 3: "SQLITE_PERM", 4: "SQLITE_ABORT", 5: "SQLITE_BUSY",
  6: "SQLITE_LOCKED", 7: "SQLITE_NOMEM", 8: "SQLITE_READONLY",
  9: "SQLITE_INTERRUPT", 10: "SQLITE_IOERR", 11: "SQLITE_CORRUPT",
  12: "SQLITE_NOTFOUND", 13: "SQLITE_FULL", 14: "SQLITE_CANTOPEN",
  15: "SQLITE_PROTOCOL", 17: "SQLITE_SCHEMA", 18: "SQLITE_TOOBIG",
  19: "SQLITE_CONSTRAINT", 20: "SQLITE_MISMATCH", 21: "SQLITE_MISUSE",
  22: "SQLITE_NOLFS", 23: "SQLITE_AUTH", 25: "SQLITE_RANGE", 26: "SQLITE_NOTADB",
};

interface SqliteFailure {
  message: string;
  /** The extended result code, e.g. 1555 for SQLITE_CONSTRAINT_PRIMARYKEY. */
  errcode?: number;
}

/** node:sqlite's errors carry code ERR_SQLITE_ERROR; anything else is a bug here. */
function sqliteFailure(e: unknown): SqliteFailure {
  if (
    e instanceof Error && (e as { code?: unknown }).code === "ERR_SQLITE_ERROR"
  ) {
    return e as SqliteFailure;
  }
  throw e;
}

function isSyntaxError(f: SqliteFailure): boolean {
  return /syntax error|incomplete input|unrecognized token/.test(f.message);
}

/** sqld's own parser rejects malformed SQL before SQLite sees it. */
function parseError(detail: string): HranaError {
  return new HranaError(
    `SQL string could not be parsed: ${detail}`,
    "SQL_PARSE_ERROR",
  );
}

/** A failure of SQLite itself; `prepare` failures with SQLITE_ERROR are "SQL input errors". */
function sqliteError(f: SqliteFailure, atPrepare: boolean): HranaError {
  const primary = (f.errcode ?? 1) & 0xff;
  if (atPrepare && primary === 1) {
    return new HranaError(`SQL input error: ${f.message}`, "SQL_INPUT_ERROR");
  }
  return new HranaError(
    `SQLite error: ${f.message}`,
    SQLITE_CODES[primary] ?? "SQLITE_UNKNOWN",
  );
}

function argsInvalid(detail: string): HranaError {
  return new HranaError(
    `Arguments do not match SQL parameters: ${detail}`,
    "ARGS_INVALID",
  );
}

// ---------------------------------------------------------------------------
// The server

interface Stream {
  id: string;
  /** Sequence number the next baton must show, as in sqld: each baton is good once. */
  seq: number;
  /** SQL texts from store_sql, by id. */
  sqls: Map<number, string>;
  closed: boolean;
  /** An HTTP request is using the stream now. */
  busy: boolean;
  timer?: ReturnType<typeof setTimeout>;
}

/** A statement past sqld's parse stage, ready to run. */
interface Compiled {
  /** The SQL from the statement's first token on. */
  text: string;
  kind: Kind;
  args: SqlValue[];
  named: Map<string, SqlValue>;
  /** Unset when prepare failed in a way an earlier batch step may fix ("no such table"). */
  prepared?: StatementSync;
}

class Hrana {
  readonly #db: DatabaseSync;
  // For changes() and last_insert_rowid() after a statement, which
  // node:sqlite's all() does not report.
  readonly #info: StatementSync;
  readonly #streams = new Map<string, Stream>();
  readonly #expired = new Set<string>();
  /**
   * The stream whose transaction is open between its HTTP requests. sqld
   * gives every stream its own connection; here they share one, so other
   * streams wait rather than run inside that transaction.
   */
  #owner?: Stream;
  #waiters: (() => void)[] = [];
  #requests = 0;
  #closing = false;

  constructor(db: DatabaseSync) {
    // node:sqlite enforces foreign keys by default, like sqld, whose SQLite
    // is built with SQLITE_DEFAULT_FOREIGN_KEYS=1 and sets no pragma.
    this.#db = db;
    this.#info = db.prepare("SELECT changes(), last_insert_rowid()");
    returnArrays(this.#info);
    this.#info.setReadBigInts(true);
  }

  get requests(): number {
    return this.#requests;
  }

  /** Before the HTTP server drains: end idle streams so no request waits on them. */
  closing(): void {
    this.#closing = true;
    for (const stream of this.#streams.values()) clearTimeout(stream.timer);
    this.#streams.clear();
    if (this.#owner !== undefined) {
      this.#rollback();
      this.#owner = undefined;
    }
    this.#wake();
  }

  /** After the HTTP server drained: nothing can use the database any more. */
  closed(): void {
    this.#db.close();
  }

  async handle(req: Request): Promise<Response> {
    const { pathname } = new URL(req.url);
    try {
      if (req.method === "GET") {
        if (pathname === "/" || pathname === "/v2" || pathname === "/v3") {
          return text(200, "Hello, this is HTTP API v2 (Hrana over HTTP)");
        }
        if (pathname === "/health") return text(200, "");
      } else if (req.method === "POST") {
        if (pathname === "/v2/pipeline") return await this.#pipeline(req, 2);
        if (pathname === "/v3/pipeline") return await this.#pipeline(req, 3);
        if (pathname === "/v3/cursor") return await this.#cursor(req);
      }
      await req.body?.cancel();
      return text(404, "Not found");
    } catch (e) {
      if (e instanceof ProtocolError) return text(400, e.message);
      if (e instanceof StreamExpiredError) {
        return json(500, { message: e.message, code: "STREAM_EXPIRED" });
      }
      return text(500, `Internal error of the test server: ${e}`);
    }
  }

  async #pipeline(req: Request, version: number): Promise<Response> {
    this.#requests++;
    const body = await readJson(req);
    const requests = array(body.requests, "requests").map(decodeRequest);
    const { baton, value: results } = await this.#withStream(
      decodeBaton(body.baton),
      (stream) => requests.map((r) => this.#request(stream, r, version)),
    );
    return json(200, { baton, base_url: null, results });
  }

  async #cursor(req: Request): Promise<Response> {
    const body = await readJson(req);
    const steps = decodeBatch(body.batch);
    const { baton, value: entries } = await this.#withStream(
      decodeBaton(body.baton),
      (stream) => {
        if (stream.closed) {
          throw new ProtocolError("Stream for this baton was closed");
        }
        try {
          return cursorEntries(this.#batch(stream, steps, 3));
        } catch (e) {
          if (e instanceof HranaError) {
            return [{ type: "error", error: e.toProto() } as CursorEntry];
          }
          throw e;
        }
      },
    );
    // A cursor streams one JSON object per line, its first says the baton.
    const lines = [{ baton, base_url: null }, ...entries]
      .map((item) => JSON.stringify(item) + "\n");
    return new Response(lines.join(""), {
      headers: { "content-type": "text/plain" },
    });
  }

  /** Runs `use` on the baton's stream (or a new one) once the connection is free. */
  async #withStream<T>(
    baton: string | undefined,
    use: (stream: Stream) => T,
  ): Promise<{ baton: string | null; value: T }> {
    const stream = this.#acquire(baton);
    let value: T;
    try {
      while (this.#owner !== undefined && this.#owner !== stream) {
        await new Promise<void>((resolve) => this.#waiters.push(resolve));
      }
      // No await from here on: node:sqlite is synchronous, so this request
      // has the connection to itself until it answers.
      value = use(stream);
    } catch (e) {
      // sqld drops the stream, and with it its connection, on a protocol error.
      if (e instanceof ProtocolError) stream.closed = true;
      throw e;
    } finally {
      this.#release(stream);
    }
    return {
      baton: stream.closed ? null : `${stream.id}.${stream.seq}`,
      value,
    };
  }

  #acquire(baton: string | undefined): Stream {
    let stream: Stream | undefined;
    if (baton === undefined) {
      stream = {
        id: crypto.randomUUID(),
        seq: 0,
        sqls: new Map(),
        closed: false,
        busy: false,
      };
      this.#streams.set(stream.id, stream);
    } else {
      const dot = baton.lastIndexOf(".");
      const id = baton.slice(0, dot);
      if (this.#expired.has(id)) throw new StreamExpiredError();
      stream = dot < 0 ? undefined : this.#streams.get(id);
      if (stream === undefined) {
        throw new ProtocolError("Received an invalid baton");
      }
      if (stream.busy || String(stream.seq) !== baton.slice(dot + 1)) {
        throw new ProtocolError("Received a baton that has already been used");
      }
      clearTimeout(stream.timer);
    }
    stream.busy = true;
    return stream;
  }

  #release(stream: Stream): void {
    stream.busy = false;
    // Once the server is closing, a stream ends with the request using it.
    if (this.#closing) stream.closed = true;
    const inTransaction = this.#db.isOpen && this.#db.isTransaction;
    if (stream.closed) {
      // A closed stream's connection goes away, and with it any transaction
      // it left open, e.g. by a batch that failed before its COMMIT.
      if (inTransaction) this.#rollback();
      this.#streams.delete(stream.id);
      if (this.#owner === stream) this.#owner = undefined;
    } else {
      stream.seq++;
      this.#owner = inTransaction ? stream : undefined;
      stream.timer = setTimeout(() => this.#expire(stream), STREAM_EXPIRY_MS);
    }
    if (this.#owner === undefined) this.#wake();
  }

  #expire(stream: Stream): void {
    this.#streams.delete(stream.id);
    this.#expired.add(stream.id);
    if (this.#owner === stream) {
      this.#rollback();
      this.#owner = undefined;
      this.#wake();
    }
  }

  #wake(): void {
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const wake of waiters) wake();
  }

  #rollback(): void {
    try {
      this.#db.prepare("ROLLBACK").run();
    } catch {
      // SQLite already rolled it back, e.g. after SQLITE_FULL.
    }
  }

  #request(stream: Stream, req: StreamRequest, version: number): StreamResult {
    if (stream.closed) {
      throw new ProtocolError("Stream for this baton was closed");
    }
    const ok = (response: StreamResponse): StreamResult => ({
      type: "ok",
      response,
    });
    try {
      switch (req.type) {
        case "close":
          stream.closed = true;
          return ok({ type: "close" });
        case "execute":
          return ok({
            type: "execute",
            result: this.#execute(this.#compile(stream, req.stmt)),
          });
        case "batch": {
          const { results, errors } = this.#batch(stream, req.steps, version);
          return ok({
            type: "batch",
            result: {
              step_results: results,
              step_errors: errors.map((e) => e?.toProto() ?? null),
            },
          });
        }
        case "sequence":
          this.#sequence(sqlText(stream, req.sql, req.sqlId));
          return ok({ type: "sequence" });
        case "describe":
          throw new ProtocolError(
            "The `describe` request is not implemented by this test server",
          );
        case "store_sql":
          if (stream.sqls.has(req.sqlId)) {
            throw new ProtocolError(`SQL text ${req.sqlId} already exists`);
          }
          if (stream.sqls.size >= MAX_STORED_SQLS) {
            throw new HranaError(
              `The server already stores ${stream.sqls.size} SQL texts, it cannot store more`,
              "SQL_STORE_TOO_MANY",
            );
          }
          if (new TextEncoder().encode(req.sql).length > MAX_STORED_SQL_BYTES) {
            throw new HranaError(
              `The statement is too large to be stored (over ${MAX_STORED_SQL_BYTES} bytes)`,
              "SQL_STORE_TOO_LARGE",
            );
          }
          stream.sqls.set(req.sqlId, req.sql);
          return ok({ type: "store_sql" });
        case "close_sql":
          stream.sqls.delete(req.sqlId);
          return ok({ type: "close_sql" });
        case "get_autocommit":
          if (version < 3) {
            throw new ProtocolError(
              "The `get_autocommit` request is only supported in protocol version hrana3 and higher",
            );
          }
          return ok({
            type: "get_autocommit",
            is_autocommit: !this.#db.isTransaction,
          });
      }
    } catch (e) {
      if (e instanceof HranaError) return { type: "error", error: e.toProto() };
      throw e;
    }
  }

  /** sqld's parse stage: errors here fail a whole batch before any step runs. */
  #compile(stream: Stream, stmt: Stmt): Compiled {
    const sql = sqlText(stream, stmt.sql, stmt.sqlId);
    const compiled = this.#compileText(sql, stmt.args, stmt.named);
    if (compiled.prepared !== undefined) {
      const rest = restAfter(compiled.text, compiled.prepared);
      if (tokenize(rest).some((t) => t.kind !== "semi")) {
        throw new HranaError(
          "SQL string contains more than one statement",
          "SQL_MANY_STATEMENTS",
        );
      }
    }
    if (stmt.args.length > 0 && stmt.named.size > 0) {
      throw new HranaError(
        "Specifying both positional and named arguments is not supported",
        "ARGS_BOTH_POSITIONAL_AND_NAMED",
      );
    }
    return compiled;
  }

  /** Compiles the first statement of `sql`, which may be followed by more. */
  #compileText(
    sql: string,
    args: SqlValue[],
    named: Map<string, SqlValue>,
  ): Compiled {
    const tokens = tokenize(sql);
    const first = tokens.findIndex((t) => t.kind !== "semi");
    if (first < 0) {
      throw new HranaError(
        "SQL string does not contain any statement",
        "SQL_NO_STATEMENT",
      );
    }
    const kind = classify(tokens.slice(first));
    if (!kind.supported) throw parseError(`unsupported statement: ${sql}`);
    const text = sql.slice(tokens[first].start);
    let prepared: StatementSync | undefined;
    try {
      prepared = this.#db.prepare(text);
    } catch (e) {
      const f = sqliteFailure(e);
      if (isSyntaxError(f)) throw parseError(f.message);
      // Otherwise prepare again when the step runs: an earlier step may
      // create the table this one needs.
    }
    return { text, kind, args, named, prepared };
  }

  #execute(c: Compiled): StmtResult {
    let stmt = c.prepared;
    if (stmt === undefined) {
      try {
        stmt = c.prepared = this.#db.prepare(c.text);
      } catch (e) {
        throw sqliteError(sqliteFailure(e), true);
      }
    }
    const { named, anonymous } = bind(c, paramsOf(tokenize(stmt.sourceSQL)));
    stmt.setReadBigInts(true);
    // Arrays keep every column when two share a name ("SELECT 1 AS x, 2 AS x").
    returnArrays(stmt);
    const started = performance.now();
    let rows: unknown[];
    try {
      rows = named === undefined
        ? stmt.all(...anonymous)
        : stmt.all(named, ...anonymous);
    } catch (e) {
      throw sqliteError(sqliteFailure(e), false);
    }
    const queryDurationMs = performance.now() - started;
    const [changes, rowid] = this.#info.get() as unknown as [bigint, bigint];
    const affected = c.kind.iud ? Number(changes) : 0;
    return {
      cols: stmt.columns().map((col) => ({
        name: col.name,
        decltype: col.type,
      })),
      rows: rows.map((row) => (row as unknown[]).map(encodeValue)),
      affected_row_count: affected,
      last_insert_rowid: c.kind.insert ? rowid.toString() : null,
      rows_read: rows.length,
      rows_written: affected,
      query_duration_ms: queryDurationMs,
    };
  }

  #batch(
    stream: Stream,
    steps: BatchStep[],
    version: number,
  ): { results: (StmtResult | null)[]; errors: (HranaError | null)[] } {
    const compiled = steps.map((step, i) => {
      const c = this.#compile(stream, step.stmt);
      if (step.condition !== undefined) checkCond(step.condition, i, version);
      return c;
    });
    const results: (StmtResult | null)[] = [];
    const errors: (HranaError | null)[] = [];
    const outcomes: ("ok" | "error" | "skipped")[] = [];
    const holds = (cond: Cond): boolean => {
      switch (cond.type) {
        case "ok":
        case "error":
          return outcomes[cond.step] === cond.type;
        case "not":
          return !holds(cond.cond);
        case "and":
          return cond.conds.every(holds);
        case "or":
          return cond.conds.some(holds);
        case "is_autocommit":
          return !this.#db.isTransaction;
      }
    };
    steps.forEach((step, i) => {
      if (step.condition !== undefined && !holds(step.condition)) {
        results.push(null);
        errors.push(null);
        outcomes.push("skipped");
        return;
      }
      try {
        results.push(this.#execute(compiled[i]));
        errors.push(null);
        outcomes.push("ok");
      } catch (e) {
        if (!(e instanceof HranaError)) throw e;
        results.push(null);
        errors.push(e);
        outcomes.push("error");
      }
    });
    return { results, errors };
  }

  /** Runs statements one after another until one fails, like sqlite3_exec. */
  #sequence(sql: string): void {
    let rest = sql;
    while (tokenize(rest).some((t) => t.kind !== "semi")) {
      const c = this.#compileText(rest, [], new Map());
      this.#execute(c);
      rest = restAfter(c.text, c.prepared as StatementSync);
    }
  }
}

/** Rows as arrays; node:sqlite has setReturnArrays, its bundled typings not yet. */
function returnArrays(stmt: StatementSync): void {
  (stmt as StatementSync & { setReturnArrays(enabled: boolean): void })
    .setReturnArrays(true);
}

function sqlText(stream: Stream, sql?: string, sqlId?: number): string {
  if (sql !== undefined && sqlId !== undefined) {
    throw new ProtocolError(
      "Either `sql` or `sql_id` are required, but not both",
    );
  }
  if (sql !== undefined) return sql;
  if (sqlId === undefined) {
    throw new ProtocolError("Either `sql` or `sql_id` are required");
  }
  const stored = stream.sqls.get(sqlId);
  if (stored === undefined) {
    throw new ProtocolError(`SQL text ${sqlId} not found`);
  }
  return stored;
}

/** The SQL after the one statement SQLite prepared (sqlite3_sql is its text up to the tail). */
function restAfter(text: string, stmt: StatementSync): string {
  const own = stmt.sourceSQL;
  if (!text.startsWith(own)) {
    throw new Error(
      `SQLite prepared ${JSON.stringify(own)}, not a prefix of its input`,
    );
  }
  return text.slice(own.length);
}

function checkCond(cond: Cond, step: number, version: number): void {
  switch (cond.type) {
    case "ok":
    case "error":
      // A condition can only look back, at steps that have already run.
      if (cond.step >= step) {
        throw new ProtocolError(
          "Invalid reference to step in a batch condition",
        );
      }
      return;
    case "not":
      return checkCond(cond.cond, step, version);
    case "and":
    case "or":
      return cond.conds.forEach((c) => checkCond(c, step, version));
    case "is_autocommit":
      if (version < 3) {
        throw new ProtocolError(
          "BatchCond of type `is_autocommit` is only supported in protocol version hrana3 and higher",
        );
      }
  }
}

/**
 * Matches arguments to parameters as sqld's Params::bind does: every
 * parameter needs a value (SQLite would quietly bind NULL), a named one
 * matches its name with or without the prefix, `?NNN` takes argument NNN.
 */
function bind(c: Compiled, params: Params): {
  named?: Record<string, SqlValue>;
  anonymous: SqlValue[];
} {
  const given = c.named.size > 0 ? c.named.size : c.args.length;
  if (given > params.count) {
    throw argsInvalid(
      `too many parameters, expected ${params.count} found ${given}`,
    );
  }
  const positional = c.named.size > 0 ? [] : c.args;
  const byName = c.args.length > 0 ? new Map<string, SqlValue>() : c.named;
  // node:sqlite binds named parameters from an object and the others
  // positionally, in index order, skipping the named ones.
  const named: Record<string, SqlValue> = {};
  const anonymous: SqlValue[] = [];
  let hasNamed = false;
  for (let index = 1; index <= params.count; index++) {
    const name = params.names[index];
    const value = name === undefined
      ? positional[index - 1]
      : name.startsWith("?")
      ? positional[Number(name.slice(1)) - 1]
      : byName.has(name)
      ? byName.get(name)
      : byName.get(name.slice(1));
    if (value === undefined) {
      // sqld leaves the rest unbound for EXPLAIN, which runs nothing.
      if (c.kind.explain) break;
      throw argsInvalid(`value for parameter ${name ?? index} not found`);
    }
    if (name === undefined || name.startsWith("?")) {
      anonymous.push(value);
    } else {
      named[name] = value;
      hasNamed = true;
    }
  }
  return { named: hasNamed ? named : undefined, anonymous };
}

function cursorEntries(
  { results, errors }: {
    results: (StmtResult | null)[];
    errors: (HranaError | null)[];
  },
): CursorEntry[] {
  const entries: CursorEntry[] = [];
  results.forEach((result, step) => {
    const error = errors[step];
    if (error !== null) {
      entries.push({ type: "step_error", step, error: error.toProto() });
    } else if (result !== null) {
      entries.push({ type: "step_begin", step, cols: result.cols });
      for (const row of result.rows) entries.push({ type: "row", row });
      entries.push({
        type: "step_end",
        affected_row_count: result.affected_row_count,
        last_insert_rowid: result.last_insert_rowid,
      });
    }
  });
  return entries;
}

function text(status: number, body: string): Response {
  return new Response(body, {
    status,
    headers: { "content-type": "text/plain" },
  });
}

function json(status: number, body: unknown): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json" },
  });
}
