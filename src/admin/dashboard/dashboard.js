// Sallyport gateway dashboard: polls the admin API once a second and renders status, counters,
// charts and tables; sends control actions after an in-page confirmation (common.js, loaded
// first, has the helpers). Plain JS, no library: the page must work from the files compiled into
// the binary, with no network beyond the gateway.
'use strict';

/** Seconds shown by the charts (the API keeps 300 one-second points). */
const WINDOW_S = 300;
/** Rows shown in the connections table; the rest are counted. */
const MAX_CONNECTION_ROWS = 200;

// ---------------------------------------------------------------------------------------------
// Rendering

let last = null; // the last successful poll: { status, stats, connections, history }

function renderHeader(status, stats) {
  document.title = `Sallyport · ${location.host}`;
  byTestId('gateway-name').textContent = location.host;
  byTestId('version').textContent = `version ${status.version}`;
  byTestId('uptime').textContent = fmtDuration(stats.uptime_seconds ?? status.uptime_seconds);
  const c = status.control || {};
  byTestId('control').textContent =
    `${c.listen} (${c.tls ? (c.data_tls ? 'TLS 1.3, data TLS' : 'TLS 1.3') : 'PLAINTEXT'})`;
  byTestId('updated').textContent = new Date().toLocaleTimeString('en-GB', { hour12: false });
}

/** The big light: the API decides the colour; the label says why. */
function renderLight(status) {
  const agents = status.agents.length;
  const open = status.listeners.filter((l) => l.state === 'listening').length;
  let label, detail;
  if (status.state === 'stopping') {
    label = 'Stopping';
    detail = 'listeners closed, established connections draining';
  } else if (status.state === 'paused') {
    label = 'Paused';
    detail = `listeners closed, new clients refused; established connections and ${agents} agent(s) kept`;
  } else if (agents === 0) {
    label = 'No agent connected';
    detail = 'running, but no agent: public listeners stay closed until one connects';
  } else {
    label = 'Running';
    detail = `${agents} agent(s) connected · ${open} of ${status.listeners.length} listener(s) open`;
  }
  setLight(status.light, label, detail);
  // Buttons that cannot do anything in this state are disabled.
  const stopping = status.state === 'stopping';
  byTestId('btn-pause').disabled = status.state !== 'running';
  byTestId('btn-resume').disabled = status.state !== 'paused';
  byTestId('btn-restart').disabled = stopping;
  byTestId('btn-stop').disabled = stopping;
}

function renderCounters(stats) {
  const values = { ...stats.totals, agents: stats.agents };
  for (const e of $$('[data-field]')) {
    const v = Number(field(values, e.dataset.field)) || 0;
    e.dataset.value = String(v);
    e.textContent = FORMATS[e.dataset.format](v);
  }
}

/**
 * One row per listener of /api/status, with its counters from /api/stats. Counters without a
 * pushed listener (the agents' outbound proxy, counted as "(outbound)", or a listener an agent
 * no longer pushes) get a row too, so the rows add up to the totals.
 */
function renderListeners(status, stats) {
  const key = (l) => `${l.site}\u0000${l.name}`;
  const traffic = new Map(stats.listeners.map((l) => [key(l), l]));
  const pushed = new Set(status.listeners.map(key));
  const others = stats.listeners.filter((l) => !pushed.has(key(l))).map((l) => ({
    site: l.site, name: l.name, public: '–', addrs: [], state: l.name === '(outbound)' ? 'outbound' : 'not pushed',
  }));
  const rows = [...status.listeners, ...others].map((l) => {
    const t = traffic.get(key(l)) || { bytes: {}, rates: {} };
    const stateCell = el('td', {}, el('span', { class: `badge st-${l.state.replace(' ', '-')}` }, l.state));
    if (l.error) stateCell.append(el('div', { class: 'error' }, l.error));
    return el('tr', { 'data-site': l.site, 'data-listener': l.name, 'data-state': l.state },
      el('td', {}, l.site), el('td', {}, el('b', {}, l.name)), publicCell(l),
      el('td', { class: 'mono' }, (l.addrs || []).join(', ') || '–'), stateCell,
      num(fmtCount(t.active)), num(fmtCount(t.pending)), num(fmtCount(t.accepted)),
      num(fmtCount(t.rejected)), num(fmtCount(t.closed)),
      num(`${fmtBytes(t.bytes.client_read)} / ${fmtBytes(t.bytes.client_written)}`),
      num(`${fmtBytes(t.bytes.agent_read)} / ${fmtBytes(t.bytes.agent_written)}`),
      num(`${fmtRate(t.rates.client_read)} / ${fmtRate(t.rates.client_written)}`));
  });
  byTestId('listeners-count').textContent = `${status.listeners.length}`;
  fillTable('table-listeners', rows, 'No listeners: no agent has pushed its configuration yet.');
}

/**
 * The UDP listeners (those with `udp` in /api/stats): flows open now, datagrams each way, flows
 * the gateway's idle timer ended and drops by reason. The panel shows only while there is one.
 * Cells carry their raw number in `data-value` (and a `data-udp` or `data-reason` name).
 */
function renderUdp(stats) {
  const udp = stats.listeners.filter((l) => l.udp);
  byTestId('panel-udp').hidden = udp.length === 0;
  const cell = (name, v) => el('td', { class: 'n', 'data-udp': name, 'data-value': v }, fmtCount(v));
  const rows = udp.map((l) => {
    const u = l.udp;
    const drops = Object.entries(u.dropped || {}).map(([why, n]) =>
      el('span', { class: n > 0 ? 'drop hit' : 'drop', 'data-reason': why, 'data-value': n }, `${why} ${fmtCount(n)}`));
    return el('tr', { 'data-site': l.site, 'data-listener': l.name },
      el('td', {}, l.site), el('td', {}, el('b', {}, l.name)),
      cell('flows', u.flows), cell('from-clients', u.datagrams_from_clients),
      cell('to-clients', u.datagrams_to_clients), cell('idle-ended', u.flows_idle_ended || 0),
      el('td', { class: 'drops' }, ...drops));
  });
  fillTable('table-udp', rows, 'No UDP listener.');
}

/** The public port, and under it the host names a listener serves there when it shares it. */
function publicCell(l) {
  const cell = el('td', { class: 'mono' }, l.public);
  if (l.hostnames && l.hostnames.length) {
    cell.append(el('div', { class: 'hostnames', 'data-testid': 'hostnames' }, l.hostnames.join(', ')));
  }
  return cell;
}

function renderAgents(status) {
  const rows = status.agents.map((a) => el('tr', { 'data-agent': a.name },
    el('td', { class: 'mono' }, a.addr), el('td', {}, a.site), el('td', {}, el('b', {}, a.name)),
    el('td', {}, `${fmtTime(a.connected_since)} `, el('small', {}, `(${fmtDuration(a.connected_seconds)})`)),
    num(fmtCount(a.inflight))));
  byTestId('agents-count').textContent = `${status.agents.length}`;
  fillTable('table-agents', rows, 'No agent connected.');
}

const REFUSAL_LABELS = {
  client_rules: 'clients refused by client rules',
  banned: 'clients refused: address banned',
  rate_limited: 'clients over new_connections_per_ip',
  client_limits: 'clients over a connection limit',
  client_paused: 'clients refused while pausing',
  client_unclaimed: 'clients no agent claimed in time',
  client_agent_failed: 'clients the agent could not serve',
  data_token: 'data connections with a bad token',
  peer_denied: 'control connections denied by [peers]',
  bad_hello: 'control connections with a bad hello',
  tls_failed: 'failed TLS handshakes',
  handshake_limits: 'handshakes over a limit',
  egress_denied: 'outbound requests denied by [egress]',
  egress_unreachable: 'outbound destinations unreachable',
};

/** Non-zero refusal counters, then one line for the counters still at zero. */
function renderRefusals(stats) {
  const all = Object.entries(stats.refusals || {});
  const rows = all.filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1])
    .map(([k, n]) => el('tr', { 'data-reason': k }, el('td', {}, REFUSAL_LABELS[k] || k.replace(/_/g, ' ')), num(fmtCount(n))));
  const zero = all.length - rows.length;
  if (zero) {
    rows.push(el('tr', { class: 'more' }, el('td', { colspan: 2 },
      rows.length ? `${zero} other reason(s): 0` : `None: all ${zero} refusal counters are at 0.`)));
  }
  fillTable('table-refusals', rows, 'None.');
}

/** The bans in force, per site (at most 1000 per site come from the API). */
function renderBans(bans) {
  const total = bans.reduce((n, s) => n + s.total, 0);
  const rows = bans.flatMap((s) => s.bans.map((b) => el('tr', { 'data-ban': b.net },
    el('td', { class: 'mono' }, b.net), el('td', {}, s.site), el('td', {}, b.agent),
    num(b.expires_in_secs == null ? 'never' : `${b.expires_in_secs} s`), el('td', {}, b.reason))));
  document.querySelector('[data-testid="bans-count"]').textContent =
    `${total} in force, pushed by the agents, read-only`;
  fillTable('table-bans', rows, 'No bans.');
}

function renderConnections(connections) {
  const shown = connections.slice(0, MAX_CONNECTION_ROWS);
  const rows = shown.map((c) => el('tr', { 'data-client': c.client },
    el('td', { class: 'mono' }, c.client), el('td', {}, c.site), el('td', {}, c.listener),
    el('td', { class: 'mono' }, c.agent),
    num(fmtBytes(c.bytes.client_read)), num(fmtBytes(c.bytes.client_written)),
    num(fmtDuration(c.age_seconds))));
  if (connections.length > shown.length) {
    rows.push(el('tr', { class: 'more' }, el('td', { colspan: 7 }, `… and ${connections.length - shown.length} more`)));
  }
  byTestId('connections-count').textContent = `${connections.length}`;
  fillTable('table-connections', rows, 'No client connection is piping.');
}

// ---------------------------------------------------------------------------------------------
// Charts: drawn on <canvas>, one point per second, newest at the right edge.

/** A series colour, from the CSS variables of dashboard.css (one place for both). */
const colour = (name) => getComputedStyle(document.documentElement).getPropertyValue(`--${name}`).trim();

/** Samples kept here when the API has no history (an older gateway). */
const localHistory = { client_read: [], client_written: [], agent_read: [], agent_written: [], active: [] };

function chartHistory(stats) {
  const h = stats.history;
  if (h && Array.isArray(h.active)) return h;
  for (const k of Object.keys(localHistory)) {
    localHistory[k].push(k === 'active' ? stats.totals.active : stats.totals.rates[k]);
    if (localHistory[k].length > WINDOW_S) localHistory[k].shift();
  }
  return localHistory;
}

/** A "nice" step (1, 2, 2.5 or 5 times a power of ten) for about `max / 4`. */
function niceStep(max) {
  const raw = max / 4;
  const pow = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 2.5, 5, 10].map((m) => m * pow).find((s) => s >= raw);
}

/**
 * Y ticks from 0 to just above `max`. Byte values step in round numbers of one unit (KiB,
 * MiB ...) chosen for the maximum, and every label uses that unit; counts step by whole numbers.
 */
function yAxis(max, bytes) {
  let unit = 1, u = 0;
  if (bytes) while (max / unit >= 1000 && u < UNITS.length - 1) { unit *= 1024; u++; }
  const step = Math.max(bytes ? 0 : 1, niceStep(max / unit)) * unit;
  const top = Math.ceil(max / step) * step;
  const values = [];
  for (let v = 0; v <= top + step / 2; v += step) values.push(v);
  const label = bytes ? (v) => `${Number((v / unit).toFixed(2))} ${UNITS[u]}/s` : fmtCount;
  return { values, top, label };
}

/** Seconds the charts show: 60 or 300, chosen with the buttons by the charts, kept per browser. */
let chartWindow = Number(localStorage.getItem('sallyport-chart-window')) === 60 ? 60 : WINDOW_S;

/** Draws `series` ([{ values, colour, fill, dash }], one value a second) over `chartWindow`. */
function drawChart(canvas, series, bytes) {
  const dpr = window.devicePixelRatio || 1;
  const cssW = canvas.clientWidth, cssH = canvas.clientHeight;
  if (canvas.width !== Math.round(cssW * dpr) || canvas.height !== Math.round(cssH * dpr)) {
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
  }
  const g = canvas.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, cssW, cssH);
  const pad = { l: 74, r: 12, t: 10, b: 22 };
  const w = cssW - pad.l - pad.r, h = cssH - pad.t - pad.b;
  const span = chartWindow;
  const shown = series.map((s) => ({ ...s, values: s.values.slice(-span) }));
  const axis = yAxis(Math.max(bytes ? 1024 : 4, ...shown.flatMap((s) => s.values)), bytes);
  const x = (age) => pad.l + w - (age / (span - 1)) * w; // age in seconds, 0 = now
  const y = (v) => pad.t + h - (v / axis.top) * h;

  g.font = '11px system-ui, sans-serif';
  g.lineWidth = 1;
  g.strokeStyle = '#e5e9f0';
  g.fillStyle = '#6b7785';
  // Grid: a line per y tick; a line every minute (5 min window) or 10 s (1 min window).
  g.textAlign = 'right';
  g.textBaseline = 'middle';
  for (const v of axis.values) {
    const py = Math.round(y(v)) + 0.5;
    g.beginPath(); g.moveTo(pad.l, py); g.lineTo(pad.l + w, py); g.stroke();
    g.fillText(axis.label(v), pad.l - 6, py);
  }
  g.textAlign = 'center';
  g.textBaseline = 'top';
  const every = span > 60 ? 60 : 10;
  for (let age = 0; age < span; age += every) {
    const px = Math.round(x(age)) + 0.5;
    g.beginPath(); g.moveTo(px, pad.t); g.lineTo(px, pad.t + h); g.stroke();
    const text = age === 0 ? 'now' : age % 60 === 0 ? `-${age / 60} min` : `-${age}s`;
    g.fillText(text, Math.min(px, pad.l + w - 12), pad.t + h + 5);
  }
  // Series, oldest point first, the newest at the right edge.
  for (const s of shown) {
    if (!s.values.length) continue;
    const pts = s.values.map((val, i) => [x(s.values.length - 1 - i), y(val)]);
    const path = () => {
      g.beginPath();
      pts.forEach(([px, py], i) => (i ? g.lineTo(px, py) : g.moveTo(px, py)));
    };
    if (s.fill) {
      path();
      g.lineTo(pts[pts.length - 1][0], y(0));
      g.lineTo(pts[0][0], y(0));
      g.closePath();
      g.fillStyle = `${s.colour}22`;
      g.fill();
    }
    path();
    g.strokeStyle = s.colour;
    g.lineWidth = 1.6;
    g.setLineDash(s.dash ? [6, 4] : []);
    g.stroke();
    g.setLineDash([]);
  }
}

function renderCharts(h) {
  const rates = ['client_read', 'client_written', 'agent_read', 'agent_written']
    // Agent-side lines are dashed: with a plain relay they lie on top of the client-side ones.
    .map((k) => ({ values: h[k] || [], colour: colour(k.replace('_', '-')), dash: k.startsWith('agent') }));
  drawChart(byTestId('chart-rates'), rates, true);
  drawChart(byTestId('chart-active'), [{ values: h.active || [], colour: colour('active'), fill: true }], false);
  for (const b of $$('[data-window]')) b.setAttribute('aria-pressed', String(Number(b.dataset.window) === chartWindow));
  // How many points the charts hold, for tests and the curious.
  byTestId('chart-rates').dataset.points = String((h.client_read || []).length);
}

// ---------------------------------------------------------------------------------------------
// Polling

let pollTimer = null;
let polling = false;

async function poll() {
  clearTimeout(pollTimer);
  if (polling) return;
  polling = true;
  try {
    let answers;
    try {
      answers = await Promise.all([api('/api/status'), api('/api/stats'), api('/api/connections'), api('/api/bans')]);
    } catch (e) {
      setLost(e.status === 503 ? 'The gateway is restarting.' : `${e.message}.`);
      return;
    }
    const [status, stats, connections, bans] = answers;
    last = { status, stats, connections, history: chartHistory(stats) };
    setLost(null);
    // A rendering bug surfaces as a page error (and in the tests), not as "connection lost".
    renderHeader(status, stats);
    renderLight(status);
    renderCounters(stats);
    renderCharts(last.history);
    renderListeners(status, stats);
    renderUdp(stats);
    renderAgents(status);
    renderRefusals(stats);
    renderConnections(connections);
    renderBans(bans);
  } finally {
    polling = false;
    pollTimer = setTimeout(poll, POLL_MS);
  }
}

const ACTIONS = {
  pause: {
    title: 'Pause the gateway?',
    text: 'Every public listener closes and new clients are refused. Established connections keep piping and agents stay connected.',
    ok: 'Pause',
    done: (body) => `Pause: done, the gateway is ${body.state}.`,
  },
  resume: {
    title: 'Resume the gateway?',
    text: 'The listeners of every site that has an agent reopen and accept new clients.',
    ok: 'Resume',
    done: (body) => `Resume: done, the gateway is ${body.state}.`,
  },
  restart: {
    title: 'Restart the gateway?',
    text: 'Drops every client connection and agent, re-reads gateway.toml and starts again. Agents reconnect by themselves; clients must reconnect.',
    ok: 'Restart',
    done: (body) => `Restart: done, the gateway is ${body.state}.`,
    danger: true,
  },
  stop: {
    title: 'Stop the gateway?',
    text: 'Listeners close, established connections drain up to the drain timeout, then the process exits. It does not come back by itself.',
    ok: 'Stop',
    done: (body) => `Stop: done, the gateway is ${body.state}.`,
    danger: true,
  },
};

wireActions(ACTIONS, poll);

for (const button of $$('[data-window]')) {
  button.addEventListener('click', () => {
    chartWindow = Number(button.dataset.window);
    localStorage.setItem('sallyport-chart-window', String(chartWindow));
    if (last) renderCharts(last.history);
  });
}

// Redraw the charts at the new size when the browser window changes.
window.addEventListener('resize', () => last && renderCharts(last.history));

poll();
