// Shared by the continuity scenarios (continuity.test.mjs and
// continuity-restart.test.mjs): cleanup after each test, pollers,
// collectors, a paced publisher, HAProxy's log summary.
import http from 'node:http';
import { performance } from 'node:perf_hooks';
import {
  startNode, spawnNode, stopNode, stopAll, meshed, metrics, sdk, client, closeClients,
  subscribed, until, withTimeout, getJson, ip, httpPort, readyz, ready, publish, rawSocket,
  nsExec, startHaproxy, sdkAt, clientAt, nodeOf, linkedIn, healAll, LB_IP, CLIENT_IP,
} from './cluster.helpers.mjs';
export const haproxies = [];
export const cleanups = [];
export async function cleanup() {
  closeClients();
  for (const f of cleanups.splice(0)) { try { await f(); } catch { /* best effort */ } }
  await stopAll();
  healAll();
  for (const lb of haproxies.splice(0)) await lb.stop();
}



export const now = () => performance.now();
/** Bound of each test (they take 5-60 s on an idle machine). */
export const T = 240000;
/** Pacing of publishers and pollers only (never used to wait for a result). */
export const pause = (ms) => new Promise((r) => setTimeout(r, ms));

/** Runs `fn` every `everyMs` until the returned stop() is called; bounded by maxMs. */
export function poller(fn, everyMs, maxMs = 120000) {
  let stopped = false;
  const end = Date.now() + maxMs;
  const done = (async () => {
    while (!stopped && Date.now() < end) {
      try { await fn(); } catch { /* recorded by fn */ }
      await pause(everyMs);
    }
  })();
  return async () => { stopped = true; await done; };
}

export function collect(ch, event) {
  const got = [];
  ch.bind(event, (d) => got.push(d));
  return got;
}

export function tally(xs) {
  const m = {};
  for (const x of xs) m[x] = (m[x] || 0) + 1;
  return m;
}

/** Missing 2xx sequence numbers: those answered 2xx and absent from `got`. */
export function missingOf(log, got) {
  const seen = new Set(got);
  return log.filter((e) => e.status >= 200 && e.status < 300 && !seen.has(e.s)).map((e) => e.s);
}

/** Sequential raw publishes to `to` until stop() or maxCount; each answer recorded. */
export function publishLoop(to, channels, name, { everyMs = 0, maxCount = 5000, maxMs = 90000, data = {} } = {}) {
  const log = [];
  let stopped = false;
  const end = Date.now() + maxMs;
  const done = (async () => {
    for (let s = 0; !stopped && s < maxCount && Date.now() < end; s++) {
      const e = { s, start: now(), status: null };
      log.push(e);
      try {
        const r = await publish(to, channels, name, { s, ...data });
        Object.assign(e, { status: r.status, retryAfter: r.retryAfter, reason: r.json && r.json.reason, text: r.text.slice(0, 200) });
      } catch (err) {
        e.status = 'error'; e.text = String(err.cause ? err.cause.code || err.cause : err.message);
        if (everyMs === 0) await pause(20); // a refused connection: do not spin
      }
      e.end = now();
      if (everyMs) await pause(everyMs);
    }
  })();
  return { log, stop: async () => { stopped = true; await done; }, done };
}

/** HAProxy's httplog lines of the API: status counts and retried/redispatched requests. */
export function haproxyLog(text) {
  const out = { api_requests: 0, statuses: {}, retried: 0, redispatched: 0 };
  for (const l of text.split('\n')) {
    if (!/"POST \/apps\//.test(l)) continue;
    const m = l.match(/\s(\d{3})\s.*?\s\d+\/\d+\/\d+\/\d+\/(\+?)(\d+)\s/);
    out.api_requests++;
    if (!m) continue;
    out.statuses[m[1]] = (out.statuses[m[1]] || 0) + 1;
    if (Number(m[3]) > 0) out.retried++;
    if (m[2] === '+') out.redispatched++;
  }
  return out;
}

// ---------------------------------------------------------------------------
// The scenario of the issue: rolling restart behind the real HAProxy.
