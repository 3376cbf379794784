#!/usr/bin/env node
// Apps at runtime at scale (issue #19): one release node with APPS admin
// apps (memory per app, create latency, connect-time lookup against a node
// with one app, restart time), then NODES release nodes on loopback (the
// time from a change's 201 on one node until every node serves it).
//
//   node scripts/bench-apps.mjs [APPS=10000] [NODES=10] [CHANGES=20]
//   (release build: cargo build --release -p pushmesh-server)
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(path.join(root, 'crates/pushmesh-server/tests/conformance/package.json'));
const WebSocket = require('ws');
const BIN = process.env.PUSHMESH_BIN || path.join(root, 'target/release/pushmesh');
const [APPS, NODES, CHANGES] = [Number(process.argv[2] || 10000), Number(process.argv[3] || 10), Number(process.argv[4] || 20)];
const TOKEN = 'bench-apps-admin-token-0123456789';
const procs = [];
const dirs = [];
process.on('exit', () => {
  for (const p of procs) try { p.kill('SIGKILL'); } catch { /* gone */ }
  if (!process.env.KEEP) for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const pct = (xs, p) => { const s = [...xs].sort((a, b) => a - b); return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))]; };
const ms = (x) => `${x.toFixed(2)} ms`;
const rssKiB = (pid) => Number(fs.readFileSync(`/proc/${pid}/status`, 'utf8').match(/VmRSS:\s+(\d+)/)[1]);

function start(args, dir) {
  const child = spawn(BIN, args, { env: { ...process.env, PUSHMESH_ADMIN_TOKEN: TOKEN, RUST_LOG: 'warn' }, stdio: ['ignore', 'pipe', 'pipe'] });
  procs.push(child);
  let err = '';
  child.stderr.on('data', (d) => { err += d; });
  return new Promise((resolve, reject) => {
    let out = '';
    const t0 = performance.now();
    child.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on [\d.]+:(\d+)/);
      if (m) resolve({ child, port: Number(m[1]), startMs: performance.now() - t0, dir });
    });
    child.on('exit', (c) => reject(new Error(`exited ${c}: ${err}`)));
  });
}

async function api(port, method, p, body) {
  const r = await fetch(`http://127.0.0.1:${port}${p}`, {
    method, headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: r.status, body: r.status === 204 ? null : await r.json() };
}

/** Opens one connection to `key` and resolves with the ms to connection_established. */
function connectOnce(port, key) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const ws = new WebSocket(`ws://127.0.0.1:${port}/app/${key}?protocol=7&client=bench&version=1`);
    ws.on('message', (d) => {
      if (String(d).includes('connection_established')) { const t = performance.now() - t0; ws.close(); resolve(t); }
    });
    ws.on('error', reject);
    ws.on('close', (code) => reject(new Error(`closed ${code} before connection_established`)));
  });
}

async function connectMany(port, keys, n) {
  const times = [];
  for (let k = 0; k < n; k++) times.push(await connectOnce(port, keys[k % keys.length]));
  return times;
}

async function pool(n, conc, f) {
  let next = 0;
  await Promise.all(Array.from({ length: conc }, async () => { while (next < n) await f(next++); }));
}

const say = (m) => { if (process.env.DEBUG) console.error(new Date().toISOString(), m); };
async function singleNode() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bench-apps-'));
  dirs.push(dir);
  const conf = path.join(dir, 'pushmesh.toml');
  fs.writeFileSync(conf, `listen = "127.0.0.1:0"\ndata_dir = "${dir}"\nconnections_per_ip_per_sec = 0\n[[apps]]\nid = "base"\nkey = "base-key"\nsecret = "base-secret"\n`);
  const n = await start(['--config', conf], dir);
  await sleep(500);
  say('started'); const connect1 = await connectMany(n.port, ['base-key'], 500); say('connected'); let done = 0;
  const rss0 = rssKiB(n.child.pid);
  const lat = [];
  const t0 = performance.now();
  await pool(APPS, 16, async (k) => {
    const a = performance.now();
    const r = await api(n.port, 'POST', '/admin/apps', { id: `app-${k}`, key: `key-${k}`, client_events: k % 2 === 0 });
    if (r.status !== 201) throw new Error(`create ${k}: ${r.status} ${JSON.stringify(r.body)}`);
    lat.push(performance.now() - a);
    if (++done % 1000 === 0) say(`${done} created`);
  });
  const total = performance.now() - t0;
  await sleep(1000);
  const rss1 = rssKiB(n.child.pid);
  const keys = Array.from({ length: APPS }, (_, k) => `key-${(k * 7919) % APPS}`);
  const connectN = await connectMany(n.port, keys, 500);
  const list0 = performance.now();
  const list = await api(n.port, 'GET', '/admin/apps');
  const listMs = performance.now() - list0;
  const storeBytes = ['apps.json', 'apps.log'].reduce((s, f) => s + (fs.existsSync(path.join(dir, f)) ? fs.statSync(path.join(dir, f)).size : 0), 0);
  n.child.kill('SIGTERM');
  await new Promise((r) => n.child.on('exit', r));
  const again = await start(['--config', conf], dir);
  const served = (await api(again.port, 'GET', '/admin/apps')).body.apps.length;
  again.child.kill('SIGTERM');
  console.log(`single node, ${APPS} admin apps`);
  console.log(`  create          ${(APPS / (total / 1000)).toFixed(0)} apps/s (16 at a time); latency p50 ${ms(pct(lat, 50))}, p99 ${ms(pct(lat, 99))}, max ${ms(pct(lat, 100))}`);
  console.log(`  RSS             ${(rss0 / 1024).toFixed(1)} MiB with 1 app -> ${(rss1 / 1024).toFixed(1)} MiB: ${(((rss1 - rss0) * 1024) / APPS).toFixed(0)} B per app`);
  console.log(`  store on disk   ${(storeBytes / 1024).toFixed(0)} KiB (${(storeBytes / APPS).toFixed(0)} B per app)`);
  console.log(`  connect         1 app: p50 ${ms(pct(connect1, 50))} p99 ${ms(pct(connect1, 99))}; ${APPS + 1} apps (keys spread): p50 ${ms(pct(connectN, 50))} p99 ${ms(pct(connectN, 99))}`);
  console.log(`  GET /admin/apps ${ms(listMs)} (${list.body.apps.length} apps)`);
  console.log(`  restart         listening after ${ms(again.startMs)} with ${served} apps served`);
}

async function cluster() {
  const base = 16000 + (process.pid % 1000) * 20;
  const seeds = [0, 1, 2].map((i) => `"127.0.0.1:${base + 100 + i * 2}"`).join(', ');
  const nodes = [];
  for (let i = 0; i < NODES; i++) {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), `bench-apps-n${i}-`));
    dirs.push(dir);
    const conf = path.join(dir, 'pushmesh.toml');
    fs.writeFileSync(conf, `listen = "127.0.0.1:${base + i}"\ndata_dir = "${dir}"\n[cluster]\nnode_id = "b${i}"\n`
      + `gossip_listen = "127.0.0.1:${base + 100 + i * 2}"\ncluster_listen = "127.0.0.1:${base + 101 + i * 2}"\n`
      + `seeds = [${seeds}]\nsecret = "bench-apps-cluster-secret-0123456789"\ngossip_interval_ms = 200\n`
      + `[[apps]]\nid = "base"\nkey = "base-key"\nsecret = "base-secret"\n`);
    nodes.push(await start(['--config', conf], dir));
  }
  // Every node ready and linked to every other.
  const deadline = Date.now() + 120000;
  for (const n of nodes) {
    for (;;) {
      const c = await (await fetch(`http://127.0.0.1:${n.port}/cluster`)).json();
      if (c.state === 'ready' && c.peers.filter((p) => p.link).length === NODES - 1) break;
      if (Date.now() > deadline) throw new Error(`node ${n.port} not meshed: ${JSON.stringify(c.peers.map((p) => [p.node, p.link]))}`);
      await sleep(100);
    }
  }
  const reach = [];
  for (let k = 0; k < CHANGES; k++) {
    const via = nodes[k % NODES];
    const id = `reach-${k}`;
    const r = await api(via.port, 'POST', '/admin/apps', { id, key: `${id}-key` });
    if (r.status !== 201) throw new Error(`create: ${r.status}`);
    const t0 = performance.now();
    const at = await Promise.all(nodes.map(async (n) => {
      for (;;) {
        if ((await api(n.port, 'GET', `/admin/apps/${id}`)).status === 200) return performance.now() - t0;
        if (performance.now() - t0 > 10000) throw new Error(`${id} never reached ${n.port}`);
      }
    }));
    reach.push(Math.max(...at));
  }
  console.log(`${NODES} nodes on loopback, ${CHANGES} creates through each node in turn`);
  console.log(`  201 -> served by all ${NODES}: p50 ${ms(pct(reach, 50))}, p99 ${ms(pct(reach, 99))}, max ${ms(pct(reach, 100))}`);
  for (const n of nodes) n.child.kill('SIGTERM');
}

if (!process.env.ONLY || process.env.ONLY === 'single') await singleNode();
if (!process.env.ONLY || process.env.ONLY === 'cluster') await cluster();
process.exit(0);
