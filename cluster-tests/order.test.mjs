// Order through the balancer (issue #22 item 2): an app server's
// consecutive publishes, each sent after the previous one's 2xx, go
// through different nodes in turn; every subscriber, on every node, gets
// them in publish order (a 2xx means every node with subscribers for the
// channel acknowledged the event).
import { test, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startNode, stopAll, meshed, metrics, closeClients, rawSocket, until, withTimeout, sdk,
} from './cluster.helpers.mjs';

afterEach(async () => { closeClients(); await stopAll(); });
after(async () => { closeClients(); await stopAll(); });

const NODES = [1, 2, 3, 4];

test('200 publishes one after another through nodes 1, 2, 3, 4 in turn reach 200 subscribers on every node in publish order', { timeout: 300000 }, async () => {
  for (const i of NODES) await startNode(i);
  await meshed(NODES);
  const got = [];
  const subs = [];
  for (let s = 0; s < 200; s++) {
    const seen = [];
    got.push(seen);
    let answered;
    const answer = new Promise((r) => { answered = r; });
    const node = NODES[s % NODES.length];
    subs.push(await rawSocket(node, (msg) => {
      if (msg.channel !== 'ordered') return;
      if (msg.event === 'pusher_internal:subscription_succeeded') answered();
      else if (msg.event === 'e') seen.push(JSON.parse(msg.data).k);
    }));
    subs[s].send('pusher:subscribe', { channel: 'ordered' });
    await withTimeout(answer, 15000, `subscriber ${s} on n${node}`);
  }
  for (let k = 0; k < 200; k++) {
    const r = await sdk(NODES[k % NODES.length]).trigger('ordered', 'e', { k });
    assert.equal(r.status, 200);
  }
  await until(() => got.every((g) => g.length >= 200), 'every subscriber has 200 events', 60000);
  const expected = [...Array(200).keys()];
  const out = got.map((g, s) => ({ s, node: NODES[s % NODES.length], ok: JSON.stringify(g) === JSON.stringify(expected) }));
  assert.deepEqual(out.filter((o) => !o.ok), [], 'every subscriber got 0..199 exactly once, in order');
  assert.ok(subs.every((x) => x.closed === null));
  for (const i of NODES) {
    const m = await metrics(i);
    assert.equal(m['pushmesh_publish_refused_total{reason="peer_unacknowledged"}'] || 0, 0, `n${i}: no publish waited too long`);
  }
});
