// Presence members and client events with pusher-js.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startWithAuth, client, connected, subscribed, next, collect, until } from './helpers.mjs';

let srv, sdk, auth, mk, stop;
before(async () => ({ srv, sdk, auth, mk, stop } = await startWithAuth()));
after(() => stop());

const ids = (members) => { const out = []; members.each((m) => out.push(m.id)); return out.sort(); };

test('presence: users see each other; one user in two tabs is one member', async () => {
  const alice = mk({ user: 'alice' });
  const chA = alice.subscribe('presence-room');
  const membersA = await subscribed(chA);
  assert.deepEqual(ids(membersA), ['alice']);
  const addedAtAlice = collect(chA, 'pusher:member_added');
  const removedAtAlice = collect(chA, 'pusher:member_removed');

  const bob1 = mk({ user: 'bob' });
  const chB1 = bob1.subscribe('presence-room');
  const membersB = await subscribed(chB1);
  assert.deepEqual(ids(membersB), ['alice', 'bob'], 'subscription_succeeded lists every member');
  assert.equal(membersB.count, 2);
  assert.deepEqual(membersB.get('alice').info, { name: 'User alice' });
  await until(() => addedAtAlice.length === 1, 'member_added for bob');
  assert.equal(addedAtAlice[0].id, 'bob');
  assert.deepEqual(addedAtAlice[0].info, { name: 'User bob' });

  // A second tab of bob: no new member_added.
  const bob2 = mk({ user: 'bob' });
  const chB2 = bob2.subscribe('presence-room');
  const membersB2 = await subscribed(chB2);
  assert.equal(membersB2.count, 2);
  const res = await sdk.get({ path: '/channels/presence-room/users' });
  assert.deepEqual((await res.json()).users.map((u) => u.id).sort(), ['alice', 'bob']);
  const info = await (await sdk.get({ path: '/channels/presence-room', params: { info: 'user_count,subscription_count' } })).json();
  assert.deepEqual(info, { occupied: true, user_count: 2, subscription_count: 3 });

  // First tab leaves: bob is still there.
  bob1.unsubscribe('presence-room');
  // The second tab leaves: now one member_removed.
  bob2.unsubscribe('presence-room');
  await until(() => removedAtAlice.length === 1, 'member_removed for bob');
  assert.equal(removedAtAlice[0].id, 'bob');
  // Prove nothing else is in flight: a server event published after the
  // removal arrives, and still only one removal and one addition were seen.
  const p = next(chA, 'marker');
  await sdk.trigger('presence-room', 'marker', {});
  await p;
  assert.equal(removedAtAlice.length, 1);
  assert.equal(addedAtAlice.length, 1);
  assert.deepEqual(ids(chA.members), ['alice']);
});

test('presence: member_removed when the last connection disconnects', async () => {
  const a = mk({ user: 'carol' });
  const chA = a.subscribe('presence-lobby');
  await subscribed(chA);
  const d = mk({ user: 'dave' });
  const chD = d.subscribe('presence-lobby');
  await subscribed(chD);
  const removed = next(chA, 'pusher:member_removed', 'member_removed');
  d.disconnect();
  assert.equal((await removed).id, 'dave');
});

test('client events reach the other subscribers, not the sender', async () => {
  const a = mk({ user: 'u1' });
  const b = mk({ user: 'u2' });
  const chA = a.subscribe('presence-chat');
  const chB = b.subscribe('presence-chat');
  await Promise.all([subscribed(chA), subscribed(chB)]);
  const atA = collect(chA, 'client-typing');
  const got = new Promise((r) => chB.bind('client-typing', (data, meta) => r({ data, meta })));
  assert.ok(chA.trigger('client-typing', { typing: true }));
  const { data, meta } = await got;
  assert.deepEqual(data, { typing: true });
  assert.equal(meta.user_id, 'u1', 'presence client events carry user_id');
  // Sender does not get its own event: a later server event arrives at A with nothing before it.
  const marker = next(chA, 'marker');
  await sdk.trigger('presence-chat', 'marker', {});
  await marker;
  assert.equal(atA.length, 0);

  const pa = mk();
  const pb = mk();
  const pchA = pa.subscribe('private-chat');
  const pchB = pb.subscribe('private-chat');
  await Promise.all([subscribed(pchA), subscribed(pchB)]);
  const p = next(pchB, 'client-msg');
  pchA.trigger('client-msg', 'hello');
  assert.equal(await p, 'hello');
});

test('client events are refused on public channels', async () => {
  const a = mk();
  const ch = a.subscribe('public-chat');
  await subscribed(ch);
  await connected(a);
  const err = next(a.connection, 'error', 'pusher:error');
  a.send_event('client-nope', { x: 1 }, 'public-chat');
  const e = await err;
  assert.equal(e.type, 'PusherError');
  assert.match(e.data.message, /private and presence/);
  assert.equal(a.connection.state, 'connected');
});

test('more than 10 client events per second closes with 4301', async () => {
  const a = mk();
  const ch = a.subscribe('private-flood');
  await subscribed(ch);
  const err = new Promise((r) => a.connection.bind('error', (e) => { if (e.data && e.data.code === 4301) r(e); }));
  const down = new Promise((r) => a.connection.bind('state_change', (s) => { if (s.current === 'disconnected') r(); }));
  for (let i = 0; i < 15; i++) ch.trigger('client-spam', { i });
  const e = await err;
  assert.equal(e.data.code, 4301);
  await down;
});
