// Subscribe bursts in a 3-node cluster (issue #22 item 1): a connection's
// own subscribes and the frames the subscription barrier holds for it get
// backpressure (the node stops reading it), never a 4100.
import { test, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startNode, stopAll, meshed, metrics, client, closeClients, rawSocket, until, withTimeout, sdk,
} from './cluster.helpers.mjs';

afterEach(async () => { closeClients(); await stopAll(); });
after(async () => { closeClients(); await stopAll(); });

const slow = (m) => m.pushmesh_slow_consumer_disconnects_total || 0;

test('one pusher-js connection subscribes 5,000 channels at once: 5,000 answers, still connected, no 4100', { timeout: 240000 }, async () => {
  for (const i of [1, 2, 3]) await startNode(i);
  await meshed([1, 2, 3]);
  const c = client(1);
  await withTimeout(new Promise((r) => c.connection.bind('connected', r)), 15000, 'connected');
  const states = [];
  c.connection.bind('state_change', (s) => states.push(s.current));
  let answered = 0;
  let refused = 0;
  for (let k = 0; k < 5000; k++) {
    const ch = c.subscribe(`burst-${k}`);
    ch.bind('pusher:subscription_succeeded', () => { answered++; });
    ch.bind('pusher:subscription_error', () => { refused++; });
  }
  await until(() => answered + refused === 5000 || states.length > 0, '5,000 answers', 180000);
  assert.deepEqual(states, [], 'the connection never left "connected"');
  assert.equal(refused, 0);
  assert.equal(answered, 5000);
  assert.equal(slow(await metrics(1)), 0, 'no slow-consumer disconnect');
  // The other nodes know the channels: a publish through n2 arrives.
  const got = new Promise((r) => c.channel('burst-4999').bind('after', r));
  await sdk(2).trigger('burst-4999', 'after', { ok: 1 });
  assert.deepEqual(await withTimeout(got, 15000, 'the event through n2'), { ok: 1 });
});

test('50,000 channels over 10 raw connections on one node of 3: every subscribe answered, no connection closed', { timeout: 300000 }, async () => {
  for (const i of [1, 2, 3]) await startNode(i);
  await meshed([1, 2, 3]);
  const socks = [];
  const counts = [];
  for (let s = 0; s < 10; s++) {
    const idx = s;
    counts.push(0);
    socks.push(await rawSocket(1, (msg) => {
      if (msg.event === 'pusher_internal:subscription_succeeded') counts[idx]++;
    }));
  }
  for (let s = 0; s < 10; s++) {
    for (let k = 0; k < 5000; k++) socks[s].send('pusher:subscribe', { channel: `many-${s}-${k}` });
  }
  const total = () => counts.reduce((a, b) => a + b, 0);
  await until(() => total() === 50000 || socks.some((x) => x.closed !== null), '50,000 answers', 240000);
  assert.deepEqual(socks.map((x) => x.closed), Array(10).fill(null), 'no connection closed');
  assert.equal(total(), 50000);
  assert.equal(slow(await metrics(1)), 0, 'no slow-consumer disconnect');
});
