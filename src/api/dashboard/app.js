// The holdfast dashboard. Plain JavaScript, no build step: it speaks only the public API under
// /api/v1 with the session cookie of POST /login and its CSRF token (GET /whoami returns it
// again after a reload). Every piece of data is put into the page as text (textContent,
// attributes), never as HTML. Live progress comes from the tasks' server-sent events; lists
// are re-read every few seconds and redrawn only when they changed (so focus stays put).
'use strict';

(() => {
  const API = '/api/v1';
  const POLL_MS = 4000;
  let me = null; // GET /whoami: name, user, role, csrf, restore_dirs
  let view = { timers: [], sources: [] }; // what the current page runs; stopped on leaving it

  // ---- small helpers ------------------------------------------------------------------

  function h(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
      else if (k === 'class') e.className = v;
      else if (k === 'text') e.textContent = v;
      else if (k === 'value') e.value = v;
      else e.setAttribute(k, v === true ? '' : v);
    }
    for (const kid of kids.flat(Infinity)) {
      if (kid === null || kid === undefined || kid === false) continue;
      e.append(kid instanceof Node ? kid : String(kid));
    }
    return e;
  }

  const ICONS = {
    restore: 'M12 5V2L7 6l5 4V7a5 5 0 1 1-5 5H5a7 7 0 1 0 7-7z',
    trash: 'M9 3h6l1 2h4v2H4V5h4zM6 8h12l-1 13H7z',
    lock: 'M7 10V8a5 5 0 0 1 10 0v2h1v11H6V10zm2 0h6V8a3 3 0 0 0-6 0z',
    unlock: 'M7 10V8a5 5 0 0 1 9.6-2l-1.8.9A3 3 0 0 0 9 8v2h9v11H6V10z',
    pencil: 'M4 17.2V20h2.8L17 9.8 14.2 7zM19.7 7.1a1 1 0 0 0 0-1.4l-1.4-1.4a1 1 0 0 0-1.4 0L15.6 5.6 18.4 8.4z',
    stop: 'M6 6h12v12H6z',
  };

  function icon(name) {
    const ns = 'http://www.w3.org/2000/svg';
    const svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('viewBox', '0 0 24 24');
    svg.setAttribute('aria-hidden', 'true');
    svg.setAttribute('focusable', 'false');
    const p = document.createElementNS(ns, 'path');
    p.setAttribute('d', ICONS[name]);
    p.setAttribute('fill', 'currentColor');
    svg.append(p);
    return svg;
  }

  function iconButton(name, label, onclick, cls) {
    return h('button', { type: 'button', class: 'icon ' + (cls || ''), 'aria-label': label, title: label, onclick }, icon(name));
  }

  const enc = encodeURIComponent;
  const role = () => (me ? me.role : 'viewer');
  const canOperate = () => role() === 'operator' || role() === 'admin';
  const isAdmin = () => role() === 'admin';

  function fmtBytes(n) {
    if (n === null || n === undefined) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
    let i = 0;
    let v = n;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 ? String(v) : v.toFixed(v < 10 ? 2 : 1)) + ' ' + units[i];
  }

  function fmtDuration(ms) {
    const s = Math.max(0, Math.round(ms / 1000));
    if (s < 60) return s + ' s';
    const m = Math.floor(s / 60);
    if (m < 60) return m + ' min ' + (s % 60) + ' s';
    const hr = Math.floor(m / 60);
    if (hr < 48) return hr + ' h ' + (m % 60) + ' min';
    return Math.floor(hr / 24) + ' d ' + (hr % 24) + ' h';
  }

  function fmtAge(ms) {
    return fmtDuration(Date.now() - ms).replace(/ \d+ (s|min|h)$/, '') + ' ago';
  }

  function utc(ms) {
    return new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
  }

  // A time in the browser's zone, UTC on hover.
  function timeEl(ms) {
    const local = new Date(ms).toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' });
    return h('time', { datetime: new Date(ms).toISOString(), title: utc(ms) }, local);
  }

  const BUSY = {
    backup: 'Creating Backup',
    restore: 'Restoring Backup',
    'restore-files': 'Restoring Files',
    'snapshot-create': 'Taking Snapshot',
    'snapshot-revert': 'Reverting Snapshot',
    'snapshot-rename': 'Renaming Snapshot',
    'snapshot-clone': 'Cloning Snapshot',
    'snapshot-delete': 'Deleting Snapshot',
    'snapshot-expire': 'Expiring Snapshot',
    verify: 'Verifying Backups',
    export: 'Serving a Backup',
    mount: 'Mounted',
    forget: 'Deleting Backup',
    prune: 'Pruning Backups',
    gc: 'Freeing Space',
  };
  const busyLabel = (kind) => BUSY[kind] || kind;
  const busyColour = (kind) => (kind === 'backup' || kind === 'snapshot-create' ? 'amber' : 'blue');
  const running = (t) => t.state === 'running' || t.state === 'queued';
  // Serving a backup (export, mount) runs on without holding the VM.
  const holds = (t) => t.kind !== 'export' && t.kind !== 'mount';
  const pct = (p) => (p === null || p === undefined ? '' : Math.floor(p) + ' %');

  function toast(text, bad) {
    const box = document.getElementById('toast');
    const t = h('div', { class: bad ? 'bad' : '' }, text);
    box.append(t);
    setTimeout(() => t.remove(), bad ? 9000 : 5000);
  }

  // ---- the API ------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const headers = { Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    if (method !== 'GET' && me && me.csrf) headers['X-CSRF-Token'] = me.csrf;
    const r = await fetch(API + path, {
      method,
      headers,
      credentials: 'same-origin',
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await r.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
    if (!r.ok) {
      const e = (data && data.error) || {};
      if (r.status === 401 && path !== '/login') {
        const had = me;
        me = null;
        showLogin(had ? 'Your session ended: sign in again.' : '');
      }
      throw new ApiError(r.status, e.code || 'http-' + r.status, e.message || r.statusText);
    }
    return data;
  }

  // Report a failed call (a 401 already brought the sign-in page up).
  function failed(e) {
    if (e instanceof ApiError && e.status === 401) return;
    toast(e.message + (e.code ? ' (' + e.code + ')' : ''), true);
  }

  // Follow a task's live events; `on(data, ended)` gets each progress and the end.
  function follow(id, on, onLog) {
    if (view.sources.some((s) => s.id === id)) return;
    const es = new EventSource(API + '/tasks/' + enc(id) + '/events');
    const entry = { id, es };
    view.sources.push(entry);
    es.addEventListener('progress', (e) => on(JSON.parse(e.data), false));
    if (onLog) es.addEventListener('log', (e) => onLog(JSON.parse(e.data), Number(e.lastEventId)));
    es.addEventListener('end', (e) => {
      es.close();
      view.sources = view.sources.filter((s) => s !== entry);
      on(JSON.parse(e.data), true);
    });
    es.onerror = () => {
      // EventSource reconnects by itself (with Last-Event-ID); a closed one is dropped and
      // the page's polling notices the task's end.
      if (es.readyState === EventSource.CLOSED) view.sources = view.sources.filter((s) => s !== entry);
    };
  }

  function every(ms, f) {
    view.timers.push(setInterval(f, ms));
  }

  function leave() {
    view.timers.forEach(clearInterval);
    view.sources.forEach((s) => s.es.close());
    view = { timers: [], sources: [] };
  }

  // ---- dialogs ------------------------------------------------------------------------

  // A modal dialog; `build(close)` returns its body. Resolves when it closes.
  function dialog(title, body, buttons) {
    const d = document.getElementById('dialog');
    d.replaceChildren(h('h2', { id: 'dialog-title' }, title), body, h('div', { class: 'buttons' }, buttons));
    if (!d.open) d.showModal();
    const first = d.querySelector('input, select, textarea, button.primary, button.danger');
    if (first) first.focus();
    return d;
  }

  function closeDialog() {
    const d = document.getElementById('dialog');
    if (d.open) d.close();
  }

  // Ask before doing something; `run` is called on confirmation and may throw (shown in it).
  function confirmAction({ title, text, warning, action, danger, run, extra }) {
    const err = h('p', { class: 'error-text', role: 'alert' });
    const go = h('button', { type: 'button', class: danger ? 'danger' : 'primary' }, action);
    const body = h('div', {}, text ? h('p', {}, text) : null, warning ? h('p', { class: 'warning' }, warning) : null, extra || null, err);
    go.addEventListener('click', async () => {
      go.disabled = true;
      try {
        await run();
        closeDialog();
      } catch (e) {
        err.textContent = e.message;
        go.disabled = false;
        if (e instanceof ApiError && e.status === 401) closeDialog();
      }
    });
    dialog(title, body, [h('button', { type: 'button', onclick: closeDialog }, 'Cancel'), go]);
  }

  // The snapshot name rule, checked as the user types.
  const SNAPSHOT_NAME = /^[A-Za-z0-9_-]{1,64}$/;
  function nameField(id, label, initial) {
    const input = h('input', { type: 'text', id, name: id, value: initial || '', autocomplete: 'off', maxlength: '64', 'aria-describedby': id + '-hint ' + id + '-err', required: true });
    const hint = h('p', { class: 'hint', id: id + '-hint' }, 'Letters, digits, - and _ only: PreUpdate, not Pre Update.');
    const err = h('p', { class: 'error-text', id: id + '-err', 'aria-live': 'polite' });
    const check = () => {
      const v = input.value;
      let msg = '';
      if (v.length === 0) msg = 'Give the snapshot a name.';
      else if (/\s/.test(v)) msg = 'No spaces: write PreUpdate, not Pre Update.';
      else if (!SNAPSHOT_NAME.test(v)) msg = 'Only letters, digits, - and _ (at most 64).';
      err.textContent = msg;
      input.setAttribute('aria-invalid', msg ? 'true' : 'false');
      return !msg;
    };
    input.addEventListener('input', check);
    return { el: h('div', {}, h('label', { for: id }, label), input, hint, err), input, check };
  }

  // ---- sign in ------------------------------------------------------------------------

  function showLogin(message) {
    leave();
    closeDialog();
    document.getElementById('bar').hidden = true;
    const user = h('input', { type: 'text', id: 'login-user', name: 'user', autocomplete: 'username', required: true });
    const pass = h('input', { type: 'password', id: 'login-password', name: 'password', autocomplete: 'current-password', required: true });
    const err = h('p', { class: 'error-text', role: 'alert' }, message || '');
    const form = h('form', { class: 'card login', 'aria-labelledby': 'login-title' },
      h('h1', { id: 'login-title' }, 'Sign in to holdfast'),
      h('label', { for: 'login-user' }, 'User name'), user,
      h('label', { for: 'login-password' }, 'Password'), pass,
      err,
      h('div', { class: 'buttons' }, h('button', { type: 'submit', class: 'primary' }, 'Sign in')));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      err.textContent = '';
      try {
        await api('POST', '/login', { user: user.value, password: pass.value });
        me = await api('GET', '/whoami');
        if (!location.hash || location.hash === '#/login') location.hash = '#/vms'; // routes
        else route();
      } catch (e) {
        err.textContent = e.status === 401 ? 'Wrong user name or password.' : e.message;
        pass.value = '';
        pass.focus();
      }
    });
    document.getElementById('main').replaceChildren(form);
    user.focus();
  }

  async function signOut() {
    try { await api('POST', '/logout'); } catch (_) { /* the session is gone either way */ }
    me = null;
    showLogin('Signed out.');
  }

  // ---- pages --------------------------------------------------------------------------

  function page(title, ...kids) {
    const main = document.getElementById('main');
    main.replaceChildren(h('h1', {}, title), ...kids);
    document.title = title + ' · holdfast';
  }

  function statusCell(t, declared) {
    if (t) {
      return h('span', { class: 'status' }, h('span', { class: 'dot ' + busyColour(t.kind) }),
        (t.state === 'queued' ? 'Queued: ' : '') + busyLabel(t.kind) + (t.percent !== undefined ? ' ' + pct(t.percent) : ''));
    }
    return h('span', { class: 'status' }, h('span', { class: 'dot ' + (declared ? '' : 'grey') }), declared ? 'Idle' : 'Backups only');
  }

  function slotsText(s) {
    return s.total === null || s.total === undefined ? String(s.used) : s.used + ' / ' + s.total;
  }

  // The VM list: status, last good backup, slots, stored size and cost, with a filter.
  async function vmList() {
    const filter = h('input', { type: 'search', id: 'vm-filter', placeholder: 'Filter by name', 'aria-label': 'Filter VMs by name' });
    const body = h('tbody');
    const count = h('p', { class: 'muted', 'aria-live': 'polite' });
    const table = h('table', { 'aria-label': 'VMs' },
      h('thead', {}, h('tr', {}, ['Name', 'Status', 'Last good backup', 'Slots', 'Stored', 'Cost / month'].map((c) => h('th', { scope: 'col' }, c)))),
      body);
    page('VMs', h('div', { class: 'filter' }, filter), h('div', { class: 'card' }, table, count));
    let vms = [];
    let last = '';
    const draw = () => {
      const q = filter.value.trim().toLowerCase();
      const shown = vms.filter((v) => v.name.toLowerCase().includes(q));
      body.replaceChildren(...shown.map((v) => h('tr', { 'data-vm': v.name },
        h('td', { 'data-label': 'Name' }, h('a', { href: '#/vms/' + enc(v.name) }, v.name)),
        h('td', { 'data-label': 'Status' }, statusCell(v.running_task, v.declared)),
        h('td', { 'data-label': 'Last good backup' }, v.last_backup
          ? h('span', {}, timeEl(Date.parse(v.last_backup.time)), h('span', { class: 'muted' }, ' (' + fmtAge(Date.parse(v.last_backup.time)) + ')'))
          : h('span', { class: 'muted' }, 'none yet')),
        h('td', { 'data-label': 'Slots', class: 'slots' }, slotsText(v.slots)),
        h('td', { 'data-label': 'Stored' }, fmtBytes(v.stored_bytes)),
        h('td', { 'data-label': 'Cost / month' }, v.cost_per_month.toFixed(2)))));
      count.textContent = vms.length === 0
        ? (isAdmin() ? 'No VMs yet: declare one with `holdfast vm add` or POST /api/v1/vms.' : 'No VM is assigned to you yet: ask the administrator.')
        : shown.length + ' of ' + vms.length + ' VMs';
    };
    filter.addEventListener('input', draw);
    const load = async () => {
      try {
        vms = await api('GET', '/vms');
        const now = JSON.stringify(vms);
        if (now !== last) { last = now; draw(); }
      } catch (e) { failed(e); }
    };
    await load();
    every(POLL_MS, load);
  }

  // A VM: its Backups card or its Snapshots tab.
  async function vmPage(name, tab) {
    const status = h('span', { class: 'status', id: 'vm-status' });
    const tabs = h('div', { class: 'tabs', role: 'tablist', 'aria-label': 'VM sections' },
      h('a', { role: 'tab', id: 'tab-backups', href: '#/vms/' + enc(name), 'aria-selected': tab === 'backups' ? 'true' : 'false' }, 'Backups'),
      h('a', { role: 'tab', id: 'tab-snapshots', href: '#/vms/' + enc(name) + '/snapshots', 'aria-selected': tab === 'snapshots' ? 'true' : 'false' }, 'Snapshots'));
    const panel = h('section', { role: 'tabpanel', 'aria-labelledby': 'tab-' + tab });
    page(name, h('p', {}, h('a', { href: '#/vms' }, '← All VMs'), ' · ', status), tabs, panel);
    const ctx = { name, status, panel, vm: null };
    if (tab === 'snapshots') await snapshotsTab(ctx);
    else await backupsTab(ctx);
  }

  // The tasks of a VM started in the last 7 days, newest first.
  async function vmTasks(name) {
    const since = Date.now() - 7 * 86400 * 1000;
    const ts = await api('GET', '/tasks?vm=' + enc(name) + '&since=' + since);
    return ts.sort((a, b) => b.started_ms - a.started_ms);
  }

  // A running operation as a table row: what, since when, its percentage and bar, Cancel.
  function liveRow(t, colour, label, cols, extra) {
    const p = Math.floor(t.progress.percent || 0);
    const bar = h('div', { class: 'progress ' + colour, role: 'progressbar', 'aria-label': label + ' progress', 'aria-valuemin': '0', 'aria-valuemax': '100', 'aria-valuenow': String(p) },
      h('span'));
    bar.firstChild.style.width = p + '%';
    return h('tr', { class: 'live', 'data-task': t.id, 'data-state': t.state },
      h('td', { 'data-label': 'Status' },
        h('span', { class: 'status' }, h('span', { class: 'dot ' + colour }),
          h('span', { class: 'label' }, (t.state === 'queued' ? 'Queued: ' : '') + label),
          h('span', { class: 'pct' }, pct(t.progress.percent)))),
      h('td', { 'data-label': 'Started' }, t.started_ms ? timeEl(t.started_ms) : 'now'),
      h('td', { 'data-label': 'Progress', colspan: String(cols - 3) }, bar, extra || null),
      h('td', { class: 'actions' }, canOperate() && t.state !== 'queued' && t.kind !== 'snapshot-revert'
        ? iconButton('stop', 'Cancel ' + label, () => cancelTask(t.id)) : null));
  }

  async function cancelTask(id) {
    try {
      await api('POST', '/tasks/' + enc(id) + '/cancel');
      toast('Asked the task to stop at its next safe point.');
    } catch (e) { failed(e); }
  }

  // Update a live row in place from an event (no redraw: focus and the dialog stay).
  function updateLive(id, p) {
    const row = document.querySelector('tr.live[data-task="' + CSS.escape(id) + '"]');
    if (!row) return false;
    row.querySelector('.pct').textContent = pct(p.percent);
    const bar = row.querySelector('.progress');
    bar.setAttribute('aria-valuenow', String(Math.floor(p.percent || 0)));
    bar.firstChild.style.width = Math.floor(p.percent || 0) + '%';
    if (p.state === 'running') {
      row.dataset.state = 'running';
      row.querySelector('.label').textContent = row.querySelector('.label').textContent.replace(/^Queued: /, '');
    }
    return true;
  }

  async function backupsTab(ctx) {
    const { name, panel } = ctx;
    const counter = h('span', { class: 'counter', id: 'slot-counter', 'aria-label': 'Backup slots used' });
    const create = canOperate() ? h('button', { type: 'button', class: 'primary', id: 'create-backup', 'aria-describedby': 'create-reason' }, 'Create Backup') : null;
    if (create) create.disabled = true; // until the first refresh knows the slots and the VM's state
    const reason = h('p', { class: 'reason', id: 'create-reason' });
    const body = h('tbody');
    const next = h('p', { class: 'muted', id: 'next-backup' });
    panel.replaceChildren(h('div', { class: 'card', id: 'backups-card' },
      h('div', { class: 'card-head' }, h('h2', {}, 'Backups'), counter, h('span', { class: 'grow' }), create, reason),
      h('table', { 'aria-label': 'Backups' },
        h('thead', {}, h('tr', {}, ['Status', 'Taken', 'Backup', 'Size', 'New data stored', ''].map((c) => h('th', { scope: 'col' }, c)))),
        body),
      next));
    let data = null;
    let last = '';
    let local = null; // a task this page just started, until the server lists it

    const draw = () => {
      const { vm, backups, tasks } = data;
      ctx.status.replaceChildren(statusCell(vm.running_task, vm.declared));
      counter.textContent = slotsText(vm.slots);
      counter.classList.toggle('full', vm.slots.full);
      const live = tasks.filter(running);
      if (local && !tasks.some((t) => t.id === local.id)) live.unshift(local);
      const busy = live.find(holds);
      if (create) {
        let why = '';
        if (!vm.declared) why = 'Only VMs declared on the appliance (holdfast vm add) are backed up from here.';
        else if (busy) why = 'Another operation is running on this VM: ' + busyLabel(busy.kind) + '.';
        else if (vm.slots.full) {
          why = 'All ' + vm.slots.total + ' backup slots are used and the policy keeps them: '
            + (isAdmin() ? 'delete a backup first.' : 'ask an administrator to delete one.');
        }
        create.disabled = !!why;
        reason.textContent = why;
      }
      const rows = [];
      for (const t of live) {
        if (t.kind === 'backup') rows.push(liveRow(t, 'amber', 'Creating Backup', 6));
        else if (t.kind === 'restore') rows.push(liveRow(t, 'blue', 'Restoring Backup', 6, h('div', { class: 'muted' }, t.target)));
        else rows.push(liveRow(t, busyColour(t.kind), busyLabel(t.kind), 6, h('div', { class: 'muted' }, t.target)));
      }
      // The newest backup task that failed after the newest backup: red, with its message.
      const newest = backups.length ? backups[backups.length - 1].time_ms : 0;
      const lastBackupTask = tasks.find((t) => t.kind === 'backup' && !running(t));
      if (lastBackupTask && lastBackupTask.state !== 'ok' && (lastBackupTask.ended_ms || 0) > newest) {
        const err = lastBackupTask.outcome.error;
        rows.push(h('tr', { class: 'failed', 'data-task': lastBackupTask.id },
          h('td', { 'data-label': 'Status' }, h('span', { class: 'status' }, h('span', { class: 'dot red' }),
            lastBackupTask.state === 'cancelled' ? 'Backup cancelled' : 'Backup failed')),
          h('td', { 'data-label': 'Taken' }, timeEl(lastBackupTask.started_ms)),
          h('td', { 'data-label': 'Error', colspan: '3', class: 'err error-message' }, err ? err.message : lastBackupTask.state),
          h('td', { class: 'actions' }, h('a', { href: '#/tasks/' + enc(lastBackupTask.id) }, 'Log'))));
      }
      const restoring = (id) => live.find((t) => t.kind === 'restore' && t.target.startsWith(name + '@' + id));
      for (const b of backups.slice().reverse()) {
        const r = restoring(b.id);
        const acts = [];
        if (canOperate() && !busy) {
          acts.push(iconButton('restore', 'Restore backup ' + b.id, () => restoreDialog(data, b, refresh)));
        }
        if (b.protected) {
          if (isAdmin()) acts.push(iconButton('unlock', 'Unprotect backup ' + b.id, () => protect(b, false)));
        } else {
          if (canOperate()) acts.push(iconButton('lock', 'Protect backup ' + b.id, () => protect(b, true)));
          if (isAdmin() && !busy) acts.push(iconButton('trash', 'Delete backup ' + b.id, () => deleteBackup(b), 'danger-icon'));
        }
        rows.push(h('tr', { 'data-backup': b.id },
          h('td', { 'data-label': 'Status' }, h('span', { class: 'status' }, h('span', { class: 'dot ' + (r ? 'blue' : '') }), r ? 'Restoring' : 'Done'),
            b.protected ? h('span', { class: 'lock', title: 'Protected: it cannot be deleted' }, ' ', icon('lock'), 'Protected') : null),
          h('td', { 'data-label': 'Taken' }, timeEl(b.time_ms)),
          h('td', { 'data-label': 'Backup' }, h('code', {}, b.id)),
          h('td', { 'data-label': 'Size', class: 'size' }, fmtBytes(b.data_bytes), h('span', { class: 'muted' }, ' of ' + fmtBytes(b.logical_bytes))),
          h('td', { 'data-label': 'New data stored' }, fmtBytes(b.new_stored_bytes)),
          h('td', { class: 'actions' }, acts)));
      }
      if (rows.length === 0) {
        rows.push(h('tr', {}, h('td', { colspan: '6', class: 'empty' }, 'No backup yet.'
          + (canOperate() ? ' Create Backup takes the first.' : ' Backups run on the schedule below.'))));
      }
      body.replaceChildren(...rows);
      next.textContent = data.next ? 'Next scheduled backup: ' + new Date(data.next).toLocaleString() + ' (' + utc(Date.parse(data.next)) + ')' : '';
      for (const t of live) {
        if (t.id) follow(t.id, (p, ended) => {
          if (!ended) ctx.status.replaceChildren(statusCell({ kind: t.kind, state: p.state, percent: p.percent }, true));
          if (ended || !updateLive(t.id, p)) refresh();
        });
      }
    };

    const refresh = async () => {
      try {
        const [vm, backups, tasks, policy] = await Promise.all([
          api('GET', '/vms/' + enc(name)),
          api('GET', '/vms/' + enc(name) + '/backups'),
          vmTasks(name),
          api('GET', '/vms/' + enc(name) + '/policy').catch(() => null),
        ]);
        const nx = policy && policy.next.find((n) => n.what === 'backup ' + name);
        data = { vm, backups, tasks, next: nx ? nx.next : null };
        if (local && tasks.some((t) => t.id === local.id)) local = null;
        // Progress lives in the events; leave it out of the comparison.
        const now = JSON.stringify([vm.slots, vm.declared, backups, tasks.map((t) => [t.id, t.state, t.ended_ms]), data.next, local && local.id]);
        if (now !== last) { last = now; draw(); }
      } catch (e) { failed(e); }
    };

    async function protect(b, on) {
      try {
        await api('PUT', '/vms/' + enc(name) + '/backups/' + enc(b.id) + '/protected', { protected: on });
        toast(on ? 'Backup ' + b.id + ' is protected.' : 'Backup ' + b.id + ' is no longer protected.');
        refresh();
      } catch (e) { failed(e); }
    }

    function deleteBackup(b) {
      confirmAction({
        title: 'Delete backup ' + b.id + '?',
        text: 'Backup ' + b.id + ' of ' + name + ' (taken ' + utc(b.time_ms) + ') is removed. Its data is freed at the next clean-up (gc).',
        warning: 'This cannot be undone.',
        action: 'Delete',
        danger: true,
        run: async () => {
          await api('DELETE', '/vms/' + enc(name) + '/backups/' + enc(b.id));
          toast('Backup ' + b.id + ' deleted.');
          refresh();
        },
      });
    }

    if (create) {
      create.addEventListener('click', () => confirmAction({
        title: 'Create a backup of ' + name + '?',
        text: 'holdfast reads the VM\'s disks now (only what changed since the last backup, when it can); the VM keeps running.'
          + (data && data.vm.slots.total ? ' It takes slot ' + (data.vm.slots.used + 1) + ' of ' + data.vm.slots.total + '.' : ''),
        action: 'Create Backup',
        run: async () => {
          const r = await api('POST', '/vms/' + enc(name) + '/backups', {});
          local = { id: r.task, kind: 'backup', state: 'queued', target: name, progress: { percent: 0 }, outcome: {} };
          last = '';
          draw();
          refresh();
        },
      }));
    }

    await refresh();
    every(POLL_MS, refresh);
  }

  function restoreDialog(data, b, refresh) {
    const { vm } = data;
    const name = vm.name;
    const dirs = (me && me.restore_dirs) || [];
    const err = h('p', { class: 'error-text', role: 'alert' });
    const modes = [];
    if (vm.declared) modes.push(['in-place', 'Into the VM\'s own disks (the VM must be shut down)']);
    if (dirs.length) modes.push(['file', 'To an image file on the appliance']);
    if (modes.length === 0) {
      confirmAction({
        title: 'Restore backup ' + b.id,
        text: 'Nothing can be restored here: the VM is not declared on the appliance and no restore directory is configured ([service] restore_dirs).',
        action: 'Close',
        run: async () => {},
      });
      return;
    }
    const radios = modes.map(([v, label], i) => h('label', { class: 'check' },
      h('input', { type: 'radio', name: 'restore-mode', value: v, checked: i === 0 }), label));
    const disks = b.disks.map((d) => d.name);
    const dir = h('select', { id: 'restore-dir' }, dirs.map((d) => h('option', { value: d }, d)));
    const file = h('input', { type: 'text', id: 'restore-file', value: name + '-' + b.id + (disks.length > 1 ? '' : '-' + disks[0]) + '.img', autocomplete: 'off' });
    const disk = h('select', { id: 'restore-disk' }, disks.map((d) => h('option', { value: d }, d)));
    const format = h('select', { id: 'restore-format' }, h('option', { value: 'raw' }, 'raw (sparse)'), h('option', { value: 'qcow2' }, 'qcow2'));
    const force = h('input', { type: 'checkbox', id: 'restore-force' });
    const fileBox = h('div', { id: 'restore-file-options' },
      h('label', { for: 'restore-dir' }, 'Restore directory'), dir,
      h('label', { for: 'restore-file' }, 'File name'), file,
      disks.length > 1 ? [h('label', { for: 'restore-disk' }, 'Disk'), disk] : null,
      h('label', { for: 'restore-format' }, 'Format'), format,
      h('label', { class: 'check' }, force, 'Replace the file if it exists'));
    const mode = () => (radios.find((r) => r.firstChild.checked) || radios[0]).firstChild.value;
    const sync = () => { fileBox.hidden = mode() !== 'file'; };
    radios.forEach((r) => r.firstChild.addEventListener('change', sync));
    const go = h('button', { type: 'button', class: 'danger', id: 'restore-confirm' }, 'Restore');
    const body = h('div', {},
      h('p', {}, 'Backup ' + b.id + ' of ' + name + ', taken ' + new Date(b.time_ms).toLocaleString() + ' (' + utc(b.time_ms) + ').'),
      h('p', { class: 'warning', id: 'restore-warning' }, 'Restoring overwrites the disk with this backup and cannot be undone: whatever the disk holds now is lost.'),
      h('fieldset', {}, h('legend', {}, 'Restore where'), radios),
      fileBox, err);
    go.addEventListener('click', async () => {
      go.disabled = true;
      err.textContent = '';
      const req = mode() === 'file'
        ? { to: dir.value.replace(/\/$/, '') + '/' + file.value, force: force.checked, format: format.value }
        : { in_place: true };
      if (mode() === 'file' && disks.length > 1) req.disk = disk.value;
      try {
        await api('POST', '/vms/' + enc(name) + '/backups/' + enc(b.id) + '/restore', req);
        closeDialog();
        toast('Restoring backup ' + b.id + '…');
        refresh();
      } catch (e) {
        err.textContent = e.message;
        go.disabled = false;
      }
    });
    dialog('Restore backup ' + b.id + '?', body, [h('button', { type: 'button', onclick: closeDialog }, 'Cancel'), go]);
    sync();
  }

  function fmtIn(iso) {
    if (!iso) return 'never';
    const ms = Date.parse(iso) - Date.now();
    return ms <= 0 ? 'due now' : 'in ' + fmtDuration(ms).replace(/ \d+ (s|min)$/, '');
  }

  async function snapshotsTab(ctx) {
    const { name, panel } = ctx;
    const take = canOperate() ? h('button', { type: 'button', class: 'primary', id: 'take-snapshot', 'aria-describedby': 'snapshot-reason' }, 'Take Snapshot') : null;
    const reason = h('p', { class: 'reason', id: 'snapshot-reason' });
    const body = h('tbody');
    panel.replaceChildren(h('div', { class: 'card', id: 'snapshots-card' },
      h('div', { class: 'card-head' }, h('h2', {}, 'Snapshots'), h('span', { class: 'grow' }), take, reason),
      h('table', { 'aria-label': 'Snapshots' },
        h('thead', {}, h('tr', {}, ['Name', 'Description', 'Created', 'Memory', 'Size', 'Expires', ''].map((c) => h('th', { scope: 'col' }, c)))),
        body)));
    let data = null;
    let last = '';
    let local = null;

    const draw = () => {
      const { vm, snaps, tasks } = data;
      ctx.status.replaceChildren(statusCell(vm.running_task, vm.declared));
      const live = tasks.filter(running);
      if (local && !tasks.some((t) => t.id === local.id)) live.unshift(local);
      const busy = live.find(holds);
      if (take) {
        let why = '';
        if (!vm.declared) why = 'Only VMs declared on the appliance can take snapshots.';
        else if (busy) why = 'Another operation is running on this VM: ' + busyLabel(busy.kind) + '.';
        take.disabled = !!why;
        reason.textContent = why;
      }
      const rows = live.map((t) => liveRow(t, busyColour(t.kind), busyLabel(t.kind), 7, h('div', { class: 'muted' }, t.target)));
      const lastSnap = tasks.find((t) => t.kind.startsWith('snapshot-') && t.kind !== 'snapshot-expire' && !running(t));
      if (lastSnap && lastSnap.state === 'failed' && Date.now() - (lastSnap.ended_ms || 0) < 3600 * 1000) {
        rows.push(h('tr', { class: 'failed' }, h('td', { colspan: '6', class: 'err error-message' },
          h('span', { class: 'dot red' }), busyLabel(lastSnap.kind) + ' failed: ' + (lastSnap.outcome.error ? lastSnap.outcome.error.message : '')),
        h('td', { class: 'actions' }, h('a', { href: '#/tasks/' + enc(lastSnap.id) }, 'Log'))));
      }
      for (const s of snaps.slice().sort((a, b) => b.created_ms - a.created_ms)) {
        const acts = canOperate() && !busy ? [
          h('button', { type: 'button', onclick: () => revert(s), 'aria-label': 'Revert to snapshot ' + s.name }, 'Revert'),
          iconButton('pencil', 'Rename snapshot ' + s.name, () => rename(s)),
          iconButton('trash', 'Delete snapshot ' + s.name, () => remove(s)),
        ] : [];
        rows.push(h('tr', { 'data-snapshot': s.name },
          h('td', { 'data-label': 'Name' }, h('strong', {}, s.name), s.state !== 'ok' ? h('span', { class: 'err' }, ' (' + s.state + ')') : null),
          h('td', { 'data-label': 'Description' }, s.description || h('span', { class: 'muted' }, '–')),
          h('td', { 'data-label': 'Created' }, timeEl(s.created_ms)),
          h('td', { 'data-label': 'Memory' }, s.stateful ? 'Yes' : 'No'),
          h('td', { 'data-label': 'Size' }, fmtBytes(s.size)),
          h('td', { 'data-label': 'Expires' }, s.expires ? h('span', { title: utc(Date.parse(s.expires)) }, fmtIn(s.expires)) : 'never'),
          h('td', { class: 'actions' }, acts)));
      }
      if (snaps.length === 0) {
        rows.push(h('tr', {}, h('td', { colspan: '7', class: 'empty', id: 'no-snapshots' }, 'No snapshot exists yet. '
          + (canOperate() ? 'Take one before a risky change (an update, a migration): reverting brings the VM back to it.'
            : 'Ask an operator of this appliance (your provider\'s support) to take one before a risky change.'))));
      }
      body.replaceChildren(...rows);
      for (const t of live) {
        if (t.id) follow(t.id, (p, ended) => {
          if (ended) {
            if (p.state === 'ok') toast(busyLabel(t.kind) + ': done.');
            else if (p.outcome && p.outcome.error) toast(busyLabel(t.kind) + ' failed: ' + p.outcome.error.message, true);
            refresh();
          } else {
            ctx.status.replaceChildren(statusCell({ kind: t.kind, state: p.state, percent: p.percent }, true));
            if (!updateLive(t.id, p)) refresh();
          }
        });
      }
    };

    const refresh = async () => {
      try {
        const [vm, snaps, tasks, policy] = await Promise.all([
          api('GET', '/vms/' + enc(name)),
          api('GET', '/vms/' + enc(name) + '/snapshots').catch((e) => { if (e.status === 401) throw e; return []; }),
          vmTasks(name),
          api('GET', '/vms/' + enc(name) + '/policy').catch(() => null),
        ]);
        data = { vm, snaps, tasks, maxLife: policy && policy.vm ? policy.vm.snapshot_max_lifespan_seconds : 10 * 86400 };
        if (local && tasks.some((t) => t.id === local.id)) local = null;
        const now = JSON.stringify([vm.declared, snaps, tasks.map((t) => [t.id, t.state, t.ended_ms]), local && local.id]);
        if (now !== last) { last = now; draw(); }
      } catch (e) { failed(e); }
    };

    const started = (r, kind) => {
      local = { id: r.task, kind, state: 'queued', target: name, progress: { percent: 0 }, outcome: {} };
      last = '';
      draw();
      refresh();
    };

    function takeDialog() {
      const n = nameField('snapshot-name', 'Name');
      const desc = h('textarea', { id: 'snapshot-description', rows: '2', maxlength: '500' });
      const memory = h('input', { type: 'checkbox', id: 'snapshot-memory' });
      const max = data.maxLife;
      const choices = [[43200, '12 hours'], [86400, '1 day'], [2 * 86400, '2 days'], [3 * 86400, '3 days'], [5 * 86400, '5 days'], [7 * 86400, '7 days'], [10 * 86400, '10 days']]
        .filter(([s]) => s <= max);
      if (!choices.some(([s]) => s === max)) choices.push([max, fmtDuration(max * 1000)]);
      const life = h('select', { id: 'snapshot-lifespan' }, choices.map(([s, l]) => h('option', { value: s + 's', selected: s === max }, l)));
      const err = h('p', { class: 'error-text', role: 'alert' });
      const go = h('button', { type: 'button', class: 'primary', id: 'snapshot-confirm', disabled: true }, 'Take Snapshot');
      n.input.addEventListener('input', () => { go.disabled = !n.check(); });
      go.addEventListener('click', async () => {
        if (!n.check()) return;
        go.disabled = true;
        err.textContent = '';
        try {
          const r = await api('POST', '/vms/' + enc(name) + '/snapshots', {
            name: n.input.value, description: desc.value || null, memory: memory.checked, ttl: life.value,
          });
          closeDialog();
          started(r, 'snapshot-create');
        } catch (e) {
          err.textContent = e.message;
          go.disabled = false;
        }
      });
      dialog('Take a snapshot of ' + name, h('div', {},
        n.el,
        h('label', { for: 'snapshot-description' }, 'Description (optional)'), desc,
        h('label', { class: 'check' }, memory, h('span', {}, 'Include memory (RAM state)',
          h('p', { class: 'hint' }, 'Reverting then resumes the VM exactly where it was; the snapshot is larger and slower to take.'))),
        h('label', { for: 'snapshot-lifespan' }, 'Delete it automatically after'), life,
        h('p', { class: 'hint' }, 'Snapshots slow the disk down as they grow: at most ' + fmtDuration(max * 1000) + ' here.'),
        err), [h('button', { type: 'button', onclick: closeDialog }, 'Cancel'), go]);
      n.input.focus();
    }

    function revert(s) {
      confirmAction({
        title: 'Revert ' + name + ' to ' + s.name + '?',
        text: 'The VM returns to the point of snapshot ' + s.name + ' (' + utc(s.created_ms) + ')' + (s.stateful ? ', memory included.' : '; it restarts from its disks.') + ' The snapshot is kept.',
        warning: 'Everything the VM wrote since the snapshot is lost.',
        action: 'Revert',
        danger: true,
        run: async () => started(await api('POST', '/vms/' + enc(name) + '/snapshots/' + enc(s.name) + '/revert'), 'snapshot-revert'),
      });
    }

    function rename(s) {
      const n = nameField('snapshot-new-name', 'New name', s.name);
      const err = h('p', { class: 'error-text', role: 'alert' });
      const go = h('button', { type: 'button', class: 'primary', id: 'rename-confirm' }, 'Rename');
      n.input.addEventListener('input', () => { go.disabled = !n.check(); });
      go.addEventListener('click', async () => {
        if (!n.check()) return;
        go.disabled = true;
        try {
          const r = await api('POST', '/vms/' + enc(name) + '/snapshots/' + enc(s.name) + '/rename', { name: n.input.value });
          closeDialog();
          started(r, 'snapshot-rename');
        } catch (e) {
          err.textContent = e.message;
          go.disabled = false;
        }
      });
      dialog('Rename snapshot ' + s.name, h('div', {}, n.el, err), [h('button', { type: 'button', onclick: closeDialog }, 'Cancel'), go]);
      n.input.select();
    }

    function remove(s) {
      confirmAction({
        title: 'Delete snapshot ' + s.name + '?',
        text: 'Snapshot ' + s.name + ' of ' + name + ' is removed from QEMU; the VM keeps running as it is.',
        warning: 'You can no longer revert to it. This cannot be undone.',
        action: 'Delete',
        danger: true,
        run: async () => started(await api('DELETE', '/vms/' + enc(name) + '/snapshots/' + enc(s.name)), 'snapshot-delete'),
      });
    }

    if (take) take.addEventListener('click', takeDialog);
    await refresh();
    every(POLL_MS, refresh);
  }

  // Recent tasks: state, duration, who started them.
  async function taskList() {
    const body = h('tbody');
    page('Tasks', h('div', { class: 'card' }, h('table', { 'aria-label': 'Tasks' },
      h('thead', {}, h('tr', {}, ['Started', 'Operation', 'VM', 'State', 'Duration', 'Started by'].map((c) => h('th', { scope: 'col' }, c)))),
      body)));
    let last = '';
    const load = async () => {
      try {
        const ts = await api('GET', '/tasks?since=' + (Date.now() - 14 * 86400 * 1000));
        ts.sort((a, b) => b.started_ms - a.started_ms);
        const shown = ts.slice(0, 200);
        const now = JSON.stringify(shown.map((t) => [t.id, t.state, t.progress.percent, t.ended_ms]));
        if (now === last) return;
        last = now;
        body.replaceChildren(...shown.map((t) => h('tr', { 'data-task': t.id },
          h('td', { 'data-label': 'Started' }, h('a', { href: '#/tasks/' + enc(t.id) }, timeEl(t.started_ms))),
          h('td', { 'data-label': 'Operation' }, t.kind),
          h('td', { 'data-label': 'VM' }, t.vms.join(', ') || '–'),
          h('td', { 'data-label': 'State' }, taskState(t)),
          h('td', { 'data-label': 'Duration' }, fmtDuration((t.ended_ms || Date.now()) - t.started_ms)),
          h('td', { 'data-label': 'Started by' }, t.user))));
        if (shown.length === 0) body.replaceChildren(h('tr', {}, h('td', { colspan: '6', class: 'empty' }, 'No task in the last 14 days.')));
      } catch (e) { failed(e); }
    };
    await load();
    every(POLL_MS, load);
  }

  function taskState(t) {
    const colour = { ok: '', failed: 'red', cancelled: 'red', running: busyColour(t.kind), queued: 'grey' }[t.state];
    return h('span', { class: 'status' }, h('span', { class: 'dot ' + colour }), t.state + (running(t) && t.progress.percent !== undefined ? ' ' + pct(t.progress.percent) : ''));
  }

  // One task, its log live.
  async function taskPage(id) {
    let t;
    try { t = await api('GET', '/tasks/' + enc(id)); } catch (e) {
      page('Task', h('p', { class: 'err' }, e.message));
      return;
    }
    const state = h('dd', { id: 'task-state' });
    const ended = h('dd');
    const outcome = h('div', { id: 'task-outcome' });
    const log = h('div', { class: 'log', id: 'task-log', role: 'log', 'aria-label': 'Task log', tabindex: '0' });
    const bar = h('div', { class: 'progress ' + busyColour(t.kind), role: 'progressbar', 'aria-label': 'Progress', 'aria-valuemin': '0', 'aria-valuemax': '100' }, h('span'));
    const cancel = canOperate() && running(t) ? h('button', { type: 'button', id: 'task-cancel', onclick: () => cancelTask(id) }, 'Cancel') : null;
    page(busyLabel(t.kind) + (t.vms.length ? ' · ' + t.vms.join(', ') : ''),
      h('p', {}, h('a', { href: '#/tasks' }, '← All tasks')),
      h('div', { class: 'card' },
        h('dl', { class: 'kv' },
          h('dt', {}, 'Task'), h('dd', {}, h('code', {}, t.id)),
          h('dt', {}, 'What'), h('dd', {}, t.target || t.kind),
          h('dt', {}, 'Started by'), h('dd', {}, t.user),
          h('dt', {}, 'Started'), h('dd', {}, timeEl(t.started_ms)),
          h('dt', {}, 'Ended'), ended,
          h('dt', {}, 'State'), state),
        bar, cancel, outcome),
      h('h2', {}, 'Log'), log);
    const line = (l) => h('div', { class: l.level }, new Date(l.ms).toLocaleTimeString() + '  ' + l.line);
    log.replaceChildren(...t.log.map(line));
    const seen = t.log.reduce((m, l) => Math.max(m, l.seq || 0), 0);
    const show = (rec) => {
      state.replaceChildren(taskState(rec));
      ended.replaceChildren(rec.ended_ms ? h('span', {}, timeEl(rec.ended_ms), ' (' + fmtDuration(rec.ended_ms - rec.started_ms) + ')') : '–');
      const p = rec.progress.percent || (rec.state === 'ok' ? 100 : 0);
      bar.firstChild.style.width = Math.floor(p) + '%';
      bar.setAttribute('aria-valuenow', String(Math.floor(p)));
      const o = rec.outcome || {};
      outcome.replaceChildren(
        o.summary ? h('p', {}, o.summary) : null,
        o.error ? h('p', { class: 'err error-message' }, o.error.message + ' (' + o.error.code + ')') : null);
      if (cancel && !running(rec)) cancel.remove();
    };
    show(t);
    if (running(t)) {
      follow(id, (p, end) => {
        t.state = p.state;
        t.progress = end ? p.progress : p;
        if (end) { t.outcome = p.outcome; t.ended_ms = Date.now(); }
        show(t);
      }, (l, seq) => {
        if (seq <= seen) return; // already shown from the record
        const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
        log.append(line(l));
        if (atEnd) log.scrollTop = log.scrollHeight;
      });
    }
  }

  // Notification targets and their matchers (admins), with a test event.
  async function notifications() {
    const body = h('tbody');
    page('Notifications', h('div', { class: 'card' }, h('table', { 'aria-label': 'Notification targets' },
      h('thead', {}, h('tr', {}, ['Target', 'Sends to', 'Events', 'Outcomes', 'Least severity', 'VMs', ''].map((c) => h('th', { scope: 'col' }, c)))),
      body), h('p', { class: 'muted' }, 'Targets are set with `holdfast notify add` or PUT /api/v1/notifications/targets/{name}.')));
    try {
      const cfg = await api('GET', '/notifications');
      const targets = Object.entries(cfg.target || {});
      body.replaceChildren(...targets.map(([n, t]) => h('tr', { 'data-target': n },
        h('td', { 'data-label': 'Target' }, h('strong', {}, n)),
        h('td', { 'data-label': 'Sends to' }, t.webhook ? 'webhook ' + t.webhook : (t.email ? 'email to ' + t.email.to.join(', ') : '–')),
        h('td', { 'data-label': 'Events' }, (t.events || []).join(', ') || 'all'),
        h('td', { 'data-label': 'Outcomes' }, (t.outcomes || []).join(', ') || 'all'),
        h('td', { 'data-label': 'Least severity' }, t.severity || 'info'),
        h('td', { 'data-label': 'VMs' }, (t.vms || []).join(', ') || 'all'),
        h('td', { class: 'actions' }, h('button', {
          type: 'button',
          'aria-label': 'Send a test to ' + n,
          onclick: async () => {
            try {
              const r = await api('POST', '/notifications/targets/' + enc(n) + '/test');
              toast('Test event ' + r.event + ' queued for ' + n + '.');
            } catch (e) { failed(e); }
          },
        }, 'Send a test')))));
      if (targets.length === 0) body.replaceChildren(h('tr', {}, h('td', { colspan: '7', class: 'empty' }, 'No notification target yet.')));
    } catch (e) { failed(e); }
  }

  // ---- routing ------------------------------------------------------------------------

  async function route() {
    leave();
    closeDialog();
    if (!me) {
      try { me = await api('GET', '/whoami'); } catch (_) { return; } // the sign-in page is up
    }
    document.getElementById('bar').hidden = false;
    document.getElementById('who-name').textContent = me.name;
    document.getElementById('who-role').textContent = me.role;
    document.querySelectorAll('[data-admin]').forEach((e) => { e.hidden = !isAdmin(); });
    const parts = (location.hash.replace(/^#\/?/, '') || 'vms').split('/').map(decodeURIComponent);
    document.querySelectorAll('[data-nav]').forEach((a) => {
      if (a.dataset.nav === parts[0]) a.setAttribute('aria-current', 'page'); else a.removeAttribute('aria-current');
    });
    try {
      if (parts[0] === 'vms' && parts[1]) await vmPage(parts[1], parts[2] === 'snapshots' ? 'snapshots' : 'backups');
      else if (parts[0] === 'tasks' && parts[1]) await taskPage(parts[1]);
      else if (parts[0] === 'tasks') await taskList();
      else if (parts[0] === 'notifications' && isAdmin()) await notifications();
      else await vmList();
    } catch (e) { failed(e); }
    document.getElementById('main').dataset.ready = location.hash || '#/vms';
  }

  document.addEventListener('DOMContentLoaded', () => {
    document.getElementById('signout').addEventListener('click', signOut);
    window.addEventListener('hashchange', route);
    route();
  });
})();
