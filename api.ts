/**
 * The app's class: Hono serving the route definitions of routes.ts. `app.openapi(route,
 * handler)` serves a route as @hono/zod-openapi's `OpenAPIHono` does, with its types
 * (`c.req.valid(…)` is typed from the definition), but two things differ:
 *
 * - it registers nothing: the OpenAPI document is made from `definitions` when it is
 *   first asked for (openapi.ts), so the generator and its dependencies are not loaded
 *   at start (they were a fifth of the cold start: docs/PERFORMANCE.md);
 * - one middleware reads and checks all of a request's inputs (the body as JSON, then
 *   query, path, headers, body against their schemas), synchronously once the body is
 *   read, and hands on with `return next()`: a held long-poll keeps no frame of it.
 */
import type {
  createRoute as define,
  OpenAPIHono,
  RouteConfig,
} from "@hono/zod-openapi";
import { type Context, type Env, Hono, type MiddlewareHandler } from "hono";
import type { z } from "zod";
import { parseInput, readJson } from "./schemas.ts";

/** A route definition: @hono/zod-openapi's `createRoute`, without loading that library. */
export const createRoute =
  ((config: RouteConfig) =>
    Object.defineProperty({ ...config }, "getRoutingPath", {
      value: () => honoPath(config.path),
    })) as unknown as typeof define;

/**
 * The app: typed as `OpenAPIHono` for its `openapi` method; its registry and document
 * methods are not there (openapi.ts makes the document from `definitions`).
 */
export type Api<E extends Env> = OpenAPIHono<E> & {
  /** Every route served and not hidden, in order. */
  readonly definitions: RouteConfig[];
};

/** A new app. */
export function api<E extends Env>(): Api<E> {
  const app = new Hono<E>();
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
  return Object.assign(app, { openapi, definitions }) as unknown as Api<E>;
}

/** `/rooms/{id}` → `/rooms/:id`. */
function honoPath(path: string): string {
  return path.replaceAll(/\/{(.+?)}/g, "/:$1");
}

type Part = "query" | "param" | "header";

/**
 * The middleware that reads and checks a route's inputs (400 `invalid_request` naming
 * the first bad field, or `invalid_json`), each part read as Hono's validator reads
 * it; a header schema names its headers in lower case.
 */
function inputs(route: RouteConfig): MiddlewareHandler {
  const request = route.request ?? {};
  const parts = ([
    ["query", request.query],
    ["param", request.params],
    ["header", request.headers],
  ] as [Part, unknown][]).filter(([, schema]) => schema !== undefined) as [
    Part,
    z.ZodType,
  ][];
  const content = request.body?.content["application/json"];
  const body = content && "schema" in content
    ? content.schema as z.ZodType
    : undefined;
  const check = (c: Context, json: unknown) => {
    for (const [part, schema] of parts) {
      c.req.addValidatedData(
        part,
        parseInput(part, schema, read(c, part)) as object,
      );
    }
    if (body) {
      c.req.addValidatedData("json", parseInput("json", body, json) as object);
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
