// Edge hardening seen by real clients: the closing handshake, protocol
// versions other clients ask for, socket_id checks in the Node SDK.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, serverSdk, rawSocket, closeAll, APP } from './helpers.mjs';

let srv, sdk;

before(async () => {
  srv = await startServer();
  sdk = serverSdk(srv.port);
});
after(async () => {
  closeAll();
  await srv.stop();
});

for (const path of [`/app/${APP.key}?protocol=7`, '/ws']) {
  test(`a client's close frame is answered with the server's on ${path.split('?')[0]}`, async () => {
    const s = await rawSocket(srv.port, path);
    if (path.startsWith('/app')) await s.waitFor((m) => m.event === 'pusher:connection_established', 'established');
    s.ws.close(1000, 'bye');
    const { code } = await s.closed;
    // 1006 would mean the server dropped the socket without its close frame.
    assert.equal(code, 1000);
  });
}

test('protocol=6 (pysher) is accepted and spoken to as 7', async () => {
  const s = await rawSocket(srv.port, `/app/${APP.key}?protocol=6`);
  const est = await s.waitFor((m) => m.event === 'pusher:connection_established', 'established');
  assert.match(est.data.socket_id, /^\d+\.\d+$/);
  s.send({ event: 'pusher:subscribe', data: { channel: 'v6' } });
  await s.waitFor((m) => m.event === 'pusher_internal:subscription_succeeded', 'subscribed');
});

test('protocol=3 is refused with 4007', async () => {
  const s = await rawSocket(srv.port, `/app/${APP.key}?protocol=3`);
  const { code } = await s.closed;
  assert.equal(code, 4007);
});

test('the Node SDK gets 400 for a malformed socket_id, single and batch', async () => {
  // trigger() checks socket ids itself; post() sends what it is given, signed.
  await assert.rejects(
    sdk.post({ path: '/events', body: { name: 'e', channel: 'c', data: '{}', socket_id: 'not-a-socket' } }),
    (e) => e.status === 400 && /socket_id/.test(e.body),
  );
  await assert.rejects(
    sdk.post({ path: '/batch_events', body: { batch: [{ channel: 'c', name: 'e', data: '{}', socket_id: '1.2.3' }] } }),
    (e) => e.status === 400 && JSON.parse(e.body).error.includes('socket_id'),
  );
  const ok = await sdk.trigger('c', 'e', { a: 1 }, { socket_id: '123.456' });
  assert.equal(ok.status, 200);
});
