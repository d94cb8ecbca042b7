/**
 * The OpenAPI document as a contract (issue 11): requests built from `/openapi.json`
 * itself, good and bad, go to every operation it lists, and every answer must have a
 * status that operation documents and, where that status documents JSON, a body valid
 * against its schema (ajv, JSON Schema 2020-12, the document's `$ref`s resolved in the
 * document). Text answers (markdown, HTML, Server-Sent Events) must have a documented
 * content type.
 *
 * - generated: fast-check builds requests from each operation's parameters and request
 *   body schema (valid values, values out of range or of the wrong type, unknown fields
 *   and parameters, missing fields, text that is not JSON, empty bodies, tokens real and
 *   malformed), often naming a room, agent, message or key made in a setup step so
 *   that success answers happen too;
 * - a table: at least one good and one bad request per operation, and the table's
 *   operations are exactly the document's (a route added to routes.ts fails here until
 *   it has a row);
 * - the other way round: the requests the table's good rows send, which the server
 *   accepts, must be valid against the documented parameter and request body schemas.
 *
 * A mismatch is reported with the request, the answer and the schema error; all
 * distinct mismatches of a run are listed at once. `FUZZ_SEED=<n>` replays the
 * generated part (its seed is printed) and `FUZZ_LOG=1` prints each of its requests,
 * as in fuzz_test.ts.
 */
import assert from "node:assert/strict";
import { Ajv2020, type ValidateFunction } from "ajv/dist/2020.js";
import fc from "fast-check";
import { createApp } from "./main.ts";
import { freshDb } from "./testing.ts";

type App = ReturnType<typeof createApp>;

/** The origin of `app.request` URLs. */
const ORIGIN = "http://localhost";

// ---- the document ----

/** The part of JSON Schema the document uses. */
type Schema = {
  $ref?: string;
  type?: string | string[];
  enum?: unknown[];
  anyOf?: Schema[];
  oneOf?: Schema[];
  pattern?: string;
  minLength?: number;
  maxLength?: number;
  minimum?: number;
  maximum?: number;
  exclusiveMinimum?: number;
  properties?: Record<string, Schema>;
  required?: string[];
  items?: Schema;
};
type Parameter = {
  name: string;
  in: "path" | "query" | "header" | "cookie";
  required?: boolean;
  schema: Schema;
};
type Content = Record<string, { schema?: Schema }>;
type Operation = {
  operationId: string;
  parameters?: Parameter[];
  requestBody?: { required?: boolean; content: Content };
  responses: Record<string, { description: string; content?: Content }>;
};
type Document = {
  openapi: string;
  paths: Record<string, Record<string, Operation>>;
  components: { schemas: Record<string, Schema> };
};

/** One operation of the document: a method on a path. */
type Op = {
  /** `POST /rooms/{id}/messages` */
  name: string;
  method: string;
  path: string;
  operation: Operation;
  segments: string[];
};

const METHODS = ["get", "put", "post", "delete", "patch", "head", "options"];

function operationsOf(doc: Document): Op[] {
  return Object.entries(doc.paths).flatMap(([path, item]) =>
    Object.entries(item)
      .filter(([method]) => METHODS.includes(method))
      .map(([method, operation]) => ({
        name: `${method.toUpperCase()} ${path}`,
        method: method.toUpperCase(),
        path,
        operation,
        segments: path.split("/"),
      }))
  );
}

/**
 * The documented operation that serves `method url`, matched as the router does: the
 * URL is normalized first (`/rooms/..` is `/`), a `{param}` is one non-empty segment,
 * literal segments win. Undefined when the document has none.
 */
function route(ops: Op[], method: string, url: string): Op | undefined {
  const segments = new URL(url, ORIGIN).pathname.split("/");
  const literals = (op: Op) =>
    op.segments.filter((s) => !s.startsWith("{")).length;
  return ops
    .filter((op) =>
      op.method === method && op.segments.length === segments.length &&
      op.segments.every((s, i) =>
        s.startsWith("{") ? segments[i] !== "" : s === segments[i]
      )
    )
    .sort((a, b) => literals(b) - literals(a))[0];
}

/** The path parameters of `url` as `op` names them, decoded. */
function pathParams(op: Op, url: string): Record<string, string> {
  const segments = new URL(url, ORIGIN).pathname.split("/");
  return Object.fromEntries(
    op.segments.flatMap((s, i) =>
      s.startsWith("{")
        ? [[s.slice(1, -1), decodeURIComponent(segments[i])]]
        : []
    ),
  );
}

/** A JSON pointer into the document, as a URI fragment ajv resolves. */
function pointer(...segments: string[]): string {
  return `doc#/${
    segments.map((s) =>
      encodeURIComponent(s.replaceAll("~", "~0").replaceAll("/", "~1"))
    ).join("/")
  }`;
}

/** The media type of a Content-Type header, without its parameters. */
function mediaType(header: string | null): string {
  return (header ?? "").split(";")[0].trim().toLowerCase();
}

/** RFC 3339 date-time, as `format: date-time` means in JSON Schema. */
const DATE_TIME =
  /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$/i;

/** The document of an app, and validators for its schemas. */
type Contract = {
  app: App;
  doc: Document;
  ops: Op[];
  /** A validator for the schema at a pointer of the document (compiled once). */
  validator: (ref: string) => ValidateFunction;
  ajv: Ajv2020;
};

/** Reads the document from the app and prepares its validators. */
async function contractOf(app: App): Promise<Contract> {
  const res = await app.request("/openapi.json");
  assert.equal(res.status, 200);
  const doc = await res.json() as Document;
  assert.equal(doc.openapi, "3.1.0");
  const ajv = new Ajv2020({ strict: false, allErrors: true });
  ajv.addFormat(
    "date-time",
    (s: string) => DATE_TIME.test(s) && !Number.isNaN(Date.parse(s)),
  );
  // The whole document under one id: its `#/components/...` refs resolve inside it.
  ajv.addSchema(doc as object, "doc");
  const compiled = new Map<string, ValidateFunction>();
  const validator = (ref: string) => {
    let validate = compiled.get(ref);
    if (validate === undefined) {
      validate = ajv.compile({ $ref: ref });
      compiled.set(ref, validate);
    }
    return validate;
  };
  return { app, doc, ops: operationsOf(doc), validator, ajv };
}

/** Follows `$ref`s into the document's components. */
function deref(doc: Document, schema: Schema): Schema {
  let s = schema;
  for (let hops = 0; s.$ref !== undefined && hops < 10; hops++) {
    const name = s.$ref.replace("#/components/schemas/", "");
    s = doc.components.schemas[name];
    assert.ok(s, `unresolved $ref ${schema.$ref}`);
  }
  return s;
}

function typesOf(s: Schema): string[] {
  return s.type === undefined ? [] : [s.type].flat();
}

// ---- the world requests point at ----

/** Kinds of things made in the setup that requests may name. */
type Kind = "rooms" | "agents" | "messages" | "keys" | "scopes";

/** The index-th existing thing of a kind, looked up when the request is sent. */
class Existing {
  constructor(readonly kind: Kind, readonly index: number) {}
}

/** Which existing things a parameter or field of a given name may name. */
const HINTS: Record<string, Kind> = {
  id: "rooms",
  room: "rooms",
  agent: "agents",
  from: "agents",
  to: "agents",
  for: "agents",
  mid: "messages",
  reply_to: "messages",
  thread: "messages",
  after: "messages",
  before: "messages",
  key: "keys",
  scope: "scopes",
};

/**
 * Good values of these parameters stay at most this large: a long-poll holds its
 * answer for `wait` seconds.
 */
const CAPS: Record<string, number> = { wait: 0.05 };

/** The rooms of the setup: one open, one locked, each with an agent. */
const FIXTURE = { open: "alice", locked: "bob" } as const;
type FixtureRoom = keyof typeof FIXTURE;

/** Whether `id` is a fixture room (generated ids include `toString`, `__proto__`). */
function isFixture(id: string | undefined): id is FixtureRoom {
  return id !== undefined && Object.hasOwn(FIXTURE, id);
}

/** What the setup made, kept current as requests delete rooms and rotate tokens. */
type World = {
  messages: Record<FixtureRoom, number[]>;
  /** Authorization header values by label (`open room`, `locked agent`, ...). */
  auth: Record<string, string>;
};

/** The thing `e` names, in a request to room `room` (its messages are likelier). */
function pick(world: World, e: Existing, room: string): string | number {
  const list: (string | number)[] = {
    // The open room twice: the locked one mostly answers 401 to a token of another.
    rooms: ["open", "locked", "open"],
    agents: Object.values(FIXTURE),
    messages: isFixture(room)
      ? world.messages[room]
      : [...world.messages.open, ...world.messages.locked],
    keys: ["k"],
    scopes: ["_shared", ...Object.values(FIXTURE)],
  }[e.kind];
  return list[e.index % list.length];
}

/** A JSON value with its `Existing` picks looked up. */
function resolve(world: World, value: unknown, room: string): unknown {
  if (value instanceof Existing) return pick(world, value, room);
  if (Array.isArray(value)) return value.map((v) => resolve(world, v, room));
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(
      Object.entries(value).map(([k, v]) => [k, resolve(world, v, room)]),
    );
  }
  return value;
}

/** Creates a fixture room (again) with its agent, two messages and key `k`. */
async function seedRoom(app: App, world: World, id: FixtureRoom) {
  const post = async (path: string, body: unknown, token?: string) => {
    const res = await app.request(path, {
      method: path.endsWith("/state") ? "PUT" : "POST",
      headers: {
        "content-type": "application/json",
        ...(token ? { authorization: `Bearer ${token}` } : {}),
      },
      body: JSON.stringify(body),
    });
    const json = await res.json();
    assert.ok(res.status < 300, `setup ${path}: ${JSON.stringify(json)}`);
    return json;
  };
  const room = await post("/rooms", { id, locked: id === "locked" });
  const agent = await post(
    `/rooms/${id}/agents`,
    { id: FIXTURE[id], name: FIXTURE[id] },
    room.token,
  );
  const messages = [];
  for (const body of ["one", { two: 2 }]) {
    messages.push(
      (await post(`/rooms/${id}/messages`, { body }, room.token)).id,
    );
  }
  await post(`/rooms/${id}/state`, { key: "k", value: 1 }, room.token);
  world.messages[id] = messages;
  world.auth[`${id} room`] = `Bearer ${room.token}`;
  world.auth[`${id} view`] = `Bearer ${room.view_token}`;
  world.auth[`${id} agent`] = `Bearer ${agent.token}`;
}

async function setUp(app: App): Promise<World> {
  const world: World = { messages: { open: [], locked: [] }, auth: {} };
  for (const id of Object.keys(FIXTURE) as FixtureRoom[]) {
    await seedRoom(app, world, id);
  }
  return world;
}

/** Keeps the world current after an answer: a deleted fixture room comes back. */
async function learn(
  c: Contract,
  world: World,
  op: Op | undefined,
  sent: Sent,
  answer: Answer,
) {
  if (answer.status !== 200 || op === undefined) return;
  const id = pathParams(op, sent.url).id;
  if (!isFixture(id)) return;
  if (op.operation.operationId === "deleteRoom") {
    await seedRoom(c.app, world, id);
  }
  // Registering a fixture agent again with `rotate_token` gives it a new token.
  if (op.operation.operationId === "registerAgent" && answer.text) {
    const agent = JSON.parse(answer.text);
    if (
      typeof agent.token === "string" && agent.id === FIXTURE[id]
    ) {
      world.auth[`${id} agent`] = `Bearer ${agent.token}`;
    }
  }
}

// ---- requests and answers ----

/** How long any one request may take before it counts as a hang. */
const HANG_MS = 5_000;

/** A request as sent. */
type Sent = {
  method: string;
  url: string;
  headers: Record<string, string>;
  body?: string;
};

/** An answer as judged: its text, unless it is an event stream (left unread). */
type Answer = { status: number; type: string; text?: string; ms: number };

async function send(app: App, sent: Sent): Promise<Answer> {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), HANG_MS);
  const start = performance.now();
  try {
    const res = await app.request(sent.url, {
      method: sent.method,
      headers: sent.headers,
      body: sent.body,
      signal: controller.signal,
    });
    const type = res.headers.get("content-type") ?? "";
    let text: string | undefined;
    // A stream never ends by itself: its status and type are the answer.
    if (mediaType(type) === "text/event-stream") await res.body?.cancel();
    else text = await res.text();
    return { status: res.status, type, text, ms: performance.now() - start };
  } finally {
    clearTimeout(timer);
    controller.abort();
  }
}

/** One way an answer departs from the document. */
type Mismatch = {
  op: string;
  status: number;
  problem: string;
  sent: Sent;
  answer: Answer;
};

/**
 * What is wrong with `answer` to `sent` according to the document: its status is not
 * one `op` documents, its content type is not the one documented for that status, or
 * its JSON body is not valid against the documented schema. A request no operation
 * serves must get 404 in the error shape.
 */
function judge(
  c: Contract,
  op: Op | undefined,
  sent: Sent,
  answer: Answer,
): Mismatch | undefined {
  const miss = (problem: string): Mismatch => ({
    op: op?.name ?? `${sent.method} (no documented operation)`,
    status: answer.status,
    problem,
    sent,
    answer,
  });
  if (answer.ms >= HANG_MS) return miss(`no answer in ${HANG_MS} ms`);
  const type = mediaType(answer.type);
  let content: Content | undefined;
  let ref: string;
  if (op === undefined) {
    if (answer.status !== 404) {
      return miss(`a path no operation serves answered ${answer.status}`);
    }
    content = { "application/json": {} };
    ref = pointer("components", "schemas", "Error");
  } else {
    const status = String(answer.status);
    const documented = op.operation.responses[status];
    if (documented === undefined) {
      return miss(
        `status ${status} is not documented (documented: ${
          Object.keys(op.operation.responses).join(", ")
        })`,
      );
    }
    content = documented.content;
    ref = pointer(
      "paths",
      op.path,
      op.method.toLowerCase(),
      "responses",
      status,
      "content",
      "application/json",
      "schema",
    );
  }
  if (content === undefined || Object.keys(content).length === 0) {
    return answer.text === ""
      ? undefined
      : miss("a body where the document says there is none");
  }
  if (!(type in content)) {
    return miss(
      `content type "${answer.type}" is not documented (documented: ${
        Object.keys(content).join(", ")
      })`,
    );
  }
  if (type !== "application/json") return undefined;
  let body: unknown;
  try {
    body = JSON.parse(answer.text ?? "");
  } catch {
    return miss("the body is not JSON");
  }
  const validate = c.validator(ref);
  if (validate(body)) return undefined;
  return miss(
    `the body does not match ${decodeURIComponent(ref.replace("doc#", "#"))}: ${
      c.ajv.errorsText(validate.errors, { dataVar: "body" })
    }`,
  );
}

function clip(text: string | undefined, n = 400): string {
  if (text === undefined) return "(not read)";
  return text.length > n ? `${text.slice(0, n)}… (${text.length} chars)` : text;
}

function show(m: Mismatch): string {
  const headers = Object.entries(m.sent.headers)
    .map(([k, v]) => `${k}: ${clip(v, 60)}`).join("; ");
  return [
    `${m.op} → ${m.status}: ${m.problem}`,
    `  request: ${m.sent.method} ${clip(m.sent.url, 300)}${
      headers ? ` [${headers}]` : ""
    }${m.sent.body === undefined ? "" : ` body ${clip(m.sent.body, 160)}`}`,
    `  answer:  ${m.status} ${m.answer.type} ${clip(m.answer.text)}`,
  ].join("\n");
}

/** The distinct mismatches of a run: one example per operation, status and problem. */
class Mismatches {
  readonly seen = new Map<string, { example: Mismatch; count: number }>();
  add(m: Mismatch) {
    // One bug counts once: quoted values out, the answer's error code in (REST's
    // `error`, or JSON-RPC's `error.code`).
    const code = m.answer.text?.match(/"(?:error|code)":\s*("?[\w-]+"?)/)?.[1];
    const key = `${m.op} ${m.status} ${code} ${
      m.problem.replace(/"[^"]*"/g, "…")
    }`;
    const entry = this.seen.get(key);
    if (entry) entry.count++;
    else this.seen.set(key, { example: m, count: 1 });
  }
  report(): string {
    return [...this.seen.values()]
      .map(({ example, count }) => `${show(example)}\n  (${count}×)`)
      .join("\n\n");
  }
}

// ---- generated requests ----

/** A value to send: literal, or one of the setup's things. */
type Pick = string | Existing;

/** A request to make, of one operation; `Existing` picks are looked up when sent. */
type Plan = {
  op: Op;
  /** What in it is bad, if anything. */
  bad?: string;
  path: Record<string, Pick>;
  query: [string, Pick][];
  headers: Record<string, string>;
  /** A label of `AUTH` or of `World.auth`. */
  auth?: string;
  body?: { json: unknown } | { text: string };
};

/** Authorization headers that are wrong on their own. */
const AUTH: Record<string, string> = {
  "no scheme": "room_abc",
  "bare Bearer": "Bearer",
  "Basic": "Basic dXNlcjpwYXNz",
  "two words": "Bearer room_a room_b",
  "unknown room token": `Bearer room_${"A".repeat(43)}`,
  "unknown agent token": `Bearer as_${"A".repeat(43)}`,
  "long": `Bearer ${"x".repeat(5000)}`,
};
/**
 * Tokens of the setup: `own …` is a token of the room the request names (of `open`
 * when it names none), which makes success answers likelier; the others cross rooms.
 */
const REAL_AUTH = [
  ...["own room", "own view", "own agent"].flatMap((own) => [own, own, own]),
  ...Object.keys(FIXTURE).flatMap((room) =>
    ["room", "view", "agent"].map((kind) => `${room} ${kind}`)
  ),
];

function toRequest(plan: Plan, world: World): Sent {
  const id = plan.path.id;
  const room = id === undefined
    ? "open"
    : String(id instanceof Existing ? pick(world, id, "") : id);
  const text = (p: Pick) =>
    String(p instanceof Existing ? pick(world, p, room) : p);
  const path = plan.op.path.replace(
    /\{(\w+)\}/g,
    (_, name: string) => encodeURIComponent(text(plan.path[name])),
  );
  const query = new URLSearchParams(
    plan.query.map(([name, value]) => [name, text(value)]),
  );
  const headers = { ...plan.headers };
  if (plan.auth !== undefined) {
    const own = isFixture(room) ? room : "open";
    headers.authorization = AUTH[plan.auth] ??
      world.auth[plan.auth.replace(/^own /, `${own} `)];
  }
  const body = plan.body === undefined
    ? undefined
    : "text" in plan.body
    ? plan.body.text
    : JSON.stringify(resolve(world, plan.body.json, room));
  return {
    method: plan.op.method,
    url: query.size > 0 ? `${path}?${query}` : path,
    headers,
    body,
  };
}

/** Absent more often than present. */
function maybe<T>(
  arb: fc.Arbitrary<T>,
  weight = 2,
): fc.Arbitrary<T | undefined> {
  return fc.oneof(
    { arbitrary: fc.constant(undefined), weight: 3 },
    { arbitrary: arb, weight },
  );
}

/** An existing thing for a name with a hint, else `plain`, else both. */
function hinted<T>(
  name: string,
  plain: fc.Arbitrary<T>,
): fc.Arbitrary<T | Existing> {
  const kind = HINTS[name];
  if (kind === undefined) return plain;
  return fc.oneof(
    { arbitrary: fc.nat(7).map((i) => new Existing(kind, i)), weight: 3 },
    { arbitrary: plain, weight: 1 },
  );
}

/** Generators of values valid against the document's schemas. */
class Generators {
  readonly patterns = new Map<string, boolean>();
  constructor(readonly doc: Document) {}

  /** Whether fast-check can make strings matching `re` (a pattern may match none). */
  satisfiable(re: RegExp): boolean {
    let ok = this.patterns.get(re.source);
    if (ok === undefined) {
      ok = fc.sample(fc.stringMatching(re), { numRuns: 20, seed: 1 })
        .some((s) => re.test(s));
      this.patterns.set(re.source, ok);
    }
    return ok;
  }

  string(s: Schema): fc.Arbitrary<string> {
    const min = s.minLength ?? 0;
    const max = s.maxLength ?? 40;
    const fits = (x: string) => {
      const n = [...x].length;
      return n >= min && n <= max;
    };
    if (s.pattern !== undefined) {
      const re = new RegExp(s.pattern, "u");
      // A Unicode property class (state keys: no control characters) is slow for
      // stringMatching to expand: plain strings that match it are quicker.
      if (/\\[pP]\{/.test(s.pattern)) {
        return fc.string({ minLength: min, maxLength: Math.min(max, 40) })
          .filter((x) => re.test(x) && fits(x));
      }
      if (this.satisfiable(re)) {
        return fc.stringMatching(re).filter((x) => re.test(x) && fits(x));
      }
    }
    return fc.string({ minLength: min, maxLength: Math.min(max, 40) });
  }

  /** A value valid against `schema`; `name` is the field's, for hints and caps. */
  valid(schema: Schema, name = ""): fc.Arbitrary<unknown> {
    const s = deref(this.doc, schema);
    const plain = (): fc.Arbitrary<unknown> => {
      const union = s.anyOf ?? s.oneOf;
      if (union) return fc.oneof(...union.map((u) => this.valid(u, name)));
      if (s.enum) return fc.constantFrom(...s.enum);
      const types = typesOf(s);
      // No type: any JSON value (the `JsonValue` component).
      if (types.length === 0) return fc.jsonValue({ maxDepth: 2 });
      return fc.oneof(...types.map((t) => this.ofType(s, t, name)));
    };
    return hinted(name, plain());
  }

  ofType(s: Schema, type: string, name: string): fc.Arbitrary<unknown> {
    switch (type) {
      case "null":
        return fc.constant(null);
      case "boolean":
        return fc.boolean();
      case "integer":
        return fc.bigInt({
          min: BigInt(s.minimum ?? -1_000_000),
          max: BigInt(Math.min(s.maximum ?? 1_000_000, CAPS[name] ?? Infinity)),
        }).map(Number);
      case "number": {
        const min = s.minimum ?? s.exclusiveMinimum ?? -1e9;
        const max = Math.min(s.maximum ?? 1e9, CAPS[name] ?? Infinity);
        return fc.double({
          min,
          max,
          minExcluded: s.exclusiveMinimum !== undefined,
          noNaN: true,
          noDefaultInfinity: true,
        });
      }
      case "string":
        return this.string(s);
      case "array":
        return fc.array(this.valid(s.items ?? {}, name), { maxLength: 3 });
      case "object": {
        const properties = s.properties ?? {};
        const required = s.required ?? [];
        const model = (keys: string[]) =>
          Object.fromEntries(
            keys.map((k) => [k, this.valid(properties[k], k)]),
          );
        const optional = Object.keys(properties).filter((k) =>
          !required.includes(k)
        );
        const any = fc.record(model(Object.keys(properties)), {
          requiredKeys: required,
        });
        if (optional.length === 0) return any;
        // Or the required fields and one more: rules the schema cannot say (`value`
        // or `increment`, not both) are then kept more often, and writes succeed.
        return fc.oneof(
          any,
          fc.constantFrom(...optional).chain((k) =>
            fc.record(model([...required, k]))
          ),
        );
      }
    }
    throw new Error(`no generator for type ${type}`);
  }

  /** Values invalid against `schema` (wrong type, out of range, bad text). */
  invalid(schema: Schema): unknown[] {
    const s = deref(this.doc, schema);
    const union = s.anyOf ?? s.oneOf;
    const types = union
      ? union.map((u) => typesOf(deref(this.doc, u)))
      : [typesOf(s)];
    // Without a type (`JsonValue`) every JSON value is valid.
    if (types.some((t) => t.length === 0)) return [];
    const has = (t: string) => types.some((ts) => ts.includes(t));
    const values: unknown[] = [];
    if (!has("string")) values.push("text");
    if (!has("number") && !has("integer")) values.push(7);
    if (!has("boolean")) values.push(false);
    if (!has("null")) values.push(null);
    if (!has("object")) values.push({ nested: true });
    if (!has("array")) values.push([1]);
    if (has("string")) {
      if ((s.minLength ?? 0) > 0) values.push("");
      if (s.maxLength !== undefined) values.push("x".repeat(s.maxLength + 1));
      if (s.pattern !== undefined) values.push("a b/c", "\u0000", "\ud800");
      if (s.enum) values.push(`not-${s.enum[0]}`);
    }
    if (has("integer")) values.push(1.5);
    if (has("integer") || has("number")) {
      if (s.minimum !== undefined) values.push(s.minimum - 1);
      if (s.exclusiveMinimum !== undefined) values.push(s.exclusiveMinimum);
      if (s.maximum !== undefined) values.push(s.maximum + 1);
    }
    return values;
  }

  /** A good value of a parameter, as text. */
  param(p: Parameter): fc.Arbitrary<Pick> {
    const s = deref(this.doc, p.schema);
    const types = typesOf(s);
    const text = types.includes("number")
      ? fc.nat(Math.round(
        Math.min(s.maximum ?? 1e6, CAPS[p.name] ?? Infinity) *
          1000,
      )).map((n) => String(n / 1000))
      : this.valid(s).map(String);
    // Path and query parameters may name what the setup made; headers do not.
    return p.in === "header"
      ? text
      : hinted(p.name, text) as fc.Arbitrary<Pick>;
  }

  /** Bad values of a parameter, as text. */
  badParam(p: Parameter): string[] {
    const s = deref(this.doc, p.schema);
    const types = typesOf(s);
    if (types.includes("integer") || types.includes("number")) {
      const values = ["abc", "-1", "1e3", " 1", "0x10", "", "NaN"];
      // Not for a number: `wait=1.5` is good, and would hold the request 1.5 s.
      if (types.includes("integer")) values.push("1.5");
      if (s.minimum !== undefined) values.push(String(s.minimum - 1));
      if (s.maximum !== undefined) values.push(String(s.maximum + 1));
      return values;
    }
    const values = ["a b", "a/b", "ü", "%", "a?b", "#x", "\u0001", "..", "."];
    if ((s.minLength ?? 0) > 0) values.push("");
    if (s.maxLength !== undefined) values.push("x".repeat(s.maxLength + 1));
    if (s.enum) {
      values.push(`not-${s.enum[0]}`, String(s.enum[0]).toUpperCase());
    }
    // Header values must be Latin-1 text without control characters.
    return p.in === "header"
      ? values.filter((v) => /^[\x20-\xff]*$/.test(v))
      : values;
  }
}

/** JSON-RPC messages for `/mcp`, whose body the document does not describe. */
function rpc(method: string, params?: unknown, id: number | null = 1): string {
  return JSON.stringify({
    jsonrpc: "2.0",
    ...(id === null ? {} : { id }),
    method,
    ...(params === undefined ? {} : { params }),
  });
}
const INITIALIZE = rpc("initialize", {
  protocolVersion: "2025-06-18",
  capabilities: {},
  clientInfo: { name: "contract_test", version: "1" },
});
const MCP_BODIES = [
  INITIALIZE,
  rpc("ping"),
  rpc("tools/list"),
  rpc("notifications/initialized", undefined, null),
  // A quick tool only: the reading ones wait 20 s by default.
  rpc("tools/call", { name: "get_context", arguments: { room: "open" } }),
  rpc("tools/call", { name: "no_such_tool", arguments: {} }),
  rpc("no/such/method"),
  JSON.stringify({ jsonrpc: "1.0", id: 1, method: "ping" }),
  `[${rpc("ping")}]`,
  "{",
  "",
  "null",
];
const MCP_ACCEPT = "application/json, text/event-stream";

function mcpPlan(op: Op): fc.Arbitrary<Plan> {
  return fc.record({
    body: fc.constantFrom(...MCP_BODIES),
    // Mostly right, so that most requests reach the JSON-RPC layer.
    accept: fc.constantFrom(
      MCP_ACCEPT,
      MCP_ACCEPT,
      MCP_ACCEPT,
      "application/json",
      "",
    ),
    type: fc.constantFrom(
      "application/json",
      "application/json",
      "application/json",
      "text/plain",
    ),
    origin: fc.constantFrom("", "", "", "", "https://elsewhere.example"),
    version: fc.constantFrom("", "", "", "2025-06-18", "1999-01-01"),
    auth: maybe(fc.constantFrom(...REAL_AUTH, ...Object.keys(AUTH))),
  }).map(({ body, accept, type, origin, version, auth }) => ({
    op,
    path: {},
    query: [],
    headers: Object.fromEntries(
      [
        ["content-type", type],
        ["accept", accept],
        ["origin", origin],
        ["mcp-protocol-version", version],
      ].filter(([, v]) => v !== ""),
    ),
    auth,
    body: { text: body },
  }));
}

/** Requests of one operation, built from its parameters and request body schema. */
function planOf(g: Generators, op: Op): fc.Arbitrary<Plan> {
  if (op.path === "/mcp") return mcpPlan(op);
  const params = op.operation.parameters ?? [];
  const pathParams = params.filter((p) => p.in === "path");
  const queryParams = params.filter((p) => p.in === "query");
  const headerParams = params.filter((p) => p.in === "header");
  const bodySchema = op.operation.requestBody?.content["application/json"]
    ?.schema;
  // A body the operation does not take (DELETE /rooms/{id}): a client may send one.
  const stray = !bodySchema && !["GET", "HEAD"].includes(op.method);
  const parts = [
    "query",
    "auth",
    ...(pathParams.length > 0 ? ["path"] : []),
    ...(headerParams.length > 0 ? ["header"] : []),
    ...(bodySchema ? ["body", "body"] : stray ? ["body"] : []),
  ];
  const none = fc.constant(undefined);
  const oneBad = (ps: Parameter[]) =>
    ps.length === 0
      ? none
      : fc.constantFrom(...ps).chain((p) =>
        fc.constantFrom(...g.badParam(p)).map((v) => [p.name, v] as const)
      );
  return fc.record({
    bad: fc.oneof(
      { arbitrary: none, weight: parts.length },
      { arbitrary: fc.constantFrom(...parts), weight: parts.length },
    ),
    path: fc.record(
      Object.fromEntries(pathParams.map((p) => [p.name, g.param(p)])),
    ),
    badPath: oneBad(pathParams),
    query: fc.tuple(
      ...queryParams.map((p) =>
        maybe(g.param(p)).map((v) =>
          v === undefined ? [] : [[p.name, v] as [string, Pick]]
        )
      ),
    ).map((lists) => lists.flat()),
    badQuery: fc.oneof(
      fc.constantFrom("zz_unknown", "Limit", "after[]").map((n) =>
        [n, "1"] as const
      ),
      ...(queryParams.length > 0 ? [oneBad(queryParams)] : []),
    ),
    headers: fc.tuple(
      ...headerParams.map((p) =>
        maybe(
          p.name === "idempotency-key"
            // A key used again with another body: `idempotency_key_reused`.
            ? fc.oneof(fc.constant("contract-key"), g.param(p))
            : g.param(p),
        ).map((v) => v === undefined ? [] : [[p.name, String(v)]])
      ),
    ).map((lists) => Object.fromEntries(lists.flat())),
    badHeader: oneBad(headerParams),
    accept: fc.constantFrom("", "", "text/html", "application/json"),
    auth: maybe(fc.constantFrom(...REAL_AUTH), 3),
    badAuth: fc.constantFrom(...Object.keys(AUTH)),
    body: bodySchema ? g.valid(bodySchema).map((json) => ({ json })) : none,
    badBody: bodySchema
      ? badBody(g, bodySchema)
      : stray
      ? fc.constantFrom({ text: '{"zz":1}' }, { text: "{" }, HUGE)
      : none,
    badType: fc.constantFrom("text/plain", "", "application/json"),
  }).map((r): Plan => {
    const plan: Plan = {
      op,
      bad: r.bad,
      path: r.path,
      query: r.query,
      headers: r.headers,
      auth: r.auth,
      body: r.body,
    };
    if (r.accept) plan.headers.accept = r.accept;
    if (bodySchema) plan.headers["content-type"] = "application/json";
    if (r.bad === "path" && r.badPath) {
      plan.path = { ...plan.path, [r.badPath[0]]: r.badPath[1] };
    }
    if (r.bad === "query" && r.badQuery) {
      plan.query = [
        ...plan.query.filter(([n]) => n !== r.badQuery![0]),
        [r.badQuery[0], r.badQuery[1]],
      ];
    }
    if (r.bad === "header" && r.badHeader) {
      plan.headers[r.badHeader[0]] = r.badHeader[1];
    }
    if (r.bad === "auth") plan.auth = r.badAuth;
    if (r.bad === "body" && r.badBody) {
      plan.body = r.badBody;
      if (r.badType) plan.headers["content-type"] = r.badType;
      else delete plan.headers["content-type"];
    }
    return plan;
  });
}

/** Bodies wrong against `schema`, in every way a client gets one wrong. */
function badBody(
  g: Generators,
  schema: Schema,
): fc.Arbitrary<{ json: unknown } | { text: string }> {
  const s = deref(g.doc, schema);
  const valid = g.valid(s) as fc.Arbitrary<Record<string, unknown>>;
  const required = s.required ?? [];
  const properties = Object.keys(s.properties ?? {});
  const ways: fc.Arbitrary<{ json: unknown } | { text: string }>[] = [
    valid.map((v) => ({ json: { ...v, zz_unknown: 1 } })),
    fc.constantFrom([], 1, "text", null, true).map((json) => ({ json })),
    fc.constantFrom("{", '{"key":', "nul", "{'a':1}", "[1,]", "{}}", "\u0000")
      .map((text) => ({ text })),
    fc.constant({ text: "" }),
    // Deeper than MAX_JSON_DEPTH (64).
    fc.constant({ text: `${"[".repeat(70)}${"]".repeat(70)}` }),
  ];
  if (required.length > 0) {
    ways.push(
      fc.tuple(valid, fc.constantFrom(...required)).map(([v, k]) => {
        const { [k]: _, ...rest } = v;
        return { json: rest };
      }),
    );
  }
  const wrong = properties.filter((k) =>
    g.invalid(s.properties![k]).length > 0
  );
  if (wrong.length > 0) {
    ways.push(
      fc.tuple(valid, fc.constantFrom(...wrong)).chain(([v, k]) =>
        fc.constantFrom(...g.invalid(s.properties![k])).map((x) => ({
          json: { ...v, [k]: x },
        }))
      ),
    );
  }
  return fc.oneof(
    ...ways.map((arbitrary) => ({ arbitrary, weight: 4 })),
    { arbitrary: fc.constant(HUGE), weight: 1 },
  );
}

/** A body over MAX_BODY_BYTES (256 KiB by default): 413. */
const HUGE = { text: JSON.stringify({ zz: "x".repeat(300_000) }) };

// ---- the tests ----

async function withContract(fn: (c: Contract) => Promise<void>) {
  const { db, close } = await freshDb();
  try {
    await fn(await contractOf(createApp({ db, rateLimit: null })));
  } finally {
    await close();
  }
}

/** `FUZZ_LOG=1` prints every generated request with its answer (as in fuzz_test.ts). */
const LOG = Deno.env.get("FUZZ_LOG") === "1";

/** FUZZ_SEED if given (as in fuzz_test.ts), else a fresh one, printed. */
function seed(): number {
  const given = Deno.env.get("FUZZ_SEED");
  return given === undefined
    ? Math.floor(Math.random() * 0x7fffffff)
    : Number(given);
}

Deno.test("generated good and bad requests to every operation get a documented status and a body valid against its schema", async () => {
  // About 3 s on either database (SYNC_TEST_DATABASE=remote).
  const numRuns = 500;
  const s = seed();
  await withContract(async (c) => {
    const world = await setUp(c.app);
    const g = new Generators(c.doc);
    const mismatches = new Mismatches();
    const exercised = new Set<string>();
    const statuses = new Map<number, number>();
    const started = performance.now();
    await fc.assert(
      fc.asyncProperty(
        fc.oneof(...c.ops.map((op) => planOf(g, op))),
        async (plan) => {
          const sent = toRequest(plan, world);
          // `/rooms/..` is `/`: the operation is the one the URL reaches.
          const op = route(c.ops, sent.method, sent.url);
          const answer = await send(c.app, sent);
          if (op) exercised.add(op.name);
          if (LOG) {
            console.log(
              `${Math.round(answer.ms)} ms | ${op?.name ?? "-"} | bad: ${
                plan.bad ?? "-"
              }, auth: ${plan.auth ?? "-"} | ${sent.method} ${
                clip(sent.url, 120)
              } → ${answer.status} ${clip(answer.text, 80)}`,
            );
          }
          statuses.set(answer.status, (statuses.get(answer.status) ?? 0) + 1);
          const mismatch = judge(c, op, sent, answer);
          if (mismatch) mismatches.add(mismatch);
          await learn(c, world, op, sent, answer);
        },
      ),
      { numRuns, seed: s },
    );
    console.log(
      `contract: ${numRuns} requests in ${
        Math.round(performance.now() - started)
      } ms, statuses ${
        JSON.stringify(Object.fromEntries([...statuses].sort()))
      }, ${mismatches.seen.size} distinct mismatches; seed ${s}`,
    );
    assert.deepEqual(
      [...exercised].sort(),
      c.ops.map((op) => op.name).sort(),
      "every operation got requests",
    );
    assert.equal(
      mismatches.seen.size,
      0,
      `answers that depart from /openapi.json (seed ${s}):\n\n${mismatches.report()}`,
    );
  });
});

// ---- the table ----

/** A request of the table, with the status it must get. */
type Case = {
  status: number;
  /** The path with its query, ids of the setup filled in. */
  url: string;
  auth?: string;
  headers?: Record<string, string>;
  /** A JSON body, or `text` as it is. */
  json?: unknown;
  text?: string;
};

/** The smallest export: a room and nothing in it. */
const EXPORT = JSON.stringify({
  type: "room",
  format: 1,
  id: "x",
  created_at: "2026-01-01T00:00:00.000Z",
  meta: {},
  locked: false,
});

/** One good and one bad request (at least) per operation, by operationId. */
function table(w: World): Record<string, { good: Case[]; bad: Case[] }> {
  const [m1, m2] = w.messages.open;
  const mcp = (body: string, headers: Record<string, string> = {}) => ({
    url: "/mcp",
    text: body,
    headers: {
      "content-type": "application/json",
      accept: MCP_ACCEPT,
      ...headers,
    },
  });
  return {
    getIndex: {
      good: [
        { status: 200, url: "/" },
        { status: 200, url: "/", headers: { accept: "text/html" } },
        { status: 200, url: "/?room=open" },
      ],
      bad: [
        { status: 400, url: "/?room=a%20b" },
        { status: 400, url: "/?zz=1" },
        { status: 404, url: "/?room=no-such-room" },
      ],
    },
    postMcp: {
      good: [
        { status: 200, ...mcp(INITIALIZE) },
        { status: 200, ...mcp(rpc("tools/list")) },
        { status: 202, ...mcp(rpc("notifications/initialized", {}, null)) },
      ],
      bad: [
        { status: 406, ...mcp(rpc("ping"), { accept: "application/json" }) },
        { status: 415, ...mcp(rpc("ping"), { "content-type": "text/plain" }) },
        { status: 403, ...mcp(rpc("ping"), { origin: "https://x.example" }) },
        { status: 400, ...mcp(`[${rpc("ping")}]`) },
        { status: 400, ...mcp("{") },
        { status: 400, ...mcp(JSON.stringify({ jsonrpc: "2.0" })) },
        {
          status: 400,
          ...mcp(rpc("ping"), { "mcp-protocol-version": "1999-01-01" }),
        },
      ],
    },
    ...Object.fromEntries(
      [
        ["getReadme", "/README.md"],
        ["getLlmsTxt", "/llms.txt"],
        ["getSkill", "/SKILL.md"],
        ["getOpenApi", "/openapi.json"],
        ["getHealth", "/healthz"],
        ["getLimits", "/limits"],
        ["getViewerScript", "/viewer.js"],
      ].map(([id, url]) => [id, {
        good: [{ status: 200, url }],
        // They take no input: junk in the request changes nothing.
        bad: [{ status: 200, url: `${url}?zz=1`, auth: "Basic" }],
      }]),
    ),
    createRoom: {
      good: [
        { status: 201, url: "/rooms", json: { id: "table-new", meta: [1] } },
        { status: 201, url: "/rooms", text: "" },
        { status: 200, url: "/rooms", json: { id: "open" } },
        { status: 201, url: "/rooms", json: { id: "doomed" } },
      ],
      bad: [
        { status: 400, url: "/rooms", json: { id: "a b" } },
        { status: 400, url: "/rooms", json: { zz: 1 } },
        { status: 400, url: "/rooms", text: "{" },
        { status: 401, url: "/rooms", json: { id: "locked" } },
        { status: 401, url: "/rooms", json: { id: "locked" }, auth: "Basic" },
        {
          status: 413,
          url: "/rooms",
          json: { meta: "x".repeat(300_000) },
        },
      ],
    },
    listRooms: {
      good: [{ status: 200, url: "/rooms" }],
      bad: [{ status: 401, url: "/rooms", auth: "Basic" }],
    },
    getRoom: {
      good: [
        { status: 200, url: "/rooms/open" },
        { status: 200, url: "/rooms/locked", auth: "locked view" },
      ],
      bad: [
        { status: 400, url: "/rooms/a%20b" },
        { status: 400, url: `/rooms/${"x".repeat(129)}` },
        { status: 404, url: "/rooms/no-such-room" },
        { status: 401, url: "/rooms/locked" },
        { status: 401, url: "/rooms/open", auth: "unknown room token" },
      ],
    },
    deleteRoom: {
      good: [],
      bad: [
        { status: 403, url: "/rooms/open", auth: "open view" },
        { status: 403, url: "/rooms/open", auth: "open agent" },
        { status: 404, url: "/rooms/no-such-room" },
        // A body it does not take, over the size limit, refused before the route.
        { status: 413, url: "/rooms/open", text: HUGE.text },
      ],
    },
    getContext: {
      good: [
        { status: 200, url: "/rooms/open/context?messages=1" },
        { status: 200, url: "/rooms/locked/context", auth: "locked agent" },
      ],
      bad: [
        { status: 400, url: "/rooms/open/context?messages=1001" },
        { status: 400, url: "/rooms/open/context?messages=x" },
        { status: 401, url: "/rooms/locked/context" },
      ],
    },
    streamRoom: {
      good: [
        { status: 200, url: `/rooms/open/stream?after=${m1}` },
        {
          status: 200,
          url: "/rooms/open/stream",
          headers: { "last-event-id": "0" },
        },
      ],
      bad: [
        { status: 400, url: "/rooms/open/stream?after=-1" },
        { status: 400, url: "/rooms/open/stream?zz=1" },
        {
          status: 400,
          url: "/rooms/open/stream",
          headers: { "last-event-id": "x" },
        },
        { status: 401, url: "/rooms/locked/stream?after=0" },
      ],
    },
    registerAgent: {
      good: [
        { status: 201, url: "/rooms/open/agents", json: { name: "Carol" } },
        {
          status: 200,
          url: "/rooms/open/agents",
          json: { id: "alice", name: "Alice" },
          auth: "open agent",
        },
      ],
      bad: [
        { status: 400, url: "/rooms/open/agents", json: {} },
        {
          status: 409,
          url: "/rooms/open/agents",
          json: { id: "alice", name: "A" },
        },
        {
          status: 403,
          url: "/rooms/open/agents",
          json: { name: "V" },
          auth: "open view",
        },
        {
          status: 403,
          url: "/rooms/locked/agents",
          json: { name: "B" },
          auth: "locked agent",
        },
        { status: 404, url: "/rooms/no-such-room/agents", json: { name: "N" } },
      ],
    },
    listAgents: {
      good: [{ status: 200, url: "/rooms/open/agents" }],
      bad: [{ status: 401, url: "/rooms/locked/agents" }],
    },
    heartbeat: {
      good: [
        {
          status: 200,
          url: "/rooms/open/agents/alice/heartbeat",
          json: { status: "busy" },
        },
        { status: 200, url: "/rooms/open/agents/alice/heartbeat", text: "" },
      ],
      bad: [
        {
          status: 400,
          url: "/rooms/open/agents/alice/heartbeat",
          json: { status: "asleep" },
        },
        { status: 404, url: "/rooms/open/agents/nobody/heartbeat", json: {} },
        {
          status: 403,
          url: "/rooms/open/agents/bob/heartbeat",
          json: {},
          auth: "open agent",
        },
      ],
    },
    postMessage: {
      good: [
        {
          status: 201,
          url: "/rooms/open/messages",
          json: { body: "hi", from: "alice" },
        },
        {
          status: 201,
          url: "/rooms/open/messages",
          json: { body: 1 },
          headers: { "idempotency-key": "table-key" },
        },
        {
          status: 201,
          url: "/rooms/open/messages",
          json: { body: 1 },
          headers: { "idempotency-key": "table-key" },
        },
      ],
      bad: [
        { status: 400, url: "/rooms/open/messages", json: {} },
        {
          status: 400,
          url: "/rooms/open/messages",
          json: { body: 1, reply_to: 1.5 },
        },
        {
          status: 400,
          url: "/rooms/open/messages",
          json: { body: 1 },
          headers: { "idempotency-key": "has space" },
        },
        {
          status: 422,
          url: "/rooms/open/messages",
          json: { body: 2 },
          headers: { "idempotency-key": "table-key" },
        },
        {
          status: 403,
          url: "/rooms/open/messages",
          json: { body: 1 },
          auth: "open view",
        },
        {
          status: 403,
          url: "/rooms/open/messages",
          json: { body: 1, from: "bob" },
          auth: "open agent",
        },
      ],
    },
    listMessages: {
      good: [
        { status: 200, url: "/rooms/open/messages?after=0&limit=2&order=desc" },
        { status: 200, url: `/rooms/open/messages?after=999999&wait=0.05` },
      ],
      bad: [
        { status: 400, url: "/rooms/open/messages?limit=0" },
        { status: 400, url: "/rooms/open/messages?wait=51" },
        {
          status: 403,
          url: "/rooms/locked/messages?wait=0.01&agent=bob",
          auth: "locked view",
        },
        { status: 404, url: "/rooms/no-such-room/messages" },
      ],
    },
    claimMessage: {
      good: [
        {
          status: 200,
          url: `/rooms/open/messages/${m1}/claim`,
          json: { agent: "alice", lease: 60 },
        },
        // Held by alice for completeMessage below.
        {
          status: 200,
          url: `/rooms/open/messages/${m2}/claim`,
          json: { agent: "alice" },
        },
      ],
      bad: [
        {
          status: 400,
          url: `/rooms/open/messages/1.5/claim`,
          json: { agent: "alice" },
        },
        { status: 400, url: `/rooms/open/messages/${m2}/claim`, json: {} },
        {
          status: 409,
          url: `/rooms/open/messages/${m1}/claim`,
          json: { agent: "carol" },
        },
        {
          status: 404,
          url: `/rooms/open/messages/999999/claim`,
          json: { agent: "alice" },
        },
      ],
    },
    releaseMessage: {
      good: [
        {
          status: 200,
          url: `/rooms/open/messages/${m1}/release`,
          json: { agent: "alice" },
        },
      ],
      bad: [
        {
          status: 400,
          url: `/rooms/open/messages/0/release`,
          json: { agent: "alice" },
        },
        {
          status: 404,
          url: `/rooms/open/messages/999999/release`,
          json: { agent: "alice" },
        },
      ],
    },
    completeMessage: {
      good: [
        {
          status: 200,
          url: `/rooms/open/messages/${m2}/complete`,
          json: { agent: "alice", result: { body: "done" } },
        },
      ],
      bad: [
        {
          status: 400,
          url: `/rooms/open/messages/x/complete`,
          json: { agent: "alice" },
        },
        {
          status: 400,
          url: `/rooms/open/messages/${m2}/complete`,
          json: { agent: "alice", result: {} },
        },
        {
          status: 409,
          url: `/rooms/open/messages/${m2}/complete`,
          json: { agent: "alice" },
        },
        {
          status: 409,
          url: `/rooms/open/messages/${m1}/complete`,
          json: { agent: "carol" },
        },
      ],
    },
    putState: {
      good: [
        {
          status: 200,
          url: "/rooms/open/state",
          json: { key: "k2", value: { a: 1 } },
        },
        {
          status: 200,
          url: "/rooms/open/state",
          json: { key: "k2", value: { b: 2 }, merge: true, if_version: 1 },
        },
      ],
      bad: [
        { status: 400, url: "/rooms/open/state", json: { key: "k2" } },
        {
          status: 400,
          url: "/rooms/open/state",
          json: { key: "k2", value: 1, ttl: 0 },
        },
        {
          status: 409,
          url: "/rooms/open/state",
          json: { key: "k2", value: 1, if_version: 99 },
        },
        {
          status: 409,
          url: "/rooms/open/state",
          json: { key: "k2", increment: 1 },
        },
      ],
    },
    getState: {
      good: [
        { status: 200, url: "/rooms/open/state" },
        { status: 200, url: "/rooms/open/state?key=k" },
        {
          status: 200,
          url: "/rooms/open/state?key=k&after_version=0&wait=0.05",
        },
        { status: 200, url: `/rooms/open/state?at=${m2}` },
      ],
      bad: [
        { status: 400, url: "/rooms/open/state?wait=0.01" },
        { status: 400, url: "/rooms/open/state?key=a%01b" },
        { status: 400, url: `/rooms/open/state?key=k&at=${m2}&wait=1` },
        { status: 404, url: "/rooms/open/state?key=absent" },
        { status: 404, url: "/rooms/open/state?at=999999" },
      ],
    },
    exportRoom: {
      good: [
        { status: 200, url: "/rooms/open/export" },
        { status: 200, url: "/rooms/locked/export", auth: "locked view" },
      ],
      bad: [
        { status: 401, url: "/rooms/locked/export" },
        { status: 404, url: "/rooms/absent/export" },
      ],
    },
    importRoom: {
      good: [{ status: 201, url: "/rooms/import?id=imported", text: EXPORT }],
      bad: [
        { status: 400, url: "/rooms/import?id=imported2", text: "nope" },
        { status: 400, url: "/rooms/import?id=a%20b", text: EXPORT },
        { status: 409, url: "/rooms/import?id=open", text: EXPORT },
      ],
    },
    getStateHistory: {
      good: [
        { status: 200, url: "/rooms/open/state/history?key=k" },
        {
          status: 200,
          url: "/rooms/open/state/history?key=k&after_version=1&limit=5",
        },
      ],
      bad: [
        { status: 400, url: "/rooms/open/state/history" },
        { status: 400, url: "/rooms/open/state/history?key=k&limit=0" },
        { status: 404, url: "/rooms/absent/state/history?key=k" },
      ],
    },
    deleteState: {
      good: [
        {
          status: 200,
          url: "/rooms/open/state",
          json: { key: "k2", if_version: 2 },
        },
        { status: 200, url: "/rooms/open/state", json: { key: "k2" } },
      ],
      bad: [
        { status: 400, url: "/rooms/open/state", json: {} },
        {
          status: 409,
          url: "/rooms/open/state",
          json: { key: "k", if_version: 99 },
        },
      ],
    },
    batch: {
      good: [
        {
          status: 200,
          url: "/rooms/open/batch",
          json: {
            state: [{ key: "k3", value: 1 }, { key: "k3", delete: true }],
            messages: [{ body: "batched" }],
          },
        },
      ],
      bad: [
        { status: 400, url: "/rooms/open/batch", json: {} },
        {
          status: 409,
          url: "/rooms/open/batch",
          json: { state: [{ key: "k", value: 2, if_version: 99 }] },
        },
        {
          status: 403,
          url: "/rooms/open/batch",
          json: { messages: [{ body: 1 }] },
          auth: "open view",
        },
      ],
    },
  };
}

/** The table's requests in order, each with the operation it must reach. */
function* cases(c: Contract, w: World) {
  const rows = table(w);
  // Deleting a room comes last, on a room of its own.
  rows.deleteRoom.good.push({
    status: 200,
    url: "/rooms/doomed",
    auth: "doomed room",
  });
  for (const [id, row] of Object.entries(rows)) {
    const op = c.ops.find((o) => o.operation.operationId === id);
    for (const [good, list] of [[true, row.good], [false, row.bad]] as const) {
      for (const item of list) yield { id, op, good, item };
    }
  }
}

/** Keeps the token of a room the table creates: the delete row deletes `doomed`. */
function noteRoom(world: World, id: string, answer: Answer) {
  if (id === "createRoom" && answer.status === 201 && answer.text) {
    const room = JSON.parse(answer.text);
    world.auth[`${room.id} room`] = `Bearer ${room.token}`;
  }
}

function sentOf(op: Op, w: World, item: Case): Sent {
  const headers: Record<string, string> = { ...item.headers };
  if (item.json !== undefined || item.text !== undefined) {
    headers["content-type"] ??= "application/json";
  }
  if (item.auth !== undefined) {
    headers.authorization = AUTH[item.auth] ?? w.auth[item.auth];
  }
  return {
    method: op.method,
    url: item.url,
    headers,
    body: item.text ??
      (item.json === undefined ? undefined : JSON.stringify(item.json)),
  };
}

Deno.test("a table of one good and one bad request per operation: each status as expected, documented, with a valid body", async () => {
  await withContract(async (c) => {
    const world = await setUp(c.app);
    const mismatches = new Mismatches();
    const wrong: string[] = [];
    const covered = { good: new Set<string>(), bad: new Set<string>() };
    for (const { id, op, good, item } of cases(c, world)) {
      assert.ok(
        op,
        `the table names operation ${id}, which the document lacks`,
      );
      const sent = sentOf(op, world, item);
      assert.equal(
        route(c.ops, sent.method, sent.url),
        op,
        `${sent.method} ${sent.url} reaches ${op.name}`,
      );
      const answer = await send(c.app, sent);
      if (answer.status !== item.status) {
        wrong.push(
          `${op.name}: ${sent.method} ${
            clip(sent.url, 100)
          } answered ${answer.status}, not ${item.status}: ${
            clip(answer.text, 300)
          }`,
        );
      }
      const mismatch = judge(c, op, sent, answer);
      if (mismatch) mismatches.add(mismatch);
      (good ? covered.good : covered.bad).add(id);
      noteRoom(world, id, answer);
    }
    const ids = c.ops.map((op) => op.operation.operationId).sort();
    assert.deepEqual([...covered.good].sort(), ids, "a good request for each");
    assert.deepEqual([...covered.bad].sort(), ids, "a bad request for each");
    assert.deepEqual(wrong, [], wrong.join("\n"));
    assert.equal(
      mismatches.seen.size,
      0,
      `answers that depart from /openapi.json:\n\n${mismatches.report()}`,
    );
  });
});

/** The text of a query or path parameter as the JSON value its schema describes. */
function coerce(schema: Schema, text: string): unknown {
  const types = typesOf(schema);
  if (
    (types.includes("integer") || types.includes("number")) &&
    /^-?\d+(\.\d+)?$/.test(text)
  ) return Number(text);
  return text;
}

/** Where a request the server accepted is not valid against the documented request. */
function requestProblems(c: Contract, op: Op, sent: Sent): string[] {
  const problems: string[] = [];
  const query = new URL(sent.url, ORIGIN).searchParams;
  const path = pathParams(op, sent.url);
  const documented = new Set<string>();
  const method = op.method.toLowerCase();
  (op.operation.parameters ?? []).forEach((p, i) => {
    documented.add(`${p.in} ${p.name}`);
    const text = p.in === "path"
      ? path[p.name]
      : p.in === "query"
      ? query.get(p.name) ?? undefined
      : p.in === "header"
      ? sent.headers[p.name]
      : undefined;
    if (text === undefined) {
      if (p.required) problems.push(`${p.in} parameter "${p.name}" is missing`);
      return;
    }
    const validate = c.validator(
      pointer("paths", op.path, method, "parameters", String(i), "schema"),
    );
    if (!validate(coerce(p.schema, text))) {
      problems.push(
        `${p.in} parameter "${p.name}" = ${JSON.stringify(text)}: ${
          c.ajv.errorsText(validate.errors, { dataVar: p.name })
        }`,
      );
    }
  });
  for (const name of query.keys()) {
    if (!documented.has(`query ${name}`)) {
      problems.push(`query parameter "${name}" is not documented`);
    }
  }
  const body = op.operation.requestBody?.content["application/json"];
  if (body?.schema && sent.body !== undefined && sent.body !== "") {
    const validate = c.validator(
      pointer(
        "paths",
        op.path,
        method,
        "requestBody",
        "content",
        "application/json",
        "schema",
      ),
    );
    if (!validate(JSON.parse(sent.body))) {
      problems.push(
        `body ${clip(sent.body, 200)}: ${
          c.ajv.errorsText(validate.errors, { dataVar: "body" })
        }`,
      );
    }
  }
  return problems;
}

Deno.test("the table's good requests, which the server accepts, are valid against the documented parameters and request bodies", async () => {
  await withContract(async (c) => {
    const world = await setUp(c.app);
    const problems: string[] = [];
    for (const { id, op, good, item } of cases(c, world)) {
      assert.ok(
        op,
        `the table names operation ${id}, which the document lacks`,
      );
      // `/mcp` takes JSON-RPC, which the document does not describe.
      if (!good || op.path === "/mcp") continue;
      const sent = sentOf(op, world, item);
      const answer = await send(c.app, sent);
      noteRoom(world, id, answer);
      if (answer.status >= 300) continue;
      for (const problem of requestProblems(c, op, sent)) {
        problems.push(
          `${op.name}: ${sent.method} ${sent.url} answered ${answer.status}, but ${problem}`,
        );
      }
    }
    assert.deepEqual(problems, [], problems.join("\n"));
  });
});
