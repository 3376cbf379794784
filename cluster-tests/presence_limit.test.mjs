// The presence member limit holds cluster-wide: joins on two nodes at the
// same moment never admit more than max_presence_members (issue #10, item 9).
import { test, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import { startNode, stopAll, meshed, client, closeClients, until, getJson } from './cluster.helpers.mjs';

afterEach(async () => { closeClients(); await stopAll(); });
after(async () => { closeClients(); await stopAll(); });

test('limit 5, four new members joining on n1 and four on n2 at once: exactly 5 admitted, 3 refused with 403', async () => {
  const appExtra = '[apps.limits]\nmax_presence_members = 5\n';
  for (const i of [1, 2, 3]) await startNode(i, { appExtra });
  await meshed([1, 2, 3]);
  for (let round = 0; round < 3; round++) {
    const channel = `presence-limited-${round}`;
    const results = [];
    const clients = [];
    for (let k = 0; k < 8; k++) {
      const node = k % 2 === 0 ? 1 : 2;
      clients.push(client(node, { presence: { user_id: `r${round}-u${k}` } }));
    }
    // Every client connected first, then all subscribe in the same tick.
    await until(() => clients.every((c) => c.connection.state === 'connected'), 'clients connected');
    for (const c of clients) {
      const ch = c.subscribe(channel);
      ch.bind('pusher:subscription_succeeded', () => results.push('ok'));
      ch.bind('pusher:subscription_error', (e) => results.push(e.status));
    }
    await until(() => results.length === 8, `all 8 answered (round ${round})`, 15000);
    assert.equal(results.filter((r) => r === 'ok').length, 5, JSON.stringify(results));
    assert.deepEqual(results.filter((r) => r !== 'ok'), [403, 403, 403]);
    for (const c of clients) c.disconnect();
  }
  const stats = await Promise.all([1, 2, 3].map((i) => getJson(i, '/cluster')));
  assert.equal(stats.reduce((n, s) => n + s.presence_limit.local_decisions, 0), 0, 'the owner answered every claim');
  assert.ok(stats.reduce((n, s) => n + s.presence_limit.claims, 0) > 0);
});
