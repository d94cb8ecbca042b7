/**
 * Long-polls: a GET that finds nothing yet is held until a write wakes it (see
 * notify.ts) or its time is up, and an agent held that way shows as `waiting`.
 */
import {
  type Db,
  endWaiting,
  getAgent,
  getState,
  listMessagesJson,
  type MessageFilter,
  type MessagePage,
  nextLeaseExpiry,
  roomRev,
  type StateEntry,
  type Status,
  touchAgent,
} from "./db.ts";
import { type Notifier, notifierOf, type RoomEvent } from "./notify.ts";

/**
 * Long-poll: runs `check` until it returns a value, an event for which `wakes` is true
 * having arrived in between, or until `ms` pass or `signal` aborts; then returns the
 * last check's result. The listener is registered before the first check, so no write
 * can slip between a check and the wait. A check may name a time when the answer changes
 * with no write (a TTL or a lease running out) through `recheckAt`.
 */
export async function waitFor<T>(options: {
  notifier: Notifier;
  room: string;
  rev: number;
  ms: number;
  signal?: AbortSignal;
  check: (recheckAt: (time: number) => void) => Promise<T | undefined>;
  wakes: (event: RoomEvent) => boolean;
  /** Throws when the request may no longer read the room (run on `access` events). */
  verify?: () => Promise<void>;
}): Promise<T | undefined> {
  const { notifier, room, rev, signal, check, wakes, verify } = options;
  let recheckAccess = false;
  const deadline = Date.now() + options.ms;
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
    notifier: notifierOf(db),
    room: roomId,
    rev: await roomRev(db, roomId),
    ms: seconds * 1000,
    signal,
    check: async (recheckAt) => {
      // Waiters on the same filter share one read per event (notify.ts, `shared`);
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
    notifier: notifierOf(db),
    room: roomId,
    rev: await roomRev(db, roomId),
    ms: seconds * 1000,
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
