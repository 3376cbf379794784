// Pusher webhooks received by a real HTTP receiver and checked with the Node
// SDK's pusher.webhook(request).isValid().
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { startServer, serverSdk, client, subscribed, until, withTimeout, closeAll, startAuthServer, APP, APP_TOML } from './helpers.mjs';

const servers = [];
const httpServers = [];
after(async () => {
  closeAll();
  for (const s of servers) await s.stop().catch(() => {});
  for (const h of httpServers) { h.closeAllConnections?.(); h.close(); }
});

/** A webhook receiver; fails the first `failFirst` requests with 500. */
async function receiver(sdk, { failFirst = 0 } = {}) {
  const got = [];
  const requests = [];
  let seen = 0;
  const srv = http.createServer((req, res) => {
    let rawBody = '';
    req.on('data', (d) => { rawBody += d; });
    req.on('end', () => {
      seen++;
      const wh = sdk.webhook({ headers: req.headers, rawBody });
      requests.push({ valid: wh.isValid(), headers: req.headers });
      if (seen <= failFirst) { res.writeHead(500); res.end(); return; }
      if (!wh.isValid()) { res.writeHead(401); res.end(); return; }
      for (const e of wh.getEvents()) got.push(e);
      res.writeHead(200); res.end('{}');
    });
  });
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  httpServers.push(srv);
  return { url: `http://127.0.0.1:${srv.address().port}/hooks`, got, requests };
}

const appToml = (hooks, delayMs = 1000) => `webhook_backoff_ms = 100
webhook_delay_ms = ${delayMs}
${APP_TOML}client_events = true
${hooks}`;

test('channel, member, client_event and cache_miss webhooks, signed and valid', async () => {
  const sdk = serverSdk(1);
  const rx = await receiver(sdk);
  const filtered = await receiver(sdk);
  const srv = await startServer({ configToml: appToml(`[[apps.webhooks]]
url = "${rx.url}"
headers = { "X-Extra" = "yes" }
[[apps.webhooks]]
url = "${filtered.url}"
event_types = ["member_added"]
`) });
  servers.push(srv);
  const api = serverSdk(srv.port);
  const auth = await startAuthServer(api);
  const a = client(srv.port, { authUrl: auth.url, user: 'ann' });
  const b = client(srv.port, { authUrl: auth.url, user: 'ben' });
  const pa = a.subscribe('presence-hooks');
  const pb = b.subscribe('presence-hooks');
  await Promise.all([subscribed(pa), subscribed(pb)]);
  pa.trigger('client-wave', { hi: 1 });
  const c = a.subscribe('cache-hooks');
  await new Promise((r) => c.bind('pusher:cache_miss', r));
  await until(() => rx.got.some((e) => e.name === 'client_event') && rx.got.some((e) => e.name === 'cache_miss') && rx.got.filter((e) => e.name === 'member_added').length === 2, 'first webhooks');
  const occupied = rx.got.filter((e) => e.name === 'channel_occupied').map((e) => e.channel).sort();
  assert.deepEqual(occupied, ['cache-hooks', 'presence-hooks']);
  const ce = rx.got.find((e) => e.name === 'client_event');
  assert.equal(ce.channel, 'presence-hooks'); assert.equal(ce.event, 'client-wave');
  assert.deepEqual(JSON.parse(ce.data), { hi: 1 }); assert.equal(ce.user_id, 'ann');
  assert.equal(ce.socket_id, a.connection.socket_id);
  assert.ok(rx.requests.every((r) => r.valid), 'every request passes isValid()');
  // Every event carries a stable id, unique per event (duplicates sent by a
  // backup node after an owner's crash repeat it).
  assert.ok(rx.got.every((e) => typeof e.id === 'string' && e.id.length > 0), 'every event has an id');
  assert.equal(new Set(rx.got.map((e) => e.id)).size, rx.got.length, 'ids are unique');
  assert.ok(rx.requests.every((r) => r.headers['x-extra'] === 'yes' && r.headers['x-pusher-key'] === APP.key));
  // A forged body would not be valid: isValid() really checks.
  assert.equal(sdk.webhook({ headers: rx.requests[0].headers, rawBody: '{"time_ms":1,"events":[]}' }).isValid(), false);
  // member_removed (after the delay) and channel_vacated when everyone leaves.
  b.disconnect();
  await until(() => rx.got.some((e) => e.name === 'member_removed' && e.user_id === 'ben'), 'member_removed');
  a.disconnect();
  await until(() => rx.got.filter((e) => e.name === 'channel_vacated').length === 2, 'vacated');
  // The filtered receiver got member_added only.
  await until(() => filtered.got.length === 2, 'filtered events');
  assert.ok(filtered.got.every((e) => e.name === 'member_added'));
  await auth.close();
});

test('a receiver that fails the first N times gets every event afterwards, in order per channel', async () => {
  const sdk = serverSdk(1);
  const rx = await receiver(sdk, { failFirst: 3 });
  const srv = await startServer({ configToml: appToml(`[[apps.webhooks]]
url = "${rx.url}"
event_types = ["channel_occupied", "channel_vacated"]
`, 1) });
  servers.push(srv);
  const c = client(srv.port, { authUrl: 'http://127.0.0.1:9' });
  // Six channels, each occupied then vacated: twelve events, the first
  // three requests of which fail.
  const names = ['o-1', 'o-2', 'o-3', 'o-4', 'o-5', 'o-6'];
  for (const name of names) await subscribed(c.subscribe(name));
  for (const name of names) c.unsubscribe(name);
  await until(() => rx.got.length === 12, `12 events (got ${rx.got.length})`, 30000);
  for (const name of names) {
    const seq = rx.got.filter((e) => e.channel === name).map((e) => e.name);
    assert.deepEqual(seq, ['channel_occupied', 'channel_vacated'], name);
  }
  // Occupations arrive in the order they happened.
  assert.deepEqual(rx.got.filter((e) => e.name === 'channel_occupied').map((e) => e.channel), names);
  const stats = await (await fetch(`http://127.0.0.1:${srv.port}/stats`)).json();
  assert.equal(stats.webhooks.retried, 3);
  assert.equal(stats.webhooks.sent, 12);
  assert.equal(stats.webhooks.dropped, 0);
});

test('a vacate followed by a quick re-occupy produces no channel_vacated', async () => {
  const sdk = serverSdk(1);
  const rx = await receiver(sdk);
  const srv = await startServer({ configToml: appToml(`[[apps.webhooks]]
url = "${rx.url}"
`) });
  servers.push(srv);
  const c = client(srv.port, { authUrl: 'http://127.0.0.1:9' });
  await subscribed(c.subscribe('blip'));
  await until(() => rx.got.some((e) => e.name === 'channel_occupied'), 'occupied');
  c.unsubscribe('blip');
  await subscribed(c.subscribe('blip'));
  // A real vacate of another channel, after the blip, arrives after the
  // 1 s delay: by then the blip's vacate would have been sent too.
  await subscribed(c.subscribe('later'));
  c.unsubscribe('later');
  await until(() => rx.got.some((e) => e.name === 'channel_vacated' && e.channel === 'later'), 'later vacated');
  const blip = rx.got.filter((e) => e.channel === 'blip' && e.name.startsWith('channel_')).map((e) => e.name);
  assert.deepEqual(blip, ['channel_occupied'], 'no vacate and no second occupy for the blip');
});

test('graceful shutdown flushes pending webhooks', async () => {
  const sdk = serverSdk(1);
  const rx = await receiver(sdk);
  const srv = await startServer({ configToml: appToml(`[[apps.webhooks]]
url = "${rx.url}"
event_types = ["channel_vacated"]
`, 60000) });
  const c = client(srv.port, { authUrl: 'http://127.0.0.1:9' });
  await subscribed(c.subscribe('pending'));
  c.unsubscribe('pending');
  const api = serverSdk(srv.port);
  await until(async () => !(await (await api.get({ path: '/channels/pending' })).json()).occupied, 'vacated on the server');
  assert.equal(rx.got.length, 0, 'still delayed (60 s)');
  c.disconnect();
  const { code } = await srv.stop();
  assert.equal(code, 0);
  assert.deepEqual(rx.got.map((e) => [e.name, e.channel]), [['channel_vacated', 'pending']]);
});
