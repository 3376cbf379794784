// Message history and recovery (issue 12) with real pushmesh processes:
// recovery on another node than the one the client left, recovered:false
// after eviction, the signed HTTP history endpoint, kill -9 of the node
// that took the publishes, and a rolling restart behind HAProxy where every
// client (the stock pusher-js with the clients/js add-on) recovers.
import { test, after, afterEach } from 'node:test';
import assert from 'node:assert/strict';
import {
  startNode, stopNode, meshed, metrics, sdk, client, subscribed, until, withTimeout, ready,
  startHaproxy, sdkAt, clientAt, LB_IP, ip, httpPort, nodeOf, partition, linkedIn, getJson,
  spawnNode, readyz, publish, rawSocket, nsExec,
} from './cluster.helpers.mjs';
import {
  haproxies, cleanup, cleanups, now, pause, collect, tally, haproxyLog,
} from './continuity.helpers.mjs';
import { withRecovery, RECOVERY_EVENT } from '../clients/js/index.js';

afterEach(cleanup);
after(cleanup);

/** Lines of the app's [apps.history] table (spawnNode's appExtra). */
const history = (channels, more = '') => `[apps.history]\nchannels = [${channels.map((c) => `"${c}"`).join(', ')}]\n${more}\n`;

/** A pusher-js client (node number or "host:port") with the recovery add-on attached. */
function recClient(at, opts = {}) {
  const pc = typeof at === 'number' ? client(at, opts) : clientAt(at, opts);
  const notices = [];
  const rec = withRecovery(pc, { onRecovery: (ch, info) => notices.push({ ch, ...info }) });
  return { pc, rec, notices };
}

/** The signed HTTP history of `ch` read on node i (SDK GET). */
async function historyOf(i, ch, params = {}) {
  return (await sdk(i).get({ path: `/channels/${ch}/history`, params })).json();
}

/** Waits until the client's connection is gone (state disconnected). */
async function disconnected(pc) {
  pc.disconnect();
  await until(() => pc.connection.state === 'disconnected', 'client disconnected', 10000);
}

test('recovery on another node: 20 events missed while away replayed once, in order, recovered true, then live', { timeout: 120000 }, async () => {
  const opts = { appExtra: history(['chat-*']) };
  for (const i of [1, 2, 3]) await startNode(i, opts);
  await meshed([1, 2, 3]);

  // Client A on node 1: its first subscribe sends no position.
  const A = recClient(1);
  const chA = A.pc.subscribe('chat-1');
  const gotA = collect(chA, 'm');
  await subscribed(chA);
  assert.equal(A.rec.recovered('chat-1'), undefined, 'a subscribe without a position: nothing to recover');
  assert.equal(typeof A.rec.position('chat-1'), 'string', 'subscription_succeeded carries the current position');
  for (let k = 0; k < 5; k++) await sdk(3).trigger('chat-1', 'm', { k });
  await until(() => gotA.length === 5, 'A got the first 5 events', 15000);
  assert.deepEqual(gotA.map((d) => d.k), [0, 1, 2, 3, 4]);
  const saved = A.rec.position('chat-1');
  assert.equal(typeof saved, 'string');
  await disconnected(A.pc);

  // 20 events while A is away, through node 2; each answered before the next.
  for (let k = 5; k < 25; k++) {
    const r = await sdk(2).trigger('chat-1', 'm', { k });
    assert.equal(r.status, 200);
  }

  // B on node 3: a new Pusher instance and add-on, resuming from A's position.
  const B = recClient(3);
  B.rec.setPosition('chat-1', saved);
  const chB = B.pc.subscribe('chat-1');
  const gotB = collect(chB, 'm');
  const perChannel = collect(chB, RECOVERY_EVENT);
  await subscribed(chB);
  await until(() => gotB.length >= 20, 'B got the 20 missed events', 15000);
  assert.equal(B.rec.recovered('chat-1'), true, `recovered (notices ${JSON.stringify(B.notices)})`);
  assert.deepEqual(B.notices.map((n) => [n.ch, n.recovered]), [['chat-1', true]], 'onRecovery once, recovered true');
  assert.deepEqual(perChannel.map((n) => n.recovered), [true], 'pushmesh:recovery once on the channel');
  await sdk(1).trigger('chat-1', 'm', { k: 'live' });
  await until(() => gotB.some((d) => d.k === 'live'), 'B got the live event', 15000);
  const expected = [...Array(20).keys()].map((j) => j + 5);
  assert.deepEqual(gotB.map((d) => d.k), [...expected, 'live'], 'the 20 missed events exactly once, in order, then the live one once');
  // Its position follows the events: the live event's position is the HTTP head.
  const h = await historyOf(3, 'chat-1');
  assert.equal(B.rec.position('chat-1'), h.position, 'the client position is the head after the live event');
});

test('max_events = 10: 30 publishes while away, resubscribe on another node reports recovered false, only live events follow', { timeout: 120000 }, async () => {
  const opts = { appExtra: history(['small-*'], 'max_events = 10') };
  for (const i of [1, 2, 3]) await startNode(i, opts);
  await meshed([1, 2, 3]);
  const A = recClient(1);
  const chA = A.pc.subscribe('small-1');
  const gotA = collect(chA, 'm');
  await subscribed(chA);
  for (let k = 0; k < 3; k++) await sdk(1).trigger('small-1', 'm', { k });
  await until(() => gotA.length === 3, 'A got 3 events', 15000);
  const saved = A.rec.position('small-1');
  await disconnected(A.pc);
  for (let k = 3; k < 33; k++) assert.equal((await sdk(2).trigger('small-1', 'm', { k })).status, 200);
  // Every node keeps only the last 10 (and knows the older ones are gone).
  await until(async () => {
    const h = await historyOf(3, 'small-1');
    return h.events.length === 10 && JSON.parse(h.events[9].data).k === 32;
  }, 'node 3 holds the last 10 events', 15000);
  const h3 = await historyOf(3, 'small-1');
  assert.deepEqual(h3.events.map((e) => JSON.parse(e.data).k), [...Array(10).keys()].map((j) => j + 23));
  assert.equal(h3.complete, false, 'evicted events: the history is not complete');

  const B = recClient(3);
  B.rec.setPosition('small-1', saved);
  const chB = B.pc.subscribe('small-1');
  const gotB = collect(chB, 'm');
  await subscribed(chB);
  assert.equal(B.rec.recovered('small-1'), false, `not recoverable (notices ${JSON.stringify(B.notices)})`);
  assert.deepEqual(B.notices.map((n) => [n.ch, n.recovered]), [['small-1', false]]);
  assert.equal(B.rec.position('small-1'), h3.position, 'recovered false: the server position is adopted');
  await sdk(2).trigger('small-1', 'm', { k: 'live' });
  await until(() => gotB.length >= 1, 'B got the live event', 15000);
  await sdk(2).trigger('small-1', 'm', { k: 'live2' });
  await until(() => gotB.length >= 2, 'B got the second live event', 15000);
  assert.deepEqual(gotB.map((d) => d.k), ['live', 'live2'], 'nothing replayed (not even the 10 kept), only live events');
});

test('HTTP history (signed SDK GET): order, positions, after=, limit, 404 without history', { timeout: 120000 }, async () => {
  const opts = { appExtra: history(['chat-*']) };
  for (const i of [1, 2]) await startNode(i, opts);
  await meshed([1, 2]);
  const empty = await historyOf(2, 'chat-h');
  assert.deepEqual(empty.events, [], 'no event yet');
  for (let k = 0; k < 10; k++) await sdk(1).trigger('chat-h', k % 2 ? 'odd' : 'even', { k });
  await until(async () => (await historyOf(2, 'chat-h')).events.length === 10, 'node 2 lists the 10 events', 15000);
  const all = await historyOf(2, 'chat-h');
  assert.deepEqual(all.events.map((e) => JSON.parse(e.data).k), [...Array(10).keys()], 'in publish order');
  assert.deepEqual(all.events.map((e) => e.name), [...Array(10).keys()].map((k) => (k % 2 ? 'odd' : 'even')));
  const positions = all.events.map((e) => e.position);
  assert.ok(positions.every((p) => typeof p === 'string' && p.length > 0), 'every event has a position');
  assert.equal(new Set(positions).size, 10, 'positions are distinct');
  assert.equal(all.position, positions[9], 'the page position is the last event\'s');
  assert.equal(all.complete, true);
  for (let j = 1; j < 10; j++) assert.ok(all.events[j].published_at_ms >= all.events[j - 1].published_at_ms, 'published_at_ms does not go back');
  assert.ok(Math.abs(all.events[0].published_at_ms - Date.now()) < 60000, `published_at_ms is a wall clock in ms (${all.events[0].published_at_ms})`);
  // Node 1 (the publishing node) has the same events with the same positions.
  const on1 = await historyOf(1, 'chat-h');
  assert.deepEqual(on1.events.map((e) => e.position), positions, 'same positions on both nodes');

  const after3 = await historyOf(2, 'chat-h', { after: positions[3] });
  assert.deepEqual(after3.events.map((e) => JSON.parse(e.data).k), [4, 5, 6, 7, 8, 9], 'after= a position: only later events');
  assert.deepEqual(after3.events.map((e) => e.position), positions.slice(4));
  const afterLast = await historyOf(2, 'chat-h', { after: positions[9] });
  assert.deepEqual(afterLast.events, [], 'after the last position: nothing');
  const page = await historyOf(2, 'chat-h', { after: positions[1], limit: 3 });
  assert.deepEqual(page.events.map((e) => JSON.parse(e.data).k), [2, 3, 4], 'after= with limit: the next 3');
  const latest = await historyOf(2, 'chat-h', { limit: 3 });
  assert.equal(latest.events.length, 3, 'limit bounds the page');
  assert.deepEqual(latest.events.map((e) => JSON.parse(e.data).k), [7, 8, 9], 'without after=: the latest 3');

  // A channel without history: 404 with a JSON body.
  const err = await sdk(2).get({ path: '/channels/plain-1/history' }).then(() => null, (e) => e);
  assert.ok(err, 'a channel without history is refused');
  assert.equal(err.status, 404, `404 (got ${err.status} ${err.body})`);
  assert.doesNotThrow(() => JSON.parse(err.body), `JSON body: ${err.body}`);
  // Unsigned: refused.
  const unsigned = await fetch(`http://${ip(2)}:${httpPort}/apps/app/channels/chat-h/history`);
  assert.equal(unsigned.status, 401, 'an unsigned history read is refused');
});

test('kill -9 of the node that took the publishes: recovery on node 3 gets all 10, node 2 still lists them', { timeout: 120000 }, async () => {
  const opts = { appExtra: history(['chat-*']) };
  for (const i of [1, 2, 3]) await startNode(i, opts);
  await meshed([1, 2, 3]);
  const X = recClient(3);
  const chX = X.pc.subscribe('chat-k');
  const gotX = collect(chX, 'm');
  await subscribed(chX);
  for (let k = 0; k < 2; k++) await sdk(1).trigger('chat-k', 'm', { k });
  await until(() => gotX.length === 2, 'X got 2 events', 15000);
  const saved = X.rec.position('chat-k');
  await disconnected(X.pc);
  for (let k = 2; k < 12; k++) assert.equal((await sdk(1).trigger('chat-k', 'm', { k })).status, 200);
  // Right after the last 200: kill -9 the node that answered them.
  const killed = nodeOf(1);
  await stopNode(1, 'SIGKILL');

  const Y = recClient(3);
  Y.rec.setPosition('chat-k', saved);
  const chY = Y.pc.subscribe('chat-k');
  const gotY = collect(chY, 'm');
  await subscribed(chY);
  await until(() => gotY.length >= 10, 'Y got the 10 events published on the killed node', 15000).catch(async (e) => {
    const held = async (i) => (await historyOf(i, 'chat-k')).events.map((ev) => JSON.parse(ev.data).k).join(',');
    throw new Error(`${e.message}; Y got ${JSON.stringify(gotY.map((d) => d.k))}, recovered ${Y.rec.recovered('chat-k')}; `
      + `HTTP history now: node 2 [${await held(2)}], node 3 [${await held(3)}]; `
      + `stderr n1: ${killed.stderr().slice(-1500)} n2: ${nodeOf(2).stderr().slice(-1500)} n3: ${nodeOf(3).stderr().slice(-1500)}`);
  });
  assert.equal(Y.rec.recovered('chat-k'), true);
  await sdk(2).trigger('chat-k', 'm', { k: 'live' });
  await until(() => gotY.some((d) => d.k === 'live'), 'Y got a live event', 15000);
  assert.deepEqual(gotY.map((d) => d.k), [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 'live'], 'all 10 once, in order, then live');
  const h2 = await historyOf(2, 'chat-k');
  assert.deepEqual(h2.events.map((e) => JSON.parse(e.data).k), [...Array(12).keys(), 'live'], 'node 2 still lists them');
});

// The same race made deterministic: node 3 cannot hear node 1 while node 1
// takes the publishes (its frames to node 3 stay queued), then node 1 is
// killed. Node 2, a survivor, holds the events; node 3 must get them from it
// (or, not having them, must not claim a recovery that skips them).
test('kill -9 while node 3 lags behind node 1: the events node 2 holds reach node 3, no silent gap in a recovery there', { timeout: 120000 }, async () => {
  const opts = { appExtra: history(['chat-*']) };
  for (const i of [1, 2, 3]) await startNode(i, opts);
  await meshed([1, 2, 3]);
  const X = recClient(3);
  const chX = X.pc.subscribe('chat-p');
  const gotX = collect(chX, 'm');
  await subscribed(chX);
  await sdk(1).trigger('chat-p', 'm', { k: 0 });
  await until(() => gotX.length === 1, 'X got the first event', 15000);
  const saved = X.rec.position('chat-p');
  await disconnected(X.pc);
  partition(1, 3);
  const ok = [];
  for (let k = 1; k <= 10; k++) if ((await sdk(1).trigger('chat-p', 'm', { k })).status === 200) ok.push(k);
  assert.deepEqual(ok, [...Array(10).keys()].map((j) => j + 1), 'node 1 accepted the 10 publishes');
  await until(async () => (await historyOf(2, 'chat-p')).events.length === 11, 'node 2 holds the 11 events', 15000);
  const killed = nodeOf(1);
  await stopNode(1, 'SIGKILL');
  partition(1, 3, false);
  // Fair to the survivors: recover only once node 3 has noticed node 1 is gone.
  await until(async () => !linkedIn(await getJson(3, '/cluster'), 1), 'node 3 sees node 1 gone', 20000);
  const c3 = await getJson(3, '/cluster');

  const Y = recClient(3);
  Y.rec.setPosition('chat-p', saved);
  const chY = Y.pc.subscribe('chat-p');
  const gotY = collect(chY, 'm');
  await subscribed(chY);
  await sdk(2).trigger('chat-p', 'm', { k: 'live' });
  await until(() => gotY.some((d) => d.k === 'live'), 'Y got a live event', 15000);
  // Node 2 hands node 3 what it holds of node 1 once it sees node 1 gone:
  // those may come after the live event (another publisher), never twice.
  await until(() => gotY.length >= ok.length + 1, 'Y got node 1\'s events too', 15000).catch(() => {});
  const held = async (i) => (await historyOf(i, 'chat-p')).events.map((ev) => JSON.parse(ev.data).k).join(',');
  const diag = `node 3 /cluster at the recovery: ${JSON.stringify(c3)}; Y got ${JSON.stringify(gotY.map((d) => d.k))}, recovered ${Y.rec.recovered('chat-p')}; HTTP history: node 2 [${await held(2)}], node 3 [${await held(3)}]; `
    + `stderr n1: ${killed.stderr().slice(-1000)} n2: ${nodeOf(2).stderr().slice(-1000)} n3: ${nodeOf(3).stderr().slice(-1000)}`;
  if (Y.rec.recovered('chat-p') === true) {
    assert.deepEqual(gotY.map((d) => d.k).filter((k) => k !== 'live'), ok, `recovered true: every event node 1 accepted, once, in order. ${diag}`);
    assert.equal(gotY.filter((d) => d.k === 'live').length, 1, `and the live event once. ${diag}`);
  } else {
    assert.fail(`recovered ${Y.rec.recovered('chat-p')}: node 2 holds every event, node 3 should have them from it. ${diag}`);
  }
});

test('presence channel with history: recovery beside the member list', { timeout: 120000 }, async () => {
  const opts = { appExtra: history(['presence-hist-*']) };
  for (const i of [1, 2]) await startNode(i, opts);
  await meshed([1, 2]);
  const A = recClient(1, { presence: { user_id: 'ann', user_info: {} } });
  const chA = A.pc.subscribe('presence-hist-1');
  const gotA = collect(chA, 'm');
  await subscribed(chA);
  assert.equal(chA.members.count, 1, 'members with a position in the reply');
  assert.equal(typeof A.rec.position('presence-hist-1'), 'string');
  await sdk(2).trigger('presence-hist-1', 'm', { k: 0 });
  await until(() => gotA.length === 1, 'A got an event', 15000);
  const saved = A.rec.position('presence-hist-1');
  await disconnected(A.pc);
  for (let k = 1; k <= 5; k++) await sdk(1).trigger('presence-hist-1', 'm', { k });
  const B = recClient(2, { presence: { user_id: 'bob', user_info: {} } });
  B.rec.setPosition('presence-hist-1', saved);
  const chB = B.pc.subscribe('presence-hist-1');
  const gotB = collect(chB, 'm');
  await subscribed(chB);
  assert.equal(B.rec.recovered('presence-hist-1'), true);
  const ids = []; chB.members.each((m) => ids.push(m.id));
  assert.deepEqual(ids, ['bob'], 'the member list is there too');
  assert.equal(chB.members.me.id, 'bob');
  await sdk(2).trigger('presence-hist-1', 'm', { k: 'live' });
  await until(() => gotB.some((d) => d.k === 'live'), 'B got a live event', 15000);
  assert.deepEqual(gotB.map((d) => d.k), [1, 2, 3, 4, 5, 'live']);
});

test('a position naming events this node never got: recovered false within about a second, then live events', { timeout: 120000 }, async () => {
  const opts = { appExtra: history(['chat-*']) };
  for (const i of [1, 2]) await startNode(i, opts);
  await meshed([1, 2]);
  const A = recClient(1);
  const chA = A.pc.subscribe('chat-u');
  const gotA = collect(chA, 'm');
  await subscribed(chA);
  // Node 2 cannot hear node 1: A's position names events node 2 does not have.
  partition(1, 2);
  // Node 1 delivers at once and answers once a peer holds the event (or
  // after 2 s, node 2 being cut off): do not wait for the answers, or node
  // 2 may have declared node 1 dead meanwhile (then it answers at once).
  const pubs = [0, 1, 2].map((k) => sdk(1).trigger('chat-u', 'm', { k }));
  await until(() => gotA.length === 3, 'A got 3 events', 15000);
  const saved = A.rec.position('chat-u');
  const B = recClient(2);
  B.rec.setPosition('chat-u', saved);
  const chB = B.pc.subscribe('chat-u');
  const gotB = collect(chB, 'm');
  const t0 = now();
  await subscribed(chB);
  const took = now() - t0;
  assert.equal(B.rec.recovered('chat-u'), false, 'events this node never got: not recovered');
  assert.ok(took >= 800, `the node waited about a second for the events before giving up (${Math.round(took)} ms)`);
  assert.ok(took < 10000, `and not much longer (${Math.round(took)} ms)`);
  await sdk(2).trigger('chat-u', 'm', { k: 'live' });
  await until(() => gotB.some((d) => d.k === 'live'), 'B got a live event', 15000);
  assert.deepEqual(gotB.map((d) => d.k), ['live']);
  for (const r of await Promise.all(pubs)) assert.equal(r.status, 200, 'answered (after the bounded wait for a peer)');
});

// ---------------------------------------------------------------------------
// The scenario of the issue: a rolling restart behind the real HAProxy in
// which every client recovers, including those whose node was restarted.
test('rolling restart behind HAProxy with history: every client gets every 2xx publish exactly once, in order, every resubscribe recovered', { timeout: 240000 }, async () => {
  const lb = await startHaproxy();
  haproxies.push(lb);
  const CH = ['rr-a', 'rr-b', 'rr-c', 'rr-d'];
  // As continuity-restart.test.mjs (shipped drain/startup defaults), plus
  // history for the channels. max_events well above what a few seconds of
  // load put on a channel (~12/s), so nothing is evicted during a reconnect.
  const opts = {
    extra: `trusted_proxies = ["${LB_IP}/32"]\nproxy_protocol = true`, drainWaitMs: null, startupTimeoutMs: null,
    appExtra: history(['rr-*'], 'max_events = 1000'),
  };
  for (const i of [1, 2, 3]) await startNode(i, opts);
  await meshed([1, 2, 3]);
  for (const i of [1, 2, 3]) await ready(i);
  const allUp = async () => { const s = await lb.servers(); return ['node1', 'node2', 'node3'].every((n) => s[n] === 'UP'); };
  await until(allUp, 'HAProxy sees 3 servers UP', 30000);

  const recs = [];
  for (let c = 0; c < 6; c++) {
    const { pc, rec: addon } = recClient(lb.host);
    const rec = { c, pc, addon, sessions: [], codes: [], all: [] };
    const cur = () => rec.sessions[rec.sessions.length - 1];
    pc.connection.bind('state_change', (s) => {
      if (s.current === 'connected') rec.sessions.push({ start: now(), end: null, subAt: {}, got: [], markers: new Set(), recoveries: [] });
      else if (s.previous === 'connected' && cur()) cur().end = now();
    });
    pc.connection.bind('error', (e) => { if (e && e.data && e.data.code) rec.codes.push(e.data.code); });
    const chans = CH.map((name) => {
      const ch = pc.subscribe(name);
      ch.bind('pusher:subscription_succeeded', () => { if (cur()) cur().subAt[name] = now(); });
      ch.bind(RECOVERY_EVENT, (info) => { if (cur()) cur().recoveries.push({ ch: name, ...info }); });
      ch.bind('m', (d) => {
        const g = { ch: name, p: d.p, s: d.s };
        rec.all.push(g);
        if (cur()) cur().got.push(g);
      });
      ch.bind('end', (d) => { if (cur()) cur().markers.add(`${d.p}|${name}`); });
      return ch;
    });
    for (const ch of chans) await subscribed(ch);
    recs.push(rec);
  }

  // Two sequential publishers through HAProxy with the SDK, 25/s each.
  let stop = false;
  const pubs = [0, 1].map((p) => ({ p, log: [] }));
  const runPublisher = async (pub) => {
    const api = sdkAt(lb.host);
    const t0 = now();
    for (let s = 0; !stop && s < 20000; s++) {
      const wait = t0 + s * 40 - now();
      if (wait > 0) await pause(wait);
      const e = { s, ch: CH[s % CH.length], start: now(), status: null };
      pub.log.push(e);
      try {
        const r = await api.trigger(e.ch, 'm', { p: pub.p, s });
        e.status = r.status;
      } catch (err) {
        e.status = err.status || 'error';
        e.text = String(err.body || err.message).slice(0, 120);
      }
      e.end = now();
    }
  };
  const loadStart = now();
  const running = pubs.map(runPublisher);
  const count = () => pubs[0].log.length + pubs[1].log.length;

  const restarts = [];
  for (const i of [1, 2, 3]) {
    const before = count();
    await until(() => count() > before + 50, 'about a second of publishes before the restart', 20000);
    const r = { node: i, sigterm: now() };
    const { code } = await stopNode(i, 'SIGTERM');
    r.exited = now() - r.sigterm;
    assert.equal(code, 0, `node ${i} drained and exited cleanly`);
    await startNode(i, opts);
    await ready(i, 40000);
    r.ready = now() - r.sigterm;
    await until(async () => (await lb.servers())[`node${i}`] === 'UP', `HAProxy sees node${i} UP again`, 30000);
    r.lbUp = now() - r.sigterm;
    restarts.push(r);
  }
  await until(() => recs.every((rec) => {
    const s = rec.sessions[rec.sessions.length - 1];
    return s && s.end === null && s.got.length >= 5;
  }), 'every client connected and receiving after the restarts', 60000);
  stop = true;
  await Promise.all(running);
  const rate = Math.round(count() / ((now() - loadStart) / 1000));
  for (const pub of pubs) {
    const api = sdkAt(lb.host);
    for (const ch of CH) {
      await until(async () => (await api.trigger(ch, 'end', { p: pub.p })).status === 200, `marker ${pub.p} on ${ch} accepted`, 15000);
    }
  }
  await withTimeout(until(() => recs.every((rec) => rec.sessions[rec.sessions.length - 1].markers.size === pubs.length * CH.length),
    'every client got every marker', 30000), 35000, 'markers');

  // Checks: over ALL sessions of a client (recovery bridges reconnects).
  const problems = [];
  const statuses = tally(pubs.flatMap((p) => p.log.map((e) => e.status)));
  let deliveredAlthoughRefused = 0;
  for (const rec of recs) {
    const keys = rec.all.map((g) => `${g.p}|${g.s}`);
    const dupKeys = Object.entries(tally(keys)).filter(([, n]) => n > 1).map(([k]) => k);
    if (dupKeys.length) problems.push(`client ${rec.c}: ${dupKeys.length} duplicate deliveries: ${dupKeys.slice(0, 10).join(',')}`);
    for (const pub of pubs) {
      for (const ch of CH) {
        const got = rec.all.filter((g) => g.p === pub.p && g.ch === ch).map((g) => g.s);
        for (let j = 1; j < got.length; j++) if (got[j] <= got[j - 1]) { problems.push(`client ${rec.c} ${ch} publisher ${pub.p}: ${got[j]} after ${got[j - 1]} (order)`); break; }
        const seen = new Set(got);
        const ok = pub.log.filter((e) => e.ch === ch && e.status >= 200 && e.status < 300);
        const missing = ok.filter((e) => !seen.has(e.s)).map((e) => e.s);
        if (missing.length) {
          // Where the gap is: which session boundary it falls on.
          const where = missing.slice(0, 5).map((s) => {
            const e = pub.log[s];
            const k = rec.sessions.findIndex((x) => x.start <= e.start && (x.end === null || e.start < x.end));
            return `${s}@${Math.round(e.start - loadStart)}ms(session ${k})`;
          });
          problems.push(`client ${rec.c} ${ch} publisher ${pub.p}: ${missing.length} 2xx publishes missing: ${missing.slice(0, 10).join(',')} [${where.join(' ')}]`);
        }
        deliveredAlthoughRefused += pub.log.filter((e) => e.ch === ch && e.status !== 200 && seen.has(e.s)).length;
      }
    }
    rec.sessions.forEach((sess, k) => {
      if (k === 0) {
        if (sess.recoveries.length) problems.push(`client ${rec.c}: first session reported recoveries ${JSON.stringify(sess.recoveries)} (no position sent)`);
        return;
      }
      for (const ch of CH) {
        const r = sess.recoveries.filter((x) => x.ch === ch);
        if (sess.subAt[ch] === undefined) {
          if (sess.end === null) problems.push(`client ${rec.c} session ${k} (final): ${ch} not subscribed`);
          continue;
        }
        if (r.length !== 1 || r[0].recovered !== true) problems.push(`client ${rec.c} session ${k} ${ch}: recoveries ${JSON.stringify(r.map((x) => x.recovered))}, expected [true]`);
      }
    });
    if (rec.sessions.length < 2) problems.push(`client ${rec.c}: never reconnected although every node was restarted`);
  }
  // Every node, restarted ones included, holds the whole history of each channel.
  const heldCounts = {};
  for (const i of [1, 2, 3]) {
    for (const ch of CH) {
      const h = await historyOf(i, ch, { limit: 1000 });
      const held = new Set(h.events.filter((e) => e.name === 'm').map((e) => { const d = JSON.parse(e.data); return `${d.p}|${d.s}`; }));
      heldCounts[`n${i}:${ch}`] = held.size;
      const lack = pubs.flatMap((pub) => pub.log.filter((e) => e.ch === ch && e.status >= 200 && e.status < 300 && !held.has(`${pub.p}|${e.s}`)).map((e) => `${pub.p}|${e.s}`));
      if (lack.length) problems.push(`node ${i} HTTP history of ${ch} lacks ${lack.length} 2xx publishes: ${lack.slice(0, 10).join(',')} (complete ${h.complete})`);
    }
  }
  const okCount = pubs.reduce((a, p) => a + p.log.filter((e) => e.status >= 200 && e.status < 300).length, 0);
  const m = {};
  for (const i of [1, 2, 3]) {
    const mi = await metrics(i);
    m[`n${i}`] = {
      recovered_true: mi['pushmesh_history_recoveries_total{recovered="true"}'],
      recovered_false: mi['pushmesh_history_recoveries_total{recovered="false"}'],
      events: mi.pushmesh_history_events,
    };
  }
  const report = {
    publishes: count(), accepted_2xx: okCount, per_second: rate, statuses,
    refused: pubs.flatMap((p) => p.log.filter((e) => e.status !== 200).map((e) => ({ p: p.p, s: e.s, status: e.status, text: e.text }))).slice(0, 20),
    restarts: restarts.map((r) => ({ node: r.node, exited_ms: Math.round(r.exited), ready_ms: Math.round(r.ready), lb_up_ms: Math.round(r.lbUp) })),
    clients: recs.map((r) => ({
      c: r.c, sessions: r.sessions.length, close_codes: r.codes, received_total: r.all.length,
      received_per_session: r.sessions.map((s) => s.got.length),
      // Received in a later session although published (started) before it connected: replayed by a recovery.
      replayed_per_session: r.sessions.map((s, k) => (k === 0 ? 0 : s.got.filter((g) => pubs[g.p].log[g.s].start < s.start).length)),
      recoveries: r.sessions.slice(1).map((s) => s.recoveries.map((x) => x.recovered)),
    })),
    delivered_although_not_2xx: deliveredAlthoughRefused,
    node_metrics_after_restarts: m, history_events_held: heldCounts,
    haproxy_log: haproxyLog(lb.log()),
  };
  console.log('history rolling restart behind HAProxy:', JSON.stringify(report, null, 1));
  assert.deepEqual(problems, [], 'every client: every 2xx publish exactly once, per-publisher order, every resubscribe recovered');
  assert.ok(okCount > 500, `a real load was applied (${okCount} publishes 2xx)`);
  for (const rec of recs) assert.equal(new Set(rec.all.map((g) => `${g.p}|${g.s}`)).size, rec.all.length);
});

// A restarted node turns ready only once it holds its peers' history copy:
// a client that recovers on it the moment /readyz says 200 finds the events
// of the node's own previous incarnation, which only its peers hold.
test('a restarted node is ready only with the history: recovery on it at its first /readyz 200 is recovered true', { timeout: 180000 }, async () => {
  // startup_timeout_ms well above the copy's time (a node gives up waiting
  // for its peers after it, and is ready anyway).
  const opts = { appExtra: history(['big-*']), startupTimeoutMs: 60000 };
  for (const i of [1, 2]) await startNode(i, opts);
  await meshed([1, 2]);
  // Enough history to take a while to copy: 40 channels x 100 events of
  // ~2 KB (8 MB), all published through node 2 (its incarnation's origin).
  const channels = [...Array(40).keys()].map((c) => `big-${c}`);
  const pad = 'x'.repeat(2000);
  const publishRound = async (k) => {
    const r = await publish(2, channels, 'm', { k, pad });
    assert.equal(r.status, 200, `publish ${k}: ${r.status} ${r.text}`);
  };
  for (let k = 0; k < 50; k++) await publishRound(k);
  // A client on node 2 takes its position of big-0 after the 50th event.
  const frames = [];
  const s = await rawSocket(2, (m) => frames.push(m));
  s.send('pusher:subscribe', { channel: 'big-0' });
  await until(() => frames.some((m) => m.event === 'pusher_internal:subscription_succeeded'), 'subscribed on node 2');
  const saved = JSON.parse(frames.find((m) => m.event === 'pusher_internal:subscription_succeeded').data).position;
  assert.equal(typeof saved, 'string');
  s.ws.close();
  for (let k = 50; k < 100; k++) await publishRound(k);
  await until(async () => (await historyOf(1, 'big-39')).events.length === 100, 'node 1 holds the history', 30000);

  // Restart node 2 (new incarnation) and poll its readiness closely. The
  // link from node 1 to node 2 is slowed to 16 Mbit/s (htb in node 1's
  // namespace; gossip stays fast), so the copy takes seconds, not
  // milliseconds: before a node waited for it, node 2 was ready long
  // before the events of its previous incarnation arrived.
  await stopNode(2, 'SIGTERM');
  const tc = (args) => nsExec('n1', 'tc', args);
  tc(['qdisc', 'add', 'dev', 'eth0', 'root', 'handle', '1:', 'htb', 'default', '10']);
  cleanups.push(() => tc(['qdisc', 'del', 'dev', 'eth0', 'root']));
  tc(['class', 'add', 'dev', 'eth0', 'parent', '1:', 'classid', '1:10', 'htb', 'rate', '10gbit']);
  tc(['class', 'add', 'dev', 'eth0', 'parent', '1:', 'classid', '1:20', 'htb', 'rate', '16mbit', 'ceil', '16mbit']);
  tc(['filter', 'add', 'dev', 'eth0', 'parent', '1:', 'protocol', 'ip', 'prio', '1', 'u32', 'match', 'ip', 'dport', '7000', '0xffff', 'flowid', '1:10']);
  tc(['filter', 'add', 'dev', 'eth0', 'parent', '1:', 'protocol', 'ip', 'prio', '2', 'u32', 'match', 'ip', 'dst', `${ip(2)}/32`, 'match', 'ip', 'protocol', '17', '0xff', 'flowid', '1:20']);
  const spawnedAt = Date.now();
  spawnNode(2, opts);
  const deadline = Date.now() + 60000;
  let readyAt = null;
  while (Date.now() < deadline && readyAt === null) {
    try { if ((await readyz(2)).status === 200) readyAt = Date.now(); } catch { /* not listening yet */ }
    if (readyAt === null) await pause(10);
  }
  assert.ok(readyAt, 'node 2 ready again');
  console.log(`restarted node 2 ready ${readyAt - spawnedAt} ms after its start`);
  // At once: recover big-0 on node 2 from the saved position.
  const got = [];
  const r = await rawSocket(2, (m) => got.push(m));
  r.send('pusher:subscribe', { channel: 'big-0', position: saved });
  await until(() => got.some((m) => m.event === 'pusher_internal:subscription_succeeded'), 'resubscribed on the restarted node 2', 15000);
  const ok = JSON.parse(got.find((m) => m.event === 'pusher_internal:subscription_succeeded').data);
  const c2 = await getJson(2, '/cluster');
  assert.equal(ok.recovered, true, `recovered at first ready (cluster: ${JSON.stringify(c2.peers?.map((p) => [p.node, p.link]))})`);
  await until(() => got.filter((m) => m.event === 'm').length >= 50, 'the 50 events after the position', 15000);
  const ks = got.filter((m) => m.event === 'm').map((m) => JSON.parse(m.data).k);
  assert.deepEqual(ks, [...Array(50).keys()].map((j) => j + 50), 'each once, in order');
  r.ws.close();
});
