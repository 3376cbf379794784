// Cluster scenarios with real pushmesh processes in network namespaces,
// driven by pusher-js and the Node SDK.
import { test, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import {
  startNode, stopNode, stopAll, meshed, metrics, dataFramesReceived, sdk, client, closeClients,
  subscribed, until, withTimeout, webhookReceiver, partition, getJson, ip, BIN, healAll,
} from './cluster.helpers.mjs';

afterEach(async () => { closeClients(); await stopAll(); healAll(); });
after(async () => { closeClients(); await stopAll(); });

/** Collects events on a channel. */
function collect(ch, event) {
  const got = [];
  ch.bind(event, (d) => got.push(d));
  return got;
}

test('routing: subscribers on n1, publish through n3; n2 gets no data frames', { timeout: 180000 }, async () => {
  for (const i of [1, 2, 3]) await startNode(i);
  await meshed([1, 2, 3]);
  // Counted from here: the links' start-up copies (their end markers are
  // data frames too) are done once meshed.
  const sent32 = (m) => m['pushmesh_cluster_frames_sent_total{peer="n2",kind="data"}'] || 0;
  const from3 = (m) => m['pushmesh_cluster_frames_received_total{peer="n3",kind="data"}'] || 0;
  const before = { n1: from3(await metrics(1)), n2: dataFramesReceived(await metrics(2)), n3: sent32(await metrics(3)) };
  const c = client(1);
  const ch = c.subscribe('orders');
  await subscribed(ch);
  const got = collect(ch, 'shipped');
  await until(async () => (await sdk(3).get({ path: '/channels/orders' }).then((r) => r.json())).occupied, 'n3 sees the interest');
  for (let k = 0; k < 20; k++) await sdk(3).trigger('orders', 'shipped', { k });
  await until(() => got.length === 20, 'all 20 delivered');
  assert.deepEqual(got.map((d) => d.k), [...Array(20).keys()], 'in publish order, once each');
  const m2 = await metrics(2);
  assert.equal(dataFramesReceived(m2) - before.n2, 0, 'node 2 has no subscriber: no data frames');
  const m1 = await metrics(1);
  assert.equal(from3(m1) - before.n1, 20);
  const m3 = await metrics(3);
  assert.equal(sent32(m3) - before.n3, 0);
  // Cluster-wide channel queries from a node without subscribers.
  await until(async () => (await (await sdk(2).get({ path: '/channels/orders', params: { info: 'subscription_count' } })).json()).subscription_count === 1, 'count on n2');
  const list = await (await sdk(2).get({ path: '/channels' })).json();
  assert.ok(list.channels.orders);
  // socket_id exclusion across nodes.
  const other = client(1);
  const och = other.subscribe('orders');
  await subscribed(och);
  const otherGot = collect(och, 'x');
  await until(async () => (await (await sdk(3).get({ path: '/channels/orders', params: { info: 'subscription_count' } })).json()).subscription_count === 2, 'two subscribers');
  const excludedGot = collect(ch, 'x');
  const markers = collect(ch, 'marker');
  await sdk(3).trigger('orders', 'x', {}, { socket_id: c.connection.socket_id });
  await until(() => otherGot.length === 1, 'the other socket got it');
  await sdk(3).trigger('orders', 'marker', {});
  await until(() => markers.length === 1, 'marker at the excluded socket');
  assert.equal(excludedGot.length, 0, 'the excluded socket did not get the event');
});

test('presence across three nodes; kill -9 removes its members everywhere, one webhook per user', { timeout: 180000 }, async () => {
  const rx = await webhookReceiver();
  for (const i of [1, 2, 3]) await startNode(i, { webhookUrl: rx.url });
  await meshed([1, 2, 3]);
  const users = { 1: 'ann', 2: 'bob', 3: 'cid' };
  const chans = {};
  for (const i of [1, 2, 3]) {
    const c = client(i, { presence: { user_id: users[i], user_info: { node: i } } });
    chans[i] = c.subscribe('presence-room');
    await subscribed(chans[i]);
  }
  const ids = (ch) => { const out = []; ch.members.each((m) => out.push(m.id)); return out.sort(); };
  for (const i of [1, 2, 3]) await until(() => ids(chans[i]).length === 3, `node ${i} client sees 3 members`);
  for (const i of [1, 2, 3]) assert.deepEqual(ids(chans[i]), ['ann', 'bob', 'cid']);
  const users2 = await (await sdk(2).get({ path: '/channels/presence-room/users' })).json();
  assert.deepEqual(users2.users.map((u) => u.id).sort(), ['ann', 'bob', 'cid']);
  await until(() => rx.got.filter((e) => e.name === 'member_added').length === 3, 'three member_added webhooks');
  const removedAt1 = collect(chans[1], 'pusher:member_removed');
  const removedAt2 = collect(chans[2], 'pusher:member_removed');
  await stopNode(3, 'SIGKILL');
  // Failure detection bound: 5 s (QUIC idle timeout 3 s, gossip failure detector).
  await withTimeout(until(() => removedAt1.length === 1 && removedAt2.length === 1, 'member_removed for cid', 10000), 10000, 'member removal');
  assert.equal(removedAt1[0].id, 'cid');
  assert.deepEqual(ids(chans[1]), ['ann', 'bob']);
  await until(() => rx.got.some((e) => e.name === 'member_removed'), 'member_removed webhook', 10000);
  // Give any duplicate a chance to show: wait for a later, unrelated webhook.
  chans[2].pusher.unsubscribe('presence-room');
  await until(() => rx.got.some((e) => e.name === 'member_removed' && e.user_id === 'bob'), 'bob removed webhook', 10000);
  const removedCid = rx.got.filter((e) => e.name === 'member_removed' && e.user_id === 'cid');
  assert.equal(removedCid.length, 1, 'exactly one member_removed webhook for the killed node\'s user');
  const added = rx.got.filter((e) => e.name === 'member_added').map((e) => e.user_id).sort();
  assert.deepEqual(added, ['ann', 'bob', 'cid'], 'one member_added per user, cluster-wide');
  rx.close();
});

test('partition between n1 and n2, then healing: held messages replayed exactly once (answered 503 peer_unacknowledged meanwhile), readiness not contagious', { timeout: 180000 }, async () => {
  for (const i of [1, 2, 3]) await startNode(i);
  await meshed([1, 2, 3]);
  const subs = {};
  for (const i of [1, 2, 3]) {
    const c = client(i);
    const ch = c.subscribe('feed');
    await subscribed(ch);
    subs[i] = collect(ch, 'tick');
  }
  await until(async () => (await (await sdk(1).get({ path: '/channels/feed', params: { info: 'subscription_count' } })).json()).subscription_count === 3, 'three subscribers seen by n1');
  try {
    partition(1, 2);
    await until(async () => {
      const c1 = await getJson(1, '/cluster');
      return c1.peers.some((p) => p.node === 'n2' && !p.link);
    }, 'n1 sees its link to n2 down', 15000);
    // n3 still reaches both sides.
    for (let k = 0; k < 10; k++) await sdk(3).trigger('feed', 'tick', { k, via: 3 });
    // n1 publishes: n1 and n3 subscribers get it now; n2's copy is held.
    // n2 has subscribers and cannot acknowledge, so the answer is not 2xx
    // (#22: a 2xx promises the order across nodes): 503 peer_unacknowledged
    // after publish_ack_ms.
    for (let k = 10; k < 20; k++) {
      const status = await sdk(1).trigger('feed', 'tick', { k, via: 1 }).then(() => 200, (e) => e.status);
      assert.equal(status, 503, `publish ${k} through n1 during the cut`);
    }
    const m1 = await metrics(1);
    assert.equal(m1['pushmesh_publish_refused_total{reason="peer_unacknowledged"}'], 10);
    await until(() => subs[1].length === 20 && subs[3].length === 20, 'healthy side got everything');
    await until(() => subs[2].length >= 10, 'n2 got what n3 published');
    // One broken path between two nodes takes nobody out: each still
    // reaches a majority (itself and n3).
    for (const i of [1, 2, 3]) {
      assert.equal((await fetch(`http://${ip(i)}:6001/readyz`)).status, 200, `n${i} stays ready during the n1-n2 cut`);
    }
  } finally {
    partition(1, 2, false);
  }
  await until(async () => (await getJson(1, '/cluster')).peers.some((p) => p.node === 'n2' && p.link), 'n1-n2 link back', 20000);
  for (let k = 20; k < 30; k++) await sdk(1).trigger('feed', 'tick', { k, via: 1 });
  await until(() => subs[1].length === 30 && subs[2].length === 30 && subs[3].length === 30, 'after healing, n2 got the held events and the new ones');
  for (const i of [1, 2, 3]) {
    const ks = subs[i].map((d) => d.k);
    assert.equal(new Set(ks).size, ks.length, `no duplicates at node ${i}`);
  }
  const via1 = subs[2].filter((d) => d.via === 1).map((d) => d.k);
  assert.deepEqual(via1, [...via1].sort((a, b) => a - b), 'n1\'s events reached n2 in order');
  assert.equal((await fetch(`http://${ip(1)}:6001/readyz`)).status, 200, 'ready after healing');
});

test('rolling restart under steady publish load: sessions are gap-free and duplicate-free', { timeout: 180000 }, async () => {
  for (const i of [1, 2, 3]) await startNode(i);
  await meshed([1, 2, 3]);
  // One client per node, each on its own channel; sessions split at reconnects.
  const clients = {};
  for (const i of [1, 2, 3]) {
    const c = client(i);
    const rec = { sessions: [], codes: [] };
    c.connection.bind('state_change', (s) => { if (s.current === 'connected') rec.sessions.push([]); });
    c.connection.bind('error', (e) => { if (e && e.data && e.data.code) rec.codes.push(e.data.code); });
    const ch = c.subscribe(`rr-${i}`);
    ch.bind('m', (d) => rec.sessions[rec.sessions.length - 1].push(d.k));
    await subscribed(ch);
    clients[i] = rec;
  }
  let k = 0;
  let down = 0;
  let stop = false;
  // Publishes answered 2xx, per channel (a 503 means "not delivered").
  const acked = { 1: new Set(), 2: new Set(), 3: new Set() };
  const publisher = (async () => {
    while (!stop) {
      const via = [1, 2, 3].find((i) => i !== down && i !== ((down % 3) + 1)) || 1;
      const n = k++;
      await Promise.all([1, 2, 3].map((i) => sdk(via).trigger(`rr-${i}`, 'm', { k: n })
        .then(() => acked[i].add(n)).catch(() => {})));
    }
  })();
  for (const i of [1, 2, 3]) {
    const before = k;
    await until(() => k > before + 20, 'some publishes before the restart');
    down = i;
    const { code } = await stopNode(i, 'SIGTERM');
    assert.equal(code, 0, `node ${i} drained and exited cleanly`);
    await startNode(i);
    await meshed([1, 2, 3]);
    down = 0;
  }
  // Every client reconnects (pusher-js backs off while its node is down)
  // and receives in its new session before the load stops.
  await until(() => [1, 2, 3].every((i) => {
    const s = clients[i].sessions;
    return s.length >= 2 && s[s.length - 1].length >= 5;
  }), 'every client reconnected and receiving', 60000);
  stop = true;
  await publisher;
  for (const i of [1, 2, 3]) {
    const rec = clients[i];
    assert.ok(rec.codes.includes(4200), `client of node ${i} was told to reconnect (4200)`);
    assert.ok(rec.sessions.length >= 2, `client of node ${i} reconnected`);
    const all = rec.sessions.flat();
    assert.equal(new Set(all).size, all.length, `no message delivered twice to client ${i}`);
    for (const s of rec.sessions.filter((x) => x.length > 0)) {
      const sorted = [...s].sort((a, b) => a - b);
      const [lo, hi] = [sorted[0], sorted[sorted.length - 1]];
      const missing = [...acked[i]].filter((n) => n >= lo && n <= hi && !s.includes(n));
      assert.deepEqual(missing, [], `client ${i}: a session (${lo}..${hi}) got every publish answered 2xx in its range`);
      assert.deepEqual(s, sorted, `client ${i}: in order`);
    }
    assert.ok(rec.sessions[rec.sessions.length - 1].length > 0, `client ${i} receives after the restarts`);
  }
});

test('a node without the cluster secret, or without certificates of the cluster CA, cannot join or receive', { timeout: 180000 }, async () => {
  for (const i of [1, 2]) await startNode(i);
  await meshed([1, 2]);
  const c1 = client(1);
  const ch = c1.subscribe('secret-feed');
  await subscribed(ch);
  const c1got = collect(ch, 'e');
  // n3 with a wrong secret.
  await startNode(3, { secret: 'not-the-cluster-secret-at-all-!!' });
  const intruder = client(3);
  const ich = intruder.subscribe('secret-feed');
  await subscribed(ich);
  const stolen = collect(ich, 'e');
  await until(async () => (await getJson(1, '/cluster')).gossip.rejected > 0, 'n1 rejects the intruder\'s gossip');
  await sdk(1).trigger('secret-feed', 'e', { k: 1 });
  await sdk(2).trigger('secret-feed', 'e', { k: 2 });
  await until(() => c1got.length === 2, 'the member nodes still work');
  const cl1 = await getJson(1, '/cluster');
  assert.ok(!cl1.peers.some((p) => p.node === 'n3' && p.live), 'n3 is not a live member');
  assert.equal((await getJson(3, '/cluster')).synced_peers.length, 0);
  assert.equal(stolen.length, 0, 'nothing reached the intruder');
  await stopNode(3, 'SIGKILL');
  // n3 with the right secret but certificates from another CA: gossip works, links do not.
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pmc-certs-'));
  execFileSync(BIN, ['cluster', 'init', '--out', dir, '--node', 'n3']);
  await startNode(3, { certs: { ca: `${dir}/ca.pem`, cert: `${dir}/n3.pem`, key: `${dir}/n3-key.pem` } });
  const intruder2 = client(3);
  const ich2 = intruder2.subscribe('secret-feed');
  await subscribed(ich2);
  const stolen2 = collect(ich2, 'e');
  await until(async () => (await getJson(1, '/cluster')).peers.some((p) => p.node === 'n3' && p.live), 'n3 is live in gossip');
  await sdk(1).trigger('secret-feed', 'e', { k: 4 });
  await until(() => c1got.length === 3, 'delivered locally');
  const cl = await getJson(1, '/cluster');
  assert.ok(!cl.synced_peers.includes('n3'), 'no link with a foreign certificate');
  assert.equal((await getJson(3, '/cluster')).synced_peers.length, 0);
  assert.equal(stolen2.length, 0, 'nothing reached the node with foreign certificates');
  // Readiness is not contagious: n1 still reaches a majority (itself and
  // n2), the node that cannot link is the one taken out.
  assert.equal((await fetch(`http://${ip(1)}:6001/readyz`)).status, 200, 'n1 stays ready');
  assert.equal((await fetch(`http://${ip(3)}:6001/readyz`)).status, 503, 'the node that cannot link is not ready');
});
