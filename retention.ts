/**
 * Retention (off by default: nothing is deleted unless the operator says so):
 * `RETAIN_MESSAGES` keeps the newest n messages of each room, `RETAIN_DAYS` drops
 * messages older than d days and deletes rooms with no activity for d days. A sweep
 * runs a minute after the first request and every minute after; a read whose cursor
 * falls before what was dropped is 410 `cursor_expired` (main.ts), never a silent jump.
 */
import { deleteRoom, dropMessages, idleRooms } from "./db.ts";
import type { Db } from "./driver.ts";

/** What is kept: the newest `messages` of a room, and `days` of history (0: all). */
export type Retention = { messages: number; days: number };

const DAY_MS = 24 * 60 * 60 * 1000;

/** How often retention sweeps (ms). */
const SWEEP_MS = 60_000;

/** Applies the retention rules once; answers what was dropped and deleted. */
export async function sweep(
  db: Db,
  rule: Retention,
  now = Date.now(),
): Promise<{ messages: number; rooms: number }> {
  let messages = 0;
  let rooms = 0;
  if (rule.messages > 0) {
    messages += await dropMessages(db, { keep: rule.messages });
  }
  if (rule.days > 0) {
    const before = now - rule.days * DAY_MS;
    messages += await dropMessages(db, { before });
    for (const id of await idleRooms(db, before)) {
      if (await deleteRoom(db, id)) rooms++;
    }
  }
  return { messages, rooms };
}

/**
 * Sweeps every minute once started (by the first request: importing the app starts
 * nothing); a failed sweep is said once and tried again at the next.
 */
export function sweeper(db: Db, rule: Retention): () => void {
  let started = false;
  return () => {
    if (started || (rule.messages === 0 && rule.days === 0)) return;
    started = true;
    const timer = setInterval(() => {
      sweep(db, rule).catch((error) =>
        console.error("retention: the sweep failed:", error)
      );
    }, SWEEP_MS);
    // A process with nothing else to do may end: the sweep keeps nothing alive.
    Deno.unrefTimer(Number(timer));
  };
}
