/**
 * Cold start: from spawning `deno run` to the first 200 on `/healthz`, for the service
 * (with the start task's flags, a fresh database file) and for the bare Hono app, each
 * `runs` times, taking turns; the module cache is warm (one run of each first).
 *
 *   deno run --allow-all bench/coldstart.ts [RUNS]   prints a JSON line of medians
 */

const ROOT = new URL("..", import.meta.url).pathname;

/** A port nothing listens on now. */
function freePort(): number {
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = probe.addr as Deno.NetAddr;
  probe.close();
  return port;
}

/** Milliseconds from spawning `args` until `/healthz` answers 200. */
export async function coldStart(args: string[], env: Record<string, string>) {
  const port = freePort();
  const started = performance.now();
  const child = new Deno.Command(Deno.execPath(), {
    args,
    cwd: ROOT,
    env: { ...env, PORT: String(port), HOST: "127.0.0.1", NO_COLOR: "1" },
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  try {
    for (;;) {
      try {
        const res = await fetch(`http://127.0.0.1:${port}/healthz`);
        await res.body?.cancel();
        if (res.status === 200) return performance.now() - started;
      } catch {
        // not listening yet
      }
      if (performance.now() - started > 20_000) {
        throw new Error(`${args.join(" ")} did not answer within 20 s`);
      }
      await new Promise((resolve) => setTimeout(resolve, 2));
    }
  } finally {
    child.kill("SIGKILL");
    await child.status;
  }
}

/** The service and the bare app, `runs` times each, taking turns: the medians. */
export async function coldStarts(runs: number) {
  const dir = await Deno.makeTempDir({ prefix: "sync-coldstart-" });
  const service = (i: number) =>
    coldStart([
      "run",
      "--allow-net",
      "--allow-env",
      "--allow-read",
      "--allow-write",
      "server.ts",
    ], { DATABASE_URL: `file:${dir}/cold-${i}.db` });
  const bare = () =>
    coldStart(["run", "--allow-net", "--allow-env", "bench/bare.ts"], {});
  try {
    await service(-1);
    await bare();
    const times = { service: [] as number[], bare: [] as number[] };
    for (let i = 0; i < runs; i++) {
      times.service.push(await service(i));
      times.bare.push(await bare());
    }
    const median = (list: number[]) =>
      list.toSorted((a, b) => a - b)[Math.floor(list.length / 2)];
    return { service: median(times.service), bare: median(times.bare) };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) {
  console.log(JSON.stringify(await coldStarts(Number(Deno.args[0] ?? 5))));
}
