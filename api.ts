/**
 * The app's class: Hono serving the route definitions of routes.ts. `app.openapi(route,
 * handler)` serves a route as @hono/zod-openapi's `OpenAPIHono` does, with its types
 * (`c.req.valid(…)` is typed from the definition), but two things differ:
 *
 * - it registers nothing: the OpenAPI document is made from `definitions` when it is
 *   first asked for (openapi.ts), so the generator and its dependencies are not loaded
 *   at start (18 ms of a 130 ms cold start: docs/PERFORMANCE.md);
 * - one middleware reads and checks all of a request's inputs (the body as JSON, then
 *   query, path, headers, body against their schemas), synchronously once the body is
 *   read, and hands on with `return next()`: a held long-poll keeps no frame of it.
 *
 * And a handler may answer later (`later`): a long-poll that must wait lets go of its
 * request's middleware chain (Hono's Context, a suspended frame per middleware) and
 * keeps only its wait (docs/PERFORMANCE.md).
 */
import type {
  createRoute as define,
  OpenAPIHono,
  RouteConfig,
} from "@hono/zod-openapi";
import {
  type Context,
  type Env,
  Hono,
  type MiddlewareHandler,
  type TypedResponse,
} from "hono";
import { TrieRouter } from "hono/router/trie-router";
import type { z } from "zod";
import { errorAnswer, originOf } from "./errors.ts";
import { parseInput, readJson } from "./schemas.ts";

/** A route definition: @hono/zod-openapi's `createRoute`, without loading that library. */
export const createRoute =
  ((config: RouteConfig) =>
    Object.defineProperty({ ...config }, "getRoutingPath", {
      value: () => honoPath(config.path),
    })) as unknown as typeof define;

/**
 * The app: typed as `OpenAPIHono` for its `openapi` method (whose third argument, a
 * hook, it does not take), less the registry and document methods it does not have
 * (openapi.ts makes the document from `definitions`) and `basePath`, whose app would
 * not answer `later`. Call it through its own `fetch` (or `request`): mounted in
 * another Hono app, its long-polls would send their placeholders.
 */
export type Api<E extends Env> =
  & Omit<
    OpenAPIHono<E>,
    | "openAPIRegistry"
    | "getOpenAPIDocument"
    | "getOpenAPI31Document"
    | "doc"
    | "doc31"
    | "openapiRoutes"
    | "basePath"
  >
  & {
    /** Every route served and not hidden, in order. */
    readonly definitions: RouteConfig[];
  };

/** A new app. */
export function api<E extends Env>(): Api<E> {
  // Hono's default router tries RegExpRouter first, which cannot hold these routes,
  // and settles on TrieRouter when the first request comes: this one from the start.
  const app = new Hono<E>({ router: new TrieRouter() });
  const definitions: RouteConfig[] = [];
  const openapi = (
    { middleware, hide, ...route }: RouteConfig,
    handler: MiddlewareHandler,
  ) => {
    if (!hide) definitions.push(route);
    app.on(
      [route.method],
      [honoPath(route.path)],
      ...[middleware ?? []].flat(),
      inputs(route),
      handler,
    );
    return app;
  };
  // The answers that come later replace their placeholders here, so every caller of
  // the app (server.ts, hosts, `app.request`, MCP's in-process calls) gets them.
  const dispatch = app.fetch;
  const fetch: typeof app.fetch = async (request, env, context) => {
    const response = await dispatch(request, env, context);
    const id = response.headers.get(LATER);
    const answer = id === null ? undefined : answers.get(id);
    if (answer === undefined) return response;
    answers.delete(id!);
    // The placeholder's headers (CORS, set by the middleware) under the answer's own.
    response.headers.delete(LATER);
    const final = await answer;
    for (const [name, value] of response.headers) {
      if (!final.headers.has(name)) final.headers.set(name, value);
    }
    // Hono answers HEAD with the GET route's headers and no body.
    return request.method === "HEAD" ? new Response(null, final) : final;
  };
  return Object.assign(app, { openapi, definitions, fetch }) as unknown as Api<
    E
  >;
}

/** The header that marks a placeholder (`later`); never sent. */
const LATER = "x-sync-answer-later";
const answers = new Map<string, Promise<Response>>();
let placeholders = 0;

/**
 * Answers the request with `answer` once it settles (a failure in the error shape, as
 * `onError` answers it). The handler returns what this returns: a placeholder, which
 * ends the request's middleware chain as any answer does (the middleware sets its
 * headers on it), and the app's `fetch` answers in its place, with its headers. So a
 * long-poll that waits keeps no more than `answer` keeps: it must not hold `c`.
 */
export function later<T>(
  c: Context,
  answer: Promise<Response>,
): TypedResponse<T, 200, "json"> {
  const id = String(++placeholders);
  const origin = originOf(c.req.url);
  const where = `${c.req.method} ${c.req.path}`;
  answers.set(
    id,
    answer.catch((error) => errorAnswer(error, origin, where)),
  );
  // Typed as the JSON answer the route declares (the placeholder never reaches a client).
  return c.body(null, 200, { [LATER]: id }) as unknown as TypedResponse<
    T,
    200,
    "json"
  >;
}

/** `/rooms/{id}` → `/rooms/:id`. */
function honoPath(path: string): string {
  return path.replaceAll(/\/{(.+?)}/g, "/:$1");
}

type Part = "query" | "param" | "header";

/**
 * The middleware that reads and checks a route's inputs (400 `invalid_request` naming
 * the first bad field, or `invalid_json`), each part read as Hono's validator reads
 * it. What routes.ts uses, no more: zod schemas for query, path, headers (named in
 * lower case, as requests' headers are read) and a JSON body; a body of another type
 * (an import's NDJSON) is only described, and its handler reads it; no cookies.
 */
function inputs(route: RouteConfig): MiddlewareHandler {
  const request = route.request ?? {};
  const content = request.body?.content;
  const where = `${route.method} ${route.path}`;
  // A route this middleware would check wrongly is refused when it is defined.
  const zod = (schema: unknown, what: string): z.ZodType => {
    if (!(schema instanceof Object && "safeParse" in schema)) {
      throw new Error(`${where}: its ${what} needs a zod schema`);
    }
    return schema as z.ZodType;
  };
  if (request.cookies) throw new Error(`${where}: cookies are not read`);
  const parts = ([
    ["query", request.query],
    ["param", request.params],
    ["header", request.headers],
  ] as const).filter(([, schema]) => schema !== undefined).map((
    [part, schema],
  ) => [part, zod(schema, part)] as const);
  const headers = request.headers && "shape" in request.headers
    ? Object.keys(request.headers.shape as object)
    : [];
  if (headers.some((name) => name !== name.toLowerCase())) {
    throw new Error(`${where}: name its headers in lower case (${headers})`);
  }
  const json = content?.["application/json"];
  const body = json
    ? zod("schema" in json ? json.schema : json, "body")
    : undefined;
  const check = (c: Context, value: unknown) => {
    for (const [part, schema] of parts) {
      c.req.addValidatedData(
        part,
        parseInput(part, schema, read(c, part)) as object,
      );
    }
    if (body) {
      c.req.addValidatedData("json", parseInput("json", body, value) as object);
    }
  };
  if (!body) {
    return (c, next) => {
      check(c, undefined);
      return next();
    };
  }
  return async (c, next) => {
    check(c, await readJson(c));
    return next();
  };
}

function read(c: Context, part: Part): unknown {
  switch (part) {
    case "query":
      return Object.fromEntries(
        Object.entries(c.req.queries()).map((
          [key, values],
        ) => [key, values.length === 1 ? values[0] : values]),
      );
    case "param":
      return c.req.param();
    case "header":
      return c.req.header();
  }
}
