// HTTP API with the Node SDK, and user sign-in / sendToUser / terminate / watchlist.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { startWithAuth, serverSdk, connected, subscribed, next, collect, until, rawSocket, APP } from './helpers.mjs';

let srv, sdk, auth, mk, stop;
before(async () => ({ srv, sdk, auth, mk, stop } = await startWithAuth()));
after(() => stop());

test('socket_id exclusion leaves out the sender only', async () => {
  const a = mk(); const b = mk();
  const chA = a.subscribe('excl'); const chB = b.subscribe('excl');
  await Promise.all([subscribed(chA), subscribed(chB)]);
  const atA = collect(chA, 'ev');
  const atB = next(chB, 'ev');
  await sdk.trigger('excl', 'ev', { n: 1 }, { socket_id: a.connection.socket_id });
  assert.deepEqual(await atB, { n: 1 });
  const marker = next(chA, 'marker');
  await sdk.trigger('excl', 'marker', {});
  await marker;
  assert.equal(atA.length, 0, 'the excluded socket got nothing');
});

test('triggerBatch delivers every event, in order', async () => {
  const a = mk();
  const ch1 = a.subscribe('batch-1'); const ch2 = a.subscribe('batch-2');
  await Promise.all([subscribed(ch1), subscribed(ch2)]);
  const got = [];
  ch1.bind_global((e, d) => { if (!e.startsWith('pusher')) got.push(['batch-1', e, d]); });
  ch2.bind_global((e, d) => { if (!e.startsWith('pusher')) got.push(['batch-2', e, d]); });
  await sdk.triggerBatch([
    { channel: 'batch-1', name: 'a', data: { i: 1 } },
    { channel: 'batch-2', name: 'b', data: { i: 2 } },
    { channel: 'batch-1', name: 'c', data: 'three' },
  ]);
  await until(() => got.length === 3, 'three batch events');
  assert.deepEqual(got, [['batch-1', 'a', { i: 1 }], ['batch-2', 'b', { i: 2 }], ['batch-1', 'c', 'three']]);
  const tooMany = Array.from({ length: 11 }, (_, i) => ({ channel: 'batch-1', name: 'x', data: String(i) }));
  await assert.rejects(sdk.triggerBatch(tooMany), (e) => e.status === 400);
});

test('trigger with info returns channel attributes', async () => {
  const a = mk({ user: 'zed' });
  const ch = a.subscribe('presence-info');
  await subscribed(ch);
  const res = await sdk.trigger('presence-info', 'e', {}, { info: 'user_count,subscription_count' });
  assert.deepEqual(await res.json(), { channels: { 'presence-info': { user_count: 1, subscription_count: 1 } } });
});

test('channel queries: list, info, users', async () => {
  const a = mk({ user: 'q1' });
  await Promise.all([subscribed(a.subscribe('query-pub')), subscribed(a.subscribe('presence-query'))]);
  const list = await (await sdk.get({ path: '/channels' })).json();
  assert.ok(list.channels['query-pub'], 'occupied public channel listed');
  assert.ok(list.channels['presence-query']);
  assert.ok(!list.channels['never-used']);
  const pres = await (await sdk.get({ path: '/channels', params: { filter_by_prefix: 'presence-', info: 'user_count' } })).json();
  assert.ok(Object.keys(pres.channels).every((c) => c.startsWith('presence-')));
  assert.equal(pres.channels['presence-query'].user_count, 1);
  const one = await (await sdk.get({ path: '/channels/query-pub', params: { info: 'subscription_count' } })).json();
  assert.deepEqual(one, { occupied: true, subscription_count: 1 });
  const empty = await (await sdk.get({ path: '/channels/nobody-here' })).json();
  assert.deepEqual(empty, { occupied: false });
  const users = await (await sdk.get({ path: '/channels/presence-query/users' })).json();
  assert.deepEqual(users, { users: [{ id: 'q1' }] });
  await assert.rejects(sdk.get({ path: '/channels/query-pub/users' }), (e) => e.status === 400);
  await assert.rejects(sdk.get({ path: '/channels/query-pub', params: { info: 'user_count' } }), (e) => e.status === 400);
});

function signedUrl(method, path, body, { timestamp, secret = APP.secret } = {}) {
  const params = { auth_key: APP.key, auth_timestamp: String(timestamp), auth_version: '1.0' };
  if (body) params.body_md5 = crypto.createHash('md5').update(body).digest('hex');
  const q = Object.keys(params).sort().map((k) => `${k}=${params[k]}`).join('&');
  const sig = crypto.createHmac('sha256', secret).update(`${method}\n${path}\n${q}`).digest('hex');
  return `http://127.0.0.1:${srv.port}${path}?${q}&auth_signature=${sig}`;
}

test('stale timestamps and bad signatures are refused with 401 and a JSON body', async () => {
  const body = JSON.stringify({ name: 'e', channel: 'x', data: '{}' });
  const path = `/apps/${APP.id}/events`;
  const now = Math.floor(Date.now() / 1000);
  const ok = await fetch(signedUrl('POST', path, body, { timestamp: now }), { method: 'POST', body, headers: { 'content-type': 'application/json' } });
  assert.equal(ok.status, 200);
  const stale = await fetch(signedUrl('POST', path, body, { timestamp: now - 601 }), { method: 'POST', body, headers: { 'content-type': 'application/json' } });
  assert.equal(stale.status, 401);
  assert.match((await stale.json()).error, /auth_timestamp/);
  const bad = await fetch(signedUrl('POST', path, body, { timestamp: now, secret: 'wrong' }), { method: 'POST', body, headers: { 'content-type': 'application/json' } });
  assert.equal(bad.status, 401);
  assert.match((await bad.json()).error, /signature/);
  const wrongSdk = serverSdk(srv.port, { secret: 'not-the-secret' });
  await assert.rejects(wrongSdk.trigger('x', 'e', {}), (e) => e.status === 401);
  const unknownApp = serverSdk(srv.port, { appId: 'nope' });
  await assert.rejects(unknownApp.trigger('x', 'e', {}), (e) => e.status === 404);
});

test('bad API bodies get 400/413 with a JSON error', async () => {
  const now = Math.floor(Date.now() / 1000);
  const path = `/apps/${APP.id}/events`;
  const post = (body) => fetch(signedUrl('POST', path, body, { timestamp: now }), { method: 'POST', body, headers: { 'content-type': 'application/json' } });
  let r = await post('{not json');
  assert.equal(r.status, 400); assert.ok((await r.json()).error);
  r = await post(JSON.stringify({ name: 'e', channel: 'bad channel!', data: '{}' }));
  assert.equal(r.status, 400); assert.match((await r.json()).error, /channel/);
  r = await post(JSON.stringify({ name: 'e', channels: Array.from({ length: 101 }, (_, i) => `c${i}`), data: '{}' }));
  assert.equal(r.status, 400);
  r = await post(JSON.stringify({ name: 'e', channel: 'x', data: 'x'.repeat(10 * 1024 + 1) }));
  assert.equal(r.status, 413); assert.match((await r.json()).error, /larger/);
  await assert.rejects(sdk.trigger('x', 'e', 'y'.repeat(10 * 1024 + 10)), (e) => e.status === 413);
});

test('sign-in and sendToUser reach every connection of the user and only them', async () => {
  const u1a = mk({ user: 'user-1' }); const u1b = mk({ user: 'user-1' }); const u2 = mk({ user: 'user-2' });
  for (const c of [u1a, u1b, u2]) {
    const ok = next(c.connection, 'connected');
    c.signin();
    await ok.catch(() => {});
  }
  // pusher-js subscribes to #server-to-user-<id> after signin_success; wait for it.
  await until(() => [u1a, u1b, u2].every((c) => c.user.serverToUserChannel && c.user.serverToUserChannel.subscribed), 'server-to-user channels');
  const gotA = next(u1a.user, 'notice'); const gotB = next(u1b.user, 'notice');
  const at2 = collect(u2.user, 'notice');
  await sdk.sendToUser('user-1', 'notice', { hello: 'user-1' });
  assert.deepEqual(await gotA, { hello: 'user-1' });
  assert.deepEqual(await gotB, { hello: 'user-1' });
  const marker = next(u2.user, 'marker');
  await sdk.sendToUser('user-2', 'marker', {});
  await marker;
  assert.equal(at2.length, 0, 'user-2 got nothing meant for user-1');

  // Nobody else can join #server-to-user-user-1 (pusher-js will not even try; a raw socket does).
  const raw = await rawSocket(srv.port);
  raw.send({ event: 'pusher:subscribe', data: { channel: '#server-to-user-user-1' } });
  const err = await raw.waitFor((m) => m.event === 'pusher:subscription_error', 'subscription_error');
  assert.equal(err.data.status, 401);
  raw.close();

  // terminateUserConnections closes both of user-1's connections, not user-2's.
  const closed = [u1a, u1b].map((c) => next(c.connection, 'error', 'terminate error'));
  await sdk.terminateUserConnections('user-1');
  for (const e of await Promise.all(closed)) assert.equal(e.data.code, 4009);
  await until(() => u1a.connection.state !== 'connected' && u1b.connection.state !== 'connected', 'user-1 disconnected');
  assert.equal(u2.connection.state, 'connected');
});

test('watchlist online and offline events', async () => {
  const watcher = mk({ user: 'watcher', watchlist: ['w-friend', 'w-other'] });
  const events = [];
  watcher.user.watchlist.bind('online', (e) => events.push(['online', e.user_ids]));
  watcher.user.watchlist.bind('offline', (e) => events.push(['offline', e.user_ids]));
  watcher.signin();
  await until(() => events.length === 1, 'initial watchlist state');
  assert.deepEqual(events[0], ['online', []]);
  const friend = mk({ user: 'w-friend' });
  friend.signin();
  await until(() => events.length === 2, 'online event');
  assert.deepEqual(events[1], ['online', ['w-friend']]);
  friend.disconnect();
  await until(() => events.length === 3, 'offline event');
  assert.deepEqual(events[2], ['offline', ['w-friend']]);
});
