// The wsify protocol on /ws with a real WebSocket client (ws), its
// authorizer webhook, POST /broadcast, and the wsify <-> Pusher mapping.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { startServer, serverSdk, client, subscribed, next, until, withTimeout, closeAll, WebSocket, APP, subscribedTo, APP_TOML } from './helpers.mjs';

const servers = [];
const start = async (opts) => { const s = await startServer(opts); servers.push(s); return s; };
const httpServers = [];
after(async () => {
  closeAll();
  for (const s of servers) await s.stop();
  for (const h of httpServers) h.closeAllConnections?.(), h.close();
});

/** A wsify client: frames as parsed JSON. */
async function wsify(port, query = '', headers = {}, localAddress = undefined) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/ws${query}`, { headers, localAddress });
  const frames = [];
  const waiters = [];
  ws.on('message', (d) => {
    const m = JSON.parse(d.toString());
    frames.push(m);
    for (const w of [...waiters]) if (w.pred(m)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(m); }
  });
  const closed = new Promise((r) => ws.on('close', (code, reason) => r({ code, reason: reason.toString() })));
  const opened = await withTimeout(new Promise((resolve) => {
    ws.on('open', () => resolve({ ok: true }));
    ws.on('unexpected-response', (_req, res) => resolve({ ok: false, status: res.statusCode }));
    ws.on('error', () => resolve({ ok: false, status: 0 }));
  }), 10000, 'wsify open');
  return {
    ws, frames, closed, opened,
    send: (o) => ws.send(typeof o === 'string' ? o : JSON.stringify(o)),
    waitFor(pred, what) {
      const f = frames.find(pred);
      if (f) return Promise.resolve(f);
      return withTimeout(new Promise((resolve) => waiters.push({ pred, resolve })), 10000, what);
    },
  };
}

/** Waits until the server counts `n` subscribers of `channel` (wsify joins are not acknowledged). */
async function joined(port, channel, n) {
  const api = serverSdk(port);
  await until(async () => (await (await api.get({ path: `/channels/${channel}`, params: { info: 'subscription_count' } })).json()).subscription_count === n, `${n} members of ${channel}`);
}

/** The authorizer: answers by mode, records every call. */
async function authorizer() {
  const calls = [];
  const state = { mode: 'allow', hung: [] };
  const srv = http.createServer((req, res) => {
    let b = '';
    req.on('data', (d) => { b += d; });
    req.on('end', () => {
      const body = JSON.parse(b || 'null');
      calls.push(body);
      const deny = state.denyChannel && body.args && body.args.channel === state.denyChannel;
      if (state.mode === 'hang') { state.hung.push(res); return; }
      res.writeHead(deny ? 403 : state.mode === 'allow' ? 200 : state.mode === 'deny' ? 403 : 500);
      res.end();
    });
  });
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  httpServers.push(srv);
  return { url: `http://127.0.0.1:${srv.address().port}/authorize`, calls, state };
}

test('join, broadcast, leave; raw and envelope frames; joining twice delivers once', async () => {
  const srv = await start({ args: ['--broadcasting-key', 'bk'] });
  const raw = await wsify(srv.port);
  const env = await wsify(srv.port, '?envelope=1');
  raw.send({ command: 'join', args: { channel: 'hello' } });
  raw.send({ command: 'join', args: { channel: 'hello' } });
  env.send({ command: 'join', args: { channel: 'hello' } });
  // wsify has no join acknowledgement: wait until the server counts both members.
  await joined(srv.port, 'hello', 2);
  env.send({ command: 'broadcast', args: { channel: 'hello', content: { msg: 'hi', n: [1, 2] } } });
  assert.deepEqual(await raw.waitFor((m) => m.msg === 'hi', 'raw content'), { msg: 'hi', n: [1, 2] });
  assert.deepEqual(await env.waitFor((m) => m.content && m.content.msg === 'hi', 'envelope'), { channel: 'hello', content: { msg: 'hi', n: [1, 2] } });
  env.send({ command: 'broadcast', args: { channel: 'hello', content: 'second' } });
  await raw.waitFor((m) => m === 'second', 'second broadcast');
  assert.equal(raw.frames.filter((m) => m.msg === 'hi').length, 1, 'joined twice, delivered once');
  // Leaving a channel never joined does not hang the connection.
  raw.send({ command: 'leave', args: { channel: 'never-joined' } });
  raw.send({ command: 'leave', args: { channel: 'hello' } });
  await joined(srv.port, 'hello', 1);
  env.send({ command: 'broadcast', args: { channel: 'hello', content: 'third' } });
  await env.waitFor((m) => m.content === 'third', 'third at env');
  // A marker to raw on another channel proves 'third' never reached it.
  raw.send({ command: 'join', args: { channel: 'marker' } });
  const r = await fetch(`http://127.0.0.1:${srv.port}/broadcast?key=bk`, {
    method: 'POST', headers: { 'content-type': 'application/json; charset=utf-8' },
    body: JSON.stringify({ channel: 'marker', content: 'mark' }),
  });
  assert.equal(r.status, 200);
  await raw.waitFor((m) => m === 'mark', 'marker');
  assert.ok(!raw.frames.includes('third'), 'left channel gets nothing');
});

test('malformed frames: error frame in envelope mode, never a re-run of the previous command', async () => {
  const srv = await start();
  const env = await wsify(srv.port, '?envelope=1');
  const other = await wsify(srv.port);
  other.send({ command: 'join', args: { channel: 'room' } });
  env.send({ command: 'join', args: { channel: 'room' } });
  await joined(srv.port, 'room', 2);
  env.send({ command: 'broadcast', args: { channel: 'room', content: 1 } });
  await other.waitFor((m) => m === 1, 'first broadcast');
  env.send('{garbage');
  const e1 = await env.waitFor((m) => m.error, 'error frame');
  assert.match(e1.error.message, /invalid frame/);
  env.send({ command: 'dance', args: {} });
  await until(() => env.frames.filter((m) => m.error).length === 2, 'unknown command error');
  env.send({ command: 'join', args: { channel: 'private-secret' } });
  await until(() => env.frames.filter((m) => m.error).length === 3, 'private channel refused');
  assert.equal(env.frames.filter((m) => m.error)[2].error.command, 'join');
  env.send({ command: 'broadcast', args: { channel: 'room', content: 2 } });
  await other.waitFor((m) => m === 2, 'second broadcast');
  assert.deepEqual(other.frames, [1, 2], 'the broadcast was not re-run by bad frames');
  assert.equal(env.ws.readyState, 1);
});

test('wsify and Pusher share channels, with a real pusher-js client', async () => {
  const srv = await start();
  const sdk = serverSdk(srv.port);
  const [pjs, ch] = await subscribedTo(srv.port, 'shared');
  const w = await wsify(srv.port);
  w.send({ command: 'join', args: { channel: 'shared' } });
  await until(async () => (await (await sdk.get({ path: '/channels/shared', params: { info: 'subscription_count' } })).json()).subscription_count === 2, 'both subscribed');
  // Pusher event -> wsify content (data parsed as JSON when it is JSON).
  await sdk.trigger('shared', 'update', { price: 10 });
  assert.deepEqual(await w.waitFor((m) => m.price === 10, 'pusher->wsify'), { price: 10 });
  await sdk.trigger('shared', 'note', 'plain string');
  await w.waitFor((m) => m === 'plain string', 'string data');
  // wsify broadcast -> Pusher event "broadcast".
  const p = next(ch, 'broadcast');
  w.send({ command: 'broadcast', args: { channel: 'shared', content: { from: 'wsify' } } });
  assert.deepEqual(await p, { from: 'wsify' });
});

test('POST /broadcast: both body forms, key required, JSON errors', async () => {
  const srv = await start({ args: ['--broadcasting-key', 'sekrit'] });
  const w = await wsify(srv.port);
  w.send({ command: 'join', args: { channel: 'news' } });
  const post = (q, body, type = 'application/json') => fetch(`http://127.0.0.1:${srv.port}/broadcast${q}`, { method: 'POST', headers: { 'content-type': type }, body });
  // Wait until joined: a broadcast that arrives proves it.
  await until(async () => { await post('?key=sekrit', JSON.stringify({ channel: 'news', content: 'ping' })); return w.frames.includes('ping'); }, 'joined');
  let r = await post('?key=sekrit', JSON.stringify({ channel: 'news', args: { content: { form: 2 } } }));
  assert.equal(r.status, 200);
  await w.waitFor((m) => m.form === 2, 'args form');
  r = await post('?key=wrong', JSON.stringify({ channel: 'news', content: 1 }));
  assert.equal(r.status, 403); assert.ok((await r.json()).error);
  r = await post('', JSON.stringify({ channel: 'news', content: 1 }));
  assert.equal(r.status, 403);
  r = await post('?key=sekrit', '{nope');
  assert.equal(r.status, 400); assert.ok((await r.json()).error);
  r = await post('?key=sekrit', JSON.stringify({ channel: 'news' }));
  assert.equal(r.status, 400);
  // Configured apps and no key: refused.
  const prod = await start({ args: ['--app', 'a:b:c'] });
  r = await fetch(`http://127.0.0.1:${prod.port}/broadcast`, { method: 'POST', body: JSON.stringify({ channel: 'x', content: 1 }) });
  assert.equal(r.status, 403);
  assert.match((await r.json()).error, /no broadcasting key/);
});

test('authorizer: 200 allows, 403 refuses, 500 closes for reconnect, a hang closes after the timeout', async () => {
  const authz = await authorizer();
  const srv = await start({ configToml: `
${APP_TOML}[apps.authorizer]
url = "${authz.url}"
timeout_ms = 500
` });
  // connect: allowed, with headers and query as objects of string arrays.
  const ok = await wsify(srv.port, '?envelope=1&token=abc&token=def', { 'x-user': 'u1' });
  assert.equal(ok.opened.ok, true);
  const connect = authz.calls.find((c) => c.command === 'connect');
  assert.deepEqual(connect.args.query.token, ['abc', 'def']);
  assert.deepEqual(connect.args.headers['x-user'], ['u1']);
  // join allowed; a join of a denied channel refused with an error frame.
  authz.state.denyChannel = 'vault';
  ok.send({ command: 'join', args: { channel: 'lobby' } });
  ok.send({ command: 'join', args: { channel: 'vault' } });
  const err = await ok.waitFor((m) => m.error, 'refused join');
  assert.equal(err.error.command, 'join');
  const joinCall = authz.calls.find((c) => c.command === 'join' && c.args.channel === 'lobby');
  assert.ok(joinCall.connection.id, 'connection identity sent');
  assert.deepEqual(joinCall.connection.query.token, ['abc', 'def']);
  // connect refused: HTTP 403; authorizer down: HTTP 503.
  authz.state.mode = 'deny';
  assert.deepEqual((await wsify(srv.port)).opened, { ok: false, status: 403 });
  authz.state.mode = 'down';
  assert.deepEqual((await wsify(srv.port)).opened, { ok: false, status: 503 });
  // 500 on a command: closed so the client reconnects (1013).
  ok.send({ command: 'broadcast', args: { channel: 'lobby', content: 1 } });
  assert.equal((await withTimeout(ok.closed, 10000, 'close on 500')).code, 1013);
  // Hanging authorizer: closed after the 500 ms timeout, not stuck.
  authz.state.mode = 'allow';
  const slow = await wsify(srv.port);
  authz.state.mode = 'hang';
  slow.send({ command: 'join', args: { channel: 'lobby' } });
  assert.equal((await withTimeout(slow.closed, 10000, 'close after timeout')).code, 1013);
  // The node stays healthy with the authorizer down, and notified disconnects.
  for (const r of authz.state.hung) r.destroy();
  authz.state.mode = 'down';
  const h = await fetch(`http://127.0.0.1:${srv.port}/healthz`);
  assert.equal(h.status, 200);
  const stats = await (await fetch(`http://127.0.0.1:${srv.port}/stats`)).json();
  assert.ok(stats.authorizer.allowed >= 2 && stats.authorizer.refused >= 2 && stats.authorizer.unavailable >= 3, JSON.stringify(stats.authorizer));
  await until(() => authz.calls.some((c) => c.command === 'disconnect'), 'disconnect notified');
  assert.ok(authz.calls.some((c) => c.command === 'leave' && c.args.channel === 'lobby'), 'implied leave notified');
});

test('the authorizer never sees identity headers sent by an untrusted client', async () => {
  const authz = await authorizer();
  const srv = await start({ configToml: `
trusted_proxies = ["127.0.0.1/32"]
[identity_headers]
user = "X-User-Id"
device = "X-Device"
${APP_TOML}[apps.authorizer]
url = "${authz.url}"
` });
  const headers = { 'X-User-Id': 'alice', 'X-Device': 'phone', 'X-Other': 'kept' };
  // From the balancer (trusted): the authorizer sees what the balancer set.
  const viaBalancer = await wsify(srv.port, '?from=trusted', headers, '127.0.0.1');
  assert.equal(viaBalancer.opened.ok, true);
  // From anyone else: the forged identity is dropped, other headers stay.
  const forged = await wsify(srv.port, '?from=untrusted', headers, '127.0.0.2');
  assert.equal(forged.opened.ok, true);
  const connectOf = (from) => authz.calls.find((c) => c.command === 'connect' && c.args.query.from?.[0] === from);
  const trusted = connectOf('trusted').args.headers;
  assert.deepEqual(trusted['x-user-id'], ['alice']);
  assert.deepEqual(trusted['x-device'], ['phone']);
  const untrusted = connectOf('untrusted').args.headers;
  assert.equal(untrusted['x-user-id'], undefined, JSON.stringify(untrusted));
  assert.equal(untrusted['x-device'], undefined);
  assert.deepEqual(untrusted['x-other'], ['kept']);
  viaBalancer.ws.terminate();
  forged.ws.terminate();
});

test('keepalive pings wsify clients; graceful shutdown closes them with 1012', async () => {
  const srv = await startServer({ configToml: `activity_timeout = 1\npong_timeout = 1\n` });
  const w = await wsify(srv.port);
  const pinged = new Promise((r) => w.ws.once('ping', r));
  await withTimeout(pinged, 10000, 'websocket ping');
  // ws answers pings automatically: still open after the pong timeout has passed twice.
  await withTimeout(new Promise((r) => w.ws.once('ping', r)), 10000, 'second ping');
  assert.equal(w.ws.readyState, 1);
  srv.child.kill('SIGTERM');
  assert.equal((await withTimeout(w.closed, 10000, 'close on shutdown')).code, 1012);
  assert.equal((await srv.exited).code, 0);
});
