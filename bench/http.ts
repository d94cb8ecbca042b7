/**
 * Load and latency tools: autocannon for throughput (keep-alive connections, run in the
 * benchmark's own process), percentiles, and plain TCP clients for the cases that hold
 * thousands of connections open (long-polls, SSE), where `fetch` would hide what a
 * connection is doing.
 */
import autocannon from "autocannon";

/** What a throughput run measured. */
export type Load = {
  /** 2xx answers per second. */
  rate: number;
  /** The 99th percentile of latency in ms (autocannon records whole milliseconds). */
  p99: number;
  ok: number;
  /** How long the run took, in seconds. */
  seconds: number;
  non2xx: number;
  errors: number;
};

/** One kind of request for autocannon; `vary` makes a fresh path or body per request. */
export type Request = {
  method: "GET" | "POST" | "PUT";
  path: string;
  body?: unknown;
  vary?: () => { path?: string; body?: unknown };
};

type RawRequest = {
  method: string;
  path: string;
  headers: Record<string, string>;
  body?: string;
};

type Result = {
  duration: number;
  latency: { p99: number };
  "2xx": number;
  non2xx: number;
  errors: number;
  timeouts: number;
};

/** Runs autocannon against `url` for `seconds` with `connections` keep-alive connections. */
export async function load(
  url: string,
  request: Request,
  connections: number,
  seconds: number,
): Promise<Load> {
  const vary = request.vary;
  const raw: RawRequest & {
    setupRequest?: (req: RawRequest) => RawRequest;
  } = {
    method: request.method,
    path: request.path,
    headers: { "content-type": "application/json" },
    body: request.body === undefined ? undefined : JSON.stringify(request.body),
  };
  if (vary) {
    raw.setupRequest = (req) => {
      const next = vary();
      return {
        ...req,
        path: next.path ?? req.path,
        body: next.body === undefined ? req.body : JSON.stringify(next.body),
      };
    };
  }
  const result: Result = await autocannon({
    url,
    connections,
    duration: seconds,
    requests: [raw],
  });
  return {
    rate: result["2xx"] / result.duration,
    p99: result.latency.p99,
    ok: result["2xx"],
    seconds: result.duration,
    non2xx: result.non2xx,
    errors: result.errors + result.timeouts,
  };
}

/** The p-th percentile (0-100) of `values`, nearest rank. */
export function percentile(values: number[], p: number): number {
  if (values.length === 0) return NaN;
  const sorted = [...values].sort((a, b) => a - b);
  const rank = Math.ceil((p / 100) * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

/** A JSON call with `fetch` (keep-alive); throws on an unexpected status. */
export async function call<T>(
  base: string,
  method: string,
  path: string,
  body?: unknown,
): Promise<T> {
  const res = await fetch(base + path, {
    method,
    headers: { "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  if (!res.ok) {
    throw new Error(`${method} ${path}: ${res.status} ${text.slice(0, 500)}`);
  }
  return JSON.parse(text) as T;
}

/**
 * A plain TCP connection that sends one GET and hands each piece of the answer, as
 * text, to `onText`.
 */
export class RawGet {
  #conn: Deno.TcpConn;
  #decoder = new TextDecoder();
  /** Settles when the server closes the connection or `close` is called. */
  readonly closed: Promise<void>;

  private constructor(conn: Deno.TcpConn, onText: (text: string) => void) {
    this.#conn = conn;
    this.closed = (async () => {
      const buffer = new Uint8Array(16 * 1024);
      try {
        for (;;) {
          const n = await conn.read(buffer);
          if (n === null) return;
          onText(this.#decoder.decode(buffer.subarray(0, n), { stream: true }));
        }
      } catch {
        // closed by us, or reset
      }
    })();
  }

  /** Connects to `base` (http://host:port) and sends `GET path`. */
  static async open(
    base: string,
    path: string,
    onText: (text: string) => void,
  ): Promise<RawGet> {
    const { hostname, port, host } = new URL(base);
    const conn = await Deno.connect({ hostname, port: Number(port) });
    const request = `GET ${path} HTTP/1.1\r\nHost: ${host}\r\n` +
      "Accept: application/json, text/event-stream\r\n\r\n";
    await conn.write(new TextEncoder().encode(request));
    return new RawGet(conn, onText);
  }

  close(): void {
    try {
      this.#conn.close();
    } catch {
      // already closed
    }
  }
}

/** Runs `fn` on every item with at most `limit` at a time. */
export async function inParallel<T, R>(
  items: T[],
  limit: number,
  fn: (item: T, index: number) => Promise<R>,
): Promise<R[]> {
  const out: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await fn(items[i], i);
    }
  };
  await Promise.all(
    Array.from({ length: Math.min(limit, items.length) }, worker),
  );
  return out;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
