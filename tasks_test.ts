/**
 * The task lifecycle (SPEC §3, "Task lifecycle"): claim → complete, attempts, dead
 * letters, the status filter, and the races between complete, release and a lease
 * running out. In-process, on a fresh database per test (embedded or remote).
 */
import assert from "node:assert/strict";
import type { Message } from "./db.ts";
import { createApp } from "./main.ts";
import {
  type Call,
  caller,
  freshDb,
  message,
  type Reply,
  times,
} from "./testing.ts";

type Completed = { completed: boolean; message: Message; result: Message };

/** A test with its own app and room "r". */
function test(name: string, fn: (call: Call) => Promise<void>) {
  Deno.test(name, async () => {
    const { db, close } = await freshDb();
    try {
      const call = caller(createApp({ db, rateLimit: null }));
      assert.equal((await call("POST", "/rooms", { id: "r" })).status, 201);
      await fn(call);
    } finally {
      await close();
    }
  });
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Posts a task and answers its id. */
async function task(call: Call, body: unknown, more = {}): Promise<number> {
  const res = await call("POST", "/rooms/r/messages", {
    kind: "task",
    body,
    ...more,
  });
  assert.equal(res.status, 201, JSON.stringify(res.body));
  return (res.body as Message).id;
}

const claim = (call: Call, id: number, agent: string, lease?: number) =>
  call("POST", `/rooms/r/messages/${id}/claim`, { agent, lease });
const release = (call: Call, id: number, agent: string) =>
  call("POST", `/rooms/r/messages/${id}/release`, { agent });
const complete = (
  call: Call,
  id: number,
  agent: string,
  result?: unknown,
  headers?: Record<string, string>,
) =>
  call(
    "POST",
    `/rooms/r/messages/${id}/complete`,
    result === undefined ? { agent } : { agent, result },
    headers,
  );

/** The message as GET messages shows it. */
async function read(call: Call, id: number): Promise<Message> {
  const res = await call("GET", `/rooms/r/messages?after=${id - 1}&limit=1`);
  return (res.body as Message[])[0];
}

/** Asserts a 409 with this error code and details, as `times()` leaves it. */
function assertRefused(
  res: Reply,
  error: string,
  details: Record<string, unknown>,
) {
  assert.equal(res.status, 409, JSON.stringify(res.body));
  assert.deepEqual(times(res.body), {
    error,
    message: "<message>",
    ...details,
  });
}

/** The `times()` shape of a task message of room "r". */
function shape(id: number, body: unknown, more: Record<string, unknown> = {}) {
  return message(id, body, { kind: "task", ...more });
}

test("a new message is open, with no attempts and no limit", async (call) => {
  const id = await task(call, "job");
  assert.deepEqual(times(await read(call, id)), shape(id, "job"));
  const limited = await task(call, "job", { max_attempts: 3 });
  assert.deepEqual(
    times(await read(call, limited)),
    shape(limited, "job", { max_attempts: 3 }),
  );
});

test("complete marks the message done and posts the result as a reply, in one answer", async (call) => {
  const id = await task(call, { n: 1 });
  assert.equal((await claim(call, id, "w1", 30)).status, 200);
  const res = await complete(call, id, "w1", { body: { sum: 2 } });
  assert.equal(res.status, 200);
  const answer = res.body as Completed;
  assert.deepEqual(times(answer), {
    completed: true,
    message: shape(id, { n: 1 }, {
      status: "done",
      attempts: 1,
      done_at: "<time>",
      done_by: "w1",
    }),
    result: shape(answer.result.id, { sum: 2 }, {
      from_agent: "w1",
      kind: "result",
      reply_to: id,
    }),
  });
  assert.equal(answer.result.created_at, answer.message.done_at);
  assert.deepEqual(await read(call, id), answer.message);
  const thread = await call("GET", `/rooms/r/messages?thread=${id}`);
  assert.deepEqual(thread.body, [answer.message, answer.result]);
});

test("complete without a result posts nothing; a result may name its kind and addressee", async (call) => {
  const id = await task(call, "a");
  await claim(call, id, "w1");
  const bare = await complete(call, id, "w1");
  assert.equal(bare.status, 200);
  assert.equal((bare.body as Completed).result, null);
  const all = await call("GET", "/rooms/r/messages");
  assert.equal((all.body as Message[]).length, 1);
  const other = await task(call, "b");
  await claim(call, other, "w1");
  const named = await complete(call, other, "w1", {
    body: "x",
    kind: "report",
    to: "planner",
  });
  const result = (named.body as Completed).result;
  assert.deepEqual(
    [result.kind, result.to_agent, result.from_agent, result.reply_to],
    ["report", "planner", "w1", other],
  );
});

test("only the holder completes: another agent, or nobody holding, is 409 not_holder and writes nothing", async (call) => {
  const id = await task(call, "job");
  const free = await complete(call, id, "w1", { body: 1 });
  assertRefused(free, "not_holder", {
    claimed_by: null,
    claimed_at: null,
    lease_expires_at: null,
  });
  await claim(call, id, "w1", 30);
  const other = await complete(call, id, "w2", { body: 1 });
  assertRefused(other, "not_holder", {
    claimed_by: "w1",
    claimed_at: "<time>",
    lease_expires_at: "<time>",
  });
  const all = (await call("GET", "/rooms/r/messages")).body as Message[];
  assert.equal(all.length, 1);
  assert.equal(all[0].status, "held");
});

test("a done message answers claim, release and complete with 409 already_completed", async (call) => {
  const id = await task(call, "job");
  await claim(call, id, "w1");
  await complete(call, id, "w1");
  for (
    const res of [
      await claim(call, id, "w2"),
      await release(call, id, "w1"),
      await complete(call, id, "w1"),
    ]
  ) {
    assertRefused(res, "already_completed", {
      done_by: "w1",
      done_at: "<time>",
    });
  }
  const after = await read(call, id);
  assert.equal(after.status, "done");
  assert.equal(after.attempts, 1);
});

test("the room token may complete for the holder; an agent token only for itself", async (call) => {
  const room = (await call("POST", "/rooms", { id: "t" })).body as {
    token: string;
  };
  const w1 = (await call("POST", "/rooms/t/agents", { id: "w1", name: "W1" }))
    .body as { token: string };
  const w2 = (await call("POST", "/rooms/t/agents", { id: "w2", name: "W2" }))
    .body as { token: string };
  const as = (token: string) => ({ authorization: `Bearer ${token}` });
  const posted = await call("POST", "/rooms/t/messages", { body: "job" });
  const id = (posted.body as Message).id;
  const path = `/rooms/t/messages/${id}`;
  assert.equal(
    (await call("POST", `${path}/claim`, {}, as(w1.token))).status,
    200,
  );
  const mismatch = await call(
    "POST",
    `${path}/complete`,
    { agent: "w1" },
    as(w2.token),
  );
  assert.equal(mismatch.status, 403);
  assert.equal((mismatch.body as { error: string }).error, "identity_mismatch");
  const own = await call("POST", `${path}/complete`, {}, as(w2.token));
  assert.equal((own.body as { error: string }).error, "not_holder");
  const admin = await call(
    "POST",
    `${path}/complete`,
    { agent: "w1", result: { body: "ok" } },
    as(room.token),
  );
  assert.equal(admin.status, 200);
  assert.equal((admin.body as Completed).message.done_by, "w1");
  assert.equal((admin.body as Completed).result.from_agent, "w1");
});

test("a task whose worker died comes back after its lease, with attempts 2 on the next claim", async (call) => {
  const id = await task(call, "job");
  assert.equal((await claim(call, id, "w1", 0.1)).status, 200);
  // w1 never completes. Until the lease runs out the task is held.
  assert.equal((await read(call, id)).status, "held");
  await sleep(150);
  assert.deepEqual(
    times(await read(call, id)),
    shape(id, "job", { attempts: 1 }),
  );
  const again = await claim(call, id, "w2", 30);
  assert.equal(again.status, 200);
  const message = (again.body as { message: Message }).message;
  assert.deepEqual([message.status, message.attempts, message.claimed_by], [
    "held",
    2,
    "w2",
  ]);
  // w1 comes back to life and tries to finish: its lease ran out, it must drop the work.
  const late = await complete(call, id, "w1", { body: "late" });
  assert.equal(late.status, 409);
  assert.equal((late.body as { error: string }).error, "not_holder");
  assert.equal((await complete(call, id, "w2", { body: "ok" })).status, 200);
});

test("renewing a live claim is not another attempt", async (call) => {
  const id = await task(call, "job", { max_attempts: 1 });
  await claim(call, id, "w1", 5);
  const renewed = await claim(call, id, "w1", 10);
  assert.equal(renewed.status, 200);
  assert.equal((renewed.body as { message: Message }).message.attempts, 1);
});

test("max_attempts: a release or a lapse on the last attempt makes the message dead; claiming it is 409 attempts_exhausted", async (call) => {
  const id = await task(call, "job", { max_attempts: 2 });
  await claim(call, id, "w1");
  await release(call, id, "w1");
  assert.equal((await read(call, id)).status, "open");
  await claim(call, id, "w2", 0.05);
  await sleep(100);
  assert.deepEqual(
    times(await read(call, id)),
    shape(id, "job", { status: "dead", attempts: 2, max_attempts: 2 }),
  );
  const refused = await claim(call, id, "w3");
  assertRefused(refused, "attempts_exhausted", {
    attempts: 2,
    max_attempts: 2,
  });
  const dead = await call("GET", "/rooms/r/messages?status=dead");
  assert.deepEqual((dead.body as Message[]).map((m) => m.id), [id]);
  const released = await task(call, "other", { max_attempts: 1 });
  await claim(call, released, "w1");
  await release(call, released, "w1");
  assert.equal((await read(call, released)).status, "dead");
});

test("max_attempts is 1 to 100, in a post and in a batch", async (call) => {
  for (const bad of [0, 101, 1.5, "3"]) {
    const res = await call("POST", "/rooms/r/messages", {
      body: 1,
      max_attempts: bad,
    });
    assert.equal(res.status, 400, `max_attempts ${bad}`);
    assert.equal((res.body as { field: string }).field, "max_attempts");
  }
  const batch = await call("POST", "/rooms/r/batch", {
    messages: [{ kind: "task", body: 1, max_attempts: 5 }],
  });
  assert.equal(batch.status, 200);
  const [posted] = (batch.body as { messages: Message[] }).messages;
  assert.equal(posted.max_attempts, 5);
  assert.equal((await read(call, posted.id)).max_attempts, 5);
});

test("status= filters GET messages and context; unclaimed=true is status=open", async (call) => {
  const open = await task(call, "open");
  const held = await task(call, "held");
  const done = await task(call, "done");
  const dead = await task(call, "dead", { max_attempts: 1 });
  await claim(call, held, "w1");
  await claim(call, done, "w1");
  await complete(call, done, "w1");
  await claim(call, dead, "w1");
  await release(call, dead, "w1");
  const ids = async (query: string) =>
    ((await call("GET", `/rooms/r/messages?${query}`)).body as Message[]).map(
      (m) => m.id,
    );
  assert.deepEqual(await ids("status=open"), [open]);
  assert.deepEqual(await ids("status=held"), [held]);
  assert.deepEqual(await ids("status=done"), [done]);
  assert.deepEqual(await ids("status=dead"), [dead]);
  assert.deepEqual(await ids("status=open,dead"), [open, dead]);
  assert.deepEqual(await ids("unclaimed=true"), [open]);
  assert.deepEqual(await ids("unclaimed=false"), [held]);
  assert.deepEqual(await ids("status=done&unclaimed=true"), []);
  const context = await call("GET", "/rooms/r/context?status=open,held");
  const messages = (context.body as {
    messages: { items: Message[]; total: number };
  }).messages;
  assert.deepEqual(messages.items.map((m) => m.id), [open, held]);
  assert.equal(messages.total, 2);
  for (const bad of ["status=finished", "status=", "status=open,,held"]) {
    const res = await call("GET", `/rooms/r/messages?${bad}`);
    assert.equal(res.status, 400, bad);
    assert.match((res.body as { field: string }).field, /^status/);
  }
});

test("a wait on status=open is woken by a release, and by a lease running out, within milliseconds", async (call) => {
  const id = await task(call, "job");
  await claim(call, id, "w1", 30);
  let started = performance.now();
  const [woken] = await Promise.all([
    call("GET", "/rooms/r/messages?status=open&wait=5"),
    sleep(50).then(() => release(call, id, "w1")),
  ]);
  assert.deepEqual((woken.body as Message[]).map((m) => m.id), [id]);
  assert.ok(performance.now() - started < 1000);
  await claim(call, id, "w2", 0.2);
  started = performance.now();
  const lapsed = await call("GET", "/rooms/r/messages?status=open&wait=5");
  const waited = performance.now() - started;
  assert.deepEqual((lapsed.body as Message[]).map((m) => m.attempts), [2]);
  assert.ok(waited >= 100 && waited < 1000, `answered after ${waited} ms`);
});

test("a wait on status=done is woken by the complete", async (call) => {
  const id = await task(call, "job");
  await claim(call, id, "w1");
  const started = performance.now();
  const [woken] = await Promise.all([
    call("GET", "/rooms/r/messages?status=done&wait=5"),
    sleep(50).then(() => complete(call, id, "w1", { body: "ok" })),
  ]);
  assert.deepEqual((woken.body as Message[]).map((m) => m.id), [id]);
  assert.ok(performance.now() - started < 1000);
});

test("an Idempotency-Key on complete replays the first answer and posts one result", async (call) => {
  const id = await task(call, "job");
  await claim(call, id, "w1");
  const key = { "idempotency-key": "done-1" };
  const first = await complete(call, id, "w1", { body: "r" }, key);
  const second = await complete(call, id, "w1", { body: "r" }, key);
  assert.equal(first.status, 200);
  assert.equal(second.status, 200);
  assert.deepEqual(second.body, first.body);
  assert.equal(second.headers.get("idempotent-replayed"), "true");
  const all = (await call("GET", "/rooms/r/messages")).body as Message[];
  assert.equal(all.length, 2);
});

test("two holders cannot both complete: exactly one wins, the other is not_holder or already_completed", async (call) => {
  for (let round = 0; round < 10; round++) {
    const id = await task(call, round);
    await claim(call, id, "w1");
    const answers = await Promise.all([
      complete(call, id, "w1", { body: "a" }),
      complete(call, id, "w1", { body: "b" }),
      complete(call, id, "w2", { body: "c" }),
    ]);
    const won = answers.filter((a) => a.status === 200);
    assert.equal(won.length, 1, `round ${round}`);
    for (const lost of answers.filter((a) => a.status !== 200)) {
      assert.equal(lost.status, 409);
      assert.ok(
        ["not_holder", "already_completed"].includes(
          (lost.body as { error: string }).error,
        ),
      );
    }
    const thread = await call("GET", `/rooms/r/messages?thread=${id}`);
    assert.equal((thread.body as Message[]).length, 2, "one result");
  }
});

test("complete racing release: exactly one takes effect", async (call) => {
  for (let round = 0; round < 10; round++) {
    const id = await task(call, round);
    await claim(call, id, "w1");
    const [done, released] = await Promise.all([
      complete(call, id, "w1", { body: "r" }),
      release(call, id, "w1"),
    ]);
    const after = await read(call, id);
    if (done.status === 200) {
      assert.equal(after.status, "done");
      assert.equal(released.status, 409);
      assert.equal(
        (released.body as { error: string }).error,
        "already_completed",
      );
    } else {
      assert.equal(after.status, "open");
      assert.equal((done.body as { error: string }).error, "not_holder");
      assert.equal((released.body as { released: boolean }).released, true);
    }
  }
});

test("complete racing the lease running out: done with its result, or open with none", async (call) => {
  for (let round = 0; round < 8; round++) {
    const id = await task(call, round);
    await claim(call, id, "w1", 0.02);
    await sleep(15 + round);
    const done = await complete(call, id, "w1", { body: "r" });
    const after = await read(call, id);
    const thread = (await call("GET", `/rooms/r/messages?thread=${id}`))
      .body as Message[];
    if (done.status === 200) {
      assert.equal(after.status, "done");
      assert.equal(thread.length, 2);
    } else {
      assert.equal((done.body as { error: string }).error, "not_holder");
      assert.equal(after.status, "open");
      assert.equal(thread.length, 1);
    }
  }
});

test("twenty tasks, three plain workers: every task is done exactly once", async (call) => {
  const tasks = (await Promise.all(
    Array.from({ length: 20 }, (_, i) => task(call, { n: i })),
  )).sort((a, b) => a - b);
  const started = performance.now();
  const did: Record<string, number[]> = { w1: [], w2: [], w3: [] };
  let refusals = 0;
  const worker = async (agent: string) => {
    for (;;) {
      const open = await call(
        "GET",
        "/rooms/r/messages?kind=task&status=open&limit=5&wait=0.2",
      );
      const ready = open.body as Message[];
      if (ready.length === 0) return;
      for (const t of ready) {
        const claimed = await claim(call, t.id, agent, 30);
        if (claimed.status !== 200) {
          refusals++;
          continue;
        }
        const done = await complete(call, t.id, agent, {
          body: { n: (t.body as { n: number }).n, by: agent },
        });
        assert.equal(done.status, 200);
        did[agent].push(t.id);
        break;
      }
    }
  };
  await Promise.all(Object.keys(did).map(worker));
  const elapsed = performance.now() - started;
  const results = (await call("GET", "/rooms/r/messages?kind=result"))
    .body as Message[];
  const finished = Object.values(did).flat();
  assert.deepEqual([...finished].sort((a, b) => a - b), tasks);
  assert.equal(results.length, 20);
  assert.deepEqual(
    results.map((r) => r.reply_to).sort((a, b) => a! - b!),
    tasks,
  );
  const statuses =
    ((await call("GET", "/rooms/r/messages?kind=task")).body as Message[]).map((
      m,
    ) => m.status);
  assert.deepEqual(new Set(statuses), new Set(["done"]));
  console.log(
    `20 tasks, 3 workers: ${results.length} results, ${
      finished.length - new Set(finished).size
    } duplicates, ${refusals} refused claims, ${Math.round(elapsed)} ms`,
  );
});
