// Operations in a cluster (issue 21): min_cluster_size keeps an island out
// of traffic; a clean drain is not counted as loss in
// pushmesh_cluster_frames_dropped_total (the documented alert); SIGHUP on a
// clustered node without TLS reloads nothing and keeps it in the cluster.
// Real nodes in network namespaces (run.sh), pusher-js clients.
import { test, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startNode, stopNode, stopAll, meshed, metrics, client, closeClients, subscribed, until,
  readyz, ready, publish, nodeOf, sdk,
} from './cluster.helpers.mjs';

const T = 180000;
afterEach(async () => { closeClients(); await stopAll(); });

const sum = (m, name) => Object.entries(m).filter(([k]) => k === name || k.startsWith(`${name}{`)).reduce((a, [, v]) => a + v, 0);

test('min_cluster_size = 2: a node whose seeds never answer stays not ready past startup_timeout_ms; nodes that join turn ready', { timeout: T }, async () => {
  const min = 'min_cluster_size = 2';
  // n4 has the wrong secret: no seed ever answers it.
  const loner = await startNode(4, { secret: 'not-the-cluster-secret-at-all-!!', seeds: [1, 2], cluster: min, startupTimeoutMs: 1500 });
  await startNode(1, { seeds: [1, 2], cluster: min, startupTimeoutMs: 1500 });
  // Past startup_timeout_ms both say why they wait.
  await until(() => /fewer nodes joined than min_cluster_size/.test(loner.stderr()), 'the loner says it is below min_cluster_size', 30000);
  await until(() => /fewer nodes joined than min_cluster_size/.test(nodeOf(1).stderr()), 'n1 alone says it is below min_cluster_size', 30000);
  const r4 = await readyz(4);
  assert.equal(r4.status, 503, `the loner is not ready: ${JSON.stringify(r4.body)}`);
  assert.equal(r4.body.reason, 'joining');
  assert.equal(r4.body.min_cluster_size, 2);
  assert.equal(r4.body.joined_nodes, 1);
  assert.equal((await publish(4, ['ch'], 'e', {})).status, 503, 'a publish through the loner is refused');
  assert.equal(sum(await metrics(4), 'pushmesh_ready'), 0, 'pushmesh_ready says so too');
  assert.equal((await readyz(1)).status, 503, 'n1 alone is not ready either');
  // A second member arrives: n1 and n2 join each other and turn ready.
  await startNode(2, { seeds: [1, 2], cluster: min, startupTimeoutMs: 1500 });
  await meshed([1, 2], 60000);
  for (const i of [1, 2]) assert.equal(sum(await metrics(i), 'pushmesh_ready'), 1, `n${i}: pushmesh_ready 1`);
  assert.equal((await publish(1, ['ch'], 'e', {})).status, 200);
  assert.equal((await readyz(4)).status, 503, 'the loner is still out');
});

test('a clean rolling restart is not loss: pushmesh_cluster_frames_dropped_total stays 0, control frames without a link are counted apart', { timeout: T }, async () => {
  for (const i of [1, 2, 3]) await startNode(i, { seeds: [1, 2] });
  await meshed([1, 2, 3], 60000);
  // Subscription churn on n1 and n2 all along: each subscribe and
  // unsubscribe is a control frame to every peer, n3 included while it
  // drains, is gone and comes back.
  const churners = [client(1), client(2)];
  let stop = false;
  let churned = 0;
  const churn = (async () => {
    for (let k = 0; !stop && k < 5000; k++) {
      const c = churners[k % 2];
      const ch = c.subscribe(`churn-${k}`);
      await subscribed(ch);
      c.unsubscribe(`churn-${k}`);
      churned += 1;
    }
  })();
  const exit = await stopNode(3, 'SIGTERM');
  assert.equal(exit.code, 0, `n3 drained and exited cleanly (${JSON.stringify(exit)})`);
  await startNode(3, { seeds: [1, 2] });
  await meshed([1, 2, 3], 60000);
  stop = true;
  await churn;
  assert.equal((await sdk(3).trigger('after-restart', 'e', { ok: 1 })).status, 200);
  const ms = [await metrics(1), await metrics(2), await metrics(3)];
  const dropped = ms.map((m) => sum(m, 'pushmesh_cluster_frames_dropped_total'));
  const unsent = ms.map((m) => sum(m, 'pushmesh_cluster_control_frames_unsent_total'));
  console.log('clean rolling restart:', JSON.stringify({ churned, dropped, control_unsent: unsent }));
  assert.ok(churned > 0, 'state changed during the restart');
  assert.deepEqual(dropped, [0, 0, 0], 'no data frame was dropped: the loss alert stays quiet');
});

test('SIGHUP on a clustered node without TLS: it keeps running, stays linked and ready, and says what it did', { timeout: T }, async () => {
  for (const i of [1, 2]) await startNode(i, { seeds: [1, 2], log: 'info' });
  await meshed([1, 2], 60000);
  const n1 = nodeOf(1);
  for (let k = 1; k <= 3; k++) {
    n1.child.kill('SIGHUP'); // one at a time: signals arriving together may be handled as one
    await until(() => (n1.stderr().match(/SIGHUP: no TLS certificate to reload/g) || []).length === k
      && (n1.stderr().match(/SIGHUP: apps reloaded from the configuration file/g) || []).length === k, `log lines of SIGHUP #${k}`, 20000);
  }
  assert.equal(n1.child.exitCode, null, 'n1 still runs');
  await ready(1);
  await meshed([1, 2], 30000);
  assert.equal((await publish(2, ['x'], 'e', {})).status, 200);
});
