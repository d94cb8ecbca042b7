/**
 * The room as Server-Sent Events: `message` events carry the message id as the SSE
 * id (so `Last-Event-ID` resumes with no gap and no duplicate), `state`, `agent` and
 * `claim` events carry changes, and a comment every 15 s keeps proxies from timing out.
 */
import type { Context } from "hono";
import { streamSSE } from "hono/streaming";
import { type Db, listAgents, listMessages, listState, roomRev } from "./db.ts";
import type { RoomEvent } from "./notify.ts";

/** How often an idle stream sends a keepalive comment (ms). */
export const KEEPALIVE_MS = 15_000;

/** Messages read from the database per step while catching up. */
const PAGE = 500;

/** Streams room `roomId` from message id `after` until the client goes away or `stop` aborts. */
export function streamRoom(
  c: Context,
  db: Db,
  roomId: string,
  after: number,
  stop?: AbortSignal,
): Response {
  c.header("X-Accel-Buffering", "no");
  return streamSSE(c, async (stream) => {
    const queue: RoomEvent[] = [];
    let wake = Promise.withResolvers<void>();
    const unsubscribe = db.notifier.subscribe(
      roomId,
      await roomRev(db, roomId),
      (event) => {
        queue.push(event);
        wake.resolve();
      },
    );
    const keepalive = setInterval(() => {
      stream.write(": keepalive\n\n").catch(() => wake.resolve());
    }, KEEPALIVE_MS);
    stream.onAbort(() => wake.resolve());
    const ended = () =>
      stream.aborted || stream.closed || stop?.aborted === true;
    const onStop = () => wake.resolve();
    stop?.addEventListener("abort", onStop);

    let cursor = after;
    /** Sends every message above the cursor, in id order, from the database. */
    const catchUp = async () => {
      for (;;) {
        const page = await listMessages(db, roomId, {
          after: cursor,
          limit: PAGE,
          order: "asc",
        });
        for (const message of page) {
          await stream.writeSSE({
            event: "message",
            id: String(message.id),
            data: JSON.stringify(message),
          });
          cursor = message.id;
        }
        if (page.length < PAGE) return;
      }
    };
    // What was last sent of each key and agent, to send only changes after a
    // `changed` event (a write on another instance, which carries no details).
    // Stamps compare as text: the entry's time, then its version (a key rewritten after
    // its TTL ran out starts again at version 1, with a later time).
    const stamp = (entry: { updated_at: unknown; version: unknown }) =>
      `${entry.updated_at} ${String(entry.version).padStart(16, "0")}`;
    const versions = new Map<string, string>();
    const seen = new Map<string, string>();
    const sendState = async () => {
      const entries = await listState(db, roomId);
      const live = new Set<string>();
      for (const entry of entries) {
        const id = `${entry.scope}\n${entry.key}`;
        live.add(id);
        if (versions.get(id) === stamp(entry)) continue;
        versions.set(id, stamp(entry));
        await stream.writeSSE({ event: "state", data: JSON.stringify(entry) });
      }
      for (const id of versions.keys()) {
        if (live.has(id)) continue;
        versions.delete(id);
        const [scope, key] = id.split("\n");
        await stream.writeSSE({
          event: "state",
          data: JSON.stringify({ room_id: roomId, scope, key, deleted: true }),
        });
      }
    };
    const sendAgents = async () => {
      for (const agent of await listAgents(db, roomId)) {
        const signature = `${agent.status} ${agent.last_seen}`;
        if (seen.get(agent.id) === signature) continue;
        seen.set(agent.id, signature);
        await stream.writeSSE({ event: "agent", data: JSON.stringify(agent) });
      }
    };

    try {
      await catchUp();
      await sendAgents();
      await sendState();
      while (!ended()) {
        await wake.promise;
        wake = Promise.withResolvers<void>();
        for (const event of queue.splice(0)) {
          if (ended()) break;
          if (event.type === "message" || event.type === "changed") {
            await catchUp();
          }
          if (event.type === "changed") await sendAgents(), await sendState();
          if (event.type === "claim") {
            await stream.writeSSE({
              event: "claim",
              data: JSON.stringify(event.message),
            });
          }
          if (event.type === "agent") {
            // An event queued while the first snapshot was read may be older than it.
            const last = seen.get(event.agent.id)?.split(" ")[1] ?? "";
            if (String(event.agent.last_seen) < last) continue;
            seen.set(
              event.agent.id,
              `${event.agent.status} ${event.agent.last_seen}`,
            );
            await stream.writeSSE({
              event: "agent",
              data: JSON.stringify(event.agent),
            });
          }
          if (event.type === "state") {
            const id = `${event.scope}\n${event.key}`;
            // An event queued while the first snapshot was read may be older than it.
            const next = event.entry === null ? undefined : stamp(event.entry);
            if (next !== undefined && next <= (versions.get(id) ?? "")) {
              continue;
            }
            if (next === undefined) versions.delete(id);
            else versions.set(id, next);
            await stream.writeSSE({
              event: "state",
              data: JSON.stringify(
                event.entry ??
                  {
                    room_id: roomId,
                    scope: event.scope,
                    key: event.key,
                    deleted: true,
                  },
              ),
            });
          }
        }
      }
    } finally {
      clearInterval(keepalive);
      stop?.removeEventListener("abort", onStop);
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
