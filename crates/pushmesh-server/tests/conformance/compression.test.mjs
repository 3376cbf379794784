// permessage-deflate (RFC 7692) with real clients: the `ws` client, Python
// websockets, pusher-js in headless Chromium, and a raw socket that shows
// the frames themselves (RSV1, what the server answers to each offer, a
// compression bomb, fragmented compressed client messages).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import zlib from 'node:zlib';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import { startServer, serverSdk, until, withTimeout, closeAll, WebSocket, APP, BIN, cleanEnv } from './helpers.mjs';

const require = createRequire(import.meta.url);
const here = path.dirname(fileURLToPath(import.meta.url));
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ANSWER = 'permessage-deflate; server_no_context_takeover; client_no_context_takeover';

const servers = [];
const sockets = [];
let browser = null;
const start = async (opts) => { const s = await startServer(opts); servers.push(s); return s; };
after(async () => {
  closeAll();
  for (const s of sockets) s.destroy();
  if (browser) await browser.close();
  for (const s of servers) await s.stop();
});

/** A realistic ~2 KB JSON event: an order with a dozen line items. */
function order(id) {
  const items = [];
  for (let i = 0; i < 12; i++) {
    items.push({ sku: `SKU-${1000 + i}`, name: `Item number ${i} in the catalogue`, qty: 1 + (i % 3), price_cents: 1999 + i * 100, currency: 'EUR', warehouse: 'eu-west-1' });
  }
  return { id, status: 'confirmed', customer: { id: 'cus_123', email: 'someone@example.com' }, items, total_cents: 54321 };
}

const SYNC = { finishFlush: zlib.constants.Z_SYNC_FLUSH };
/** A message compressed as permessage-deflate sends it: the sync flush's tail removed. */
function deflate(buf) {
  const z = zlib.deflateRawSync(buf, SYNC);
  return z.subarray(0, z.length - 4);
}
function inflate(buf) {
  return zlib.inflateRawSync(Buffer.concat([buf, Buffer.from([0, 0, 0xff, 0xff])]), SYNC);
}

/** A masked client frame. */
function clientFrame(opcode, payload, { fin = true, rsv1 = false } = {}) {
  const mask = crypto.randomBytes(4);
  const len = payload.length;
  let head;
  if (len < 126) { head = Buffer.alloc(2); head[1] = 0x80 | len; }
  else if (len < 65536) { head = Buffer.alloc(4); head[1] = 0x80 | 126; head.writeUInt16BE(len, 2); }
  else { head = Buffer.alloc(10); head[1] = 0x80 | 127; head.writeBigUInt64BE(BigInt(len), 2); }
  head[0] = (fin ? 0x80 : 0) | (rsv1 ? 0x40 : 0) | opcode;
  const body = Buffer.from(payload);
  for (let i = 0; i < body.length; i++) body[i] ^= mask[i & 3];
  return Buffer.concat([head, mask, body]);
}

/** A raw WebSocket client: our own handshake (with `offer` as Sec-WebSocket-Extensions) and frames as sent. */
async function raw(port, { offer = null, urlPath = `/app/${APP.key}?protocol=7` } = {}) {
  const sock = net.connect(port, '127.0.0.1');
  sockets.push(sock);
  await withTimeout(new Promise((r, j) => { sock.once('connect', r); sock.once('error', j); }), 10000, 'tcp connect');
  const key = crypto.randomBytes(16).toString('base64');
  sock.write(`GET ${urlPath} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n`
    + `Sec-WebSocket-Key: ${key}\r\nSec-WebSocket-Version: 13\r\n`
    + (offer === null ? '' : `Sec-WebSocket-Extensions: ${offer}\r\n`) + '\r\n');
  let buf = Buffer.alloc(0);
  let head = null;
  let gotHead;
  const headP = new Promise((r) => { gotHead = r; });
  const frames = [];
  const waiters = [];
  let wireBytes = 0;
  const ended = new Promise((r) => sock.on('close', r));
  sock.on('error', () => {});
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    if (head === null) {
      const i = buf.indexOf('\r\n\r\n');
      if (i < 0) return;
      head = buf.subarray(0, i).toString();
      buf = buf.subarray(i + 4);
      gotHead(head);
    }
    for (;;) {
      if (buf.length < 2) return;
      let len = buf[1] & 0x7f;
      let off = 2;
      if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); off = 4; }
      else if (len === 127) { if (buf.length < 10) return; len = Number(buf.readBigUInt64BE(2)); off = 10; }
      if (buf.length < off + len) return;
      const f = { fin: !!(buf[0] & 0x80), rsv1: !!(buf[0] & 0x40), opcode: buf[0] & 0x0f, payload: Buffer.from(buf.subarray(off, off + len)), wire: off + len };
      buf = buf.subarray(off + len);
      wireBytes += f.wire;
      f.text = f.opcode === 1 ? (f.rsv1 ? inflate(f.payload) : f.payload).toString() : null;
      frames.push(f);
      for (const w of [...waiters]) if (w.pred(f)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(f); }
    }
  });
  await withTimeout(headP, 10000, 'handshake response');
  const ext = head.split('\r\n').find((l) => l.toLowerCase().startsWith('sec-websocket-extensions:'));
  return {
    head,
    status: Number(head.split(' ')[1]),
    extensions: ext ? ext.slice(ext.indexOf(':') + 1).trim() : null,
    frames,
    ended,
    wireBytes: () => wireBytes,
    waitFor(pred, what, ms = 10000) {
      const f = frames.find(pred);
      if (f) return Promise.resolve(f);
      return withTimeout(new Promise((resolve) => waiters.push({ pred, resolve })), ms, what);
    },
    event(name) { return this.waitFor((f) => f.text !== null && f.text.includes(`"event":"${name}"`), name); },
    closeFrame(ms = 15000) { return this.waitFor((f) => f.opcode === 8, 'close frame', ms).then((f) => f.payload.readUInt16BE(0)); },
    write(bytes) { sock.write(bytes); },
    sendText(obj, { compress = false } = {}) {
      const data = Buffer.from(typeof obj === 'string' ? obj : JSON.stringify(obj));
      sock.write(clientFrame(1, compress ? deflate(data) : data, { rsv1: compress }));
    },
    destroy() { sock.destroy(); },
  };
}

async function metric(port, name) {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(name + ' '));
  return line ? Number(line.slice(name.length + 1)) : NaN;
}

async function subscribeRaw(c, channel, compress = false) {
  await c.event('pusher:connection_established');
  c.sendText({ event: 'pusher:subscribe', data: { channel } }, { compress });
  await c.event('pusher_internal:subscription_succeeded');
}

test('the server answers each offer as RFC 7692 says', async () => {
  const srv = await start();
  const cases = [
    ['permessage-deflate; client_max_window_bits', ANSWER],
    ['permessage-deflate', ANSWER],
    ['permessage-deflate; server_no_context_takeover; client_no_context_takeover', ANSWER],
    ['permessage-deflate; server_max_window_bits=15', `${ANSWER}; server_max_window_bits=15`],
    // Declined: a smaller server window (frames are shared), unknown or repeated parameters, bad values.
    ['permessage-deflate; server_max_window_bits=10', null],
    ['permessage-deflate; bogus', null],
    ['permessage-deflate; client_max_window_bits=16', null],
    ['permessage-deflate; server_no_context_takeover; server_no_context_takeover', null],
    // The first acceptable offer wins.
    ['permessage-deflate; server_max_window_bits=9, permessage-deflate; client_max_window_bits', ANSWER],
    ['x-webkit-deflate-frame', null],
    [null, null],
  ];
  for (const [offer, want] of cases) {
    const c = await raw(srv.port, { offer });
    assert.equal(c.status, 101, `${offer}: ${c.head}`);
    assert.equal(c.extensions, want, `offer ${offer}`);
    await c.event('pusher:connection_established');
    c.destroy();
  }
});

test('compressed and plain subscribers get the same 2 KB event; the compressed one in a third of the bytes', async () => {
  const srv = await start();
  const z = await raw(srv.port, { offer: 'permessage-deflate; client_max_window_bits' });
  const p = await raw(srv.port);
  assert.equal(z.extensions, ANSWER);
  assert.equal(p.extensions, null, 'a client that offers nothing gets no extension');
  // The compressing client subscribes with a compressed frame (fragmented in three).
  await z.event('pusher:connection_established');
  const sub = deflate(Buffer.from(JSON.stringify({ event: 'pusher:subscribe', data: { channel: 'orders' } })));
  const a = Math.floor(sub.length / 3);
  z.write(Buffer.concat([
    clientFrame(1, sub.subarray(0, a), { fin: false, rsv1: true }),
    clientFrame(9, Buffer.from('mid')),
    clientFrame(0, sub.subarray(a, 2 * a), { fin: false }),
    clientFrame(0, sub.subarray(2 * a), { fin: true }),
  ]));
  await z.waitFor((f) => f.opcode === 10 && f.payload.toString() === 'mid', 'pong between fragments');
  await z.event('pusher_internal:subscription_succeeded');
  await subscribeRaw(p, 'orders');
  const before = [z.wireBytes(), p.wireBytes()];
  const body = order(1);
  await serverSdk(srv.port).trigger('orders', 'order-confirmed', body);
  const [fz, fp] = [await z.event('order-confirmed'), await p.event('order-confirmed')];
  assert.equal(fz.rsv1, true, 'compressed frame (RSV1)');
  assert.equal(fp.rsv1, false, 'plain frame');
  assert.equal(fz.text, fp.text, 'same message');
  assert.deepEqual(JSON.parse(JSON.parse(fz.text).data), body);
  const wz = z.wireBytes() - before[0];
  const wp = p.wireBytes() - before[1];
  assert.ok(fp.text.length > 1800, `a 2 KB event (${fp.text.length})`);
  assert.ok(wz <= 0.35 * wp, `compressed ${wz} bytes of ${wp}`);
  // Metrics: one compressing connection, the saving is one division.
  assert.equal(await metric(srv.port, 'pushmesh_compression_connections'), 1);
  const plain = await metric(srv.port, 'pushmesh_compression_bytes_total{stage="plain"}');
  const compressed = await metric(srv.port, 'pushmesh_compression_bytes_total{stage="compressed"}');
  assert.equal(plain, fp.text.length);
  assert.equal(compressed, fz.payload.length);
  // Shorter than compression_min_bytes (256): plain frame, RSV1 clear.
  await serverSdk(srv.port).trigger('orders', 'tiny', { k: 1 });
  const small = await z.event('tiny');
  assert.equal(small.rsv1, false);
  z.destroy();
  await until(async () => (await metric(srv.port, 'pushmesh_compression_connections')) === 0, 'gauge back to 0');
});

test('RSV1 without negotiation is closed with 1002; other clients are unaffected', async () => {
  const srv = await start();
  const bad = await raw(srv.port);
  await bad.event('pusher:connection_established');
  bad.sendText({ event: 'pusher:ping', data: {} }, { compress: true });
  assert.equal(await bad.closeFrame(), 1002);
  const ok = await raw(srv.port, { offer: 'permessage-deflate' });
  await subscribeRaw(ok, 'still-fine', true);
});

test('a 64 MiB bomb (compressed ~64 KiB) is closed with 1009 in bounded memory; others are unaffected', async () => {
  const srv = await start();
  const bystander = await raw(srv.port, { offer: 'permessage-deflate' });
  await subscribeRaw(bystander, 'bystanders');
  const bomb = deflate(Buffer.alloc(64 << 20, 0x61));
  assert.ok(bomb.length < 100 << 10, `bomb is ${bomb.length} bytes`);
  const rss = () => {
    const m = fs.readFileSync(`/proc/${srv.child.pid}/status`, 'utf8').match(/VmRSS:\s+(\d+) kB/);
    return Number(m[1]) * 1024;
  };
  const before = rss();
  const b = await raw(srv.port, { offer: 'permessage-deflate; client_max_window_bits' });
  await b.event('pusher:connection_established');
  b.write(clientFrame(1, bomb, { rsv1: true }));
  assert.equal(await b.closeFrame(), 1009);
  const grew = rss() - before;
  assert.ok(grew < 32 << 20, `RSS grew ${grew} bytes`);
  // A fragmented bomb too (each frame small, the sum inflating past the limit).
  const f = await raw(srv.port, { offer: 'permessage-deflate' });
  await f.event('pusher:connection_established');
  const parts = [];
  for (let i = 0; i < bomb.length; i += 4096) parts.push(bomb.subarray(i, i + 4096));
  f.write(Buffer.concat(parts.map((p, i) => clientFrame(i === 0 ? 1 : 0, p, { fin: i === parts.length - 1, rsv1: i === 0 }))));
  assert.equal(await f.closeFrame(), 1009);
  assert.ok(rss() - before < 32 << 20, 'RSS after the fragmented bomb');
  await serverSdk(srv.port).trigger('bystanders', 'after-the-bomb', order(2));
  const e = await bystander.event('after-the-bomb');
  assert.deepEqual(JSON.parse(JSON.parse(e.text).data), order(2));
});

test('the ws client with perMessageDeflate: both ways, on /app and /ws', async () => {
  const srv = await start();
  const ws = new WebSocket(`ws://127.0.0.1:${srv.port}/app/${APP.key}?protocol=7`, { perMessageDeflate: { threshold: 0 } });
  let answer = null;
  ws.on('upgrade', (res) => { answer = res.headers['sec-websocket-extensions']; });
  const msgs = [];
  const waiters = [];
  ws.on('message', (d) => { const m = JSON.parse(d.toString()); msgs.push(m); for (const w of [...waiters]) if (w.p(m)) { waiters.splice(waiters.indexOf(w), 1); w.r(m); } });
  const wait = (p, what) => { const m = msgs.find(p); return m ? Promise.resolve(m) : withTimeout(new Promise((r) => waiters.push({ p, r })), 10000, what); };
  await withTimeout(new Promise((r, j) => { ws.on('open', r); ws.on('error', j); }), 10000, 'ws open');
  assert.equal(answer, ANSWER);
  await wait((m) => m.event === 'pusher:connection_established', 'established');
  // A large compressed client message (threshold 0: every message is compressed).
  ws.send(JSON.stringify({ event: 'pusher:ping', data: { pad: 'x'.repeat(20000) } }));
  await wait((m) => m.event === 'pusher:pong', 'pong');
  ws.send(JSON.stringify({ event: 'pusher:subscribe', data: { channel: 'ws-orders' } }));
  await wait((m) => m.event === 'pusher_internal:subscription_succeeded', 'subscribed');
  await serverSdk(srv.port).trigger('ws-orders', 'order', order(3));
  const got = await wait((m) => m.event === 'order', 'order');
  assert.deepEqual(JSON.parse(got.data), order(3));
  ws.close();
  // /ws (wsify): negotiated the same way; a compressed join and broadcast
  // come back as the broadcast, compressed (RSV1, seen by a raw socket).
  const w2 = new WebSocket(`ws://127.0.0.1:${srv.port}/ws`, { perMessageDeflate: { threshold: 0 } });
  let answer2 = null;
  w2.on('upgrade', (res) => { answer2 = res.headers['sec-websocket-extensions']; });
  const got2 = [];
  w2.on('message', (d) => got2.push(JSON.parse(d.toString())));
  await withTimeout(new Promise((r, j) => { w2.on('open', r); w2.on('error', j); }), 10000, 'wsify open');
  assert.equal(answer2, ANSWER);
  const watcher = await raw(srv.port, { offer: 'permessage-deflate', urlPath: '/ws' });
  assert.equal(watcher.extensions, ANSWER);
  watcher.sendText({ command: 'join', args: { channel: 'ws-deflate' } }, { compress: true });
  w2.send(JSON.stringify({ command: 'join', args: { channel: 'ws-deflate' } }));
  const api = serverSdk(srv.port);
  await until(async () => (await (await api.get({ path: '/channels/ws-deflate', params: { info: 'subscription_count' } })).json()).subscription_count === 2, 'two wsify members');
  const content = order(7);
  w2.send(JSON.stringify({ command: 'broadcast', args: { channel: 'ws-deflate', content } }));
  const f = await watcher.waitFor((x) => x.opcode === 1, 'the broadcast');
  assert.equal(f.rsv1, true, 'a 2 KB broadcast is compressed');
  assert.deepEqual(JSON.parse(f.text), content);
  await until(() => got2.length === 1, 'the sender gets its broadcast too');
  assert.deepEqual(got2[0], content);
  w2.close();
});

test('compression = false: offers are declined, frames are plain', async () => {
  const srv = await start({ args: ['--compression', 'false'] });
  const c = await raw(srv.port, { offer: 'permessage-deflate; client_max_window_bits' });
  assert.equal(c.extensions, null);
  await subscribeRaw(c, 'plain');
  await serverSdk(srv.port).trigger('plain', 'big', order(4));
  assert.equal((await c.event('big')).rsv1, false);
});

test('compression_level outside 1 to 9 stops the node at start (exit 2, naming the key)', async () => {
  const child = spawn(BIN, ['--listen', '127.0.0.1:0', '--app', `${APP.id}:${APP.key}:${APP.secret}`, '--compression-level', '10'], { env: cleanEnv(), stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; });
  const code = await withTimeout(new Promise((r) => child.on('exit', r)), 15000, 'pushmesh to exit');
  assert.equal(code, 2);
  assert.match(stderr, /compression_level/);
});

const PYTHON_CLIENT = `
import asyncio, json, sys
from websockets.asyncio.client import connect
async def main():
    async with connect(sys.argv[1]) as ws:
        print(json.dumps({"offer": ws.request.headers.get("Sec-WebSocket-Extensions"), "answer": ws.response.headers.get("Sec-WebSocket-Extensions")}), flush=True)
        async def until(name):
            while True:
                m = json.loads(await ws.recv())
                if m["event"] == name:
                    return m
        await until("pusher:connection_established")
        await ws.send(json.dumps({"event": "pusher:ping", "data": {"pad": "y" * 5000}}))
        await until("pusher:pong")
        await ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "py-orders"}}))
        await until("pusher_internal:subscription_succeeded")
        print(json.dumps({"subscribed": True}), flush=True)
        m = await until("order")
        print(json.dumps({"data": json.loads(m["data"])}), flush=True)
asyncio.run(main())
`;

test('Python websockets (compression on by default): both ways', async () => {
  const srv = await start();
  const py = spawn('python3', ['-c', PYTHON_CLIENT, `ws://127.0.0.1:${srv.port}/app/${APP.key}?protocol=7`], { stdio: ['ignore', 'pipe', 'pipe'] });
  const lines = [];
  const waiters = [];
  let out = '';
  let err = '';
  py.stderr.on('data', (d) => { err += d; });
  py.stdout.on('data', (d) => {
    out += d;
    let i;
    while ((i = out.indexOf('\n')) >= 0) {
      const l = JSON.parse(out.slice(0, i));
      out = out.slice(i + 1);
      lines.push(l);
      for (const w of [...waiters]) if (w.p(l)) { waiters.splice(waiters.indexOf(w), 1); w.r(l); }
    }
  });
  const exited = new Promise((r) => py.on('exit', r));
  const wait = (p, what) => { const l = lines.find(p); return l ? Promise.resolve(l) : withTimeout(Promise.race([new Promise((r) => waiters.push({ p, r })), exited.then((c) => { throw new Error(`python exited ${c}: ${err}`); })]), 20000, what); };
  const hello = await wait((l) => 'answer' in l, 'python handshake');
  assert.match(hello.offer, /permessage-deflate/);
  assert.equal(hello.answer, ANSWER);
  await wait((l) => l.subscribed, 'python subscribed');
  await serverSdk(srv.port).trigger('py-orders', 'order', order(5));
  const got = await wait((l) => 'data' in l, 'python got the order');
  assert.deepEqual(got.data, order(5));
  assert.equal(await withTimeout(exited, 15000, 'python exit'), 0, err);
});

test('pusher-js in headless Chromium negotiates it by itself', async () => {
  assert.ok(fs.existsSync(CHROMIUM), `chromium not found at ${CHROMIUM}`);
  const srv = await start();
  const { chromium } = require('playwright-core');
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage();
  // A page of the server's own origin: Chromium blocks a public page (about:blank) from loopback.
  await page.goto(`http://127.0.0.1:${srv.port}/healthz`);
  await page.addScriptTag({ path: path.join(here, 'node_modules/pusher-js/dist/web/pusher.min.js') });
  const url = `ws://127.0.0.1:${srv.port}/app/${APP.key}?protocol=7`;
  // The browser's own WebSocket: what was agreed, and a large message to the server (compressed by Chromium).
  const native = await page.evaluate((u) => new Promise((resolve) => {
    const w = new WebSocket(u);
    w.onerror = (e) => resolve({ error: String(e && e.type) });
    w.onclose = (e) => resolve({ closed: e.code, reason: e.reason });
    w.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.event === 'pusher:connection_established') w.send(JSON.stringify({ event: 'pusher:ping', data: { pad: 'z'.repeat(30000) } }));
      if (m.event === 'pusher:pong') { resolve({ extensions: w.extensions }); w.close(); }
    };
  }), url);
  assert.equal(native.extensions, ANSWER, JSON.stringify(native));
  await page.evaluate(({ key, port }) => new Promise((resolve) => {
    window.received = [];
    const p = new Pusher(key, { wsHost: '127.0.0.1', wsPort: port, forceTLS: false, enabledTransports: ['ws'], disableStats: true, cluster: 'local' });
    const ch = p.subscribe('browser-orders');
    ch.bind('pusher:subscription_succeeded', () => resolve(true));
    ch.bind('order', (d) => window.received.push(d));
  }), { key: APP.key, port: srv.port });
  await until(async () => (await metric(srv.port, 'pushmesh_compression_connections')) >= 1, 'the browser compresses');
  await serverSdk(srv.port).trigger('browser-orders', 'order', order(6));
  await page.waitForFunction(() => window.received.length === 1, null, { timeout: 15000 });
  assert.deepEqual(await page.evaluate(() => window.received[0]), order(6));
  assert.ok((await metric(srv.port, 'pushmesh_compression_bytes_total{stage="compressed"}')) > 0);
});
