// Operations: TLS (wss/https) with reload, Prometheus metrics parsed by a
// real parser, readiness during drain, limits, Origin allow-list.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync, spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import tls from 'node:tls';
import os from 'node:os';
import path from 'node:path';
import { startServer, serverSdk, client, subscribed, until, withTimeout, closeAll, rawSocket, cleanEnv, APP, WebSocket, clusteredToml, APP_TOML } from './helpers.mjs';

const servers = [];
const start = async (opts) => { const s = await startServer(opts); servers.push(s); return s; };
after(async () => { closeAll(); for (const s of servers) await s.stop().catch(() => {}); });

function makeCert(dir, name) {
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', path.join(dir, `${name}-key.pem`), '-out', path.join(dir, `${name}.pem`), '-days', '2',
    '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'], { stdio: 'ignore' });
  return { cert: path.join(dir, `${name}.pem`), key: path.join(dir, `${name}-key.pem`) };
}

/** Runs a client script in a child Node trusting `ca`; resolves with its JSON output. */
function runClient(script, ca, args) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--input-type=module', '-e', script, ...args], {
      env: { ...cleanEnv(), NODE_EXTRA_CA_CERTS: ca }, cwd: path.dirname(new URL(import.meta.url).pathname),
    });
    let out = ''; let err = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { err += d; });
    child.on('exit', (code) => (code === 0 ? resolve(JSON.parse(out.trim().split('\n').pop())) : reject(new Error(`client exited ${code}: ${err}`))));
  });
}

const TLS_CLIENT = `
import { createRequire } from 'node:module';
const require = createRequire(process.cwd() + '/');
const Pusher = require('pusher-js'); const PusherServer = require('pusher');
const [port, key, id, secret] = process.argv.slice(1);
const c = new Pusher(key, { wsHost: 'localhost', wssPort: Number(port), forceTLS: true, enabledTransports: ['ws'], cluster: 'mt1', disableStats: true });
const ch = c.subscribe('tls-channel');
await new Promise((r) => ch.bind('pusher:subscription_succeeded', r));
const sdk = new PusherServer({ appId: id, key, secret, host: 'localhost', port, useTLS: true });
const got = new Promise((r) => ch.bind('secure', r));
const res = await sdk.trigger('tls-channel', 'secure', { over: 'tls' });
console.log(JSON.stringify({ status: res.status, got: await got, socket: c.connection.socket_id }));
c.disconnect(); process.exit(0);
`;

test('wss:// and https:// with a test certificate; SIGHUP reloads it without dropping connections', async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pm-tls-'));
  const a = makeCert(dir, 'a');
  const live = path.join(dir, 'live');
  fs.copyFileSync(a.cert, `${live}.pem`); fs.copyFileSync(a.key, `${live}-key.pem`);
  const srv = await start({ args: ['--tls-cert', `${live}.pem`, '--tls-key', `${live}-key.pem`] });
  const r = await runClient(TLS_CLIENT, a.cert, [String(srv.port), APP.key, APP.id, APP.secret]);
  assert.equal(r.status, 200);
  assert.deepEqual(r.got, { over: 'tls' });
  // A connection open across the reload keeps working.
  const ws = new WebSocket(`wss://localhost:${srv.port}/app/${APP.key}?protocol=7`, { ca: fs.readFileSync(a.cert) });
  const frames = [];
  ws.on('message', (d) => frames.push(JSON.parse(d.toString())));
  await withTimeout(new Promise((res) => ws.on('open', res)), 10000, 'wss open');
  const b = makeCert(dir, 'b');
  fs.copyFileSync(b.cert, `${live}.pem`); fs.copyFileSync(b.key, `${live}-key.pem`);
  srv.child.kill('SIGHUP');
  // Wait until new handshakes present certificate b (SIGHUP is asynchronous).
  const presents = (ca) => new Promise((resolve) => {
    const sock = tls.connect({ host: '127.0.0.1', port: srv.port, servername: 'localhost', ca: fs.readFileSync(ca) }, () => { resolve(sock.authorized); sock.end(); });
    sock.on('error', () => resolve(false));
  });
  await until(() => presents(b.cert), 'the reloaded certificate is served');
  assert.equal(await presents(a.cert), false, 'the old certificate is no longer served');
  // New connections present the new certificate: trusting only b works.
  const r2 = await runClient(TLS_CLIENT, b.cert, [String(srv.port), APP.key, APP.id, APP.secret]);
  assert.equal(r2.status, 200);
  ws.send(JSON.stringify({ event: 'pusher:ping', data: {} }));
  await until(() => frames.some((f) => f.event === 'pusher:pong'), 'old connection still answered after reload');
  assert.equal(ws.readyState, 1);
  ws.close();
});

test('/metrics parsed by prometheus_client match a scripted workload', async () => {
  const srv = await start();
  const sdk = serverSdk(srv.port);
  const clients = [];
  for (let i = 0; i < 3; i++) {
    const c = client(srv.port, { authUrl: 'http://127.0.0.1:9' });
    await subscribed(c.subscribe('metered'));
    clients.push(c);
  }
  for (let k = 0; k < 5; k++) await sdk.trigger('metered', 'e', { k });
  await assert.rejects(serverSdk(srv.port, { secret: 'wrong' }).trigger('metered', 'e', {}), (e) => e.status === 401);
  const text = await (await fetch(`http://127.0.0.1:${srv.port}/metrics`)).text();
  const py = spawnSync('python3', ['-c', `
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        key = s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
        out[key] = s.value
print(json.dumps(out))
`], { input: text, encoding: 'utf8' });
  assert.equal(py.status, 0, py.stderr);
  const m = JSON.parse(py.stdout);
  assert.equal(m.pushmesh_connections, 3);
  assert.equal(m.pushmesh_connections_opened_total, 3);
  assert.equal(m.pushmesh_messages_published_total, 5);
  assert.equal(m.pushmesh_messages_delivered_total, 3 + 3 + 3 * 5, 'connection_established + subscription_succeeded + 15 events');
  assert.equal(m['pushmesh_http_requests_total{route="/apps/{app_id}/events",status="200"}'], 5);
  assert.equal(m['pushmesh_http_requests_total{route="/apps/{app_id}/events",status="401"}'], 1);
  assert.equal(m['pushmesh_subscriptions{kind="public"}'], 3);
  assert.equal(m['pushmesh_channels{kind="public"}'], 1);
  assert.ok(m.process_resident_memory_bytes > 0);
  assert.ok(m.pushmesh_sent_bytes_total > 0);
  // No channel name ever appears as a label.
  assert.ok(!text.includes('metered'), 'channel names are not labels');
  for (const c of clients) c.disconnect();
  await until(async () => /pushmesh_connections_closed_total\{code="client"\} 3/.test(await (await fetch(`http://127.0.0.1:${srv.port}/metrics`)).text()), 'closed connections counted');
});

test('/readyz goes 503 while draining, before the node exits', async () => {
  const srv = await startServer({ configToml: clusteredToml('drain_wait_ms = 3000') });
  // A clustered node is `joining` until its join task has run (no seed here,
  // so at its first tick): await readiness rather than race it.
  await until(async () => (await fetch(`http://127.0.0.1:${srv.port}/readyz`)).status === 200, 'ready after joining', 30000);
  const raw = await rawSocket(srv.port);
  srv.child.kill('SIGTERM');
  await until(async () => (await fetch(`http://127.0.0.1:${srv.port}/readyz`)).status === 503, 'not ready while draining');
  const body = await (await fetch(`http://127.0.0.1:${srv.port}/readyz`)).json();
  assert.equal(body.reason, 'draining');
  assert.equal((await fetch(`http://127.0.0.1:${srv.port}/healthz`)).status, 200, 'still alive');
  // A newcomer during the drain is refused with 503 + Retry-After (a failed
  // handshake, retried with a backoff); those connected get 4200 at the end.
  const late = await withTimeout(new Promise((resolve, reject) => {
    const ws = new WebSocket(`ws://127.0.0.1:${srv.port}/app/${APP.key}?protocol=7`);
    ws.on('unexpected-response', (_req, res) => {
      let body = '';
      res.on('data', (d) => { body += d; });
      res.on('end', () => { resolve({ status: res.statusCode, retryAfter: res.headers['retry-after'], body }); ws.terminate(); });
    });
    ws.on('open', () => reject(new Error('upgraded while draining')));
    ws.on('error', () => {});
  }), 10000, 'the late answer');
  assert.equal(late.status, 503);
  assert.ok(Number(late.retryAfter) >= 1);
  assert.equal(JSON.parse(late.body).reason, 'draining');
  assert.equal((await withTimeout(raw.closed, 10000, 'drain close')).code, 4200);
  assert.equal((await srv.exited).code, 0);
});

test('limits: connection flood from one IP gets 4100 while others are served; API rate 429; node max 4100; Origin allow-list', async () => {
  const srv = await start({ configToml: `
connections_per_ip_per_sec = 5
api_requests_per_sec = 2
max_connections = 40
${APP_TOML}[[apps]]
id = "strict-origin"
key = "origin-key"
secret = "s"
allowed_origins = ["https://good.example"]
` });
  // Flood from 127.0.0.1: the first 10 (burst) pass, the rest get 4100.
  const flood = [];
  for (let i = 0; i < 20; i++) flood.push(rawSocket(srv.port));
  const socks = await Promise.all(flood);
  const codes = await Promise.all(socks.map((s) => Promise.race([s.closed.then((c) => c.code), s.waitFor((m) => m.event === 'pusher:connection_established', 'est').then(() => 'ok')])));
  assert.ok(codes.filter((c) => c === 4100).length >= 8, `flood refused: ${codes}`);
  assert.ok(codes.filter((c) => c === 'ok').length >= 1);
  // Meanwhile another address is served.
  const other = new WebSocket(`ws://127.0.0.1:${srv.port}/app/${APP.key}?protocol=7`, { localAddress: '127.0.0.2' });
  const firstFrame = await withTimeout(new Promise((r) => other.once('message', (d) => r(JSON.parse(d.toString())))), 10000, 'other IP served');
  assert.equal(firstFrame.event, 'pusher:connection_established');
  other.close();
  const api = serverSdk(srv.port);
  const results = await Promise.allSettled([0, 1, 2, 3, 4, 5].map((k) => api.trigger('x', 'e', { k })));
  const refused = results.filter((r) => r.status === 'rejected' && r.reason.status === 429);
  assert.ok(refused.length >= 1, 'API over its rate gets 429');
  assert.match(JSON.parse(refused[0].reason.body).error, /rate/);
  // Origin allow-list.
  const bad = new WebSocket(`ws://127.0.0.1:${srv.port}/app/origin-key?protocol=7`, { headers: { Origin: 'https://evil.example' }, localAddress: '127.0.0.3' });
  const badClose = await withTimeout(new Promise((r) => bad.on('close', (code) => r(code))), 10000, 'origin refused');
  assert.equal(badClose, 4009);
  const good = new WebSocket(`ws://127.0.0.1:${srv.port}/app/origin-key?protocol=7`, { headers: { Origin: 'https://good.example' }, localAddress: '127.0.0.4' });
  const goodFrame = await withTimeout(new Promise((r) => good.once('message', (d) => r(JSON.parse(d.toString())))), 10000, 'origin allowed');
  assert.equal(goodFrame.event, 'pusher:connection_established');
  good.close();
  for (const s of socks) s.close();
  assert.equal((await fetch(`http://127.0.0.1:${srv.port}/healthz`)).status, 200, 'node healthy after the flood');
});

test('node connection limit: over max_connections gets 4100', async () => {
  const srv = await start({ args: ['--max-connections', '2'] });
  const a = await rawSocket(srv.port); await a.waitFor((m) => m.event === 'pusher:connection_established', 'a');
  const b = await rawSocket(srv.port); await b.waitFor((m) => m.event === 'pusher:connection_established', 'b');
  const c = await rawSocket(srv.port);
  assert.equal((await withTimeout(c.closed, 10000, 'c refused')).code, 4100);
  a.close(); b.close();
});
