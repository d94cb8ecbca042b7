/**
 * Test support shared by the in-process suites: a fresh database per test, embedded
 * (`:memory:`) by default, or behind the Hrana test server when
 * `SYNC_TEST_DATABASE=remote`, so the same tests cover the remote libSQL path.
 */
import { Db } from "./db.ts";
import { startHranaServer } from "./hrana_server.ts";

/** Which database path the suite runs against. */
export const TEST_DATABASE = Deno.env.get("SYNC_TEST_DATABASE") === "remote"
  ? "remote"
  : "embedded";

/** A fresh, empty database, and how to close it (and its server). */
export async function freshDb(): Promise<
  { db: Db; close: () => Promise<void> }
> {
  if (TEST_DATABASE === "embedded") {
    const db = new Db({ url: ":memory:" });
    return { db, close: () => Promise.resolve(db.close()) };
  }
  const server = await startHranaServer();
  const db = new Db({ url: server.url });
  return {
    db,
    close: async () => {
      db.close();
      await server.close();
    },
  };
}
