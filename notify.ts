/**
 * Change notification for long-polls and streams. A write publishes an event to the
 * waiters of its room right after it commits (same process: no delay); a poller reads
 * each watched room's `rev` a few times a second, so writes made by another instance
 * sharing the database wake waiters here too. On a local file it first asks SQLite
 * whether another connection wrote at all (`PRAGMA data_version`), so it costs next
 * to nothing and never mistakes this process's own writes for another's.
 */
import { setImmediate } from "node:timers";

import { type Change, type Db, roomRevs } from "./db.ts";

/**
 * What changed in a room: a change this process committed (db.ts), or `changed`,
 * "something, on another instance". On `access` waiters check their access again.
 */
export type RoomEvent = Change | { type: "changed" };

const notifiers = new WeakMap<Db, Notifier>();

/**
 * The notifier of a database, made on first use: it watches the database's changes
 * and polls for other instances' writes while anyone listens.
 */
export function notifierOf(db: Db): Notifier {
  let notifier = notifiers.get(db);
  if (notifier === undefined) {
    const made = new Notifier(
      (rooms) => roomRevs(db, rooms),
      db.local ? () => db.othersWrote() : undefined,
    );
    db.watch({
      changed: (room, change) => made.publish(room, change),
      closed: () => made.stop(),
    });
    notifiers.set(db, made);
    notifier = made;
  }
  return notifier;
}

type Listener = (event: RoomEvent) => void;

/** How often rooms with waiters are checked for writes by other instances (ms). */
export const POLL_INTERVAL_MS = 250;
/** The same, when a cheap check of "did another process write?" comes first (ms). */
export const LOCAL_POLL_INTERVAL_MS = 100;

/** Fan-out of room events to in-process listeners, plus the cross-instance poller. */
export class Notifier {
  #listeners = new Map<string, Set<Listener>>();
  #revs = new Map<string, number>();
  #timer?: ReturnType<typeof setInterval>;
  #polling = false;
  #failing = false;
  /** Events published so far: a shared read is reused only while this stands still. */
  #published = 0;
  #reads = new Map<string, { published: number; result: Promise<unknown> }>();
  readonly #readRevs: (rooms: string[]) => Promise<Map<string, number>>;
  readonly #othersWrote?: () => Promise<boolean>;

  /**
   * `readRevs` answers the current `rev` of each room it is given; `othersWrote`, when
   * given, tells whether another process wrote since it was last asked.
   */
  constructor(
    readRevs: (rooms: string[]) => Promise<Map<string, number>>,
    othersWrote?: () => Promise<boolean>,
  ) {
    this.#readRevs = readRevs;
    this.#othersWrote = othersWrote;
  }

  /**
   * Calls `listener` with every event of `room` until the returned function is called.
   * `rev` is a revision of the room read before the caller's own check of the
   * database, so a write by another instance after that read is not missed.
   */
  subscribe(room: string, rev: number, listener: Listener): () => void {
    let set = this.#listeners.get(room);
    if (!set) {
      set = new Set();
      this.#listeners.set(room, set);
      if (!this.#revs.has(room)) this.#revs.set(room, rev);
    }
    set.add(listener);
    this.#timer ??= setInterval(
      () => this.#poll(),
      this.#othersWrote ? LOCAL_POLL_INTERVAL_MS : POLL_INTERVAL_MS,
    );
    return () => {
      set.delete(listener);
      if (set.size > 0) return;
      this.#listeners.delete(room);
      this.#revs.delete(room);
      if (this.#listeners.size === 0) this.stop();
    };
  }

  /** Delivers an event to every listener of the room. */
  publish(room: string, event: RoomEvent): void {
    this.#published++;
    for (const listener of this.#listeners.get(room) ?? []) listener(event);
  }

  /**
   * Runs `read`, or hands out the result of the same read (`key`) that started since the
   * last event was published: when one write wakes a thousand streams or long-polls
   * waiting at the same cursor, the database answers once, not a thousand times. A
   * result can miss only a write whose event is still to come, and that event wakes
   * its readers again.
   */
  shared<T>(key: string, read: () => Promise<T>): Promise<T> {
    const found = this.#reads.get(key);
    if (found?.published === this.#published) return found.result as Promise<T>;
    const entry = { published: this.#published, result: read() };
    this.#reads.set(key, entry);
    const forget = () =>
      setImmediate(() => {
        if (this.#reads.get(key) === entry) this.#reads.delete(key);
      });
    entry.result.then(forget, forget);
    return entry.result;
  }

  /** How many listeners are registered, in all rooms. */
  get size(): number {
    let n = 0;
    for (const set of this.#listeners.values()) n += set.size;
    return n;
  }

  /** Stops the poller (listeners stay registered). */
  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }

  async #poll(): Promise<void> {
    if (this.#polling || this.#listeners.size === 0) return;
    this.#polling = true;
    try {
      if (this.#othersWrote && !(await this.#othersWrote())) return;
      const revs = await this.#readRevs([...this.#listeners.keys()]);
      for (const room of this.#listeners.keys()) {
        const rev = revs.get(room);
        const known = this.#revs.get(room);
        if (known === undefined) continue;
        if (rev === undefined || rev < known) {
          // Deleted (and perhaps made again) on another instance.
          this.#revs.set(room, rev ?? 0);
          this.publish(room, { type: "access" });
        } else if (rev > known) {
          this.#revs.set(room, rev);
          this.publish(room, { type: "changed" });
        }
      }
      if (this.#failing) console.error("notify: polling for changes again");
      this.#failing = false;
    } catch (error) {
      // The database may be briefly unreachable; the next tick tries again. Said once
      // per outage, not at every tick.
      if (!this.#failing) {
        console.error("notify: cannot poll for changes:", error);
      }
      this.#failing = true;
    } finally {
      this.#polling = false;
    }
  }
}
