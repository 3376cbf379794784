// Message history and recovery on one node (issue 12), with real clients:
// stock pusher-js on a history channel, pusher-js with the JS add-on
// (clients/js) across a reconnect, raw frames, wsify, and the signed HTTP
// history endpoint read with the Node SDK (`pusher.get`). Multi-node
// recovery is in cluster-tests/history.test.mjs.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, serverSdk, client, subscribed, next, until, withTimeout, closeAll, rawSocket, startAuthServer, WebSocket, APP, APP_TOML } from './helpers.mjs';
import { withRecovery } from '../../../../clients/js/index.js';

/** A raw socket that subscribed with `data` and got `subscription_succeeded` (`what` names the wait): [socket, that frame]. */
async function rawSubscriber(port, data, what) {
  const r = await rawSocket(port);
  r.send({ event: 'pusher:subscribe', data });
  const ok = await r.waitFor((m) => m.event === 'pusher_internal:subscription_succeeded', what);
  return [r, ok];
}

const servers = [];
const auths = [];
after(async () => {
  closeAll();
  for (const a of auths) await a.close();
  for (const s of servers) await s.stop();
});

const CONFIG = `
${APP_TOML}[apps.history]
channels = ["chat-*", "presence-room-*", "small-*"]
max_events = 50
ttl_secs = 300
`;

let srv;
async function server() {
  if (!srv) {
    // small-* shares the app's max_events: eviction is tested with 60 > 50.
    srv = await startServer({ configToml: CONFIG });
    servers.push(srv);
  }
  return srv;
}

test('stock pusher-js on a history channel: events as before, each frame carries a position', async () => {
  const s = await server();
  const sdk = serverSdk(s.port);
  const c = client(s.port);
  const ch = c.subscribe('chat-stock');
  await subscribed(ch);
  const got = [];
  ch.bind('m', (d) => got.push(d));
  const [raw, ok] = await rawSubscriber(s.port, { channel: 'chat-stock' }, 'raw subscribed');
  assert.equal(typeof ok.data.position, 'string', 'subscription_succeeded gives the current position');
  assert.equal(ok.data.recovered, undefined, 'no position asked: no recovered field');
  for (let i = 0; i < 3; i++) await sdk.trigger('chat-stock', 'm', { i });
  await until(() => got.length === 3, 'pusher-js got 3 events');
  assert.deepEqual(got.map((d) => d.i), [0, 1, 2]);
  await raw.waitFor((m) => m.event === 'm' && m.data.i === 2, 'raw got the third');
  const events = raw.frames.filter((m) => m.event === 'm');
  const positions = events.map((m) => m.position);
  assert.ok(positions.every((p) => typeof p === 'string' && p.length > 0), `positions ${positions}`);
  assert.equal(new Set(positions).size, 3, 'each event has its own position');
  // A channel without history: frames exactly as before.
  raw.send({ event: 'pusher:subscribe', data: { channel: 'plain' } });
  const plainOk = await raw.waitFor((m) => m.event === 'pusher_internal:subscription_succeeded' && m.channel === 'plain', 'plain subscribed');
  assert.deepEqual(plainOk.data, {});
  await sdk.trigger('plain', 'p', { x: 1 });
  const p = await raw.waitFor((m) => m.event === 'p', 'plain event');
  assert.equal(p.position, undefined);
});

test('raw frames: recovery after the given position, in order, once; unknown position is recovered:false', async () => {
  const s = await server();
  const sdk = serverSdk(s.port);
  const [a] = await rawSubscriber(s.port, { channel: 'chat-raw' }, 'a subscribed');
  for (let i = 0; i < 5; i++) await sdk.trigger('chat-raw', 'm', { i });
  const fifth = await a.waitFor((m) => m.event === 'm' && m.data.i === 4, 'a got 5');
  a.close();
  for (let i = 5; i < 25; i++) await sdk.trigger('chat-raw', 'm', { i });
  const [b, ok] = await rawSubscriber(s.port, { channel: 'chat-raw', position: fifth.position }, 'b subscribed');
  assert.equal(ok.data.recovered, true);
  await b.waitFor((m) => m.event === 'm' && m.data.i === 24, 'b replayed up to 24');
  await sdk.trigger('chat-raw', 'm', { i: 25 });
  await b.waitFor((m) => m.event === 'm' && m.data.i === 25, 'b live 25');
  const is = b.frames.filter((m) => m.event === 'm').map((m) => m.data.i);
  assert.deepEqual(is, Array.from({ length: 21 }, (_, k) => k + 5), 'every missed event once, in order, then live');
  const replayedLast = b.frames.find((m) => m.event === 'm' && m.data.i === 24);
  assert.equal(replayedLast.position, ok.data.position, 'the replay ends at the position subscription_succeeded gave');
  // Positions that cannot be continued.
  for (const position of ['ffff.3', 'not a position', '']) {
    const [c, r] = await rawSubscriber(s.port, { channel: 'chat-raw', position }, `answer for ${JSON.stringify(position)}`);
    assert.equal(r.data.recovered, false, `position ${JSON.stringify(position)}`);
    await sdk.trigger('chat-raw', 'm', { i: `live-${position}` });
    await c.waitFor((m) => m.event === 'm' && m.data.i === `live-${position}`, 'live after recovered:false');
    assert.equal(c.frames.filter((m) => m.event === 'm').length, 1, 'only live events follow');
    c.close();
  }
});

test('a position older than max_events is recovered:false, then only live events', async () => {
  const s = await server();
  const sdk = serverSdk(s.port);
  const [a] = await rawSubscriber(s.port, { channel: 'small-1' }, 'subscribed');
  await sdk.trigger('small-1', 'm', { i: 0 });
  const first = await a.waitFor((m) => m.event === 'm', 'first');
  a.close();
  for (let i = 1; i <= 60; i++) await sdk.trigger('small-1', 'm', { i });
  const [b, r] = await rawSubscriber(s.port, { channel: 'small-1', position: first.position }, 'answer');
  assert.equal(r.data.recovered, false, 'evicted events cannot be replayed');
  await sdk.trigger('small-1', 'm', { i: 61 });
  await b.waitFor((m) => m.event === 'm' && m.data.i === 61, 'live');
  assert.deepEqual(b.frames.filter((m) => m.event === 'm').map((m) => m.data.i), [61]);
});

test('pusher-js with the add-on: disconnect, 20 publishes, reconnect: all 20 in order, once, recovered:true', async () => {
  const s = await server();
  const sdk = serverSdk(s.port);
  const c = client(s.port);
  const rec = withRecovery(c);
  const ch = c.subscribe('chat-addon');
  await subscribed(ch);
  const got = [];
  ch.bind('m', (d) => got.push(d.i));
  const recoveries = [];
  ch.bind('pushmesh:recovery', (r) => recoveries.push(r));
  await sdk.trigger('chat-addon', 'm', { i: 0 });
  await until(() => got.length === 1, 'first event');
  assert.ok(rec.position('chat-addon'), 'the add-on remembers the position');
  c.disconnect();
  await until(() => c.connection.state === 'disconnected', 'disconnected');
  for (let i = 1; i <= 20; i++) await sdk.trigger('chat-addon', 'm', { i });
  c.connect();
  await until(() => recoveries.length === 1, 'resubscribed with a position', 20000);
  assert.equal(recoveries[0].recovered, true);
  assert.equal(rec.recovered('chat-addon'), true);
  await until(() => got.length === 21, 'all 20 replayed', 20000);
  await sdk.trigger('chat-addon', 'm', { i: 21 });
  await until(() => got.length === 22, 'then live');
  assert.deepEqual(got, Array.from({ length: 22 }, (_, k) => k));
  rec.detach();
});

test('presence channel: recovered and position beside the members', async () => {
  const s = await server();
  const sdk = serverSdk(s.port);
  const auth = await startAuthServer(sdk);
  auths.push(auth);
  const a = client(s.port, { authUrl: auth.url, user: 'alice' });
  const rec = withRecovery(a);
  const ch = a.subscribe('presence-room-1');
  await subscribed(ch);
  const got = [];
  ch.bind('m', (d) => got.push(d.i));
  await sdk.trigger('presence-room-1', 'm', { i: 0 });
  await until(() => got.length === 1, 'first');
  a.disconnect();
  await until(() => a.connection.state === 'disconnected', 'disconnected');
  for (let i = 1; i <= 3; i++) await sdk.trigger('presence-room-1', 'm', { i });
  const succeeded = next(ch, 'pusher:subscription_succeeded', 'resubscribed');
  a.connect();
  const members = await withTimeout(succeeded, 20000, 'presence resubscribe');
  assert.equal(members.count, 1, 'members as before');
  await until(() => got.length === 4, 'replayed');
  assert.deepEqual(got, [0, 1, 2, 3]);
  assert.equal(rec.recovered('presence-room-1'), true);
  rec.detach();
});

test('wsify: join with args.position replays; envelope frames carry position', async () => {
  const s = await server();
  const sdk = serverSdk(s.port);
  const open = async () => {
    const ws = new WebSocket(`ws://127.0.0.1:${s.port}/ws?envelope=1`);
    const frames = [];
    ws.on('message', (d) => frames.push(JSON.parse(d.toString())));
    await withTimeout(new Promise((r) => ws.on('open', r)), 10000, 'wsify open');
    return { ws, frames };
  };
  const a = await open();
  a.ws.send(JSON.stringify({ command: 'join', args: { channel: 'chat-ws' } }));
  // Joined once a publish reaches it (wsify has no join answer).
  await until(async () => { await sdk.trigger('chat-ws', 'm', { i: 'probe' }); return a.frames.length > 0; }, 'joined');
  // A last mark after every probe (one publisher: in order), then its position.
  await sdk.trigger('chat-ws', 'm', { i: 'mark' });
  await until(() => a.frames.some((f) => f.content.i === 'mark'), 'mark');
  const pos = a.frames.find((f) => f.content.i === 'mark').position;
  assert.equal(typeof pos, 'string');
  a.ws.close();
  for (let i = 0; i < 3; i++) await sdk.trigger('chat-ws', 'm', { i });
  const b = await open();
  b.ws.send(JSON.stringify({ command: 'join', args: { channel: 'chat-ws', position: pos } }));
  await until(() => b.frames.length === 3, 'replayed to wsify');
  assert.deepEqual(b.frames.map((f) => f.content.i), [0, 1, 2]);
  assert.ok(b.frames.every((f) => f.channel === 'chat-ws' && typeof f.position === 'string'));
  b.ws.close();
});

test('a filtered subscription recovers only the events its filter selects', async () => {
  const s = await server();
  const sdk = serverSdk(s.port);
  const publish = (name, tags) => sdk.post({ path: '/events', body: { name, channel: 'chat-filtered', data: '{}', tags } });
  const [a] = await rawSubscriber(s.port, { channel: 'chat-filtered', filter: { zone: 'eu' } }, 'a subscribed');
  await publish('eu-0', { zone: 'eu' });
  const first = await a.waitFor((m) => m.event === 'eu-0', 'a got eu-0');
  a.close();
  await publish('us-1', { zone: 'us' });
  await publish('eu-2', { zone: 'eu' });
  await publish('none-3', {});
  await publish('eu-4', { zone: 'eu' });
  const [b, ok] = await rawSubscriber(s.port, { channel: 'chat-filtered', filter: { zone: 'eu' }, position: first.position }, 'b subscribed');
  assert.equal(ok.data.recovered, true);
  await publish('eu-5', { zone: 'eu' });
  await b.waitFor((m) => m.event === 'eu-5', 'live eu-5');
  assert.deepEqual(b.frames.filter((m) => m.channel === 'chat-filtered' && !m.event.startsWith('pusher')).map((m) => m.event), ['eu-2', 'eu-4', 'eu-5']);
});

test('HTTP history: signed GET with limit and after; 404 without history; 400 on bad input', async () => {
  const s = await server();
  const sdk = serverSdk(s.port);
  for (let i = 0; i < 5; i++) await sdk.trigger('chat-http', 'm', { i });
  const all = await (await sdk.get({ path: '/channels/chat-http/history' })).json();
  assert.deepEqual(all.events.map((e) => JSON.parse(e.data).i), [0, 1, 2, 3, 4]);
  assert.equal(all.complete, true);
  assert.equal(all.position, all.events.at(-1).position);
  assert.ok(all.events.every((e) => e.name === 'm' && e.published_at_ms > 1.7e12));
  const two = await (await sdk.get({ path: '/channels/chat-http/history', params: { limit: 2 } })).json();
  assert.deepEqual(two.events.map((e) => JSON.parse(e.data).i), [3, 4], 'the latest two');
  const after = await (await sdk.get({ path: '/channels/chat-http/history', params: { after: all.events[1].position } })).json();
  assert.deepEqual(after.events.map((e) => JSON.parse(e.data).i), [2, 3, 4]);
  assert.equal(after.complete, true);
  const none = await sdk.get({ path: '/channels/plain/history' }).then(() => null, (e) => e);
  assert.equal(none.status, 404);
  assert.match(JSON.parse(none.body).error, /keeps no history/);
  for (const params of [{ limit: 0 }, { limit: 'x' }, { limit: 5000 }, { after: '!!' }]) {
    const bad = await sdk.get({ path: '/channels/chat-http/history', params }).then(() => null, (e) => e);
    assert.equal(bad?.status, 400, JSON.stringify(params));
    assert.ok(JSON.parse(bad.body).error);
  }
});

test('metrics count history and recoveries', async () => {
  const s = await server();
  const text = await (await fetch(`http://127.0.0.1:${s.port}/metrics`)).text();
  const n = (re) => Number((text.match(re) || [])[1]);
  assert.ok(n(/^pushmesh_history_events (\d+)/m) > 0);
  assert.ok(n(/^pushmesh_history_bytes (\d+)/m) > 0);
  assert.ok(n(/^pushmesh_history_evicted_total\{reason="max_events"\} (\d+)/m) >= 11);
  assert.ok(n(/^pushmesh_history_recoveries_total\{recovered="true"\} (\d+)/m) >= 2);
  assert.ok(n(/^pushmesh_history_recoveries_total\{recovered="false"\} (\d+)/m) >= 4);
});
