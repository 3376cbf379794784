import test from 'node:test';
import assert from 'node:assert/strict';
import { subscribeWithFilter, withRecovery, validateFilter, filterOf } from '../index.js';
import { startFakeServer, makePusher, closeClient, nextEvent } from './support/fake-server.mjs';

test('invalid filters throw TypeError before anything is sent', async (t) => {
  const server = await startFakeServer();
  const pusher = makePusher(server);
  t.after(async () => {
    await closeClient(pusher);
    await server.close();
  });
  const bad = [
    null,
    undefined,
    'zone=eu',
    42,
    ['eu'],
    { zone: 1 },
    { zone: ['eu', 2] },
    { zone: { eq: 'eu' } },
    { zone: null },
    new Map([['zone', 'eu']]),
  ];
  for (const filter of bad) {
    assert.throws(() => subscribeWithFilter(pusher, 'orders', filter), TypeError, String(filter));
  }
  assert.throws(() => subscribeWithFilter(pusher, '', { zone: 'eu' }), TypeError);
  assert.equal(pusher.channel('orders'), undefined, 'nothing was subscribed');
  assert.equal(Object.hasOwn(pusher, 'send_event'), false, 'nothing was hooked');
  assert.deepEqual(validateFilter({ zone: 'eu', kind: ['order', 'refund'] }), {
    zone: 'eu',
    kind: ['order', 'refund'],
  });
});

test('the filter is sent on subscribe and on every resubscribe; combined with recovery', async (t) => {
  const server = await startFakeServer();
  const pusher = makePusher(server);
  t.after(async () => {
    await closeClient(pusher);
    await server.close();
  });
  const rec = withRecovery(pusher);
  const filter = { zone: 'eu', kind: ['order', 'refund'] };
  server.answer = () => ({ fields: { position: 'f0' } });
  const channel = subscribeWithFilter(pusher, 'orders', filter);
  const succeeded = nextEvent(channel, 'pusher:subscription_succeeded');
  assert.equal(channel, pusher.channel('orders'), 'the stock Channel is returned');
  filter.zone = 'us'; // later changes to the caller's object do not leak in
  const first = await server.nextSubscribe('orders');
  assert.deepEqual(first.filter, { zone: 'eu', kind: ['order', 'refund'] });
  assert.ok(!('position' in first));
  await succeeded;
  assert.deepEqual(filterOf(pusher, 'orders'), { zone: 'eu', kind: ['order', 'refund'] });

  // Same filter again: the same channel; another filter while subscribed: an error.
  assert.equal(subscribeWithFilter(pusher, 'orders', { kind: ['order', 'refund'], zone: 'eu' }), channel);
  assert.throws(() => subscribeWithFilter(pusher, 'orders', { zone: 'us' }), /already subscribed/);

  const got = nextEvent(channel, 'order-created');
  server.publish('orders', 'order-created', { id: 7 }, 'f1');
  assert.deepEqual(await got, { id: 7 });

  server.answer = () => ({ fields: { recovered: true, position: 'f1' } });
  const notice = nextEvent(channel, 'pushmesh:recovery');
  server.dropConnectionOf('orders');
  const second = await server.nextSubscribe('orders');
  assert.deepEqual(second.filter, { zone: 'eu', kind: ['order', 'refund'] });
  assert.equal(second.position, 'f1');
  assert.deepEqual(await notice, { recovered: true, position: 'f1' });

  // A plain channel on the same instance gets no filter.
  server.answer = () => ({ fields: {} });
  pusher.subscribe('plain');
  const plain = await server.nextSubscribe('plain');
  assert.ok(!('filter' in plain));

  // After unsubscribing, the filter is forgotten: a plain subscribe sends none.
  pusher.unsubscribe('orders');
  await server.nextUnsubscribe('orders');
  assert.equal(filterOf(pusher, 'orders'), undefined);
  const again = pusher.subscribe('orders');
  const againSucceeded = nextEvent(again, 'pusher:subscription_succeeded');
  const third = await server.nextSubscribe('orders');
  assert.ok(!('filter' in third));
  assert.ok(!('position' in third));
  await againSucceeded;
  assert.equal(rec.recovered('orders'), undefined);
});

test('a filter the server refuses reaches the app as pusher:subscription_error', async (t) => {
  const server = await startFakeServer();
  const pusher = makePusher(server);
  t.after(async () => {
    await closeClient(pusher);
    await server.close();
  });
  const refusal = { type: 'InvalidFilter', error: 'unknown key "nope"', status: 400 };
  server.answer = () => ({ error: refusal });
  const channel = subscribeWithFilter(pusher, 'orders', { nope: 'x' });
  const error = nextEvent(channel, 'pusher:subscription_error');
  const sent = await server.nextSubscribe('orders');
  assert.deepEqual(sent.filter, { nope: 'x' });
  assert.deepEqual(await error, refusal);
});

test('a filter set while disconnected is sent when the connection comes up', async (t) => {
  const server = await startFakeServer();
  const pusher = makePusher(server);
  t.after(async () => {
    await closeClient(pusher);
    await server.close();
  });
  // pusher-js connects asynchronously; subscribing now queues the channel
  // until 'connected', when pusher-js subscribes every channel.
  assert.notEqual(pusher.connection.state, 'connected');
  const channel = subscribeWithFilter(pusher, 'late', { zone: 'ap' });
  const succeeded = nextEvent(channel, 'pusher:subscription_succeeded');
  const sent = await server.nextSubscribe('late');
  assert.deepEqual(sent.filter, { zone: 'ap' });
  await succeeded;
});
