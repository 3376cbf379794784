// Helpers of the cluster scenarios. This process runs inside the client
// namespace (see run.sh); each pushmesh node runs in its own namespace.
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import http from 'node:http';
import crypto from 'node:crypto';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
export const PusherClient = require('pusher-js');
export const PusherServer = require('pusher');

export const PREFIX = process.env.PMC_PREFIX;
export const SUBNET = process.env.PMC_SUBNET;
export const BIN = process.env.PUSHMESH_BIN;
export const APP = { id: 'app', key: 'key', secret: 'secret' };
export const SECRET = 'cluster-secret-for-tests-0123456789';
export const CLIENT_IP = `${SUBNET}.100`;
if (!PREFIX || !SUBNET || !BIN) throw new Error('run through cluster-tests/run.sh (needs PMC_PREFIX, PMC_SUBNET, PUSHMESH_BIN)');

export const ip = (i) => `${SUBNET}.${i}`;
export const httpPort = 6001;

export function withTimeout(promise, ms, what) {
  let t;
  return Promise.race([
    promise,
    new Promise((_, rej) => { t = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms); }),
  ]).finally(() => clearTimeout(t));
}

export async function until(cond, what, ms = 15000) {
  const end = Date.now() + ms;
  let last;
  while (Date.now() < end) {
    try { if (await cond()) return; } catch (e) { last = e; }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ''}`);
}

const running = new Map();

/**
 * Writes node i's config and spawns it in namespace i, without waiting.
 * Options: secret, seeds (node numbers), extra (top-level TOML lines),
 * cluster (lines of the [cluster] table), limits (lines of [apps.limits]),
 * nodeId (default n<i>), drainWaitMs (default 400; null: the binary's
 * default), startupTimeoutMs (default 3000; null: the binary's default),
 * certs, webhookUrl, appExtra (lines after the app's keys), log (RUST_LOG;
 * default PMC_LOG or "warn").
 */
export function spawnNode(i, {
  secret = SECRET, seeds = [1, 2], extra = '', cluster = '', limits = '', nodeId = `n${i}`,
  drainWaitMs = 400, startupTimeoutMs = 3000, certs = null, webhookUrl = null, appExtra = '', log = null,
} = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `pmc-n${i}-`));
  const cert = certs ? `ca = "${certs.ca}"\ncert = "${certs.cert}"\nkey = "${certs.key}"\n` : '';
  const hooks = webhookUrl ? `[[apps.webhooks]]\nurl = "${webhookUrl}"\nevent_types = ["member_added", "member_removed", "channel_occupied", "channel_vacated"]\n` : '';
  const drain = drainWaitMs === null ? '' : `drain_wait_ms = ${drainWaitMs}\n`;
  const startup = startupTimeoutMs === null ? '' : `startup_timeout_ms = ${startupTimeoutMs}\n`;
  const lim = limits ? `[apps.limits]\n${limits}\n` : '';
  const toml = `listen = "${ip(i)}:${httpPort}"
webhook_delay_ms = 500
webhook_backoff_ms = 100
shutdown_timeout = 5
${extra}
[cluster]
node_id = "${nodeId}"
gossip_listen = "${ip(i)}:7000"
cluster_listen = "${ip(i)}:7001"
seeds = [${seeds.map((s) => `"${ip(s)}:7000"`).join(', ')}]
secret = "${secret}"
gossip_interval_ms = 200
${drain}${startup}${cluster}
${cert}
[[apps]]
id = "${APP.id}"
key = "${APP.key}"
secret = "${APP.secret}"
client_events = true
${hooks}${appExtra}${lim}`;
  fs.writeFileSync(path.join(dir, 'pushmesh.toml'), toml);
  const child = spawn('ip', ['netns', 'exec', `${PREFIX}-n${i}`, BIN, '--config', path.join(dir, 'pushmesh.toml')], {
    env: { PATH: process.env.PATH, RUST_LOG: log || process.env.PMC_LOG || 'warn' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  let stdout = '';
  child.stderr.on('data', (d) => { stderr += d; if (process.env.PMC_LOG) process.stderr.write(`[n${i}] ${d}`); });
  child.stdout.on('data', (d) => { stdout += d; });
  const exited = new Promise((r) => child.on('exit', (code, signal) => r({ code, signal })));
  const node = { i, child, exited, stderr: () => stderr, stdout: () => stdout, startedAt: Date.now() };
  running.set(i, node);
  return node;
}

/** Starts node i (1-based) in its namespace; resolves once it listens (options: spawnNode's). */
export async function startNode(i, opts = {}) {
  const node = spawnNode(i, opts);
  await withTimeout(Promise.race([
    until(() => /listening on/.test(node.stdout()), `node ${i} to listen`, 30000),
    node.exited.then(({ code, signal }) => { throw new Error(`node ${i} exited with ${code ?? signal}: ${node.stderr()}`); }),
  ]), 30000, `node ${i} to start`);
  return node;
}

/** The node object of a running node (from startNode/spawnNode). */
export function nodeOf(i) { return running.get(i); }

export async function stopNode(i, signal = 'SIGTERM') {
  const n = running.get(i);
  if (!n) return null;
  running.delete(i);
  if (n.child.exitCode === null) n.child.kill(signal);
  return withTimeout(n.exited, 20000, `node ${i} to exit`);
}

export async function stopAll() {
  for (const i of [...running.keys()]) await stopNode(i, 'SIGKILL');
}

export async function getJson(i, p) {
  const r = await fetch(`http://${ip(i)}:${httpPort}${p}`);
  return r.json();
}

/** Whether node i's /cluster shows its link to node j up (link up and synced). */
export function linkedIn(c, j) {
  // peers may list a dead incarnation of n<j> next to the live one.
  const entries = (c.peers || []).filter((p) => p.node === `n${j}`);
  return c.synced_peers.includes(`n${j}`) && (entries.length === 0 || entries.some((p) => p.link === true));
}

/**
 * Waits until every listed node has a link to every other listed node, holds
 * its copy (the cached events, history and end marker a link-up sends on
 * the data stream: counters read after this see only what follows) and is
 * ready.
 */
export async function meshed(nodes, ms = 20000) {
  await until(async () => {
    for (const i of nodes) {
      const c = await getJson(i, '/cluster');
      for (const j of nodes) if (j !== i && !linkedIn(c, j)) return false;
      for (const j of nodes) if (j !== i && !(c.copied_peers || []).includes(`n${j}`)) return false;
      // Joined: it takes publishes and connections.
      if ((await fetch(`http://${ip(i)}:${httpPort}/readyz`)).status !== 200) return false;
    }
    return true;
  }, `mesh of ${nodes.join(',')}`, ms);
}

/** Prometheus text of node i, parsed into {name{labels}: value}. */
export async function metrics(i) {
  const text = await (await fetch(`http://${ip(i)}:${httpPort}/metrics`)).text();
  const out = {};
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = line.match(/^(\S+?)(\{.*\})? (\S+)$/);
    if (m) out[`${m[1]}${m[2] || ''}`] = Number(m[3]);
  }
  return out;
}

export function dataFramesReceived(m) {
  return Object.entries(m)
    .filter(([k]) => k.startsWith('pushmesh_cluster_frames_received_total') && k.includes('kind="data"'))
    .reduce((a, [, v]) => a + v, 0);
}

export function sdk(i) {
  return new PusherServer({ appId: APP.id, key: APP.key, secret: APP.secret, host: ip(i), port: String(httpPort), useTLS: false });
}

const clients = [];
export function client(i, opts = {}) {
  const c = new PusherClient(APP.key, {
    wsHost: ip(i), wsPort: httpPort, forceTLS: false, enabledTransports: ['ws'], cluster: 'mt1', disableStats: true,
    channelAuthorization: { customHandler: ({ socketId, channelName }, cb) => cb(null, sdk(1).authorizeChannel(socketId, channelName, opts.presence)) },
    ...opts.pusher,
  });
  clients.push(c);
  return c;
}

export function closeClients() {
  closeRawSockets();
  for (const c of clients.splice(0)) { try { c.disconnect(); } catch { /* gone */ } }
}

export function subscribed(ch) {
  return withTimeout(new Promise((resolve, reject) => {
    if (ch.subscribed) { resolve(); return; } // already (pusher-js sets it on success)
    ch.bind('pusher:subscription_succeeded', resolve);
    ch.bind('pusher:subscription_error', (e) => reject(new Error(JSON.stringify(e))));
  }), 15000, `subscribe ${ch.name}`);
}

/** A webhook receiver on the client namespace's address. */
export async function webhookReceiver() {
  const got = [];
  const srv = http.createServer((req, res) => {
    let b = '';
    req.on('data', (d) => { b += d; });
    req.on('end', () => {
      const wh = sdk(1).webhook({ headers: req.headers, rawBody: b });
      if (wh.isValid()) for (const e of wh.getEvents()) got.push(e);
      res.writeHead(wh.isValid() ? 200 : 401); res.end();
    });
  });
  await new Promise((r) => srv.listen(0, CLIENT_IP, r));
  return { url: `http://${CLIENT_IP}:${srv.address().port}/hooks`, got, close: () => { srv.closeAllConnections(); srv.close(); } };
}

/** Cuts (or restores) traffic between nodes a and b, both directions, with iptables in their namespaces. */
export function partition(a, b, cut = true) {
  const op = cut ? '-A' : '-D';
  for (const [x, y] of [[a, b], [b, a]]) {
    for (const chain of ['INPUT', 'OUTPUT']) {
      const dir = chain === 'INPUT' ? '-s' : '-d';
      execFileSync('ip', ['netns', 'exec', `${PREFIX}-n${x}`, 'iptables', op, chain, dir, ip(y), '-j', 'DROP']);
    }
  }
}

/** GET /readyz of node i: {status, body} (body parsed when JSON). */
export async function readyz(i) {
  const r = await fetch(`http://${ip(i)}:${httpPort}/readyz`, { signal: AbortSignal.timeout(5000) });
  const text = await r.text();
  let body = text;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, body };
}

/** Waits until node i's /readyz answers 200. */
export async function ready(i, ms = 30000) {
  await until(async () => (await readyz(i)).status === 200, `node ${i} ready (/readyz 200)`, ms);
}

/**
 * A signed HTTP API publish with fetch (not the SDK), so status, headers and
 * body of every answer are seen. `to` is a node number or "host:port".
 */
export async function publish(to, channels, name, data, { timeoutMs = 10000 } = {}) {
  const host = typeof to === 'number' ? `${ip(to)}:${httpPort}` : to;
  const body = JSON.stringify({ name, channels: Array.isArray(channels) ? channels : [channels], data: JSON.stringify(data) });
  const p = `/apps/${APP.id}/events`;
  const q = `auth_key=${APP.key}&auth_timestamp=${Math.floor(Date.now() / 1000)}&auth_version=1.0&body_md5=${crypto.createHash('md5').update(body).digest('hex')}`;
  const sig = crypto.createHmac('sha256', APP.secret).update(`POST\n${p}\n${q}`).digest('hex');
  const r = await fetch(`http://${host}${p}?${q}&auth_signature=${sig}`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body, signal: AbortSignal.timeout(timeoutMs),
  });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, retryAfter: r.headers.get('retry-after'), text, json };
}

/**
 * A raw Pusher protocol WebSocket to node i (WHATWG WebSocket; run.sh passes
 * --experimental-websocket to Node 20). Resolves once connection_established.
 * `onEvent(msg)` sees every parsed frame.
 */
export async function rawSocket(i, onEvent = () => {}) {
  if (typeof WebSocket === 'undefined') throw new Error('no global WebSocket: run through run.sh (node --experimental-websocket)');
  const ws = new WebSocket(`ws://${ip(i)}:${httpPort}/app/${APP.key}?protocol=7&client=raw&version=1.0`);
  const sock = { ws, socketId: null, closed: null, send: (event, data) => ws.send(JSON.stringify({ event, data })) };
  rawSockets.push(ws);
  sock.closedP = new Promise((r) => ws.addEventListener('close', (e) => { sock.closed = e.code; r(e.code); }));
  await withTimeout(new Promise((resolve, reject) => {
    ws.addEventListener('message', (m) => {
      const msg = JSON.parse(m.data);
      if (msg.event === 'pusher:connection_established') { sock.socketId = JSON.parse(msg.data).socket_id; resolve(); }
      onEvent(msg);
    });
    ws.addEventListener('error', () => reject(new Error(`raw socket to node ${i} failed`)));
    sock.closedP.then((code) => reject(new Error(`raw socket to node ${i} closed (${code})`)));
  }), 15000, `raw socket to node ${i}`);
  return sock;
}
const rawSockets = [];
export function closeRawSockets() {
  for (const ws of rawSockets.splice(0)) { try { ws.close(); } catch { /* gone */ } }
}

/** Runs a command in a namespace ("n3", "lb", ...). */
export function nsExec(ns, cmd, args) {
  return execFileSync('ip', ['netns', 'exec', `${PREFIX}-${ns}`, cmd, ...args], { encoding: 'utf8' });
}

export const LB_IP = `${SUBNET}.200`;

/**
 * Runs the real HAProxy (Debian package) in the "lb" namespace with the
 * shipped deploy/haproxy.cfg, changed only by address substitution: the
 * servers' 10.0.0.N become node N's address. A second file adds a stats
 * listener (LB_IP:8404) so the test can see HAProxy's view of each server.
 */
export async function startHaproxy() {
  const shipped = fs.readFileSync(new URL('../deploy/haproxy.cfg', import.meta.url), 'utf8');
  const cfg = shipped.replace(/\b10\.0\.0\.(\d+):/g, (_, n) => `${ip(Number(n))}:`);
  if (cfg === shipped) throw new Error('deploy/haproxy.cfg: no 10.0.0.N server address to substitute');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pmc-haproxy-'));
  fs.writeFileSync(path.join(dir, 'haproxy.cfg'), cfg);
  fs.writeFileSync(path.join(dir, 'stats.cfg'), 'frontend pmc_stats\n    mode http\n    bind :8404\n    stats enable\n    stats uri /stats\n');
  // maxconn 200000 of the shipped config needs ~400k file descriptors; where
  // the hard limit is lower (and cannot be raised), -n caps maxconn from the
  // command line instead of editing the config.
  const hard = Number(execFileSync('sh', ['-c', 'ulimit -Hn'], { encoding: 'utf8' }).trim());
  const cap = Number.isFinite(hard) && hard < 400100 ? ['-n', String(Math.floor((hard - 200) / 2))] : [];
  const child = spawn('ip', ['netns', 'exec', `${PREFIX}-lb`, 'haproxy', '-db', ...cap, '-f', path.join(dir, 'haproxy.cfg'), '-f', path.join(dir, 'stats.cfg')], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let log = '';
  child.stdout.on('data', (d) => { log += d; });
  child.stderr.on('data', (d) => { log += d; if (process.env.PMC_LOG) process.stderr.write(`[haproxy] ${d}`); });
  const exited = new Promise((r) => child.on('exit', (code, signal) => r({ code, signal })));
  const lb = {
    child, dir, cfg, log: () => log, host: `${LB_IP}:80`,
    /** {node1: "UP"|"DOWN"|"UP 1/2"|..., ...} from HAProxy's stats CSV. */
    async servers() {
      const csv = await (await fetch(`http://${LB_IP}:8404/stats;csv`, { signal: AbortSignal.timeout(5000) })).text();
      const lines = csv.split('\n');
      const head = lines[0].replace(/^# /, '').split(',');
      const st = head.indexOf('status');
      const out = {};
      for (const l of lines.slice(1)) {
        const f = l.split(',');
        if (f[0] === 'pushmesh_nodes' && /^node\d$/.test(f[1])) out[f[1]] = f[st];
      }
      return out;
    },
    async stop() { if (child.exitCode === null) child.kill('SIGKILL'); await withTimeout(exited, 10000, 'haproxy to exit'); },
  };
  await withTimeout(Promise.race([
    until(async () => Object.keys(await lb.servers()).length === 3, 'haproxy stats', 15000),
    exited.then(({ code }) => { throw new Error(`haproxy exited with ${code}: ${log}`); }),
  ]), 20000, 'haproxy to start');
  return lb;
}

/** pusher SDK (server) publishing through "host:port" (the load balancer). */
export function sdkAt(host) {
  const [h, port] = host.split(':');
  return new PusherServer({ appId: APP.id, key: APP.key, secret: APP.secret, host: h, port, useTLS: false, timeout: 10000 });
}

/** pusher-js client through "host:port". */
export function clientAt(host, opts = {}) {
  const [h, port] = host.split(':');
  const c = new PusherClient(APP.key, {
    wsHost: h, wsPort: Number(port), forceTLS: false, enabledTransports: ['ws'], cluster: 'mt1', disableStats: true,
    channelAuthorization: { customHandler: ({ socketId, channelName }, cb) => cb(null, sdk(1).authorizeChannel(socketId, channelName, opts.presence)) },
    ...opts.pusher,
  });
  clients.push(c);
  return c;
}

/** Removes every iptables rule in the node namespaces (a failed test may leave a cut behind). */
export function healAll() {
  for (let i = 1; i <= Number(process.env.PMC_NODES || 4); i++) {
    try { execFileSync('ip', ['netns', 'exec', `${PREFIX}-n${i}`, 'iptables', '-F']); } catch { /* no such namespace */ }
  }
}
