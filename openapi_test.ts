/**
 * The agent-native surface: the OpenAPI document (valid 3.1, every route, responses
 * that match the real answers), the docs at every path agents try, and the docs
 * link in every error.
 */
import assert from "node:assert/strict";
import { Validator } from "@seriousme/openapi-schema-validator";
import { createApp } from "./main.ts";
import {
  AgentOut,
  EntryOut,
  ErrorOut,
  MessageOut,
  NewRoomOut,
} from "./schemas.ts";
import { freshDb, TEST_DATABASE } from "./testing.ts";

async function withApp(
  fn: (app: ReturnType<typeof createApp>) => Promise<void>,
) {
  const { db, close } = await freshDb();
  try {
    await fn(createApp({ db, rateLimit: null }));
  } finally {
    await close();
  }
}

const json = (body: unknown) => ({
  method: "POST",
  headers: { "content-type": "application/json" },
  body: JSON.stringify(body),
});

Deno.test("GET /openapi.json is a valid OpenAPI 3.1 document", async () => {
  await withApp(async (app) => {
    const res = await app.request("/openapi.json");
    assert.equal(res.status, 200);
    const doc = await res.json();
    assert.equal(doc.openapi, "3.1.0");
    const result = await new Validator().validate(doc);
    assert.equal(result.valid, true, JSON.stringify(result.errors));
  });
});

Deno.test("every route of the app is in the OpenAPI document, and only those", async () => {
  await withApp(async (app) => {
    const doc = await (await app.request("/openapi.json")).json();
    const served = new Set(
      app.routes
        .filter((r) => r.method !== "ALL" || r.path === "/mcp")
        .map((r) =>
          `${r.method === "ALL" ? "post" : r.method.toLowerCase()} ${
            r.path.replace(/:(\w+)/g, "{$1}")
          }`
        ),
    );
    const documented = new Set(
      Object.entries(doc.paths as Record<string, Record<string, unknown>>)
        .flatMap(([path, ops]) =>
          Object.keys(ops).map((method) => `${method} ${path}`)
        ),
    );
    assert.deepEqual([...documented].sort(), [...served].sort());
  });
});

Deno.test("the OpenAPI request schemas come from the validating zod schemas", async () => {
  await withApp(async (app) => {
    const doc = await (await app.request("/openapi.json")).json();
    const put =
      doc.paths["/rooms/{id}/state"].put.requestBody.content["application/json"]
        .schema;
    assert.deepEqual(Object.keys(put.properties).sort(), [
      "agent",
      "if_version",
      "increment",
      "key",
      "merge",
      "scope",
      "ttl",
      "value",
    ]);
    assert.equal(
      put.additionalProperties,
      false,
      "unknown fields are refused, as zod does",
    );
    const read = doc.paths["/rooms/{id}/messages"].get.parameters.map((
      p: { name: string },
    ) => p.name);
    assert.ok(
      read.includes("after") && read.includes("wait") && read.includes("for"),
    );
    assert.ok(
      doc.paths["/rooms/{id}/state"].put.responses["409"],
      "conflicts are documented",
    );
  });
});

Deno.test("real answers match the documented response shapes", async () => {
  await withApp(async (app) => {
    const room = await (await app.request("/rooms", json({ id: "r" }))).json();
    NewRoomOut.strict().parse(room);
    AgentOut.strict().parse(
      await (await app.request("/rooms/r/agents", json({ id: "a", name: "A" })))
        .json(),
    );
    MessageOut.strict().parse(
      await (await app.request("/rooms/r/messages", json({ body: { x: 1 } })))
        .json(),
    );
    const put = await app.request("/rooms/r/state", {
      ...json({ key: "k", value: 1 }),
      method: "PUT",
    });
    EntryOut.strict().parse(await put.json());
    const missing = await (await app.request("/rooms/nope")).json();
    ErrorOut.parse(missing);
  });
});

Deno.test("every error links to the docs section that explains it", async () => {
  await withApp(async (app) => {
    await app.request("/rooms", json({ id: "r" }));
    const cases: [Response | Promise<Response>, string, string][] = [
      [app.request("/rooms/nope"), "room_not_found", "errors"],
      [
        app.request("/rooms/r/state", {
          ...json({ key: "k", value: 1, if_version: 3 }),
          method: "PUT",
        }),
        "version_conflict",
        "coordination",
      ],
      [
        app.request("/rooms/r", { headers: { authorization: "Bearer nope" } }),
        "invalid_token",
        "tokens-and-locked-rooms",
      ],
      [app.request("/nowhere"), "not_found", "errors"],
    ];
    const docs = await (await app.request("/README.md")).text();
    for (const [pending, code, section] of cases) {
      const body = await (await pending).json();
      assert.equal(body.error, code);
      assert.equal(body.docs, `http://localhost/README.md#${section}`);
      const heading = docs.split("\n").find((line) =>
        line.startsWith("## ") &&
        line.slice(3).toLowerCase().replaceAll(" ", "-") === section
      );
      assert.ok(heading, `the docs have a section "${section}"`);
    }
  });
});

Deno.test("the docs answer at /, /README.md, /llms.txt and /SKILL.md", async () => {
  await withApp(async (app) => {
    const root = await (await app.request("/")).text();
    for (const path of ["/README.md", "/llms.txt"]) {
      const res = await app.request(path);
      assert.equal(
        res.headers.get("content-type"),
        "text/markdown; charset=utf-8",
      );
      assert.equal(await res.text(), root);
    }
    const skill = await (await app.request("/SKILL.md")).text();
    const front = skill.match(/^---\nname: (.+)\ndescription: (.+)\n---\n/);
    assert.ok(front, "SKILL.md opens with name and description front matter");
    assert.equal(front[1], "sync");
    assert.ok(skill.endsWith(root));
  });
});

// ---- the document states what the server enforces, and real clients take it ----

type Operation = {
  operationId?: string;
  parameters?: {
    name: string;
    in: string;
    schema: Record<string, unknown>;
  }[];
  requestBody?: unknown;
  responses: Record<string, unknown>;
};

/** The document as a client on `origin` gets it, and its operations. */
async function documentOf(app: ReturnType<typeof createApp>, origin: string) {
  const doc = await (await app.request(`${origin}/openapi.json`)).json();
  const operations = Object.entries(
    doc.paths as Record<string, Record<string, Operation>>,
  ).flatMap(([path, ops]) =>
    Object.entries(ops).map(([method, op]) => ({ method, path, op }))
  );
  return { doc, operations };
}

Deno.test("every operation has an operationId, and no two share one", async () => {
  await withApp(async (app) => {
    const { operations } = await documentOf(app, "http://sync.test");
    const ids = operations.map(({ op }) => op.operationId);
    assert.ok(ids.every((id) => typeof id === "string" && id !== ""));
    assert.equal(new Set(ids).size, ids.length);
  });
});

Deno.test("every id parameter has the pattern and length the server checks; numbers are bounded integers", async () => {
  await withApp(async (app) => {
    const { operations } = await documentOf(app, "http://sync.test");
    for (const { method, path, op } of operations) {
      for (const p of op.parameters ?? []) {
        const where = `${method} ${path} ${p.in} ${p.name}`;
        // `after` is a room id on GET /rooms, a message id elsewhere.
        const roomCursor = path === "/rooms" && p.name === "after";
        if (
          ["id", "agent", "from", "to", "for", "scope"].includes(p.name) ||
          roomCursor
        ) {
          assert.equal(
            p.schema.pattern,
            "^([A-Za-z0-9._:@-]*[A-Za-z0-9_:@-][A-Za-z0-9._:@-]*|\\.{3,})$",
            where,
          );
          assert.equal(p.schema.maxLength, 128, where);
        }
        if (
          ["mid", "after", "before", "limit", "thread", "after_version"]
              .includes(p.name) && !roomCursor || p.name === "messages"
        ) {
          assert.equal(p.schema.type, "integer", where);
          assert.equal(typeof p.schema.minimum, "number", where);
          assert.equal(typeof p.schema.maximum, "number", where);
        }
        if (p.name === "wait") {
          assert.deepEqual(
            [p.schema.type, p.schema.minimum, p.schema.maximum],
            ["number", 0, 50],
            where,
          );
        }
      }
    }
    const limit = operations.find(({ op }) => op.operationId === "listMessages")
      ?.op.parameters?.find((p) => p.name === "limit");
    assert.deepEqual(limit?.schema, {
      type: "integer",
      minimum: 1,
      maximum: 1000,
    });
  });
});

Deno.test("every operation documents 429 and 503; 400 wherever it takes input; 401 and 403 where tokens apply; 406 and 415 on /mcp", async () => {
  await withApp(async (app) => {
    const { operations } = await documentOf(app, "http://sync.test");
    for (const { method, path, op } of operations) {
      const where = `${method} ${path}`;
      const statuses = Object.keys(op.responses);
      assert.ok(statuses.includes("429"), where);
      assert.ok(statuses.includes("503"), where);
      if ((op.parameters?.length ?? 0) > 0 || op.requestBody) {
        assert.ok(statuses.includes("400"), `${where} takes input`);
      }
      if (path.startsWith("/rooms/{id}")) {
        assert.ok(statuses.includes("401") && statuses.includes("404"), where);
      }
      if (op.requestBody) assert.ok(statuses.includes("413"), where);
    }
    const mcp = operations.find(({ path }) => path === "/mcp")!.op;
    assert.ok("406" in mcp.responses && "415" in mcp.responses);
    const write = operations.find(({ op }) => op.operationId === "putState")!;
    assert.ok("403" in write.op.responses && "409" in write.op.responses);
  });
});

Deno.test("JSON values are one named component, and no schema refers to itself", async () => {
  await withApp(async (app) => {
    const { doc } = await documentOf(app, "http://sync.test");
    assert.deepEqual(doc.components.schemas.JsonValue, {
      description: "Any JSON value",
    });
    const text = JSON.stringify(doc);
    assert.ok(!text.includes("$defs"), "no local definitions left over");
    assert.ok(!/"Schema\d+"/.test(text), "no anonymous recursive schemas");
  });
});

/** Runs an npm command-line tool through npx, as its users do. */
async function npx(args: string[], cwd: string) {
  const { code, stdout, stderr } = await new Deno.Command("npx", {
    args: ["-y", ...args],
    cwd,
    env: { NO_COLOR: "1", NO_UPDATE_NOTIFIER: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decode = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
  return { code, out: decode(stdout) + decode(stderr) };
}

/** Runs `fn` in a temp folder holding the document as `openapi.json`. */
async function withDocument(fn: (dir: string) => Promise<void>) {
  await withApp(async (app) => {
    const dir = await Deno.makeTempDir();
    try {
      const { doc } = await documentOf(app, "https://sync.test");
      await Deno.writeTextFile(`${dir}/openapi.json`, JSON.stringify(doc));
      await fn(dir);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  });
}

// These run the clients once: they read the document, not the database.
const clientsToo = TEST_DATABASE === "embedded";

Deno.test({
  name:
    "openapi-typescript generates types from the document that a client type-checks against",
  ignore: !clientsToo,
  async fn() {
    await withDocument(async (dir) => {
      const generated = await npx(
        ["openapi-typescript@7.13.0", "openapi.json", "-o", "types.ts"],
        dir,
      );
      assert.equal(generated.code, 0, generated.out);
      await Deno.writeTextFile(
        `${dir}/client.ts`,
        `import type { components, paths } from "./types.ts";
type Post = paths["/rooms/{id}/messages"]["post"];
type Message = Post["responses"][201]["content"]["application/json"];
type Problem = components["schemas"]["Error"];
type Entry = paths["/rooms/{id}/state"]["put"]["responses"][200]["content"]["application/json"];

/** Posts a message; answers the message or the error. */
export async function post(
  base: string,
  room: string,
  body: Post["requestBody"]["content"]["application/json"],
): Promise<Message | Problem> {
  const res = await fetch(\`\${base}/rooms/\${room}/messages\`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return await res.json() as Message | Problem;
}

export const version = (entry: Entry): number => entry.version;
export const code = (problem: Problem): string => problem.error;
`,
      );
      const checked = await new Deno.Command(Deno.execPath(), {
        args: ["check", "--no-config", "client.ts"],
        cwd: dir,
        env: { NO_COLOR: "1" },
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.equal(
        checked.code,
        0,
        new TextDecoder().decode(checked.stderr),
      );
    });
  },
});

Deno.test({
  name: "Redocly's linter finds no error and no warning in the document",
  ignore: !clientsToo,
  async fn() {
    await withDocument(async (dir) => {
      // Redocly's recommended rules, less `info-license`: the project has not
      // chosen a license, and the document must not claim one.
      await Deno.writeTextFile(
        `${dir}/redocly.yaml`,
        "extends:\n  - recommended\nrules:\n  info-license: off\n",
      );
      const lint = await npx(
        ["@redocly/cli@2.77.0", "lint", "openapi.json"],
        dir,
      );
      assert.equal(lint.code, 0, lint.out);
      assert.match(lint.out, /Your API description is valid/);
      assert.doesNotMatch(
        lint.out,
        /(Warning|Error) was generated/,
        lint.out,
      );
      assert.doesNotMatch(lint.out, /You have \d+ (warning|error)/, lint.out);
    });
  },
});
