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
  ROUTES,
} from "./openapi.ts";
import { freshDb } from "./testing.ts";

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
    assert.equal(ROUTES.length, served.size);
  });
});

Deno.test("the OpenAPI request schemas come from the validating zod schemas", async () => {
  await withApp(async (app) => {
    const doc = await (await app.request("/openapi.json")).json();
    const put =
      doc.paths["/rooms/{id}/state"].put.requestBody.content["application/json"]
        .schema;
    assert.deepEqual(Object.keys(put.properties).sort(), [
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
