// An admin through the page: protects a backup (a lock, and no Delete for it), deletes another
// after confirming, unprotects the first; sends a test notification (tests/dashboard.rs checks
// that the webhook received it).
import { env, check, say, until, launch, login, shots, run } from './lib.mjs';

const VM = env.HF_VM;

run(async () => {
  const { page, done } = await launch();
  await login(page, 'admin', env.HF_ADMIN_PASSWORD);
  check(await page.locator('nav a[data-nav="notifications"]').isVisible(), 'an admin has the Notifications page');
  await page.goto(env.HF_URL + '/#/vms/' + VM);
  await page.waitForSelector('tr[data-backup]');
  const ids = await page.locator('tr[data-backup]').evaluateAll((rs) => rs.map((r) => r.dataset.backup));
  check(ids.length === 2, 'two backups: ' + ids);
  const [newer, older] = ids; // newest first

  // Protect the older one: it shows a lock and has no Delete.
  await page.click('[aria-label="Protect backup ' + older + '"]');
  await page.waitForSelector('tr[data-backup="' + older + '"] .lock');
  check((await page.locator('[aria-label="Delete backup ' + older + '"]').count()) === 0, 'a protected backup cannot be deleted');
  await shots(page, 'backups-admin');

  // Delete the newer one, after a confirmation that says it cannot be undone.
  await page.click('[aria-label="Delete backup ' + newer + '"]');
  check((await page.textContent('#dialog')).includes('cannot be undone'), 'the delete dialog warns');
  await page.click('#dialog button.danger:has-text("Delete")');
  await until(async () => (await page.locator('tr[data-backup="' + newer + '"]').count()) === 0, 'the deleted backup to go');
  check((await page.locator('tr[data-backup]').count()) === 1, 'one backup is left');

  // Unprotect: Delete is offered again.
  await page.click('[aria-label="Unprotect backup ' + older + '"]');
  await page.waitForSelector('[aria-label="Delete backup ' + older + '"]');
  say('backups', { deleted: newer, kept: older });

  // Notifications: the target and its matchers, and a test event.
  await page.click('nav a[data-nav="notifications"]');
  const row = page.locator('tr[data-target="hook"]');
  await row.waitFor();
  check((await row.textContent()).includes('backup, restore'), 'the matchers are shown: ' + await row.textContent());
  await page.click('[aria-label="Send a test to hook"]');
  const text = await until(async () => {
    const t = await page.locator('#toast div').allTextContents();
    return t.find((x) => x.includes('queued for hook'));
  }, 'the test to be queued');
  const event = text.match(/Test event (\S+) queued/)[1];
  await shots(page, 'notifications');
  say('test-sent', { event });
  await done();
});
