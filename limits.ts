/**
 * The per-client rate limit: a token bucket per bearer token, or per IP address for
 * requests without one. Hand-written (a few lines) because the Hono rate limiters
 * count fixed windows, and the spec asks for a steady rate with a burst allowance.
 */
import type { Context, MiddlewareHandler } from "hono";
import { hashToken } from "./auth.ts";
import { ApiError } from "./errors.ts";

/** Requests per second, and how many may come at once after a quiet spell. */
export type RateLimit = { per_second: number; burst: number };

type Bucket = { tokens: number; at: number };

/** How many buckets are kept before those that would be full again are swept away. */
const MAX_BUCKETS = 10_000;

/** How many proven tokens are remembered (by hash); past that the memory starts over. */
const MAX_TRUSTED = 100_000;

/** The address a request came from. */
function address(c: Context): string {
  // Deno.serve passes its ServeHandlerInfo as the env of `app.fetch`.
  const info = c.env as { remoteAddr?: { hostname?: string } } | undefined;
  return info?.remoteAddr?.hostname ?? "unknown";
}

/** The bearer token of a request, as `auth.ts` reads it, or undefined. */
function bearerOf(c: Context): string | undefined {
  return c.req.header("authorization")?.match(/^Bearer\s+(\S+)\s*$/i)?.[1];
}

/**
 * Counts requests per client and refuses those beyond the limit with 429
 * `rate_limited` and Retry-After. A client is a token that has proven itself (a room
 * admitted it: `trust`), else its address: made-up tokens, or tokens spelled in new
 * ways, cannot buy a fresh allowance each.
 */
export class RateLimiter {
  readonly limit: RateLimit;
  #buckets = new Map<string, Bucket>();
  #trusted = new Set<string>();

  constructor(limit: RateLimit) {
    this.limit = limit;
  }

  /** Marks a token as proven: from now on it counts as itself, not as its address. */
  async trust(token: string): Promise<void> {
    const hash = await hashToken(token);
    if (this.#trusted.has(hash)) return;
    if (this.#trusted.size >= MAX_TRUSTED) this.#trusted.clear();
    this.#trusted.add(hash);
  }

  /** The middleware that counts and refuses. */
  readonly middleware: MiddlewareHandler = async (c, next) => {
    // A tool call of the MCP endpoint, made in-process: its request was counted.
    if ((c.env as { internal?: boolean } | undefined)?.internal) {
      return await next();
    }
    const token = bearerOf(c);
    const hash = token === undefined ? undefined : await hashToken(token);
    const key = hash !== undefined && this.#trusted.has(hash)
      ? `token ${hash}`
      : `ip ${address(c)}`;
    const now = Date.now();
    const { per_second, burst } = this.limit;
    const bucket = this.#buckets.get(key) ?? { tokens: burst, at: now };
    bucket.tokens = Math.min(
      burst,
      bucket.tokens + (now - bucket.at) / 1000 * per_second,
    );
    bucket.at = now;
    if (bucket.tokens < 1) {
      const seconds = Math.max(1, Math.ceil((1 - bucket.tokens) / per_second));
      c.header("Retry-After", String(seconds));
      throw new ApiError(
        "rate_limited",
        `Over ${per_second} requests per second (burst ${burst}); retry in ${seconds} s`,
        { retry_after: seconds },
      );
    }
    bucket.tokens -= 1;
    this.#buckets.set(key, bucket);
    if (this.#buckets.size > MAX_BUCKETS) {
      // A bucket that would be full again holds nothing worth keeping.
      for (const [k, b] of this.#buckets) {
        if (b.tokens + (now - b.at) / 1000 * per_second >= burst) {
          this.#buckets.delete(k);
        }
      }
    }
    await next();
  };
}
