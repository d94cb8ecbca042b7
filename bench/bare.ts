/**
 * The bare Hono app the benchmark compares the service with: the same runtime and
 * framework, no validation, no database, nothing stored. The routes mimic the service's
 * shapes so the same load works on both:
 *
 * - `POST /rooms/:id/messages` answers a small JSON object, and hands it to the room's
 *   held long-polls and streams;
 * - `GET /rooms/:id/messages` answers a 100-item JSON array shaped like a page of
 *   messages, or with `wait=S` holds the request until the room's next POST (`after`
 *   is ignored: nothing is stored);
 * - `GET /rooms/:id/stream` is Server-Sent Events: `ready`, then a `message` per POST.
 *
 * deno run --allow-net --allow-env bench/bare.ts   (PORT=0 picks a free port)
 */
import { Hono } from "hono";
import { type SSEStreamingApi, streamSSE } from "hono/streaming";
import type { Message as FullMessage } from "../db.ts";

const PORT = Number(Deno.env.get("PORT") ?? "0");
const HOST = Deno.env.get("HOST") ?? "127.0.0.1";

/** The seed's message: the service's without threads and tasks. */
type Message = Pick<
  FullMessage,
  "id" | "room_id" | "from_agent" | "to_agent" | "kind" | "body" | "created_at"
>;

let nextId = 0;
const waiters = new Map<string, Set<(message: Message) => void>>();
const streams = new Map<string, Set<SSEStreamingApi>>();

/** Adds `item` to the room's set, and answers how to take it out again. */
function join<T>(map: Map<string, Set<T>>, room: string, item: T): () => void {
  let set = map.get(room);
  if (!set) map.set(room, set = new Set());
  set.add(item);
  return () => set.delete(item);
}

const app = new Hono()
  .post("/rooms/:id/messages", async (c) => {
    const body = await c.req.json();
    const message: Message = {
      id: ++nextId,
      room_id: c.req.param("id"),
      from_agent: body.from ?? null,
      to_agent: body.to ?? null,
      kind: body.kind ?? "message",
      body: body.body,
      created_at: new Date().toISOString(),
    };
    const room = message.room_id;
    for (const wake of waiters.get(room) ?? []) wake(message);
    waiters.delete(room);
    for (const stream of streams.get(room) ?? []) {
      stream.writeSSE({
        event: "message",
        id: String(message.id),
        data: JSON.stringify(message),
      }).catch(() => {});
    }
    return c.json(message, 201);
  })
  .get("/rooms/:id/messages", async (c) => {
    const room = c.req.param("id");
    const wait = c.req.query("wait");
    if (wait !== undefined) {
      const woken = Promise.withResolvers<Message[]>();
      const leave = join(waiters, room, (m: Message) => woken.resolve([m]));
      const timer = setTimeout(() => woken.resolve([]), Number(wait) * 1000);
      const messages = await woken.promise;
      clearTimeout(timer);
      leave();
      return c.json(messages);
    }
    const after = Number(c.req.query("after") ?? "0");
    const now = Date.now();
    const page = Array.from({ length: 100 }, (_, i) => ({
      id: after + i + 1,
      room_id: room,
      from_agent: "seed",
      to_agent: null,
      kind: "note",
      body: { n: after + i + 1, text: "a pre-populated message" },
      created_at: new Date(now + i).toISOString(),
      reply_to: null,
      claimed_by: null,
      claimed_at: null,
      lease_expires_at: null,
    }));
    return c.json(page);
  })
  .get("/healthz", (c) => c.json({ ok: true }))
  .get("/rooms/:id/stream", (c) =>
    streamSSE(c, async (stream) => {
      const leave = join(streams, c.req.param("id"), stream);
      const closed = Promise.withResolvers<void>();
      stream.onAbort(() => closed.resolve());
      await stream.writeSSE({ event: "ready", data: "{}" });
      await closed.promise;
      leave();
    }));

Deno.serve({
  port: PORT,
  hostname: HOST,
  onListen: ({ hostname, port }) =>
    console.log(
      `bare listening on http://${hostname}:${port} (pid ${Deno.pid})`,
    ),
}, app.fetch);
