// The status page in a real headless Chromium (Debian's chromium), driven by Playwright.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import { startServer, serverSdk, client, subscribed, until, closeAll, APP, APP_TOML } from './helpers.mjs';

const require = createRequire(import.meta.url);
const { chromium } = require('playwright-core');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const ARTIFACTS = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../../test-artifacts');

const servers = [];
let browser;
after(async () => {
  closeAll();
  if (browser) await browser.close();
  for (const s of servers) await s.stop().catch(() => {});
});

test('the status page is off by default and needs its token', async () => {
  const off = await startServer();
  servers.push(off);
  assert.equal((await fetch(`http://127.0.0.1:${off.port}/dashboard`)).status, 404);
  const on = await startServer({ configToml: `dashboard_token = "t0ken"\n${APP_TOML}` });
  servers.push(on);
  assert.equal((await fetch(`http://127.0.0.1:${on.port}/dashboard`)).status, 401);
  assert.equal((await fetch(`http://127.0.0.1:${on.port}/dashboard?token=nope`)).status, 401);
  assert.equal((await fetch(`http://127.0.0.1:${on.port}/dashboard/api/stats?token=nope`)).status, 401);
  assert.equal((await fetch(`http://127.0.0.1:${on.port}/dashboard?token=t0ken`)).status, 200);
});

test('renders live numbers in Chromium and the debug console shows a published event', async () => {
  assert.ok(fs.existsSync(CHROMIUM), `chromium not found at ${CHROMIUM}`);
  const srv = await startServer({ configToml: `dashboard_token = "t0ken"\n${APP_TOML}client_events = true\n` });
  servers.push(srv);
  const c = client(srv.port, { authUrl: 'http://127.0.0.1:9' });
  await subscribed(c.subscribe('watched'));
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = await browser.newPage({ viewport: { width: 1200, height: 800 } });
  await page.goto(`http://127.0.0.1:${srv.port}/dashboard?token=t0ken`);
  // Live numbers: the pusher-js client above is one connection.
  await page.waitForFunction(() => Number(document.getElementById('connections').textContent) >= 1, null, { timeout: 15000 });
  assert.match(await page.textContent('#channels'), /public: 1 channels, 1 subscriptions/);
  await page.fill('#channel', 'private-debugged');
  await page.click('#listen');
  await page.waitForFunction(() => document.getElementById('status').textContent.includes('listening'), null, { timeout: 15000 });
  const sdk = serverSdk(srv.port);
  await sdk.trigger('private-debugged', 'order-shipped', { id: 42 });
  await page.waitForFunction(() => document.getElementById('log').textContent.includes('order-shipped'), null, { timeout: 15000 });
  assert.match(await page.textContent('#log'), /private-debugged order-shipped \{"id":42\}/);
  // The rate chart moves: publish more and wait for a non-zero rate.
  for (let k = 0; k < 5; k++) await sdk.trigger('watched', 'tick', { k });
  await page.waitForFunction(() => Number(document.getElementById('pubrate').textContent) > 0, null, { timeout: 15000 });
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const shot = path.join(ARTIFACTS, 'dashboard.png');
  await page.screenshot({ path: shot, fullPage: true });
  assert.ok(fs.statSync(shot).size > 10000, 'screenshot saved');
});
