/**
 * The raw-driver reference: node:sqlite on a copy of the service's own database file
 * (same tables, indexes and triggers), WAL and synchronous=NORMAL, in a loop, in its own
 * process so it has a core to itself like the server. Prints one JSON line:
 * `{"ops": N, "seconds": S, "cpu": C}` (C: CPU seconds used in the loop).
 *
 *   raw.ts insert FILE ROOM SECONDS           one INSERT … RETURNING per call, read with .all()
 *   raw.ts insert-seed FILE ROOM SECONDS      the same on the seed's tables (rooms, and messages
 *                                             of id, room_id, from_agent, to_agent, kind, body,
 *                                             created_at; no trigger), made in FILE if absent
 *   raw.ts page FILE ROOM SECONDS FIRST LAST  a 100-row page after a random id in [FIRST, LAST)
 *   raw.ts state FILE ROOM SECONDS            the service's upsert of one of 100 keys, its
 *                                             history kept by the triggers (migration 4)
 *   raw.ts state-bare FILE ROOM SECONDS       the same upsert with the history triggers
 *                                             dropped for the loop (and put back after)
 */
import { DatabaseSync } from "node:sqlite";

const COLUMNS = "id, room_id, from_agent, to_agent, kind, body, created_at, " +
  "reply_to, claimed_by, claimed_at, lease_expires_at";

const [mode, file, room, secondsText, firstText, lastText] = Deno.args;
const seconds = Number(secondsText);

const db = new DatabaseSync(file);
db.exec("PRAGMA journal_mode = WAL");
db.exec("PRAGMA synchronous = NORMAL");
db.exec("PRAGMA foreign_keys = ON");
db.exec("PRAGMA busy_timeout = 5000");

type Result = { ops: number; seconds: number; cpu: number };

/** CPU time (user + system) used by this process so far, in seconds. */
function cpu(): number {
  const stat = Deno.readTextFileSync("/proc/self/stat");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** Calls `step` until `seconds` have passed; answers how many calls it made. */
function loop(step: (i: number) => void): Result {
  // A short warm-up, so the statement cache and the page cache are hot.
  const warm = performance.now() + 300;
  for (let i = 0; performance.now() < warm; i++) step(i);
  const start = performance.now();
  const cpuStart = cpu();
  const end = start + seconds * 1000;
  let ops = 0;
  // Check the clock every 64 calls: performance.now() is not free.
  while ((ops & 63) !== 0 || performance.now() < end) step(ops++);
  return {
    ops,
    seconds: (performance.now() - start) / 1000,
    cpu: cpu() - cpuStart,
  };
}

/** One INSERT … RETURNING `returning` per call, read with .all(), into ROOM. */
function inserts(returning: string): Result {
  const insert = db.prepare(
    `INSERT INTO messages (room_id, from_agent, to_agent, kind, body, created_at)
     VALUES (?, ?, ?, ?, ?, ?) RETURNING ${returning}`,
  );
  return loop((i) => {
    const rows = insert.all(
      room,
      "bench",
      null,
      "bench",
      JSON.stringify({ n: i, text: "a benchmark message" }),
      Date.now(),
    );
    if (rows.length !== 1) throw new Error("INSERT … RETURNING gave no row");
  });
}

let result: Result;
if (mode === "insert-seed") {
  db.exec(`CREATE TABLE IF NOT EXISTS rooms (id TEXT PRIMARY KEY,
             created_at INTEGER NOT NULL)`);
  db.exec(`CREATE TABLE IF NOT EXISTS messages (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             room_id TEXT NOT NULL REFERENCES rooms (id),
             from_agent TEXT, to_agent TEXT, kind TEXT NOT NULL,
             body TEXT NOT NULL, created_at INTEGER NOT NULL)`);
  db.exec(
    `CREATE INDEX IF NOT EXISTS messages_by_room ON messages (room_id, id)`,
  );
  db.prepare("INSERT OR IGNORE INTO rooms (id, created_at) VALUES (?, ?)").run(
    room,
    Date.now(),
  );
  result = inserts("id, room_id, from_agent, to_agent, kind, body, created_at");
} else if (mode === "insert") {
  result = inserts(COLUMNS);
} else if (mode === "page") {
  const first = Number(firstText);
  const span = Number(lastText) - first - 100;
  const page = db.prepare(
    `SELECT ${COLUMNS} FROM messages WHERE room_id = ? AND id > ?
     ORDER BY id LIMIT 100`,
  );
  result = loop(() => {
    const rows = page.all(room, first + Math.floor(Math.random() * span));
    if (rows.length !== 100) throw new Error(`a page of ${rows.length} rows`);
  });
} else if (mode === "state" || mode === "state-bare") {
  const triggers = db.prepare(
    `SELECT name, sql FROM sqlite_master WHERE type = 'trigger'
       AND name IN ('state_insert_version', 'state_update_version')`,
  ).all() as { name: string; sql: string }[];
  if (triggers.length !== 2) {
    throw new Error("the history triggers are missing");
  }
  if (mode === "state-bare") {
    for (const { name } of triggers) db.exec(`DROP TRIGGER ${name}`);
  }
  const upsert = db.prepare(
    `INSERT INTO state (room_id, scope, key, value, version, updated_at,
       expires_at, updated_by) VALUES (?, '_shared', ?, ?, 1, ?, NULL, NULL)
     ON CONFLICT (room_id, scope, key) DO UPDATE SET value = excluded.value,
       version = state.version + 1, deleted = 0, updated_at = excluded.updated_at,
       expires_at = excluded.expires_at, updated_by = excluded.updated_by
     RETURNING room_id, scope, key, value, version, updated_at, expires_at, updated_by`,
  );
  try {
    result = loop((i) => {
      const rows = upsert.all(
        room,
        `k${i % 100}`,
        JSON.stringify({ n: i }),
        Date.now(),
      );
      if (rows.length !== 1) throw new Error("the upsert gave no row");
    });
  } finally {
    if (mode === "state-bare") { for (const { sql } of triggers) db.exec(sql); }
  }
} else {
  throw new Error(
    `unknown mode "${mode}": insert, insert-seed, page, state or state-bare`,
  );
}
db.close();
console.log(JSON.stringify(result));
