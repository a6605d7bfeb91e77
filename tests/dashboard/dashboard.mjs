// Drives the gateway's dashboard in Debian's headless Chromium (playwright-core), as an operator
// would, and checks what it shows against real TCP traffic made here with node's `net` module.
// Started by tests/dashboard.rs, which owns the gateway, the agent and the echo backend.
//
//   node dashboard.mjs main  ADMIN_URL PUBLIC_PORT SCREENSHOT.png
//   node dashboard.mjs token ADMIN_URL TOKEN
//   node dashboard.mjs udp   ADMIN_URL UDP_PORT     (the gateway's max_datagram is 1200)
//
// Lines on stdout are for the Rust side: "READY-FOR-AGENT" asks it to start the agent, "PASS"
// ends a successful run. Any failed check throws, prints why and exits non-zero. Every wait is
// for a condition, with a deadline; nothing sleeps a fixed time to let things happen.

import dgram from 'node:dgram';
import fs from 'node:fs';
import path from 'node:path';
import {
  waitFor, tid, counter, waitLight, clickAndConfirm, EchoClient, tryConnect, payload, runInBrowser,
} from './lib.mjs';

const [mode, adminUrl, ...rest] = process.argv.slice(2);
const step = (msg) => console.error(`[dashboard.mjs] ${msg}`);

// ---------------------------------------------------------------------------------------------
// The scenarios

/** No agent (red) -> agent (green) -> traffic moves the counters -> Pause (amber, new clients
 *  refused, established ones echo) -> Resume (green, new clients work) -> screenshot -> Stop. */
async function mainScenario(page, publicPort, screenshot) {
  await waitLight(page, 'red');
  const label = await page.textContent(tid('status-label'));
  if (!/no agent/i.test(label)) throw new Error(`red light label: ${JSON.stringify(label)}`);
  step('red light with no agent');
  console.log('READY-FOR-AGENT');

  await waitLight(page, 'green', 20_000);
  await page.locator(`${tid('table-agents')} tr[data-agent="test-agent"]`).waitFor({ timeout: 10_000 });
  await page.locator(`${tid('table-listeners')} tr[data-listener="echo"][data-state="listening"]`).waitFor({ timeout: 10_000 });
  step('green light, agent and listener shown');
  const names = page.locator(`${tid('table-listeners')} tr[data-listener="web"] ${tid('hostnames')}`);
  await names.waitFor({ timeout: 10_000 });
  const shown = await names.textContent();
  if (shown !== 'www.example.test, *.example.org') throw new Error(`host names shown: ${shown}`);
  step('a shared-port listener shows its host names');

  // Traffic: 1 MiB through one connection; every byte counter must grow by at least that.
  const before = {};
  for (const k of ['client-read', 'client-written', 'agent-read', 'agent-written']) before[k] = await counter(page, `counter-${k}`);
  const a = await EchoClient.connectWorking(publicPort);
  const big = payload(1024 * 1024, 7);
  for (let off = 0; off < big.length; off += 64 * 1024) await a.roundTrip(big.subarray(off, off + 64 * 1024));
  const sent = big.length;
  const now = {};
  try {
    await waitFor('every byte counter to grow by the 1 MiB sent', async () => {
      for (const k of Object.keys(before)) now[k] = await counter(page, `counter-${k}`);
      return Object.keys(before).every((k) => now[k] - before[k] >= sent);
    });
  } catch (e) {
    throw new Error(`${e.message}: before ${JSON.stringify(before)}, now ${JSON.stringify(now)}`);
  }
  await waitFor('one active connection', async () => (await counter(page, 'counter-active')) >= 1);
  await page.locator(`${tid('table-connections')} tr[data-client="${a.localAddr}"]`).waitFor({ timeout: 10_000 });
  await waitFor('a non-zero client read rate', async () => (await counter(page, 'rate-client-read')) > 0);
  step(`counters moved by at least ${sent} bytes; connection ${a.localAddr} listed`);

  // Keep traffic flowing (paced: 16 to 128 KiB every 100 ms, in waves) for the charts and
  // across the pause.
  let pumping = true;
  let pumpError = null;
  const pump = (async () => {
    for (let seed = 1; pumping; seed++) {
      await a.roundTrip(payload((16 + 112 * Math.abs(Math.sin(seed / 25))) * 1024 | 0, seed));
      await new Promise((r) => setTimeout(r, 100));
    }
  })().catch((e) => { pumpError = e; });
  const b = await EchoClient.connectWorking(publicPort);

  // Pause through the button and the modal.
  await clickAndConfirm(page, 'pause');
  await waitLight(page, 'amber');
  if (!/paused/i.test(await page.textContent(tid('status-label')))) throw new Error('amber light without "Paused"');
  await page.locator(`${tid('table-listeners')} tr[data-listener="echo"][data-state="paused"]`).waitFor({ timeout: 5000 });
  await waitFor('a new connection to be refused while paused', async () => (await tryConnect(publicPort)) === 'refused', 5000);
  await a.roundTrip(Buffer.from('still echoing while paused\n'));
  await b.roundTrip(Buffer.from('b too\n'));
  if (pumpError) throw pumpError;
  step('paused: amber, new connection refused, established connections echo');

  await clickAndConfirm(page, 'resume');
  await waitLight(page, 'green');
  const c = await EchoClient.connectWorking(publicPort, 5000);
  await c.roundTrip(Buffer.from('new connection after resume\n'));
  step('resumed: green, a new connection works');

  // A screenshot with 20 s of traffic on the 1-minute charts and three connections listed.
  await page.click(tid('window-60'));
  if ((await page.getAttribute(tid('window-60'), 'aria-pressed')) !== 'true') throw new Error('the 1 min button is not pressed');
  await waitFor('20 s of traffic in the chart history', () => page.evaluate(async () => {
    const s = await (await fetch('/api/stats')).json();
    return s.history.client_read.filter((v) => v > 0).length >= 20;
  }), 40_000);
  await waitFor('three connections listed', async () =>
    (await page.locator(`${tid('table-connections')} tbody tr[data-client]`).count()) >= 3);
  await waitFor('the charts to have drawn the history', async () => Number(await page.getAttribute(tid('chart-rates'), 'data-points')) >= 20);
  // Toasts of the actions above would hide part of the picture (they fade by themselves later).
  await page.evaluate(() => document.querySelectorAll('.toast').forEach((t) => t.remove()));
  await page.mouse.move(0, 0);
  fs.mkdirSync(path.dirname(screenshot), { recursive: true });
  await page.screenshot({ path: screenshot, fullPage: true });
  step(`screenshot saved to ${screenshot}`);

  pumping = false;
  await pump;
  if (pumpError) throw pumpError;
  await Promise.all([a.close(), b.close(), c.close()]);
  await waitFor('no active connection', async () => (await counter(page, 'counter-active')) === 0);

  // Stop: the gateway exits; the page says the connection is lost.
  await clickAndConfirm(page, 'stop');
  await page.locator(tid('connection-lost')).waitFor({ state: 'visible', timeout: 15_000 });
  await waitLight(page, 'unknown');
  step('stopped: "connection to gateway lost" shown');
}

/** A gateway with `[admin] token`: the token dialog appears, a wrong token is refused, the right
 *  one is kept for the tab and reused; cancelling leaves the gateway as it was. */
async function tokenScenario(page, token) {
  await waitLight(page, 'red');
  const dialog = page.locator(tid('token-dialog'));

  await clickAndConfirm(page, 'pause');
  await dialog.waitFor({ state: 'visible', timeout: 5000 });
  await page.fill(tid('token-input'), 'wrong-token-0123456789');
  await page.click(tid('token-ok'));
  await waitFor('the token dialog to say the token was refused', async () =>
    (await dialog.isVisible()) && /refused/i.test(await page.textContent(tid('token-message'))), 5000);
  step('a wrong token is refused and asked again');
  await page.fill(tid('token-input'), token);
  await page.click(tid('token-ok'));
  await waitLight(page, 'amber');
  const kept = await page.evaluate(() => sessionStorage.getItem('sallyport-admin-token'));
  if (kept !== token) throw new Error(`sessionStorage holds ${JSON.stringify(kept)}`);
  step('paused after entering the token; token kept in sessionStorage');

  // The kept token is sent again without asking.
  await clickAndConfirm(page, 'resume');
  await waitLight(page, 'red'); // running again, still no agent
  if (await dialog.isVisible()) throw new Error('the token dialog opened although a token was kept');
  step('resumed with the kept token');

  // Cancelling the token dialog leaves the gateway running and says so.
  await page.evaluate(() => sessionStorage.clear());
  await clickAndConfirm(page, 'pause');
  await dialog.waitFor({ state: 'visible', timeout: 5000 });
  await page.click(tid('token-cancel'));
  await page.locator('.toast.error', { hasText: 'cancelled' }).waitFor({ timeout: 5000 });
  const state = await page.evaluate(async () => (await (await fetch('/api/status')).json()).state);
  if (state !== 'running') throw new Error(`state after a cancelled token dialog: ${state}`);
  step('cancel leaves the gateway running, with an error toast');
}

/** Sends `data` from `socket` to 127.0.0.1:`port`; the first datagram back, or null after `ms`. */
function askUdp(socket, port, data, ms = 500) {
  return new Promise((resolve, reject) => {
    const done = (v) => { clearTimeout(timer); socket.off('message', onMessage); resolve(v); };
    const onMessage = (msg) => done(msg);
    const timer = setTimeout(() => done(null), ms);
    socket.on('message', onMessage);
    socket.send(data, port, '127.0.0.1', (e) => { if (e) { clearTimeout(timer); reject(e); } });
  });
}

/** A UDP listener: the panel appears with its row at 0 flows; a real flow (node's dgram to the
 *  echo backend through the gateway) and an oversize datagram move flows, datagrams each way
 *  and the `oversize` drop on the page. */
async function udpScenario(page, udpPort) {
  const row = page.locator(`${tid('table-udp')} tr[data-listener="echo"]`);
  await row.waitFor({ timeout: 20_000 });
  const value = async (sel) => Number(await row.locator(sel).getAttribute('data-value'));
  if (!(await page.isVisible(tid('panel-udp')))) throw new Error('the UDP panel is hidden');
  if ((await value('[data-udp="flows"]')) !== 0) throw new Error('flows before any datagram');
  step('UDP panel shown with the listener at 0 flows');

  const socket = dgram.createSocket('udp4');
  await new Promise((r) => socket.bind(0, '127.0.0.1', r));
  try {
    await waitFor('an answer through the UDP listener', () => askUdp(socket, udpPort, 'ready?'), 10_000);
    for (let i = 0; i < 4; i++) {
      const answer = await askUdp(socket, udpPort, `datagram ${i}`, 2000);
      if (String(answer) !== `echo:datagram ${i}`) throw new Error(`answer ${i}: ${answer}`);
    }
    // Over max_datagram (1200): dropped at the gateway, never answered.
    if (await askUdp(socket, udpPort, Buffer.alloc(1300, 7))) throw new Error('an oversize datagram was answered');
    const want = { '[data-udp="flows"]': 1, '[data-udp="from-clients"]': 5, '[data-udp="to-clients"]': 5, '[data-reason="oversize"]': 1 };
    const seen = {};
    await waitFor(`the UDP row to show ${JSON.stringify(want)}`, async () => {
      for (const sel of Object.keys(want)) seen[sel] = await value(sel);
      return Object.entries(want).every(([sel, n]) => seen[sel] >= n) && seen['[data-udp="flows"]'] === 1;
    });
    const text = await row.textContent();
    if (!/oversize 1/.test(text)) throw new Error(`drops shown as ${JSON.stringify(text)}`);
    step(`UDP row shows ${JSON.stringify(seen)}`);
  } finally {
    socket.close();
  }
}

// ---------------------------------------------------------------------------------------------
await runInBrowser('dashboard.mjs', adminUrl, async (page) => {
  if (mode === 'main') await mainScenario(page, Number(rest[0]), rest[1]);
  else if (mode === 'token') await tokenScenario(page, rest[0]);
  else if (mode === 'udp') await udpScenario(page, Number(rest[0]));
  else throw new Error(`unknown mode ${mode}`);
});
