/**
 * sync: rooms, agents, an append-only message log and versioned shared state for AI
 * agents, over JSON/HTTP. This file is the route table; SQL is in `db.ts`, inputs in
 * `schemas.ts`, errors in `errors.ts`, markup in `view.tsx`, agent docs in `docs.ts`.
 */
import type { Context, TypedResponse } from "hono";
import { api, later } from "./api.ts";
import { bodyLimit } from "hono/body-limit";
import { every } from "hono/combine";
import { cors } from "hono/cors";
import { NONCE, secureHeaders } from "hono/secure-headers";
import {
  applyBatch,
  claimMessage,
  completeMessage,
  createRoom,
  deleteRoom,
  earliestId,
  getRoom,
  IDEMPOTENCY_TTL_MS,
  importRoom,
  insertMessage,
  listAgents,
  listMessages,
  listRooms,
  listState,
  type MessageFilter,
  type NewMessage,
  recentMessages,
  releaseMessage,
  stateAt,
  type StateEntry,
  stateHistory,
  type TaskStatus,
  touchAgent,
  writeState,
} from "./db.ts";
import { CannotOpen, Db, ping } from "./driver.ts";
import {
  actingAs,
  bearer,
  type Caller,
  hashToken,
  isAdmin,
  mayAdminister,
  mayWriteScope,
  newToken,
  registerAgent,
  roomAccess,
  type RoomEnv,
} from "./auth.ts";
import { skill, usage } from "./docs.ts";
import {
  type RateLimit,
  RateLimiter,
  WaitCaps,
  type WaitLimit,
} from "./limits.ts";
import {
  agentNotFound,
  alreadyClaimed,
  alreadyCompleted,
  ApiError,
  batchRefused,
  errorResponse,
  keyNotFound,
  messageNotFound,
  notClaimable,
  notFound,
  notHolder,
  onError,
  originOf,
  refused,
  replyNotFound,
} from "./errors.ts";
import {
  bodyWithin,
  MAX_BATCH,
  MAX_JSON_DEPTH,
  MAX_MESSAGES_PER_READ,
  MAX_WAIT_SECONDS,
  type PostMessage,
  SHARED,
} from "./schemas.ts";
import * as routes from "./routes.ts";
import { once } from "./idempotency.ts";
import { serving } from "./listener.ts";
import { type Retention, sweeper } from "./retention.ts";
import { openapi } from "./openapi.ts";
import {
  streamRoom,
  waitForMessages,
  waitForState,
  whileWaiting,
} from "./waiting.ts";

/** Reads a non-negative integer setting from the environment, or its default. */
export function envInt(name: string, fallback: number): number {
  const text = Deno.env.get(name);
  if (text === undefined || text === "") return fallback;
  if (!/^\d+$/.test(text)) {
    throw new Error(`${name} must be a non-negative integer, got "${text}"`);
  }
  return Number(text);
}

const DATABASE_URL = Deno.env.get("DATABASE_URL") || "file:sync.db";
const DATABASE_AUTH_TOKEN = Deno.env.get("DATABASE_AUTH_TOKEN") || undefined;
const MAX_BODY_BYTES = envInt("MAX_BODY_BYTES", 256 * 1024);
/** The most bytes an import (a whole room, `POST /rooms/import`) may take. */
const MAX_IMPORT_BYTES = envInt("MAX_IMPORT_BYTES", 8 * 1024 * 1024);
/** The most bytes a page of messages (a read, context, the viewer's first load) takes. */
const MAX_RESPONSE_BYTES = envInt("MAX_RESPONSE_BYTES", 4 * 1024 * 1024);
const RATE_LIMIT = envInt("RATE_LIMIT", 100);
const RATE_BURST = envInt("RATE_BURST", 2 * RATE_LIMIT);
const RATE: RateLimit | null = RATE_LIMIT === 0
  ? null
  : { per_second: RATE_LIMIT, burst: RATE_BURST };
/** One address over all its tokens: ten clients' worth unless said otherwise. */
const RATE_PER_ADDRESS: RateLimit = {
  per_second: envInt("RATE_LIMIT_PER_ADDRESS", 10 * RATE_LIMIT),
  burst: envInt("RATE_BURST_PER_ADDRESS", 10 * RATE_BURST),
};

/** What retention keeps (0: everything). */
const RETAIN: Retention = {
  messages: envInt("RETAIN_MESSAGES", 0),
  days: envInt("RETAIN_DAYS", 0),
};

/** Long-polls and streams one client, and one address, may hold at once. */
const MAX_WAITS: WaitLimit = {
  per_client: envInt("MAX_WAITS_PER_CLIENT", 100),
  per_address: envInt("MAX_WAITS_PER_ADDRESS", 1000),
};

/**
 * Seconds a request's headers (server.ts) or body may take before the connection is
 * closed.
 */
export const STALL_TIMEOUT_SECONDS = envInt("STALL_TIMEOUT_SECONDS", 10);

/** Open rooms the landing page lists (the oldest first, as `GET /rooms` pages). */
const LANDING_ROOMS = 100;

/** Messages the viewer renders on first load; later ones arrive live. */
const VIEWER_MESSAGES = 200;

/**
 * What `createApp` needs: the database; `shutdown`, which ends long-polls and streams
 * when the process drains; and limits tests may lower.
 */
export type AppOptions = {
  db: Db;
  shutdown?: AbortSignal;
  maxBodyBytes?: number;
  /** The per-client rate limit; null turns it off (default: RATE_LIMIT, RATE_BURST). */
  rateLimit?: RateLimit | null;
  /** The ceiling of one address (default: RATE_LIMIT_PER_ADDRESS, or 10× the limit). */
  addressLimit?: RateLimit;
  /** Proxies before the service (default: TRUST_PROXY). */
  trustProxy?: number;
  /** Held requests per client and per address (default: MAX_WAITS_PER_CLIENT, …). */
  maxWaits?: WaitLimit;
  /** The byte cap of a page of messages (default: MAX_RESPONSE_BYTES). */
  maxResponseBytes?: number;
  /** What retention keeps (default: RETAIN_MESSAGES, RETAIN_DAYS). */
  retain?: Retention;
  /** The server admin token (default: SYNC_ADMIN_TOKEN). */
  adminToken?: string;
  /** Milliseconds a request body may take to arrive (default: STALL_TIMEOUT_SECONDS). */
  stallMs?: number;
  /** The size limit of an import (default: MAX_IMPORT_BYTES). */
  maxImportBytes?: number;
};

/**
 * The viewer's headers: its one inline script runs by nonce, nothing else may; no
 * sniffing, no referrer (a locked room's URL carries its token in the fragment).
 */
const viewerHeaders = secureHeaders({
  contentSecurityPolicy: {
    defaultSrc: ["'none'"],
    scriptSrc: [NONCE],
    styleSrc: [NONCE],
    connectSrc: ["'self'"],
    imgSrc: ["data:"],
    formAction: ["'self'"],
    baseUri: ["'none'"],
    frameAncestors: ["'none'"],
  },
  referrerPolicy: "no-referrer",
  xContentTypeOptions: "nosniff",
});

/** Builds the service around one database. */
export function createApp(options: AppOptions) {
  const { db, shutdown, adminToken } = options;
  const limit = options.rateLimit === undefined ? RATE : options.rateLimit;
  const limiter = limit
    ? new RateLimiter(limit, {
      perAddress: options.addressLimit ??
        (options.rateLimit === undefined ? RATE_PER_ADDRESS : undefined),
      trustProxy: options.trustProxy,
    })
    : undefined;
  const waits = new WaitCaps(options.maxWaits ?? MAX_WAITS, options.trustProxy);
  /** Counts a held request of the caller, or refuses it; answers how to let go. */
  const hold = (c: Context, caller: Caller, room: string) =>
    waits.hold(
      c,
      caller.kind === "anonymous"
        ? null
        : caller.kind === "admin"
        ? "admin"
        : `${caller.kind} ${room} ${caller.kind === "agent" ? caller.id : ""}`,
    );
  /** Aborts when the client goes away or the process drains. */
  const ending = (c: Context) =>
    shutdown ? AbortSignal.any([c.req.raw.signal, shutdown]) : c.req.raw.signal;
  const maxBodyBytes = options.maxBodyBytes ?? MAX_BODY_BYTES;
  const stallMs = options.stallMs ?? STALL_TIMEOUT_SECONDS * 1000;
  const maxImportBytes = options.maxImportBytes ?? MAX_IMPORT_BYTES;
  let importing = false;
  /** Bodies of at most `max` bytes, arrived within the stall timeout. */
  const sized = (max: number, setting: string) =>
    every(
      bodyWithin(stallMs, max),
      bodyLimit({
        maxSize: max,
        onError: (c) =>
          errorResponse(
            c,
            new ApiError(
              "payload_too_large",
              `The request body is over ${max} bytes`,
              { [setting.toLowerCase()]: max },
            ),
          ),
      }),
    );
  const bodies = sized(maxBodyBytes, "MAX_BODY_BYTES");
  const importBodies = sized(maxImportBytes, "MAX_IMPORT_BYTES");
  const maxResponseBytes = options.maxResponseBytes ?? MAX_RESPONSE_BYTES;
  const retain = options.retain ?? RETAIN;
  const startSweeping = sweeper(db, retain);
  /**
   * 410 when retention dropped messages this cursor has not seen (after > 0 below the
   * highest id dropped): never a silent jump over them.
   */
  const unexpired = async (c: Context<RoomEnv>, after: number | undefined) => {
    if (!after || after >= c.var.dropped) return;
    const earliest = await earliestId(db, c.var.room.id);
    throw new ApiError(
      "cursor_expired",
      `Messages after ${after} up to ${c.var.dropped} were dropped by retention; read from ${earliest} on`,
      { earliest_id: earliest, dropped_through: c.var.dropped },
    );
  };

  const { admit, inRoom, readable, writer } = roomAccess(
    db,
    adminToken,
    limiter && ((token) => limiter.trust(token)),
  );

  /**
   * A long-poll's wait (`wait`, given when to stop and how to check access again),
   * with `agent` shown as `waiting` and the caller's held requests counted. What it
   * needs of `c` is taken now and `c` is not kept: the answer comes `later` (api.ts),
   * and a held long-poll keeps only its wait.
   */
  const held = <T>(
    c: Context<RoomEnv>,
    agent: string | undefined,
    wait: (signal: AbortSignal, verify: () => Promise<void>) => Promise<T>,
  ): Promise<T> => {
    const [roomId, signal, verify] = [c.var.room.id, ending(c), readable(c)];
    const waiting = presenceOf(c.var.caller, agent);
    // Counted last: nothing may throw between holding and the release below.
    const release = hold(c, c.var.caller, roomId);
    return whileWaiting(db, roomId, waiting, () => wait(signal, verify))
      .finally(release);
  };

  /** The usage docs, naming this request's host. */
  const docs = async (c: Context) => {
    const origin = new URL(c.req.url).origin;
    return usage(origin, await openapi(app, origin));
  };

  /** `/mcp`: each tool call is a REST request to this app, made in-process. */
  // The MCP SDK loads with the first MCP request: agents on REST never wait for it.
  const mcp = async (c: Context) =>
    (await import("./mcp.ts")).handleMcp(
      c.req.raw,
      await c.req.text(),
      // The /mcp request was counted by the rate limit already; its tool calls are not.
      async (request) =>
        await app.fetch(request, {
          ...(c.env as object | undefined),
          internal: true,
        }),
    );

  // The room routes' middleware (inRoom) sets these variables; no other route reads them.
  const app = api<RoomEnv>();
  app.onError(onError)
    .notFound(notFound)
    // Tokens travel in headers, never cookies, so any origin may call the JSON API.
    .use(cors({
      origin: "*",
      allowHeaders: [
        "Authorization",
        "Content-Type",
        "Idempotency-Key",
        "Last-Event-ID",
      ],
      exposeHeaders: ["Retry-After", "Idempotent-Replayed"],
    }))
    // The checks of every request CORS lets through (it answers preflights itself), in
    // one middleware (a held request keeps a frame per middleware): a Host header that
    // a URL can hold (`x:99999` would trip every route), the rate limit, retention's
    // sweeper (started by the first request: importing the app starts nothing), and a
    // body within its size and time limits (an import has a limit of its own).
    .use((c, next) => {
      if (originOf(c.req.url) === "") {
        throw new ApiError(
          "invalid_request",
          "The Host header is malformed: send a host name or address, and a port from 1 to 65535",
          { field: "Host" },
        );
      }
      startSweeping();
      const sized = c.req.raw.body === null
        ? next
        : () =>
          (c.req.path === "/rooms/import" ? importBodies : bodies)(c, next);
      const counted = limiter?.count(c);
      return counted ? counted.then(sized) : sized();
    });
  app.use("/", viewerHeaders);
  return app
    // ---- the viewer, and usage for agents ----
    .openapi(routes.getIndex, async (c) => {
      const { room: roomId } = c.req.valid("query");
      // The pages load with the first that is asked for (docs/PERFORMANCE.md).
      const { docsHtml, Landing, MissingRoom, RoomPage } = await import(
        "./view.tsx"
      );
      const nonce = c.get("secureHeadersNonce") ?? "";
      if (roomId !== undefined) {
        const room = await getRoom(db, roomId);
        if (!room) return c.html(MissingRoom({ id: roomId, nonce }), 404);
        // A locked room's token is in the URL fragment, which never reaches the
        // server: the page loads the room itself, with the token, from the API.
        if (room.locked) return c.html(RoomPage({ room, nonce }));
        const [agents, messages, state] = await Promise.all([
          listAgents(db, room.id),
          recentMessages(
            db,
            room.id,
            VIEWER_MESSAGES,
            undefined,
            maxResponseBytes,
          ),
          listState(db, room.id),
        ]);
        return c.html(
          RoomPage({ room, nonce, data: { agents, messages, state } }),
        );
      }
      if (c.req.header("accept")?.includes("text/html")) {
        const rooms = await listRooms(db, false, { limit: LANDING_ROOMS + 1 });
        return c.html(Landing({
          docs: await docsHtml(await docs(c)),
          rooms: (rooms ?? []).slice(0, LANDING_ROOMS),
          more: (rooms ?? []).length > LANDING_ROOMS,
          nonce,
        }));
      }
      return markdown(c, await docs(c));
    })
    // ---- MCP: the same API as tools, each call a REST request made in-process ----
    .openapi(routes.postMcp, (c) => mcp(c))
    // The same docs for every kind of reader: agents, skill loaders, LLM tools.
    .openapi(routes.getReadme, async (c) => markdown(c, await docs(c)))
    .openapi(routes.getViewerScript, async (c) => {
      c.header("x-content-type-options", "nosniff");
      c.header("cache-control", "no-cache");
      return c.body(await viewerScript(), 200, {
        "content-type": "text/javascript; charset=utf-8",
      });
    })
    .openapi(routes.getLlmsTxt, async (c) => markdown(c, await docs(c)))
    .openapi(routes.getSkill, async (c) => {
      const origin = new URL(c.req.url).origin;
      return markdown(c, skill(origin, await openapi(app, origin)));
    })
    .openapi(
      routes.getOpenApi,
      async (c) => c.json(await openapi(app, new URL(c.req.url).origin), 200),
    )
    .openapi(routes.getHealth, async (c) => {
      try {
        await ping(db);
      } catch (error) {
        // A file that cannot be opened was said once already (driver.ts).
        if (!(error instanceof Error && error.cause instanceof CannotOpen)) {
          console.error("healthz:", error);
        }
        throw new ApiError(
          "database_unavailable",
          "The database does not answer",
        );
      }
      return c.json({ ok: true }, 200);
    })
    .openapi(routes.getLimits, (c) =>
      c.json({
        max_body_bytes: maxBodyBytes,
        max_import_bytes: maxImportBytes,
        max_connections: serving.maxConnections,
        stall_timeout_seconds: stallMs / 1000,
        rate_limit: limit,
        rate_limit_per_address: limiter?.perAddress ?? null,
        max_waits_per_client: waits.limit.per_client,
        max_waits_per_address: waits.limit.per_address,
        trust_proxy: limiter?.trustProxy ?? null,
        max_batch_operations: MAX_BATCH,
        max_wait_seconds: MAX_WAIT_SECONDS,
        max_json_depth: MAX_JSON_DEPTH,
        max_messages_per_read: MAX_MESSAGES_PER_READ,
        max_response_bytes: maxResponseBytes,
        retain_messages: retain.messages || null,
        retain_days: retain.days || null,
        idempotency_ttl_seconds: IDEMPOTENCY_TTL_MS / 1000,
      }, 200))
    // ---- rooms ----
    .openapi(routes.createRoom, async (c) => {
      const input = c.req.valid("json");
      const token = newToken("room");
      const viewToken = newToken("view");
      const { room, created } = await createRoom(db, {
        id: input.id ?? crypto.randomUUID(),
        meta: input.meta === undefined ? {} : input.meta,
        locked: input.locked ?? false,
        token_hash: await hashToken(token),
        view_token_hash: await hashToken(viewToken),
      });
      // The tokens are shown once, to the creator; joining an existing room never shows
      // them, and joining a locked one needs a token of it, as reading it does.
      if (!created) {
        if (room.locked) await admit(room.id, c.req.header("authorization"));
        return c.json(room, 200);
      }
      return c.json({ ...room, token, view_token: viewToken }, 201);
    })
    .openapi(routes.importRoom, async (c) => {
      const { id } = c.req.valid("query");
      // A whole room is checked in memory and written in one transaction: one at a
      // time, so a few big imports cannot take the memory or the writer together.
      if (importing) {
        c.header("Retry-After", "1");
        throw new ApiError(
          "rate_limited",
          "Another import is running; imports run one at a time: retry in a moment",
        );
      }
      importing = true;
      try {
        const token = newToken("room");
        const viewToken = newToken("view");
        const { readExport } = await import("./transfer.ts");
        const data = readExport(await c.req.text(), {
          id,
          token_hash: await hashToken(token),
          view_token_hash: await hashToken(viewToken),
        });
        const roomId = data.room.id;
        if (!(await importRoom(db, data))) {
          throw new ApiError(
            "room_exists",
            `Room "${roomId}" exists; import under another id with ?id=`,
            { room_id: roomId },
          );
        }
        const room = (await getRoom(db, roomId))!;
        return c.json(
          { ...room, token, view_token: viewToken, imported: data.counts },
          201,
        );
      } finally {
        importing = false;
      }
    })
    .openapi(routes.listRooms, async (c) => {
      const admin = await isAdmin(
        bearer(c.req.header("authorization")),
        adminToken,
      );
      const { limit, after } = c.req.valid("query");
      const rooms = await listRooms(db, admin, { limit: limit ?? 100, after });
      if (rooms === null) {
        throw new ApiError(
          "invalid_request",
          `Invalid query: parameter "after" names no room ("${after}"); page from the start`,
          { field: "after" },
        );
      }
      return c.json(rooms, 200);
    })
    .openapi(
      { ...routes.getRoom, middleware: [inRoom] },
      (c) => c.json(c.var.room, 200),
    )
    .openapi({ ...routes.deleteRoom, middleware: [inRoom] }, async (c) => {
      mayAdminister(c.var.room, c.var.caller, "Deleting a room");
      return c.json({ deleted: await deleteRoom(db, c.var.room.id) }, 200);
    })
    .openapi({ ...routes.getContext, middleware: [inRoom] }, async (c) => {
      const room = c.var.room;
      const [agents, state, messages] = await Promise.all([
        listAgents(db, room.id),
        listState(db, room.id),
        recentMessages(
          db,
          room.id,
          c.req.valid("query").messages ?? 50,
          c.req.valid("query").status,
          maxResponseBytes,
        ),
      ]);
      const next_after = messages.items.at(-1)?.id ??
        (messages.total > 0 ? await lastId(room.id) : 0);
      return c.json({
        room,
        agents,
        state,
        messages: { ...messages, next_after },
      }, 200);
    })
    .openapi({ ...routes.streamRoom, middleware: [inRoom] }, async (c) => {
      const resume = c.req.header("last-event-id");
      const after = resume === undefined
        ? c.req.valid("query").after ?? 0
        : c.req.valid("header")["last-event-id"] ?? 0;
      // Hono answers HEAD by running this handler and dropping the body unread: a
      // stream opened for it would never learn that nobody reads (fuzz_test.ts).
      if (c.req.method === "HEAD") {
        return c.body(null, 200, { "content-type": "text/event-stream" });
      }
      await unexpired(c, after);
      const verify = readable(c);
      // Counted last: nothing may throw between holding and the stream's end.
      const release = hold(c, c.var.caller, c.var.room.id);
      return streamRoom(c, db, c.var.room.id, {
        after,
        statuses: c.req.valid("query").status,
        stop: shutdown,
        verify,
        onEnd: release,
      });
    })
    // ---- agents ----
    .openapi(
      { ...routes.registerAgent, middleware: [inRoom, writer] },
      async (c) => {
        const { status, agent } = await registerAgent(
          db,
          c.var.room,
          c.var.caller,
          c.req.valid("json"),
        );
        return c.json(agent, status);
      },
    )
    .openapi(
      { ...routes.listAgents, middleware: [inRoom] },
      async (c) => c.json(await listAgents(db, c.var.room.id), 200),
    )
    .openapi(
      { ...routes.heartbeat, middleware: [inRoom, writer] },
      async (c) => {
        const agentId = actingAs(
          c.var.caller,
          c.req.valid("param").agent,
          "agent",
        );
        const agent = await touchAgent(
          db,
          c.var.room.id,
          agentId,
          c.req.valid("json").status,
        );
        if (!agent) throw agentNotFound(c.var.room.id, agentId);
        return c.json(agent, 200);
      },
    )
    // ---- messages ----
    .openapi(
      { ...routes.postMessage, middleware: [inRoom, writer] },
      (c) => {
        const roomId = c.var.room.id;
        const message = toNewMessage(c.req.valid("json"), c.var.caller);
        return once(db, c, roomId, c.var.caller, async (idempotency) => {
          const inserted = await insertMessage(
            db,
            roomId,
            message,
            idempotency,
          );
          if (!inserted) throw replyNotFound(roomId, message.reply_to!);
          return { status: 201, body: inserted, stored: true };
        });
      },
    )
    .openapi({ ...routes.listMessages, middleware: [inRoom] }, async (c) => {
      const q = c.req.valid("query");
      const roomId = c.var.room.id;
      const filter: MessageFilter = {
        after: q.after ?? (q.order === "desc" ? undefined : 0),
        before: q.before,
        limit: q.limit ?? 100,
        order: q.order ?? "asc",
        kinds: q.kind,
        from: q.from,
        to: q.to,
        for: q.for,
        thread: q.thread,
        statuses: statusesOf(q.status, q.unclaimed),
        maxBytes: maxResponseBytes,
      };
      await unexpired(c, q.after);
      if (!q.wait) {
        // Built by SQLite as JSON text (db.ts, listMessagesJson).
        return jsonText(c, (await waitForMessages(db, roomId, filter, 0)).json);
      }
      const seconds = q.wait;
      return later(
        c,
        held(
          c,
          q.agent,
          (signal, verify) =>
            waitForMessages(db, roomId, filter, seconds, signal, verify),
        ).then((page) => jsonAnswer(page.json)),
      );
    })
    .openapi(
      { ...routes.claimMessage, middleware: [inRoom, writer] },
      async (c) => {
        const input = c.req.valid("json");
        const roomId = c.var.room.id;
        const id = c.req.valid("param").mid;
        const agent = requireAgent(
          actingAs(c.var.caller, input.agent, "agent"),
        );
        const { ok, message } = await claimMessage(
          db,
          roomId,
          id,
          agent,
          input.lease,
        );
        if (!message) throw messageNotFound(roomId, id);
        if (!ok) throw notClaimable(message);
        return c.json({ claimed: true, message }, 200);
      },
    )
    .openapi(
      { ...routes.releaseMessage, middleware: [inRoom, writer] },
      async (c) => {
        const roomId = c.var.room.id;
        const id = c.req.valid("param").mid;
        const agent = requireAgent(
          actingAs(c.var.caller, c.req.valid("json").agent, "agent"),
        );
        const { ok, message } = await releaseMessage(db, roomId, id, agent);
        if (!message) throw messageNotFound(roomId, id);
        if (message.status === "done") throw alreadyCompleted(message);
        if (!ok && message.claimed_by !== null) throw alreadyClaimed(message);
        return c.json({ released: ok, message }, 200);
      },
    )
    .openapi(
      { ...routes.completeMessage, middleware: [inRoom, writer] },
      (c) => {
        const input = c.req.valid("json");
        const { room, caller } = c.var;
        const id = c.req.valid("param").mid;
        const agent = requireAgent(actingAs(caller, input.agent, "agent"));
        return once(db, c, room.id, caller, async (idempotency) => {
          const done = await completeMessage(
            db,
            room.id,
            id,
            agent,
            input.result && {
              body: input.result.body,
              kind: input.result.kind ?? "result",
              to_agent: input.result.to ?? null,
            },
            idempotency,
          );
          if (!done.message) throw messageNotFound(room.id, id);
          if (done.message.status === "done" && !done.ok) {
            throw alreadyCompleted(done.message);
          }
          if (!done.ok) throw notHolder(done.message, agent);
          return {
            status: 200,
            body: {
              completed: true,
              message: done.message,
              result: done.result,
            },
          };
        });
      },
    )
    // ---- state ----
    .openapi(
      { ...routes.putState, middleware: [inRoom, writer] },
      async (c) => {
        const { agent, ...input } = c.req.valid("json");
        mayWriteScope(c.var.room, c.var.caller, input.scope);
        const by = actingAs(c.var.caller, agent, "agent") ?? null;
        const result = await writeState(db, c.var.room.id, { ...input, by });
        if (!result.ok) throw refused(result, input.if_version);
        return c.json(result.entry as StateEntry, 200);
      },
    )
    .openapi({ ...routes.getState, middleware: [inRoom] }, async (c) => {
      const { key, after_version, wait, agent, at, ...q } = c.req.valid(
        "query",
      );
      const room = c.var.room;
      if (at !== undefined) {
        const scope = key === undefined ? q.scope : q.scope ?? SHARED;
        const entries = await stateAt(db, room.id, at, { scope, key });
        if (entries === null) throw messageNotFound(room.id, at);
        if (key === undefined) return c.json(entries, 200);
        if (entries.length === 0) throw keyNotFound(room.id, scope!, key);
        return c.json(entries[0], 200);
      }
      if (key === undefined) {
        return c.json(await listState(db, room.id, q.scope), 200);
      }
      const scope = q.scope ?? SHARED;
      const after = after_version ?? 0;
      if (!wait) {
        const entry = await waitForState(db, room.id, scope, key, after, 0);
        if (!entry) throw keyNotFound(room.id, scope, key);
        return c.json(entry, 200);
      }
      const roomId = room.id;
      return later(
        c,
        held(
          c,
          agent,
          (signal, verify) =>
            waitForState(db, roomId, scope, key, after, wait, signal, verify),
        ).then((entry) => {
          if (!entry) throw keyNotFound(roomId, scope, key);
          return Response.json(entry);
        }),
      );
    })
    .openapi({ ...routes.exportRoom, middleware: [inRoom] }, async (c) => {
      // Export and import load with their first use, as the pages do.
      const { exportRoom } = await import("./transfer.ts");
      const chunks = exportRoom(db, c.var.room, maxResponseBytes);
      return c.body(
        ReadableStream.from(chunks).pipeThrough(new TextEncoderStream()),
        200,
        { "content-type": "application/x-ndjson; charset=utf-8" },
      );
    })
    .openapi({ ...routes.getStateHistory, middleware: [inRoom] }, async (c) => {
      const { scope, key, after_version, limit } = c.req.valid("query");
      return c.json(
        await stateHistory(db, c.var.room.id, scope, key, {
          after: after_version ?? 0,
          limit: limit ?? 100,
        }),
        200,
      );
    })
    .openapi(
      { ...routes.deleteState, middleware: [inRoom, writer] },
      async (c) => {
        const { agent, ...input } = c.req.valid("json");
        mayWriteScope(c.var.room, c.var.caller, input.scope);
        const result = await writeState(db, c.var.room.id, {
          ...input,
          delete: true,
          by: actingAs(c.var.caller, agent, "agent") ?? null,
        });
        if (!result.ok) throw refused(result, input.if_version);
        return c.json({ deleted: result.deleted ?? false }, 200);
      },
    )
    // ---- batch ----
    .openapi(
      { ...routes.batch, middleware: [inRoom, writer] },
      (c) => {
        const input = c.req.valid("json");
        const { room, caller } = c.var;
        const roomId = room.id;
        const ops = (input.state ?? []).map(({ agent, ...op }) => {
          mayWriteScope(room, caller, op.scope);
          return { ...op, by: actingAs(caller, agent, "agent") ?? null };
        });
        const messages = (input.messages ?? []).map((m) =>
          toNewMessage(m, caller)
        );
        return once(db, c, roomId, caller, async (idempotency) => {
          const result = await applyBatch(
            db,
            roomId,
            ops,
            messages,
            idempotency,
          );
          if (result.ok) {
            return {
              status: 200,
              body: { state: result.state, messages: result.messages },
            };
          }
          throw batchRefused(roomId, result);
        });
      },
    )
    // Other methods get a clear 405 (method_not_allowed) from the MCP handler.
    .all("/mcp", (c) => mcp(c));

  /** The id of the newest message of a room. */
  async function lastId(roomId: string): Promise<number> {
    // One row, newest first: recentMessages would count the whole room again.
    const [newest] = await listMessages(db, roomId, {
      limit: 1,
      order: "desc",
    });
    return newest?.id ?? 0;
  }
}

/**
 * A JSON answer whose text is made already (a page of messages, built by SQLite): typed
 * as the route's answer, which the tests check it is (openapi_test.ts).
 */
function jsonText<T>(c: Context, json: string): TypedResponse<T, 200, "json"> {
  return c.body(json, 200, {
    "content-type": "application/json",
  }) as unknown as TypedResponse<T, 200, "json">;
}

/** JSON text as an answer of its own (one that comes `later`). */
function jsonAnswer(json: string): Response {
  return new Response(json, {
    headers: { "content-type": "application/json" },
  });
}

/** Markdown docs; they name this request's host, so no cache may keep them for another. */
function markdown(c: Context, text: string): Response {
  return c.body(text, 200, {
    "content-type": "text/markdown; charset=utf-8",
    "cache-control": "no-store",
  });
}

/**
 * The agent a wait shows as `waiting` (`agent=`): it writes presence, so a view token
 * may not name one, and an agent token only itself.
 */
function presenceOf(
  caller: Caller,
  agent: string | undefined,
): string | undefined {
  if (caller.kind === "view" && agent !== undefined) {
    throw new ApiError(
      "read_only",
      'A view token cannot show an agent as waiting; leave out "agent"',
    );
  }
  return actingAs(caller, agent, "agent");
}

/** A message to append, sent as `caller`: an agent token posts as its agent only. */
function toNewMessage(input: PostMessage, caller: Caller): NewMessage {
  return {
    from_agent: actingAs(caller, input.from, "from") ?? null,
    to_agent: input.to ?? null,
    kind: input.kind ?? "message",
    body: input.body,
    reply_to: input.reply_to ?? null,
    max_attempts: input.max_attempts ?? null,
  };
}

/**
 * The task statuses a read selects: `status`, narrowed by the older `unclaimed`
 * (true is `open`, false is `held`).
 */
function statusesOf(
  status: TaskStatus[] | undefined,
  unclaimed: boolean | undefined,
): TaskStatus[] | undefined {
  if (unclaimed === undefined) return status;
  const wanted: TaskStatus = unclaimed ? "open" : "held";
  return (status ?? [wanted]).filter((s) => s === wanted);
}

/** The agent of a claim or release: the token's agent, or named in the body. */
function requireAgent(agent: string | undefined): string {
  if (agent !== undefined) return agent;
  throw new ApiError(
    "invalid_request",
    'Invalid request body: field "agent" is required',
    {
      field: "agent",
    },
  );
}

/** The app's type, for a typed client: `hc<AppType>(url)` from `hono/client`. */
export type AppType = ReturnType<typeof createApp>;

/** The database named by `DATABASE_URL`; opened on the first request. */
export const db = new Db({ url: DATABASE_URL, authToken: DATABASE_AUTH_TOKEN });

/** The viewer's module, read once (from the file beside this one, wherever that is). */
let viewerSource: Promise<string> | undefined;
function viewerScript(): Promise<string> {
  viewerSource ??= fetch(new URL("./viewer.js", import.meta.url)).then((res) =>
    res.text()
  );
  return viewerSource;
}

/** Aborted when the process drains (server.ts), to end long-polls and streams at once. */
const draining = new AbortController();

/** Ends every long-poll and stream: the process is draining (server.ts). */
export function drain(): void {
  draining.abort();
}

/** The service on that database (tests build their own with `createApp`). */
export const app = createApp({ db, shutdown: draining.signal });

/**
 * The service as hosts call it. It is a function from Request to Response (an HTTP
 * val on Val Town) with `fetch` (what `deno serve` and Deno Deploy look for) and
 * `onListen` (`deno serve`'s start-up line). Importing this module starts nothing and
 * opens nothing: the database opens on the first request, and `deno task start`
 * listens through server.ts, with the drain on SIGTERM. main.ts cannot listen itself:
 * `import.meta.main` is true under `deno serve` too (deno issue 29447).
 */
const handler = Object.assign(
  (request: Request): Response | Promise<Response> => app.fetch(request),
  {
    fetch: (request: Request) => app.fetch(request),
    onListen: ({ hostname, port }: Deno.NetAddr) =>
      console.log(
        `sync listening on http://${hostname}:${port} (pid ${Deno.pid})`,
      ),
  },
);

export default handler;
