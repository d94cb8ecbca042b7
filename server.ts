/**
 * Runs the app as a process: listens, and on SIGTERM or SIGINT drains (refuses new
 * requests, ends long-polls and streams through `onDrain`, lets the requests in flight
 * finish), closes the database and exits.
 */
import type { Db } from "./db.ts";

/** How long a drain waits for requests in flight before exiting anyway. */
const DRAIN_TIMEOUT_MS = 10_000;

/**
 * How long streams, already told to end, get to close once the requests are done: a
 * stream whose client stopped reading never will.
 */
const STREAM_GRACE_MS = 2_000;

type Fetch = (
  request: Request,
  info: Deno.ServeHandlerInfo,
) => Response | Promise<Response>;

/** Serves `fetch` on `hostname:port` until a signal drains and stops it. */
export function serve(
  fetch: Fetch,
  options: { db: Db; port: number; hostname: string; onDrain?: () => void },
): Deno.HttpServer {
  let inFlight = 0;
  let draining = false;
  const drained = Promise.withResolvers<void>();

  const server = Deno.serve({
    port: options.port,
    hostname: options.hostname,
    onListen: ({ hostname, port }) =>
      console.log(
        `sync listening on http://${hostname}:${port} (pid ${Deno.pid})`,
      ),
  }, async (request, info) => {
    if (draining) {
      return Response.json(
        {
          error: "shutting_down",
          message: "The service is restarting; retry in a moment",
        },
        { status: 503, headers: { "retry-after": "1", connection: "close" } },
      );
    }
    inFlight++;
    try {
      return await fetch(request, info);
    } finally {
      if (--inFlight === 0 && draining) drained.resolve();
    }
  });

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
    options.onDrain?.();
    if (inFlight === 0) drained.resolve();
    await until(drained.promise, DRAIN_TIMEOUT_MS);
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
