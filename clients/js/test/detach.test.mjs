import test from 'node:test';
import assert from 'node:assert/strict';
import { withRecovery, subscribeWithFilter } from '../index.js';
import { startFakeServer, makePusher, closeClient, nextEvent } from './support/fake-server.mjs';

test('detach restores the stock behaviour', async (t) => {
  const server = await startFakeServer();
  const pusher = makePusher(server);
  t.after(async () => {
    await closeClient(pusher);
    await server.close();
  });
  const stockSendEvent = pusher.send_event;
  const stockUnsubscribe = pusher.unsubscribe;
  const rec = withRecovery(pusher);
  assert.notEqual(pusher.send_event, stockSendEvent);

  server.answer = () => ({ fields: { position: 'd0' } });
  const channel = pusher.subscribe('chat');
  const succeeded = nextEvent(channel, 'pusher:subscription_succeeded');
  await server.nextSubscribe('chat');
  await succeeded;
  const got = nextEvent(channel, 'msg');
  server.publish('chat', 'msg', {}, 'd1');
  await got;
  assert.equal(rec.position('chat'), 'd1');

  rec.detach();
  rec.detach(); // idempotent
  assert.equal(rec.attached, false);
  assert.equal(Object.hasOwn(pusher, 'send_event'), false);
  assert.equal(Object.hasOwn(pusher, 'unsubscribe'), false);
  assert.equal(pusher.send_event, stockSendEvent);
  assert.equal(pusher.unsubscribe, stockUnsubscribe);

  // Events are no longer observed, and a resubscribe carries no position.
  const after = nextEvent(channel, 'msg');
  server.publish('chat', 'msg', {}, 'd2');
  await after;
  assert.equal(rec.position('chat'), 'd1');
  let notices = 0;
  channel.bind('pushmesh:recovery', () => notices++);
  server.answer = () => ({ fields: { recovered: false, position: 'd9' } });
  const resubscribed = nextEvent(channel, 'pusher:subscription_succeeded');
  server.dropConnectionOf('chat');
  const sent = await server.nextSubscribe('chat');
  assert.ok(!('position' in sent));
  await resubscribed;
  const next = nextEvent(channel, 'msg');
  server.publish('chat', 'msg', {}, 'd10');
  await next;
  assert.equal(notices, 0, 'no recovery notice after detach');
  assert.equal(rec.position('chat'), 'd1');

  // A new withRecovery can be attached after detach.
  const rec2 = withRecovery(pusher);
  const again = nextEvent(channel, 'msg');
  server.publish('chat', 'msg', {}, 'd11');
  await again;
  assert.equal(rec2.position('chat'), 'd11');
  rec2.detach();
  assert.equal(Object.hasOwn(pusher, 'send_event'), false);
});

test('detaching recovery keeps filters working; hooks go once nothing uses them', async (t) => {
  const server = await startFakeServer();
  const pusher = makePusher(server);
  t.after(async () => {
    await closeClient(pusher);
    await server.close();
  });
  const rec = withRecovery(pusher);
  server.answer = () => ({ fields: { position: 'g0' } });
  const channel = subscribeWithFilter(pusher, 'orders', { zone: 'eu' });
  const succeeded = nextEvent(channel, 'pusher:subscription_succeeded');
  await server.nextSubscribe('orders');
  await succeeded;
  assert.equal(rec.position('orders'), 'g0');

  rec.detach();
  assert.equal(Object.hasOwn(pusher, 'send_event'), true, 'the filter still needs the hook');
  server.answer = () => ({ fields: {} });
  const resubscribed = nextEvent(channel, 'pusher:subscription_succeeded');
  server.dropConnectionOf('orders');
  const sent = await server.nextSubscribe('orders');
  assert.deepEqual(sent.filter, { zone: 'eu' });
  assert.ok(!('position' in sent));
  await resubscribed;

  pusher.unsubscribe('orders');
  await server.nextUnsubscribe('orders');
  assert.equal(Object.hasOwn(pusher, 'send_event'), false, 'no filter and no recovery: stock methods back');
  assert.equal(Object.hasOwn(pusher, 'unsubscribe'), false);
});
