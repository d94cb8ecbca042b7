/**
 * Everything that waits on a room, together: the notifier, which tells waiters of
 * each change right after it commits (same process: no delay) and polls each watched
 * room's `rev` a few times a second for writes by other instances sharing the
 * database (on a local file it first asks SQLite whether another connection wrote at
 * all, `PRAGMA data_version`, so it costs next to nothing and never mistakes this
 * process's own writes for another's); long-polls, held until a write wakes them or
 * their time is up, with the agent shown as `waiting`; and the room's event stream
 * (Server-Sent Events): the backlog after the cursor (`message` events whose SSE id is
 * the message id, so `Last-Event-ID` resumes with no gap and no duplicate), a snapshot
 * (an `agent` event per agent, a `state` event per live key, a `claim` event per held
 * claim), `ready`, then live changes as they commit, with a comment every 15 s so
 * proxies do not time out.
 */
import { setImmediate } from "node:timers";
import type { Context } from "hono";
import { streamSSE } from "hono/streaming";
import {
  type Agent,
  type Change,
  changedClaims,
  endWaiting,
  getAgent,
  getState,
  listAgents,
  listMessages,
  listMessagesJson,
  listState,
  type Message,
  type MessageFilter,
  type MessagePage,
  nextLeaseExpiry,
  roomRev,
  roomRevs,
  type StateEntry,
  type Status,
  type TaskStatus,
  touchAgent,
  watch,
} from "./db.ts";
import { type Db } from "./driver.ts";

// ---- the notifier ----

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
    watch(db, {
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

// ---- long-polls ----

/**
 * Long-poll: runs `check` until it returns a value, an event for which `wakes` is true
 * having arrived in between, or until `ms` pass or `signal` aborts; then returns the
 * last check's result. The listener is registered before the first check, so no write
 * can slip between a check and the wait. A check may name a time when the answer changes
 * with no write (a TTL or a lease running out) through `recheckAt`.
 */
export async function waitFor<T>(options: {
  db: Db;
  room: string;
  seconds: number;
  signal?: AbortSignal;
  check: (recheckAt: (time: number) => void) => Promise<T | undefined>;
  wakes: (event: RoomEvent) => boolean;
  /** Throws when the request may no longer read the room (run on `access` events). */
  verify?: () => Promise<void>;
}): Promise<T | undefined> {
  const { db, room, signal, check, wakes, verify } = options;
  const notifier = notifierOf(db);
  // Read before the first check: a write by another instance after it is not missed.
  const rev = await roomRev(db, room);
  let recheckAccess = false;
  const deadline = Date.now() + options.seconds * 1000;
  let woke = Promise.withResolvers<void>();
  const unsubscribe = notifier.subscribe(room, rev, (event) => {
    if (event.type === "access") recheckAccess = true;
    if (event.type === "access" || wakes(event)) woke.resolve();
  });
  const abort = () => woke.resolve();
  signal?.addEventListener("abort", abort, { once: true });
  try {
    for (;;) {
      // A fresh promise before each check: an event during the check resolves it.
      woke = Promise.withResolvers<void>();
      let until = deadline;
      const result = await check((time) => until = Math.min(until, time));
      if (result !== undefined || Date.now() >= deadline || signal?.aborted) {
        return result;
      }
      const timer = setTimeout(abort, Math.max(0, until - Date.now()));
      await woke.promise;
      clearTimeout(timer);
      if (recheckAccess) {
        recheckAccess = false;
        await verify?.();
      }
      if (Date.now() >= deadline || signal?.aborted) {
        return await check(() => {});
      }
    }
  } finally {
    signal?.removeEventListener("abort", abort);
    unsubscribe();
  }
}

/** Could this event add a message that the filter selects? (The database decides.) */
function mayMatch(filter: MessageFilter, event: RoomEvent): boolean {
  if (event.type === "changed") return true;
  // A claim, release or completion changes a message's status.
  if (event.type === "claim") return filter.statuses !== undefined;
  if (event.type !== "message") return false;
  const m = event.message;
  if (filter.kinds !== undefined && !filter.kinds.includes(m.kind)) {
    return false;
  }
  if (filter.from !== undefined && m.from_agent !== filter.from) return false;
  if (filter.to !== undefined && m.to_agent !== filter.to) return false;
  if (
    filter.for !== undefined && m.to_agent !== null && m.to_agent !== filter.for
  ) return false;
  if (
    filter.thread !== undefined && m.id !== filter.thread && m.reply_to === null
  ) return false;
  return true;
}

/**
 * Messages matching the filter, as JSON text; with `seconds`, held until there are
 * some.
 */
export async function waitForMessages(
  db: Db,
  roomId: string,
  filter: MessageFilter,
  seconds: number,
  signal?: AbortSignal,
  verify?: () => Promise<void>,
): Promise<MessagePage> {
  if (seconds <= 0) return listMessagesJson(db, roomId, filter);
  const found = await waitFor({
    db,
    room: roomId,
    seconds,
    signal,
    check: async (recheckAt) => {
      // Waiters on the same filter share one read per event (`Notifier.shared`);
      // not on a status, which time alone changes (a lease running out).
      const page = filter.statuses === undefined
        ? await notifierOf(db).shared(
          `messages ${roomId} ${JSON.stringify(filter)}`,
          () => listMessagesJson(db, roomId, filter),
        )
        : await listMessagesJson(db, roomId, filter);
      if (page.count > 0) return page;
      if (
        filter.statuses?.includes("open") || filter.statuses?.includes("dead")
      ) {
        // A lease running out makes a held message open (or dead) without any
        // write: look again when the next one lapses after this page was read.
        const expiry = await nextLeaseExpiry(
          db,
          roomId,
          filter.after ?? 0,
          page.now,
        );
        if (expiry !== undefined) recheckAt(expiry + 1);
      }
      return undefined;
    },
    wakes: (event) => mayMatch(filter, event),
    verify,
  });
  return found ?? { count: 0, json: "[]", now: Date.now() };
}

/**
 * One state entry once its version is above `afterVersion`, or once it is gone (when
 * `afterVersion` > 0); after `seconds` without either, the entry as it is.
 */
export async function waitForState(
  db: Db,
  roomId: string,
  scope: string,
  key: string,
  afterVersion: number,
  seconds: number,
  signal?: AbortSignal,
  verify?: () => Promise<void>,
): Promise<StateEntry | null> {
  const changed = async (recheckAt: (time: number) => void) => {
    const entry = await getState(db, roomId, scope, key);
    if (entry === null) return afterVersion > 0 ? { entry } : undefined;
    // An expiring TTL deletes the entry without any write.
    if (entry.expires_at !== null) recheckAt(Date.parse(entry.expires_at) + 1);
    return entry.version > afterVersion ? { entry } : undefined;
  };
  const found = await waitFor({
    db,
    room: roomId,
    seconds,
    signal,
    check: changed,
    wakes: (event) =>
      event.type === "changed" ||
      (event.type === "state" && event.scope === scope && event.key === key),
    verify,
  });
  return found ? found.entry : await getState(db, roomId, scope, key);
}

type Spell = {
  count: number;
  previous: Status;
  /** Whether the agent is registered (and now shown as waiting). */
  shown: Promise<boolean>;
  /** Set when the last wait ended: the status is being put back. */
  ending?: Promise<void>;
};
const spells = new WeakMap<Db, Map<string, Spell>>();

/**
 * Runs `fn` with the agent shown as `waiting` (when it is registered), then puts back
 * the status it had, unless it sent another meanwhile. Overlapping waits of one agent
 * share one spell; a wait that starts while a spell is ending waits for it to end, so
 * the status saved is never `waiting` itself.
 */
export async function whileWaiting<T>(
  db: Db,
  roomId: string,
  agentId: string | undefined,
  fn: () => Promise<T>,
): Promise<T> {
  if (agentId === undefined) return fn();
  let room = spells.get(db);
  if (!room) spells.set(db, room = new Map());
  const id = `${roomId}\n${agentId}`;
  let spell = room.get(id);
  while (spell?.ending) {
    await spell.ending;
    spell = room.get(id);
  }
  if (!spell) {
    const created: Spell = {
      count: 0,
      previous: "active",
      shown: Promise.resolve(false),
    };
    created.shown = (async () => {
      const agent = await getAgent(db, roomId, agentId);
      if (!agent) return false;
      if (agent.status !== "waiting") created.previous = agent.status;
      await touchAgent(db, roomId, agentId, "waiting");
      return true;
    })();
    room.set(id, spell = created);
  }
  spell.count++;
  try {
    await spell.shown;
    return await fn();
  } finally {
    if (--spell.count === 0) {
      const ending = spell;
      ending.ending = (async () => {
        try {
          if (await ending.shown) {
            await endWaiting(db, roomId, agentId, ending.previous);
          }
        } catch (error) {
          console.error("waiting: cannot restore presence:", error);
        } finally {
          room.delete(id);
        }
      })();
      await ending.ending;
    }
  }
}

// ---- the event stream ----

/** How often an idle stream sends a keepalive comment (ms). */
export const KEEPALIVE_MS = 15_000;

/** Messages read from the database per step while catching up. */
const PAGE = 500;

/**
 * Work a stream owes its client. Events coalesce here (the latest per key, agent and
 * message), so a client that reads slowly costs bounded memory, never a queue of
 * every event since it stopped reading.
 */
type Pending = {
  messages: boolean;
  /** Something changed on another instance: re-read what the events would have said. */
  changed: boolean;
  /** Who may read the room changed: check this stream's access again. */
  access: boolean;
  claims: Map<number, Message>;
  agents: Map<string, Agent>;
  state: Map<string, { scope: string; key: string; entry: StateEntry | null }>;
};

/**
 * Streams room `roomId` from message id `after` (only messages in `statuses`, when
 * given) until the client goes away or `stop` aborts. `claim` events, which carry each
 * change of a message's status, all come: they tell a watcher a message left the
 * statuses it asked for.
 */
export function streamRoom(
  c: Context,
  db: Db,
  roomId: string,
  options: {
    after: number;
    statuses?: TaskStatus[];
    stop?: AbortSignal;
    verify?: () => Promise<void>;
    /** Runs once the stream has ended. */
    onEnd?: () => void;
  },
): Response {
  const { after, statuses, stop, verify, onEnd } = options;
  c.header("X-Accel-Buffering", "no");
  return streamSSE(c, async (stream) => {
    const pending: Pending = {
      messages: false,
      changed: false,
      access: false,
      claims: new Map(),
      agents: new Map(),
      state: new Map(),
    };
    let wake = Promise.withResolvers<void>();
    const rev = await roomRev(db, roomId);
    const unsubscribe = notifierOf(db).subscribe(roomId, rev, (event) => {
      if (event.type === "message") pending.messages = true;
      else if (event.type === "changed") pending.changed = true;
      else if (event.type === "access") pending.access = true;
      else if (event.type === "claim") {
        pending.claims.set(event.message.id, event.message);
      } else if (event.type === "agent") {
        pending.agents.set(event.agent.id, event.agent);
      } else pending.state.set(`${event.scope}\n${event.key}`, event);
      wake.resolve();
    });
    const ended = () =>
      stream.aborted || stream.closed || stop?.aborted === true;
    const end = () => {
      wake.resolve();
      // A write blocked on a client that stopped reading must not hold the drain.
      if (stop?.aborted) stream.abort();
    };
    stream.onAbort(() => wake.resolve());
    stop?.addEventListener("abort", end);
    const keepalive = setInterval(() => {
      stream.write(": keepalive\n\n").catch(() => wake.resolve());
    }, KEEPALIVE_MS);

    const send = (event: string, data: unknown, id?: string) =>
      stream.writeSSE({ event, data: JSON.stringify(data), id });

    let cursor = after;
    /** Sends every message above the cursor, in id order, from the database. */
    const catchUp = async () => {
      for (;;) {
        const after = cursor;
        const page = await notifierOf(db).shared(
          `stream ${roomId} ${after} ${statuses}`,
          () =>
            listMessages(db, roomId, {
              after,
              limit: PAGE,
              order: "asc",
              statuses,
            }),
        );
        for (const message of page) {
          await send("message", message, String(message.id));
          cursor = message.id;
        }
        if (page.length < PAGE) return;
      }
    };

    // What was last sent of each key and agent. Stamps compare as text: the time, then
    // the version (a key rewritten after its TTL ran out starts again at version 1).
    const stamp = (entry: StateEntry) =>
      `${entry.updated_at} ${String(entry.version).padStart(16, "0")}`;
    const sentState = new Map<string, string>();
    const sentAgents = new Map<string, string>();
    let claimRev = 0;

    const sendStateEntry = async (
      id: string,
      scope: string,
      key: string,
      entry: StateEntry | null,
    ) => {
      if (entry === null) {
        if (!sentState.delete(id)) return;
        return send("state", { room_id: roomId, scope, key, deleted: true });
      }
      // An event from before the snapshot was read may be older than what was sent.
      if (stamp(entry) <= (sentState.get(id) ?? "")) return;
      sentState.set(id, stamp(entry));
      await send("state", entry);
    };
    const sendAgent = async (agent: Agent) => {
      if (agent.last_seen < (sentAgents.get(agent.id)?.slice(0, 24) ?? "")) {
        return;
      }
      const signature = `${agent.last_seen} ${agent.status}`;
      if (sentAgents.get(agent.id) === signature) return;
      sentAgents.set(agent.id, signature);
      await send("agent", agent);
    };
    /** Re-reads agents, state and claims: the snapshot, and changes made elsewhere. */
    const resync = async () => {
      for (const agent of await listAgents(db, roomId)) await sendAgent(agent);
      const live = new Set<string>();
      for (const entry of await listState(db, roomId)) {
        const id = `${entry.scope}\n${entry.key}`;
        live.add(id);
        await sendStateEntry(id, entry.scope, entry.key, entry);
      }
      for (const id of [...sentState.keys()]) {
        if (live.has(id)) continue;
        const [scope, key] = id.split("\n");
        await sendStateEntry(id, scope, key, null);
      }
      const claims = await changedClaims(db, roomId, claimRev);
      claimRev = claims.rev;
      for (const message of claims.messages) await send("claim", message);
    };

    try {
      await catchUp();
      await resync();
      await send("ready", { room_id: roomId, after: cursor });
      while (!ended()) {
        await wake.promise;
        wake = Promise.withResolvers<void>();
        if (pending.access || pending.changed) {
          // A deleted room, a rotated token, or a change made elsewhere (which may be
          // either): a stream that may no longer read the room ends here.
          pending.access = false;
          try {
            await verify?.();
          } catch {
            await send("end", { room_id: roomId, reason: "access" });
            break;
          }
        }
        if (pending.messages || pending.changed) {
          pending.messages = false;
          await catchUp();
        }
        if (pending.changed) {
          pending.changed = false;
          await resync();
        }
        for (const [id, message] of pending.claims) {
          pending.claims.delete(id);
          await send("claim", message);
        }
        for (const [id, agent] of pending.agents) {
          pending.agents.delete(id);
          await sendAgent(agent);
        }
        for (const [id, { scope, key, entry }] of pending.state) {
          pending.state.delete(id);
          await sendStateEntry(id, scope, key, entry);
        }
      }
    } finally {
      clearInterval(keepalive);
      stop?.removeEventListener("abort", end);
      unsubscribe();
      onEnd?.();
    }
  }, async (error, stream) => {
    console.error("stream:", error);
    await stream.writeSSE({
      event: "error",
      data: JSON.stringify({ error: "internal_error" }),
    });
  });
}
