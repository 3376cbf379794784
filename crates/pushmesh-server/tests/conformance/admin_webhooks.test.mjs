// Webhooks of apps that change at runtime (issue 19): an admin app created
// with webhooks, changed by PATCH, signed with its rotated secret; a
// config app's webhooks and the wsify authorizer changed by SIGHUP. Real
// HTTP receivers check every request's signature themselves (HMAC-SHA256
// of the body with the app's secret, as the Pusher SDKs do).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { startServer, client, subscribed, until, closeAll, WebSocket, withTimeout, APP_TOML } from './helpers.mjs';

const TOKEN = 'admin-token-0123456789abcdef';
const servers = [];
const httpServers = [];
after(async () => {
  closeAll();
  for (const s of servers) await s.stop().catch(() => {});
  for (const h of httpServers) { h.closeAllConnections?.(); h.close(); }
});

const TUNING = 'webhook_backoff_ms = 100\nwebhook_delay_ms = 0\n';

function api(port, method, p, body) {
  return fetch(`http://127.0.0.1:${port}${p}`, {
    method,
    headers: { 'content-type': 'application/json', authorization: `Bearer ${TOKEN}` },
    body: body === undefined ? undefined : JSON.stringify(body),
  }).then(async (r) => ({ status: r.status, text: r.status === 204 ? '' : await r.text() }))
    .then((r) => ({ ...r, body: r.text ? JSON.parse(r.text) : null }));
}

/** Records every request: its headers, body and events; answers 200. */
async function receiver(pathName = '/hooks') {
  const requests = [];
  const srv = http.createServer((req, res) => {
    let raw = '';
    req.on('data', (d) => { raw += d; });
    req.on('end', () => {
      let events = [];
      try { events = JSON.parse(raw).events || []; } catch { /* recorded as is */ }
      requests.push({ headers: req.headers, raw, events });
      res.writeHead(200); res.end('{}');
    });
  });
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  httpServers.push(srv);
  const events = () => requests.flatMap((r) => r.events.map((e) => ({ ...e, request: r })));
  return { url: `http://127.0.0.1:${srv.address().port}${pathName}`, requests, events };
}

const signedWith = (secret, r) => crypto.createHmac('sha256', secret).update(r.raw).digest('hex') === r.headers['x-pusher-signature'];

async function eventFor(rx, name, channel, what) {
  await until(() => rx.events().some((e) => e.name === name && e.channel === channel), what, 20000);
  return rx.events().find((e) => e.name === name && e.channel === channel);
}

test('an admin app with webhooks: created, changed by PATCH, signed with the rotated secret; header values never shown; an authorizer refused', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pm-admin-hooks-'));
  const s = await startServer({ configToml: TUNING + APP_TOML, args: ['--data-dir', dir], env: { PUSHMESH_ADMIN_TOKEN: TOKEN, RUST_LOG: 'info' } });
  servers.push(s);
  const a = await receiver('/a');
  const b = await receiver('/b');
  const app = { id: 'hooked', key: 'hooked-key' };

  const made = await api(s.port, 'POST', '/admin/apps', { ...app, webhooks: [{ url: a.url, headers: { 'X-Hook-Token': 'hook-credential-42' } }] });
  assert.equal(made.status, 201, made.text);
  assert.doesNotMatch(made.text, /hook-credential-42/, 'a header value is never shown');
  assert.equal(made.body.webhooks[0].headers['X-Hook-Token'], '<redacted>');
  let secret = made.body.secret;

  // The webhook arrives, with the app's key, its header and a valid signature.
  const c = client(s.port, { key: app.key, authUrl: 'http://127.0.0.1:9' });
  const room = c.subscribe('room');
  await subscribed(room);
  const occupied = await eventFor(a, 'channel_occupied', 'room', 'channel_occupied at the first URL');
  assert.equal(occupied.request.headers['x-pusher-key'], app.key);
  assert.equal(occupied.request.headers['x-hook-token'], 'hook-credential-42');
  assert.ok(signedWith(secret, occupied.request), 'signed with the app secret');

  // A GET's output sent back cannot store "<redacted>" as the value.
  const listed = await api(s.port, 'GET', '/admin/apps/hooked');
  assert.doesNotMatch(listed.text, /hook-credential-42/);
  const back = await api(s.port, 'PATCH', '/admin/apps/hooked', { webhooks: listed.body.webhooks });
  assert.equal(back.status, 400);
  assert.match(back.body.error, /webhooks\[0\]\.headers\.X-Hook-Token/);

  // PATCH: the URL and the event types change; the first URL gets nothing more.
  const patched = await api(s.port, 'PATCH', '/admin/apps/hooked', { webhooks: [{ url: b.url, event_types: ['channel_vacated'] }] });
  assert.equal(patched.status, 200, patched.text);
  const beforeA = a.events().length;
  c.unsubscribe('room');
  const vacated = await eventFor(b, 'channel_vacated', 'room', 'channel_vacated at the new URL');
  assert.ok(signedWith(secret, vacated.request));
  assert.equal(a.events().length, beforeA, 'the removed URL gets no new event');
  assert.ok(!b.events().some((e) => e.name === 'channel_occupied'), 'the event types filter');

  // Rotate (no grace): the next webhook is signed with the new secret only.
  const rotated = await api(s.port, 'POST', '/admin/apps/hooked/secret', { grace_secs: 0 });
  assert.equal(rotated.status, 200);
  const old = secret;
  secret = rotated.body.secret;
  const lobby = c.subscribe('lobby');
  await subscribed(lobby);
  c.unsubscribe('lobby');
  const again = await eventFor(b, 'channel_vacated', 'lobby', 'a webhook after the rotation');
  assert.ok(signedWith(secret, again.request), 'signed with the new secret');
  assert.ok(!signedWith(old, again.request), 'not with the old one');

  const stats = await api(s.port, 'GET', '/admin/apps/hooked/stats');
  assert.ok(stats.body.webhooks_sent >= 3, JSON.stringify(stats.body));

  // Removed webhooks: nothing is sent for 'gone'. Events leave in order,
  // so once the URL is back and has the later 'marker' event, 'gone''s
  // would have come first.
  assert.equal((await api(s.port, 'PATCH', '/admin/apps/hooked', { webhooks: [] })).status, 200);
  const gone = c.subscribe('gone');
  await subscribed(gone);
  c.unsubscribe('gone');
  await until(async () => (await api(s.port, 'GET', '/admin/apps/hooked/stats')).body.channels === 0, 'gone vacated');
  assert.equal((await api(s.port, 'PATCH', '/admin/apps/hooked', { webhooks: [{ url: b.url }] })).status, 200);
  await subscribed(c.subscribe('marker'));
  await eventFor(b, 'channel_occupied', 'marker', 'the URL back');
  assert.ok(!b.events().some((e) => e.channel === 'gone'), 'nothing sent while the app had no webhook');

  // The wsify authorizer belongs to the wsify app only.
  const authz = await api(s.port, 'POST', '/admin/apps', { id: 'z', key: 'z-key', authorizer: { url: a.url } });
  assert.equal(authz.status, 400);
  assert.match(authz.body.error, /authorizer.*wsify/);
  assert.doesNotMatch(s.stderr(), /hook-credential-42/, 'no header value in any log line');
  assert.ok(!s.stderr().includes(secret) && !s.stderr().includes(old), 'no secret in any log line');
});

/** A wsify connection's opening: true when the upgrade succeeded. */
function wsifyOpens(port) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws`);
  return withTimeout(new Promise((resolve) => {
    ws.on('open', () => { ws.close(); resolve(true); });
    ws.on('unexpected-response', (_req, res) => resolve(res.statusCode));
    ws.on('error', () => resolve(0));
  }), 10000, 'wsify open');
}

test('SIGHUP changes a config app\'s webhook URL and the wsify authorizer without a restart', async () => {
  const a = await receiver('/a');
  const b = await receiver('/b');
  const authzA = await receiver('/authz-a');
  const authzB = await receiver('/authz-b');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pm-hup-hooks-'));
  const file = path.join(dir, 'pushmesh.toml');
  const toml = (hook, authz) => `${TUNING}${APP_TOML}[[apps.webhooks]]\nurl = "${hook}"\n[apps.authorizer]\nurl = "${authz}"\n`;
  fs.writeFileSync(file, toml(a.url, authzA.url));
  const s = await startServer({ args: ['--config', file], env: { RUST_LOG: 'info' } });
  servers.push(s);
  const c = client(s.port);
  await subscribed(c.subscribe('one'));
  await eventFor(a, 'channel_occupied', 'one', 'the first URL');
  assert.equal(await wsifyOpens(s.port), true);
  assert.ok(authzA.requests.some((r) => JSON.parse(r.raw).command === 'connect'), 'the first authorizer was asked');

  fs.writeFileSync(file, toml(b.url, authzB.url));
  s.child.kill('SIGHUP');
  await until(() => /SIGHUP: apps reloaded/.test(s.stderr()), 'the reload', 10000);
  await subscribed(c.subscribe('two'));
  await eventFor(b, 'channel_occupied', 'two', 'the new URL after the reload');
  assert.ok(!a.events().some((e) => e.channel === 'two'), 'the old URL gets nothing new');
  const asked = authzA.requests.length;
  assert.equal(await wsifyOpens(s.port), true);
  assert.ok(authzB.requests.some((r) => JSON.parse(r.raw).command === 'connect'), 'the new authorizer is asked');
  assert.equal(authzA.requests.length, asked, 'the old authorizer is not');
});
