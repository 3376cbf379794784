// Subscriptions by filter, tags on publish and identity set by the load
// balancer (issue #13), with real clients: pusher-js (stock, and sending a
// filter in its own pusher:subscribe frame), raw `ws` sockets with identity
// headers, and the signed Node SDK (`post` with `tags`).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer, serverSdk, client, connected, subscribed, next, until, withTimeout,
  WebSocket, APP, closeAll, subscribedTo, APP_TOML,
} from './helpers.mjs';
import { subscribeWithFilter, validateFilter } from '../../../../clients/js/index.js';

let srv, sdk;

before(async () => {
  srv = await startServer({
    configToml: `
trusted_proxies = ["127.0.0.1/32"]
broadcasting_key = "bk"
[identity_headers]
user = "X-User-Id"
device = "X-Device"
zone = "X-Zone"
${APP_TOML}`,
  });
  sdk = serverSdk(srv.port);
});
after(async () => {
  closeAll();
  await srv.stop();
});

/** A signed publish with tags (the SDK's `trigger` has no place for them). */
function publish(channel, name, data, tags) {
  const body = { name, channel, data: JSON.stringify(data) };
  if (tags !== undefined) body.tags = tags;
  return sdk.post({ path: '/events', body });
}

/** A raw socket, optionally with headers and a local address; frames kept and awaitable. */
async function socket({ headers = {}, localAddress } = {}) {
  const ws = new WebSocket(`ws://127.0.0.1:${srv.port}/app/${APP.key}?protocol=7`, { headers, localAddress });
  const frames = [];
  const waiters = [];
  ws.on('message', (d) => {
    const msg = JSON.parse(d.toString());
    if (typeof msg.data === 'string') { try { msg.data = JSON.parse(msg.data); } catch { /* keep */ } }
    frames.push(msg);
    for (const w of [...waiters]) if (w.pred(msg)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(msg); }
  });
  ws.on('error', () => {});
  const closed = new Promise((r) => ws.on('close', (code) => r(code)));
  const s = {
    ws, frames, closed,
    send: (o) => ws.send(JSON.stringify(o)),
    waitFor(pred, what) {
      const found = frames.find(pred);
      if (found) return Promise.resolve(found);
      return withTimeout(new Promise((resolve) => waiters.push({ pred, resolve })), 10000, what);
    },
    got: (event) => frames.filter((f) => f.event === event),
    async subscribe(channel, filter) {
      s.send({ event: 'pusher:subscribe', data: filter === undefined ? { channel } : { channel, filter } });
      return s.waitFor((m) => m.channel === channel && /subscription_(succeeded|error)/.test(m.event), `answer on ${channel}`);
    },
  };
  after(() => ws.terminate());
  await s.waitFor((m) => m.event === 'pusher:connection_established', 'connection_established');
  return s;
}

test('a filter selects the events tagged for it; stock pusher-js gets everything', async () => {
  // pusher-js with a filter: its own connection sends the extended frame.
  const eu = client(srv.port, { authUrl: 'http://127.0.0.1:9' });
  await connected(eu);
  const atEu = [];
  eu.connection.bind('message', (m) => { if (m.channel === 'orders' && !m.event.startsWith('pusher')) atEu.push(m.event); });
  const euOk = next(eu.connection, 'message', 'eu subscribed');
  eu.send_event('pusher:subscribe', { channel: 'orders', filter: { zone: 'eu' } });
  assert.equal((await euOk).event, 'pusher_internal:subscription_succeeded');
  // Stock pusher-js, no filter.
  const [plain, ch] = await subscribedTo(srv.port, 'orders');
  const atPlain = [];
  ch.bind_global((e) => { if (!e.startsWith('pusher')) atPlain.push(e); });
  const us = await socket();
  assert.equal((await us.subscribe('orders', { zone: 'us' })).event, 'pusher_internal:subscription_succeeded');
  const kinds = await socket();
  assert.equal((await kinds.subscribe('orders', { zone: 'eu', kind: ['order', 'refund'] })).event, 'pusher_internal:subscription_succeeded');

  await publish('orders', 'refund-eu', { n: 1 }, { zone: 'eu', kind: 'refund' });
  await publish('orders', 'quote-eu', { n: 2 }, { zone: 'eu', kind: 'quote' });
  await publish('orders', 'for-us', { n: 3 }, { zone: 'us' });
  await publish('orders', 'no-zone', { n: 4 }, { kind: 'order' });
  await publish('orders', 'untagged', { n: 5 });
  // Markers: one publisher's events on a channel keep their order, so a
  // marker seen means everything before it was decided.
  await publish('orders', 'marker', {}, { zone: 'eu', kind: 'order' });
  await publish('orders', 'marker-us', {}, { zone: 'us' });
  await kinds.waitFor((m) => m.event === 'marker', 'marker at kinds');
  await us.waitFor((m) => m.event === 'marker-us', 'marker at us');
  await until(() => atEu.includes('marker') && atPlain.includes('marker-us'), 'markers at eu and plain');

  assert.deepEqual(atEu, ['refund-eu', 'quote-eu', 'marker']);
  assert.deepEqual(us.frames.filter((f) => f.channel === 'orders' && !f.event.startsWith('pusher')).map((f) => f.event), ['for-us', 'marker-us']);
  // Arrays match any of their values; a missing tag matches nothing.
  assert.deepEqual(kinds.frames.filter((f) => f.channel === 'orders' && !f.event.startsWith('pusher')).map((f) => f.event), ['refund-eu', 'marker']);
  assert.deepEqual(atPlain, ['refund-eu', 'quote-eu', 'for-us', 'no-zone', 'untagged', 'marker', 'marker-us']);
  // Tags are not part of what clients receive.
  const f = us.frames.find((m) => m.event === 'for-us');
  assert.deepEqual(Object.keys(f).sort(), ['channel', 'data', 'event']);
  assert.deepEqual(f.data, { n: 3 });
});

test('invalid filters get InvalidFilter and the connection stays usable; invalid tags get 400', async () => {
  const s = await socket();
  for (const bad of ['eu', { zone: 1 }, { zone: [] }, { '': 'x' }, { zone: Array.from({ length: 65 }, (_, i) => `z${i}`) }]) {
    const r = await s.subscribe('bad-filter', bad);
    s.frames.splice(s.frames.indexOf(r), 1);
    assert.equal(r.event, 'pusher:subscription_error', JSON.stringify(bad));
    assert.equal(r.data.type, 'InvalidFilter');
    assert.equal(r.data.status, 400);
    assert.ok(typeof r.data.error === 'string' && r.data.error.length > 0);
  }
  const cache = await s.subscribe('cache-x', { zone: 'eu' });
  assert.equal(cache.data.type, 'InvalidFilter');
  // Still usable: ping, and a valid filtered subscription that receives.
  s.send({ event: 'pusher:ping', data: {} });
  await s.waitFor((m) => m.event === 'pusher:pong', 'pong');
  assert.equal((await s.subscribe('bad-filter', { zone: 'eu' })).event, 'pusher_internal:subscription_succeeded');
  await publish('bad-filter', 'ok', {}, { zone: 'eu' });
  await s.waitFor((m) => m.event === 'ok', 'event after refusals');

  const tooMany = Object.fromEntries(Array.from({ length: 17 }, (_, i) => [`k${i}`, 'v']));
  for (const tags of [tooMany, { zone: 1 }, ['eu'], { ['k'.repeat(65)]: 'v' }, { k: 'v'.repeat(257) }]) {
    await assert.rejects(publish('bad-filter', 'x', {}, tags), (e) => {
      assert.equal(e.status, 400, JSON.stringify(tags));
      assert.match(JSON.parse(e.body).error, /invalid tags/);
      return true;
    });
  }
  // batch_events checks every item's tags.
  await assert.rejects(
    sdk.post({ path: '/batch_events', body: { batch: [{ name: 'a', channel: 'c', data: '{}', tags: { zone: 2 } }] } }),
    (e) => e.status === 400,
  );
  await sdk.post({ path: '/batch_events', body: { batch: [{ name: 'batched', channel: 'bad-filter', data: '{}', tags: { zone: 'eu' } }] } });
  await s.waitFor((m) => m.event === 'batched', 'tagged batch event');
});

async function metric(name) {
  const text = await (await fetch(`http://127.0.0.1:${srv.port}/metrics`)).text();
  const m = text.match(new RegExp(`^${name} (\\d+)$`, 'm'));
  return m ? Number(m[1]) : null;
}

test('identity headers sign in from a trusted address and are ignored (and counted) from another', async () => {
  const ignoredBefore = await metric('pushmesh_identity_headers_ignored_total');
  assert.notEqual(ignoredBefore, null);
  const headers = { 'X-User-Id': 'alice', 'X-Device': 'phone', 'X-Zone': 'eu' };
  const trusted = await socket({ headers, localAddress: '127.0.0.1' });
  const ok = await trusted.waitFor((m) => m.event === 'pusher:signin_success', 'signin_success');
  assert.deepEqual(JSON.parse(ok.data.user_data), { id: 'alice' });
  assert.equal((await trusted.subscribe('#server-to-user-alice')).event, 'pusher_internal:subscription_succeeded');

  const forged = await socket({ headers, localAddress: '127.0.0.2' });
  assert.equal((await forged.subscribe('#server-to-user-alice')).event, 'pusher:subscription_error');
  assert.equal(forged.got('pusher:signin_success').length, 0);
  assert.equal(await metric('pushmesh_identity_headers_ignored_total'), ignoredBefore + 1);

  // sendToUser reaches the header-identified connection only.
  await sdk.sendToUser('alice', 'hello', { to: 'alice' });
  const hello = await trusted.waitFor((m) => m.event === 'hello', 'sendToUser');
  assert.deepEqual(hello.data, { to: 'alice' });
  // terminate_connections closes it like a pusher:signin connection (4009).
  await sdk.terminateUserConnections('alice');
  assert.equal(await withTimeout(trusted.closed, 10000, 'terminated'), 4009);
  forged.send({ event: 'pusher:ping', data: {} });
  await forged.waitFor((m) => m.event === 'pusher:pong', 'forged connection still open');
});

test('a publish to #server-to-user-<id> tagged with a device reaches that device only', async () => {
  const phone = await socket({ headers: { 'X-User-Id': 'bob', 'X-Device': 'phone', 'X-Zone': 'eu' } });
  const laptop = await socket({ headers: { 'X-User-Id': 'bob', 'X-Device': 'laptop', 'X-Zone': 'us' } });
  for (const s of [phone, laptop]) {
    await s.waitFor((m) => m.event === 'pusher:signin_success', 'signed in');
    assert.equal((await s.subscribe('#server-to-user-bob')).event, 'pusher_internal:subscription_succeeded');
  }
  await publish('#server-to-user-bob', 'to-phone', {}, { device: 'phone' });
  await publish('#server-to-user-bob', 'to-us', {}, { zone: 'us' });
  await publish('#server-to-user-bob', 'to-tablet', {}, { device: 'tablet' });
  // Without device or zone: every connection of the user (the SDK's sendToUser).
  await sdk.sendToUser('bob', 'to-all', {});
  await Promise.all([phone, laptop].map((s) => s.waitFor((m) => m.event === 'to-all', 'to-all')));
  const events = (s) => s.frames.filter((f) => f.channel === '#server-to-user-bob' && !f.event.startsWith('pusher')).map((f) => f.event);
  assert.deepEqual(events(phone), ['to-phone', 'to-all']);
  assert.deepEqual(events(laptop), ['to-us', 'to-all']);
});

test('wsify join with args.filter and broadcast with tags', async () => {
  const url = `ws://127.0.0.1:${srv.port}/ws?envelope=1`;
  const open = (ws) => withTimeout(new Promise((r) => ws.on('open', r)), 10000, 'wsify open');
  const eu = new WebSocket(url); const us = new WebSocket(url);
  after(() => { eu.terminate(); us.terminate(); });
  await Promise.all([open(eu), open(us)]);
  const got = { eu: [], us: [] };
  eu.on('message', (d) => got.eu.push(JSON.parse(d.toString())));
  us.on('message', (d) => got.us.push(JSON.parse(d.toString())));
  eu.send(JSON.stringify({ command: 'join', args: { channel: 'wz', filter: { zone: 'eu' } } }));
  us.send(JSON.stringify({ command: 'join', args: { channel: 'wz', filter: { zone: 'us' } } }));
  // The joins are in once a broadcast after them arrives (one connection's
  // frames are handled in order): each broadcasts to its own zone.
  eu.send(JSON.stringify({ command: 'broadcast', args: { channel: 'wz', content: { m: 'eu-1' }, tags: { zone: 'eu' } } }));
  us.send(JSON.stringify({ command: 'broadcast', args: { channel: 'wz', content: { m: 'us-1' }, tags: { zone: 'us' } } }));
  await until(() => got.eu.length >= 1 && got.us.length >= 1, 'own-zone broadcasts');
  assert.deepEqual(got.eu.map((e) => e.content.m), ['eu-1']);
  assert.deepEqual(got.us.map((e) => e.content.m), ['us-1']);
  const post = (body) => fetch(`http://127.0.0.1:${srv.port}/broadcast?key=bk`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body),
  });
  const bad = await post({ channel: 'wz', content: { m: 'bad' }, tags: { zone: 7 } });
  assert.equal(bad.status, 400);
  assert.match((await bad.json()).error, /invalid tags/);
  assert.equal((await post({ channel: 'wz', content: { m: 'us-2' }, tags: { zone: 'us' } })).status, 200);
  await until(() => got.us.length === 2, 'POST /broadcast with tags');
  assert.deepEqual(got.us.map((e) => e.content.m), ['us-1', 'us-2']);
  assert.deepEqual(got.eu.map((e) => e.content.m), ['eu-1']);
});

test('pusher-js with the add-on: subscribeWithFilter sends the filter, again after a reconnect', async () => {
  const c = client(srv.port, { authUrl: 'http://127.0.0.1:9' });
  const ch = subscribeWithFilter(c, 'addon-orders', { zone: ['eu', 'ch'] });
  await subscribed(ch);
  const got = [];
  ch.bind_global((e, d) => { if (!e.startsWith('pusher')) got.push(e); });
  await publish('addon-orders', 'eu', {}, { zone: 'eu' });
  await publish('addon-orders', 'us', {}, { zone: 'us' });
  await publish('addon-orders', 'ch', {}, { zone: 'ch' });
  await until(() => got.includes('ch'), 'the matching events');
  assert.deepEqual(got, ['eu', 'ch']);
  // A reconnect resubscribes with the same filter.
  c.disconnect();
  await until(() => c.connection.state === 'disconnected', 'disconnected');
  const again = next(ch, 'pusher:subscription_succeeded', 'resubscribed');
  c.connect();
  await withTimeout(again, 20000, 'resubscribe');
  await publish('addon-orders', 'us-2', {}, { zone: 'us' });
  await publish('addon-orders', 'eu-2', {}, { zone: 'eu' });
  await until(() => got.includes('eu-2'), 'eu-2 after the reconnect');
  assert.deepEqual(got, ['eu', 'ch', 'eu-2']);
  assert.throws(() => validateFilter({ zone: 3 }), TypeError);
});
