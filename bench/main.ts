/**
 * The benchmark: `deno task bench` (or `deno task bench --quick`).
 *
 * Starts the real service (`deno task start`, RATE_LIMIT=0, a temp-file database), a
 * bare Hono app on the same runtime and a raw node:sqlite loop, each in its own
 * process, and measures them side by side in one run: the machine is shared and noisy,
 * so every figure that has a target is a ratio to something measured in the same run.
 * The service is a black box: HTTP only, plus rows written straight into its SQLite
 * file (while it is stopped) to make big rooms quickly. One table at the end.
 */
import { coldStarts } from "./coldstart.ts";
import {
  call,
  inParallel,
  type Load,
  load,
  percentile,
  RawGet,
  type Request,
  sleep,
} from "./http.ts";
import { type IdRange, journalMode, populate } from "./populate.ts";
import {
  cpuSeconds,
  rssMb,
  runRaw,
  type Server,
  startBare,
  startParallel,
  startService,
  stopAll,
} from "./processes.ts";

const QUICK = Deno.args.includes("--quick");
/** `--only=<text>`: run just the cases whose name holds it (e.g. `--only=held`). */
const ONLY = Deno.args.find((arg) => arg.startsWith("--only="))?.slice(7);
/** Seconds per throughput case, and of the warm-up before it. */
const SECONDS = QUICK ? 2 : 5;
const WARMUP_SECONDS = QUICK ? 0.5 : 1;
const WAKE_SAMPLES = QUICK ? 200 : 300;
const CROSS_WAKE_SAMPLES = 200;
/** Rooms waited on at once in the cross-instance case (each sample is one room). */
const CROSS_WAKE_ROOMS = 25;
const FANOUT_SUBSCRIBERS = 1000;
const FANOUT_ROUNDS = QUICK ? 5 : 10;
const HELD_WAITERS = 5000;
/** SSE streams held open at once in the memory case. */
const HELD_STREAMS = 1000;
/**
 * Sides compared for a target run in turn, one second at a time, this many times each,
 * so that all of them see the same drift in the machine's load.
 */
const SLICES = SECONDS;
const PAGE_ROOM_SIZE = 100_000;
const SMALL_ROOM_SIZE = 10_000;
const LARGE_ROOM_SIZE = 1_000_000;
/** Open files the memory case needs: a socket per waiter here and in the server. */
const FILES_NEEDED = HELD_WAITERS + 2000;

// ---- the table ----

type Row = {
  name: string;
  service: string;
  reference: string;
  ratio: string;
  target: string;
  met: string;
};

const rows: Row[] = [];
const notes: string[] = [];

function addRow(
  name: string,
  service: string,
  reference = "—",
  ratio = "—",
  target = "—",
  met?: boolean,
): void {
  rows.push({
    name,
    service,
    reference,
    ratio,
    target,
    met: met === undefined ? "—" : met ? "yes" : "NO",
  });
}

function printTable(): void {
  const header: Row = {
    name: "case",
    service: "service",
    reference: "reference",
    ratio: "ratio",
    target: "target",
    met: "met",
  };
  const keys = Object.keys(header) as (keyof Row)[];
  const width = (k: keyof Row) =>
    Math.max(...[header, ...rows].map((r) => r[k].length));
  const line = (r: Row) =>
    "| " + keys.map((k) => r[k].padEnd(width(k))).join(" | ") + " |";
  console.log(line(header));
  console.log("|" + keys.map((k) => "-".repeat(width(k) + 2)).join("|") + "|");
  for (const r of rows) console.log(line(r));
  notes.forEach((note, i) => console.log(`[${i + 1}] ${note}`));
}

const number = (n: number, digits = 0) =>
  n.toLocaleString("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
const perSecond = (n: number, unit = "req/s") => `${number(n)} ${unit}`;
const ms = (n: number) => `${number(n, n < 10 ? 2 : n < 100 ? 1 : 0)} ms`;
const percent = (n: number) => `${number(n * 100)}%`;
const times = (n: number) => `${number(n, 2)}×`;
const µs = (n: number) => `${number(n)} µs`;

/** Non-2xx answers and errors of the load runs, by label. */
const problems = new Map<
  string,
  { ok: number; non2xx: number; errors: number }
>();

/** Counts a load run's answers under `label`, to be reported by `flag`. */
function checked(label: string, result: Load): void {
  const p = problems.get(label) ?? { ok: 0, non2xx: 0, errors: 0 };
  p.ok += result.ok;
  p.non2xx += result.non2xx;
  p.errors += result.errors;
  problems.set(label, p);
}

/** A note marker for the table when runs under `label` had non-2xx answers or errors. */
function flag(label: string): string {
  const p = problems.get(label);
  if (!p || (p.non2xx === 0 && p.errors === 0)) return "";
  const note = `${label}: ${p.non2xx} non-2xx answers and ${p.errors} ` +
    `errors beside ${p.ok} 2xx`;
  if (!notes.includes(note)) notes.push(note);
  return ` [${notes.indexOf(note) + 1}]`;
}

// ---- the machine ----

function printMachine(mainDb: string): void {
  const cpu = Deno.readTextFileSync("/proc/cpuinfo").match(
    /^model name\s*:\s*(.+)$/m,
  )?.[1] ?? "unknown";
  const load = Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3);
  const readme = Deno.readTextFileSync(
    new URL("../docs/DESIGN.md", import.meta.url),
  );
  const synchronous = readme.match(/synchronous\s*=\s*`?(\w+)/)?.[1] ??
    "not stated";
  console.log(
    `machine: ${cpu}, ${navigator.hardwareConcurrency} cores, ` +
      `load average ${load.join(" ")} at start, open-file limit ${fileLimit()}`,
  );
  console.log(
    `runtime: Deno ${Deno.version.deno}, V8 ${Deno.version.v8}; ` +
      `${QUICK ? "--quick: " : ""}${SECONDS} s per throughput case`,
  );
  console.log(
    `durability: service journal_mode=${journalMode(mainDb)} (read from its ` +
      `file), synchronous=${synchronous} (docs/DESIGN.md); raw driver WAL + synchronous=NORMAL`,
  );
}

/** The soft limit on open files of this process. */
function fileLimit(): number {
  const limits = Deno.readTextFileSync("/proc/self/limits");
  const soft = limits.match(/^Max open files\s+(\S+)/m)?.[1] ?? "0";
  return soft === "unlimited" ? Infinity : Number(soft);
}

/**
 * Runs the benchmark again through a shell that raised the open-file limit, when it is
 * too low for the memory case and the hard limit allows more. Answers the child's exit
 * code, or null to go on here.
 */
async function withMoreFiles(): Promise<number | null> {
  if (fileLimit() >= FILES_NEEDED || Deno.env.get("SYNC_BENCH_NOFILE")) {
    return null;
  }
  const script = new URL(import.meta.url).pathname;
  const child = new Deno.Command("sh", {
    args: [
      "-c",
      `ulimit -n ${
        FILES_NEEDED * 2
      } 2>/dev/null || ulimit -n "$(ulimit -Hn)"; exec "$@"`,
      "sh",
      Deno.execPath(),
      "run",
      "--allow-all",
      script,
      ...Deno.args,
    ],
    env: { SYNC_BENCH_NOFILE: "1" },
    stdin: "inherit",
    stdout: "inherit",
    stderr: "inherit",
  }).spawn();
  return (await child.status).code;
}

// ---- setting up ----

type Databases = {
  main: string;
  small: string;
  large: string;
  /** The room of 100,000 messages in `main`. */
  page: IdRange;
  smallRoom: IdRange;
  largeRoom: IdRange;
};

/**
 * Lets the service make its schema and the rooms in `file`, stops it, and fills room
 * "page" with `count` messages by writing into the file.
 */
async function prepare(
  file: string,
  rooms: string[],
  count: number,
): Promise<IdRange> {
  const service = await startService(file, "service (setup)");
  try {
    for (const id of rooms) await call(service.url, "POST", "/rooms", { id });
  } finally {
    await service.stop();
  }
  const started = performance.now();
  const range = populate(file, "page", count);
  progress(
    `  ${number(count)} messages written into ${file.split("/").pop()} in ` +
      ms(performance.now() - started),
  );
  return range;
}

async function prepareDatabases(dir: string): Promise<Databases> {
  const main = `${dir}/main.db`;
  const small = `${dir}/small.db`;
  const large = `${dir}/large.db`;
  progress("preparing the databases");
  return {
    main,
    small,
    large,
    page: await prepare(main, ["page", "raw"], PAGE_ROOM_SIZE),
    smallRoom: await prepare(small, ["page"], SMALL_ROOM_SIZE),
    largeRoom: await prepare(large, ["page"], LARGE_ROOM_SIZE),
  };
}

function progress(text: string): void {
  console.error(text);
}

// ---- requests ----

let sequence = 0;
const random = (n: number) => Math.floor(Math.random() * n);

function postMessage(room: string): Request {
  return {
    method: "POST",
    path: `/rooms/${room}/messages`,
    vary: () => ({
      body: {
        from: "bench",
        kind: "bench",
        body: { n: ++sequence, text: "a benchmark message" },
      },
    }),
  };
}

/** A page of 100 messages after a random id of the room. */
function getPage(room: string, range: IdRange): Request {
  const span = range.last - range.first - 100;
  return {
    method: "GET",
    path: `/rooms/${room}/messages?after=${range.first}`,
    vary: () => ({
      path: `/rooms/${room}/messages?after=${range.first + random(span)}`,
    }),
  };
}

/** The newest message id of a room (0 when it has none). */
async function lastId(base: string, room: string): Promise<number> {
  const page = await call<{ id: number }[]>(
    base,
    "GET",
    `/rooms/${room}/messages?order=desc&limit=1`,
  );
  return page[0]?.id ?? 0;
}

// ---- throughput, each next to its reference ----

/**
 * What the service is compared with, measured right beside each service figure (the
 * machine's load drifts): the bare Hono app, kept running beside the service, and the
 * raw-driver loop, run on demand on a copy of the service's file.
 */
type References = {
  bare: Server;
  rawFile: string;
  /** A fresh file for the raw insert on the seed's tables (bench/raw.ts makes them). */
  seedFile: string;
  page: IdRange;
  /** The bare app's POST rate at 10 connections, once measured. */
  barePost10?: number;
};

/**
 * One second of load on one side: calls made, the time taken, the CPU time (seconds)
 * the process that served them used meanwhile, and the slice's p99.
 */
type Slice = { ops: number; seconds: number; cpu: number; p99: number };

/**
 * Runs each side for one slice in turn, SLICES times, the order rotating each time,
 * and answers each side's slices.
 */
async function sideBySide(
  sides: (() => Promise<Slice>)[],
): Promise<Slice[][]> {
  const out: Slice[][] = sides.map(() => []);
  for (let i = 0; i < SLICES; i++) {
    for (let k = 0; k < sides.length; k++) {
      const side = (i + k) % sides.length;
      out[side].push(await sides[side]());
    }
  }
  return out;
}

const sum = (slices: Slice[], key: keyof Slice) =>
  slices.reduce((total, slice) => total + slice[key], 0);

/** Calls per second over all slices. */
function rateOf(slices: Slice[]): number {
  return sum(slices, "ops") / sum(slices, "seconds");
}

/**
 * CPU time per call in µs over all slices. Other work on the machine slows every side
 * down, but barely changes what a call costs, so this is the steadier comparison.
 */
function cpuPerCall(slices: Slice[]): number {
  return sum(slices, "cpu") / sum(slices, "ops") * 1e6;
}

/** One slice of HTTP load; non-2xx answers and errors are noted under `label`. */
function httpSlice(
  label: string,
  server: Server,
  request: Request,
  connections: number,
): () => Promise<Slice> {
  return async () => {
    const cpu = cpuSeconds(server.pid);
    const result = await load(server.url, request, connections, 1);
    checked(label, result);
    return {
      ops: result.ok,
      seconds: result.seconds,
      cpu: cpuSeconds(server.pid) - cpu,
      p99: result.p99,
    };
  };
}

function rawSlice(args: string[]): () => Promise<Slice> {
  return async () => ({ ...await runRaw(args), p99: NaN });
}

async function casePostMessages(server: Server, refs: References) {
  for (const connections of [1, 10, 50]) {
    progress(`POST messages at ${connections} connections`);
    const request = postMessage("post");
    const bareRequest = postMessage("bare");
    const service = httpSlice(
      `POST message, ${connections} conn`,
      server,
      request,
      connections,
    );
    const bare = httpSlice(
      `bare POST, ${connections} conn`,
      refs.bare,
      bareRequest,
      connections,
    );
    const raw = rawSlice(["insert", refs.rawFile, "raw", "1"]);
    const seed = rawSlice(["insert-seed", refs.seedFile, "raw", "1"]);
    await load(server.url, request, connections, WARMUP_SECONDS);
    await load(refs.bare.url, bareRequest, connections, WARMUP_SECONDS);
    const [svc, ref, ins, seedIns] = await sideBySide(
      connections === 10 ? [service, bare, raw, seed] : [service, bare],
    );
    const rate = rateOf(svc);
    const bareRate = rateOf(ref);
    const mark = flag(`POST message, ${connections} conn`);
    if (connections === 10) {
      refs.barePost10 = bareRate;
      const rawRate = rateOf(ins);
      const seedRate = rateOf(seedIns);
      addRow(
        `POST message, 10 conn (vs raw insert of the seed's columns)`,
        perSecond(rate) + mark,
        perSecond(seedRate, "ins/s"),
        percent(rate / seedRate),
        "≥ 50%",
        rate / seedRate >= 0.5,
      );
      addRow(
        `bare Hono POST, 10 conn (vs raw insert of the seed's columns)`,
        perSecond(bareRate),
        perSecond(seedRate, "ins/s"),
        percent(bareRate / seedRate),
      );
      addRow(
        `POST message, 10 conn (vs raw insert, the service's schema)`,
        perSecond(rate) + mark,
        perSecond(rawRate, "ins/s"),
        percent(rate / rawRate),
      );
      // The median of the one-second slices' p99: one slice hit by a burst of other
      // work on the machine does not decide it.
      const p99 = percentile(svc.map((slice) => slice.p99), 50);
      addRow(
        `POST message, 10 conn, p99 (vs bare Hono)`,
        ms(p99),
        ms(percentile(ref.map((slice) => slice.p99), 50)),
        "—",
        "≤ 10 ms",
        p99 <= 10,
      );
      addRow(
        `POST message, 10 conn, CPU per call (vs raw insert)`,
        µs(cpuPerCall(svc)),
        µs(cpuPerCall(ins)),
        times(cpuPerCall(svc) / cpuPerCall(ins)),
      );
      addRow(
        `POST message, 10 conn, CPU per call (vs bare Hono)`,
        µs(cpuPerCall(svc)),
        µs(cpuPerCall(ref)),
        times(cpuPerCall(svc) / cpuPerCall(ref)),
      );
    }
    addRow(
      `POST message, ${connections} conn (vs bare Hono)`,
      perSecond(rate) + mark,
      perSecond(bareRate) + flag(`bare POST, ${connections} conn`),
      percent(rate / bareRate),
    );
  }
}

/**
 * What the public-instance caps cost the hot path: POST message and GET 100 at 10
 * connections on the service with them on (the listener's connection cap and stall
 * timeout, the default wait caps, and a rate limit that counts every request but is
 * set too high to refuse one) against the same service with them off
 * (`MAX_CONNECTIONS=0`, `RATE_LIMIT=0`), side by side, each on its own copy of the
 * database (the main service has stopped: its file is still).
 */
async function caseCaps(dir: string, main: string, page: IdRange) {
  progress("the public-instance caps, on against off");
  const files = { on: `${dir}/caps-on.db`, off: `${dir}/caps-off.db` };
  await Deno.copyFile(main, files.on);
  await Deno.copyFile(main, files.off);
  const on = await startService(files.on, "service (caps on)", {
    RATE_LIMIT: "10000000",
    MAX_WAITS_PER_CLIENT: "100",
    MAX_WAITS_PER_ADDRESS: "1000",
  });
  const off = await startService(files.off, "service (caps off)", {
    MAX_CONNECTIONS: "0",
  });
  try {
    for (const server of [on, off]) {
      await call(server.url, "POST", "/rooms", { id: "caps" });
    }
    const cases: [string, Request][] = [
      ["POST message", postMessage("caps")],
      ["GET 100 msgs", getPage("page", page)],
    ];
    for (const [name, request] of cases) {
      await load(on.url, request, 10, WARMUP_SECONDS);
      await load(off.url, request, 10, WARMUP_SECONDS);
      const [withCaps, without] = await sideBySide([
        httpSlice(`${name}, caps on`, on, request, 10),
        httpSlice(`${name}, caps off`, off, request, 10),
      ]);
      const ratio = rateOf(withCaps) / rateOf(without);
      addRow(
        `${name}, 10 conn: public-instance caps on (vs off)`,
        `${perSecond(rateOf(withCaps))}, ${µs(cpuPerCall(withCaps))} CPU`,
        `${perSecond(rateOf(without))}, ${µs(cpuPerCall(without))} CPU`,
        percent(ratio),
        "≥ 95%",
        ratio >= 0.95,
      );
    }
  } finally {
    await Promise.all([on.stop(), off.stop()]);
  }
}

/**
 * Cold start: `deno run` with the start task's flags (a fresh database file, a warm
 * module cache) to the first 200 on `/healthz`, against the bare Hono app started the
 * same way; the medians of 5, taking turns (bench/coldstart.ts).
 */
async function caseColdStart() {
  progress("cold start, 5 of each");
  const { service, bare } = await coldStarts(5);
  addRow(
    "cold start to the first 200, median of 5 (vs bare Hono)",
    ms(service),
    ms(bare),
    times(service / bare),
    "≤ 2.5×",
    service / bare <= 2.5,
  );
}

/**
 * What keeping history costs a state write: the service's upsert on the raw driver,
 * with the history triggers and without, side by side.
 */
async function caseHistoryCost(refs: References) {
  progress("a state write, its history kept or not (raw driver)");
  const [kept, bare] = await sideBySide([
    rawSlice(["state", refs.rawFile, "raw", "1"]),
    rawSlice(["state-bare", refs.rawFile, "raw", "1"]),
  ]);
  addRow(
    "state write, history kept (vs without), raw driver",
    `${µs(cpuPerCall(kept))} CPU, ${perSecond(rateOf(kept), "w/s")}`,
    `${µs(cpuPerCall(bare))} CPU, ${perSecond(rateOf(bare), "w/s")}`,
    times(cpuPerCall(kept) / cpuPerCall(bare)),
  );
}

/**
 * An export of the 100,000-message room, read as fast as it comes: how the service's
 * RSS moves while it streams tens of MB (constant memory: it should not follow).
 */
async function caseExport(server: Server) {
  progress("export of the 100,000-message room");
  const before = rssMb(server.pid);
  let peak = before;
  const sampler = setInterval(() => {
    peak = Math.max(peak, rssMb(server.pid));
  }, 50);
  const started = performance.now();
  let bytes = 0;
  let lines = 0;
  try {
    const res = await fetch(`${server.url}/rooms/page/export`);
    if (!res.ok || !res.body) throw new Error(`export answered ${res.status}`);
    for await (const chunk of res.body) {
      bytes += chunk.length;
      for (const byte of chunk) if (byte === 10) lines++;
    }
  } finally {
    clearInterval(sampler);
  }
  const seconds = (performance.now() - started) / 1000;
  addRow(
    `export of a 100k-message room (${number(bytes / 1e6, 1)} MB, ${
      number(lines)
    } lines): RSS peak (vs before)`,
    `${number(peak, 1)} MB`,
    `${number(before, 1)} MB`,
    `+${number(peak - before, 1)} MB`,
    "flat",
    peak - before < 50,
  );
  addRow(
    "export of a 100k-message room, throughput",
    `${number(bytes / 1e6 / seconds, 1)} MB/s`,
  );
}

async function caseGetPage(server: Server, refs: References) {
  progress("GET 100 messages in a room of 100,000");
  const page = await call<unknown[]>(
    server.url,
    "GET",
    `/rooms/page/messages?after=${refs.page.first}`,
  );
  if (page.length !== 100) throw new Error(`a page of ${page.length}`);
  const { first, last } = refs.page;
  const request = getPage("page", refs.page);
  await load(server.url, request, 10, WARMUP_SECONDS);
  await load(refs.bare.url, request, 10, WARMUP_SECONDS);
  const [svc, bare, raw] = await sideBySide([
    httpSlice("GET 100 messages", server, request, 10),
    httpSlice("bare GET", refs.bare, request, 10),
    rawSlice(["page", refs.rawFile, "page", "1", String(first), String(last)]),
  ]);
  const rate = rateOf(svc);
  const mark = flag("GET 100 messages");
  addRow(
    "GET 100 msgs, 100k room, 10 conn (vs raw page)",
    perSecond(rate) + mark,
    perSecond(rateOf(raw), "pages/s"),
    percent(rate / rateOf(raw)),
    "≥ 50%",
    rate / rateOf(raw) >= 0.5,
  );
  addRow(
    "GET 100 msgs, CPU per call (vs raw page)",
    µs(cpuPerCall(svc)),
    µs(cpuPerCall(raw)),
    times(cpuPerCall(svc) / cpuPerCall(raw)),
  );
  addRow(
    "GET 100 msgs, 10 conn (vs bare Hono array)",
    perSecond(rate) + mark,
    perSecond(rateOf(bare)) + flag("bare GET"),
    percent(rate / rateOf(bare)),
  );
  addRow(
    "GET 100 msgs, CPU per call (vs bare Hono array)",
    µs(cpuPerCall(svc)),
    µs(cpuPerCall(bare)),
    times(cpuPerCall(svc) / cpuPerCall(bare)),
  );
}

/**
 * `deno serve --parallel` (a worker per core, each with its own connection to the same
 * file, as two instances) against the one process of `deno task start`, side by side:
 * POST and GET 100 at 10 connections, and the wake latency (a waiter and its writer
 * may be served by different workers, which learn of each other's writes by polling).
 */
async function caseParallel(
  server: Server,
  parallel: Server,
  refs: References,
) {
  progress("deno serve --parallel against one process");
  const post = postMessage("post");
  const page = getPage("page", refs.page);
  for (
    const [what, request] of [["POST message", post], [
      "GET 100 msgs",
      page,
    ]] as [
      string,
      Request,
    ][]
  ) {
    await load(server.url, request, 10, WARMUP_SECONDS);
    await load(parallel.url, request, 10, WARMUP_SECONDS);
    const [one, both] = await sideBySide([
      httpSlice(`${what}, one process`, server, request, 10),
      httpSlice(`${what}, --parallel`, parallel, request, 10),
    ]);
    addRow(
      `${what}, 10 conn: deno serve --parallel (vs one process)`,
      perSecond(rateOf(both)) + flag(`${what}, --parallel`),
      perSecond(rateOf(one)) + flag(`${what}, one process`),
      percent(rateOf(both) / rateOf(one)),
    );
  }
  const one = await wakeSamples(server.url, WAKE_SAMPLES);
  const both = await wakeSamples(parallel.url, WAKE_SAMPLES);
  for (const p of [50, 99]) {
    addRow(
      `wake p${p}: deno serve --parallel (vs one process), ${both.length}`,
      ms(percentile(both, p)),
      ms(percentile(one, p)),
      times(percentile(both, p) / percentile(one, p)),
    );
  }
}

/** A check around a measured run: `before` after the warm-up, `after` answers a note marker. */
type Check = {
  before: () => Promise<void>;
  after: (result: Load) => Promise<string>;
};

/**
 * Measures `request` on `server` (after a warm-up) and adds a row against the bare
 * app's POST rate at 10 connections, with the server's CPU time per call.
 */
async function writeCase(
  name: string,
  server: Server,
  request: Request,
  refs: References,
  options: { check?: Check; unit?: string } = {},
): Promise<void> {
  const { check, unit } = options;
  const connections = 10;
  await load(server.url, request, connections, WARMUP_SECONDS);
  await check?.before();
  const cpu = cpuSeconds(server.pid);
  const result = await load(server.url, request, connections, SECONDS);
  const perCall = (cpuSeconds(server.pid) - cpu) / result.ok * 1e6;
  checked(name, result);
  const mark = flag(name) + (await check?.after(result) ?? "");
  const bare = refs.barePost10;
  addRow(
    `${name}, 10 conn (vs bare Hono POST)`,
    `${perSecond(result.rate, unit)}, ${µs(perCall)} CPU${mark}`,
    bare ? perSecond(bare) : "—",
    bare ? percent(result.rate / bare) : "—",
  );
}

async function casePutState(server: Server, refs: References) {
  progress("PUT state");
  await writeCase("PUT state", server, {
    method: "PUT",
    path: "/rooms/state/state",
    vary: () => ({
      body: { key: `k${random(1000)}`, value: { n: ++sequence, ok: true } },
    }),
  }, refs);
}

/** Increments of one key; the counter must grow by exactly the 2xx answers. */
async function caseIncrements(server: Server, refs: References) {
  progress("increments");
  const value = async () =>
    (await call<{ value: number }>(
      server.url,
      "GET",
      "/rooms/counter/state?key=hits",
    )).value;
  let before = 0;
  await writeCase(
    "increment one key",
    server,
    {
      method: "PUT",
      path: "/rooms/counter/state",
      body: { key: "hits", increment: true },
    },
    refs,
    {
      check: {
        before: async () => void (before = await value()),
        after: async (result) => {
          const added = (await value()) - before;
          // autocannon stops counting with up to a request per connection in flight.
          if (added >= result.ok && added <= result.ok + 10) return "";
          notes.push(
            `increments: the counter grew by ${added} for ${result.ok} 2xx`,
          );
          return ` [${notes.length}]`;
        },
      },
    },
  );
}

async function caseBatch(server: Server, refs: References) {
  progress("batches of 10 operations");
  await writeCase(
    "batch of 10 ops",
    server,
    {
      method: "POST",
      path: "/rooms/batch/batch",
      vary: () => ({
        body: {
          state: Array.from({ length: 5 }, () => ({
            key: `b${random(1000)}`,
            value: ++sequence,
          })),
          messages: Array.from({ length: 5 }, () => ({
            from: "bench",
            kind: "batch",
            body: { n: ++sequence },
          })),
        },
      }),
    },
    refs,
    { unit: "batches/s" },
  );
}

// ---- waking, streaming, holding ----

/**
 * One wake sample: holds `GET messages?after=<last>&wait=30` on `waitBase`, posts one
 * message through `postBase` after `leadMs`, and answers the time from just before
 * the POST is sent until the waiter's whole answer is in.
 */
async function wakeOnce(
  waitBase: string,
  postBase: string,
  room: string,
  after: number,
  leadMs: number,
): Promise<{ ms: number; id: number }> {
  const waiter = fetch(
    `${waitBase}/rooms/${room}/messages?after=${after}&wait=30`,
  ).then(async (res) => {
    const text = await res.text();
    return { at: performance.now(), status: res.status, text };
  });
  await sleep(leadMs);
  const sent = performance.now();
  const posted = await call<{ id: number }>(
    postBase,
    "POST",
    `/rooms/${room}/messages`,
    { from: "bench", kind: "wake", body: { sent } },
  );
  const answer = await waiter;
  const ids = answer.status === 200
    ? (JSON.parse(answer.text) as { id: number }[]).map((m) => m.id)
    : [];
  if (ids.length !== 1 || ids[0] !== posted.id) {
    throw new Error(
      `the waiter answered ${answer.status} ${answer.text.slice(0, 200)}, ` +
        `not message ${posted.id}`,
    );
  }
  return { ms: answer.at - sent, id: posted.id };
}

/** `count` wake samples one after the other, waiter and writer on `base`. */
async function wakeSamples(base: string, count: number): Promise<number[]> {
  let after = await lastId(base, "wake");
  const samples: number[] = [];
  for (let i = 0; i < count; i++) {
    // 15 ms is ample for the waiter to be registered: the POST should find it held.
    const sample = await wakeOnce(base, base, "wake", after, 15);
    samples.push(sample.ms);
    after = sample.id;
  }
  return samples;
}

async function caseWakeSameInstance(base: string, refs: References) {
  progress(`long-poll wake latency, one instance (${WAKE_SAMPLES})`);
  const bare = await wakeSamples(refs.bare.url, WAKE_SAMPLES);
  const samples = await wakeSamples(base, WAKE_SAMPLES);
  // p50: at most half a millisecond over bare Hono's; p99: at most 20 ms.
  const bareP50 = percentile(bare, 50);
  for (const [p, target] of [[50, bareP50 + 0.5], [99, 20]]) {
    const figure = percentile(samples, p);
    addRow(
      `wake p${p}, one instance, ${samples.length} (vs bare Hono)`,
      ms(figure),
      ms(percentile(bare, p)),
      times(figure / percentile(bare, p)),
      `≤ ${ms(target)}`,
      figure <= target,
    );
  }
}

/**
 * Waiters on the second instance, writes on the first. The second instance learns of
 * a write only by polling the database (within about a tenth of a second), so samples
 * run 25 rooms at a time, each POST at a random moment of a second-long window, so
 * that they fall anywhere in the polling cycle.
 */
async function caseWakeAcrossInstances(first: string, second: string) {
  progress(`long-poll wake latency, two instances (${CROSS_WAKE_SAMPLES})`);
  const rooms = Array.from({ length: CROSS_WAKE_ROOMS }, (_, i) => `x${i}`);
  for (const id of rooms) await call(first, "POST", "/rooms", { id });
  const after = new Map<string, number>();
  for (const id of rooms) after.set(id, await lastId(first, id));
  const samples: number[] = [];
  while (samples.length < CROSS_WAKE_SAMPLES) {
    await Promise.all(rooms.map(async (room) => {
      const sample = await wakeOnce(
        second,
        first,
        room,
        after.get(room)!,
        200 + random(1000),
      );
      samples.push(sample.ms);
      after.set(room, sample.id);
    }));
  }
  addRow(
    `wake p50, two instances, ${samples.length}`,
    ms(percentile(samples, 50)),
  );
  const p99 = percentile(samples, 99);
  addRow(
    `wake p99, two instances, ${samples.length}`,
    ms(p99),
    "—",
    "—",
    "≤ 1,000 ms",
    p99 <= 1000,
  );
}

/**
 * FANOUT_SUBSCRIBERS streams on room "fanout" of `base`, each on its own connection;
 * per round one POST, timed from just before it is sent until the first and until the
 * last subscriber has read the `message` event. Answers the medians.
 */
async function fanOut(
  base: string,
): Promise<{ first: number; last: number; worst: number; rounds: number }> {
  const room = "fanout";
  const after = await lastId(base, room);
  const seen = new Array<number>(FANOUT_SUBSCRIBERS).fill(0);
  type Round = {
    n: number;
    count: number;
    first: number;
    done: PromiseWithResolvers<number>;
  };
  const newRound = (n: number): Round => ({
    n,
    count: 0,
    first: 0,
    done: Promise.withResolvers(),
  });
  let round = newRound(0);
  const marker = "event: message";
  const clients: RawGet[] = [];
  try {
    await inParallel(seen.map((_, i) => i), 100, async (i) => {
      const ready = Promise.withResolvers<void>();
      let buffer = "";
      let isReady = false;
      clients.push(
        await RawGet.open(
          base,
          `/rooms/${room}/stream?after=${after}`,
          (text) => {
            buffer += text;
            if (!isReady) {
              const at = buffer.indexOf("event: ready");
              if (at === -1) return;
              isReady = true;
              buffer = buffer.slice(at + 12);
              ready.resolve();
            }
            for (let at; (at = buffer.indexOf(marker)) !== -1;) {
              buffer = buffer.slice(at + marker.length);
              if (++seen[i] !== round.n) continue;
              if (++round.count === 1) round.first = performance.now();
              if (round.count === seen.length) {
                round.done.resolve(performance.now());
              }
            }
            buffer = buffer.slice(-marker.length);
          },
        ),
      );
      const timeout = setTimeout(
        () => ready.reject(new Error(`subscriber ${i} got no ready event`)),
        30_000,
      );
      await ready.promise.finally(() => clearTimeout(timeout));
    });
    const lasts: number[] = [];
    const firsts: number[] = [];
    for (let n = 1; n <= FANOUT_ROUNDS; n++) {
      round = newRound(n);
      const sent = performance.now();
      await call(base, "POST", `/rooms/${room}/messages`, {
        from: "bench",
        kind: "fanout",
        body: { n },
      });
      const timeout = setTimeout(
        () =>
          round.done.reject(
            new Error(`after 10 s only ${round.count} subscribers had it`),
          ),
        10_000,
      );
      const last = await round.done.promise.finally(() =>
        clearTimeout(timeout)
      );
      lasts.push(last - sent);
      firsts.push(round.first - sent);
      await sleep(200);
    }
    return {
      first: percentile(firsts, 50),
      last: percentile(lasts, 50),
      worst: Math.max(...lasts),
      rounds: lasts.length,
    };
  } finally {
    for (const client of clients) client.close();
    await Promise.all(clients.map((client) => client.closed));
  }
}

async function caseFanOut(base: string, refs: References) {
  progress(`SSE fan-out to ${FANOUT_SUBSCRIBERS} subscribers`);
  await call(base, "POST", "/rooms", { id: "fanout" });
  const bare = await fanOut(refs.bare.url);
  const service = await fanOut(base);
  addRow(
    `SSE fan-out to ${FANOUT_SUBSCRIBERS}, last, median of ${service.rounds}`,
    ms(service.last),
    ms(bare.last),
    times(service.last / bare.last),
    "≤ 100 ms",
    service.last <= 100,
  );
  addRow(
    `SSE fan-out to ${FANOUT_SUBSCRIBERS}, first, median`,
    ms(service.first),
    ms(bare.first),
    times(service.first / bare.first),
  );
  addRow(
    `SSE fan-out to ${FANOUT_SUBSCRIBERS}, last, worst`,
    ms(service.worst),
    ms(bare.worst),
  );
}

type Held = {
  idle: number;
  held: number;
  releaseMs: number;
  answered: number;
  early: number;
  refused: number;
};

/**
 * HELD_WAITERS long-polls (`wait=50`, the longest allowed) on room "held" of `server`,
 * each on its own connection; its RSS is read while they are held; one POST then
 * releases them all, and each must answer 200.
 */
async function holdWaiters(server: Server): Promise<Held> {
  const base = server.url;
  const after = await lastId(base, "held");
  await sleep(1000);
  const idle = rssMb(server.pid);
  let releasing = false;
  let early = 0;
  let answered = 0;
  let refused = 0;
  const released = Promise.withResolvers<void>();
  const clients: RawGet[] = [];
  try {
    await inParallel(
      Array.from({ length: HELD_WAITERS }, (_, i) => i),
      200,
      async () => {
        let first = true;
        clients.push(
          await RawGet.open(
            base,
            `/rooms/held/messages?after=${after}&wait=50`,
            (text) => {
              if (!first) return;
              first = false;
              if (!releasing) early++;
              else if (text.startsWith("HTTP/1.1 200")) answered++;
              else refused++;
              if (answered + refused + early === HELD_WAITERS) {
                released.resolve();
              }
            },
          ),
        );
      },
    );
    // Let the last requests reach their wait, then read the RSS a few times.
    await sleep(2000);
    let held = 0;
    for (let i = 0; i < 5; i++) {
      held = Math.max(held, rssMb(server.pid));
      await sleep(200);
    }
    releasing = true;
    const sent = performance.now();
    await call(base, "POST", `/rooms/held/messages`, {
      from: "bench",
      body: "release",
    });
    const timeout = setTimeout(() => released.resolve(), 30_000);
    await released.promise;
    clearTimeout(timeout);
    const releaseMs = performance.now() - sent;
    return { idle, held, releaseMs, answered, early, refused };
  } finally {
    for (const client of clients) client.close();
    await Promise.all(clients.map((client) => client.closed));
  }
}

/** Memory, on fresh processes: their RSS is that of the waiters, not of earlier load. */
async function caseHeldWaiters(main: string) {
  progress(`memory with ${HELD_WAITERS} held long-polls`);
  const limit = fileLimit();
  if (limit < FILES_NEEDED) {
    addRow(
      `RSS, ${HELD_WAITERS} held long-polls`,
      "not run",
      "—",
      "—",
      "≤ 150 MB",
      false,
    );
    notes.push(
      `the open-file limit is ${limit} and could not be raised to ` +
        `${FILES_NEEDED}: run \`ulimit -n ${FILES_NEEDED * 2}\` first`,
    );
    return;
  }
  const bareServer = await startBare();
  let bare: Held;
  try {
    bare = await holdWaiters(bareServer);
  } finally {
    await bareServer.stop();
  }
  const server = await startService(main, "service (memory)");
  let service: Held;
  try {
    await call(server.url, "POST", "/rooms", { id: "held" });
    service = await holdWaiters(server);
  } finally {
    await server.stop();
  }
  let mark = "";
  const { early, refused, answered } = service;
  if (early > 0 || refused > 0 || answered < HELD_WAITERS) {
    notes.push(
      `held long-polls: ${early} answered before the release, ${refused} ` +
        `answered it with an error, ${answered} of ${HELD_WAITERS} with 200`,
    );
    mark = ` [${notes.length}]`;
  }
  addRow(
    `RSS, ${HELD_WAITERS} held long-polls (vs bare Hono)`,
    `${number(service.held, 1)} MB${mark}`,
    `${number(bare.held, 1)} MB`,
    times(service.held / bare.held),
    "≤ 150 MB",
    service.held <= 150 && answered === HELD_WAITERS,
  );
  const perWaiter = (held: Held) =>
    (held.held - held.idle) * 1024 / HELD_WAITERS;
  addRow(
    `memory per held long-poll (vs bare Hono)`,
    `${number(perWaiter(service), 1)} KB`,
    `${number(perWaiter(bare), 1)} KB`,
    times(perWaiter(service) / perWaiter(bare)),
    "≤ 1.25×",
    perWaiter(service) <= 1.25 * perWaiter(bare),
  );
  addRow(
    `RSS before the long-polls (vs bare Hono)`,
    `${number(service.idle, 1)} MB`,
    `${number(bare.idle, 1)} MB`,
    times(service.idle / bare.idle),
  );
  addRow(
    `one POST answers ${HELD_WAITERS} held long-polls (vs bare Hono)`,
    ms(service.releaseMs),
    ms(bare.releaseMs),
    times(service.releaseMs / bare.releaseMs),
  );
}

/**
 * HELD_STREAMS SSE streams on room "held" of `server`, each on its own connection,
 * held until every one has had its `ready` event; answers the RSS (MB) before and
 * while they are held.
 */
async function holdStreams(
  server: Server,
): Promise<{ idle: number; held: number }> {
  const after = await lastId(server.url, "held");
  await sleep(1000);
  const idle = rssMb(server.pid);
  const clients: RawGet[] = [];
  try {
    await inParallel(
      Array.from({ length: HELD_STREAMS }, (_, i) => i),
      100,
      async () => {
        const ready = Promise.withResolvers<void>();
        let buffer = "";
        clients.push(
          await RawGet.open(
            server.url,
            `/rooms/held/stream?after=${after}`,
            (text) => {
              buffer += text;
              if (buffer.includes("event: ready")) ready.resolve();
            },
          ),
        );
        const timeout = setTimeout(
          () => ready.reject(new Error("a stream got no ready event")),
          30_000,
        );
        await ready.promise.finally(() => clearTimeout(timeout));
      },
    );
    await sleep(2000);
    let held = 0;
    for (let i = 0; i < 5; i++) {
      held = Math.max(held, rssMb(server.pid));
      await sleep(200);
    }
    return { idle, held };
  } finally {
    for (const client of clients) client.close();
    await Promise.all(clients.map((client) => client.closed));
  }
}

/** Memory per held SSE stream, on fresh processes. */
async function caseHeldStreams(main: string) {
  progress(`memory with ${HELD_STREAMS} held streams`);
  const bareServer = await startBare();
  let bare: { idle: number; held: number };
  try {
    bare = await holdStreams(bareServer);
  } finally {
    await bareServer.stop();
  }
  const server = await startService(main, "service (streams)");
  let service: { idle: number; held: number };
  try {
    await call(server.url, "POST", "/rooms", { id: "held" });
    service = await holdStreams(server);
  } finally {
    await server.stop();
  }
  const per = (held: { idle: number; held: number }) =>
    (held.held - held.idle) * 1024 / HELD_STREAMS;
  addRow(
    `memory per held SSE stream, ${HELD_STREAMS} held (vs bare Hono)`,
    `${number(per(service), 1)} KB`,
    `${number(per(bare), 1)} KB`,
    times(per(service) / per(bare)),
    "≤ 30 KB",
    per(service) <= 30,
  );
}

/**
 * GETs of 100 messages at random cursors, one at a time, alternating between the
 * servers (the order swapping each time) for `seconds`: each one's latencies in ms.
 */
async function getLatencies(
  servers: { url: string; range: IdRange }[],
  seconds: number,
): Promise<number[][]> {
  const gets = servers.map(({ url, range }) => {
    const request = getPage("page", range);
    return async () => {
      const start = performance.now();
      const res = await fetch(url + request.vary!().path);
      await res.arrayBuffer();
      if (res.status !== 200) throw new Error(`GET page: ${res.status}`);
      return performance.now() - start;
    };
  });
  for (let i = 0; i < 200; i++) for (const get of gets) await get();
  const samples: number[][] = gets.map(() => []);
  const end = performance.now() + seconds * 1000;
  for (let i = 0; performance.now() < end; i++) {
    for (let k = 0; k < gets.length; k++) {
      const side = (i + k) % gets.length;
      samples[side].push(await gets[side]());
    }
  }
  return samples;
}

/**
 * A room of 10,000 against one of 1,000,000, each in its own database served by its
 * own process: GET latency at 1 connection and POST rate at 10, side by side.
 */
async function caseScale(dbs: Databases) {
  progress("a room of 10,000 messages against one of 1,000,000");
  const small = await startService(dbs.small, "service (10k)");
  const large = await startService(dbs.large, "service (1M)");
  try {
    const [s, l] = await getLatencies([
      { url: small.url, range: dbs.smallRoom },
      { url: large.url, range: dbs.largeRoom },
    ], SECONDS * 2);
    for (const p of [50, 99]) {
      const ratio = percentile(l, p) / percentile(s, p);
      addRow(
        `GET 100 p${p}, 1M room (vs 10k room), ${s.length}`,
        ms(percentile(l, p)),
        ms(percentile(s, p)),
        times(ratio),
        "≤ 1.50×",
        ratio <= 1.5,
      );
    }
    const post = postMessage("page");
    await load(small.url, post, 10, WARMUP_SECONDS);
    await load(large.url, post, 10, WARMUP_SECONDS);
    const [smallPost, largePost] = await sideBySide([
      httpSlice("POST in the 10k room", small, post, 10),
      httpSlice("POST in the 1M room", large, post, 10),
    ]);
    const ratio = rateOf(largePost) / rateOf(smallPost);
    addRow(
      "POST rate, 1M room (vs 10k room), 10 conn",
      perSecond(rateOf(largePost)) + flag("POST in the 1M room"),
      perSecond(rateOf(smallPost)) + flag("POST in the 10k room"),
      percent(ratio),
      "≥ 80%",
      ratio >= 0.8,
    );
  } finally {
    await Promise.all([small.stop(), large.stop()]);
  }
}

// ---- the run ----

/**
 * Runs one case; a failure becomes a row and a note (with the service's last output
 * when it died), and the next case goes on.
 */
async function attempt(
  name: string,
  fn: () => Promise<void>,
  service?: () => Server,
): Promise<void> {
  if (ONLY !== undefined && !name.includes(ONLY)) return;
  try {
    await fn();
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    const exited = service?.().exited();
    notes.push(
      `${name} failed: ${message}` +
        (exited
          ? `; the service exited (code ${exited.code}, signal ${exited.signal}): ` +
            service!().output().slice(-1500)
          : ""),
    );
    addRow(name, `error [${notes.length}]`, "—", "—", "—", false);
  }
}

async function main(): Promise<void> {
  const code = await withMoreFiles();
  if (code !== null) Deno.exit(code);
  const started = performance.now();
  const dir = await Deno.makeTempDir({ prefix: "sync-bench-" });
  const cleanup = async () => {
    await stopAll();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  };
  const onSignal = () => cleanup().finally(() => Deno.exit(130));
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  try {
    const dbs = await prepareDatabases(dir);
    printMachine(dbs.main);
    const rawFile = `${dir}/raw.db`;
    await Deno.copyFile(dbs.main, rawFile);
    const bare = await startBare();
    const refs: References = {
      bare,
      rawFile,
      seedFile: `${dir}/seed.db`,
      page: dbs.page,
    };
    let service = await startService(dbs.main);
    const current = () => service;
    // A case that killed the service must not take the next ones with it.
    const alive = async () => {
      if (service.exited()) service = await startService(dbs.main);
      return service;
    };
    for (const id of ["post", "state", "counter", "batch", "wake"]) {
      await call(service.url, "POST", "/rooms", { id });
    }
    const cases: [string, (server: Server) => Promise<void>][] = [
      ["POST messages", (server) => casePostMessages(server, refs)],
      ["GET 100 messages", (server) => caseGetPage(server, refs)],
      ["PUT state", (server) => casePutState(server, refs)],
      ["increments", (server) => caseIncrements(server, refs)],
      ["batch", (server) => caseBatch(server, refs)],
      ["history cost", () => caseHistoryCost(refs)],
      ["export", (server) => caseExport(server)],
      [
        "wake, one instance",
        (server) => caseWakeSameInstance(server.url, refs),
      ],
      ["wake, two instances", async (server) => {
        const second = await startService(dbs.main, "service (second)");
        try {
          await caseWakeAcrossInstances(server.url, second.url);
        } finally {
          await second.stop();
        }
      }],
      ["SSE fan-out", (server) => caseFanOut(server.url, refs)],
      ["deno serve --parallel", async (server) => {
        const parallel = await startParallel(dbs.main);
        try {
          await caseParallel(server, parallel, refs);
        } finally {
          await parallel.stop();
        }
      }],
    ];
    for (const [name, run] of cases) {
      await attempt(name, async () => run(await alive()), current);
    }
    addRow(
      "service RSS after the cases above",
      `${number(rssMb(service.pid), 1)} MB`,
    );
    await Promise.all([service.stop(), bare.stop()]);
    await attempt("caps", () => caseCaps(dir, dbs.main, dbs.page));
    await attempt("cold start", caseColdStart);
    await attempt("held long-polls", () => caseHeldWaiters(dbs.main));
    await attempt("held streams", () => caseHeldStreams(dbs.main));
    await attempt("10k vs 1M", () => caseScale(dbs));
  } finally {
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    await cleanup();
  }
  console.log();
  printTable();
  console.log(
    `\nrun time ${number((performance.now() - started) / 1000)} s`,
  );
}

if (import.meta.main) await main();
