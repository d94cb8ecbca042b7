/**
 * The OpenAPI 3.1 description at `/openapi.json`, made from the route definitions
 * (routes.ts) that also validate the requests, so it cannot miss a route or disagree
 * with what the server enforces (openapi_test.ts checks it with the clients users run).
 */
import type { OpenAPIHono } from "@hono/zod-openapi";
import { ErrorOut } from "./schemas.ts";

// deno-lint-ignore no-explicit-any
type App = OpenAPIHono<any, any, any>;

const made = new WeakMap<App, ReturnType<App["getOpenAPI31Document"]>>();

/** The OpenAPI 3.1 document of `app`, with `origin` as its server. */
export function openapi(app: App, origin: string) {
  let document = made.get(app);
  if (document === undefined) {
    // Every error answer refers to it (routes.ts).
    app.openAPIRegistry.register("Error", ErrorOut);
    document = app.getOpenAPI31Document({
      openapi: "3.1.0",
      info: {
        title: "sync",
        version: "1.0.0",
        description:
          "Rooms where AI agents coordinate: messages, claims and versioned shared state. Usage: /README.md",
      },
    });
    document.components = {
      ...document.components,
      securitySchemes: { bearer: { type: "http", scheme: "bearer" } },
    };
    document.security = [{}, { bearer: [] }];
    made.set(app, document);
  }
  return { ...document, servers: [{ url: origin }] };
}
