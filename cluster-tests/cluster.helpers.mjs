// Helpers of the cluster scenarios. This process runs inside the client
// namespace (see run.sh); each pushmesh node runs in its own namespace.
import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import http from 'node:http';
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

/** Starts node i (1-based) in its namespace. */
export async function startNode(i, { secret = SECRET, seeds = [1, 2], extra = '', certs = null, webhookUrl = null, appExtra = '' } = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `pmc-n${i}-`));
  const cert = certs ? `ca = "${certs.ca}"\ncert = "${certs.cert}"\nkey = "${certs.key}"\n` : '';
  const hooks = webhookUrl ? `[[apps.webhooks]]\nurl = "${webhookUrl}"\nevent_types = ["member_added", "member_removed", "channel_occupied", "channel_vacated"]\n` : '';
  const toml = `listen = "${ip(i)}:${httpPort}"
webhook_delay_ms = 500
webhook_backoff_ms = 100
shutdown_timeout = 5
${extra}
[cluster]
node_id = "n${i}"
gossip_listen = "${ip(i)}:7000"
cluster_listen = "${ip(i)}:7001"
seeds = [${seeds.map((s) => `"${ip(s)}:7000"`).join(', ')}]
secret = "${secret}"
gossip_interval_ms = 200
drain_wait_ms = 400
startup_timeout_ms = 3000
${cert}
[[apps]]
id = "${APP.id}"
key = "${APP.key}"
secret = "${APP.secret}"
client_events = true
${hooks}${appExtra}`;
  fs.writeFileSync(path.join(dir, 'pushmesh.toml'), toml);
  const child = spawn('ip', ['netns', 'exec', `${PREFIX}-n${i}`, BIN, '--config', path.join(dir, 'pushmesh.toml')], {
    env: { PATH: process.env.PATH, RUST_LOG: process.env.PMC_LOG || 'warn' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; if (process.env.PMC_LOG) process.stderr.write(`[n${i}] ${d}`); });
  await withTimeout(new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (d) => { out += d; if (/listening on/.test(out)) resolve(); });
    child.on('exit', (code) => reject(new Error(`node ${i} exited with ${code}: ${stderr}`)));
  }), 15000, `node ${i} to start`);
  const exited = new Promise((r) => child.on('exit', (code, signal) => r({ code, signal })));
  const node = { i, child, exited, stderr: () => stderr };
  running.set(i, node);
  return node;
}

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

/** Waits until every listed node has a link to every other listed node. */
export async function meshed(nodes, ms = 20000) {
  await until(async () => {
    for (const i of nodes) {
      const c = await getJson(i, '/cluster');
      const linked = new Set(c.synced_peers);
      for (const j of nodes) if (j !== i && !linked.has(`n${j}`)) return false;
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
  for (const c of clients.splice(0)) { try { c.disconnect(); } catch { /* gone */ } }
}

export function subscribed(ch) {
  return withTimeout(new Promise((resolve, reject) => {
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
