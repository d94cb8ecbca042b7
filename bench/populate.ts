/**
 * Fills a room with messages by writing straight into the service's SQLite file (made
 * by the service itself, so its schema is the service's), while the service is stopped.
 * Only the columns a new message has are written (schema.sql: `messages`); the insert
 * triggers run as for any write (the room's `rev` grows, the sender's `last_seen` is
 * touched: the sender here is no registered agent, so that is a no-op).
 */
import { DatabaseSync } from "node:sqlite";

/** Rows per statement, and per transaction. */
const CHUNK = 100_000;

/** The ids the room's messages span, first and last (inclusive). */
export type IdRange = { first: number; last: number };

/** Appends `count` messages to `room` in `file`; answers the room's id range. */
export function populate(file: string, room: string, count: number): IdRange {
  const db = new DatabaseSync(file);
  try {
    db.exec("PRAGMA journal_mode = WAL");
    db.exec("PRAGMA synchronous = NORMAL");
    const start = Date.now() - count;
    // A recursive CTE makes the rows inside SQLite: one statement per chunk, not one
    // call from JavaScript per row.
    const insert = db.prepare(
      `WITH RECURSIVE n(i) AS (SELECT ?1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
       INSERT INTO messages (room_id, from_agent, to_agent, kind, body, created_at,
         head)
       SELECT ?3, 'seed', NULL, 'note', body, ?4 + i,
              -- The stored head, as the service writes it (db.ts, messageHead).
              trim(json_object('room_id', ?3, 'from_agent', 'seed', 'to_agent', NULL,
                'kind', 'note', 'body', json(body), 'created_at',
                strftime('%Y-%m-%dT%H:%M:%fZ', (?4 + i) / 1000.0, 'unixepoch'),
                'reply_to', NULL), '{}')
       FROM (SELECT i, json_object('n', CAST(i AS INTEGER), 'text', 'a pre-populated message') AS body
             FROM n)`,
    );
    for (let from = 0; from < count; from += CHUNK) {
      const to = Math.min(count, from + CHUNK) - 1;
      db.exec("BEGIN");
      insert.run(from, to, room, start);
      db.exec("COMMIT");
    }
    const range = db.prepare(
      "SELECT min(id) AS first, max(id) AS last, count(*) AS n FROM messages WHERE room_id = ?",
    ).get(room) as { first: number; last: number; n: number };
    if (range.n < count) {
      throw new Error(`room "${room}" holds ${range.n} messages, not ${count}`);
    }
    // Leave no WAL behind: the service starts on a checkpointed file.
    db.exec("PRAGMA wal_checkpoint(TRUNCATE)");
    return { first: Number(range.first), last: Number(range.last) };
  } finally {
    db.close();
  }
}

/** The journal mode stored in the file (WAL is persistent; `synchronous` is not). */
export function journalMode(file: string): string {
  const db = new DatabaseSync(file, { readOnly: true });
  try {
    const row = db.prepare("PRAGMA journal_mode").get() as {
      journal_mode: string;
    };
    return row.journal_mode;
  } finally {
    db.close();
  }
}
