/**
 * Stress tests against real `deno task start` processes, heavier than server_test.ts:
 * SIGKILL in the middle of concurrent writes and a restart on the same file (several
 * times), two instances on one file under concurrent load, and SIGTERM while writes,
 * long-polls and streams are in flight. Each test prints one summary line with its sizes.
 */
import assert from "node:assert/strict";
import { createClient } from "@libsql/client";
import { type Server, startServer, withTempDir } from "./testing.ts";

/** The real server, with no rate limit (the clients here are many and fast). */
const start = (env: Record<string, string>) =>
  startServer({ RATE_LIMIT: "0", ...env });

/**
 * What a request came to: the status and body, or status 0 when no whole answer arrived
 * (the connection failed or was cut, so the write may or may not have happened).
 */
type Answer = {
  status: number;
  body: unknown;
  headers: Headers;
  /** When it was sent and when it ended (performance.now()). */
  at: number;
  end: number;
};

/** Requests sent and not yet answered (or failed), across all clients. */
let outstanding = 0;

/** Sends one JSON request; never throws. */
async function send(
  url: string,
  method: string,
  body?: unknown,
  headers: Record<string, string> = {},
): Promise<Answer> {
  const t0 = performance.now();
  outstanding++;
  try {
    const res = await fetch(url, {
      method,
      headers: { "content-type": "application/json", ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    return {
      status: res.status,
      body: text === "" ? null : JSON.parse(text),
      headers: res.headers,
      at: t0,
      end: performance.now(),
    };
  } catch (error) {
    return {
      status: 0,
      body: `${error}${
        error instanceof Error && error.cause ? ` (${error.cause})` : ""
      }`,
      headers: new Headers(),
      at: t0,
      end: performance.now(),
    };
  } finally {
    outstanding--;
  }
}

/** A JSON call that must answer `status`; returns the body. */
async function call(
  base: string,
  method: string,
  path: string,
  status: number,
  body?: unknown,
): Promise<unknown> {
  const answer = await send(base + path, method, body);
  assert.equal(
    answer.status,
    status,
    `${method} ${path}: ${JSON.stringify(answer.body)}`,
  );
  return answer.body;
}

type Message = {
  id: number;
  kind: string;
  body: unknown;
  claimed_by: string | null;
  status: "open" | "held" | "done" | "dead";
  done_by: string | null;
};

type Entry = { key: string; value: unknown; version: number };

/** A message body the tests write: `tag` names the request that wrote it. */
type Tagged = { tag: string; seq: number };

function tagOf(message: Message): string {
  return (message.body as Tagged).tag;
}

/** Every message of room `room`, in log order. */
async function readLog(base: string, room: string): Promise<Message[]> {
  const out: Message[] = [];
  for (;;) {
    const page = (await call(
      base,
      "GET",
      `/rooms/${room}/messages?after=${out.at(-1)?.id ?? 0}&limit=1000`,
      200,
    )) as Message[];
    out.push(...page);
    if (page.length < 1000) return out;
  }
}

/** Asserts that ids only grow along the log (so none is repeated). */
function assertIdsIncrease(log: Message[], where: string) {
  for (let i = 1; i < log.length; i++) {
    assert.ok(
      log[i].id > log[i - 1].id,
      `${where}: id ${log[i].id} follows ${log[i - 1].id}`,
    );
  }
}

/** Counts answers by status ("0" when none arrived). */
class Tally {
  counts = new Map<number, number>();
  /** Bodies of the 5xx answers, for the failure message. */
  fives: string[] = [];

  add(answer: Answer): Answer {
    this.counts.set(answer.status, (this.counts.get(answer.status) ?? 0) + 1);
    if (answer.status >= 500) this.fives.push(JSON.stringify(answer.body));
    return answer;
  }

  get total(): number {
    let n = 0;
    for (const count of this.counts.values()) n += count;
    return n;
  }

  toString(): string {
    return [...this.counts].sort(([a], [b]) => a - b).map(([status, n]) =>
      `${status === 0 ? "no answer" : status}×${n}`
    ).join(" ");
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function pick<T>(items: readonly T[]): T {
  return items[Math.floor(Math.random() * items.length)];
}

/** Runs `step` until `load.stopping`; a failed assertion stops every loop of the load. */
async function repeat(
  load: { stopping: boolean },
  step: (i: number) => Promise<void>,
): Promise<void> {
  try {
    for (let i = 0; !load.stopping; i++) await step(i);
  } catch (error) {
    load.stopping = true;
    throw error;
  }
}

/** Milliseconds at percentile p of samples. */
function percentile(samples: number[], p: number): number {
  const sorted = [...samples].sort((x, y) => x - y);
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))];
}

/** Reads an SSE response to its end; the message ids, and how it ended. */
async function readStream(res: Response) {
  const ids: number[] = [];
  const events: string[] = [];
  let buffer = "";
  try {
    for await (const text of res.body!.pipeThrough(new TextDecoderStream())) {
      buffer += text;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const event = block.match(/^event: (.*)$/m)?.[1];
        if (event) events.push(event);
        const id = block.match(/^id: (\d+)$/m)?.[1];
        if (event === "message" && id) ids.push(Number(id));
      }
    }
    return { ids, events, error: null, end: performance.now() };
  } catch (error) {
    return { ids, events, error: String(error), end: performance.now() };
  }
}

/** What a server must never print under these loads: a lock error, any logged error. */
const TROUBLE = /locked|SQLITE_|error/i;

Deno.test("SIGKILL mid-stream loses no acknowledged write (posts, batches, counters, CAS, claims, completes), over 4 kills and restarts on one file", async () => {
  const CLIENTS = 8;
  const KILLS = 4;
  const COUNTERS = ["c0", "c1", "c2"];
  const CAS_KEYS = ["k0", "k1", "k2"];
  await withTempDir(async (dir) => {
    const env = { DATABASE_URL: `file:${dir}/sync.db` };
    const t0 = performance.now();
    const tally = new Tally();
    // What the clients were told. A request with no answer was in flight at a kill:
    // it may or may not have committed.
    const sent = new Set<string>();
    const ackedPosts = new Map<string, Message>();
    const unknownPosts = new Set<string>();
    /** Posts sent with an Idempotency-Key that got no answer: retried at the end. */
    const lostKeyed: { tag: string; request: unknown }[] = [];
    /** Batches (20 messages and an increment) that got no answer, by their tags. */
    const unknownBatches: string[][] = [];
    const ackedIds = new Set<number>();
    /** Counters: the value known for sure, and increments acked or unknown since. */
    const counter = new Map(
      COUNTERS.map((c) => [c, { base: 0, acked: 0, unknown: 0 }]),
    );
    /** CAS keys: the acked value of each version, and writes of unknown outcome. */
    const cas = new Map(
      CAS_KEYS.map((k) => [k, {
        byVersion: new Map<number, unknown>(),
        known: 1,
        unknown: 0,
      }]),
    );
    /** Claims: who was answered 200 for each message, and who 409 named as holder. */
    const claimedBy = new Map<number, Set<string>>();
    const namedHolder = new Map<number, Set<string>>();
    const unknownClaims = new Map<number, Set<string>>();
    /** Completes: who was answered 200, who was in flight at a kill (with its result's tag). */
    const completedBy = new Map<number, string>();
    const unknownCompletes = new Map<number, { agent: string; tag: string }>();
    const resultTags = new Map<number, string>();
    const namedDone = new Map<number, Set<string>>();
    const add = <K, V>(map: Map<K, Set<V>>, key: K, value: V) =>
      map.set(key, (map.get(key) ?? new Set()).add(value));
    let acked = 0;
    let committedUnknowns = 0;
    let server = await start(env);
    try {
      await call(server.url, "POST", "/rooms", 201, { id: "r" });
      for (const key of CAS_KEYS) {
        await call(server.url, "PUT", "/rooms/r/state", 200, {
          key,
          value: "initial",
        });
      }

      /** Checks everything acked so far against the restarted server's database. */
      const verify = async (base: string, where: string) => {
        const log = await readLog(base, "r");
        assertIdsIncrease(log, where);
        const byTag = new Map<string, Message>();
        for (const message of log) {
          const tag = tagOf(message);
          assert.ok(sent.has(tag), `${where}: a message nobody sent: ${tag}`);
          assert.ok(!byTag.has(tag), `${where}: ${tag} is in the log twice`);
          byTag.set(tag, message);
        }
        for (const [tag, message] of ackedPosts) {
          const found = byTag.get(tag);
          assert.ok(
            found,
            `${where}: acked post ${tag} (id ${message.id}) is lost`,
          );
          assert.equal(found.id, message.id, `${where}: ${tag} changed id`);
          assert.deepEqual(found.body, message.body);
        }
        for (const tag of unknownPosts) {
          // In flight at a kill: committed or not, but now known either way.
          const found = byTag.get(tag);
          if (found) {
            committedUnknowns++;
            ackedPosts.set(tag, found);
          }
        }
        unknownPosts.clear();
        for (const tags of unknownBatches) {
          const found = tags.flatMap((tag) => byTag.get(tag) ?? []);
          assert.ok(
            found.length === 0 || found.length === tags.length,
            `${where}: ${found.length} of a batch's ${tags.length} messages`,
          );
          if (found.length > 0) committedUnknowns++;
          found.forEach((message, i) => ackedPosts.set(tags[i], message));
        }
        unknownBatches.length = 0;
        assert.equal(log.length, ackedPosts.size, `${where}: log size`);

        for (const [key, c] of counter) {
          const read = await send(`${base}/rooms/r/state?key=${key}`, "GET");
          // Never incremented yet (or only in flight): absent reads as 0.
          const value = read.status === 404 ? 0 : (read.body as Entry).value;
          assert.equal(typeof value, "number", JSON.stringify(read.body));
          const low = c.base + c.acked;
          assert.ok(
            (value as number) >= low && (value as number) <= low + c.unknown,
            `${where}: counter ${key} is ${value}, acked ${low}, +${c.unknown} in flight`,
          );
          committedUnknowns += (value as number) - low;
          counter.set(key, { base: value as number, acked: 0, unknown: 0 });
        }

        for (const [key, c] of cas) {
          const entry = (await call(
            base,
            "GET",
            `/rooms/r/state?key=${key}`,
            200,
          )) as Entry;
          const top = Math.max(c.known, ...c.byVersion.keys());
          assert.ok(
            entry.version >= top,
            `${where}: ${key} is at version ${entry.version}, acked ${top}`,
          );
          assert.ok(
            entry.version <= top + c.unknown,
            `${where}: ${key} at ${entry.version}, acked ${top} +${c.unknown} in flight`,
          );
          if (entry.version === top && c.byVersion.has(top)) {
            assert.deepEqual(
              entry.value,
              c.byVersion.get(top),
              `${where}: ${key}`,
            );
          }
          committedUnknowns += entry.version - top;
          c.known = entry.version;
          c.unknown = 0;
        }

        // A complete in flight at a kill: done with its result, or neither.
        const byId = new Map(log.map((m) => [m.id, m]));
        for (const [id, { agent, tag }] of unknownCompletes) {
          const message = byId.get(id)!;
          const result = byTag.get(tag);
          assert.equal(
            message.status === "done",
            result !== undefined,
            `${where}: message ${id} is ${message.status}, its result ${
              result ? "is" : "is not"
            } in the log`,
          );
          if (result) {
            assert.equal(message.done_by, agent);
            completedBy.set(id, agent);
            resultTags.set(id, tag);
            committedUnknowns++;
          }
        }
        unknownCompletes.clear();
        for (const message of log) {
          const by = completedBy.get(message.id);
          if (by === undefined) {
            assert.notEqual(
              message.status,
              "done",
              `${where}: ${message.id} is done, but no complete was answered`,
            );
            continue;
          }
          // Done stays done: never open or held again, completed by its holder.
          assert.equal(message.status, "done", `${where}: ${message.id}`);
          assert.equal(
            message.done_by,
            by,
            `${where}: done_by of ${message.id}`,
          );
          assert.equal(message.claimed_by, null);
          assert.ok(byTag.has(resultTags.get(message.id)!), "its result");
          for (const named of namedDone.get(message.id) ?? []) {
            assert.equal(
              named,
              by,
              `${where}: 409 named ${named} for ${message.id}`,
            );
          }
        }
        const held = new Map(log.map((m) => [m.id, m.claimed_by]));
        for (const [id, agents] of claimedBy) {
          if (completedBy.has(id)) continue;
          const holders = new Set([...agents, ...namedHolder.get(id) ?? []]);
          assert.equal(
            holders.size,
            1,
            `${where}: message ${id} has holders ${[...holders]}`,
          );
          assert.equal(
            held.get(id),
            [...agents][0],
            `${where}: holder of ${id}`,
          );
        }
        for (const [id, holder] of held) {
          if (holder === null) continue;
          // No lease and no release: whoever holds it now was answered 200, or claimed it
          // in flight at a kill.
          const expected = new Set([
            ...claimedBy.get(id) ?? [],
            ...unknownClaims.get(id) ?? [],
          ]);
          assert.ok(expected.has(holder), `${where}: ${id} held by ${holder}`);
          for (const named of namedHolder.get(id) ?? []) {
            assert.equal(
              named,
              holder,
              `${where}: 409 named ${named} for ${id}`,
            );
          }
          if (!claimedBy.has(id)) committedUnknowns++;
          add(claimedBy, id, holder);
        }
        unknownClaims.clear();
        return log;
      };

      let cycleLast = 0;
      for (let cycle = 1; cycle <= KILLS; cycle++) {
        const base = server.url;
        const load = { stopping: false };
        const idsThisCycle: number[] = [];
        const recent: number[] = [...ackedIds].sort((a, b) => a - b).slice(-20);
        const client = (n: number) => {
          const agent = `agent${n}`;
          const known = new Map(CAS_KEYS.map((k) => [k, cas.get(k)!.known]));
          return repeat(load, async (seq) => {
            const roll = Math.random();
            if (roll < 0.35) {
              const tag = `k${cycle}-c${n}-${seq}`;
              const body = { tag, seq };
              const key = seq % 2 === 0 ? tag : undefined;
              const request = { from: agent, kind: "task", body };
              sent.add(tag);
              const answer = tally.add(
                await send(
                  `${base}/rooms/r/messages`,
                  "POST",
                  request,
                  key ? { "idempotency-key": key } : {},
                ),
              );
              if (answer.status === 201) {
                const message = answer.body as Message;
                ackedPosts.set(tag, message);
                assert.ok(
                  !ackedIds.has(message.id),
                  `id ${message.id} given twice`,
                );
                ackedIds.add(message.id);
                idsThisCycle.push(message.id);
                recent.push(message.id);
                if (recent.length > 20) recent.shift();
                acked++;
              } else if (answer.status === 0) {
                unknownPosts.add(tag);
                if (key) lostKeyed.push({ tag, request });
              }
            } else if (roll < 0.45) {
              // All or nothing: 20 messages of 1 KB and an increment in one transaction.
              const key = pick(COUNTERS);
              const tags = Array.from(
                { length: 20 },
                (_, i) => `k${cycle}-c${n}-${seq}-${i}`,
              );
              tags.forEach((tag) => sent.add(tag));
              const answer = tally.add(
                await send(`${base}/rooms/r/batch`, "POST", {
                  state: [{ key, increment: 1 }],
                  messages: tags.map((tag, i) => ({
                    from: agent,
                    kind: "batch",
                    body: { tag, seq: i, pad: "x".repeat(1000) },
                  })),
                }),
              );
              if (answer.status === 200) {
                const { messages } = answer.body as { messages: Message[] };
                messages.forEach((message, i) => {
                  ackedPosts.set(tags[i], message);
                  ackedIds.add(message.id);
                  idsThisCycle.push(message.id);
                });
                counter.get(key)!.acked++;
                acked++;
              } else if (answer.status === 0) {
                unknownBatches.push(tags);
                counter.get(key)!.unknown++;
              }
            } else if (roll < 0.6) {
              const key = pick(COUNTERS);
              const answer = tally.add(
                await send(`${base}/rooms/r/state`, "PUT", {
                  key,
                  increment: true,
                }),
              );
              if (answer.status === 200) counter.get(key)!.acked++, acked++;
              else if (answer.status === 0) counter.get(key)!.unknown++;
            } else if (roll < 0.8) {
              const key = pick(CAS_KEYS);
              const value = { by: agent, cycle, seq };
              const answer = tally.add(
                await send(`${base}/rooms/r/state`, "PUT", {
                  key,
                  value,
                  if_version: known.get(key),
                }),
              );
              if (answer.status === 200) {
                const entry = answer.body as Entry;
                const versions = cas.get(key)!.byVersion;
                assert.equal(entry.version, known.get(key)! + 1);
                assert.ok(
                  !versions.has(entry.version),
                  `two CAS winners for ${key} version ${entry.version}`,
                );
                versions.set(entry.version, value);
                known.set(key, entry.version);
                acked++;
              } else if (answer.status === 409) {
                const current = (answer.body as { current: Entry }).current;
                known.set(key, current.version);
              } else if (answer.status === 0) cas.get(key)!.unknown++;
            } else if (recent.length > 0) {
              const id = pick(recent);
              const answer = tally.add(
                await send(`${base}/rooms/r/messages/${id}/claim`, "POST", {
                  agent,
                }),
              );
              if (answer.status === 200) {
                add(claimedBy, id, agent), acked++;
                if (Math.random() < 0.5) return;
                // Finish the task: done, and its result posted, in one transaction.
                const tag = `k${cycle}-c${n}-${seq}-done`;
                sent.add(tag);
                const done = tally.add(
                  await send(
                    `${base}/rooms/r/messages/${id}/complete`,
                    "POST",
                    { agent, result: { body: { tag, seq } } },
                  ),
                );
                if (done.status === 200) {
                  const { result } = done.body as { result: Message };
                  completedBy.set(id, agent);
                  resultTags.set(id, tag);
                  ackedPosts.set(tag, result);
                  ackedIds.add(result.id);
                  idsThisCycle.push(result.id);
                  acked++;
                } else if (done.status === 0) {
                  unknownCompletes.set(id, { agent, tag });
                  unknownPosts.add(tag);
                } else {
                  assert.fail(`complete by its holder: ${done.status}`);
                }
              } else if (answer.status === 409) {
                const refusal = answer.body as {
                  error: string;
                  claimed_by?: string;
                  done_by?: string;
                };
                if (refusal.error === "already_completed") {
                  add(namedDone, id, refusal.done_by!);
                } else add(namedHolder, id, refusal.claimed_by!);
              } else if (answer.status === 0) add(unknownClaims, id, agent);
            }
          });
        };
        const clients = Array.from({ length: CLIENTS }, (_, n) => client(n));
        await sleep(1000 + Math.random() * 500);
        // Kill with requests in flight: every client is between send and answer.
        load.stopping = true;
        const sentAtKill = outstanding;
        const killed = server.stop("SIGKILL");
        await Promise.all(clients);
        await killed;
        assert.doesNotMatch(server.output(), TROUBLE);
        server = await start(env);
        const inFlight = unknownPosts.size +
          [...counter.values()].reduce((n, c) => n + c.unknown, 0) +
          [...cas.values()].reduce((n, c) => n + c.unknown, 0) +
          [...unknownClaims.values()].reduce((n, s) => n + s.size, 0) +
          unknownCompletes.size;
        const log = await verify(server.url, `after kill ${cycle}`);
        console.log(
          `  kill ${cycle}: ${sentAtKill} requests in flight, ${inFlight} unanswered, log ${log.length} messages`,
        );
        assert.ok(
          sentAtKill > 0,
          "the kill landed while requests were in flight",
        );
        // AUTOINCREMENT: no id is given out again after a crash.
        assert.ok(
          idsThisCycle.every((id) => id > cycleLast),
          "ids keep growing across restarts",
        );
        cycleLast = log.at(-1)?.id ?? 0;
      }

      // What the Idempotency-Key is for: a client whose post got no answer (the server
      // died) retries it with the same key, and gets one copy in the log either way.
      const retries = await Promise.all(
        lostKeyed.map(async ({ tag, request }) => {
          const answer = tally.add(
            await send(`${server.url}/rooms/r/messages`, "POST", request, {
              "idempotency-key": tag,
            }),
          );
          return { tag, answer };
        }),
      );
      let replayed = 0;
      for (const { tag, answer } of retries) {
        const first = ackedPosts.get(tag);
        assert.equal(
          answer.status,
          201,
          `retry of ${tag} (${
            first ? "committed" : "not committed"
          } before the kill): ${JSON.stringify(answer.body)}`,
        );
        const message = answer.body as Message;
        if (first) {
          replayed++;
          assert.equal(answer.headers.get("idempotent-replayed"), "true");
          assert.equal(message.id, first.id);
        } else {
          ackedPosts.set(tag, message);
          ackedIds.add(message.id);
        }
      }
      await verify(server.url, "after the retries");

      assert.deepEqual(tally.fives, [], "no 5xx reached a client");
      assert.doesNotMatch(server.output(), TROUBLE);
      console.log(
        `crash safety: ${CLIENTS} clients, ${tally.total} requests (${acked} writes acked; ${tally}), ` +
          `${KILLS} SIGKILLs, ${committedUnknowns} in-flight writes found committed, ` +
          `${ackedPosts.size} messages, ${completedBy.size} tasks done, nothing acked lost, ` +
          `${retries.length} keyed posts retried (${replayed} replayed), ${
            (performance.now() - t0).toFixed(0)
          } ms`,
      );
    } finally {
      await server.stop("SIGKILL");
    }
  });
});

Deno.test("two instances on one file under concurrent load: one CAS winner per version, one claim holder, exact counts, waiters woken across, no 5xx", async () => {
  const CLIENTS = 8;
  const CLAIMERS = 8;
  const LOAD_MS = 3000;
  await withTempDir(async (dir) => {
    const env = { DATABASE_URL: `file:${dir}/sync.db` };
    const t0 = performance.now();
    const a = await start(env);
    let b: Server | undefined;
    try {
      b = await start(env);
      const urls = [a.url, b.url];
      const tally = new Tally();
      /** Answers a step did not expect, with what was asked. */
      const unexpected: string[] = [];
      const expect = (what: string, answer: Answer, ...statuses: number[]) => {
        tally.add(answer);
        if (!statuses.includes(answer.status)) {
          unexpected.push(
            `${what}: ${answer.status} ${JSON.stringify(answer.body)}`,
          );
        }
        return answer.status;
      };
      await call(a.url, "POST", "/rooms", 201, { id: "r" });
      await call(b.url, "PUT", "/rooms/r/state", 200, {
        key: "cas",
        value: "initial",
      });
      await call(a.url, "PUT", "/rooms/r/state", 200, {
        key: "turn",
        value: 0,
      });
      const load = { stopping: false };
      const posts = new Map<string, Message>();
      let increments = 0;
      const casWins = new Map<number, unknown>();
      let casConflicts = 0;

      const client = (n: number) => {
        let known = 1;
        return repeat(load, async (seq) => {
          // Every client alternates between the instances.
          const base = urls[(n + seq) % 2];
          const roll = Math.random();
          if (roll < 0.4) {
            const tag = `c${n}-${seq}`;
            const answer = await send(`${base}/rooms/r/messages`, "POST", {
              from: `agent${n}`,
              body: { tag, seq },
            });
            if (expect("post", answer, 201) === 201) {
              posts.set(tag, answer.body as Message);
            }
          } else if (roll < 0.7) {
            const answer = await send(`${base}/rooms/r/state`, "PUT", {
              key: "n",
              increment: true,
            });
            if (expect("increment", answer, 200) === 200) increments++;
          } else {
            const value = { by: n, seq };
            const answer = await send(`${base}/rooms/r/state`, "PUT", {
              key: "cas",
              value,
              if_version: known,
            });
            const status = expect("cas", answer, 200, 409);
            if (status === 200) {
              const { version } = answer.body as Entry;
              assert.equal(version, known + 1);
              assert.ok(!casWins.has(version), `two CAS winners of ${version}`);
              casWins.set(version, value);
              known = version;
            } else if (status === 409) {
              casConflicts++;
              known = (answer.body as { current: Entry }).current.version;
            }
          }
        });
      };

      // Claim rounds: a new task, then CLAIMERS agents claim it at once from both
      // instances; exactly one holds it, and every 409 names that one.
      const winners = new Map<number, string>();
      const claimRounds = repeat(load, async (round) => {
        const tag = `task-${round}`;
        const posted = await send(
          `${urls[round % 2]}/rooms/r/messages`,
          "POST",
          {
            kind: "task",
            body: { tag, seq: round },
          },
        );
        if (expect("task", posted, 201) !== 201) return;
        const task = posted.body as Message;
        posts.set(tag, task);
        const answers = await Promise.all(
          Array.from(
            { length: CLAIMERS },
            (_, i) =>
              send(`${urls[i % 2]}/rooms/r/messages/${task.id}/claim`, "POST", {
                agent: `w${i}`,
              }),
          ),
        );
        answers.forEach((answer) => expect("claim", answer, 200, 409));
        const won = answers.flatMap((answer, i) =>
          answer.status === 200 ? [`w${i}`] : []
        );
        assert.equal(won.length, 1, `round ${round}: winners ${won}`);
        winners.set(task.id, won[0]);
        for (const answer of answers) {
          if (answer.status === 409) {
            assert.equal((answer.body as Message).claimed_by, won[0]);
          }
        }
      });

      // Wake rounds: waiters held on one instance, the write made on the other; they
      // answer with exactly that write. Messages and state keys take turns.
      const wakes: number[] = [];
      let wakeAfter = 0;
      let turn = 1;
      const wakeRounds = repeat(load, async (round) => {
        const [waitOn, writeOn] = round % 4 < 2 ? [a, b!] : [b!, a];
        if (round % 2 === 0) {
          const waiters = Array.from(
            { length: 3 },
            () =>
              send(
                `${waitOn.url}/rooms/r/messages?after=${wakeAfter}&kind=wake&wait=10`,
                "GET",
              ),
          );
          await sleep(100);
          const posted = await send(`${writeOn.url}/rooms/r/messages`, "POST", {
            kind: "wake",
            body: { tag: `wake-${round}`, seq: round },
          });
          expect("wake post", posted, 201);
          const message = posted.body as Message;
          posts.set(`wake-${round}`, message);
          for (const answer of await Promise.all(waiters)) {
            expect("message wait", answer, 200);
            assert.deepEqual(
              (answer.body as Message[]).map((m) => m.id),
              [message.id],
            );
            wakes.push(answer.end - posted.end);
          }
          wakeAfter = message.id;
        } else {
          const waiter = send(
            `${waitOn.url}/rooms/r/state?key=turn&after_version=${turn}&wait=10`,
            "GET",
          );
          await sleep(100);
          const written = await send(`${writeOn.url}/rooms/r/state`, "PUT", {
            key: "turn",
            value: round,
          });
          expect("turn", written, 200);
          const answer = await waiter;
          expect("state wait", answer, 200);
          assert.deepEqual(answer.body, written.body);
          wakes.push(answer.end - written.end);
          turn = (written.body as Entry).version;
        }
      });

      const loops = [
        ...Array.from({ length: CLIENTS }, (_, n) => client(n)),
        claimRounds,
        wakeRounds,
      ];
      await Promise.race([sleep(LOAD_MS), ...loops]);
      load.stopping = true;
      await Promise.all(loops);

      assert.deepEqual(
        unexpected,
        [],
        "every answer was one the step expected",
      );
      assert.deepEqual(tally.fives, [], "no 5xx reached a client");
      // Both instances read the same log: every acked post once, ids growing.
      const log = await readLog(a.url, "r");
      assert.deepEqual(await readLog(b.url, "r"), log);
      assertIdsIncrease(log, "log");
      const byTag = new Map(log.map((m) => [tagOf(m), m]));
      assert.equal(byTag.size, log.length, "no message is in the log twice");
      assert.equal(
        log.length,
        posts.size,
        "the log holds exactly the acked posts",
      );
      for (const [tag, message] of posts) {
        const found = byTag.get(tag);
        assert.ok(found, `acked post ${tag} is missing`);
        assert.equal(found.id, message.id);
        assert.deepEqual(found.body, message.body);
        if (winners.has(found.id)) {
          assert.equal(found.claimed_by, winners.get(found.id));
        }
      }
      // One CAS winner per version, and every version after the first was won by
      // exactly one acked write.
      const entry = (await call(
        b.url,
        "GET",
        "/rooms/r/state?key=cas",
        200,
      )) as Entry;
      assert.equal(entry.version, casWins.size + 1);
      assert.deepEqual(
        [...casWins.keys()].sort((x, y) => x - y),
        Array.from({ length: casWins.size }, (_, i) => i + 2),
      );
      assert.deepEqual(entry.value, casWins.get(entry.version));
      const n =
        (await call(a.url, "GET", "/rooms/r/state?key=n", 200)) as Entry;
      assert.equal(n.value, increments, "increments over both add exactly");
      assert.ok(wakes.length > 0 && winners.size > 0);
      assert.ok(
        Math.max(...wakes) < 2000,
        `a waiter was woken ${
          Math.max(...wakes).toFixed(0)
        } ms after the write`,
      );
      for (const server of [a, b]) {
        assert.doesNotMatch(server.output(), TROUBLE);
      }
      console.log(
        `two instances: ${CLIENTS} clients + ${CLAIMERS} claimers + 3 waiters, ${tally.total} requests ` +
          `(${tally}), ${posts.size} posts, ${casWins.size} CAS wins / ${casConflicts} conflicts, ` +
          `${increments} increments, ${winners.size} claim rounds with one holder each, ` +
          `${wakes.length} cross-instance wakes (p50 ${
            percentile(wakes, 0.5).toFixed(0)
          } ms, max ${Math.max(...wakes).toFixed(0)} ms), 0 5xx, ${
            (performance.now() - t0).toFixed(0)
          } ms`,
      );
    } finally {
      await a.stop();
      await b?.stop();
    }
  });
});

Deno.test("SIGTERM under load: in-flight writes finish or get 503 shutting_down, waits and streams end, exit 0 within 5 s", async () => {
  const CLIENTS = 8;
  await withTempDir(async (dir) => {
    const env = { DATABASE_URL: `file:${dir}/sync.db` };
    const t0 = performance.now();
    let server = await start(env);
    try {
      const base = server.url;
      await call(base, "POST", "/rooms", 201, { id: "r" });
      await call(base, "PUT", "/rooms/r/state", 200, {
        key: "quiet",
        value: 1,
      });
      // Held until the drain: nothing will match them.
      const polls = Array.from(
        { length: 4 },
        () => send(`${base}/rooms/r/messages?kind=never&wait=50`, "GET"),
      );
      const stateWaits = Array.from(
        { length: 2 },
        () =>
          send(
            `${base}/rooms/r/state?key=quiet&after_version=1&wait=50`,
            "GET",
          ),
      );
      const streams = Array.from(
        { length: 2 },
        () => fetch(`${base}/rooms/r/stream?after=0`).then(readStream),
      );

      type Write = {
        tags: string[];
        increments: number;
        answer: Answer;
      };
      const writes: Write[] = [];
      const tally = new Tally();
      const writer = async (n: number) => {
        for (let seq = 0;; seq++) {
          const roll = Math.random();
          const tag = `c${n}-${seq}`;
          let write: Write;
          if (roll < 0.4) {
            // Half of the posts carry an Idempotency-Key (a second write stores the answer).
            write = {
              tags: [tag],
              increments: 0,
              answer: await send(
                `${base}/rooms/r/messages`,
                "POST",
                { body: { tag, seq } },
                seq % 2 ? { "idempotency-key": tag } : {},
              ),
            };
          } else if (roll < 0.7) {
            const tags = Array.from({ length: 20 }, (_, i) => `${tag}-${i}`);
            write = {
              tags,
              increments: 1,
              answer: await send(`${base}/rooms/r/batch`, "POST", {
                state: [{ key: "n", increment: 1 }],
                messages: tags.map((t, i) => ({
                  kind: "batch",
                  body: { tag: t, seq: i, pad: "x".repeat(500) },
                })),
              }),
            };
          } else {
            write = {
              tags: [],
              increments: 1,
              answer: await send(`${base}/rooms/r/state`, "PUT", {
                key: "n",
                increment: true,
              }),
            };
          }
          writes.push(write);
          tally.add(write.answer);
          // Refused (draining) or no answer (the process is gone): this client is done.
          if (write.answer.status === 503 || write.answer.status === 0) return;
        }
      };
      const writers = Array.from({ length: CLIENTS }, (_, n) => writer(n));
      await sleep(1000);

      const signalled = performance.now();
      const status = await server.stop("SIGTERM");
      const took = performance.now() - signalled;
      await Promise.all(writers);
      assert.equal(status.code, 0, server.output());
      assert.ok(took < 5000, `exited ${took.toFixed(0)} ms after SIGTERM`);
      assert.doesNotMatch(server.output(), TROUBLE);

      // Long-polls were held until the drain, then answered at once with what they had.
      for (const answer of await Promise.all(polls)) {
        assert.deepEqual([answer.status, answer.body], [200, []]);
        assert.ok(answer.end > signalled, "held until SIGTERM");
        assert.ok(answer.end - signalled < 2000, "answered at once on SIGTERM");
      }
      for (const answer of await Promise.all(stateWaits)) {
        assert.equal(answer.status, 200);
        assert.equal((answer.body as Entry).version, 1);
        assert.ok(answer.end > signalled && answer.end - signalled < 2000);
      }
      const ended = await Promise.all(streams);
      for (const stream of ended) {
        assert.equal(stream.error, null, "the stream ended cleanly");
        assert.ok(stream.events.includes("ready"));
        assert.ok(stream.end > signalled && stream.end - signalled < 4000);
        for (let i = 1; i < stream.ids.length; i++) {
          assert.ok(stream.ids[i] > stream.ids[i - 1], "stream ids grow");
        }
      }

      // Every answer is a 2xx or 503 shutting_down; "no answer" is checked below.
      for (const { answer } of writes) {
        if (answer.status >= 300) {
          assert.equal(answer.status, 503, JSON.stringify(answer.body));
          assert.equal(
            (answer.body as { error: string }).error,
            "shutting_down",
          );
        }
      }
      const acked = writes.filter((w) =>
        w.answer.status > 0 && w.answer.status < 300
      );
      const inFlight = writes.filter((w) =>
        w.answer.at < signalled && w.answer.end > signalled
      );
      assert.ok(inFlight.length > 0, "SIGTERM landed with writes in flight");
      const finished = inFlight.filter((w) =>
        w.answer.status > 0 && w.answer.status < 300
      ).length;
      const refused = inFlight.filter((w) => w.answer.status === 503).length;
      const cut = inFlight.filter((w) => w.answer.status === 0);
      const late = writes.filter((w) =>
        w.answer.at >= signalled && w.answer.status === 0
      ).length;

      // After a restart the database holds exactly the acknowledged writes: nothing
      // refused or left without an answer was written.
      server = await start(env);
      const log = await readLog(server.url, "r");
      assertIdsIncrease(log, "log");
      assert.deepEqual(
        log.map(tagOf).sort(),
        acked.flatMap((w) => w.tags).sort(),
        "the log is exactly the acked posts",
      );
      const present = new Set(log.map((m) => m.id));
      for (const stream of ended) {
        assert.ok(
          stream.ids.every((id) => present.has(id)),
          "what the streams showed persists",
        );
      }
      const n =
        (await call(server.url, "GET", "/rooms/r/state?key=n", 200)) as Entry;
      assert.equal(n.value, acked.reduce((sum, w) => sum + w.increments, 0));
      console.log(
        `graceful shutdown: ${CLIENTS} writers + 4 long-polls + 2 state waits + 2 streams, ` +
          `${writes.length} writes (${tally}), ${inFlight.length} in flight at SIGTERM ` +
          `(${finished} finished 2xx, ${refused} refused 503, ${cut.length} cut with no answer), ` +
          `${late} sent after SIGTERM got no answer, exit 0 in ${
            took.toFixed(0)
          } ms, ` +
          `${log.length} messages after restart = exactly the acked ones, ${
            (performance.now() - t0).toFixed(0)
          } ms`,
      );
      // A write sent before SIGTERM is answered: it finishes, or is refused with 503.
      // Without an answer a client cannot tell whether a POST happened.
      assert.deepEqual(
        cut.map((w) =>
          `sent ${
            (signalled - w.answer.at).toFixed(0)
          } ms before SIGTERM: ${w.answer.body}`
        ),
        [],
        "writes sent before SIGTERM were cut without an answer",
      );
    } finally {
      await server.stop("SIGKILL");
    }
  });
});

Deno.test("a keyed post whose answer could not be stored is not wedged: the retry gets one copy and an answer", async () => {
  // A keyed post is two writes: the message with its key taken (no answer yet), then
  // the answer. A crash between them (SIGKILL, the drain's 10 s limit) or a failed
  // second write leaves the key taken with no answer. A SIGKILL cannot be aimed at that
  // gap from outside, so the second write is made to fail here, by a trigger the test
  // adds to the database file.
  await withTempDir(async (dir) => {
    const url = `file:${dir}/sync.db`;
    const server = await start({ DATABASE_URL: url });
    const db = createClient({ url });
    try {
      await call(server.url, "POST", "/rooms", 201, { id: "r" });
      await db.execute("PRAGMA busy_timeout = 5000");
      // json('x') fails: any write that stores an answer for a key fails with it.
      for (const event of ["INSERT", "UPDATE"]) {
        await db.execute(
          `CREATE TRIGGER fail_answer_${event} BEFORE ${event} ON idempotency
           WHEN NEW.status IS NOT NULL BEGIN SELECT json('x'); END`,
        );
      }
      const post = () =>
        send(
          `${server.url}/rooms/r/messages`,
          "POST",
          { body: "once" },
          { "idempotency-key": "k1" },
        );
      const first = await post();
      for (const event of ["INSERT", "UPDATE"]) {
        await db.execute(`DROP TRIGGER fail_answer_${event}`);
      }
      const retry = await post();
      const log = await readLog(server.url, "r");
      console.log(
        `idempotency after a failed answer: first ${first.status}, retry ${retry.status} after ${
          (retry.end - retry.at).toFixed(0)
        } ms, ${log.length} message(s) in the log`,
      );
      assert.equal(log.length, 1, "written once");
      assert.equal(retry.status, 201, JSON.stringify(retry.body));
      assert.equal((retry.body as Message).id, log[0].id);
    } finally {
      db.close();
      await server.stop();
    }
  });
});
