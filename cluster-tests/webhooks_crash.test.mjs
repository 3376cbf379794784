// kill -9 of the node that owns pending webhooks loses none of them: the
// next node in rendezvous order holds a copy of each pending event and
// delivers it once the owner is gone (issue #10, item 8).
import { test, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import {
  startNode, stopNode, stopAll, meshed, client, closeClients, subscribed, until, webhookReceiver, APP,
} from './cluster.helpers.mjs';

afterEach(async () => { closeClients(); await stopAll(); });
after(async () => { closeClients(); await stopAll(); });

/** routing.rs hash64: SHA-256 of length-prefixed parts, first 8 bytes little-endian. */
function hash64(parts) {
  const h = crypto.createHash('sha256');
  for (const p of parts) {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(Buffer.byteLength(p)));
    h.update(len);
    h.update(p);
  }
  return h.digest().readBigUInt64LE(0);
}

/** The rendezvous owner of a channel among nodes (routing.rs is_owner). */
function owner(nodes, channel) {
  const score = (n) => [hash64([n, APP.id, channel]), n];
  return nodes.reduce((best, n) => {
    const [hb, ib] = score(best); const [hn, idn] = score(n);
    return hn > hb || (hn === hb && idn > ib) ? n : best;
  });
}

test('kill -9 of the owner of 30 pending channel_vacated: every one is delivered, with the owner\'s ids', async () => {
  const rx = await webhookReceiver();
  for (const i of [1, 2, 3]) await startNode(i, { webhookUrl: rx.url });
  await meshed([1, 2, 3]);
  const nodes = ['n1', 'n2', 'n3'];
  const channels = [];
  for (let k = 0; channels.length < 30; k++) if (owner(nodes, `hooked-${k}`) === 'n3') channels.push(`hooked-${k}`);
  // Subscribers on n1; the webhooks of these channels are n3's.
  const c = client(1);
  await Promise.all(channels.map((ch) => subscribed(c.subscribe(ch))));
  await until(() => channels.every((ch) => rx.got.some((e) => e.name === 'channel_occupied' && e.channel === ch)), '30 channel_occupied', 20000);
  assert.ok(rx.got.every((e) => typeof e.id === 'string' && e.id.startsWith('n3:')), 'fired by n3, with ids');
  // Vacate all of them: n3 schedules 30 channel_vacated (webhook_delay_ms
  // 500) and is killed before they are due.
  c.disconnect();
  await new Promise((r) => setTimeout(r, 150));
  await stopNode(3, 'SIGKILL');
  await until(() => channels.every((ch) => rx.got.some((e) => e.name === 'channel_vacated' && e.channel === ch)), 'every channel_vacated, from the backup', 20000);
  const vacated = rx.got.filter((e) => e.name === 'channel_vacated');
  assert.ok(vacated.every((e) => e.id.startsWith('n3:')), 'the owner\'s ids are kept');
  // Duplicates are allowed but carry the same id.
  const byId = new Map();
  for (const e of vacated) byId.set(e.id, e.channel);
  assert.equal(new Set(byId.values()).size, 30);
  rx.close();
});
