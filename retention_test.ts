/**
 * Retention (off by default): RETAIN_MESSAGES keeps the newest n of each room,
 * RETAIN_DAYS drops older messages and deletes idle rooms; a cursor that missed dropped
 * messages is 410 cursor_expired, never a silent jump.
 */
import assert from "node:assert/strict";
import { createApp } from "./main.ts";
import { sweep } from "./retention.ts";
import { caller, freshDb } from "./testing.ts";

const DAY_MS = 24 * 60 * 60 * 1000;

Deno.test("RETAIN_MESSAGES keeps the newest n of each room; a cursor below what was dropped is 410 cursor_expired", async () => {
  const { db, close } = await freshDb();
  try {
    const retain = { messages: 5, days: 0 };
    const call = caller(createApp({ db, rateLimit: null, retain }));
    for (const room of ["a", "b"]) await call("POST", "/rooms", { id: room });
    for (let i = 0; i < 12; i++) {
      await call("POST", "/rooms/a/messages", { body: i });
    }
    await call("POST", "/rooms/b/messages", { body: "b" });
    assert.deepEqual(await sweep(db, retain), { messages: 7, rooms: 0 });
    const ids = async (query: string) =>
      ((await call("GET", `/rooms/a/messages?${query}`)).body as {
        id: number;
      }[]).map((m) => m.id);
    assert.deepEqual(await ids("after=0"), [8, 9, 10, 11, 12]);
    // A reader that saw up to 7 missed nothing; one that saw up to 3 missed 4-7.
    assert.deepEqual(await ids("after=7"), [8, 9, 10, 11, 12]);
    const expired = await call("GET", "/rooms/a/messages?after=3");
    assert.equal(expired.status, 410);
    const body = expired.body as Record<string, unknown>;
    assert.equal(body.error, "cursor_expired");
    assert.equal(body.earliest_id, 8);
    assert.equal(body.dropped_through, 7);
    const waited = await call("GET", "/rooms/a/messages?after=3&wait=1");
    assert.equal(waited.status, 410);
    const stream = await call("GET", "/rooms/a/stream?after=3");
    assert.equal(stream.status, 410);
    // Room b kept its one message; a second sweep drops nothing.
    const b = (await call("GET", "/rooms/b/messages")).body as unknown[];
    assert.equal(b.length, 1);
    assert.deepEqual(await sweep(db, retain), { messages: 0, rooms: 0 });
    const limits = (await call("GET", "/limits")).body as Record<
      string,
      unknown
    >;
    assert.equal(limits.retain_messages, 5);
    assert.equal(limits.retain_days, null);
  } finally {
    await close();
  }
});

Deno.test("RETAIN_DAYS drops older messages and deletes rooms with no activity since", async () => {
  const { db, close } = await freshDb();
  try {
    const retain = { messages: 0, days: 2 };
    const call = caller(createApp({ db, rateLimit: null, retain }));
    for (const room of ["old", "busy"]) {
      await call("POST", "/rooms", { id: room });
      await call("POST", `/rooms/${room}/messages`, { body: "early" });
      await call("POST", `/rooms/${room}/messages`, { body: "later" });
    }
    // Three days back: every message is older than two days, and only "busy" is
    // written to since.
    const client = await db.client();
    await client.execute({
      sql: "UPDATE rooms SET created_at = created_at - ?",
      args: [3 * DAY_MS],
    });
    await client.execute({
      sql: "UPDATE messages SET created_at = created_at - ?",
      args: [3 * DAY_MS],
    });
    await client.execute({
      sql: "UPDATE agents SET last_seen = last_seen - ?",
      args: [3 * DAY_MS],
    });
    await call("PUT", "/rooms/busy/state", { key: "k", value: 1 });
    const swept = await sweep(db, retain);
    assert.deepEqual(swept, { messages: 4, rooms: 1 });
    assert.equal((await call("GET", "/rooms/old")).status, 404);
    assert.equal((await call("GET", "/rooms/busy")).status, 200);
    assert.deepEqual((await call("GET", "/rooms/busy/messages")).body, []);
    const expired = await call("GET", "/rooms/busy/messages?after=3");
    assert.equal(expired.status, 410);
    assert.equal(
      (expired.body as Record<string, unknown>).earliest_id,
      0,
    );
  } finally {
    await close();
  }
});
