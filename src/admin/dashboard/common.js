// Shared by the gateway's dashboard (dashboard.js) and the agent's page (agent.js): formatting,
// building elements (text only: strings are never parsed as HTML, whatever a peer sent), the API
// call, the status light, the "connection lost" banner, and control actions with an in-page
// confirmation and the admin token. Loaded first, as a classic script: its names are globals.
'use strict';

/** Which daemon serves this page: "gateway" or "agent" (the <html data-daemon> attribute). */
const DAEMON = document.documentElement.dataset.daemon || 'gateway';

const POLL_MS = 1000;
const FETCH_TIMEOUT_MS = 4000;
const TOKEN_KEY = 'sallyport-admin-token';

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const byTestId = (id) => $(`[data-testid="${id}"]`);

// ---------------------------------------------------------------------------------------------
// Formatting

const UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];

/** 1536 -> "1.50 KiB": binary units, three significant digits. */
function fmtBytes(n) {
  n = Number(n) || 0;
  if (n < 1024) return `${Math.round(n)} B`;
  let i = 0;
  while (n >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)} ${UNITS[i]}`;
}

const fmtRate = (n) => `${fmtBytes(n)}/s`;

const fmtCount = (n) => (Number(n) || 0).toLocaleString('en-US');

/** 3725 -> "1h 02m": the two largest units. */
function fmtDuration(s) {
  s = Math.max(0, Math.floor(Number(s) || 0));
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24;
  const m = Math.floor(s / 60) % 60, sec = s % 60;
  const pad = (x) => String(x).padStart(2, '0');
  if (d) return `${d}d ${pad(h)}h`;
  if (h) return `${h}h ${pad(m)}m`;
  if (m) return `${m}m ${pad(sec)}s`;
  return `${sec}s`;
}

/** A unix time as local "HH:MM:SS", with the date when it is not today. */
function fmtTime(unix) {
  const t = new Date(unix * 1000);
  const time = t.toLocaleTimeString('en-GB', { hour12: false });
  return t.toDateString() === new Date().toDateString() ? time : `${t.toLocaleDateString('sv-SE')} ${time}`;
}

const FORMATS = { count: fmtCount, bytes: fmtBytes, rate: fmtRate };

/** Reads "a.b" from an object. */
const field = (obj, path) => path.split('.').reduce((o, k) => (o == null ? undefined : o[k]), obj);

/** Builds an element; children are nodes or strings (set as text, never parsed as HTML). */
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null) continue;
    if (k === 'class') e.className = v; else e.setAttribute(k, v);
  }
  e.append(...children.map((c) => (c instanceof Node ? c : String(c))));
  return e;
}

/** A numeric table cell. */
const num = (text) => el('td', { class: 'n' }, text);

// ---------------------------------------------------------------------------------------------
// API

/** GET or POST; throws an Error whose message says what went wrong (HTTP status or network). */
async function api(path, options = {}) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
  let res;
  try {
    res = await fetch(path, { cache: 'no-store', ...options, signal: abort.signal });
  } catch (e) {
    throw new Error(e.name === 'AbortError' ? 'no answer within 4 s' : `the ${DAEMON} is unreachable`);
  } finally {
    clearTimeout(timer);
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = new Error(`HTTP ${res.status}${body.error ? `: ${body.error}` : ''}`);
    err.status = res.status;
    throw err;
  }
  return body;
}

// ---------------------------------------------------------------------------------------------
// The page frame

/** Replaces a table's body; `empty` is shown (spanning every column) when there are no rows. */
function fillTable(testId, rows, empty) {
  const table = byTestId(testId);
  const cols = $$('thead th', table).length || 2;
  const body = $('tbody', table);
  body.replaceChildren(...(rows.length ? rows : [el('tr', { class: 'empty' }, el('td', { colspan: cols }, empty))]));
}

function setLight(colour, label, detail) {
  const light = byTestId('status-light');
  light.dataset.light = colour;
  light.setAttribute('aria-label', `status ${colour}`);
  byTestId('status').dataset.light = colour;
  byTestId('status-label').textContent = label;
  byTestId('status-detail').textContent = detail;
}

/** Shows or hides the "connection lost" banner; while lost the light is grey. */
function setLost(reason) {
  const banner = byTestId('connection-lost');
  document.body.classList.toggle('stale', reason != null);
  if (reason == null) { banner.hidden = true; return; }
  banner.hidden = false;
  byTestId('connection-lost-reason').textContent = reason;
  setLight('unknown', `No connection to ${DAEMON}`, reason);
  for (const b of $$('[data-action]')) b.disabled = true;
}

// ---------------------------------------------------------------------------------------------
// Dialogs and toasts

/** Opens a <dialog>; resolves with the value of the button that closed it ('' on Escape). */
function openDialog(dialog, focus) {
  return new Promise((resolve) => {
    dialog.returnValue = '';
    dialog.addEventListener('close', () => resolve(dialog.returnValue), { once: true });
    dialog.showModal();
    if (focus) focus.focus();
  });
}

/** Asks the operator to confirm `actions[action]` ({ title, text, ok, danger }) in the page. */
async function confirmAction(actions, action) {
  const a = actions[action];
  const dialog = byTestId('confirm-dialog');
  byTestId('confirm-title').textContent = a.title;
  byTestId('confirm-text').textContent = a.text;
  const ok = byTestId('confirm-ok');
  ok.textContent = a.ok;
  ok.classList.toggle('danger', !!a.danger);
  return (await openDialog(dialog, byTestId('confirm-cancel'))) === 'ok';
}

/** Asks for the admin token; resolves with it, or null if cancelled. */
async function askToken(message) {
  const input = byTestId('token-input');
  input.value = '';
  byTestId('token-message').textContent = message;
  const answer = await openDialog(byTestId('token-dialog'), input);
  const token = input.value.trim();
  input.value = '';
  return answer === 'ok' && token ? token : null;
}

function toast(message, kind = 'info') {
  const t = el('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status', 'data-kind': kind }, message);
  const close = el('button', { type: 'button', class: 'close', 'aria-label': 'dismiss' }, '×');
  close.addEventListener('click', () => t.remove());
  t.append(close);
  byTestId('toasts').append(t);
  // Errors stay until dismissed; other news fades after a few seconds.
  if (kind !== 'error') setTimeout(() => t.remove(), 5000);
}

/**
 * Sends a control action: POST /api/ACTION. The X-Requested-By header proves the call comes from
 * this page; on 401 the operator is asked for the token, which is kept for this browser tab only.
 * `actions[action].done(body)` words the success; `then` runs after it (a fresh poll).
 */
async function sendAction(actions, action, then) {
  let refused = false;
  for (;;) {
    const headers = { 'X-Requested-By': 'sallyport' };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    try {
      const body = await api(`/api/${action}`, { method: 'POST', headers });
      toast(actions[action].done(body), 'ok');
      then();
      return;
    } catch (e) {
      if (e.status !== 401) {
        toast(`${actions[action].ok} failed: ${e.message}`, 'error');
        return;
      }
      if (token) { sessionStorage.removeItem(TOKEN_KEY); refused = true; }
      const given = await askToken(refused
        ? `The ${DAEMON} refused that token. Enter the admin token again.`
        : `The ${DAEMON} needs its admin token to ${action}.`);
      if (given == null) {
        toast(`${actions[action].ok} cancelled: no admin token given.`, 'error');
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, given);
    }
  }
}

/** Wires every `[data-action]` button: confirm, then send (see sendAction). */
function wireActions(actions, then) {
  for (const button of $$('[data-action]')) {
    button.addEventListener('click', async () => {
      const action = button.dataset.action;
      if (await confirmAction(actions, action)) await sendAction(actions, action, then);
    });
  }
}
