// Subscriptions over Server-Sent Events (`GET /app/{key}/sse`): the npm
// `eventsource` client, headless Chromium's native EventSource, `curl -N`
// and raw HTTP streams (for headers and Last-Event-ID) against a real node.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import { startServer, serverSdk, withTimeout, until, closeAll, APP, APP_TOML } from './helpers.mjs';

const require = createRequire(import.meta.url);
const { EventSource } = require('eventsource');
const here = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

let srv, sdk, hooks;
const open = [];
const hookEvents = [];

/** The token an app server makes: HMAC-SHA256 over sse:<sorted channels>:<expires>. */
function token(channels, expires = Math.floor(Date.now() / 1000) + 300, secret = APP.secret, key = APP.key) {
  const sorted = [...new Set(channels)].sort();
  const sig = crypto.createHmac('sha256', secret).update(`sse:${sorted.join(',')}:${expires}`).digest('hex');
  return `${key}:${expires}:${sig}`;
}

function url(channels, extra = {}, key = APP.key) {
  const q = new URLSearchParams();
  for (const c of channels) q.append('channel', c);
  for (const [k, v] of Object.entries(extra)) q.append(k, v);
  return `http://127.0.0.1:${srv.port}/app/${encodeURIComponent(key)}/sse?${q}`;
}

/** A raw stream: status, headers, parsed events (awaitable), whether it ended. */
function stream(u, { headers = {}, localAddress } = {}) {
  return new Promise((resolve, reject) => {
    const req = http.get(u, { headers, localAddress }, (res) => {
      const s = { status: res.statusCode, headers: res.headers, events: [], body: '', ended: false, waiters: [], raw: '' };
      let buf = '';
      const check = () => { s.waiters = s.waiters.filter((w) => { const hit = s.events.find(w.p); if (hit) w.r(hit); return !hit; }); };
      res.setEncoding('utf8');
      res.on('data', (d) => {
        s.raw += d;
        if (res.statusCode !== 200) { s.body += d; return; }
        buf += d;
        let i;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, i); buf = buf.slice(i + 2);
          const ev = { comment: false };
          for (const line of block.split('\n')) {
            if (line.startsWith(':')) { ev.comment = true; continue; }
            const [k, ...rest] = line.split(': ');
            const v = rest.join(': ');
            if (k === 'data') ev.data = ev.data === undefined ? v : `${ev.data}\n${v}`; else ev[k] = v;
          }
          s.events.push(ev);
        }
        check();
      });
      res.on('end', () => { s.ended = true; for (const w of s.endWaiters || []) w(); });
      s.waitFor = (p, what, ms = 10000) => { const hit = s.events.find(p); return hit ? Promise.resolve(hit) : withTimeout(new Promise((r) => s.waiters.push({ p, r })), ms, what); };
      s.named = (name) => s.events.filter((e) => e.event === name);
      s.end = (ms = 10000) => s.ended ? Promise.resolve() : withTimeout(new Promise((r) => { (s.endWaiters ||= []).push(r); }), ms, 'stream end');
      s.close = () => req.destroy();
      open.push(s);
      resolve(s);
    });
    req.on('error', reject);
  });
}

/** The JSON body of a refused stream request. */
async function refused(u, headers = {}) {
  const s = await stream(u, { headers });
  await s.end();
  return { status: s.status, body: JSON.parse(s.body), headers: s.headers };
}

async function metric(name) {
  const text = await (await fetch(`http://127.0.0.1:${srv.port}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(' ')[1]) : null;
}

/** A signed publish with optional tags. */
function publish(channel, name, data, tags) {
  const body = { name, channel, data: JSON.stringify(data) };
  if (tags !== undefined) body.tags = tags;
  return sdk.post({ path: '/events', body });
}

before(async () => {
  hooks = http.createServer((req, res) => {
    let raw = '';
    req.on('data', (d) => { raw += d; });
    req.on('end', () => { try { hookEvents.push(...JSON.parse(raw).events); } catch { /* ignored */ } res.writeHead(200); res.end('{}'); });
  });
  await new Promise((r) => hooks.listen(0, '127.0.0.1', r));
  srv = await startServer({
    configToml: `
trusted_proxies = ["127.0.0.1/32"]
sse_heartbeat_secs = 1
webhook_delay_ms = 0
[identity_headers]
user = "X-User-Id"
${APP_TOML}
allowed_origins = ["http://127.0.0.1:1", "http://localhost:9"]
[apps.history]
channels = ["hist-*"]
[[apps.webhooks]]
url = "http://127.0.0.1:${hooks.address().port}/hooks"
event_types = ["channel_occupied", "channel_vacated"]

[[apps]]
id = "off"
key = "off-key"
secret = "off-secret"
enabled = false
`,
  });
  sdk = serverSdk(srv.port);
});

after(async () => {
  for (const s of open) s.close();
  closeAll();
  hooks.closeAllConnections?.();
  hooks.close();
  await srv.stop().catch(() => {});
});

test('the npm eventsource client receives events by name; counted, webhooks, gauge', async () => {
  const es = new EventSource(url(['sse-pub', 'hist-1']));
  const got = [];
  const opened = new Promise((r) => { es.onopen = r; });
  for (const name of ['order', 'note']) es.addEventListener(name, (e) => got.push({ name, id: e.lastEventId, frame: JSON.parse(e.data) }));
  await withTimeout(opened, 10000, 'eventsource open');
  await until(async () => (await metric('pushmesh_sse_connections')) === 1, 'the gauge');
  // Counted like any subscription, and occupied with its webhook.
  await until(async () => {
    const r = await sdk.get({ path: '/channels/sse-pub', params: { info: 'subscription_count' } });
    const body = await r.json();
    return body.occupied && body.subscription_count === 1;
  }, '/channels/sse-pub occupied by the stream');
  await until(() => hookEvents.some((e) => e.name === 'channel_occupied' && e.channel === 'sse-pub'), 'channel_occupied');
  await publish('sse-pub', 'order', { n: 1 });
  await publish('hist-1', 'note', { n: 2 });
  await until(() => got.length === 2, 'two events');
  assert.deepEqual(got[0].frame, { event: 'order', channel: 'sse-pub', data: '{"n":1}' });
  assert.equal(got[1].frame.channel, 'hist-1');
  assert.ok(got[1].frame.position, 'history frames carry their position');
  assert.ok(got[1].id.length > 0, 'an id on history events');
  es.close();
  await until(async () => (await metric('pushmesh_sse_connections')) === 0, 'the gauge back to 0', 20000);
  await until(() => hookEvents.some((e) => e.name === 'channel_vacated' && e.channel === 'sse-pub'), 'channel_vacated', 20000);
});

test('curl -N streams with the headers of an event stream, and the heartbeat', async () => {
  const curl = spawn('curl', ['-sN', '-i', '-H', 'Origin: http://localhost:9', url(['curl-chan'])], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const seen = (re, what) => withTimeout(new Promise((r) => {
    const look = () => { if (re.test(out)) { r(); return true; } return false; };
    if (!look()) curl.stdout.on('data', () => look());
  }), 15000, what);
  curl.stdout.on('data', (d) => { out += d; });
  await seen(/retry: \d+\r?\n/, 'retry:');
  assert.match(out, /content-type: text\/event-stream/i);
  assert.match(out, /cache-control: no-cache/i);
  assert.match(out, /x-accel-buffering: no/i);
  assert.match(out, /access-control-allow-origin: http:\/\/localhost:9/i);
  await until(async () => {
    const r = await sdk.get({ path: '/channels/curl-chan', params: { info: 'subscription_count' } });
    return (await r.json()).subscription_count === 1;
  }, 'curl subscribed');
  await publish('curl-chan', 'tick', { n: 1 });
  await seen(/event: tick\ndata: \{"event":"tick","channel":"curl-chan","data":"\{\\"n\\":1\}"\}\n\n/, 'the event from curl');
  await seen(/: ping\n\n/, 'a heartbeat comment');
  curl.kill();
});

test('refusals: 404, 403 (disabled, origin, token missing/wrong/expired), 400', async () => {
  let r = await refused(url(['a'], {}, 'no-such-key'));
  assert.equal(r.status, 404);
  assert.match(r.body.error, /no app/);
  r = await refused(url(['a'], {}, 'off-key'));
  assert.equal(r.status, 403);
  assert.match(r.body.error, /disabled/);
  r = await refused(url(['a']), { Origin: 'https://evil.example' });
  assert.equal(r.status, 403);
  assert.match(r.body.error, /origin/);
  for (const [t, re] of [[undefined, /token required/], ['nonsense', /form/], [token(['private-x', 'other']), /signature/],
    [token(['private-x'], 1000), /expired/], [token(['private-x'], undefined, 'wrong-secret'), /signature/], [token(['private-x'], undefined, APP.secret, 'other-key'), /key/]]) {
    r = await refused(url(['private-x'], t === undefined ? {} : { token: t }));
    assert.equal(r.status, 403, String(t));
    assert.match(r.body.error, re);
    assert.match(r.headers['content-type'], /application\/json/);
  }
  r = await refused(url(['#server-to-user-alice']));
  assert.equal(r.status, 403, 'not the signed-in user');
  r = await refused(url(['private-encrypted-x']));
  assert.equal(r.status, 403);
  r = await refused(url(['presence-room']));
  assert.equal(r.status, 400);
  assert.match(r.body.error, /presence/);
  r = await refused(url([]));
  assert.equal(r.status, 400);
  r = await refused(url(Array.from({ length: 17 }, (_, i) => `c${i}`)));
  assert.equal(r.status, 400);
  assert.match(r.body.error, /16/);
  r = await refused(url(['bad name']));
  assert.equal(r.status, 400);
  r = await refused(url(['a'], { filter: '{not json' }));
  assert.equal(r.status, 400);
  // 16 channels is fine; a valid token opens private and encrypted channels.
  const s16 = await stream(url(Array.from({ length: 16 }, (_, i) => `c${i}`)));
  assert.equal(s16.status, 200);
  s16.close();
  const chans = ['private-orders', 'private-encrypted-x', 'pub'];
  const ok = await stream(url(chans, { token: token(chans) }));
  assert.equal(ok.status, 200);
  await until(async () => (await (await sdk.get({ path: '/channels/private-orders', params: { info: 'subscription_count' } })).json()).subscription_count === 1, 'private subscribed');
  await publish('private-orders', 'o', { id: 7 });
  const ev = await ok.waitFor((e) => e.event === 'o', 'private event');
  assert.equal(JSON.parse(ev.data).channel, 'private-orders');
  ok.close();
});

test('CORS preflight for a cross-origin EventSource', async () => {
  const res = await fetch(url(['a']), { method: 'OPTIONS', headers: { Origin: 'http://localhost:9', 'Access-Control-Request-Headers': 'last-event-id' } });
  assert.equal(res.status, 204);
  assert.equal(res.headers.get('access-control-allow-origin'), 'http://localhost:9');
  assert.match(res.headers.get('access-control-allow-headers'), /last-event-id/);
  const bad = await fetch(url(['a']), { method: 'OPTIONS', headers: { Origin: 'https://evil.example' } });
  assert.equal(bad.status, 403);
});

test('Last-Event-ID resumes each history channel in order, once; a bad one says recovered:false', async () => {
  const chans = ['hist-r1', 'hist-r2', 'plain-r'];
  const first = await stream(url(chans));
  await first.waitFor((e) => e.id && e.event === undefined && first.events.filter((x) => x.id).length >= 2, 'ids of both history channels');
  await publish('hist-r1', 'm', { i: 0 });
  const seen = await first.waitFor((e) => e.event === 'm', 'first event');
  first.close();
  await until(async () => !(await (await sdk.get({ path: '/channels/hist-r1', params: { info: 'subscription_count' } })).json()).occupied, 'stream gone');
  for (let i = 1; i <= 5; i++) await publish(i % 2 ? 'hist-r1' : 'hist-r2', 'm', { i });
  const again = await stream(url(chans), { headers: { 'Last-Event-ID': seen.id } });
  const recovered = await again.waitFor((e) => e.event === 'pushmesh:recovered', 'pushmesh:recovered');
  await again.waitFor(() => again.named('pushmesh:recovered').length === 2, 'one per history channel');
  assert.deepEqual(again.named('pushmesh:recovered').map((e) => JSON.parse(e.data)).sort((a, b) => a.channel.localeCompare(b.channel)),
    [{ channel: 'hist-r1', recovered: true }, { channel: 'hist-r2', recovered: true }]);
  assert.ok(recovered.id);
  await again.waitFor(() => again.named('m').length === 5, 'the five missed events');
  await publish('hist-r1', 'm', { i: 6 });
  await again.waitFor(() => again.named('m').length === 6, 'then live');
  const order = again.named('m').map((e) => JSON.parse(JSON.parse(e.data).data).i);
  assert.deepEqual(order.filter((i) => i % 2), [1, 3, 5]);
  assert.deepEqual(order.filter((i) => !(i % 2)), [2, 4, 6]);
  assert.equal(new Set(order).size, 6, 'each once');
  // The same cursor as ?last_event_id= (where headers cannot be set).
  const byQuery = await stream(url(['hist-r1'], { last_event_id: seen.id }));
  await byQuery.waitFor((e) => e.event === 'pushmesh:recovered', 'recovered by query');
  assert.deepEqual(JSON.parse(byQuery.named('pushmesh:recovered')[0].data), { channel: 'hist-r1', recovered: true });
  byQuery.close();
  again.close();
  const bad = await stream(url(chans), { headers: { 'Last-Event-ID': 'not-a-cursor' } });
  await bad.waitFor(() => bad.named('pushmesh:recovered').length === 2, 'recovered:false on both');
  assert.ok(bad.named('pushmesh:recovered').every((e) => JSON.parse(e.data).recovered === false));
  bad.close();
});

test('filter= applies to every channel; a cache channel sends its cached event first', async () => {
  await publish('cache-sse', 'snapshot', { v: 1 });
  const s = await stream(url(['filtered-a', 'filtered-b'], { filter: JSON.stringify({ zone: 'eu' }) }));
  await until(async () => (await (await sdk.get({ path: '/channels/filtered-b', params: { info: 'subscription_count' } })).json()).subscription_count === 1, 'filtered subscribed');
  await publish('filtered-a', 'x', { n: 'us' }, { zone: 'us' });
  await publish('filtered-b', 'x', { n: 'eu' }, { zone: 'eu' });
  await publish('filtered-a', 'x', { n: 'eu2' }, { zone: 'eu' });
  await s.waitFor(() => s.named('x').length === 2, 'two matching events');
  assert.deepEqual(s.named('x').map((e) => JSON.parse(JSON.parse(e.data).data).n), ['eu', 'eu2']);
  s.close();
  const c = await stream(url(['cache-sse']));
  const cached = await c.waitFor((e) => e.event === 'snapshot', 'the cached event');
  assert.equal(JSON.parse(cached.data).channel, 'cache-sse');
  c.close();
});

test('identity headers: a user streams its own #server-to-user- channel without a token', async () => {
  const s = await stream(url(['#server-to-user-alice']), { headers: { 'X-User-Id': 'alice' }, localAddress: '127.0.0.1' });
  assert.equal(s.status, 200);
  await until(async () => {
    await sdk.sendToUser('alice', 'hello', { to: 'alice' });
    return s.named('hello').length > 0;
  }, 'the user event', 15000);
  s.close();
  const other = await refused(url(['#server-to-user-bob']), { 'X-User-Id': 'alice' });
  assert.equal(other.status, 403);
});

test("headless Chromium's native EventSource receives events by name", async () => {
  assert.ok(fs.existsSync(CHROMIUM), `chromium not found at ${CHROMIUM}`);
  const { chromium } = require('playwright-core');
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage();
    await page.goto(`http://127.0.0.1:${srv.port}/healthz`);
    const u = url(['browser-chan']);
    await page.evaluate((u) => new Promise((resolve) => {
      window.got = [];
      const es = new EventSource(u);
      es.addEventListener('greeting', (e) => window.got.push(JSON.parse(e.data)));
      es.onopen = () => resolve();
    }), u);
    await until(async () => (await (await sdk.get({ path: '/channels/browser-chan', params: { info: 'subscription_count' } })).json()).subscription_count === 1, 'browser subscribed');
    await publish('browser-chan', 'greeting', { hi: 1 });
    await until(async () => (await page.evaluate(() => window.got.length)) === 1, 'the browser got it');
    assert.deepEqual(await page.evaluate(() => window.got[0]), { event: 'greeting', channel: 'browser-chan', data: '{"hi":1}' });
  } finally {
    await browser.close();
  }
});

test('drain ends the stream with pusher:error 4200 (EventSource reconnects)', async () => {
  const s = await stream(url(['drain-chan']));
  await until(async () => (await (await sdk.get({ path: '/channels/drain-chan', params: { info: 'subscription_count' } })).json()).subscription_count === 1, 'subscribed');
  const stopping = srv.stop();
  const err = await s.waitFor((e) => e.event === 'pusher:error', 'pusher:error', 20000);
  assert.equal(JSON.parse(err.data).data.code, 4200);
  await s.end(20000);
  await stopping;
});
