import test from 'node:test';
import assert from 'node:assert/strict';
import { withRecovery, RECOVERY_EVENT } from '../index.js';
import { startFakeServer, makePusher, closeClient, nextEvent, within } from './support/fake-server.mjs';

test('positions are recorded from events and sent on resubscribe; recovered is exposed', async (t) => {
  const server = await startFakeServer();
  const pusher = makePusher(server);
  t.after(async () => {
    await closeClient(pusher);
    await server.close();
  });
  const recoveries = [];
  const rec = withRecovery(pusher, { onRecovery: (name, info) => recoveries.push([name, info]) });

  // First subscribe: nothing remembered, so no position field; the server
  // answers with its current position and no `recovered`.
  server.answer = () => ({ fields: { position: 'p0' } });
  const channel = pusher.subscribe('chat-1');
  const channelRecoveries = [];
  channel.bind(RECOVERY_EVENT, (info) => channelRecoveries.push(info));
  const succeeded = nextEvent(channel, 'pusher:subscription_succeeded');
  const first = await server.nextSubscribe('chat-1');
  assert.equal(first.channel, 'chat-1');
  assert.ok(!('position' in first), 'a first subscribe carries no position');
  await succeeded;
  assert.equal(rec.position('chat-1'), 'p0');
  assert.equal(rec.recovered('chat-1'), undefined);

  // (a) Each event's position is recorded before the app's handler runs.
  const seen = [];
  const twoEvents = new Promise((resolve) => {
    channel.bind('msg', (data) => {
      seen.push([data.n, rec.position('chat-1')]);
      if (seen.length === 2) resolve();
    });
  });
  server.publish('chat-1', 'msg', { n: 1 }, 'p1');
  server.publish('chat-1', 'msg', { n: 2 }, 'p2');
  await twoEvents;
  assert.deepEqual(seen, [
    [1, 'p1'],
    [2, 'p2'],
  ]);
  assert.equal(rec.position('chat-1'), 'p2');
  assert.equal(recoveries.length, 0, 'no recovery notice for a subscribe that sent no position');

  // (b) Drop the connection: pusher-js reconnects and resubscribes with the
  // last position; the server recovers and replays the missed event.
  server.answer = () => ({
    fields: { recovered: true, position: 'p3' },
    events: [{ event: 'msg', data: { n: 3 }, position: 'p3' }],
  });
  // Read the add-on's state synchronously in the app's handler (frames that
  // arrive in one chunk are dispatched in one go, before any promise callback).
  let atSucceeded;
  const resubscribed = new Promise((resolve) => {
    const fn = () => {
      channel.unbind('pusher:subscription_succeeded', fn);
      atSucceeded = { recovered: rec.recovered('chat-1'), position: rec.position('chat-1') };
      resolve();
    };
    channel.bind('pusher:subscription_succeeded', fn);
  });
  const recoveryEvent = nextEvent(channel, RECOVERY_EVENT);
  const replayed = nextEvent(channel, 'msg');
  server.dropConnectionOf('chat-1');
  const second = await server.nextSubscribe('chat-1');
  assert.equal(second.position, 'p2');
  await within(resubscribed, 'resubscribe');
  // The app's own subscription_succeeded handler already sees the result.
  // While the replay is pending, the position stays where we resumed from.
  assert.deepEqual(atSucceeded, { recovered: true, position: 'p2' });
  assert.deepEqual(await recoveryEvent, { recovered: true, position: 'p2' });
  assert.deepEqual(await replayed, { n: 3 });
  assert.equal(rec.recovered('chat-1'), true);
  assert.equal(rec.position('chat-1'), 'p3');
  assert.deepEqual(recoveries, [['chat-1', { recovered: true, position: 'p2' }]]);

  // A live event, then a drop the server cannot recover from.
  const live = nextEvent(channel, 'msg');
  server.publish('chat-1', 'msg', { n: 4 }, 'p4');
  await live;
  server.answer = () => ({ fields: { recovered: false, position: 'p9' } });
  const notRecovered = nextEvent(channel, RECOVERY_EVENT);
  server.dropConnectionOf('chat-1');
  const third = await server.nextSubscribe('chat-1');
  assert.equal(third.position, 'p4');
  assert.deepEqual(await notRecovered, { recovered: false, position: 'p9' });
  assert.equal(rec.recovered('chat-1'), false);
  assert.equal(rec.position('chat-1'), 'p9', 'after recovered:false the server position is adopted');

  // The next reconnect resumes from the position the server gave.
  server.answer = () => ({ fields: { recovered: true, position: 'p9' } });
  const recoveredAgain = nextEvent(channel, RECOVERY_EVENT);
  server.dropConnectionOf('chat-1');
  const fourth = await server.nextSubscribe('chat-1');
  assert.equal(fourth.position, 'p9');
  assert.deepEqual(await recoveredAgain, { recovered: true, position: 'p9' });
  assert.deepEqual(
    channelRecoveries.map((i) => i.recovered),
    [true, false, true],
  );
  assert.equal(recoveries.length, 3);
});

test('a position from subscription_succeeded alone is sent on the next subscribe', async (t) => {
  const server = await startFakeServer();
  const pusher = makePusher(server);
  t.after(async () => {
    await closeClient(pusher);
    await server.close();
  });
  const rec = withRecovery(pusher);
  server.answer = () => ({ fields: { position: 'start-7' } });
  const channel = pusher.subscribe('feed');
  let notices = 0;
  channel.bind(RECOVERY_EVENT, () => notices++);
  const succeeded = nextEvent(channel, 'pusher:subscription_succeeded');
  const first = await server.nextSubscribe('feed');
  assert.ok(!('position' in first));
  await succeeded;
  assert.equal(rec.position('feed'), 'start-7');
  assert.equal(notices, 0);

  // A server that does not confirm recovery after we sent a position: the
  // add-on reports recovered false (the missed events were not replayed).
  server.answer = () => ({ fields: {} });
  const notice = nextEvent(channel, RECOVERY_EVENT);
  server.dropConnectionOf('feed');
  const second = await server.nextSubscribe('feed');
  assert.equal(second.position, 'start-7');
  assert.deepEqual(await notice, { recovered: false, position: 'start-7' });
  assert.equal(rec.recovered('feed'), false);
});

test('setPosition is sent on the first subscribe; unsubscribe forgets the channel', async (t) => {
  const server = await startFakeServer();
  const pusher = makePusher(server);
  t.after(async () => {
    await closeClient(pusher);
    await server.close();
  });
  const rec = withRecovery(pusher);
  assert.throws(() => rec.setPosition('news', 42), TypeError);
  rec.setPosition('news', 'stored-1');
  assert.equal(rec.position('news'), 'stored-1');
  server.answer = (_, data) => ({ fields: { recovered: data.position === 'stored-1', position: 'x2' } });
  const channel = pusher.subscribe('news');
  const notice = nextEvent(channel, RECOVERY_EVENT);
  const first = await server.nextSubscribe('news');
  assert.equal(first.position, 'stored-1');
  assert.deepEqual(await notice, { recovered: true, position: 'stored-1' });

  // Events on other channels do not touch this one.
  server.answer = () => ({ fields: {} });
  const other = pusher.subscribe('other');
  await nextEvent(other, 'pusher:subscription_succeeded');
  const got = nextEvent(other, 'e');
  server.publish('other', 'e', {}, 'o1');
  await got;
  assert.equal(rec.position('other'), 'o1');
  assert.equal(rec.position('news'), 'stored-1');

  pusher.unsubscribe('news');
  await server.nextUnsubscribe('news');
  assert.equal(rec.position('news'), undefined);
  assert.equal(rec.recovered('news'), undefined);
  const again = pusher.subscribe('news');
  const againSucceeded = nextEvent(again, 'pusher:subscription_succeeded');
  const fresh = await server.nextSubscribe('news');
  assert.ok(!('position' in fresh), 'a channel subscribed anew starts without a position');
  await againSucceeded;

  assert.throws(() => withRecovery(pusher), /already attached/);
});

test('presence channel: auth, channel_data and position together; members still parsed', async (t) => {
  const server = await startFakeServer();
  const pusher = makePusher(server, {
    channelAuthorization: {
      customHandler: (params, callback) =>
        callback(null, {
          auth: 'app-key:signature',
          channel_data: JSON.stringify({ user_id: 'u1', user_info: { name: 'Ann' } }),
        }),
    },
  });
  t.after(async () => {
    await closeClient(pusher);
    await server.close();
  });
  const rec = withRecovery(pusher);
  const presence = { ids: ['u1'], hash: { u1: { name: 'Ann' } }, count: 1 };
  server.answer = () => ({ data: { presence }, fields: { position: 'q1' } });
  const channel = pusher.subscribe('presence-room');
  const succeeded = nextEvent(channel, 'pusher:subscription_succeeded');
  const first = await server.nextSubscribe('presence-room');
  assert.equal(first.auth, 'app-key:signature');
  assert.ok(!('position' in first));
  await succeeded;
  assert.equal(channel.members.count, 1);
  assert.equal(rec.position('presence-room'), 'q1');

  server.answer = () => ({ data: { presence }, fields: { recovered: true, position: 'q1' } });
  const notice = nextEvent(channel, RECOVERY_EVENT);
  const members = nextEvent(channel, 'pusher:subscription_succeeded');
  server.dropConnectionOf('presence-room');
  const second = await server.nextSubscribe('presence-room');
  assert.equal(second.auth, 'app-key:signature');
  assert.equal(JSON.parse(second.channel_data).user_id, 'u1');
  assert.equal(second.position, 'q1');
  assert.equal((await members).count, 1);
  assert.deepEqual(await notice, { recovered: true, position: 'q1' });
});
