/**
 * The OpenAPI 3.1 description at `/openapi.json`, made from the route definitions
 * (routes.ts) that also validate the requests, so it cannot miss a route or disagree
 * with what the server enforces (openapi_test.ts checks it with the clients users run).
 * The generator (@hono/zod-openapi) loads with the first request that needs the
 * document: the docs, the skill, `/openapi.json`.
 */
import type { Api } from "./api.ts";

// deno-lint-ignore no-explicit-any
type App = Api<any>;

type Document = ReturnType<
  import("@hono/zod-openapi").OpenAPIHono["getOpenAPI31Document"]
>;

const made = new WeakMap<App, Promise<Document>>();

/** The OpenAPI 3.1 document of `app`, with `origin` as its server. */
export async function openapi(app: App, origin: string) {
  let document = made.get(app);
  if (document === undefined) {
    document = generate(app);
    made.set(app, document);
    // A failure is not kept: the next request tries again.
    document.catch(() => made.delete(app));
  }
  return { ...await document, servers: [{ url: origin }] };
}

async function generate(app: App): Promise<Document> {
  const { OpenAPIHono } = await import("@hono/zod-openapi");
  const generator = new OpenAPIHono();
  for (const route of app.definitions) {
    generator.openAPIRegistry.registerPath(route);
  }
  const document = generator.getOpenAPI31Document({
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
  return document;
}
