/**
 * The MCP endpoint as people try it: the MCP Inspector's CLI, run by `npx` as its
 * README says, against a real `deno task start`. Its client lists the tools first and
 * then checks every result against the tool's output schema, even an error: a tool
 * error that carried REST's body as structured content failed there with "data must
 * NOT have additional properties" (issue 11), where it must be REST's JSON as text.
 */
import assert from "node:assert/strict";
import { startServer } from "./testing.ts";

/** Pinned, as every dependency is: a new Inspector is a change to review. */
const INSPECTOR = "@modelcontextprotocol/inspector@2.12.0";

/** What one run of the Inspector's CLI printed, and how it exited. */
type Run = {
  code: number;
  signal: Deno.Signal | null;
  stdout: string;
  stderr: string;
};

/**
 * Runs `npx @modelcontextprotocol/inspector --cli <url> …` with its files in `dir`: it
 * keeps its catalog, client config and OAuth state under the home directory otherwise.
 * It reaches only the npm registry (through npx) and the server; it opens no browser
 * (that is its web UI, and OAuth, which `--stored-auth-only` turns off).
 */
async function inspector(url: string, dir: string, args: string[]) {
  const output = await new Deno.Command("npx", {
    args: [
      "-y",
      INSPECTOR,
      "--cli",
      url,
      "--transport",
      "http",
      "--stored-auth-only",
      ...args,
    ],
    env: {
      MCP_STORAGE_DIR: dir,
      MCP_CATALOG_PATH: `${dir}/mcp.json`,
      MCP_CLIENT_CONFIG_PATH: `${dir}/client.json`,
      MCP_INSPECTOR_OAUTH_STATE_PATH: `${dir}/oauth.json`,
      MCP_AUTO_OPEN_ENABLED: "false",
      NO_COLOR: "1",
      // npm's own notices (engines, updates) are not the Inspector's answer.
      npm_config_loglevel: "error",
      npm_config_update_notifier: "false",
    },
    stdout: "piped",
    stderr: "piped",
    // The first run downloads the Inspector (about 25 s); later runs take 4 s.
    signal: AbortSignal.timeout(50_000),
  }).output();
  const decode = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
  return {
    code: output.code,
    signal: output.signal,
    stdout: decode(output.stdout),
    stderr: decode(output.stderr),
  } satisfies Run;
}

/** A tool result as the Inspector prints it. */
type Result = {
  content: { type: string; text: string }[];
  structuredContent?: Record<string, unknown>;
  isError?: boolean;
};

Deno.test("the MCP Inspector CLI lists the tools, gets REST's error JSON as text, and structured answers", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "sync-inspector-test-" });
  const server = await startServer({
    DATABASE_URL: `file:${dir}/sync.db`,
    RATE_LIMIT: "0",
  });
  const url = `${server.url}/mcp`;
  const run = (args: string[]) => inspector(url, dir, args);
  const explain = (run: Run) =>
    `exit ${run.code}${
      run.signal ? ` (${run.signal}: timed out?)` : ""
    }\n--- stdout:\n${run.stdout}\n--- stderr:\n${run.stderr}`;
  try {
    const created = await fetch(`${server.url}/rooms`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ id: "r" }),
    });
    assert.equal(created.status, 201);
    await created.body?.cancel();

    // Run first and alone: it may download the Inspector into npx's cache.
    const list = await run(["--method", "tools/list"]);
    await t.step("tools/list names every tool", () => {
      assert.equal(list.code, 0, explain(list));
      const { tools } = JSON.parse(list.stdout) as {
        tools: { name: string }[];
      };
      assert.deepEqual(tools.map((tool) => tool.name).toSorted(), [
        "batch",
        "claim_message",
        "complete_message",
        "create_room",
        "delete_state",
        "get_context",
        "get_state",
        "heartbeat",
        "join_room",
        "post_message",
        "read_messages",
        "release_message",
        "set_state",
        "state_history",
      ]);
    });

    const [missing, set] = await Promise.all([
      run([
        "--method",
        "tools/call",
        "--tool-name",
        "get_state",
        "--tool-arg",
        "room=r",
        "key=missing",
      ]),
      run([
        "--method",
        "tools/call",
        "--tool-name",
        "set_state",
        "--tool-arg",
        "room=r",
        "key=n",
        "value=42",
      ]),
    ]);

    await t.step(
      "a tool error is REST's JSON error body as text, with no structured content",
      () => {
        // 5: the Inspector's exit code for a result that is isError.
        assert.equal(missing.code, 5, explain(missing));
        assert.match(missing.stderr, /"code":"tool_is_error"/);
        const result = JSON.parse(missing.stdout) as Result;
        assert.deepEqual(result, {
          content: [{ type: "text", text: result.content[0].text }],
          isError: true,
        });
        assert.deepEqual(JSON.parse(result.content[0].text), {
          error: "key_not_found",
          message:
            'Key "missing" does not exist in scope "_shared" of room "r"',
          scope: "_shared",
          key: "missing",
          docs: `${server.url}/README.md#errors`,
        });
      },
    );

    await t.step(
      "a tool's answer is REST's JSON as structured content and as text",
      async () => {
        assert.equal(set.code, 0, explain(set));
        const result = JSON.parse(set.stdout) as Result;
        const entry = await (await fetch(`${server.url}/rooms/r/state?key=n`))
          .json();
        assert.equal(entry.value, 42);
        assert.deepEqual(result, {
          content: [{ type: "text", text: JSON.stringify(entry) }],
          structuredContent: entry,
          isError: false,
        });
      },
    );
  } catch (error) {
    console.error(`server output:\n${server.output()}`);
    throw error;
  } finally {
    await server.stop("SIGTERM");
    await Deno.remove(dir, { recursive: true });
  }
});
