// Subscriptions by filter across a 3-node cluster (issue #13): a node gets
// a tagged event only if a subscription there can match it; a node with a
// plain subscriber gets everything. Frames are read from /metrics.
import { test, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import {
  startNode, stopAll, meshed, metrics, closeClients, rawSocket, until, withTimeout,
  healAll, ip, httpPort, APP, sdk,
} from './cluster.helpers.mjs';

afterEach(async () => { closeClients(); await stopAll(); healAll(); });
after(async () => { closeClients(); await stopAll(); });

/** A signed POST /events with tags, through node `i`. */
async function publishTagged(i, channel, name, data, tags) {
  const ev = { name, channels: [channel], data: JSON.stringify(data) };
  if (tags) ev.tags = tags;
  const body = JSON.stringify(ev);
  const p = `/apps/${APP.id}/events`;
  const q = `auth_key=${APP.key}&auth_timestamp=${Math.floor(Date.now() / 1000)}&auth_version=1.0&body_md5=${crypto.createHash('md5').update(body).digest('hex')}`;
  const sig = crypto.createHmac('sha256', APP.secret).update(`POST\n${p}\n${q}`).digest('hex');
  const r = await fetch(`http://${ip(i)}:${httpPort}${p}?${q}&auth_signature=${sig}`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body, signal: AbortSignal.timeout(10000),
  });
  assert.equal(r.status, 200, await r.text());
}

/** A raw socket on node i, subscribed to `channel` with `filter` (or none). */
async function subscriber(i, channel, filter) {
  const got = [];
  let answered;
  const answer = new Promise((r) => { answered = r; });
  const sock = await rawSocket(i, (msg) => {
    if (msg.channel !== channel) return;
    if (/subscription_(succeeded|error)/.test(msg.event)) answered(msg.event);
    else if (!msg.event.startsWith('pusher')) got.push(msg.event);
  });
  sock.send('pusher:subscribe', filter ? { channel, filter } : { channel });
  assert.equal(await withTimeout(answer, 15000, `subscription on n${i}`), 'pusher_internal:subscription_succeeded');
  return got;
}

const dataFrom = (m, peer) => m[`pushmesh_cluster_frames_received_total{peer="${peer}",kind="data"}`] || 0;

test('a node whose filters cannot match gets no data frame; a plain subscriber takes everything', { timeout: 180000 }, async () => {
  for (const i of [1, 2, 3]) await startNode(i);
  await meshed([1, 2, 3]);
  // The subscription barrier answers only after every peer acknowledged the
  // new interest (with its filter): nothing to wait for after this.
  const eu = await subscriber(1, 'orders', { zone: 'eu' });
  const us = await subscriber(2, 'orders', { zone: ['us', 'ca'] });
  const sent32 = (m) => m['pushmesh_cluster_frames_sent_total{peer="n2",kind="data"}'] || 0;
  const before = { n1: dataFrom(await metrics(1), 'n3'), n2: dataFrom(await metrics(2), 'n3'), n3: sent32(await metrics(3)) };

  for (let k = 0; k < 10; k++) await publishTagged(3, 'orders', `eu-${k}`, { k }, { zone: 'eu' });
  await until(() => eu.length === 10, 'ten eu events at n1');
  // Tags nobody matches, a missing tag, untagged: no node can match.
  await publishTagged(3, 'orders', 'jp', {}, { zone: 'jp' });
  await publishTagged(3, 'orders', 'no-zone', {}, { kind: 'order' });
  await publishTagged(3, 'orders', 'untagged', {});
  await publishTagged(3, 'orders', 'ca', {}, { zone: 'ca' });
  await until(() => us.length === 1, 'the ca event at n2');
  await publishTagged(3, 'orders', 'eu-last', {}, { zone: 'eu' });
  await until(() => eu.length === 11, 'the last eu event at n1');

  const m1 = await metrics(1); const m2 = await metrics(2); const m3 = await metrics(3);
  assert.equal(dataFrom(m1, 'n3') - before.n1, 11, 'n1: the eu events only');
  assert.equal(dataFrom(m2, 'n3') - before.n2, 1, 'n2: the ca event only, none of the eu ones');
  assert.equal(sent32(m3) - before.n3, 1);
  assert.deepEqual(eu, [...Array.from({ length: 10 }, (_, k) => `eu-${k}`), 'eu-last']);
  assert.deepEqual(us, ['ca']);

  // A plain subscriber on n2: n2 now gets every event of the channel.
  const plain = await subscriber(2, 'orders');
  await publishTagged(3, 'orders', 'eu-again', {}, { zone: 'eu' });
  await publishTagged(3, 'orders', 'untagged-again', {});
  await until(() => plain.length === 2 && eu.length === 12, 'both at the plain subscriber, eu at n1');
  assert.deepEqual(plain, ['eu-again', 'untagged-again']);
  assert.deepEqual(us, ['ca'], 'the filtered subscriber on n2 still gets only its zone');
  assert.equal(dataFrom(await metrics(2), 'n3') - before.n2, 3);
  // Counts stay per channel: 3 subscriptions cluster-wide, seen from n3.
  const count = async () => (await (await sdk(3).get({ path: '/channels/orders', params: { info: 'subscription_count' } })).json()).subscription_count;
  await until(async () => (await count()) === 3, 'three subscriptions seen from n3');
});
