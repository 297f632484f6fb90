// Loads files into a running ComfyUI frontend as a user does, in Debian's Chromium, and reports
// the graph the frontend ended up with. Driven by tests/interop/test_dragback.py.
//
//   node drop.mjs CONFIG.json RESULT.json
//
// CONFIG: {chromium, url, extension (bool: wait for Luna Saver's extension), wait_ms,
//          screenshot_dir (optional), cases: [{id, path, name, mime, how: "drop" | "open"}]}
// RESULT: {boot: {...}, cases: [{id, settled, ms, graph, toasts, console}]}
//
// "drop" dispatches dragenter/dragover/drop on the graph canvas with a DataTransfer holding the
// File, which is what the browser does for a file dragged in from the desktop; "open" puts the
// file into the frontend's own file input (Workflow > Open). Before each case the graph is
// cleared, so a file that does not load leaves an empty graph (or, in newer frontends, a
// LoadImage node) and never the previous file's workflow.
import { readFile, writeFile } from "node:fs/promises";
import { chromium } from "playwright-core";

const [configPath, resultPath] = process.argv.slice(2);
const config = JSON.parse(await readFile(configPath, "utf8"));

const browser = await chromium.launch({
  executablePath: config.chromium,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const result = { boot: {}, cases: [] };
let consoleLines = [];
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("console", (m) => {
    const where = m.type() === "error" ? ` (${m.location().url})` : "";
    consoleLines.push(`${m.type()}: ${m.text()}${where}`.slice(0, 800));
  });
  page.on("pageerror", (e) => consoleLines.push(`pageerror: ${e.stack ?? e.message}`.slice(0, 800)));
  await page.goto(config.url);
  // Booted: the app has a graph with the default workflow and a file input; with the extension,
  // its setup() has wrapped handleFile (an own property of the app object).
  await page.waitForFunction(
    (extension) => {
      const app = window.comfyAPI?.app?.app;
      if (!app?.canvas || !app.graph || !document.getElementById("comfy-file-input")) return false;
      if (app.graph.nodes.length === 0) return false;
      return !extension || Object.prototype.hasOwnProperty.call(app, "handleFile");
    },
    config.extension,
    { timeout: 90_000, polling: 100 },
  );
  result.boot = await page.evaluate(() => {
    const app = window.comfyAPI.app.app;
    return {
      extensions: app.extensions.map((e) => e.name),
      handleFile_wrapped: Object.prototype.hasOwnProperty.call(app, "handleFile"),
      accept: document.getElementById("comfy-file-input").accept,
    };
  });
  result.boot.console = consoleLines;
  if (config.screenshot_dir) {
    await page.screenshot({ path: `${config.screenshot_dir}/boot.png` });
  }

  for (const c of config.cases) {
    consoleLines = [];
    // A clean slate: no toast left from the previous file, an empty graph.
    await page.evaluate(() => {
      document.querySelectorAll(".p-toast-close-button").forEach((b) => b.click());
      window.comfyAPI.app.app.graph.clear();
    });
    await page
      .waitForFunction(() => document.querySelector(".p-toast-message") === null, null, {
        timeout: 5000,
        polling: 50,
      })
      .catch(() => {});
    const started = Date.now();
    const data = await readFile(c.path);
    if (c.how === "open") {
      await page.setInputFiles("#comfy-file-input", {
        name: c.name,
        mimeType: c.mime,
        buffer: data,
      });
    } else {
      await page.evaluate(
        ({ b64, name, mime }) => {
          const bin = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
          const transfer = new DataTransfer();
          transfer.items.add(new File([bin], name, { type: mime }));
          const canvas = document.getElementById("graph-canvas");
          const box = canvas.getBoundingClientRect();
          const init = {
            bubbles: true,
            cancelable: true,
            dataTransfer: transfer,
            clientX: box.x + box.width / 2,
            clientY: box.y + box.height / 2,
          };
          for (const type of ["dragenter", "dragover", "drop"]) {
            canvas.dispatchEvent(new DragEvent(type, init));
          }
        },
        { b64: data.toString("base64"), name: c.name, mime: c.mime },
      );
    }
    // Done when nodes appear (then one more frame for the load to finish) or a toast says why
    // not; a reader that fails silently leaves the graph empty until the wait runs out.
    let settled = true;
    try {
      await page.waitForFunction(
        () =>
          window.comfyAPI.app.app.graph.nodes.length > 0 ||
          document.querySelector(".p-toast-message") !== null,
        null,
        { timeout: config.wait_ms, polling: 50 },
      );
      await page.waitForTimeout(200);
    } catch {
      settled = false;
    }
    const state = await page.evaluate(() => ({
      graph: window.comfyAPI.app.app.graph.serialize(),
      toasts: [...document.querySelectorAll(".p-toast-message")].map((t) => t.innerText),
    }));
    if (config.screenshot_dir && state.graph.nodes.length === 0) {
      await page.screenshot({ path: `${config.screenshot_dir}/${c.id}.png` });
    }
    const ms = Date.now() - started;
    result.cases.push({ id: c.id, settled, ms, ...state, console: consoleLines.slice(-30) });
  }
} finally {
  await browser.close();
  await writeFile(resultPath, JSON.stringify(result));
}
