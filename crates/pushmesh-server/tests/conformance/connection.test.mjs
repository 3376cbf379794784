// Connection handshake, keepalive, error codes and bad input, with raw sockets and pusher-js.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { startServer, serverSdk, rawSocket, client, next, subscribed, until, withTimeout, cleanEnv, BIN, APP, subscribedTo, APP_TOML } from './helpers.mjs';
import { closeAll } from './helpers.mjs';

const servers = [];
const start = async (opts) => { const s = await startServer(opts); servers.push(s); return s; };
after(async () => {
  closeAll(); for (const s of servers) await s.stop(); });

const established = (r) => r.waitFor((m) => m.event === 'pusher:connection_established', 'connection_established');

test('handshake: socket_id and activity_timeout; pusher:ping answered', async () => {
  const srv = await start();
  const r = await rawSocket(srv.port);
  const est = await established(r);
  assert.match(est.data.socket_id, /^\d+\.\d+$/);
  assert.equal(est.data.activity_timeout, 120);
  r.send({ event: 'pusher:ping', data: {} });
  await r.waitFor((m) => m.event === 'pusher:pong', 'pong');
  r.close();
  // Missing protocol is taken as 7.
  const r2 = await rawSocket(srv.port, `/app/${APP.key}`);
  await established(r2);
  r2.close();
});

test('refusals: unknown key 4001, bad protocol 4006/4007, unknown path 404', async () => {
  const srv = await start();
  for (const [path, code] of [[`/app/nope?protocol=7`, 4001], [`/app/${APP.key}?protocol=3`, 4007], [`/app/${APP.key}?protocol=x`, 4006]]) {
    const r = await rawSocket(srv.port, path);
    const err = await r.waitFor((m) => m.event === 'pusher:error', `error for ${path}`);
    assert.equal(err.data.code, code);
    assert.equal((await withTimeout(r.closed, 10000, 'close')).code, code);
  }
  const res = await fetch(`http://127.0.0.1:${srv.port}/nowhere`);
  assert.equal(res.status, 404);
  assert.ok((await res.json()).error);
});

test('bad input gets errors and never affects other connections', async () => {
  const srv = await start();
  const sdk = serverSdk(srv.port);
  const [bystander, bch] = await subscribedTo(srv.port, 'bystander');
  const r = await rawSocket(srv.port);
  await established(r);
  const errors = () => r.frames.filter((m) => m.event === 'pusher:error');
  const expectError = async (payload, re, what) => {
    const before = errors().length;
    r.send(payload);
    await until(() => errors().length > before, what);
    assert.match(errors()[before].data.message, re, what);
  };
  await expectError('{not json', /invalid JSON/i, 'malformed JSON');
  await expectError('[1,2]', /invalid JSON/i, 'not an object');
  await expectError({ event: 'pusher:bogus' }, /unsupported event/, 'unknown event');
  await expectError({ event: 'pusher:subscribe', data: { channel: 'bad name!' } }, /invalid channel name/, 'invalid channel name');
  await expectError({ event: 'pusher:subscribe', data: { channel: 'x'.repeat(165) } }, /longer than 164/, 'long channel name');
  await expectError({ event: 'pusher:subscribe', data: {} }, /invalid pusher:subscribe/, 'subscribe without channel');
  const before = errors().length;
  r.ws.send(Buffer.from([1, 2, 3]), { binary: true });
  await until(() => errors().length > before, 'binary frame error');
  assert.match(errors()[before].data.message, /binary/);
  r.send({ event: 'pusher:subscribe', data: { channel: 'private-x', auth: 'garbage' } });
  const se = await r.waitFor((m) => m.event === 'pusher:subscription_error', 'subscription_error for garbage auth');
  assert.equal(se.data.status, 401);
  // The same connection still works.
  r.send({ event: 'pusher:subscribe', data: { channel: 'fine' } });
  await r.waitFor((m) => m.event === 'pusher_internal:subscription_succeeded' && m.channel === 'fine', 'subscribe after errors');
  // An oversize frame closes that connection only (1009, message too big).
  r.send(JSON.stringify({ event: 'client-x', channel: 'fine', data: 'x'.repeat(70 * 1024) }));
  const { code } = await withTimeout(r.closed, 10000, 'close after oversize frame');
  assert.equal(code, 1009);
  const p = next(bch, 'still');
  await sdk.trigger('bystander', 'still', 'alive');
  assert.equal(await p, 'alive');
  bystander.disconnect();
});

test('keepalive: an idle client is pinged and closed with 4201 without a pong', async () => {
  const srv = await start({ configToml: `activity_timeout = 1\npong_timeout = 1\n${APP_TOML}` });
  const r = await rawSocket(srv.port);
  const est = await established(r);
  assert.equal(est.data.activity_timeout, 1);
  await r.waitFor((m) => m.event === 'pusher:ping', 'server ping');
  const { code } = await withTimeout(r.closed, 10000, 'close 4201');
  assert.equal(code, 4201);
  // A client that answers stays.
  const ok = await rawSocket(srv.port);
  await established(ok);
  await ok.waitFor((m) => m.event === 'pusher:ping', 'server ping');
  ok.send({ event: 'pusher:pong', data: {} });
  const pings = () => ok.frames.filter((m) => m.event === 'pusher:ping').length;
  await until(() => pings() >= 2, 'second ping after the pong');
  assert.equal(ok.ws.readyState, 1, 'still open');
  ok.close();
});

test('apps: disabled 4003, over quota 4004, sign-in required 4009, client events off', async () => {
  const srv = await start({ configToml: `signin_timeout = 1
[[apps]]
id = "off"
key = "off-key"
secret = "s1"
enabled = false
[[apps]]
id = "small"
key = "small-key"
secret = "s2"
max_connections = 1
[[apps]]
id = "strict"
key = "strict-key"
secret = "s3"
user_authentication_required = true
[[apps]]
id = "quiet"
key = "quiet-key"
secret = "s4"
client_events = false
subscription_count_events = true
` });
  const off = await rawSocket(srv.port, '/app/off-key?protocol=7');
  assert.equal((await withTimeout(off.closed, 10000, '4003')).code, 4003);
  const first = await rawSocket(srv.port, '/app/small-key?protocol=7');
  await established(first);
  const second = await rawSocket(srv.port, '/app/small-key?protocol=7');
  assert.equal((await withTimeout(second.closed, 10000, '4004')).code, 4004);
  first.close();
  const strict = await rawSocket(srv.port, '/app/strict-key?protocol=7');
  await established(strict);
  assert.equal((await withTimeout(strict.closed, 10000, '4009')).code, 4009);

  const q = await rawSocket(srv.port, '/app/quiet-key?protocol=7');
  await established(q);
  const sdk = serverSdk(srv.port, { appId: 'quiet', key: 'quiet-key', secret: 's4' });
  const sid = q.frames[0].data.socket_id;
  q.send({ event: 'pusher:subscribe', data: { channel: 'private-q', auth: sdk.authorizeChannel(sid, 'private-q').auth } });
  await q.waitFor((m) => m.event === 'pusher_internal:subscription_succeeded', 'subscribed');
  const count = await q.waitFor((m) => m.event === 'pusher_internal:subscription_count', 'subscription_count');
  assert.equal(count.data.subscription_count, 1);
  q.send({ event: 'client-x', channel: 'private-q', data: {} });
  const err = await q.waitFor((m) => m.event === 'pusher:error', 'client events disabled');
  assert.match(err.data.message, /not enabled/);
  const api = serverSdk(srv.port, { appId: 'off', key: 'off-key', secret: 's1' });
  await assert.rejects(api.trigger('x', 'e', {}), (e) => e.status === 403);
});

test('binary: --help, --version, bad config exits non-zero with a message', () => {
  const help = spawnSync(BIN, ['--help'], { encoding: 'utf8', env: cleanEnv() });
  assert.equal(help.status, 0);
  for (const flag of ['--config', '--listen', '--app']) assert.ok(help.stdout.includes(flag), flag);
  const version = spawnSync(BIN, ['--version'], { encoding: 'utf8', env: cleanEnv() });
  assert.equal(version.status, 0);
  assert.match(version.stdout, /pushmesh \d+\.\d+\.\d+/);
  const missing = spawnSync(BIN, ['--config', '/nonexistent/pushmesh.toml'], { encoding: 'utf8', env: cleanEnv() });
  assert.notEqual(missing.status, 0);
  assert.match(missing.stderr, /cannot read config file/);
  const badApp = spawnSync(BIN, ['--app', 'only-id'], { encoding: 'utf8', env: cleanEnv() });
  assert.notEqual(badApp.status, 0);
  assert.match(badApp.stderr, /ID:KEY:SECRET/);
});

test('binary: unknown PUSHMESH_* variables are warned about, never fatal; service links are silent', async () => {
  const srv = await startServer({
    env: { PUSHMESH_LISTN: '1', PUSHMESH_SERVICE_HOST: '10.96.0.1', PUSHMESH_PORT_80_TCP: 'tcp://10.96.0.1:80' },
  });
  try {
    const res = await fetch(`http://127.0.0.1:${srv.port}/healthz`);
    assert.equal(res.status, 200);
    await until(() => /did_you_mean\S*PUSHMESH_LISTEN/.test(srv.stderr()), 'the typo warning');
    assert.doesNotMatch(srv.stderr(), /PUSHMESH_SERVICE_HOST|PUSHMESH_PORT_80_TCP/);
  } finally {
    await srv.stop();
  }
});
