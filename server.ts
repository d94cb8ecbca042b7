/**
 * Runs the app as a process (`deno task start`): listens, and on SIGTERM or SIGINT
 * drains (refuses new requests, ends long-polls and streams through `onDrain`, lets the
 * requests in flight finish), closes the database and exits.
 */
import { CannotOpen, type Db, shown } from "./driver.ts";
import { ApiError, errorBody, originOf } from "./errors.ts";
import { listen, type Listening } from "./listener.ts";
import { app, db, drain, envInt, STALL_TIMEOUT_SECONDS } from "./main.ts";

const PORT = envInt("PORT", 8000);
const HOST = Deno.env.get("HOST") || "0.0.0.0";
/**
 * Connections served at once, fewer if the open-file limit is lower (listener.ts); 0:
 * no cap, for a proxy in front that caps them.
 */
const MAX_CONNECTIONS = envInt("MAX_CONNECTIONS", 10_000);

/** How long a drain waits for requests in flight before exiting anyway. */
const DRAIN_TIMEOUT_MS = 10_000;

/**
 * How long streams, already told to end, get to close once the requests are done: a
 * stream whose client stopped reading never will.
 */
const STREAM_GRACE_MS = 2_000;

/**
 * Once the requests in flight are done, the listener stays open, answering 503, until
 * no request has come for this long (ms): requests already sent on open connections or
 * waiting to be accepted get an answer instead of a reset (stress_test.ts).
 */
const QUIET_MS = 250;

type Fetch = (
  request: Request,
  info: Deno.ServeHandlerInfo,
) => Response | Promise<Response>;

/**
 * Serves `fetch` on `hostname:port` (listener.ts: capped connections, stalled ones
 * closed, accept errors survived) until a signal drains and stops it.
 */
export function serve(
  fetch: Fetch,
  options: {
    db: Db;
    port: number;
    hostname: string;
    maxConnections: number;
    stallMs: number;
    onDrain?: () => void;
  },
): Listening {
  let inFlight = 0;
  let draining = false;
  let lastRequest = 0;
  const drained = Promise.withResolvers<void>();

  const handler = async (
    request: Request,
    info: Deno.ServeHandlerInfo,
  ): Promise<Response> => {
    lastRequest = performance.now();
    if (draining) {
      return Response.json(
        errorBody(
          originOf(request.url),
          new ApiError(
            "shutting_down",
            "The service is restarting; retry in a moment",
          ),
        ),
        { status: 503, headers: { "retry-after": "1", connection: "close" } },
      );
    }
    inFlight++;
    try {
      const response = await fetch(request, info);
      // A connection still open when the process exits would be cut.
      if (draining) closeAfter(response);
      return response;
    } finally {
      if (--inFlight === 0 && draining) drained.resolve();
    }
  };

  const server = listen({
    port: options.port,
    hostname: options.hostname,
    maxConnections: options.maxConnections,
    stallMs: options.stallMs,
    onListen: (addr) =>
      console.log(
        `sync listening on http://${addr.hostname}:${addr.port} (pid ${Deno.pid})`,
      ),
  }, handler);

  // Deno's server.shutdown() cuts request bodies still being read, so the drain waits
  // for the handlers first (server_test.ts, "SIGTERM lets an in-flight request finish").
  const stop = async () => {
    if (draining) return;
    draining = true;
    const until = (promise: Promise<unknown>, ms: number) =>
      Promise.race([
        promise,
        new Promise((resolve) => setTimeout(resolve, ms)),
      ]);
    const deadline = performance.now() + DRAIN_TIMEOUT_MS;
    options.onDrain?.();
    if (inFlight === 0) drained.resolve();
    await until(drained.promise, DRAIN_TIMEOUT_MS);
    while (
      performance.now() - lastRequest < QUIET_MS && performance.now() < deadline
    ) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    // Streams are not counted in flight; a client that stopped reading could hold
    // shutdown() forever.
    await until(server.shutdown(), STREAM_GRACE_MS);
    options.db.close();
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);
  return server;
}

/** Asks the client to close the connection after this response (when it can be said). */
function closeAfter(response: Response): void {
  try {
    response.headers.set("connection", "close");
  } catch {
    // Immutable headers (a response passed through from fetch): nothing to say.
  }
}

/** `deno task start`: opens the database (or says why it cannot), then serves. */
if (import.meta.main) {
  try {
    await db.client();
  } catch (error) {
    // A file that cannot be opened was said in one line already (driver.ts).
    if (!(error instanceof Error && error.cause instanceof CannotOpen)) {
      console.error(
        `sync: cannot open the database at ${shown(db.options.url)}: ${
          error instanceof Error ? error.message : error
        }`,
      );
    }
    Deno.exit(1);
  }
  serve(app.fetch, {
    db,
    port: PORT,
    hostname: HOST,
    maxConnections: MAX_CONNECTIONS,
    stallMs: STALL_TIMEOUT_SECONDS * 1000,
    onDrain: drain,
  });
}
