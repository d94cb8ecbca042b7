/**
 * The listener of `deno task start`. Deno.serve has no cap on connections and no
 * timeout for a request whose headers never finish (denoland/deno#3515), so this
 * module accepts TCP connections itself and hands each to Deno's own HTTP server
 * (`serveHttpOnConnection`, the function Deno.serve uses for one connection):
 *
 * - at most `maxConnections` are open at once; one more closes the connection idle the
 *   longest (no request in flight: a half-sent request or a keep-alive between
 *   requests), or, when every connection is busy, is answered 503 `over_capacity`;
 * - a connection with no request in flight for `stallMs` is closed (looked for
 *   every quarter of it, at most every second): headers that never finish are a
 *   connection with no request yet;
 * - the open-file limit is found when accepting first fails for lack of descriptors
 *   (Deno lets a process read its limit only with --allow-all): from then on the cap
 *   is the connections open at that moment less a headroom, and idle connections are
 *   closed to get under it; when none can be, the loop waits a second and accepts
 *   again, instead of dying.
 *
 * Held requests (long-polls, streams) keep their connection busy and are never closed
 * here; the wait caps bound them. Without `serveHttpOnConnection` (another runtime or
 * Deno version), or with `maxConnections` 0, it is plain Deno.serve, and says so.
 */
import { ApiError, errorBody } from "./errors.ts";

type Handler = (
  request: Request,
  info: Deno.ServeHandlerInfo,
) => Response | Promise<Response>;

type ServeOnConnection = (
  connection: Deno.Conn,
  signal: AbortSignal,
  handler: Handler,
  onError: (error: unknown) => Response,
  onListen: () => void,
) => { finished: Promise<void>; shutdown(): Promise<void> };

/** Deno's per-connection server, when this runtime has it. */
function serveOnConnection(): ServeOnConnection | undefined {
  const deno = Deno as unknown as {
    internal?: symbol;
    [key: symbol]: { serveHttpOnConnection?: ServeOnConnection } | undefined;
  };
  const internal = deno.internal ? deno[deno.internal] : undefined;
  return internal?.serveHttpOnConnection;
}

/** A server started by `listen`. */
export type Listening = {
  addr: Deno.NetAddr;
  /** Stops accepting, lets requests in flight finish, closes every connection. */
  shutdown(): Promise<void>;
};

/** What this process serves with: null where a host's server does (`/limits`). */
export const serving = { maxConnections: null as number | null };

/** How long a refused connection may take to send its request, and how many at once. */
const LINGER_MS = 1_000;
const MAX_LINGERING = 64;

/** How long the loop waits to accept again after running out of descriptors. */
const RETRY_ACCEPT_MS = 1_000;

/**
 * Connections kept free of the open-file limit, once it is found: for the database,
 * its journal, logs and the sockets the process opens itself.
 */
const HEADROOM = 32;

type Connection = {
  /** Aborting closes the connection at once. */
  close: AbortController;
  /** Requests in flight (answer not yet delivered). */
  busy: number;
  /** When the last request finished (or the connection opened). */
  idleSince: number;
  server?: { shutdown(): Promise<void> };
};

/** Serves `handler` on `hostname:port` with the caps above. */
export function listen(
  options: {
    port: number;
    hostname: string;
    maxConnections: number;
    stallMs: number;
    onListen: (addr: Deno.NetAddr) => void;
  },
  handler: Handler,
): Listening {
  const serveOn = serveOnConnection();
  if (!serveOn || options.maxConnections === 0) {
    if (options.maxConnections !== 0) {
      console.error(
        "sync: this Deno cannot serve one connection at a time: connections are not capped and stalled ones not closed",
      );
    }
    return serveAll(options, handler);
  }
  serving.maxConnections = options.maxConnections;

  const listener = Deno.listen({
    port: options.port,
    hostname: options.hostname,
  });
  const open = new Set<Connection>();
  let closing = false;
  /** The cap: `maxConnections`, or less once the open-file limit is found. */
  let max = options.maxConnections;

  // Stalled connections are found by one sweep, not a timer per idle spell: a timer
  // set and cleared around every request cost the hot path (docs/PERFORMANCE.md).
  const sweeper = setInterval(() => {
    const now = performance.now();
    for (const connection of open) {
      if (
        connection.busy === 0 && now - connection.idleSince >= options.stallMs
      ) {
        forget(connection);
        connection.close.abort();
      }
    }
  }, Math.min(1_000, Math.max(10, options.stallMs / 4)));

  /** Makes room for one more: closes the longest-idle connection, if any. */
  const evict = (): boolean => {
    let oldest: Connection | undefined;
    for (const connection of open) {
      if (
        connection.busy === 0 &&
        (!oldest || connection.idleSince < oldest.idleSince)
      ) oldest = connection;
    }
    if (!oldest) return false;
    forget(oldest);
    oldest.close.abort();
    return true;
  };

  const forget = (connection: Connection) => open.delete(connection);

  const serveConnection = (conn: Deno.Conn) => {
    const connection: Connection = {
      close: new AbortController(),
      busy: 0,
      idleSince: performance.now(),
    };
    open.add(connection);
    const finished = () => {
      if (--connection.busy === 0) connection.idleSince = performance.now();
    };
    const server = serveOn(
      conn,
      connection.close.signal,
      (request, info) => {
        connection.busy++;
        info.completed.then(finished, finished);
        return handler(request, info);
      },
      (error) => {
        console.error("sync: a request failed:", error);
        return new Response(null, { status: 500 });
      },
      () => {},
    );
    connection.server = server;
    server.finished.catch(() => {}).finally(() => forget(connection));
  };

  /**
   * Answers 503 and closes. The answer waits for the start of the request (an HTTP
   * client takes an answer that comes before its request for a broken connection),
   * and the rest of the request is read before closing (closing with it unread
   * would reset the socket, and the client would lose the answer): at most a second
   * in all, with a few refusals at a time; past that, the connection is just closed.
   */
  let lingering = 0;
  const refuse = async (conn: Deno.Conn) => {
    if (lingering < MAX_LINGERING) {
      lingering++;
      const timer = setTimeout(() => conn.close(), LINGER_MS);
      try {
        const scrap = new Uint8Array(4096);
        if (await conn.read(scrap) !== null) {
          await conn.write(
            new TextEncoder().encode(
              unavailable(errorBody("", overCapacityError(max))),
            ),
          );
          await conn.closeWrite();
          while (await conn.read(scrap) !== null);
        }
      } catch {
        // The client went away, or the second ran out.
      } finally {
        clearTimeout(timer);
        lingering--;
      }
    }
    try {
      conn.close();
    } catch {
      // closed already
    }
  };

  (async () => {
    let failing = false;
    while (!closing) {
      let conn: Deno.Conn;
      try {
        conn = await listener.accept();
      } catch (error) {
        if (closing || error instanceof Deno.errors.BadResource) return;
        // A connection reset before it was accepted, and the like: that one only.
        if (!/Too many open files|ENFILE|EMFILE/.test(String(error))) {
          await new Promise((resolve) => setTimeout(resolve, 1));
          continue;
        }
        // Out of descriptors: the limit is found. Serve fewer from now on, and make
        // room by closing idle connections; accept again once some are free.
        if (open.size - HEADROOM < max) {
          max = Math.max(1, open.size - HEADROOM);
          serving.maxConnections = max;
          console.error(
            `sync: out of file descriptors at ${open.size} connections: serving at most ${max} from now on`,
          );
        }
        let freed = false;
        while (open.size > max && evict()) freed = true;
        if (!freed && !failing) {
          console.error(
            `sync: cannot accept (out of file descriptors): accepting again in ${
              RETRY_ACCEPT_MS / 1000
            } s`,
          );
        }
        failing = !freed;
        await new Promise((resolve) =>
          setTimeout(resolve, freed ? 10 : RETRY_ACCEPT_MS)
        );
        continue;
      }
      failing = false;
      if (open.size < max || evict()) serveConnection(conn);
      else void refuse(conn);
    }
  })();

  const addr = listener.addr as Deno.NetAddr;
  options.onListen(addr);
  return {
    addr,
    async shutdown() {
      closing = true;
      clearInterval(sweeper);
      listener.close();
      await Promise.all(
        [...open].map((connection) => connection.server?.shutdown()),
      );
    },
  };
}

function overCapacityError(max: number): ApiError {
  return new ApiError(
    "over_capacity",
    `The service holds its ${max} connections, every one busy; retry in a moment`,
    { max_connections: max },
  );
}

/** A whole HTTP/1.1 503 with a JSON body, written before any request is read. */
function unavailable(body: unknown): string {
  const text = JSON.stringify(body);
  return `HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: ${
    new TextEncoder().encode(text).length
  }\r\nretry-after: 1\r\nconnection: close\r\n\r\n${text}`;
}

/**
 * Plain Deno.serve, with one repair: when clients hold every file descriptor, its
 * accept loop fails ("Too many open files", an unhandled rejection) and closes the
 * listener. The process does not exit: it listens again on the same port a second
 * later, and serves as soon as descriptors are free.
 */
function serveAll(
  options: {
    port: number;
    hostname: string;
    onListen: (addr: Deno.NetAddr) => void;
  },
  handler: Handler,
): Listening {
  let port = options.port;
  let closing = false;
  let listened = false;
  const start = () =>
    Deno.serve({
      port,
      hostname: options.hostname,
      onListen: (addr) => {
        // Port 0 picks one: listening again must take the same.
        port = addr.port;
        if (!listened) options.onListen(addr);
        else console.error(`sync: listening again on port ${port}`);
        listened = true;
      },
    }, handler);
  let server = start();
  let outOfFiles = false;
  globalThis.addEventListener("unhandledrejection", (event) => {
    if (!String(event.reason).includes("Too many open files")) return;
    event.preventDefault();
    if (outOfFiles || closing) return;
    outOfFiles = true;
    console.error(
      `sync: out of file descriptors: listening again in ${
        RETRY_ACCEPT_MS / 1000
      } s`,
    );
    const retry = () => {
      try {
        server = start();
        outOfFiles = false;
      } catch {
        setTimeout(retry, RETRY_ACCEPT_MS);
      }
    };
    setTimeout(retry, RETRY_ACCEPT_MS);
  });
  return {
    addr: server.addr,
    shutdown() {
      closing = true;
      return server.shutdown();
    },
  };
}
