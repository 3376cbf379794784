// Real client addresses through the shipped balancer configs: HAProxy
// (deploy/haproxy.cfg, PROXY v2) and nginx (deploy/nginx.conf,
// X-Forwarded-For) on loopback ports in front of one node that trusts
// 127.0.0.1. Clients connect from 127.0.0.2 and 127.0.0.3; with one new
// connection allowed per address, the second from 127.0.0.2 is refused
// (4100) and 127.0.0.3 is not: the node sees each client, not the balancer.
// Skipped when haproxy or nginx is not installed (deploy/check installs them).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { startServer, WebSocket, withTimeout, APP, APP_TOML, freePort } from './helpers.mjs';

const deploy = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../../deploy');
const have = (bin) => spawnSync('sh', ['-c', `command -v ${bin}`]).status === 0;
const skip = !(have('haproxy') && have('nginx')) && 'haproxy or nginx not installed';

let srv; const procs = []; let dir;

/** Waits until something accepts on `port`. */
async function listening(port, what) {
  await withTimeout((async () => {
    for (;;) {
      const ok = await new Promise((r) => {
        const c = net.connect(port, '127.0.0.1', () => { c.destroy(); r(true); });
        c.on('error', () => r(false));
      });
      if (ok) return;
      await new Promise((r) => setTimeout(r, 100));
    }
  })(), 15000, what);
}

function run(cmd, args) {
  const p = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = ''; p.stderr.on('data', (d) => { err += d; });
  procs.push(p);
  return () => err;
}

/** Opens a Pusher connection from `localAddress` to `port`; resolves with the first frame or the close code. */
function connectFrom(port, localAddress) {
  const ws = new WebSocket(`ws://127.0.0.1:${port}/app/${APP.key}?protocol=7`, { localAddress });
  ws.on('error', () => {});
  return withTimeout(new Promise((resolve) => {
    ws.on('message', (d) => {
      const m = JSON.parse(d.toString());
      if (m.event === 'pusher:connection_established') { resolve({ ok: true, ws }); }
    });
    ws.on('close', (code) => resolve({ ok: false, code }));
  }), 15000, `connection from ${localAddress}`);
}

let haproxyPort, nginxPort;

before(async () => {
  if (skip) return;
  srv = await startServer({
    configToml: `
trusted_proxies = ["127.0.0.1/32"]
proxy_protocol = true
connections_per_ip_per_sec = 0.001
${APP_TOML}`,
  });
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pushmesh-lb-'));
  fs.mkdirSync(path.join(dir, 'logs'));
  [haproxyPort, nginxPort] = [await freePort(), await freePort()];
  const hap = fs.readFileSync(path.join(deploy, 'haproxy.cfg'), 'utf8')
    .replace(/^\s*log stdout.*$/m, '')
    .replace(/maxconn 200000/, 'maxconn 1000')
    .replace(/bind :80/, `bind 127.0.0.1:${haproxyPort}`)
    .replace(/^\s*server node[23] .*$/gm, '')
    .replace(/server node1 \S+/, `server node1 127.0.0.1:${srv.port}`);
  assert.match(hap, /send-proxy-v2/, 'the shipped config sends PROXY v2');
  fs.writeFileSync(path.join(dir, 'haproxy.cfg'), hap);
  const ngx = fs.readFileSync(path.join(deploy, 'nginx.conf'), 'utf8')
    .replace(/worker_processes auto;/, 'worker_processes 1; pid nginx.pid;')
    .replace(/worker_connections 65536/, 'worker_connections 1024')
    .replace(/listen 80;/, `listen 127.0.0.1:${nginxPort};`)
    .replace(/^\s*server 10\.0\.0\.[23]:.*$/gm, '')
    .replace(/server 10\.0\.0\.1:6001/, `server 127.0.0.1:${srv.port}`);
  assert.match(ngx, /X-Forwarded-For \$proxy_add_x_forwarded_for/, 'the shipped config sets X-Forwarded-For');
  fs.writeFileSync(path.join(dir, 'nginx.conf'), ngx);
  run('haproxy', ['-db', '-f', path.join(dir, 'haproxy.cfg')]);
  run('nginx', ['-c', path.join(dir, 'nginx.conf'), '-p', dir, '-e', path.join(dir, 'error.log'), '-g', 'daemon off;']);
  await listening(haproxyPort, 'haproxy');
  await listening(nginxPort, 'nginx');
});

after(async () => {
  for (const p of procs) p.kill('SIGTERM');
  if (srv) await srv.stop();
});

for (const [name, port] of [['HAProxy (PROXY v2)', () => haproxyPort], ['nginx (X-Forwarded-For)', () => nginxPort]]) {
  test(`through ${name} the per-IP limit applies to each client`, { skip }, async () => {
    // Each balancer gets its own client addresses: the limit is per address, not per path.
    const [a, b] = name.startsWith('HAProxy') ? ['127.0.0.2', '127.0.0.3'] : ['127.0.0.4', '127.0.0.5'];
    const first = await connectFrom(port(), a);
    assert.ok(first.ok, `first connection from ${a}: ${first.code}`);
    const other = await connectFrom(port(), b);
    assert.ok(other.ok, `${b} is another client: ${other.code}`);
    const again = await connectFrom(port(), a);
    assert.equal(again.code, 4100, `second connection from ${a} is over its rate`);
    first.ws.close(); other.ws.close();
  });
}
