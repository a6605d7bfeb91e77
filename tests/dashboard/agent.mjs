// Drives the agent's page in Debian's headless Chromium (playwright-core), as an operator on the
// agent host would, and checks what it shows against real TCP traffic made here with node's
// `net` module. Started by tests/agent_page.rs, which owns the gateway, the agent and the
// backends, and has already written the next agent.toml (one more listener) for the reload.
//
//   node agent.mjs main    ADMIN_URL UP_GATEWAY DOWN_GATEWAY ECHO_PORT DEAD_PORT DEAD_BACKEND ADDED_PORT TOKEN SCREENSHOT.png ECHO_BACKEND PAIR_BACKEND_PORT
//   node agent.mjs hostile ADMIN_URL GATEWAY HOSTILE_TEXT
//
// "PASS" on stdout ends a successful run. Any failed check throws, prints why and exits
// non-zero. Every wait is for a condition, with a deadline.

import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { waitFor, tid, waitLight, clickAndConfirm, EchoClient, tryConnect, runInBrowser } from './lib.mjs';

const [mode, adminUrl, ...rest] = process.argv.slice(2);
const step = (msg) => console.error(`[agent.mjs] ${msg}`);

const gatewayCard = (name) => `${tid('gateway')}[data-gateway="${name}"]`;
const listenerRow = (name) => `${tid('table-listeners')} tr[data-listener="${name}"]`;
/** The cell of a listener's row for one gateway. */
const stateCell = (listener, gateway) => `${listenerRow(listener)} td[data-gateway="${gateway}"]`;

async function cellValue(page, listener, fieldName) {
  const v = await page.getAttribute(`${listenerRow(listener)} td[data-field="${fieldName}"]`, 'data-value');
  return v == null ? NaN : Number(v);
}

async function waitState(page, listener, gateway, state, timeoutMs = 10_000) {
  await waitFor(`listener ${listener} to be ${state} on ${gateway}`,
    async () => (await page.getAttribute(stateCell(listener, gateway), 'data-state')) === state, timeoutMs);
}

const backendRow = (listener, backend) => `${tid('table-backends')} tr[data-listener="${listener}"][data-backend="${backend}"]`;
const backendHealth = (page, listener, backend) => page.getAttribute(`${backendRow(listener, backend)} td[data-field="health"]`, 'data-state');

async function backendValue(page, listener, backend, fieldName) {
  const v = await page.getAttribute(`${backendRow(listener, backend)} td[data-field="${fieldName}"]`, 'data-value');
  return v == null ? NaN : Number(v);
}

/** The backends table: listener "pair" has the echo server and a second backend served here by
 *  node: it goes up, then is killed and shown down with its error, while the echo server stays
 *  up; a single backend is "unchecked", with its clients now and its connect failures. */
async function backendsScenario(page, { echoPort, echoBackend, deadBackend, pairPort }) {
  const pairBackend = `127.0.0.1:${pairPort}`;
  const sockets = new Set();
  const server = net.createServer((s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
    s.on('error', () => {});
    s.pipe(s);
  });
  await new Promise((resolve, reject) => server.once('error', reject).listen(Number(pairPort), '127.0.0.1', resolve));
  await waitFor('the second backend of pair up', async () => (await backendHealth(page, 'pair', pairBackend)) === 'up');
  if ((await backendHealth(page, 'pair', echoBackend)) !== 'up') throw new Error('the echo backend of pair is not up');
  server.close();
  for (const s of sockets) s.destroy();
  await waitFor('the killed backend shown down', async () => (await backendHealth(page, 'pair', pairBackend)) === 'down');
  const error = await page.textContent(`${backendRow('pair', pairBackend)} ${tid('backend-error')}`);
  if (!/refused/i.test(error)) throw new Error(`the killed backend's error: ${JSON.stringify(error)}`);
  if ((await backendHealth(page, 'pair', echoBackend)) !== 'up') throw new Error('the echo backend of pair went down too');
  const count = await page.textContent(tid('backends-count'));
  if (!/1 out of rotation/.test(count)) throw new Error(`backends count: ${JSON.stringify(count)}`);
  step('backends: the killed backend of pair shown down with its error, the other up');

  if ((await backendHealth(page, 'echo', echoBackend)) !== 'unchecked') throw new Error('the single echo backend is not "unchecked"');
  const c = await EchoClient.connectWorking(Number(echoPort));
  await c.roundTrip(Buffer.from('held open\n'));
  await waitFor('one active client on the echo backend', async () => (await backendValue(page, 'echo', echoBackend, 'active')) === 1);
  await c.close();
  await waitFor('no active client on the echo backend', async () => (await backendValue(page, 'echo', echoBackend, 'active')) === 0);
  if (!((await backendValue(page, 'dead', deadBackend, 'connect_failures')) >= 1)) throw new Error('the dead backend shows no connect failure');
  step('backends: a single backend unchecked, its active clients and connect failures shown');
}

/** Two gateways, one down (amber) -> each card's light and reason -> the listener table per
 *  gateway -> traffic and a dead backend move the row's counters -> the backends table (one
 *  killed) -> Reload with the token adds a listener -> screenshot. */
async function mainScenario(page, [up, down, echoPort, deadPort, deadBackend, addedPort, token, screenshot, echoBackend, pairPort]) {
  await waitLight(page, 'amber', 15_000);
  const label = await page.textContent(tid('status-label'));
  if (!/1 of 2 gateways/i.test(label)) throw new Error(`amber label: ${JSON.stringify(label)}`);
  await waitFor('the up gateway green', async () => (await page.getAttribute(`${gatewayCard(up)} ${tid('gateway-light')}`, 'data-light')) === 'green');
  await waitFor('the down gateway red', async () => (await page.getAttribute(`${gatewayCard(down)} ${tid('gateway-light')}`, 'data-light')) === 'red');
  const why = await page.textContent(`${gatewayCard(down)} ${tid('gateway-error')}`);
  if (!/refused/i.test(why)) throw new Error(`the down gateway's reason: ${JSON.stringify(why)}`);
  const rtt = await page.textContent(`${gatewayCard(up)} ${tid('gateway-rtt')}`);
  if (!/ms/.test(rtt)) throw new Error(`round trip shown as ${JSON.stringify(rtt)}`);
  step('amber: one gateway green with a round trip, the other red with its reason');

  await waitState(page, 'echo', up, 'open');
  await waitState(page, 'echo', down, 'down');
  const addrs = await page.textContent(stateCell('echo', up));
  if (!addrs.includes(`127.0.0.1:${echoPort}`)) throw new Error(`echo on ${up}: ${JSON.stringify(addrs)}`);
  step('listener table: open with its address on one gateway, down on the other');

  const before = await cellValue(page, 'echo', 'served');
  for (let i = 0; i < 2; i++) {
    const c = await EchoClient.connectWorking(Number(echoPort));
    await c.roundTrip(Buffer.from(`client ${i}\n`));
    await c.close();
  }
  await waitFor('two more clients served', async () => (await cellValue(page, 'echo', 'served')) === before + 2);
  // The dead backend: the gateway accepts, the agent cannot reach the backend, the client closes.
  const outcome = await tryConnect(Number(deadPort));
  if (outcome !== 'accepted') throw new Error(`connect to the dead listener: ${outcome}`);
  await waitFor('a backend failure counted', async () => (await cellValue(page, 'dead', 'backend_failures')) >= 1);
  const failure = await page.textContent(`${listenerRow('dead')} ${tid('listener-failure')}`);
  if (!failure.includes(deadBackend)) throw new Error(`failure text: ${JSON.stringify(failure)}`);
  step('served and backend-failure counters moved; the failure names the backend');

  await backendsScenario(page, { echoPort, echoBackend, deadBackend, pairPort });

  // Reload through the button, the confirmation and the token dialog.
  const generation = Number(await page.getAttribute(tid('config-generation'), 'data-value'));
  await clickAndConfirm(page, 'reload');
  const dialog = page.locator(tid('token-dialog'));
  await dialog.waitFor({ state: 'visible', timeout: 5000 });
  await page.fill(tid('token-input'), token);
  await page.click(tid('token-ok'));
  await page.locator('.toast.ok', { hasText: `generation ${generation + 1}` }).waitFor({ timeout: 10_000 });
  await waitState(page, 'added', up, 'open');
  const c = await EchoClient.connectWorking(Number(addedPort));
  await c.roundTrip(Buffer.from('through the reloaded listener\n'));
  await c.close();
  await waitFor('the generation shown', async () =>
    Number(await page.getAttribute(tid('config-generation'), 'data-value')) === generation + 1);
  step('reload: token asked, new generation, the added listener open and serving');

  await page.evaluate(() => document.querySelectorAll('.toast').forEach((t) => t.remove()));
  await page.mouse.move(0, 0);
  fs.mkdirSync(path.dirname(screenshot), { recursive: true });
  await page.screenshot({ path: screenshot, fullPage: true });
  step(`screenshot saved to ${screenshot}`);
}

/** A hostile gateway's strings (a listener error, a listener it invented) are text, not markup. */
async function hostileScenario(page, [gateway, text]) {
  await waitState(page, 'echo', gateway, 'failed', 15_000);
  const shown = await page.textContent(stateCell('echo', gateway));
  if (!shown.includes(text)) throw new Error(`the gateway's text is not shown as text: ${JSON.stringify(shown)}`);
  const injected = await page.evaluate(() => ({
    owned: window.__owned === 1,
    images: document.querySelectorAll('img').length,
    bold: document.querySelectorAll('main b.injected, main script').length,
  }));
  if (injected.owned || injected.images || injected.bold) throw new Error(`markup from the gateway ran: ${JSON.stringify(injected)}`);
  const rows = await page.locator(`${tid('table-listeners')} tbody tr[data-listener]`).count();
  if (rows !== 1) throw new Error(`${rows} listener rows: a listener the agent does not have was shown`);
  step('hostile text shown literally; nothing injected; the invented listener ignored');
}

await runInBrowser('agent.mjs', adminUrl, async (page) => {
  if (mode === 'main') await mainScenario(page, rest);
  else if (mode === 'hostile') await hostileScenario(page, rest);
  else throw new Error(`unknown mode ${mode}`);
});
