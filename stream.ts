/**
 * The room as Server-Sent Events. First the backlog and a snapshot: every message after
 * the cursor (`message` events, whose SSE id is the message id, so `Last-Event-ID`
 * resumes with no gap and no duplicate), then an `agent` event per agent, a `state`
 * event per live key and a `claim` event per held claim, then `ready`. After that, live
 * changes as they commit. A comment every 15 s keeps proxies from timing out.
 */
import type { Context } from "hono";
import { streamSSE } from "hono/streaming";
import {
  type Agent,
  changedClaims,
  type Db,
  listAgents,
  listMessages,
  listState,
  type Message,
  roomRev,
  type StateEntry,
  type TaskStatus,
} from "./db.ts";
import { notifierOf } from "./notify.ts";

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
  },
): Response {
  const { after, statuses, stop, verify } = options;
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
    }
  }, async (error, stream) => {
    console.error("stream:", error);
    await stream.writeSSE({
      event: "error",
      data: JSON.stringify({ error: "internal_error" }),
    });
  });
}
