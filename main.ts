/**
 * sync: rooms, agents, an append-only message log and versioned shared state for AI
 * agents, over JSON/HTTP. This file is the route table; SQL is in `db.ts`, inputs in
 * `schemas.ts`, errors in `errors.ts`, markup in `view.tsx`, agent docs in `docs.ts`.
 */
import { Hono } from "hono";
import { bodyLimit } from "hono/body-limit";
import { createMiddleware } from "hono/factory";
import {
  createRoom,
  Db,
  deleteState,
  getAgent,
  getRoom,
  getState,
  insertAgent,
  insertMessage,
  listAgents,
  listMessages,
  listRooms,
  listState,
  ping,
  putState,
  recentMessages,
  type Room,
} from "./db.ts";
import { usage } from "./docs.ts";
import {
  ApiError,
  errorResponse,
  notFound,
  onError,
  roomNotFound,
} from "./errors.ts";
import {
  body,
  CreateRoom,
  DeleteState,
  GetState,
  Id,
  ListMessages,
  parse,
  PostMessage,
  PutState,
  query,
  RegisterAgent,
  ViewerQuery,
} from "./schemas.ts";
import { serve } from "./server.ts";
import { Landing, MissingRoom, RoomPage } from "./view.tsx";

/** Reads a non-negative integer setting from the environment, or its default. */
function envInt(name: string, fallback: number): number {
  const text = Deno.env.get(name);
  if (text === undefined || text === "") return fallback;
  if (!/^\d+$/.test(text)) {
    throw new Error(`${name} must be a non-negative integer, got "${text}"`);
  }
  return Number(text);
}

const DATABASE_URL = Deno.env.get("DATABASE_URL") || "file:sync.db";
const DATABASE_AUTH_TOKEN = Deno.env.get("DATABASE_AUTH_TOKEN") || undefined;
const PORT = envInt("PORT", 8000);
const HOST = Deno.env.get("HOST") || "0.0.0.0";
const MAX_BODY_BYTES = envInt("MAX_BODY_BYTES", 256 * 1024);

/** Messages the viewer renders on first load; later ones arrive live. */
const VIEWER_MESSAGES = 200;

/** What `createApp` needs: the database, and limits tests may lower. */
export type AppOptions = { db: Db; maxBodyBytes?: number };

/** Builds the service around one database. */
export function createApp(options: AppOptions) {
  const { db } = options;
  const maxBodyBytes = options.maxBodyBytes ?? MAX_BODY_BYTES;

  /** Loads the room named in the path into `c.var.room`, or answers 404. */
  const inRoom = createMiddleware<{ Variables: { room: Room } }>(
    async (c, next) => {
      const id = parse(Id, c.req.param("id"), "room id");
      const room = await getRoom(db, id);
      if (!room) throw roomNotFound(id);
      c.set("room", room);
      await next();
    },
  );

  return new Hono()
    .onError(onError)
    .notFound(notFound)
    .use(bodyLimit({
      maxSize: maxBodyBytes,
      onError: (c) =>
        errorResponse(
          c,
          new ApiError(
            413,
            "payload_too_large",
            `The request body is over ${maxBodyBytes} bytes`,
            {
              max_body_bytes: maxBodyBytes,
            },
          ),
        ),
    }))
    // ---- the viewer, and usage for agents ----
    .get("/", query(ViewerQuery), async (c) => {
      const { room: roomId } = c.req.valid("query");
      if (roomId !== undefined) {
        const room = await getRoom(db, roomId);
        if (!room) return c.html(MissingRoom({ id: roomId }), 404);
        const [agents, messages, state] = await Promise.all([
          listAgents(db, room.id),
          recentMessages(db, room.id, VIEWER_MESSAGES),
          listState(db, room.id),
        ]);
        return c.html(RoomPage({ room, agents, messages, state }));
      }
      const origin = new URL(c.req.url).origin;
      if (c.req.header("accept")?.includes("text/html")) {
        return c.html(Landing({ origin }));
      }
      return c.body(usage(origin), 200, {
        "content-type": "text/markdown; charset=utf-8",
      });
    })
    .get("/healthz", async (c) => {
      try {
        await ping(db);
      } catch (error) {
        console.error("healthz:", error);
        return errorResponse(
          c,
          new ApiError(
            503,
            "database_unavailable",
            "The database does not answer",
          ),
        );
      }
      return c.json({ ok: true });
    })
    // ---- rooms ----
    .post("/rooms", body(CreateRoom), async (c) => {
      const input = c.req.valid("json");
      const { room, created } = await createRoom(db, {
        id: input.id ?? crypto.randomUUID(),
        meta: input.meta ?? {},
      });
      return c.json(room, created ? 201 : 200);
    })
    .get("/rooms", async (c) => c.json(await listRooms(db)))
    .get("/rooms/:id", inRoom, (c) => c.json(c.var.room))
    // ---- agents ----
    .post("/rooms/:id/agents", inRoom, body(RegisterAgent), async (c) => {
      const input = c.req.valid("json");
      const room = c.var.room;
      const id = input.id ?? crypto.randomUUID();
      const agent = await insertAgent(db, {
        id,
        room_id: room.id,
        name: input.name,
        role: input.role ?? "agent",
        meta: input.meta ?? {},
      });
      if (!agent) {
        throw new ApiError(
          409,
          "agent_exists",
          `Agent "${id}" is already registered in room "${room.id}"; use it as it is or register another id`,
          { agent: await getAgent(db, room.id, id) },
        );
      }
      return c.json(agent, 201);
    })
    .get(
      "/rooms/:id/agents",
      inRoom,
      async (c) => c.json(await listAgents(db, c.var.room.id)),
    )
    // ---- messages ----
    .post("/rooms/:id/messages", inRoom, body(PostMessage), async (c) => {
      const input = c.req.valid("json");
      const message = await insertMessage(db, {
        room_id: c.var.room.id,
        from_agent: input.from ?? null,
        to_agent: input.to ?? null,
        kind: input.kind ?? "message",
        body: input.body,
      });
      return c.json(message, 201);
    })
    .get("/rooms/:id/messages", inRoom, query(ListMessages), async (c) => {
      const q = c.req.valid("query");
      return c.json(
        await listMessages(db, c.var.room.id, {
          after: q.after ?? 0,
          limit: q.limit ?? 100,
          kind: q.kind,
        }),
      );
    })
    // ---- state ----
    .put("/rooms/:id/state", inRoom, body(PutState), async (c) => {
      const input = c.req.valid("json");
      return c.json(
        await putState(db, {
          room_id: c.var.room.id,
          scope: input.scope ?? "_shared",
          key: input.key,
          value: input.value,
        }),
      );
    })
    .get("/rooms/:id/state", inRoom, query(GetState), async (c) => {
      const { scope, key } = c.req.valid("query");
      const room = c.var.room;
      if (key === undefined) return c.json(await listState(db, room.id, scope));
      const entry = await getState(db, room.id, scope ?? "_shared", key);
      if (!entry) {
        throw new ApiError(
          404,
          "key_not_found",
          `Key "${key}" does not exist in scope "${
            scope ?? "_shared"
          }" of room "${room.id}"`,
          { scope: scope ?? "_shared", key },
        );
      }
      return c.json(entry);
    })
    .delete("/rooms/:id/state", inRoom, body(DeleteState), async (c) => {
      const { scope, key } = c.req.valid("json");
      return c.json({
        deleted: await deleteState(db, c.var.room.id, scope ?? "_shared", key),
      });
    });
}

/** The app's type, for a typed client: `hc<AppType>(url)` from `hono/client`. */
export type AppType = ReturnType<typeof createApp>;

/** The database named by `DATABASE_URL`; opened on the first request. */
export const db = new Db({ url: DATABASE_URL, authToken: DATABASE_AUTH_TOKEN });

/** The service on that database (tests build their own with `createApp`). */
export const app = createApp({ db });

export default app.fetch;

if (import.meta.main) {
  try {
    await db.client();
  } catch (error) {
    console.error(
      `sync: cannot open the database at ${DATABASE_URL.split("?")[0]}: ${
        error instanceof Error ? error.message : error
      }`,
    );
    Deno.exit(1);
  }
  serve(app.fetch, { db, port: PORT, hostname: HOST });
}
