/**
 * The viewer in a real browser: playwright-core drives Debian's Chromium against a real
 * `deno task start` (temp-file database, a free port). What only a browser shows: the
 * page script follows the stream live, escapes what agents wrote, and opens a locked
 * room with the token from the URL fragment.
 *
 * Skipped only where Chromium is absent and CI is not "true"; in CI (`.ci/run` installs
 * Chromium and sets CI=true) a missing browser fails the test.
 */
import assert from "node:assert/strict";
import {
  type Browser,
  type BrowserContext,
  chromium,
  type Locator,
  type Page,
  type Request,
} from "playwright-core";
import { expect, type Server, startServer } from "./testing.ts";

const ROOT = new URL(".", import.meta.url).pathname;
const CHROMIUM = "/usr/bin/chromium";
const IN_CI = Deno.env.get("CI") === "true";
/** Where the screenshots go: `viewer.png` (an open room), `viewer-locked.png`. */
const ARTIFACTS = `${ROOT}artifacts`;
/** The longest a write may take to show on an open page. */
const LIVE_MS = 1000;

// The background-networking flags keep Chromium from calling home: on a closed network
// those connections are refused and slow the start.
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

function chromiumPresent(): boolean {
  try {
    return Deno.statSync(CHROMIUM).isFile;
  } catch {
    return false;
  }
}

// Markup an agent might write. Escaped, it is shown as text; parsed, it calls the
// detector (`__pwned`, exposed by the test) and opens a dialog, either of which fails
// the test.
const SCRIPT = `<script>__pwned("script"); alert("script")</script>`;
const IMG = `<img src=x onerror="__pwned('img'); alert('img')">`;
const PAYLOAD = `before ${SCRIPT} middle ${IMG} after`;

/** What the pages of a context did that they never should. */
type Incidents = {
  pwned: string[];
  dialogs: string[];
  errors: string[];
  csp: string[];
};

/**
 * A browser context that reports injected code (`__pwned`), dialogs, uncaught page
 * errors and CSP violations. With `bypassCSP` the page's Content-Security-Policy is
 * off, so escaping alone must keep the markup inert.
 */
async function watchedContext(
  browser: Browser,
  options: {
    bypassCSP?: boolean;
    viewport?: { width: number; height: number };
  } = {},
): Promise<{ context: BrowserContext; incidents: Incidents }> {
  const context = await browser.newContext({
    bypassCSP: options.bypassCSP ?? false,
    viewport: options.viewport ?? { width: 1200, height: 800 },
  });
  // Everything here takes milliseconds; a failure should not wait out 30 s.
  context.setDefaultTimeout(5000);
  const incidents: Incidents = { pwned: [], dialogs: [], errors: [], csp: [] };
  await context.exposeFunction("__pwned", (what: string) => {
    incidents.pwned.push(what);
  });
  await context.exposeFunction("__csp", (what: string) => {
    incidents.csp.push(what);
  });
  // Installed before any page script: a violation means markup from the room tried to
  // run or load, or the viewer itself needs something its CSP forbids.
  await context.addInitScript(`
    document.addEventListener("securitypolicyviolation", (e) =>
      globalThis.__csp(e.violatedDirective + " " + e.blockedURI));
  `);
  context.on("page", (page) => watchPage(page, incidents));
  return { context, incidents };
}

function watchPage(page: Page, incidents: Incidents) {
  page.on("dialog", (dialog) => {
    incidents.dialogs.push(`${dialog.type()}: ${dialog.message()}`);
    void dialog.dismiss();
  });
  page.on("pageerror", (error) => incidents.errors.push(String(error)));
}

function assertQuiet(incidents: Incidents, where: string) {
  assert.deepEqual(
    incidents,
    { pwned: [], dialogs: [], errors: [], csp: [] },
    where,
  );
}

/** Markup from the room that became elements: none may exist. */
async function assertNoInjectedElements(page: Page) {
  const injected = page.locator(
    ["#messages", "#agents", "#state", "#room-meta"]
      .flatMap((area) => [`${area} script`, `${area} img`])
      .join(", "),
  );
  assert.equal(await injected.count(), 0, "markup from the room was parsed");
}

/**
 * Runs `show` (waits for markup to show as text), then checks that nothing of it was
 * parsed or ran. Checked first when `show` fails too: parsed markup never shows as text,
 * and is the likelier cause.
 */
async function assertInert(
  page: Page,
  incidents: Incidents,
  where: string,
  show: () => Promise<void>,
) {
  try {
    await show();
  } catch (error) {
    await assertNoInjectedElements(page);
    assertQuiet(incidents, where);
    throw error;
  }
  await assertNoInjectedElements(page);
  assertQuiet(incidents, where);
}

/** Waits until the page follows the stream. */
async function waitLive(page: Page) {
  await page.locator("#status.live").waitFor({ timeout: 5000 });
}

/**
 * Runs `write`, then waits for `shown` to appear within LIVE_MS of the write's start;
 * returns the delay in ms.
 */
async function timeLive(
  write: () => Promise<unknown>,
  shown: Locator,
): Promise<number> {
  const t0 = performance.now();
  await write();
  const left = LIVE_MS - (performance.now() - t0);
  assert.ok(left > 0, `the write alone took over ${LIVE_MS} ms`);
  await shown.waitFor({ state: "visible", timeout: left });
  return performance.now() - t0;
}

/** The state row of `key` in scope `_shared`. */
function stateRow(page: Page, key: string): Locator {
  return page.locator("#state tr").filter({
    has: page.locator("td:nth-child(2)", { hasText: new RegExp(`^${key}$`) }),
  });
}

/**
 * Runs `fn` against a fresh `deno task start` (temp-file database, no rate limit) and
 * one Chromium; stops both whatever happens, and prints the server's output on failure.
 */
async function withViewer(
  fn: (base: string, browser: Browser) => Promise<void>,
) {
  assert.ok(
    chromiumPresent(),
    `CI=true but Chromium is not at ${CHROMIUM}: install it (apt-get install -y chromium); .ci/run does`,
  );
  const dir = await Deno.makeTempDir({ prefix: "sync-browser-test-" });
  let server: Server | undefined;
  let browser: Browser | undefined;
  try {
    server = await startServer({
      DATABASE_URL: `file:${dir}/sync.db`,
      RATE_LIMIT: "0",
    });
    const launched = performance.now();
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: CHROMIUM_ARGS,
    });
    console.log(
      `chromium launched in ${Math.round(performance.now() - launched)} ms`,
    );
    await fn(server.url, browser);
  } catch (error) {
    console.error(`server output:\n${server?.output()}`);
    throw error;
  } finally {
    await browser?.close();
    await server?.stop("SIGTERM");
    await Deno.remove(dir, { recursive: true });
  }
}

/** A test `withViewer`, skipped only where Chromium is absent and CI is not "true". */
function viewerTest(
  name: string,
  fn: (base: string, browser: Browser) => Promise<void>,
) {
  Deno.test({
    name,
    ignore: !chromiumPresent() && !IN_CI,
    fn: () => withViewer(fn),
  });
}

viewerTest(
  "the viewer in Chromium shows a room, follows it live within a second, escapes markup, and opens a locked room only with its token",
  async (base, browser) => {
    const delays: Record<string, number> = {};
    // Sections, not t.step: each builds on the last, and a test with steps changes
    // Deno's closing "N passed | N failed" line, which .ci/run sums.
    const section = async (name: string, fn: () => Promise<void>) => {
      const t0 = performance.now();
      try {
        await fn();
      } catch (error) {
        console.error(`${name} ... FAILED`);
        throw error;
      }
      console.log(
        `${name} ... ok (${Math.round(performance.now() - t0)} ms)`,
      );
    };
    try {
      await Deno.mkdir(ARTIFACTS, { recursive: true });

      // ---- an open room, written before the page opens ----
      // deno-fmt-ignore
      const writes: [string, string, number, unknown][] = [
        ["POST", "/rooms", 201, { id: "crew", meta: { goal: "ship the parser" } }],
        ["POST", "/rooms/crew/agents", 201, { id: "alice", name: "Alice", role: "planner" }],
        ["POST", "/rooms/crew/agents", 201, { id: "bob", name: PAYLOAD, role: "worker" }],
        ["POST", "/rooms/crew/agents/bob/heartbeat", 200, { status: "busy" }],
        ["POST", "/rooms/crew/messages", 201, { from: "alice", to: "bob", kind: "task", body: "write the tokenizer" }],
        ["POST", "/rooms/crew/messages", 201, { from: "bob", kind: "note", body: PAYLOAD }],
        ["PUT", "/rooms/crew/state", 200, { key: "phase", value: "build" }],
        ["PUT", "/rooms/crew/state", 200, { key: "markup", value: PAYLOAD }],
      ];
      for (const [method, path, status, body] of writes) {
        await expect(base, method, path, status, body);
      }

      const { context, incidents } = await watchedContext(browser);
      const page = await context.newPage();
      let loads = 0;
      page.on("load", () => loads++);

      await section(
        "the page shows what was written before it opened",
        async () => {
          const res = await page.goto(`${base}/?room=crew`);
          assert.equal(res?.status(), 200);
          // The page carries the room as JSON data, `<` escaped: the message body,
          // the agent name and the state value are never markup in the HTML.
          const html = await res!.text();
          assert.ok(
            html.includes("write the tokenizer"),
            "the room comes with the page",
          );
          const count = (text: string) => html.split(text).length - 1;
          assert.deepEqual(
            [count("\\u003cscript>__pwned"), count("\\u003cimg src=x")],
            [3, 3],
            "the markup, escaped, in the body, the agent name and the state value",
          );
          assert.deepEqual(
            [count("<script>__pwned"), count("<img src=x")],
            [0, 0],
            "the markup, raw, in the HTML",
          );
          await page.locator("#messages").getByText("write the tokenizer", {
            exact: true,
          })
            .waitFor();
          assert.equal(await page.locator("#messages li").count(), 2);
          assert.equal(
            await page.locator("#m-1 .kind").textContent(),
            "task",
          );
          assert.equal(
            await page.locator("#m-1 .from").textContent(),
            "alice",
          );
          assert.equal(await page.locator("#m-1 .to").textContent(), "bob");
          assert.equal(
            await page.locator("#a-alice td").nth(1).textContent(),
            "Alice",
          );
          assert.equal(
            await page.locator("#a-bob .status").textContent(),
            "busy",
          );
          assert.equal(
            await stateRow(page, "phase").locator("pre").textContent(),
            "build",
          );
          assert.equal(
            await stateRow(page, "phase").locator("td").nth(3).textContent(),
            "v1",
          );
          assert.ok(
            (await page.locator("#room-meta").textContent())!.includes(
              '{"goal":"ship the parser"}',
            ),
          );
          await waitLive(page);
        },
      );

      await section(
        "the markup the page came with shows as text and runs nothing",
        async () => {
          // The stream's snapshot has since redrawn the agent and state rows, but the
          // server's rows were in the page first, where markup would have run then.
          await assertInert(page, incidents, "server-rendered", async () => {
            await page.locator("#m-2 pre").getByText(PAYLOAD, { exact: true })
              .waitFor();
            await stateRow(page, "markup").getByText(PAYLOAD, { exact: true })
              .waitFor();
            await page.locator("#a-bob").getByText(PAYLOAD, { exact: true })
              .waitFor();
          });
        },
      );

      await section(
        "writes appear without a reload within a second",
        async () => {
          delays.message = await timeLive(
            () =>
              expect(base, "POST", "/rooms/crew/messages", 201, {
                from: "alice",
                to: "bob",
                kind: "review",
                body: "live message one",
              }),
            page.locator("#m-3 pre").getByText("live message one", {
              exact: true,
            }),
          );
          delays.stateChange = await timeLive(
            () =>
              expect(base, "PUT", "/rooms/crew/state", 200, {
                key: "phase",
                value: "review",
              }),
            stateRow(page, "phase").filter({ hasText: "review" }).filter({
              hasText: "v2",
            }),
          );
          delays.stateNew = await timeLive(
            () =>
              expect(base, "PUT", "/rooms/crew/state", 200, {
                key: "aaa-first",
                value: { n: 1 },
              }),
            stateRow(page, "aaa-first"),
          );
          // In key order, as the server lists state.
          assert.equal(
            await page.locator("#state tr td:nth-child(2)").first()
              .textContent(),
            "aaa-first",
          );
          delays.stateDelete = await timeLive(
            () =>
              expect(base, "DELETE", "/rooms/crew/state", 200, {
                key: "aaa-first",
              }),
            page.locator("#state").filter({
              hasNot: page.getByText("aaa-first", { exact: true }),
            }),
          );
          delays.heartbeat = await timeLive(
            () =>
              expect(
                base,
                "POST",
                "/rooms/crew/agents/alice/heartbeat",
                200,
                {
                  status: "done",
                },
              ),
            page.locator("#a-alice .status.done"),
          );
          delays.join = await timeLive(
            () =>
              expect(base, "POST", "/rooms/crew/agents", 201, {
                id: "carol",
                name: "Carol",
                role: "reviewer",
              }),
            page.locator("#a-carol").filter({ hasText: "Carol" }),
          );
          // A task's status as it changes: held, then done.
          delays.claim = await timeLive(
            () =>
              expect(base, "POST", "/rooms/crew/messages/3/claim", 200, {
                agent: "bob",
                lease: 60,
              }),
            page.locator("#m-3 .claim.held").filter({
              hasText: "claimed by bob",
            }),
          );
          delays.complete = await timeLive(
            () =>
              expect(base, "POST", "/rooms/crew/messages/3/complete", 200, {
                agent: "bob",
              }),
            page.locator("#m-3 .claim.done").filter({
              hasText: "done by bob",
            }),
          );
          // Still the one page load: nothing above reloaded it.
          assert.equal(loads, 1);
          assert.equal(await page.locator("#messages li").count(), 3);
          assert.equal(await page.locator("#a-alice .status").count(), 1);
          assert.equal(await page.locator("#agents tr").count(), 3);
          assert.equal(await page.locator("#status").textContent(), "live");
        },
      );

      await section(
        "markup arriving over the stream shows as text and runs nothing",
        async () => {
          await assertInert(page, incidents, "over the stream", async () => {
            delays.markupMessage = await timeLive(
              () =>
                expect(base, "POST", "/rooms/crew/messages", 201, {
                  from: "carol",
                  body: PAYLOAD,
                }),
              page.locator("#m-4 pre").getByText(PAYLOAD, { exact: true }),
            );
            delays.markupState = await timeLive(
              () =>
                expect(base, "PUT", "/rooms/crew/state", 200, {
                  key: "markup",
                  value: `live ${PAYLOAD}`,
                }),
              stateRow(page, "markup").getByText(`live ${PAYLOAD}`, {
                exact: true,
              }),
            );
            delays.markupAgent = await timeLive(
              () =>
                expect(base, "POST", "/rooms/crew/agents", 201, {
                  id: "mallory",
                  name: PAYLOAD,
                  role: PAYLOAD,
                }),
              page.locator("#a-mallory td").nth(2).getByText(PAYLOAD, {
                exact: true,
              }),
            );
          });
          await page.screenshot({
            path: `${ARTIFACTS}/viewer.png`,
            fullPage: true,
          });
        },
      );

      await section(
        "with its CSP off, escaping alone keeps the markup inert",
        async () => {
          const { context: bare, incidents: bareIncidents } =
            await watchedContext(browser, { bypassCSP: true });
          try {
            const naked = await bare.newPage();
            await naked.goto(`${base}/?room=crew`);
            await waitLive(naked);
            await assertInert(
              naked,
              bareIncidents,
              "without CSP",
              async () => {
                delays.bareMessage = await timeLive(
                  () =>
                    expect(base, "POST", "/rooms/crew/messages", 201, {
                      body: `bare ${PAYLOAD}`,
                    }),
                  naked.getByText(`bare ${PAYLOAD}`, { exact: true }),
                );
                assert.equal(
                  await naked.getByText(PAYLOAD, { exact: true }).count(),
                  5,
                  "two message bodies, two agent names and a role",
                );
              },
            );
          } finally {
            await bare.close();
          }
        },
      );
      assertQuiet(incidents, "the open room");

      // ---- a locked room ----
      const vault = await expect(base, "POST", "/rooms", 201, {
        id: "vault",
        locked: true,
        meta: { goal: "keep secrets" },
      });
      const roomToken = vault.token as string;
      const viewToken = vault.view_token as string;
      const dave = await expect(
        base,
        "POST",
        "/rooms/vault/agents",
        201,
        { id: "dave", name: "Dave", role: "keeper" },
        roomToken,
      );
      const daveToken = dave.token as string;
      await expect(
        base,
        "POST",
        "/rooms/vault/messages",
        201,
        { body: "the vault opens at dawn" },
        daveToken,
      );
      await expect(
        base,
        "POST",
        "/rooms/vault/messages",
        201,
        { kind: "note", body: PAYLOAD },
        daveToken,
      );
      await expect(
        base,
        "PUT",
        "/rooms/vault/state",
        200,
        { key: "combination", value: "12-34-56" },
        daveToken,
      );

      await section(
        "a locked room opens with #token=<view token> and follows live",
        async () => {
          const locked = await context.newPage();
          const requests: Request[] = [];
          locked.on("request", (request) => requests.push(request));
          try {
            const res = await locked.goto(
              `${base}/?room=vault#token=${viewToken}`,
            );
            // The server never sees the fragment and renders nothing of the room.
            const html = await res!.text();
            assert.ok(
              !html.includes("the vault opens at dawn"),
              "the server rendered a locked room's message",
            );
            await locked.getByText("the vault opens at dawn", { exact: true })
              .waitFor();
            await locked.locator("#messages pre").getByText(PAYLOAD, {
              exact: true,
            }).waitFor();
            assert.equal(
              await locked.locator("#messages li").filter({ hasText: "dawn" })
                .locator(".from").textContent(),
              "dave",
            );
            assert.equal(
              await locked.locator("#a-dave td").nth(1).textContent(),
              "Dave",
            );
            assert.equal(
              await stateRow(locked, "combination").locator("pre")
                .textContent(),
              "12-34-56",
            );
            assert.match(
              (await locked.locator("#room-meta").textContent())!,
              /locked · meta \{"goal":"keep secrets"\}/,
            );
            // The token left the address (replaced, so no history entry keeps it)
            // and travels only in a header, never in what the server sees of a URL.
            assert.equal(locked.url(), `${base}/?room=vault`);
            await waitLive(locked);
            const sent = await Promise.all(
              requests.map(async (request) => {
                const url = new URL(request.url());
                const auth = (await request.allHeaders()).authorization;
                return { path: url.pathname + url.search, auth };
              }),
            );
            for (const { path } of sent) {
              assert.ok(!path.includes(viewToken), `token in ${path}`);
            }
            for (const route of ["/context", "/stream"]) {
              const read = sent.find(({ path }) =>
                path.startsWith(`/rooms/vault${route}`)
              );
              assert.equal(read?.auth, `Bearer ${viewToken}`, route);
            }

            delays.lockedMessage = await timeLive(
              () =>
                expect(
                  base,
                  "POST",
                  "/rooms/vault/messages",
                  201,
                  { body: "dawn moved to noon" },
                  daveToken,
                ),
              locked.locator("#messages pre").getByText(
                "dawn moved to noon",
                {
                  exact: true,
                },
              ),
            );
            delays.lockedState = await timeLive(
              () =>
                expect(
                  base,
                  "PUT",
                  "/rooms/vault/state",
                  200,
                  { key: "combination", value: "65-43-21" },
                  daveToken,
                ),
              stateRow(locked, "combination").filter({ hasText: "65-43-21" }),
            );
            delays.lockedHeartbeat = await timeLive(
              () =>
                expect(
                  base,
                  "POST",
                  "/rooms/vault/agents/dave/heartbeat",
                  200,
                  { status: "busy" },
                  daveToken,
                ),
              locked.locator("#a-dave .status.busy"),
            );
            await assertNoInjectedElements(locked);
            await locked.screenshot({
              path: `${ARTIFACTS}/viewer-locked.png`,
              fullPage: true,
            });

            // A reload keeps the token: it is in this tab's session storage.
            await locked.reload();
            await locked.getByText("dawn moved to noon", { exact: true })
              .waitFor();
            await waitLive(locked);
            assert.equal(await locked.locator("#messages li").count(), 3);
          } finally {
            await locked.close();
          }
          assertQuiet(incidents, "the locked room");
        },
      );

      await section(
        "a locked room without its token shows a lock notice and nothing of the room",
        async () => {
          const { context: stranger, incidents: strangerIncidents } =
            await watchedContext(browser);
          try {
            for (
              const address of [
                "/?room=vault",
                "/?room=vault#token=view_wrong",
                "/?room=vault#token=%0Aview%20bad",
              ]
            ) {
              const page = await stranger.newPage();
              await page.goto(base + address);
              // Without a token: how to open it; with a wrong one: that it was refused.
              await page.getByText(
                address.includes("%0A")
                  ? "The #token= in the address is malformed: a token is printable characters without spaces. Open the room again with #token=<a view, agent or room token>."
                  : address.includes("#token=")
                  ? "This room is locked and its token was refused: open it again with #token=<a current view, agent or room token>."
                  : "This room is locked: add #token=<a view, agent or room token> to the address.",
                { exact: true },
              ).waitFor();
              for (
                const area of ["#messages li", "#agents tr", "#state tr"]
              ) {
                assert.equal(
                  await page.locator(area).count(),
                  0,
                  `${address} ${area}`,
                );
              }
              const text = (await page.locator("body").textContent())!;
              for (
                const secret of ["dawn", "dave", "12-34", "keep secrets"]
              ) {
                assert.ok(
                  !text.includes(secret),
                  `${address} shows "${secret}"`,
                );
              }
              await page.close();
            }
            // The failed reads are answered 401 and logged by Chromium, not thrown.
            assertQuiet(strangerIncidents, "a locked room without its token");
          } finally {
            await stranger.close();
          }
        },
      );

      await context.close();
      console.log(`screenshots in ${ARTIFACTS}/`);
    } finally {
      console.log(
        `live update delays (ms), write to visible: ${
          Object.entries(delays)
            .map(([what, ms]) => `${what} ${Math.round(ms)}`)
            .join(", ")
        }`,
      );
    }
  },
);

// An open room's page whose token is refused (mistyped, rotated, or left in this tab's
// session storage from an earlier room of that id) forgets the token and follows
// without it; a deleted room's page says so and stops.
viewerTest(
  "an open room's page keeps following live when the token in its address is refused, and says when the room is deleted",
  async (base, browser) => {
    const room = await expect(base, "POST", "/rooms", 201, { id: "open" });
    await expect(base, "POST", "/rooms/open/messages", 201, { body: "one" });
    const { context, incidents } = await watchedContext(browser);
    const page = await context.newPage();
    await page.goto(`${base}/?room=open#token=view_stale`);
    await page.getByText("one", { exact: true }).waitFor();
    const delay = await timeLive(
      () => expect(base, "POST", "/rooms/open/messages", 201, { body: "two" }),
      page.getByText("two", { exact: true }),
    );
    console.log(`live update delay: ${Math.round(delay)} ms`);
    assert.doesNotMatch(
      (await page.locator("#room-meta").textContent())!,
      /locked/,
    );
    await expect(
      base,
      "DELETE",
      "/rooms/open",
      200,
      undefined,
      String(room.token),
    );
    await page.getByText("This room was deleted.").waitFor({ timeout: 3000 });
    assertQuiet(incidents, "an open room with a refused token");
    await context.close();
  },
);

/** The two screens a person watches from: a laptop and a phone. */
const SCREENS = [
  { name: "desktop", viewport: { width: 1280, height: 800 } },
  { name: "phone", viewport: { width: 390, height: 844 } },
] as const;

viewerTest(
  "the console at 1280×800 and 390×844: panels, following the newest, filters, a thread, tasks, a key's history, the state at a message, posting as a person, the landing page",
  async (base, browser) => {
    await Deno.mkdir(ARTIFACTS, { recursive: true });
    // A room with a little of everything, and markup wherever a person's or an
    // agent's text goes.
    const made = await expect(base, "POST", "/rooms", 201, {
      id: "ops",
      meta: { note: PAYLOAD },
    }) as { token: string };
    const admin = made.token;
    const post = async (body: Record<string, unknown>) =>
      (await expect(
        base,
        "POST",
        "/rooms/ops/messages",
        201,
        body,
        admin,
      ) as {
        id: number;
      }).id;
    await expect(base, "POST", "/rooms/ops/agents", 201, {
      id: "lead",
      name: PAYLOAD,
      role: PAYLOAD,
    }, admin);
    await expect(base, "PUT", "/rooms/ops/state", 200, {
      key: "plan",
      value: "draft",
      agent: "lead",
    }, admin);
    const between = await post({ from: "lead", body: "plan drafted" });
    await expect(base, "PUT", "/rooms/ops/state", 200, {
      key: "plan",
      value: PAYLOAD,
      agent: "lead",
    }, admin);
    const held = await post({
      from: "lead",
      kind: "task",
      body: "held task",
      max_attempts: 3,
    });
    await expect(base, "POST", `/rooms/ops/messages/${held}/claim`, 200, {
      agent: "w1",
      lease: 600,
    }, admin);
    const done = await post({
      from: "lead",
      kind: "task",
      body: "done task",
    });
    await expect(base, "POST", `/rooms/ops/messages/${done}/claim`, 200, {
      agent: "w2",
    }, admin);
    await expect(base, "POST", `/rooms/ops/messages/${done}/complete`, 200, {
      agent: "w2",
      result: { body: "the result" },
    }, admin);
    // A state key may hold markup too (keys are any printable text).
    const MARKUP_KEY = `k ${IMG}`;
    await expect(base, "PUT", "/rooms/ops/state", 200, {
      key: MARKUP_KEY,
      value: 1,
    }, admin);
    for (let i = 0; i < 30; i++) await post({ body: `filler ${i}` });
    const reply = await post({ from: "w1", body: "on it", reply_to: held });

    for (const screen of SCREENS) {
      const { context, incidents } = await watchedContext(browser, {
        viewport: screen.viewport,
      });
      const page = await context.newPage();
      const phone = screen.name === "phone";
      await page.goto(`${base}/?room=ops`);
      await waitLive(page);
      const label = (what: string) => `${screen.name}: ${what}`;

      // Panels: a phone shows one at a time, chosen from the tabs; a desktop all.
      assert.equal(await page.locator("nav.tabs").isVisible(), phone);
      assert.equal(await page.locator("#p-agents").isVisible(), !phone);
      const fits = await page.evaluate(
        "document.documentElement.scrollWidth <= innerWidth + 1",
      );
      assert.ok(fits, label("the page is no wider than the screen"));

      // Following the newest: the page opens at the bottom; scrolled up, a new
      // message is announced, and the announcement takes the reader down.
      const BOTTOM = "innerHeight + scrollY >= document.body.scrollHeight - 80";
      const atBottom = () => page.evaluate(BOTTOM);
      assert.ok(await atBottom(), label("opens at the newest"));
      await page.evaluate("scrollTo(0, 0)");
      await post({ from: "lead", body: `${screen.name} news` });
      await page.locator("#new-messages").getByText("↓ 1 new message")
        .waitFor();
      await page.locator("#new-messages").click();
      await page.waitForFunction(BOTTOM);

      // Replies sit under their parent.
      const order = await page.locator("#messages > li").evaluateAll((
        items,
      ) => items.map((item) => item.id));
      assert.equal(
        order.indexOf(`m-${reply}`),
        order.indexOf(`m-${held}`) + 1,
        label("the reply right under its task"),
      );

      // Filters: kind, task status, a thread.
      const visible = () =>
        page.locator("#messages > li:visible").evaluateAll((items) =>
          items.map((item) => item.id)
        );
      await page.selectOption("#f-kind", "task");
      assert.deepEqual(await visible(), [`m-${held}`, `m-${done}`]);
      await page.selectOption("#f-kind", "");
      await page.selectOption("#f-status", "held");
      assert.deepEqual(await visible(), [`m-${held}`]);
      await page.selectOption("#f-status", "");
      await page.locator(`#m-${reply} button`, { hasText: "thread" }).click();
      assert.deepEqual(await visible(), [`m-${held}`, `m-${reply}`]);
      await page.locator("#thread-clear").click();
      assert.ok((await visible()).length > 30);

      // Tasks: counts by status, and the ones not done.
      if (phone) {
        await page.locator("nav.tabs button", { hasText: "Tasks" }).click();
      }
      const counts = await page.locator("#task-counts").textContent();
      assert.match(counts!, /open 0.*held 1.*done 1.*dead 0/);
      assert.deepEqual(
        await page.locator("#tasks li").evaluateAll((items) =>
          items.map((item) => item.getAttribute("data-task"))
        ),
        [String(held)],
      );
      await page.screenshot({
        path: `${ARTIFACTS}/console-${screen.name}-tasks.png`,
      });

      // A key's history: who wrote each version.
      if (phone) {
        await page.locator("nav.tabs button", { hasText: "State" }).click();
      }
      await page.locator("#state button.key", { hasText: "plan" }).click();
      await page.locator("#history-panel").waitFor();
      const versions = await page.locator("#history tr").evaluateAll((rows) =>
        rows.map((row) =>
          [...row.children].slice(0, 3).map((c) => c.textContent)
        )
      );
      assert.deepEqual(versions, [
        ["v1", "draft", "lead"],
        ["v2", PAYLOAD, "lead"],
      ]);

      // A key with markup: shown as text, and so is its history's title.
      await assertInert(
        page,
        incidents,
        label("a key with markup"),
        async () => {
          await page.locator("#state button.key").getByText(MARKUP_KEY, {
            exact: true,
          }).click();
          await page.locator("#history-key").getByText(
            `_shared / ${MARKUP_KEY}`,
            {
              exact: true,
            },
          ).waitFor();
        },
      );
      await page.locator("#history-close").click();

      // The state as it was right after a message, and back to live.
      if (phone) {
        await page.locator("nav.tabs button", { hasText: "Messages" })
          .click();
      }
      await page.locator(`#m-${between} button`, { hasText: "state then" })
        .click();
      await page.locator("#state-mode").waitFor();
      assert.equal(
        await stateRow(page, "plan").locator("pre").textContent(),
        "draft",
      );
      await page.screenshot({
        path: `${ARTIFACTS}/console-${screen.name}-state.png`,
      });
      await page.locator("#state-live").click();
      assert.equal(
        await stateRow(page, "plan").locator("pre").textContent(),
        PAYLOAD,
      );

      // Posting as a person, markup and all: it arrives as text, from a person.
      if (phone) {
        await page.locator("nav.tabs button", { hasText: "Messages" })
          .click();
      }
      await page.fill("#compose input[name=name]", `Ann ${IMG}`);
      await page.fill("#compose textarea", PAYLOAD);
      await page.locator("#compose button[type=submit]").click();
      await page.locator("#compose-note").getByText(/^Posted #\d+\.$/)
        .waitFor();
      const mine = page.locator("#messages > li").last();
      await assertInert(
        page,
        incidents,
        label("a person's post"),
        async () => {
          await mine.locator("pre").getByText(PAYLOAD, { exact: true })
            .waitFor();
        },
      );
      assert.match(
        (await mine.locator(".from").textContent())!,
        /^person:Ann-/,
      );
      await page.evaluate("scrollTo(0, 0)");
      await page.screenshot({
        path: `${ARTIFACTS}/console-${screen.name}.png`,
        fullPage: false,
      });
      await assertNoInjectedElements(page);
      assertQuiet(incidents, label("the whole visit"));
      await context.close();
    }

    // A view token reads, and may not post: the console says why.
    const locked = await expect(base, "POST", "/rooms", 201, {
      id: "vaulted",
      locked: true,
    }) as { view_token: string };
    {
      const { context, incidents } = await watchedContext(browser);
      const page = await context.newPage();
      await page.goto(`${base}/?room=vaulted#token=${locked.view_token}`);
      await waitLive(page);
      await page.fill("#compose textarea", "hello");
      await page.locator("#compose button[type=submit]").click();
      await page.locator("#compose-note").getByText(/^403 read_only: /)
        .waitFor();
      assertQuiet(incidents, "a view token's post");
      await context.close();
    }

    // The landing page: the open rooms, and the docs as HTML.
    {
      const { context, incidents } = await watchedContext(browser);
      const page = await context.newPage();
      await page.goto(`${base}/`);
      await page.locator("#rooms a", { hasText: "ops" }).waitFor();
      assert.equal(
        await page.locator("#rooms a", { hasText: "vaulted" }).count(),
        0,
        "a locked room is not listed",
      );
      assert.ok(await page.locator("#docs h2").count() > 3);
      assert.ok(await page.locator("#docs table").count() > 0);
      const docs = (await page.locator("#docs").textContent())!;
      assert.ok(!docs.includes("|---"), "tables are tables");
      assert.ok(!docs.includes("```"), "code is code");
      await page.screenshot({ path: `${ARTIFACTS}/landing.png` });
      await page.locator("#rooms a", { hasText: "ops" }).click();
      await waitLive(page);
      assertQuiet(incidents, "the landing page");
      await context.close();
    }
  },
);
