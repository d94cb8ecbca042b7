/**
 * The documentation is tested: every shell example of README.md and docs/GUIDE.md, and of the
 * docs the server serves at `/README.md` and `/SKILL.md`, runs in order in one bash
 * shell against a fresh `deno task start`, and each answer must be what its example
 * says.
 *
 * An example is the code of a ```sh block up to an annotation: a comment `# → STATUS …`,
 * on the line after the command or at the end of its last line. Comment lines right
 * below it that are indented (`#` and two spaces or more) continue it.
 *
 *     curl -s localhost:8000/rooms/nope            # → 404 room_not_found
 *     curl -s -X PUT localhost:8000/rooms/demo/state -H 'content-type: application/json' \
 *       -d '{"key":"plan","value":"v3","if_version":1}'
 *     # → 409 {"error":"version_conflict",…,"current":{…,"version":2,…}}
 *
 * The example must exit 0 and make exactly one HTTP call, whose answer must have:
 * - the status;
 * - for a status of 400 or more, the error code the annotation names (a word right
 *   after the status, or `"error":"…"`), which it must name;
 * - every `"name":value` pair of the annotation whose value is a number, `true`,
 *   `false`, `null` or a string without `…`, as written (ids, versions, values);
 * - as its whole body, a JSON sample right after the status that has no `…` at all
 *   (`{"deleted":true}`, `[]`).
 *
 * The shell defines `curl` as a function that runs the real one and records each
 * answer, so the examples stay plain curl a reader can paste. README examples name
 * `localhost:8000`, which the test replaces by its server's address; the served docs
 * name the origin they were served from. A stream bounded with `--max-time` counts as
 * answered when its headers came.
 */
import assert from "node:assert/strict";
import { type Server, startServer } from "./testing.ts";

/** One example: its code, the annotation that ends it, and where it is. */
type Example = { line: number; code: string; note: string };

/** What an example's HTTP call answered, and what the example printed. */
type Run = {
  rc: number | undefined;
  calls: { status: number; body: string }[];
  stdout: string;
  stderr: string;
};

const ANNOTATION = /(?:^|\s)# → (.*)$/;
const CONTINUATION = /^#\s{2,}(\S.*)$/;

/** The ```sh blocks of a markdown document, with the line each one's code starts on. */
function shellBlocks(markdown: string): { line: number; lines: string[] }[] {
  const blocks: { line: number; lines: string[] }[] = [];
  const lines = markdown.split("\n");
  for (let i = 0; i < lines.length; i++) {
    if (!/^```(sh|bash|shell)\s*$/.test(lines[i])) continue;
    const start = i + 1;
    let end = start;
    while (end < lines.length && !lines[end].startsWith("```")) end++;
    blocks.push({ line: start + 1, lines: lines.slice(start, end) });
    i = end;
  }
  return blocks;
}

/** Splits the blocks into examples at their annotations. */
function examples(blocks: { line: number; lines: string[] }[]): Example[] {
  const found: Example[] = [];
  for (const block of blocks) {
    let from = 0;
    for (let i = 0; i < block.lines.length; i++) {
      const match = block.lines[i].match(ANNOTATION);
      if (!match) continue;
      const note = [match[1]];
      for (let j = i + 1; j < block.lines.length; j++) {
        const more = block.lines[j].match(CONTINUATION);
        if (!more) break;
        note.push(more[1]);
      }
      const code = block.lines.slice(from, i + 1).join("\n");
      const line = block.line + from;
      assert.ok(
        code.split("\n").some((l) => l.trim() && !l.trim().startsWith("#")),
        `line ${line}: an annotation with no command before it`,
      );
      found.push({ line, code, note: note.join(" ") });
      from = i + 1;
    }
    const rest = block.lines.slice(from);
    assert.ok(
      rest.every((l) => !l.trim() || l.trim().startsWith("#")),
      `line ${
        block.line + from
      }: a command with no "# → STATUS" annotation after it:\n${
        rest.join("\n")
      }`,
    );
  }
  return found;
}

/** The JSON value `text` starts with (an object or array), if it has no `…`. */
function sample(text: string): unknown {
  if (!/^[[{]/.test(text)) return undefined;
  let depth = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (inString) {
      if (ch === "\\") i++;
      else if (ch === '"') inString = false;
    } else if (ch === '"') inString = true;
    else if (ch === "{" || ch === "[") depth++;
    else if (ch === "}" || ch === "]") {
      if (--depth === 0) {
        const token = text.slice(0, i + 1);
        if (token.includes("…")) return undefined;
        try {
          return JSON.parse(token);
        } catch {
          return undefined;
        }
      }
    }
  }
  return undefined;
}

/** What curl's exit codes mean, for the failures an example is likely to have. */
const CURL_EXIT: Record<number, string> = {
  7: " (curl could not connect)",
  28: " (curl gave up after 5 s with no answer: a wait that nothing ends?)",
};

/** What is wrong with an answer, against the example's annotation (nothing: []). */
function problems(example: Example, run: Run): string[] {
  const head = example.note.match(/^(\d{3})(?!\d)\s*(.*)$/s);
  if (!head) {
    return [`the annotation does not start with a status: ${example.note}`];
  }
  if (run.rc !== 0) {
    const why = run.rc === undefined
      ? "never finished (a shell syntax error?)"
      : `exited ${run.rc}${CURL_EXIT[run.rc] ?? ""}`;
    return [`the example ${why}`];
  }
  if (run.calls.length !== 1) {
    return [
      `the example made ${run.calls.length} HTTP calls; annotate each one`,
    ];
  }
  const [{ status, body }] = run.calls;
  const out: string[] = [];
  const expected = Number(head[1]);
  let rest = head[2];
  if (status !== expected) out.push(`answered ${status}, not ${expected}`);
  let json: unknown;
  try {
    json = JSON.parse(body);
  } catch {
    json = undefined;
  }
  if (expected >= 400) {
    const word = rest.match(/^([a-z][a-z0-9_]*)(?![\w"])/);
    const quoted = rest.match(/"error":\s*"([a-z0-9_]+)"/);
    const code = word?.[1] ?? quoted?.[1];
    const actual = (json as { error?: unknown } | undefined)?.error;
    if (!code) out.push("the annotation of an error names no error code");
    else if (actual !== code) out.push(`error ${actual}, not ${code}`);
    if (word) rest = rest.slice(word[0].length).trimStart();
  }
  const whole = sample(rest);
  if (whole !== undefined) {
    try {
      assert.deepEqual(json, whole);
    } catch {
      out.push(`the whole body is not ${JSON.stringify(whole)}`);
    }
  }
  const pairs = example.note.matchAll(
    /"([A-Za-z_]\w*)":\s*(-?\d+(?:\.\d+)?(?![\d.])|true|false|null|"(?:[^"\\…]|\\.)*")/g,
  );
  for (const [, name, value] of pairs) {
    const escaped = `"${name}":${value}`.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
    if (!new RegExp(escaped + "(?![\\d.eE])").test(body)) {
      out.push(`no "${name}":${value} in the answer`);
    }
  }
  return out;
}

// Runs in the examples' shell: `curl` records each answer (headers, body) in the log,
// then prints the body as the real one would; a bound on each call keeps a wait that
// is not answered from hanging the test. Only builtins around the real curl where
// bash has $EPOCHREALTIME (5.0 on): starting processes is most of the examples' time.
const PRELUDE = String.raw`set -o pipefail
curl() {
  local call="$SYNC_DOCS_DIR/call.$EPOCHREALTIME" rc body=""
  if [ -z "$EPOCHREALTIME" ]; then call=$(mktemp "$SYNC_DOCS_DIR/call.XXXXXX"); fi
  command curl --max-time 5 --dump-header "$call.head" --output "$call.body" "$@"
  rc=$?
  [ -f "$call.body" ] && IFS= read -r -d "" body <"$call.body"
  printf "%s" "$body"
  if [ "$rc" = 28 ] && [ -s "$call.head" ]; then rc=0; fi
  echo "call $call" >>"$SYNC_DOCS_DIR/log"
  return "$rc"
}
`;

/** Runs the examples in order in one bash shell in `dir`; one Run per example. */
async function runAll(dir: string, list: Example[]): Promise<Run[]> {
  const mark = (i: number) => `@@example ${i}@@`;
  const script = PRELUDE +
    list.map((example, i) =>
      `${example.code}\necho "end ${i} $?" >>"$SYNC_DOCS_DIR/log"\n` +
      `echo '${mark(i)}'; echo '${mark(i)}' >&2\n`
    ).join("");
  await Deno.writeTextFile(`${dir}/examples.sh`, script);
  const out = await new Deno.Command("bash", {
    args: ["examples.sh"],
    cwd: dir,
    env: { SYNC_DOCS_DIR: dir },
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(60_000),
  }).output();
  const split = (bytes: Uint8Array) =>
    new TextDecoder().decode(bytes).split(/@@example \d+@@\n/);
  const stdout = split(out.stdout);
  const stderr = split(out.stderr);
  const runs: Run[] = list.map((_, i) => ({
    rc: undefined,
    calls: [],
    stdout: stdout[i] ?? "",
    stderr: stderr[i] ?? "",
  }));
  let calls: Run["calls"] = [];
  const log = await Deno.readTextFile(`${dir}/log`).catch(() => "");
  for (const entry of log.split("\n").filter(Boolean)) {
    if (entry.startsWith("call ")) {
      const call = entry.slice("call ".length);
      const head = await Deno.readTextFile(`${call}.head`).catch(() => "");
      const statuses = [...head.matchAll(/^HTTP\/[\d.]+ (\d{3})/gm)];
      calls.push({
        status: Number(statuses.at(-1)?.[1] ?? 0),
        body: await Deno.readTextFile(`${call}.body`).catch(() => ""),
      });
    } else {
      const [, i, rc] = entry.split(" ");
      runs[Number(i)] = { ...runs[Number(i)], rc: Number(rc), calls };
      calls = [];
    }
  }
  return runs;
}

/**
 * Runs the examples of `markdown` in `dir` (they name the server themselves), fails
 * with every example whose answer differs from its annotation, and returns how many
 * ran.
 */
async function check(
  name: string,
  markdown: string,
  dir: string,
): Promise<number> {
  const list = examples(shellBlocks(markdown));
  const runs = await runAll(dir, list);
  const failures = list.flatMap((example, i) => {
    const found = problems(example, runs[i]);
    if (found.length === 0) return [];
    return [
      `${name}:${example.line}: ${found.join("; ")}\n${example.code}\n` +
      `--- printed:\n${runs[i].stdout.slice(0, 2000)}${runs[i].stderr}`,
    ];
  });
  assert.deepEqual(failures, [], failures.join("\n\n"));
  console.log(`${name}: ${list.length} examples ran as documented`);
  return list.length;
}

/** Runs `fn` against a fresh `deno task start` on a temp-file database. */
async function withServer(fn: (base: string, dir: string) => Promise<void>) {
  const dir = await Deno.makeTempDir({ prefix: "sync-docs-test-" });
  let server: Server | undefined;
  try {
    server = await startServer({
      DATABASE_URL: `file:${dir}/sync.db`,
      RATE_LIMIT: "0",
    });
    await fn(server.url, dir);
  } catch (error) {
    console.error(`server output:\n${server?.output()}`);
    throw error;
  } finally {
    await server?.stop("SIGTERM");
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("every shell example of README.md runs in order against a fresh server and answers as annotated", async () => {
  const readme = await Deno.readTextFile(
    new URL("./README.md", import.meta.url),
  );
  // The first block is the two commands (start the service, run the tests), not examples.
  const [first] = shellBlocks(readme);
  assert.deepEqual(
    first.lines.map((line) => line.split("#")[0].trim()),
    ["npx -y deno@2 task start", "npx -y deno@2 task test"],
  );
  const rest = readme.split("\n").map((line, i) =>
    i < first.line + first.lines.length ? "" : line
  ).join("\n");
  await withServer(async (base, dir) => {
    const count = await check(
      "README.md",
      rest.replaceAll("localhost:8000", new URL(base).host),
      dir,
    );
    assert.ok(count >= 8, `only ${count} examples in README.md`);
  });
});

Deno.test("every shell example of docs/GUIDE.md runs in order against a fresh server and answers as annotated", async () => {
  const guide = await Deno.readTextFile(
    new URL("./docs/GUIDE.md", import.meta.url),
  );
  await withServer(async (base, dir) => {
    const count = await check(
      "docs/GUIDE.md",
      guide.replaceAll("localhost:8000", new URL(base).host),
      dir,
    );
    assert.ok(count >= 50, `only ${count} examples in docs/GUIDE.md`);
  });
});

for (const path of ["/README.md", "/SKILL.md"]) {
  Deno.test(`every shell example of the docs served at ${path} runs in order against that server and answers as annotated`, async () => {
    await withServer(async (base, dir) => {
      const res = await fetch(base + path);
      assert.equal(res.status, 200);
      const docs = await res.text();
      assert.ok(docs.includes(`curl -s -X POST ${base}/rooms`));
      const count = await check(path, docs, dir);
      assert.ok(count >= 5, `only ${count} examples in ${path}`);
    });
  });
}
