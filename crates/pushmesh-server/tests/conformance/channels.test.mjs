// Public, private, encrypted and cache channels with pusher-js and the Node SDK.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startWithAuth, startAuthServer, connected, subscribed, next } from './helpers.mjs';

let srv, sdk, auth, mk, stop, forged;
before(async () => {
  ({ srv, sdk, auth, mk, stop } = await startWithAuth());
  forged = await startAuthServer(sdk, { forge: true });
});
after(async () => {
  await forged.close();
  const { code } = await stop();
  assert.equal(code, 0, 'pushmesh exits cleanly on SIGTERM');
});

test('public channel: data arrives exactly as sent, objects and strings', async () => {
  const c = mk();
  const ch = c.subscribe('public-1');
  await subscribed(ch);
  const obj = { n: 1, s: 'é"\\', nested: { a: [1, 2, null] } };
  let p = next(ch, 'obj-event');
  await sdk.trigger('public-1', 'obj-event', obj);
  assert.deepEqual(await p, obj);
  p = next(ch, 'str-event');
  await sdk.trigger('public-1', 'str-event', 'just a string');
  assert.equal(await p, 'just a string');
});

test('private channel through an auth endpoint using authorizeChannel', async () => {
  const c = mk();
  const ch = c.subscribe('private-a');
  await subscribed(ch);
  const p = next(ch, 'secret');
  await sdk.trigger('private-a', 'secret', { x: 42 });
  assert.deepEqual(await p, { x: 42 });
});

test('forged signature gets pusher:subscription_error and the connection stays usable', async () => {
  const c = mk({ authUrl: forged.url });
  const ch = c.subscribe('private-forged');
  const err = await next(ch, 'pusher:subscription_error', 'subscription_error');
  assert.equal(err.status, 401);
  assert.equal(err.type, 'AuthError');
  assert.equal(c.connection.state, 'connected');
  const pub = c.subscribe('after-forged');
  await subscribed(pub);
  const p = next(pub, 'ok');
  await sdk.trigger('after-forged', 'ok', 'still here');
  assert.equal(await p, 'still here');
});

test('cache channel: late subscriber gets the last event; an empty one gets pusher:cache_miss', async () => {
  await sdk.trigger('cache-news', 'headline', { v: 1 });
  await sdk.trigger('cache-news', 'headline', { v: 2 });
  const c = mk();
  const ch = c.subscribe('cache-news');
  assert.deepEqual(await next(ch, 'headline', 'cached event'), { v: 2 });

  const empty = c.subscribe('cache-empty');
  const miss = await next(empty, 'pusher:cache_miss', 'cache_miss');
  assert.ok(miss !== undefined);
});

test('encrypted channel end to end; the server only sees ciphertext', async () => {
  const c = mk();
  const ch = c.subscribe('private-encrypted-cache-vault');
  await subscribed(ch);
  const p = next(ch, 'sealed');
  await sdk.trigger('private-encrypted-cache-vault', 'sealed', { plaintext: 'top secret words' });
  assert.deepEqual(await p, { plaintext: 'top secret words' });
  // What the server holds (the cached event) is ciphertext.
  const res = await sdk.get({ path: '/channels/private-encrypted-cache-vault', params: { info: 'cache' } });
  const body = await res.json();
  assert.ok(body.cache, 'the cache attribute is returned');
  assert.ok(!body.cache.data.includes('top secret'), 'server never sees plaintext');
  const sealed = JSON.parse(body.cache.data);
  assert.ok(sealed.nonce && sealed.ciphertext, 'data is {nonce, ciphertext}');
  // A trigger to an encrypted channel plus another is refused by the server too
  // (the SDK refuses it before sending, so send it signed by hand).
  await assert.rejects(
    sdk.post({ path: '/events', body: { name: 'e', data: '{}', channels: ['private-encrypted-vault', 'public-x'] } }),
    (e) => e.status === 400 && /encrypted/.test(e.body),
  );
});

test('5,000 subscribes at once on one pusher-js connection: all answered, never disconnected (backpressure, not 4100)', { timeout: 120000 }, async () => {
  const c = mk();
  await connected(c);
  const states = [];
  c.connection.bind('state_change', (s) => states.push(s.current));
  let answered = 0;
  const counted = new Set();
  for (let k = 0; k < 5000; k++) {
    const ch = c.subscribe(`burst-${k}`);
    ch.bind('pusher:subscription_succeeded', () => { answered++; });
    ch.bind('pusher:subscription_count', (d) => { if (d.subscription_count === 1) counted.add(k); });
  }
  const { until } = await import('./helpers.mjs');
  await until(() => answered === 5000 || states.length > 0, '5,000 answers', 100000);
  assert.deepEqual(states, [], 'the connection stayed connected');
  assert.equal(answered, 5000);
  // 5,000 counts change in one tick: those without room in the queue come
  // at later ticks, never as a disconnect; every channel gets its count.
  await until(() => counted.size === 5000 || states.length > 0, 'every channel\'s subscription_count', 100000);
  assert.deepEqual(states, []);
  const m = await (await fetch(`http://127.0.0.1:${srv.port}/metrics`)).text();
  assert.match(m, /pushmesh_slow_consumer_disconnects_total 0\b/);
  for (let k = 0; k < 5000; k++) c.unsubscribe(`burst-${k}`);
});
