// Sallyport agent page: polls the agent's admin API once a second and shows, for the operator on
// the agent host, each gateway (a light, why it is down, round trip, TLS, warm pool), each
// listener on each gateway (open, failed and why, down), each listener's backends (health, clients,
// failures) and the outbound proxy; Reload re-reads agent.toml after an in-page confirmation. Helpers are in common.js,
// loaded first. Every string from the API is set as text: a gateway's error message is shown,
// never parsed as HTML.
'use strict';

const ACTIONS = {
  reload: {
    title: 'Reload agent.toml?',
    text: 'Re-reads agent.toml and pushes it to every gateway: only listeners that changed restart. A file with an error is refused and the running configuration kept.',
    ok: 'Reload',
    done: (body) => `Reload: done, configuration generation ${body.generation}.`,
  },
};

const LIGHT_WORDS = { green: 'connected', amber: 'connected, with listener problems', red: 'not connected' };

function renderHeader(status, stats) {
  document.title = `Sallyport agent · ${status.site} / ${status.agent}`;
  byTestId('agent-name').textContent = `${status.site} / ${status.agent}`;
  byTestId('version').textContent = `version ${status.version}`;
  byTestId('uptime').textContent = fmtDuration(stats.uptime_seconds ?? status.uptime_seconds);
  const gen = byTestId('config-generation');
  gen.dataset.value = String(status.config.generation);
  gen.textContent = `generation ${status.config.generation}`;
  byTestId('config-digest').textContent = status.config.digest.slice(0, 12);
  byTestId('config-digest').title = `digest ${status.config.digest}`;
  byTestId('updated').textContent = new Date().toLocaleTimeString('en-GB', { hour12: false });
}

function renderLight(status) {
  const total = status.gateways.length;
  const up = status.gateways.filter((g) => g.connected).length;
  const failed = status.gateways.flatMap((g) => g.listeners.filter((l) => l.state === 'failed')).length;
  let label, detail;
  if (total === 0) {
    label = 'No gateway configured';
    detail = 'agent.toml lists no gateway';
  } else if (up === 0) {
    label = `No gateway connected (0 of ${total})`;
    detail = 'the public ports of this site are closed on every gateway this agent serves';
  } else if (up < total) {
    label = `${up} of ${total} gateways connected`;
    detail = 'clients still get through the connected ones; see the red card for why the others are down';
  } else if (failed) {
    label = `All ${total} gateway(s) connected, ${failed} listener failure(s)`;
    detail = 'a gateway could not open a listener: see the listener table';
  } else {
    label = `All ${total} gateway(s) connected`;
    detail = `${status.listeners.length} listener(s) open on each`;
  }
  setLight(status.light, label, detail);
  byTestId('btn-reload').disabled = false;
}

function renderCounters(stats) {
  for (const e of $$('.counters [data-field]')) {
    const v = Number(field(stats.totals, e.dataset.field)) || 0;
    e.dataset.value = String(v);
    e.textContent = FORMATS[e.dataset.format](v);
  }
}

/** "TLS 1.3, verified as dmz-gw1.example" or "PLAINTEXT". */
function tlsText(g) {
  if (!g.tls) return 'PLAINTEXT';
  return `${g.tls.version}, verified as ${g.tls.server_name}${g.data_tls ? '' : '; data connections in plaintext'}`;
}

function gatewayCard(g) {
  const rows = [];
  const row = (k, v, testId) => rows.push(el('dt', {}, k), el('dd', testId ? { 'data-testid': testId } : {}, v));
  if (g.connected) {
    row('address', g.addr);
    row('connected', `${fmtTime(g.connected_since)} (${fmtDuration(g.connected_seconds)})`);
    row('TLS', tlsText(g));
    row('round trip', g.rtt_ms == null ? '–' : `${g.rtt_ms.toFixed(g.rtt_ms < 10 ? 2 : 0)} ms`, 'gateway-rtt');
    row('warm pool', `${g.pool.idle} of ${g.pool.size} idle`);
  } else {
    row('reconnect attempts', fmtCount(g.reconnect_attempts));
    row('round trip', '–', 'gateway-rtt');
  }
  const card = el('div', { class: 'gw-card', 'data-testid': 'gateway', 'data-gateway': g.gateway, 'data-light': g.light },
    el('span', { class: 'light', 'data-testid': 'gateway-light', 'data-light': g.light, role: 'img', 'aria-label': `gateway ${g.light}` }),
    el('div', {},
      el('b', { class: 'mono' }, g.gateway), ' ', el('small', {}, LIGHT_WORDS[g.light] || g.light),
      el('dl', {}, ...rows),
      el('div', { class: 'error', 'data-testid': 'gateway-error' }, g.last_error ?? '')));
  return card;
}

function renderGateways(status) {
  byTestId('gateways-count').textContent = `${status.gateways.filter((g) => g.connected).length} of ${status.gateways.length} connected`;
  byTestId('gateways').replaceChildren(...status.gateways.map(gatewayCard));
}

/** A listener's state on one gateway: a badge, then where it listens or why it does not. */
function stateCell(gateway, l) {
  const state = l ? l.state : 'down';
  const cell = el('td', { 'data-gateway': gateway, 'data-state': state },
    el('span', { class: `badge st-${state}` }, state));
  if (l && l.addrs && l.addrs.length) cell.append(el('span', { class: 'mono addr' }, l.addrs.join(', ')));
  if (l && l.error) cell.append(el('div', { class: 'error' }, l.error));
  return cell;
}

const countCell = (name, value) => el('td', { class: 'n', 'data-field': name, 'data-value': String(value ?? 0) }, fmtCount(value));

/** One row per configured listener; one state column per gateway. */
function renderListeners(status, stats) {
  const table = byTestId('table-listeners');
  const gateways = status.gateways.map((g) => g.gateway);
  $('thead tr', table).replaceChildren(
    el('th', {}, 'Listener'), el('th', {}, 'Public'), el('th', {}, 'Backend'),
    ...gateways.map((g) => el('th', { class: 'mono' }, `on ${g}`)),
    el('th', { class: 'n' }, 'Served'), el('th', { class: 'n' }, 'Active'),
    el('th', { class: 'n' }, 'Backend failures'), el('th', { class: 'n' }, 'From / to clients'),
    el('th', {}, 'Last failure'));
  const counters = new Map(stats.listeners.map((l) => [l.name, l]));
  const rows = status.listeners.map((l) => {
    const c = counters.get(l.name) || { bytes: {} };
    const failure = c.last_failure ? `${fmtTime(c.last_failure.at)}: ${c.last_failure.error}` : '';
    return el('tr', { 'data-listener': l.name },
      el('td', {}, el('b', {}, l.name)), el('td', { class: 'mono' }, l.public), el('td', { class: 'mono' }, l.backend),
      ...status.gateways.map((g) => stateCell(g.gateway, g.listeners.find((x) => x.name === l.name))),
      countCell('served', c.served), countCell('active', c.active), countCell('backend_failures', c.backend_failures),
      el('td', { class: 'n' }, `${fmtBytes(c.bytes.from_client)} / ${fmtBytes(c.bytes.to_client)}`),
      el('td', { class: 'error', 'data-testid': 'listener-failure' }, failure));
  });
  byTestId('listeners-count').textContent = `${status.listeners.length}`;
  fillTable('table-listeners', rows, 'No listener in agent.toml.');
}

const HEALTH_WORDS = {
  up: 'in rotation',
  down: 'out of rotation: its health check failed',
  ejected: 'out of rotation: connect failures in a row (passive ejection)',
  unchecked: 'one backend: not health-checked, never taken out of rotation',
};

/** A backend's health: a badge (data-state up, down, ejected or unchecked) and its meaning. */
function healthCell(state) {
  return el('td', { 'data-field': 'health', 'data-state': state, title: HEALTH_WORDS[state] || state },
    el('span', { class: `badge st-${state}` }, state));
}

/** One row per backend of every listener, from /api/status (listeners[].backends: several
 *  backends, their health from the agent's checks and ejections) or, for a listener with one
 *  backend, from its counters in /api/stats. The embedded application has no backend row. */
function renderBackends(status, stats) {
  const counters = new Map(stats.listeners.map((l) => [l.name, l]));
  const rows = status.listeners.flatMap((l) => {
    const row = (b, state, active, failures, ejections, error) => el('tr', { 'data-listener': l.name, 'data-backend': b },
      el('td', {}, el('b', {}, l.name)), el('td', {}, l.balance ?? '–'), el('td', { class: 'mono' }, b),
      healthCell(state), countCell('active', active), countCell('connect_failures', failures),
      countCell('ejections', ejections), el('td', { class: 'error', 'data-testid': 'backend-error' }, error ?? ''));
    if (l.backends && l.backends.length) {
      return l.backends.map((b) => row(b.backend, b.state ?? (b.up ? 'up' : 'down'),
        b.active, b.connect_failures, b.ejections, b.last_error));
    }
    if (l.backend === 'local') return [];
    const c = counters.get(l.name) || {};
    return [row(l.backend, 'unchecked', c.active, c.backend_failures, 0, c.last_failure?.error)];
  });
  const out = rows.filter((r) => ['down', 'ejected'].includes($('td[data-state]', r).dataset.state)).length;
  byTestId('backends-count').textContent = `${rows.length}${out ? `, ${out} out of rotation` : ''}`;
  fillTable('table-backends', rows, 'No backend: every listener is the embedded application\'s.');
}

const OUTCOME_LABELS = {
  connected: 'connected through a gateway',
  denied: 'denied by the gateway\'s [egress]',
  unreachable: 'destination unreachable',
  timeout: 'destination timed out',
  no_gateway: 'no gateway connected',
  failed: 'failed otherwise',
  refused: 'clients refused by [outbound] clients rules',
  auth_failed: 'wrong or missing proxy credentials',
  bad_request: 'malformed requests',
};

function renderOutbound(status, stats) {
  const o = status.outbound;
  byTestId('outbound-listen').textContent = o ? `${o.listen}${o.authentication ? ', authentication required' : ''}` : 'not configured';
  const requests = Object.entries(stats.outbound?.requests || {});
  const rows = o ? requests.map(([k, n]) => el('tr', { 'data-outcome': k, class: n > 0 ? 'nonzero' : '' },
    el('td', {}, OUTCOME_LABELS[k] || k.replace(/_/g, ' ')), num(fmtCount(n)))) : [];
  fillTable('table-outbound', rows, 'No [outbound] section in agent.toml.');
}

let pollTimer = null;
let polling = false;

async function poll() {
  clearTimeout(pollTimer);
  if (polling) return;
  polling = true;
  try {
    let status, stats;
    try {
      [status, stats] = await Promise.all([api('/api/status'), api('/api/stats')]);
    } catch (e) {
      setLost(`${e.message}.`);
      return;
    }
    setLost(null);
    renderHeader(status, stats);
    renderLight(status);
    renderCounters(stats);
    renderGateways(status);
    renderListeners(status, stats);
    renderBackends(status, stats);
    renderOutbound(status, stats);
  } finally {
    polling = false;
    pollTimer = setTimeout(poll, POLL_MS);
  }
}

wireActions(ACTIONS, poll);
poll();
