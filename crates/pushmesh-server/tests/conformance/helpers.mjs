// Shared helpers of the conformance suite: start a real pushmesh process,
// make real pusher-js clients and a real Node SDK, run an auth endpoint.
import { spawn } from 'node:child_process';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
export const PusherClient = require('pusher-js');
export const PusherServer = require('pusher');
export const WebSocket = require('ws');

const here = path.dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.PUSHMESH_BIN || path.resolve(here, '../../../../target/debug/pushmesh');

export const APP = { id: 'conf-app', key: 'conf-key', secret: 'conf-secret' };
/** The conformance app as a TOML `[[apps]]` table. */
export const APP_TOML = `
[[apps]]
id = "${APP.id}"
key = "${APP.key}"
secret = "${APP.secret}"
`;

/**
 * A lone clustered node's TOML: `[cluster]` on loopback (free ports,
 * advertised addresses nobody answers), the `extra` cluster lines, then
 * the conformance app.
 */
export function clusteredToml(extra = '') {
  return `
[cluster]
gossip_listen = "127.0.0.1:0"
gossip_advertise = "127.0.0.1:1"
cluster_listen = "127.0.0.1:0"
cluster_advertise = "127.0.0.1:2"
secret = "a-secret-of-sixteen-plus"
${extra}
${APP_TOML}`;
}

export const MASTER_KEY = Buffer.alloc(32, 7).toString('base64');

/** Every wait is bounded: a test fails rather than hangs. */
export function withTimeout(promise, ms, what) {
  let t;
  const timeout = new Promise((_, rej) => {
    t = setTimeout(() => rej(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(t));
}

/** Starts pushmesh on a free loopback port; resolves once it printed its address. */
export async function startServer({ args = [], configToml = null, env = {} } = {}) {
  const fs = await import('node:fs');
  const os = await import('node:os');
  const extra = [...args];
  if (configToml) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pushmesh-conf-'));
    const file = path.join(dir, 'pushmesh.toml');
    fs.writeFileSync(file, configToml);
    extra.push('--config', file);
  }
  const hasApps = args.includes('--app') || args.includes('--config') || configToml;
  const appArgs = hasApps ? [] : ['--app', `${APP.id}:${APP.key}:${APP.secret}`];
  const child = spawn(BIN, ['--listen', '127.0.0.1:0', ...appArgs, ...extra], {
    env: { ...cleanEnv(), RUST_LOG: process.env.PUSHMESH_TEST_LOG || 'warn', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; if (process.env.PUSHMESH_TEST_LOG) process.stderr.write(d); });
  const port = await withTimeout(new Promise((resolve, reject) => {
    let out = '';
    child.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on [\d.]+:(\d+)/);
      if (m) resolve(Number(m[1]));
    });
    child.on('exit', (code) => reject(new Error(`pushmesh exited with ${code}: ${stderr}`)));
  }), 15000, 'pushmesh to start');
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  return {
    port,
    child,
    exited,
    stderr: () => stderr,
    async stop() {
      if (child.exitCode === null) child.kill('SIGTERM');
      return withTimeout(exited, 15000, 'pushmesh to stop');
    },
  };
}

/** The environment without PUSHMESH_* variables (pushmesh warns about unknown ones). */
export function cleanEnv() {
  const env = { ...process.env };
  for (const k of Object.keys(env)) if (k.startsWith('PUSHMESH_')) delete env[k];
  return env;
}

export function serverSdk(port, overrides = {}) {
  return new PusherServer({
    appId: APP.id, key: APP.key, secret: APP.secret,
    host: '127.0.0.1', port: String(port), useTLS: false,
    encryptionMasterKeyBase64: MASTER_KEY,
    ...overrides,
  });
}

/**
 * An auth endpoint, as an app would run it: channel authorization with the
 * SDK's authorizeChannel and user sign-in with authenticateUser. The client
 * says who it is in the `user` parameter (a test stand-in for a session).
 */
export async function startAuthServer(sdk, { forge = false } = {}) {
  const server = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d) => { body += d; });
    req.on('end', () => {
      const p = new URLSearchParams(body);
      const socketId = p.get('socket_id');
      const user = p.get('user') || 'anon';
      let out;
      if (req.url.startsWith('/pusher/auth')) {
        const channel = p.get('channel_name');
        if (channel.startsWith('presence-')) {
          out = sdk.authorizeChannel(socketId, channel, { user_id: user, user_info: { name: `User ${user}` } });
        } else {
          out = sdk.authorizeChannel(socketId, channel);
        }
        if (forge) out = { ...out, auth: `${APP.key}:${'0'.repeat(64)}` };
      } else if (req.url.startsWith('/pusher/user-auth')) {
        const watchlist = p.get('watchlist') ? p.get('watchlist').split(',') : undefined;
        out = sdk.authenticateUser(socketId, { id: user, user_info: { name: user }, ...(watchlist ? { watchlist } : {}) });
      } else {
        res.writeHead(404); res.end(); return;
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(out));
    });
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const url = `http://127.0.0.1:${server.address().port}`;
  return { url, close: () => new Promise((r) => server.close(r)) };
}

const live = [];

/** Disconnects every client and socket the helpers made, so the test process can end. */
export function closeAll() {
  for (const c of live.splice(0)) {
    try { c.disconnect ? c.disconnect() : c.terminate(); } catch { /* already gone */ }
  }
}

/**
 * A node, the Node SDK for it and an auth endpoint: `mk(opts)` makes a
 * pusher-js client of that endpoint; `stop()` disconnects every client and
 * socket, closes the endpoint and stops the node (its `{ code }`).
 */
export async function startWithAuth() {
  const srv = await startServer();
  const sdk = serverSdk(srv.port);
  const auth = await startAuthServer(sdk);
  const clients = [];
  const mk = (opts = {}) => { const c = client(srv.port, { authUrl: auth.url, ...opts }); clients.push(c); return c; };
  const stop = async () => {
    closeAll();
    for (const c of clients) c.disconnect();
    await auth.close();
    return srv.stop();
  };
  return { srv, sdk, auth, mk, stop };
}

/** A pusher-js client; `user` and `watchlist` are passed to the auth endpoint. */
export function client(port, { authUrl, user, watchlist, key = APP.key, ...rest } = {}) {
  const params = { user: user || 'anon' };
  if (watchlist) params.watchlist = watchlist.join(',');
  const c = new PusherClient(key, {
    wsHost: '127.0.0.1', wsPort: port, forceTLS: false, enabledTransports: ['ws'],
    cluster: 'mt1', disableStats: true,
    channelAuthorization: { endpoint: `${authUrl}/pusher/auth`, transport: 'ajax', params },
    userAuthentication: { endpoint: `${authUrl}/pusher/user-auth`, transport: 'ajax', params },
    ...rest,
  });
  live.push(c);
  return c;
}

export function connected(c) {
  if (c.connection.state === 'connected') return Promise.resolve();
  return withTimeout(new Promise((r) => c.connection.bind('connected', r)), 10000, 'connected');
}

export function subscribed(channel) {
  return withTimeout(new Promise((resolve, reject) => {
    channel.bind('pusher:subscription_succeeded', resolve);
    channel.bind('pusher:subscription_error', (e) => reject(new Error(`subscription_error ${JSON.stringify(e)}`)));
  }), 10000, `subscription to ${channel.name}`);
}

/** A pusher-js client (with no auth endpoint) subscribed to `name`: [client, channel]. */
export async function subscribedTo(port, name) {
  const c = client(port, { authUrl: 'http://127.0.0.1:9' });
  const ch = c.subscribe(name);
  await subscribed(ch);
  return [c, ch];
}

/** Resolves with the next `event` on a channel (or any bindable). */
export function next(bindable, event, what = event) {
  return withTimeout(new Promise((r) => {
    const f = (d) => { bindable.unbind(event, f); r(d); };
    bindable.bind(event, f);
  }), 10000, what);
}

/** Collects every `event` on a bindable into an array. */
export function collect(bindable, event) {
  const got = [];
  bindable.bind(event, (d) => got.push(d));
  return got;
}

/** Waits until `cond()` is true, polling briefly; bounded. */
export async function until(cond, what, ms = 10000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (await cond()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** A loopback port that was free a moment ago. */
export async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

/** A raw WebSocket speaking the protocol by hand, for malformed input. */
export async function rawSocket(port, pathAndQuery = `/app/${APP.key}?protocol=7`) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}${pathAndQuery}`);
  live.push(ws);
  const frames = [];
  const waiters = [];
  ws.on('message', (d, isBinary) => {
    const text = d.toString();
    let msg;
    try { msg = JSON.parse(text); } catch { msg = { raw: text }; }
    if (typeof msg.data === 'string') { try { msg.data = JSON.parse(msg.data); } catch { /* keep */ } }
    frames.push(msg);
    for (const w of [...waiters]) if (w.pred(msg)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(msg); }
  });
  const closed = new Promise((r) => ws.on('close', (code, reason) => r({ code, reason: reason.toString() })));
  ws.on('error', () => {});
  await withTimeout(new Promise((resolve) => { ws.on('open', resolve); ws.on('close', resolve); }), 10000, 'websocket open');
  return {
    ws, frames, closed,
    send: (obj) => ws.send(typeof obj === 'string' ? obj : JSON.stringify(obj)),
    waitFor(pred, what) {
      const found = frames.find(pred);
      if (found) return Promise.resolve(found);
      return withTimeout(new Promise((resolve) => waiters.push({ pred, resolve })), 10000, what);
    },
    close: () => ws.close(),
  };
}
