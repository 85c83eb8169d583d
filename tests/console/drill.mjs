// The stuck-saga drill in a real browser (headless Chromium from Debian's package, driven by
// playwright-core): sign in as admin, find the stuck saga in the console, clear the simulator's
// fault, re-drive the saga with a reason, see it finish and the audit entry it wrote.
// Started by tests/api/console.rs, which sets up the service, the simulators and the stuck saga.
//
// Environment: CONSOLE_BASE (http://127.0.0.1:port), ADMIN_EMAIL, ADMIN_PASSWORD, CATALOG_URL,
// SAGA_ID (the saga the Rust side made stuck), CHROMIUM_PATH (default /usr/bin/chromium),
// CONSOLE_SCREENSHOT_DIR (optional: where the three main pages are saved as PNG).
import { chromium } from 'playwright-core';
import assert from 'node:assert/strict';
import path from 'node:path';

const env = (k, d) => {
  const v = process.env[k] ?? d;
  if (v === undefined) throw new Error(`${k} is not set`);
  return v;
};
const base = env('CONSOLE_BASE');
const sagaId = env('SAGA_ID');
const shots = process.env.CONSOLE_SCREENSHOT_DIR;
const step = (m) => console.log(`drill: ${m}`);

let page;
const browser = await chromium.launch({
  executablePath: env('CHROMIUM_PATH', '/usr/bin/chromium'),
  headless: true,
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
try {
  const context = await browser.newContext({ viewport: { width: 1366, height: 900 } });
  page = await context.newPage();
  const cspViolations = [];
  page.on('console', (m) => {
    if (/Content Security Policy/i.test(m.text())) cspViolations.push(m.text());
  });
  const shot = async (name) => {
    if (shots) await page.screenshot({ path: path.join(shots, name), fullPage: true });
  };

  step('a console page without a session leads to the sign-in form');
  await page.goto(`${base}/console/sagas`);
  assert.match(page.url(), /\/console\/login$/);

  step('sign in as admin (keyboard only)');
  await page.keyboard.press('Tab');
  await page.getByLabel('Email').fill(env('ADMIN_EMAIL'));
  await page.getByLabel('Password').fill(env('ADMIN_PASSWORD'));
  await page.getByLabel('Password').press('Enter');
  await page.waitForURL(/\/console\/sagas$/);
  assert.equal(await page.locator('h1').innerText(), 'Sagas');

  step('the list puts the stuck saga first and counts it');
  const stuckCount = page.locator('ul.counts li').filter({ hasText: 'stuck' }).locator('strong');
  assert.equal(await stuckCount.innerText(), '1');
  const firstRow = page.locator('table.list tbody tr').first();
  assert.equal(await firstRow.locator('td').first().innerText(), sagaId);
  assert.equal(await firstRow.locator('.badge').innerText(), 'stuck');

  step('filter by state and error class');
  await page.locator('form.filters select[name="state"]').selectOption('stuck');
  await page.locator('form.filters input[name="step"]').fill('release_reservation');
  await page.locator('form.filters').getByRole('button', { name: 'Filter' }).click();
  await page.waitForURL(/state=stuck/);
  const rows = page.locator('table.list tbody tr');
  assert.equal(await rows.count(), 1);
  await shot('console-sagas.png');

  step('open the stuck saga: timeline, order, outbox events, audit');
  await page.getByRole('link', { name: sagaId }).click();
  await page.waitForURL(new RegExp(`/console/sagas/${sagaId}$`));
  const timeline = page.locator('table.timeline');
  assert.ok((await timeline.locator('tbody tr').count()) >= 3, 'every attempt is listed');
  const failedRelease = timeline.locator('tbody tr', { hasText: 'release_reservation' }).first();
  assert.match(await failedRelease.innerText(), /503/);
  assert.match(await page.locator('h2:has-text("Order") + table').innerText(), /orderID/);
  assert.match(await page.locator('h2:has-text("Outbox events") + table').innerText(), /OrderCreated|Order/);

  step('the fault is cleared (the catalog releases again)');
  const cleared = await fetch(`${env('CATALOG_URL')}/sim/faults`, { method: 'DELETE' });
  assert.ok(cleared.ok, `DELETE /sim/faults answered ${cleared.status}`);

  step('a re-drive without a reason is refused by the form');
  const retryForm = page.locator(`form[action="/console/sagas/${sagaId}/retry"]`);
  await retryForm.getByRole('button').click();
  assert.match(page.url(), new RegExp(`/console/sagas/${sagaId}$`), 'still on the page: the reason is required');

  step('re-drive with a reason; the page shows the audit entry it wrote');
  const reason = 'catalog release endpoint back after the outage (drill)';
  await retryForm.locator('textarea[name="reason"]').fill(reason);
  await retryForm.getByRole('button').click();
  await page.waitForURL(/\?audit=\d+#written$/);
  const written = page.locator('tr#written');
  assert.match(await written.innerText(), /saga\.retry/);
  assert.match(await written.innerText(), new RegExp(reason.replace(/[()]/g, '\\$&')));

  step('the saga finishes its compensation');
  let state = '';
  for (let i = 0; i < 60; i++) {
    await page.reload();
    state = await page.locator('main p .badge').first().innerText();
    if (['failed', 'compensated', 'completed'].includes(state)) break;
    await page.waitForTimeout(500);
  }
  assert.equal(state, 'failed', 'the refused order ends compensated (state failed)');
  assert.match(await page.locator('main').innerText(), /nothing can change it any more/);
  const releases = page.locator('table.timeline tbody tr', { hasText: 'release_reservation' });
  assert.match(await releases.last().innerText(), /succeeded/);
  await shot('console-saga.png');

  step('a saga waiting ten minutes on the shipper\'s Retry-After: find it among the running ones');
  const waitingId = env('WAITING_SAGA_ID');
  await page.getByRole('link', { name: 'Sagas', exact: true }).click();
  await page.locator('form.filters select[name="state"]').selectOption('running');
  await page.locator('form.filters input[name="errorClass"]').fill('http_5xx');
  await page.locator('form.filters').getByRole('button', { name: 'Filter' }).click();
  await page.waitForURL(/state=running/);
  await page.getByRole('link', { name: waitingId }).click();
  await page.waitForURL(new RegExp(`/console/sagas/${waitingId}$`));
  assert.match(await page.locator('table.timeline').innerText(), /retry_scheduled/);

  step('the shipper is back; run its next attempt now and see it completed');
  const shipperCleared = await fetch(`${env('SHIPMENTS_URL')}/sim/faults`, { method: 'DELETE' });
  assert.ok(shipperCleared.ok, `DELETE /sim/faults answered ${shipperCleared.status}`);
  const runNow = page.locator(`form[action="/console/sagas/${waitingId}/retry"]`);
  assert.equal(await runNow.getByRole('button').innerText(), 'Run the next attempt now');
  await runNow.locator('textarea[name="reason"]').fill('shipper back; no need to wait ten minutes (drill)');
  await runNow.getByRole('button').click();
  await page.waitForURL(/\?audit=\d+#written$/);
  assert.match(await page.locator('tr#written').innerText(), /saga\.retry/);
  let waitingState = '';
  for (let i = 0; i < 60; i++) {
    await page.reload();
    waitingState = await page.locator('main p .badge').first().innerText();
    if (['failed', 'compensated', 'completed'].includes(waitingState)) break;
    await page.waitForTimeout(500);
  }
  assert.equal(waitingState, 'completed');
  assert.match(await page.locator('table.audit').innerText(), /shipper back; no need to wait ten minutes/);

  step('the audit page lists the re-drives with their reasons');
  await page.getByRole('link', { name: 'Audit' }).click();
  await page.waitForURL(/\/console\/audit$/);
  assert.match(await page.locator('table.audit tbody tr').first().innerText(), /saga\.retry/);

  step('outbox, dead letters and lag');
  await page.getByRole('link', { name: 'Outbox, dead letters, lag' }).click();
  await page.waitForURL(/\/console\/pipeline$/);
  assert.match(await page.locator('main').innerText(), /pending/);
  assert.match(await page.locator('main').innerText(), /Group ostore-orders-tracking on shipments\.tracking-events: \d+ record\(s\) behind/, 'the lag is read from the broker');
  const dead = page.locator('h2:has-text("Tracking dead letters") ~ table').first().locator('tbody tr').first();
  assert.match(await dead.locator('pre.payload').innerText(), /<script>alert\(1\)<\/script>/, 'a hostile payload is shown as text');
  await shot('console-pipeline.png');

  step('a replay of a dead letter that still cannot be applied is refused with the reason');
  await dead.getByRole('button', { name: 'Replay' }).click();
  await page.waitForLoadState();
  assert.match(await page.locator('main').innerText(), /still cannot be applied/);

  assert.deepEqual(cspViolations, [], 'no Content-Security-Policy violation');
  step('done');
} catch (e) {
  // What the browser showed when it failed.
  if (page) {
    console.error(`drill: failed at ${page.url()}`);
    console.error(await page.locator('body').innerText().catch(() => '(no page)'));
  }
  throw e;
} finally {
  await browser.close();
}
