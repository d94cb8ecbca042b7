/**
 * The processes the benchmark starts: the service (`deno task start`), the bare Hono
 * app and the raw-driver loop. Every one is tracked, so `stopAll` ends them on success,
 * failure or Ctrl-C.
 */

const ROOT = new URL("..", import.meta.url).pathname;

/** A server process that printed "listening on http://HOST:PORT (pid N)". */
export type Server = {
  name: string;
  url: string;
  /** The pid of the server itself (not of `deno task`). */
  pid: number;
  /** The last few KB of what it printed. */
  output: () => string;
  /** Whether it exited by itself, and how (undefined while it runs). */
  exited: () => Deno.CommandStatus | undefined;
  /** SIGTERM, then SIGKILL if it has not exited within `graceMs`. */
  stop: (graceMs?: number) => Promise<void>;
};

const running = new Set<Server>();

/** Starts a server process and waits for its "listening on" line. */
async function startServer(
  name: string,
  args: string[],
  env: Record<string, string>,
): Promise<Server> {
  const child = new Deno.Command(Deno.execPath(), {
    args,
    cwd: ROOT,
    env: { PORT: "0", HOST: "127.0.0.1", NO_COLOR: "1", ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let output = "";
  let status: Deno.CommandStatus | undefined;
  const listening = Promise.withResolvers<{ url: string; pid: number }>();
  // Both pipes are read to the end, so a chatty server never blocks on a full pipe.
  const collect = (stream: ReadableStream<Uint8Array<ArrayBuffer>>) =>
    stream.pipeThrough(new TextDecoderStream()).pipeTo(
      new WritableStream({
        write(text) {
          output = (output + text).slice(-8192);
          const match = output.match(
            /listening on (http:\/\/[\d.]+:\d+) \(pid (\d+)\)/,
          );
          if (match) {
            listening.resolve({ url: match[1], pid: Number(match[2]) });
          }
        },
      }),
    );
  const pipes = Promise.all([collect(child.stdout), collect(child.stderr)]);
  const done = child.status.then((s) => {
    status = s;
    listening.reject(
      new Error(`${name} exited (${s.code}) before listening:\n${output}`),
    );
  });
  let pid = child.pid;
  const server: Server = {
    name,
    url: "",
    pid,
    output: () => output,
    exited: () => status,
    stop: async (graceMs = 15_000) => {
      running.delete(server);
      if (status === undefined) {
        signal(pid, "SIGTERM");
        const timer = setTimeout(() => {
          signal(pid, "SIGKILL");
          signal(child.pid, "SIGKILL");
        }, graceMs);
        await done;
        clearTimeout(timer);
      }
      await pipes.catch(() => {});
    },
  };
  running.add(server);
  try {
    const listen = await listening.promise;
    pid = listen.pid;
    server.pid = pid;
    server.url = listen.url;
    return server;
  } catch (error) {
    await server.stop(0);
    throw error;
  }
}

function signal(pid: number, sig: Deno.Signal): void {
  try {
    Deno.kill(pid, sig);
  } catch {
    // already gone
  }
}

/**
 * The real service, as `deno task start` on the database file `dbFile`, with no rate
 * limit (unless `env` sets its own settings).
 */
export function startService(
  dbFile: string,
  name = "service",
  env: Record<string, string> = {},
): Promise<Server> {
  return startServer(name, ["task", "start"], {
    DATABASE_URL: `file:${dbFile}`,
    RATE_LIMIT: "0",
    // The benchmark holds thousands of waits from one address on purpose.
    MAX_WAITS_PER_CLIENT: "1000000",
    MAX_WAITS_PER_ADDRESS: "1000000",
    ...env,
  });
}

/**
 * The service as `deno serve --parallel main.ts` (one worker per core, sharing
 * `dbFile` as instances do) on a fixed free port: with port 0 each worker would get a
 * port of its own.
 */
export function startParallel(dbFile: string): Promise<Server> {
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = probe.addr as Deno.NetAddr;
  probe.close();
  return startServer("service (deno serve --parallel)", [
    "serve",
    "--parallel",
    "--allow-net",
    "--allow-env",
    "--allow-read",
    "--allow-write",
    "--host",
    "127.0.0.1",
    "--port",
    String(port),
    "main.ts",
  ], {
    DATABASE_URL: `file:${dbFile}`,
    RATE_LIMIT: "0",
    MAX_WAITS_PER_CLIENT: "1000000",
    MAX_WAITS_PER_ADDRESS: "1000000",
  });
}

/** The bare Hono app (bench/bare.ts) on the same runtime. */
export function startBare(): Promise<Server> {
  return startServer("bare Hono", [
    "run",
    "--allow-net",
    "--allow-env",
    "bench/bare.ts",
  ], {});
}

/**
 * Runs the raw-driver loop (bench/raw.ts) and answers how many calls it made, in how
 * long, using how much CPU (seconds).
 */
export async function runRaw(
  args: string[],
): Promise<{ ops: number; seconds: number; cpu: number }> {
  const child = new Deno.Command(Deno.execPath(), {
    // --allow-all: reading /proc/self/stat (its CPU time) needs it.
    args: ["run", "--allow-all", "bench/raw.ts", ...args],
    cwd: ROOT,
    env: { NO_COLOR: "1" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  loops.add(child);
  try {
    const out = await child.output();
    if (!out.success) {
      throw new Error(
        `raw driver (${args[0]}) failed: ${
          new TextDecoder().decode(out.stderr)
        }`,
      );
    }
    return JSON.parse(new TextDecoder().decode(out.stdout));
  } finally {
    loops.delete(child);
  }
}

/** Raw-driver loops running now. */
const loops = new Set<Deno.ChildProcess>();

/** Stops every process still running (on success, failure or a signal). */
export async function stopAll(): Promise<void> {
  for (const loop of loops) signal(loop.pid, "SIGKILL");
  await Promise.all([...running].map((server) => server.stop(5_000)));
}

/** CPU time (user + system) a process has used so far, in seconds, from /proc/<pid>/stat. */
export function cpuSeconds(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  // The fields after the command name, which is in parentheses and may hold spaces.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS;
}

/** The kernel's clock ticks per second (USER_HZ), 100 on Linux. */
const CLOCK_TICKS = 100;

/** The resident set size of a process in MB, from /proc/<pid>/status (VmRSS). */
export function rssMb(pid: number): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const match = status.match(/^VmRSS:\s+(\d+) kB$/m);
  if (!match) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(match[1]) / 1024;
}
