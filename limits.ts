/**
 * The rate limit: a token bucket per client (a proven bearer token, else the address),
 * and a ceiling per address over all its tokens, so minting tokens (or rooms, which
 * are charged to the address) buys no more. Hand-written (a few lines) because the Hono
 * rate limiters count fixed windows, and a client should get a steady rate with a burst
 * allowance. Behind a reverse proxy, `TRUST_PROXY` says which `X-Forwarded-For` entry
 * is the client.
 */
import type { Context } from "hono";
import { bearerToken, hashToken } from "./auth.ts";
import { ApiError } from "./errors.ts";

/** Requests per second, and how many may come at once after a quiet spell. */
export type RateLimit = { per_second: number; burst: number };

type Bucket = { tokens: number; at: number };

/** How many buckets are kept before those that would be full again are swept away. */
const MAX_BUCKETS = 10_000;

/** How many proven tokens are remembered (by hash); past that the memory starts over. */
const MAX_TRUSTED = 100_000;

/**
 * How many reverse proxies stand before the service: the client is the n-th
 * `X-Forwarded-For` entry counted from the right; 0 (the default) ignores the header.
 */
const TRUST_PROXY = Number(Deno.env.get("TRUST_PROXY") || "0");
if (!Number.isInteger(TRUST_PROXY) || TRUST_PROXY < 0) {
  throw new Error(
    `TRUST_PROXY must be a non-negative integer, got "${
      Deno.env.get("TRUST_PROXY")
    }"`,
  );
}

/**
 * The address a request came from: the connection's, or with `trustProxy` n > 0 the
 * n-th `X-Forwarded-For` entry from the right (the one the nearest trusted proxy
 * saw); a header with fewer entries than that did not come through the proxies, and
 * counts as the connection.
 */
export function address(c: Context, trustProxy = TRUST_PROXY): string {
  // Deno.serve passes its ServeHandlerInfo as the env of `app.fetch`.
  const info = c.env as { remoteAddr?: { hostname?: string } } | undefined;
  const connection = info?.remoteAddr?.hostname ?? "unknown";
  if (trustProxy === 0) return connection;
  const entries = (c.req.header("x-forwarded-for") ?? "").split(",")
    .map((entry) => entry.trim()).filter((entry) => entry !== "");
  return entries.length >= trustProxy
    ? entries[entries.length - trustProxy]
    : connection;
}

/**
 * Counts requests per client and refuses those beyond the limit with 429
 * `rate_limited` and Retry-After. A client is a token that has proven itself (a room
 * admitted it: `trust`), else its address: made-up tokens, or tokens spelled in new
 * ways, cannot buy a fresh allowance each.
 */
export class RateLimiter {
  readonly limit: RateLimit;
  /** The ceiling of one address over all its tokens. */
  readonly perAddress: RateLimit;
  readonly trustProxy: number;
  #buckets = new Map<string, Bucket>();
  #trusted = new Set<string>();

  constructor(
    limit: RateLimit,
    options: { perAddress?: RateLimit; trustProxy?: number } = {},
  ) {
    this.limit = limit;
    this.perAddress = options.perAddress ??
      { per_second: limit.per_second * 10, burst: limit.burst * 10 };
    this.trustProxy = options.trustProxy ?? TRUST_PROXY;
  }

  /** Marks a token as proven: from now on it counts as itself, not as its address. */
  async trust(token: string): Promise<void> {
    const hash = await hashToken(token);
    if (this.#trusted.has(hash)) return;
    if (this.#trusted.size >= MAX_TRUSTED) this.#trusted.clear();
    this.#trusted.add(hash);
  }

  /**
   * Counts a request, or refuses it (429 `rate_limited`). Synchronous unless the
   * request carries a token, whose hash says whether it is a trusted client.
   */
  count(c: Context): Promise<void> | void {
    // A tool call of the MCP endpoint, made in-process: its request was counted.
    if ((c.env as { internal?: boolean } | undefined)?.internal) return;
    const token = bearerToken(c.req.header("authorization"));
    if (token === undefined) return this.#take(c, undefined);
    return hashToken(token).then((hash) => this.#take(c, hash));
  }

  #take(c: Context, hash: string | undefined): void {
    const from = address(c, this.trustProxy);
    // Making a room is charged to the address: new rooms mean new trusted tokens.
    const makesRoom = c.req.method === "POST" && c.req.path === "/rooms";
    const client = hash !== undefined && this.#trusted.has(hash) && !makesRoom
      ? `token ${hash}`
      : `ip ${from}`;
    const now = Date.now();
    const mine = this.#fill(client, this.limit, now);
    const ceiling = this.#fill(`address ${from}`, this.perAddress, now);
    for (
      const [bucket, limit] of [[mine, this.limit], [
        ceiling,
        this.perAddress,
      ]] as const
    ) {
      if (bucket.tokens >= 1) continue;
      const seconds = Math.max(
        1,
        Math.ceil((1 - bucket.tokens) / limit.per_second),
      );
      c.header("Retry-After", String(seconds));
      throw new ApiError(
        "rate_limited",
        bucket === mine
          ? `Over ${limit.per_second} requests per second (burst ${limit.burst}); retry in ${seconds} s`
          : `This address is over ${limit.per_second} requests per second over all its tokens (burst ${limit.burst}); retry in ${seconds} s`,
        { retry_after: seconds },
      );
    }
    mine.tokens -= 1;
    ceiling.tokens -= 1;
    if (this.#buckets.size > MAX_BUCKETS) this.#sweep(now);
  }

  /** The bucket of `key`, refilled for the time since it was last used. */
  #fill(key: string, limit: RateLimit, now: number): Bucket {
    const bucket = this.#buckets.get(key) ?? { tokens: limit.burst, at: now };
    bucket.tokens = Math.min(
      limit.burst,
      bucket.tokens + (now - bucket.at) / 1000 * limit.per_second,
    );
    bucket.at = now;
    this.#buckets.set(key, bucket);
    return bucket;
  }

  /** Forgets the buckets that would be full again: they hold nothing worth keeping. */
  #sweep(now: number): void {
    for (const [key, bucket] of this.#buckets) {
      const limit = key.startsWith("address ") ? this.perAddress : this.limit;
      if (
        bucket.tokens + (now - bucket.at) / 1000 * limit.per_second >=
          limit.burst
      ) {
        this.#buckets.delete(key);
      }
    }
  }
}

/** How many long-polls and streams one client, and one address, may hold at once. */
export type WaitLimit = { per_client: number; per_address: number };

/**
 * Counts the requests held open (long-polls and streams) per client (a proven token,
 * else the address) and per address over all its tokens; one more is 429
 * `too_many_waits`: a client cannot hold the process's connections and memory.
 */
export class WaitCaps {
  readonly limit: WaitLimit;
  readonly trustProxy: number;
  #held = new Map<string, number>();

  constructor(limit: WaitLimit, trustProxy = TRUST_PROXY) {
    this.limit = limit;
    this.trustProxy = trustProxy;
  }

  /**
   * Counts one more held request of `client` (null: the address is the client) from
   * the request's address, or throws; the returned function gives it back, once.
   */
  hold(c: Context, client: string | null): () => void {
    const from = `address ${address(c, this.trustProxy)}`;
    const mine = client === null ? from : `client ${client}`;
    const count = (key: string) => this.#held.get(key) ?? 0;
    if (count(mine) >= this.limit.per_client && mine !== from) {
      throw this.#refusal(`this token already holds ${this.limit.per_client}`);
    }
    const ceiling = client === null
      ? Math.min(this.limit.per_client, this.limit.per_address)
      : this.limit.per_address;
    if (count(from) >= ceiling) {
      throw this.#refusal(`this address already holds ${ceiling}`);
    }
    const keys = client === null ? [from] : [mine, from];
    for (const key of keys) this.#held.set(key, count(key) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      for (const key of keys) {
        const left = count(key) - 1;
        if (left > 0) this.#held.set(key, left);
        else this.#held.delete(key);
      }
    };
  }

  #refusal(why: string): ApiError {
    return new ApiError(
      "too_many_waits",
      `Too many long-polls and streams held at once: ${why}; end one, or poll without wait`,
      {
        max_waits_per_client: this.limit.per_client,
        max_waits_per_address: this.limit.per_address,
      },
    );
  }
}
