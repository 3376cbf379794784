// The admin API (issue 19) against a real pushmesh process: apps made,
// changed, disabled, rotated and deleted at runtime, and what that does to
// pusher-js clients, raw sockets and signed publishes (the pusher SDK);
// durability across a restart; SIGHUP reloading the file's apps; no secret
// in any list response or log line.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  startServer, rawSocket, client, subscribed, next, until, closeAll, PusherServer, APP, APP_TOML,
} from './helpers.mjs';

const TOKEN = 'admin-token-0123456789abcdef';
const servers = [];
after(async () => { closeAll(); for (const s of servers) await s.stop().catch(() => {}); });

async function start(extra = {}) {
  const s = await startServer({ env: { PUSHMESH_ADMIN_TOKEN: TOKEN, RUST_LOG: 'info', ...(extra.env || {}) }, ...extra });
  servers.push(s);
  return s;
}

function api(port, method, p, body, token = TOKEN) {
  const headers = { 'content-type': 'application/json' };
  if (token) headers.authorization = `Bearer ${token}`;
  return fetch(`http://127.0.0.1:${port}${p}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) })
    .then(async (r) => ({ status: r.status, headers: r.headers, body: r.status === 204 ? null : await r.json() }));
}

const sdk = (port, app, secret) => new PusherServer({
  appId: app.id, key: app.key, secret, host: '127.0.0.1', port: String(port), useTLS: false,
});

/** The records in `dir`: the snapshot's, then the journal's complete lines (a last line cut by a kill is left out, as the node does). */
function storedRecords(dir) {
  const read = (f) => { try { return fs.readFileSync(path.join(dir, f), 'utf8'); } catch { return ''; } };
  const snapshot = read('apps.json');
  const records = snapshot ? JSON.parse(snapshot).records : [];
  const journal = read('apps.log');
  const complete = journal.slice(0, journal.lastIndexOf('\n') + 1);
  for (const line of complete.split('\n').filter(Boolean)) records.push(JSON.parse(line));
  return records;
}

function dataDir() {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'pm-admin-data-'));
}

test('off without admin_token: every /admin path is 404 with a JSON body', async () => {
  const s = await startServer();
  servers.push(s);
  for (const p of ['/admin/apps', '/admin/apps/x', '/admin/nothing']) {
    const r = await fetch(`http://127.0.0.1:${s.port}${p}`, { headers: { authorization: `Bearer ${TOKEN}` } });
    assert.equal(r.status, 404, p);
    assert.match((await r.json()).error, /admin/);
  }
});

test('the token: 401 JSON without or with a wrong one, failures limited with 429 and Retry-After, counted', async () => {
  const s = await start();
  assert.equal((await api(s.port, 'GET', '/admin/apps', undefined, null)).status, 401);
  const wrong = await api(s.port, 'GET', '/admin/apps', undefined, 'x'.repeat(TOKEN.length));
  assert.equal(wrong.status, 401);
  assert.match(wrong.body.error, /Bearer/);
  let limited;
  for (let i = 0; i < 30 && !limited; i++) {
    const r = await api(s.port, 'GET', '/admin/apps', undefined, 'nope');
    if (r.status === 429) limited = r;
    else assert.equal(r.status, 401);
  }
  assert.ok(limited, 'failures are rate-limited');
  assert.equal(limited.headers.get('retry-after'), '1');
  const metrics = await (await fetch(`http://127.0.0.1:${s.port}/metrics`)).text();
  assert.match(metrics, /pushmesh_admin_requests_total\{outcome="unauthorized"\} [1-9]/);
  assert.match(metrics, /pushmesh_admin_requests_total\{outcome="rate_limited"\} [1-9]/);
});

test('without data_dir: config apps are listed (source config, no secret) and writes are refused with 409', async () => {
  const s = await start({ configToml: APP_TOML });
  const list = await api(s.port, 'GET', '/admin/apps');
  assert.equal(list.status, 200);
  const app = list.body.apps.find((a) => a.id === APP.id);
  assert.equal(app.source, 'config');
  assert.equal(app.key, APP.key);
  for (const k of ['enabled', 'client_events', 'limits', 'allowed_origins', 'max_connections', 'webhooks', 'history']) assert.ok(k in app, k);
  assert.ok(!JSON.stringify(list.body).includes(APP.secret), 'no secret in the list');
  const one = await api(s.port, 'GET', `/admin/apps/${APP.id}`);
  assert.equal(one.status, 200);
  assert.equal(one.body.secret, undefined);
  assert.equal((await api(s.port, 'GET', '/admin/apps/none')).status, 404);
  const refused = await api(s.port, 'POST', '/admin/apps', { id: 'a1', key: 'k1' });
  assert.equal(refused.status, 409);
  assert.match(refused.body.error, /data_dir/);
  assert.equal((await api(s.port, 'PATCH', `/admin/apps/${APP.id}`, { enabled: false })).status, 409, 'config apps change in the file');
  assert.equal((await api(s.port, 'DELETE', `/admin/apps/${APP.id}`)).status, 409);
});

test('create, connect, publish, disable (4003, 403), enable, rotate with grace, stats, delete (4001), restart keeps apps', async () => {
  const dir = dataDir();
  const args = ['--data-dir', dir];
  let s = await start({ configToml: APP_TOML, args });
  const made = await api(s.port, 'POST', '/admin/apps', { id: 'tenant-1', key: 'tenant-key-1', client_events: true, limits: { max_event_name_length: 50 } });
  assert.equal(made.status, 201, JSON.stringify(made.body));
  assert.equal(made.body.source, 'admin');
  assert.equal(made.body.client_events, true);
  assert.equal(made.body.limits.max_event_name_length, 50);
  const secret = made.body.secret;
  assert.ok(typeof secret === 'string' && secret.length >= 32, 'a generated secret of at least 32 characters');
  const app = { id: 'tenant-1', key: 'tenant-key-1' };

  // Taken ids and keys, bad values, file-only settings.
  assert.equal((await api(s.port, 'POST', '/admin/apps', { id: 'tenant-1', key: 'other' })).status, 409);
  assert.equal((await api(s.port, 'POST', '/admin/apps', { id: 'other', key: 'tenant-key-1' })).status, 409);
  assert.equal((await api(s.port, 'POST', '/admin/apps', { id: APP.id, key: 'zz' })).status, 409, 'a config app id');
  assert.equal((await api(s.port, 'POST', '/admin/apps', { id: 'other', key: APP.key })).status, 409, 'a config app key');
  const badValue = await api(s.port, 'POST', '/admin/apps', { id: 'b', key: 'b', max_connections: 'many' });
  assert.equal(badValue.status, 400);
  assert.match(badValue.body.error, /max_connections|invalid type/);
  const unknown = await api(s.port, 'POST', '/admin/apps', { id: 'b', key: 'b', bogus: 1 });
  assert.equal(unknown.status, 400);
  assert.match(unknown.body.error, /bogus/);
  assert.equal((await api(s.port, 'POST', '/admin/apps', { key: 'b' })).status, 400);
  const badHook = await api(s.port, 'POST', '/admin/apps', { id: 'b', key: 'b', webhooks: [{ url: 'ftp://127.0.0.1:9/' }] });
  assert.equal(badHook.status, 400);
  assert.match(badHook.body.error, /webhooks\[0\]\.url/);

  // The new app serves: pusher-js connects, a signed publish arrives.
  const c = client(s.port, { key: app.key, authUrl: 'http://127.0.0.1:9' });
  const ch = c.subscribe('room');
  await subscribed(ch);
  const got = next(ch, 'hello');
  assert.equal((await sdk(s.port, app, secret).trigger('room', 'hello', { n: 1 })).status, 200);
  assert.deepEqual(await got, { n: 1 });

  // Disable: the connection is closed with 4003, the API answers 403; enable again.
  const raw = await rawSocket(s.port, `/app/${app.key}?protocol=7`);
  await raw.waitFor((f) => f.event === 'pusher:connection_established', 'established');
  const off = await api(s.port, 'PATCH', '/admin/apps/tenant-1', { enabled: false });
  assert.equal(off.status, 200);
  assert.equal(off.body.enabled, false);
  assert.equal(off.body.client_events, true, 'a PATCH merges');
  assert.equal((await raw.closed).code, 4003);
  await assert.rejects(sdk(s.port, app, secret).trigger('room', 'e', {}), (e) => e.status === 403);
  const refused = await rawSocket(s.port, `/app/${app.key}?protocol=7`);
  assert.equal((await refused.closed).code, 4003);
  await until(() => c.connection.state !== 'connected', 'pusher-js told its app is disabled');
  assert.equal((await api(s.port, 'PATCH', '/admin/apps/tenant-1', { enabled: true })).status, 200);
  assert.equal((await sdk(s.port, app, secret).trigger('room', 'e', {})).status, 200);
  // pusher-js does not retry a 4003 on its own: a new client connects.
  const again = client(s.port, { key: app.key, authUrl: 'http://127.0.0.1:9' });
  const room = again.subscribe('room');
  await subscribed(room);
  const delivered = next(room, 'after-enable');
  assert.equal((await sdk(s.port, app, secret).trigger('room', 'after-enable', { ok: true })).status, 200);
  assert.deepEqual(await delivered, { ok: true });

  // Rotate with a short grace: both secrets work, then the old one is 401.
  const rot = await api(s.port, 'POST', '/admin/apps/tenant-1/secret', { grace_secs: 2 });
  assert.equal(rot.status, 200);
  const fresh = rot.body.secret;
  assert.ok(fresh.length >= 32 && fresh !== secret);
  assert.equal((await sdk(s.port, app, fresh).trigger('room', 'e', {})).status, 200, 'the new secret at once');
  assert.equal((await sdk(s.port, app, secret).trigger('room', 'e', {})).status, 200, 'the old one in its grace');
  await until(async () => {
    try { await sdk(s.port, app, secret).trigger('room', 'e', {}); return false; } catch (e) { return e.status === 401; }
  }, 'the old secret refused after its grace', 20000);
  assert.equal((await sdk(s.port, app, fresh).trigger('room', 'e', {})).status, 200);

  // Stats.
  const stats = await api(s.port, 'GET', '/admin/apps/tenant-1/stats');
  assert.equal(stats.status, 200);
  for (const k of ['connections', 'channels', 'subscriptions', 'messages_published', 'messages_delivered', 'bytes_sent', 'webhooks_sent']) assert.equal(typeof stats.body[k], 'number', k);
  assert.equal(stats.body.connections, 1);
  assert.equal(stats.body.channels, 1);
  assert.ok(stats.body.messages_published >= 5, `published ${stats.body.messages_published}`);
  assert.ok(stats.body.messages_delivered >= 2 && stats.body.bytes_sent > 0);

  // No secret in a list response or any log line.
  const list = JSON.stringify((await api(s.port, 'GET', '/admin/apps')).body);
  for (const x of [secret, fresh, APP.secret]) {
    assert.ok(!list.includes(x), 'no secret in the list');
    assert.ok(!s.stderr().includes(x), 'no secret in the log');
  }
  assert.match(s.stderr(), /app created through the admin API/);
  const metrics = await (await fetch(`http://127.0.0.1:${s.port}/metrics`)).text();
  assert.match(metrics, /pushmesh_apps\{source="admin"\} 1/);
  assert.match(metrics, /pushmesh_apps\{source="config"\} 1/);
  assert.match(metrics, /pushmesh_admin_requests_total\{outcome="ok"\} [1-9]/);
  assert.match(metrics, /pushmesh_admin_requests_total\{outcome="conflict"\} [1-9]/);

  // A restart keeps the admin app, with its rotated secret.
  await s.stop();
  s = await start({ configToml: APP_TOML, args });
  assert.equal((await api(s.port, 'GET', '/admin/apps/tenant-1')).body.key, app.key);
  assert.equal((await sdk(s.port, app, fresh).trigger('room', 'e', {})).status, 200);

  // Delete: open connections are closed with 4001; the app is gone.
  const last = await rawSocket(s.port, `/app/${app.key}?protocol=7`);
  await last.waitFor((f) => f.event === 'pusher:connection_established', 'established');
  assert.equal((await api(s.port, 'DELETE', '/admin/apps/tenant-1')).status, 204);
  assert.equal((await last.closed).code, 4001);
  assert.equal((await api(s.port, 'GET', '/admin/apps/tenant-1')).status, 404);
  await assert.rejects(sdk(s.port, app, fresh).trigger('room', 'e', {}), (e) => e.status === 404);
  assert.equal((await rawSocket(s.port, `/app/${app.key}?protocol=7`).then((r) => r.closed)).code, 4001);
  // The id and key are free again.
  assert.equal((await api(s.port, 'POST', '/admin/apps', { id: 'tenant-1', key: 'tenant-key-1', secret: 'given-secret-0123456789abcdefghijkl' })).status, 201);
  assert.equal((await sdk(s.port, app, 'given-secret-0123456789abcdefghijkl').trigger('room', 'e', {})).status, 200);
});

test('SIGHUP reloads the file: an app added serves, one removed is closed with 4001', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pm-hup-'));
  const file = path.join(dir, 'pushmesh.toml');
  const second = '\n[[apps]]\nid = "second"\nkey = "second-key"\nsecret = "second-secret"\n';
  fs.writeFileSync(file, APP_TOML);
  const s = await start({ args: ['--config', file] });
  assert.equal((await rawSocket(s.port, '/app/second-key?protocol=7').then((r) => r.closed)).code, 4001, 'not yet');
  fs.writeFileSync(file, APP_TOML + second);
  s.child.kill('SIGHUP');
  await until(() => /SIGHUP: apps reloaded/.test(s.stderr()), 'the reload', 10000);
  const conn = await rawSocket(s.port, '/app/second-key?protocol=7');
  await conn.waitFor((f) => f.event === 'pusher:connection_established', 'the added app serves');
  const listed = await api(s.port, 'GET', '/admin/apps/second');
  assert.equal(listed.body.source, 'config');
  fs.writeFileSync(file, APP_TOML);
  s.child.kill('SIGHUP');
  assert.equal((await conn.closed).code, 4001, 'the removed app closes its connections');
  assert.equal((await api(s.port, 'GET', '/admin/apps/second')).status, 404);
  // A broken file keeps the old apps.
  fs.writeFileSync(file, APP_TOML + '\n[[apps]]\nid = "x"\n');
  s.child.kill('SIGHUP');
  await until(() => /SIGHUP: apps not reloaded/.test(s.stderr()), 'the refused reload', 10000);
  const still = await rawSocket(s.port, `/app/${APP.key}?protocol=7`);
  await still.waitFor((f) => f.event === 'pusher:connection_established', 'the old apps still serve');
  assert.equal(s.child.exitCode, null);
});

test('the CLI: pushmesh apps list|create|update|rotate-secret|stats|delete with --url and --token-file', async () => {
  const { execFile } = await import('node:child_process');
  const { BIN, cleanEnv } = await import('./helpers.mjs');
  const s = await start({ configToml: APP_TOML, args: ['--data-dir', dataDir()] });
  const tokenFile = path.join(dataDir(), 'token');
  fs.writeFileSync(tokenFile, `${TOKEN}\n`);
  const cli = (...args) => new Promise((resolve) => {
    execFile(BIN, ['apps', '--url', `http://127.0.0.1:${s.port}`, '--token-file', tokenFile, ...args], { env: cleanEnv() },
      (err, stdout, stderr) => resolve({ code: err ? err.code : 0, out: stdout, err: stderr }));
  });
  const made = await cli('create', '--id', 'cli-app', '--key', 'cli-key', '--set', 'client_events=true', '--set', 'wsify_event=msg');
  assert.equal(made.code, 0, made.err);
  const app = JSON.parse(made.out);
  assert.equal(app.client_events, true);
  assert.equal(app.wsify_event, 'msg');
  assert.ok(app.secret.length >= 32);
  const listed = await cli('list');
  assert.equal(listed.code, 0);
  assert.deepEqual(JSON.parse(listed.out).apps.map((a) => a.id).sort(), [APP.id, 'cli-app'].sort());
  assert.ok(!listed.out.includes(app.secret));
  assert.equal(JSON.parse((await cli('update', 'cli-app', '--set', 'enabled=false')).out).enabled, false);
  assert.ok(JSON.parse((await cli('rotate-secret', 'cli-app', '--grace-secs', '10')).out).secret.length >= 32);
  assert.equal(typeof JSON.parse((await cli('stats', 'cli-app')).out).connections, 'number');
  const taken = await cli('create', '--id', 'cli-app', '--key', 'other');
  assert.notEqual(taken.code, 0);
  assert.match(taken.err, /HTTP 409/);
  assert.equal((await cli('delete', 'cli-app')).code, 0);
  assert.match((await cli('get', 'cli-app')).err, /HTTP 404/);
  const noToken = await new Promise((resolve) => execFile(BIN, ['apps', '--url', `http://127.0.0.1:${s.port}`, 'list'], { env: cleanEnv() }, (err, _o, e) => resolve({ code: err ? err.code : 0, err: e })));
  assert.notEqual(noToken.code, 0);
  assert.match(noToken.err, /no admin token/);
});

test('kill -9 during a burst of 100 writes leaves a consistent store: every acknowledged app is there after a restart', { timeout: 240000 }, async () => {
  const dir = dataDir();
  const acked = new Set();
  // Three bursts, killed early, midway and late in the burst.
  for (const [round, killAfter] of [[0, 1], [1, 50], [2, 95]]) {
    const s = await start({ args: ['--data-dir', dir] });
    const ids = Array.from({ length: 100 }, (_, k) => `burst-${round}-${k}`);
    let answered = 0;
    let killed = false;
    const writes = ids.map((id) => api(s.port, 'POST', '/admin/apps', { id, key: `${id}-key` }).then((r) => {
      if (r.status === 201) acked.add(id);
      else assert.fail(`${id}: ${r.status} ${JSON.stringify(r.body)}`);
      answered += 1;
      if (answered >= killAfter && !killed) { killed = true; s.child.kill('SIGKILL'); }
    }, () => { /* cut by the kill */ }));
    await Promise.all(writes);
    const { signal } = await s.exited;
    assert.equal(signal, 'SIGKILL', `round ${round} was killed`);
    assert.ok(answered < 100 || killAfter >= 95, `round ${round}: killed during the burst (${answered} answered)`);
    // The store parses (snapshot and journal).
    const onDisk = new Set(storedRecords(dir).map((r) => r.id));
    for (const id of acked) assert.ok(onDisk.has(id), `acknowledged ${id} is on disk`);
    // A restart serves every acknowledged app, and only apps of the bursts.
    const again = await start({ args: ['--data-dir', dir] });
    const list = await api(again.port, 'GET', '/admin/apps');
    assert.equal(list.status, 200);
    const served = new Set(list.body.apps.filter((a) => a.source === 'admin').map((a) => a.id));
    for (const id of acked) assert.ok(served.has(id), `acknowledged ${id} served after the restart`);
    for (const id of served) assert.match(id, /^burst-\d-\d+$/);
    assert.equal(served.size, onDisk.size, 'every record on disk is served');
    // One app of this round accepts a connection.
    const some = ids.find((id) => acked.has(id));
    const ws = await rawSocket(again.port, `/app/${some}-key?protocol=7`);
    await ws.waitFor((m) => m.event === 'pusher:connection_established', 'connection_established');
    ws.close();
    await again.stop();
  }
  assert.ok(acked.size >= 1 + 50 + 95, `acknowledged ${acked.size}`);
});
