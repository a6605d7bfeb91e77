// Helpers shared by the browser tests of the gateway's dashboard (dashboard.mjs) and the agent's
// page (agent.mjs): waiting on conditions, reading the page, TCP clients (127.0.0.1 only), and
// running one scenario in Debian's headless Chromium.

import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

// ---------------------------------------------------------------------------------------------
// Waiting and reading the page

/** Polls `probe` until it returns a truthy value; throws with the last value seen on timeout. */
export async function waitFor(what, probe, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  let seen;
  for (;;) {
    try {
      seen = await probe();
      if (seen) return seen;
    } catch (e) {
      seen = `error: ${e.message}`;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last seen: ${JSON.stringify(seen)})`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

export const tid = (id) => `[data-testid="${id}"]`;

/** The raw number behind a counter (its data-value attribute). */
export async function counter(page, id) {
  const v = await page.getAttribute(tid(id), 'data-value');
  return v == null ? NaN : Number(v);
}

export const lightOf = (page) => page.getAttribute(tid('status-light'), 'data-light');

export async function waitLight(page, colour, timeoutMs = 10_000) {
  try {
    await waitFor(`the status light to be ${colour}`, async () => (await lightOf(page)) === colour, timeoutMs);
  } catch (e) {
    throw new Error(`${e.message}; it is ${await lightOf(page)}: ${await page.textContent(tid('status-label'))}`);
  }
}

/** Clicks a control button and confirms in the in-page modal. */
export async function clickAndConfirm(page, action) {
  await page.click(tid(`btn-${action}`));
  const dialog = page.locator(tid('confirm-dialog'));
  await dialog.waitFor({ state: 'visible', timeout: 5000 });
  const title = await page.textContent(tid('confirm-title'));
  if (!title.toLowerCase().includes(action)) throw new Error(`confirm dialog for ${action} says ${JSON.stringify(title)}`);
  await page.click(tid('confirm-ok'));
  await dialog.waitFor({ state: 'hidden', timeout: 5000 });
}

// ---------------------------------------------------------------------------------------------
// TCP clients (127.0.0.1 only)

/** A client of the echo service behind the gateway; round trips are serialized. */
export class EchoClient {
  static connect(port) {
    return new Promise((resolve, reject) => {
      const sock = net.connect({ host: '127.0.0.1', port });
      sock.once('connect', () => resolve(new EchoClient(sock)));
      sock.once('error', reject);
    });
  }

  /** Connects and proves one round trip, retrying until `timeoutMs` (a listener may be opening). */
  static async connectWorking(port, timeoutMs = 10_000) {
    return waitFor(`a working connection to 127.0.0.1:${port}`, async () => {
      const c = await EchoClient.connect(port);
      try {
        await c.roundTrip(Buffer.from('hello\n'), 3000);
        return c;
      } catch (e) {
        c.sock.destroy();
        throw e;
      }
    }, timeoutMs);
  }

  constructor(sock) {
    this.sock = sock;
    this.sock.setNoDelay(true);
    this.chunks = [];
    this.received = 0;
    this.closed = false;
    this.wake = () => {};
    this.chain = Promise.resolve();
    sock.on('data', (d) => { this.chunks.push(d); this.received += d.length; this.wake(); });
    sock.on('close', () => { this.closed = true; this.wake(); });
    sock.on('error', (e) => { this.error = e; });
  }

  get localAddr() { return `127.0.0.1:${this.sock.localPort}`; }

  /** Sends `data` and waits for exactly it to come back. */
  roundTrip(data, timeoutMs = 10_000) {
    const run = async () => {
      this.chunks = [];
      this.received = 0;
      this.sock.write(data);
      const deadline = Date.now() + timeoutMs;
      while (this.received < data.length) {
        if (this.closed) throw new Error(`${this.localAddr}: closed after ${this.received} of ${data.length} echoed bytes (${this.error?.message ?? 'no error'})`);
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`${this.localAddr}: ${this.received} of ${data.length} bytes echoed within ${timeoutMs} ms`);
        await new Promise((r) => { this.wake = r; setTimeout(r, Math.min(left, 200)); });
      }
      if (!Buffer.concat(this.chunks).equals(data)) throw new Error(`${this.localAddr}: the echo differs from what was sent`);
    };
    const done = this.chain.then(run);
    this.chain = done.catch(() => {});
    return done;
  }

  /** Half-closes and waits for the echo server to close too. */
  async close() {
    await this.chain;
    this.sock.end();
    await waitFor(`${this.localAddr} to close`, () => this.closed, 5000);
  }
}

/** 'accepted', 'refused' or another error code for one TCP connect. */
export function tryConnect(port, timeoutMs = 2000) {
  return new Promise((resolve) => {
    const sock = net.connect({ host: '127.0.0.1', port });
    const timer = setTimeout(() => { sock.destroy(); resolve('timeout'); }, timeoutMs);
    sock.once('connect', () => { clearTimeout(timer); sock.destroy(); resolve('accepted'); });
    sock.once('error', (e) => { clearTimeout(timer); resolve(e.code === 'ECONNREFUSED' ? 'refused' : e.code); });
  });
}

export function payload(len, seed) {
  const b = Buffer.alloc(len);
  let x = seed | 1;
  for (let i = 0; i < len; i++) { x ^= x << 13; x ^= x >>> 17; x ^= x << 5; b[i] = x & 0xff; }
  return b;
}

// ---------------------------------------------------------------------------------------------
// Running a scenario

/**
 * Opens `url` in headless Chromium, runs `scenario(page)`, fails on any JavaScript error in the
 * page, prints "PASS" or why it failed (prefixed with `name`), and exits accordingly.
 */
export async function runInBrowser(name, url, scenario) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'sallyport-pw-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1440, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const pageErrors = [];
  let failed = false;
  try {
    const page = await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(e.message));
    page.setDefaultTimeout(10_000);
    await page.goto(url);
    await scenario(page);
    if (pageErrors.length) throw new Error(`JavaScript errors in the page: ${pageErrors.join('; ')}`);
    console.log('PASS');
  } catch (e) {
    failed = true;
    console.error(`[${name}] FAIL: ${e.stack || e}`);
    if (pageErrors.length) console.error(`[${name}] JavaScript errors in the page: ${pageErrors.join('; ')}`);
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
  process.exit(failed ? 1 : 0);
}
