// Laravel Echo with the pusher broadcaster against pushmesh.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startWithAuth, PusherClient, withTimeout, APP } from './helpers.mjs';
import EchoModule from 'laravel-echo';

const Echo = EchoModule.default || EchoModule;
let srv, sdk, auth, stop, echo;

before(async () => ({ srv, sdk, auth, stop } = await startWithAuth()));
after(async () => {
  if (echo) echo.disconnect();
  await stop();
});

test('laravel-echo: public, private and presence channels', async () => {
  echo = new Echo({
    broadcaster: 'pusher', key: APP.key, cluster: 'mt1', Pusher: PusherClient,
    wsHost: '127.0.0.1', wsPort: srv.port, forceTLS: false, enabledTransports: ['ws'], disableStats: true,
    authEndpoint: `${auth.url}/pusher/auth`, auth: { params: { user: 'echo-user' } },
  });
  const pub = new Promise((r) => echo.channel('orders').listen('.OrderShipped', r));
  const priv = new Promise((r) => echo.private('user.7').listen('.Secret', r));
  const presence = withTimeout(new Promise((r) => echo.join('room.1').here(r)), 10000, 'echo here()');
  const members = await presence;
  assert.deepEqual(members, [{ name: 'User echo-user' }]);
  // Echo subscribes asynchronously; wait until the server sees both channels.
  const end = Date.now() + 10000;
  for (;;) {
    const list = await (await sdk.get({ path: '/channels' })).json();
    if (list.channels.orders && list.channels['private-user.7']) break;
    if (Date.now() > end) throw new Error('echo did not subscribe');
    await new Promise((r) => setTimeout(r, 20));
  }
  await sdk.trigger('orders', 'OrderShipped', { id: 1 });
  await sdk.trigger('private-user.7', 'Secret', { id: 2 });
  assert.deepEqual(await withTimeout(pub, 10000, 'public echo event'), { id: 1 });
  assert.deepEqual(await withTimeout(priv, 10000, 'private echo event'), { id: 2 });
});
