/**
 * Test support shared by the suites: a fresh database per test, embedded (`:memory:`)
 * by default, or behind the Hrana test server when `SYNC_TEST_DATABASE=remote`, so the
 * same tests cover the remote libSQL path; and the real server as a process, for the
 * suites that need a socket (server, stress and browser tests).
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

const ROOT = new URL(".", import.meta.url).pathname;

/** A running `deno task start`. */
export type Server = {
  url: string;
  /** What the process printed so far. */
  output: () => string;
  /** Sends a signal and waits for the process to exit. */
  stop: (signal?: Deno.Signal) => Promise<Deno.CommandStatus>;
};

/** Runs `deno task start` on a free port of 127.0.0.1 with `env` and waits for it to listen. */
export async function startServer(
  env: Record<string, string>,
): Promise<Server> {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["task", "start"],
    cwd: ROOT,
    env: { PORT: "0", HOST: "127.0.0.1", NO_COLOR: "1", ...env },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let output = "";
  const stderr = child.stderr.pipeThrough(new TextDecoderStream()).pipeTo(
    new WritableStream({ write: (text) => void (output += text) }),
  );
  const listening = Promise.withResolvers<{ url: string; pid: number }>();
  const stdout = child.stdout.pipeThrough(new TextDecoderStream()).pipeTo(
    new WritableStream({
      write(text) {
        output += text;
        const match = output.match(
          /listening on (http:\/\/127\.0\.0\.1:\d+) \(pid (\d+)\)/,
        );
        if (match) listening.resolve({ url: match[1], pid: Number(match[2]) });
      },
    }),
  );
  const exited = child.status.then((status) => {
    listening.reject(
      new Error(
        `the server exited (${status.code}) before listening:\n${output}`,
      ),
    );
    return status;
  });
  let pid = child.pid;
  // Signals go to the server itself, not to `deno task`: SIGTERM would be forwarded,
  // but SIGKILL cannot be, and would leave the server running.
  const stop = async (signal: Deno.Signal = "SIGTERM") => {
    try {
      Deno.kill(pid, signal);
    } catch {
      // already gone
    }
    const status = await exited;
    await Promise.all([stdout, stderr]);
    return status;
  };
  try {
    const server = await listening.promise;
    pid = server.pid;
    return { url: server.url, output: () => output, stop };
  } catch (error) {
    await stop("SIGKILL");
    throw error;
  }
}
