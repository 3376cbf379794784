// Apps at runtime across a cluster (issue 19): an app made through the
// admin API on one node serves on every node (connections, signed
// publishes); taken ids and keys are 409 from any node; disable, rotate and
// delete act everywhere; a restart of every node keeps the apps; conflicting
// PATCHes on two sides of a partition converge after the heal to the last
// writer. Real nodes in network namespaces (run.sh), pusher-js clients, the
// pusher SDK, raw sockets.
import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  startNode, stopNode, stopAll, meshed, nodeOf, closeClients, subscribed, until, ready, partition, healAll,
  PusherClient, PusherServer, ip, httpPort,
} from './cluster.helpers.mjs';

const T = 240000;
const TOKEN = 'cluster-admin-token-0123456789';
afterEach(async () => { closeClients(); healAll(); await stopAll(); });

const dirs = new Map();
function dataDir(i) {
  if (!dirs.has(i)) dirs.set(i, fs.mkdtempSync(path.join(os.tmpdir(), `pmc-data-${i}-`)));
  return dirs.get(i);
}
const opts = (i, more = {}) => ({ seeds: [1, 2, 3], extra: `admin_token = "${TOKEN}"\ndata_dir = "${dataDir(i)}"\n`, log: 'info', ...more });

async function api(i, method, p, body) {
  const r = await fetch(`http://${ip(i)}:${httpPort}${p}`, {
    method,
    headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: r.status, body: r.status === 204 ? null : await r.json() };
}

const sdkOf = (i, app, secret) => new PusherServer({ appId: app.id, key: app.key, secret, host: ip(i), port: String(httpPort), useTLS: false });
const status = (p) => p.then((r) => r.status, (e) => e.status);

/** A raw socket of `key` on node i: resolves { established, closed } promises. */
function raw(i, key) {
  const ws = new WebSocket(`ws://${ip(i)}:${httpPort}/app/${key}?protocol=7&client=raw&version=1.0`);
  const closed = new Promise((r) => ws.addEventListener('close', (e) => r(e.code)));
  const established = new Promise((r) => ws.addEventListener('message', (m) => {
    if (JSON.parse(m.data).event === 'pusher:connection_established') r(true);
  }));
  ws.addEventListener('error', () => {});
  return { ws, closed, established: Promise.race([established, closed.then(() => false)]) };
}

async function cluster3() {
  for (const i of [1, 2, 3]) await startNode(i, opts(i));
  await meshed([1, 2, 3], 60000);
  for (const i of [1, 2, 3]) await ready(i);
}

test('an app made on node 1 serves on 2 and 3; 409 everywhere; disable, rotate, delete act on every node; a full restart keeps it', { timeout: T }, async () => {
  await cluster3();
  const made = await api(1, 'POST', '/admin/apps', { id: 't1', key: 't1-key' });
  assert.equal(made.status, 201, JSON.stringify(made.body));
  const app = { id: 't1', key: 't1-key' };
  let secret = made.body.secret;
  // Every node has it soon (well within a second on an idle cluster; the
  // bound is generous for a loaded machine).
  for (const i of [2, 3]) await until(async () => (await api(i, 'GET', '/admin/apps/t1')).status === 200, `t1 on node ${i}`, 10000);
  for (const i of [1, 2, 3]) {
    assert.equal((await api(i, 'POST', '/admin/apps', { id: 't1', key: 'zz' })).status, 409, `id taken on ${i}`);
    assert.equal((await api(i, 'POST', '/admin/apps', { id: 'zz', key: 't1-key' })).status, 409, `key taken on ${i}`);
  }
  // A subscriber on node 3, a signed publish through node 2.
  const c = new PusherClient(app.key, { wsHost: ip(3), wsPort: httpPort, forceTLS: false, enabledTransports: ['ws'], cluster: 'mt1', disableStats: true });
  const ch = c.subscribe('room');
  await subscribed(ch);
  const got = new Promise((r) => ch.bind('hi', r));
  assert.equal(await status(sdkOf(2, app, secret).trigger('room', 'hi', { n: 1 })), 200);
  assert.deepEqual(await got, { n: 1 });
  c.disconnect();

  // Disable on node 2: 4003 and 403 on every node; enable again.
  const socks = [1, 2, 3].map((i) => raw(i, app.key));
  for (const s of socks) assert.ok(await s.established);
  assert.equal((await api(2, 'PATCH', '/admin/apps/t1', { enabled: false })).status, 200);
  for (const s of socks) assert.equal(await s.closed, 4003);
  for (const i of [1, 2, 3]) {
    await until(async () => (await status(sdkOf(i, app, secret).trigger('room', 'e', {}))) === 403, `403 on node ${i}`, 10000);
  }
  assert.equal((await api(3, 'PATCH', '/admin/apps/t1', { enabled: true })).status, 200);
  for (const i of [1, 2, 3]) {
    await until(async () => (await status(sdkOf(i, app, secret).trigger('room', 'e', {}))) === 200, `enabled on node ${i}`, 10000);
  }

  // Rotate on node 1 with a short grace: the new secret everywhere, the old one until the grace ends.
  const rot = await api(1, 'POST', '/admin/apps/t1/secret', { grace_secs: 3 });
  assert.equal(rot.status, 200);
  const old = secret;
  secret = rot.body.secret;
  for (const i of [1, 2, 3]) {
    await until(async () => (await status(sdkOf(i, app, secret).trigger('room', 'e', {}))) === 200, `new secret on node ${i}`, 10000);
  }
  for (const i of [1, 2, 3]) {
    await until(async () => (await status(sdkOf(i, app, old).trigger('room', 'e', {}))) === 401, `old secret refused on node ${i} after the grace`, 20000);
  }

  // Stats are summed over the live nodes.
  const a = raw(1, app.key); const b = raw(2, app.key); const d = raw(3, app.key);
  for (const s of [a, b, d]) assert.ok(await s.established);
  await until(async () => (await api(2, 'GET', '/admin/apps/t1/stats')).body.connections === 3, 'three connections over the cluster', 10000);
  const st = (await api(2, 'GET', '/admin/apps/t1/stats')).body;
  assert.equal(st.nodes, 3);
  assert.ok(st.messages_published >= 8, `published ${st.messages_published}`);

  // Every node restarts (one at a time): the app survives.
  for (const s of [a, b, d]) s.ws.close();
  for (const i of [1, 2, 3]) {
    await stopNode(i);
    await startNode(i, opts(i));
    await ready(i, 60000);
  }
  await meshed([1, 2, 3], 60000);
  for (const i of [1, 2, 3]) {
    assert.equal((await api(i, 'GET', '/admin/apps/t1')).status, 200, `t1 kept on node ${i}`);
    assert.equal(await status(sdkOf(i, app, secret).trigger('room', 'e', {})), 200);
  }

  // Delete on node 3: 4001 everywhere, connections included.
  const last = [1, 2, 3].map((i) => raw(i, app.key));
  for (const s of last) assert.ok(await s.established);
  assert.equal((await api(3, 'DELETE', '/admin/apps/t1')).status, 204);
  for (const s of last) assert.equal(await s.closed, 4001);
  for (const i of [1, 2, 3]) {
    await until(async () => (await api(i, 'GET', '/admin/apps/t1')).status === 404, `gone on node ${i}`, 10000);
  }
  // No secret in any node's log.
  for (const i of [1, 2, 3]) {
    for (const x of [old, secret, made.body.secret]) assert.ok(!nodeOf(i).stderr().includes(x), `no secret in node ${i}'s log`);
    assert.match(nodeOf(i).stderr(), /app (changed by a peer|created through the admin API|deleted through the admin API)/);
  }
});

test('conflicting PATCHes on two sides of a partition converge after the heal to the last writer', { timeout: T }, async () => {
  await cluster3();
  assert.equal((await api(1, 'POST', '/admin/apps', { id: 'p1', key: 'p1-key' })).status, 201);
  for (const i of [2, 3]) await until(async () => (await api(i, 'GET', '/admin/apps/p1')).status === 200, `p1 on node ${i}`, 10000);
  // Node 3 alone on one side, nodes 1 and 2 on the other.
  partition(1, 3); partition(2, 3);
  assert.equal((await api(1, 'PATCH', '/admin/apps/p1', { wsify_event: 'from-majority' })).status, 200);
  // Written after the majority's change: node 3's is the last writer (a
  // later stamp; in the same millisecond, the greater node id, n3).
  assert.equal((await api(3, 'PATCH', '/admin/apps/p1', { wsify_event: 'from-minority' })).status, 200);
  assert.equal((await api(2, 'GET', '/admin/apps/p1')).body.wsify_event, 'from-majority', 'the sides differ while cut');
  healAll();
  for (const i of [1, 2, 3]) {
    await until(async () => (await api(i, 'GET', '/admin/apps/p1')).body.wsify_event === 'from-minority', `node ${i} converges`, 60000);
  }
  // And the store on disk holds the winner on every node.
  // (The snapshot, then the journal: the last record of p1 is the one kept.)
  for (const i of [1, 2, 3]) {
    const read = (f) => { try { return fs.readFileSync(path.join(dataDir(i), f), 'utf8'); } catch { return ''; } };
    const snapshot = read('apps.json');
    const records = [...(snapshot ? JSON.parse(snapshot).records : []), ...read('apps.log').split('\n').filter(Boolean).map((l) => JSON.parse(l))];
    const rec = records.filter((r) => r.id === 'p1').at(-1);
    assert.match(rec.app.settings, /from-minority/, `node ${i}'s store`);
  }
});

test('the status page of any node shows every node with its connections and every app cluster-wide', { timeout: T }, async () => {
  const DASH = 'cluster-dashboard-token';
  const withDash = (i) => ({ ...opts(i), extra: `${opts(i).extra}dashboard_token = "${DASH}"\n` });
  for (const i of [1, 2, 3]) await startNode(i, withDash(i));
  await meshed([1, 2, 3], 60000);
  for (const i of [1, 2, 3]) await ready(i);
  assert.equal((await api(1, 'POST', '/admin/apps', { id: 'd1', key: 'd1-key' })).status, 201);
  for (const i of [2, 3]) await until(async () => (await api(i, 'GET', '/admin/apps/d1')).status === 200, `d1 on node ${i}`, 10000);
  // One connection on node 2, two on node 3.
  const socks = [raw(2, 'd1-key'), raw(3, 'd1-key'), raw(3, 'd1-key')];
  for (const s of socks) assert.ok(await s.established);
  const stats = async (i) => {
    const r = await fetch(`http://${ip(i)}:${httpPort}/dashboard/api/stats`, { headers: { authorization: `Bearer ${DASH}` } });
    assert.equal(r.status, 200);
    return r.json();
  };
  // Node 1 has none of them: its page sums what the peers answered (sampled every 5 s).
  let s;
  await until(async () => {
    s = await stats(1);
    const d1 = s.apps.find((a) => a.id === 'd1');
    return d1 && d1.connections === 3 && s.cluster_connections === 3;
  }, 'node 1 sees the three connections of d1', 60000);
  const byNode = Object.fromEntries(s.nodes.map((n) => [n.node, n.connections]));
  assert.deepEqual([byNode.n1, byNode.n2, byNode.n3], [0, 1, 2], JSON.stringify(s.nodes));
  assert.equal(s.apps.find((a) => a.id === 'd1').source, 'admin');
  assert.ok(s.history.length >= 1 && s.history.at(-1).nodes === 3, JSON.stringify(s.history.at(-1)));
  for (const x of socks) x.ws.close();
});
