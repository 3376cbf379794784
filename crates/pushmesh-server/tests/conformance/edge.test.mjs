// The edge under storms and bad input (issue 21): admission per address, a
// draining node that does not invite a reconnect storm, a JSON body on every
// 4xx, the request body deadline, RFC 7239 Forwarded from trusted proxies.
// Real processes, real sockets from several loopback addresses.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import net from 'node:net';
import crypto from 'node:crypto';
import { startServer, serverSdk, withTimeout, until, WebSocket, PusherClient, APP, APP_TOML, clusteredToml, freePort } from './helpers.mjs';

const appToml = APP_TOML;

/** GET over a fresh connection from `localAddress`: { status, headers, body }. */
function get(port, path, localAddress = '127.0.0.1') {
  return withTimeout(new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path, localAddress, agent: false }, (res) => {
      let body = '';
      res.on('data', (d) => { body += d; });
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body }));
    });
    req.on('error', reject);
  }), 20000, `GET ${path} from ${localAddress}`);
}

/**
 * One WebSocket attempt on `path` from `localAddress`; resolves with what the
 * client was told: `established` (pusher:connection_established or, on /ws,
 * open), `refused` (an HTTP answer: status, Retry-After, JSON body), `closed`
 * (a close code before being established), or `error` (reset, no answer).
 * The socket is kept open when established; `ws` is returned to close it.
 */
function attempt(port, path, { localAddress = '127.0.0.1', headers = {}, ms = 60000 } = {}) {
  return new Promise((resolve) => {
    let done = false;
    const finish = (r) => { if (!done) { done = true; clearTimeout(t); resolve({ ...r, ws }); } };
    const ws = new WebSocket(`ws://127.0.0.1:${port}${path}`, { localAddress, headers });
    const t = setTimeout(() => { finish({ outcome: 'error', error: 'no answer in time' }); ws.terminate(); }, ms);
    ws.on('unexpected-response', (_req, res) => {
      let body = '';
      res.on('data', (d) => { body += d; });
      res.on('end', () => {
        finish({ outcome: 'refused', status: res.statusCode, retryAfter: res.headers['retry-after'], body });
        ws.terminate();
      });
      res.on('error', () => finish({ outcome: 'refused', status: res.statusCode, retryAfter: res.headers['retry-after'], body }));
    });
    ws.on('open', () => { if (!path.startsWith('/app/')) finish({ outcome: 'established' }); });
    ws.on('message', (d) => {
      const m = JSON.parse(d.toString());
      if (m.event === 'pusher:connection_established') finish({ outcome: 'established' });
    });
    ws.on('close', (code) => finish({ outcome: 'closed', code }));
    ws.on('error', (e) => finish({ outcome: 'error', error: e.code || e.message }));
  });
}

/** A told-to-back-off answer: 429/503 with Retry-After and a JSON body, or a 41xx close. */
function isBackoff(r) {
  if (r.outcome === 'closed') return r.code >= 4100 && r.code < 4200;
  if (r.outcome !== 'refused' || ![429, 503].includes(r.status) || !r.retryAfter) return false;
  try { return typeof JSON.parse(r.body).error === 'string'; } catch { return false; }
}

test('a 2,000-socket half-open flood from 127.0.0.1: 127.0.0.2 connects and subscribes, /healthz and a signed publish are answered', { timeout: 180000 }, async () => {
  const srv = await startServer({ configToml: appToml });
  const flood = [];
  const told = { answered: 0, reset: 0 };
  try {
    await withTimeout(Promise.all(Array.from({ length: 2000 }, () => new Promise((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port: srv.port, localAddress: '127.0.0.1' });
      flood.push(s);
      let got = '';
      s.on('connect', () => { s.write(`GET /app/${APP.key}?protocol=7 HTTP/1.1\r\nHost: x\r\n`); resolve(); });
      s.on('data', (d) => { if (!got) told.answered += 1; got += d; });
      s.on('error', (e) => { if (e.code === 'ECONNRESET') told.reset += 1; resolve(); });
    }))), 60000, 'the flood to connect');
    const metrics = async () => (await get(srv.port, '/metrics', '127.0.0.2')).body;
    // The flood holds what it may: the address's pending slots.
    await until(async () => /pushmesh_pending_handshakes (1[0-9]{2})\b/.test(await metrics()), 'the flood pending', 30000);

    const health = await get(srv.port, '/healthz', '127.0.0.2');
    assert.equal(health.status, 200, '/healthz from another address');
    const agent = new http.Agent({ localAddress: '127.0.0.2' });
    const sdk = serverSdk(srv.port, { agent });
    const c = await attempt(srv.port, `/app/${APP.key}?protocol=7`, { localAddress: '127.0.0.2' });
    assert.equal(c.outcome, 'established', `client from 127.0.0.2: ${JSON.stringify({ ...c, ws: undefined })}`);
    const frames = [];
    c.ws.on('message', (d) => frames.push(JSON.parse(d.toString())));
    c.ws.send(JSON.stringify({ event: 'pusher:subscribe', data: { channel: 'flooded' } }));
    await until(() => frames.some((m) => m.event === 'pusher_internal:subscription_succeeded'), 'subscribed', 20000);
    const pub = await withTimeout(sdk.trigger('flooded', 'e', { n: 1 }), 20000, 'publish');
    assert.equal(pub.status, 200, 'signed publish from another address');
    await until(() => frames.some((m) => m.event === 'e'), 'the event delivered', 20000);
    c.ws.close();
    agent.destroy();

    const m = await metrics();
    const refused = Number(m.match(/pushmesh_connections_refused_total\{reason="pending_per_ip"\} (\d+)/)?.[1]);
    assert.ok(refused >= 2000 - 128, `the flood beyond the per-address cap answered 429 (${refused})`);
    await until(() => told.answered >= refused, `every refused socket got its answer (${told.answered} of ${refused})`, 30000);
    assert.equal(told.reset, 0, 'no flood socket was reset');
  } finally {
    for (const s of flood) s.destroy();
    await srv.stop();
  }
});

test('every pending slot taken: the client listener waits instead of resetting, metrics_listen answers /healthz and /readyz', { timeout: 120000 }, async () => {
  const metricsPort = await freePort();
  const srv = await startServer({
    configToml: `max_pending_handshakes = 20\nmax_pending_handshakes_per_ip = 0\nmetrics_listen = "127.0.0.1:${metricsPort}"\n${appToml}`,
  });
  const flood = [];
  try {
    // 20 half-open sockets from 20 addresses take every slot.
    await Promise.all(Array.from({ length: 20 }, (_, i) => new Promise((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port: srv.port, localAddress: `127.0.0.${10 + i}` });
      flood.push(s);
      s.on('connect', () => { s.write(`GET /app/${APP.key}?protocol=7 HTTP/1.1\r\nHost: x\r\n`); resolve(); });
      s.on('error', () => {});
    })));
    await until(async () => /pushmesh_pending_handshakes 20\b/.test((await get(metricsPort, '/metrics')).body), 'every slot taken', 30000);
    // The client listener does not take the next connection: it waits.
    const waiting = get(srv.port, '/healthz', '127.0.0.2');
    let answered = false;
    waiting.then(() => { answered = true; }, () => { answered = true; });
    await until(async () => /pushmesh_accept_paused_total [1-9]/.test((await get(metricsPort, '/metrics')).body), 'the listener paused', 30000);
    assert.equal(answered, false, 'not answered while every slot is taken');
    // The separate listener is outside the client listener's admission.
    assert.equal((await get(metricsPort, '/healthz')).status, 200);
    assert.equal((await get(metricsPort, '/readyz')).status, 200);
    // A slot frees: the waiting request is accepted and answered, not reset.
    flood.shift().destroy();
    assert.equal((await waiting).status, 200);
  } finally {
    for (const s of flood) s.destroy();
    await srv.stop();
  }
});

test('a reconnect storm: 5,000 clients from 50 addresses at once, 4 rounds, each connected or told to back off, none reset', { timeout: 600000 }, async () => {
  const srv = await startServer({ configToml: appToml });
  try {
    for (let round = 1; round <= 4; round += 1) {
      const results = await Promise.all(Array.from({ length: 5000 }, (_, i) => attempt(
        srv.port, `/app/${APP.key}?protocol=7`, { localAddress: `127.0.0.${1 + (i % 50)}`, ms: 120000 },
      )));
      const count = (p) => results.filter(p).length;
      const established = count((r) => r.outcome === 'established');
      const backoff = count(isBackoff);
      const other = results.filter((r) => r.outcome !== 'established' && !isBackoff(r));
      const sample = other.slice(0, 5).map((r) => JSON.stringify({ ...r, ws: undefined }));
      console.log(`round ${round}: ${established} connected, ${backoff} told to back off, ${other.length} neither ${sample.join(' ')}`);
      for (const r of results) r.ws.terminate();
      assert.equal(other.length, 0, `round ${round}: every client connected or told to back off (${sample.join(' ')})`);
      assert.ok(established > 0, `round ${round}: some connected`);
      await until(async () => /pushmesh_connections 0\b/.test((await get(srv.port, '/metrics')).body), 'round closed', 60000);
    }
  } finally {
    await srv.stop();
  }
});

const drainingToml = clusteredToml('drain_wait_ms = 10000');

/**
 * A client as pusher-js behaves on the wire: reconnects at once on a 4200
 * close; after a refused handshake, waits the Retry-After it was given (at
 * once when there is none). Counts its handshakes until `stop()`.
 */
function reconnectingClient(port) {
  const state = { handshakes: 0, codes: [], statuses: [], stopped: false, current: null };
  const loop = async () => {
    while (!state.stopped) {
      state.handshakes += 1;
      const r = await attempt(port, `/app/${APP.key}?protocol=7`, { ms: 10000 });
      state.current = r.ws;
      if (r.outcome === 'established') {
        const code = await new Promise((res) => r.ws.on('close', (c) => res(c)));
        state.codes.push(code);
      } else if (r.outcome === 'closed') {
        state.codes.push(r.code);
      } else if (r.outcome === 'refused') {
        state.statuses.push(r.status);
        const wait = Number(r.retryAfter) * 1000 || 0;
        const end = Date.now() + wait;
        while (!state.stopped && Date.now() < end) await new Promise((res) => setTimeout(res, 50));
      } else {
        await new Promise((res) => setTimeout(res, 10));
      }
    }
  };
  const running = loop();
  return { state, stop: async () => { state.stopped = true; state.current?.terminate(); await running; } };
}

test('a draining node refuses new upgrades with 503 + Retry-After; a client reconnecting on 4200 makes at most 20 handshakes in 3 s', { timeout: 120000 }, async () => {
  const srv = await startServer({ configToml: drainingToml });
  try {
    await until(async () => (await get(srv.port, '/readyz')).status === 200, 'ready', 30000);
    const existing = await attempt(srv.port, `/app/${APP.key}?protocol=7`);
    assert.equal(existing.outcome, 'established');
    const existingClosed = new Promise((r) => existing.ws.on('close', (c) => r(c)));
    srv.child.kill('SIGTERM');
    await until(async () => (await get(srv.port, '/readyz')).status === 503, 'draining');

    const client = reconnectingClient(srv.port);
    const t0 = Date.now();
    await new Promise((r) => setTimeout(r, 3000));
    const { handshakes } = client.state;
    await client.stop();
    console.log(`reconnecting client: ${handshakes} handshakes in ${Date.now() - t0} ms, HTTP ${client.state.statuses.join(',') || 'none'}, ${client.state.codes.filter((c) => c === 4200).length} closes with 4200`);
    assert.ok(handshakes <= 20, `at most 20 handshakes in 3 s (${handshakes})`);
    assert.ok(handshakes >= 1);

    // pusher-js itself, counted by the node: at most 20 handshakes in 3 s.
    const refusedSoFar = async () => Number((await get(srv.port, '/metrics')).body
      .match(/pushmesh_upgrades_refused_total\{reason="draining"\} (\d+)/)?.[1]);
    const before = await refusedSoFar();
    const pjs = new PusherClient(APP.key, {
      wsHost: '127.0.0.1', wsPort: srv.port, forceTLS: false, enabledTransports: ['ws'], cluster: 'mt1', disableStats: true,
    });
    await new Promise((r) => setTimeout(r, 3000));
    pjs.disconnect();
    const byPusherJs = (await refusedSoFar()) - before;
    console.log(`pusher-js: ${byPusherJs} handshakes in 3 s (state ${pjs.connection.state})`);
    assert.ok(byPusherJs >= 1 && byPusherJs <= 20, `pusher-js: at most 20 handshakes in 3 s (${byPusherJs})`);

    for (const path of [`/app/${APP.key}?protocol=7`, '/ws']) {
      const late = await attempt(srv.port, path);
      assert.equal(late.outcome, 'refused', `${path}: a newcomer gets an HTTP answer (${late.outcome} ${late.code ?? ''})`);
      assert.equal(late.status, 503);
      assert.ok(Number(late.retryAfter) >= 1, `${path}: Retry-After ${late.retryAfter}`);
      assert.equal(JSON.parse(late.body).reason, 'draining');
    }

    assert.equal(await withTimeout(existingClosed, 20000, 'the drain close'), 4200, 'existing clients still get 4200');
    const m = (await get(srv.port, '/metrics').catch(() => ({ body: '' }))).body;
    if (m) assert.match(m, /pushmesh_upgrades_refused_total\{reason="draining"\} [1-9]/);
    assert.equal((await srv.exited).code, 0);
  } finally {
    await srv.stop();
  }
});

/** Sends raw bytes and reads the answer until the server closes (or `ms`). */
function raw(port, bytes, ms = 15000) {
  return withTimeout(new Promise((resolve, reject) => {
    const s = net.connect({ host: '127.0.0.1', port }, () => s.write(bytes));
    let got = '';
    s.on('data', (d) => {
      got += d;
      // One whole response is enough: keep-alive answers leave it open.
      const [head, body = ''] = got.split('\r\n\r\n');
      const len = Number(head.match(/content-length: (\d+)/i)?.[1]);
      if (!Number.isNaN(len) && Buffer.byteLength(body) >= len) { s.destroy(); resolve(got); }
    });
    s.on('end', () => resolve(got));
    s.on('error', reject);
  }), ms, `an answer to ${JSON.stringify(bytes.slice(0, 40))}`);
}

function signedPath(path, body) {
  const q = new URLSearchParams({
    auth_key: APP.key, auth_timestamp: String(Math.floor(Date.now() / 1000)), auth_version: '1.0',
    body_md5: crypto.createHash('md5').update(body).digest('hex'),
  });
  const sorted = [...q.entries()].sort(([a], [b]) => (a < b ? -1 : 1)).map(([k, v]) => `${k}=${v}`).join('&');
  const sig = crypto.createHmac('sha256', APP.secret).update(`POST\n${path}\n${sorted}`).digest('hex');
  return `${path}?${sorted}&auth_signature=${sig}`;
}

test('malformed requests each get a 4xx with a JSON body', async () => {
  const srv = await startServer({ configToml: appToml });
  try {
    const events = `/apps/${APP.id}/events`;
    const cases = {
      'bad request line': 'GARBAGE\r\n\r\n',
      'bad HTTP version': 'GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n',
      'bad header': 'GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n',
      'bad Content-Length': `POST ${events} HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n`,
      'bad chunked body': `POST ${events} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n`,
      'headers too large': `GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(600000)}\r\n\r\n`,
      'bad percent-encoding': `GET /apps/${APP.id}/channels/%zz%ff HTTP/1.1\r\nHost: x\r\n\r\n`,
      'bad percent-encoding in a query': `GET /apps/${APP.id}/channels?filter_by_prefix=%zz HTTP/1.1\r\nHost: x\r\n\r\n`,
      'empty POST body, signed': `POST ${signedPath(events, '')} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 0\r\n\r\n`,
      'empty POST body, unsigned': `POST ${events} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n`,
      'wrong content-type': `POST ${signedPath(events, 'a=b')} HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 3\r\n\r\na=b`,
      'bad JSON body': `POST ${signedPath(events, '{"name":')} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n{"name":`,
      'wrong method': 'DELETE /healthz HTTP/1.1\r\nHost: x\r\n\r\n',
      'GET on a POST route': `GET ${events} HTTP/1.1\r\nHost: x\r\n\r\n`,
      'upgrade without its headers': `GET /app/${APP.key} HTTP/1.1\r\nHost: x\r\n\r\n`,
      'unknown path': 'GET /nope HTTP/1.1\r\nHost: x\r\n\r\n',
    };
    for (const [what, bytes] of Object.entries(cases)) {
      const got = await raw(srv.port, bytes);
      const status = Number(got.match(/^HTTP\/1\.1 (\d{3})/)?.[1]);
      assert.ok(status >= 400 && status < 500, `${what}: a 4xx (${JSON.stringify(got.slice(0, 80))})`);
      assert.match(got, /content-type: application\/json/i, `${what}: JSON`);
      const body = got.split('\r\n\r\n').slice(1).join('\r\n\r\n');
      assert.equal(typeof JSON.parse(body).error, 'string', `${what}: {"error"} (${body})`);
    }
  } finally {
    await srv.stop();
  }
});

test('a slow request body on a keep-alive connection gets 408 with a JSON body within request_body_timeout_ms', async () => {
  const srv = await startServer({ configToml: `request_body_timeout_ms = 1500\n${appToml}` });
  try {
    const got = await withTimeout(new Promise((resolve, reject) => {
      const s = net.connect({ host: '127.0.0.1', port: srv.port });
      let buf = '';
      let t0;
      s.on('connect', () => s.write('GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'));
      s.on('data', (d) => {
        buf += d;
        if (t0 === undefined && buf.includes('"ok"')) {
          // Keep-alive: the next request on the same connection, its body
          // 10 of 100 bytes, then nothing.
          buf = '';
          t0 = Date.now();
          s.write(`POST /apps/${APP.id}/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"name":"e`);
        }
      });
      s.on('end', () => resolve({ buf, ms: Date.now() - t0 }));
      s.on('error', reject);
    }), 30000, 'the 408');
    assert.match(got.buf, /^HTTP\/1\.1 408 /, got.buf);
    const body = JSON.parse(got.buf.split('\r\n\r\n')[1]);
    assert.match(body.error, /1500 ms/);
    assert.ok(got.ms >= 1400, `not before the deadline (${got.ms} ms)`);
    assert.ok(got.ms < 15000, `within the deadline, with slack for a loaded machine (${got.ms} ms)`);
    assert.match((await get(srv.port, '/metrics')).body, /pushmesh_request_body_timeouts_total 1\b/);
  } finally {
    await srv.stop();
  }
});

test('Forwarded (RFC 7239) names the client behind a trusted proxy and is ignored from others', async () => {
  const srv = await startServer({
    configToml: `trusted_proxies = ["127.0.0.1/32"]\nforwarded_header = "forwarded"\nmax_connections_per_ip = 1\n${appToml}`,
  });
  const path = `/app/${APP.key}?protocol=7`;
  const open = [];
  const at = async (localAddress, forwarded) => {
    const r = await attempt(srv.port, path, { localAddress, headers: { Forwarded: forwarded }, ms: 20000 });
    open.push(r.ws);
    return r;
  };
  try {
    const one = 'for=192.0.2.60;proto=http;by=203.0.113.43';
    assert.equal((await at('127.0.0.1', one)).outcome, 'established', 'first of 192.0.2.60');
    const second = await at('127.0.0.1', one);
    assert.equal(second.outcome, 'refused', '192.0.2.60 (from the trusted proxy) is at its cap');
    assert.equal(second.status, 429);
    assert.equal((await at('127.0.0.1', 'For="[2001:db8:cafe::17]:4711"')).outcome, 'established', 'a quoted IPv6 client is another address');
    const v6again = await at('127.0.0.1', 'for=unknown, For="[2001:db8:cafe::17]:4711"');
    assert.equal(v6again.status, 429, 'the right-most hop is the client: [2001:db8:cafe::17] again');
    // An obfuscated client: the trusted proxy itself, never limited.
    assert.equal((await at('127.0.0.1', 'for="_gazonk"')).outcome, 'established');
    assert.equal((await at('127.0.0.1', 'for="_gazonk"')).outcome, 'established');
    // From an untrusted address the header is the client's own claim.
    assert.equal((await at('127.0.0.2', one)).outcome, 'established', '127.0.0.2 is not 192.0.2.60');
    const third = await at('127.0.0.2', 'for=198.51.100.1');
    assert.equal(third.outcome, 'refused', '127.0.0.2 counted as itself');
    assert.equal(third.status, 429);
    assert.ok(Number(third.retryAfter) >= 1);
  } finally {
    for (const ws of open) ws.terminate();
    await srv.stop();
  }
});

test('a node still joining its cluster refuses newcomers with a backoff (pusher: 4100, /ws: 503 joining + Retry-After), not 4200 (no reconnect loop)', { timeout: 90000 }, async () => {
  // A seed that never answers and min_cluster_size = 2: joining for good.
  const srv = await startServer({
    configToml: clusteredToml('seeds = ["127.0.0.1:9"]\nmin_cluster_size = 2\nstartup_timeout_ms = 200'),
  });
  try {
    const r = await get(srv.port, '/readyz');
    assert.equal(r.status, 503);
    const app = await attempt(srv.port, `/app/${APP.key}?protocol=7`);
    assert.equal(app.outcome, 'closed', `/app: a close (${app.outcome} ${app.status ?? ''})`);
    assert.equal(app.code, 4100, 'pusher-js reconnects after 1 s on 41xx');
    const ws = await attempt(srv.port, '/ws');
    assert.equal(ws.outcome, 'refused', `/ws: an HTTP answer (${ws.outcome} ${ws.code ?? ''})`);
    assert.equal(ws.status, 503);
    assert.equal(ws.retryAfter, '1');
    assert.equal(JSON.parse(ws.body).reason, 'joining');
    const refusedJoining = async () => {
      const m = (await get(srv.port, '/metrics')).body;
      return Number(/pushmesh_upgrades_refused_total\{reason="joining"\} (\d+)/.exec(m)?.[1] ?? NaN);
    };
    assert.equal(await refusedJoining(), 2);
    // pusher-js keeps trying, about once a second: three more handshakes
    // come well within 30 s (after a failed handshake it would wait 15 s
    // each), and never a tight loop.
    const t0 = Date.now();
    const pjs = new PusherClient(APP.key, { wsHost: '127.0.0.1', wsPort: srv.port, forceTLS: false, enabledTransports: ['ws'], cluster: 'mt1' });
    try {
      await until(async () => (await refusedJoining()) >= 5, 'pusher-js to retry three times', 30000);
      const secs = (Date.now() - t0) / 1000;
      const n = (await refusedJoining()) - 2;
      assert.ok(n <= 3 * secs + 3, `${n} handshakes in ${secs.toFixed(1)} s: no reconnect loop`);
      assert.notEqual(pjs.connection.state, 'connected');
    } finally {
      pjs.disconnect();
    }
  } finally {
    await srv.stop();
  }
});
