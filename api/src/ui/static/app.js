// DataFlow dashboard: live updates over SSE. Every page works without this file; with it,
// the regions marked data-refresh are re-read from the server when something changes (and
// pages with charts each minute), the overview's feed lists the updates, and bulk forms get
// a "select all".
(function () {
  'use strict';
  var status = document.getElementById('live-status');
  var feed = document.getElementById('feed');
  var timer = null;
  var busy = false;
  var again = false;
  var pending = false;

  function setStatus(text, state) {
    if (!status) return;
    status.textContent = text;
    status.className = 'live-status ' + state;
  }

  // Do not pull the page from under an operator who is choosing rows or typing.
  function paused() {
    if (document.querySelector('[data-refresh] input[type=checkbox]:checked')) return true;
    var a = document.activeElement;
    return !!(a && a.closest && a.closest('[data-refresh]') && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName));
  }

  function refresh() {
    if (busy) { again = true; return; }
    if (paused()) { pending = true; setStatus('live · paused', 'paused'); return; }
    busy = true;
    fetch(location.href, { credentials: 'same-origin', headers: { Accept: 'text/html' } })
      .then(function (resp) {
        if (resp.redirected && new URL(resp.url).pathname === '/ui/login') {
          location.assign('/ui/login');
          return null;
        }
        return resp.ok ? resp.text() : null;
      })
      .then(function (text) {
        if (!text) return;
        var doc = new DOMParser().parseFromString(text, 'text/html');
        document.querySelectorAll('[data-refresh][id]').forEach(function (el) {
          var fresh = doc.getElementById(el.id);
          if (fresh) el.replaceWith(document.importNode(fresh, true));
        });
        setStatus('live', 'on');
      })
      .catch(function () { /* the next update tries again */ })
      .then(function () {
        busy = false;
        if (again) { again = false; schedule(); }
      });
  }

  function schedule() {
    pending = false;
    if (!timer) timer = setTimeout(function () { timer = null; refresh(); }, 250);
  }

  function note(update) {
    if (!feed) return;
    var empty = feed.querySelector('.empty');
    if (empty) empty.remove();
    var li = document.createElement('li');
    var when = document.createElement('time');
    when.textContent = (update.at || '').slice(11, 19);
    var kind = document.createElement('span');
    kind.className = 'badge kind-' + update.kind;
    kind.textContent = update.kind.replace(/_/g, ' ');
    var subject = document.createElement('span');
    subject.className = 'mono';
    subject.textContent = update.subject;
    li.append(when, ' ', kind, ' ', subject);
    feed.prepend(li);
    while (feed.children.length > 30) feed.lastChild.remove();
  }

  // Only signed-in pages (they show the live status) have a stream to open.
  if (window.EventSource && status) {
    var source = new EventSource('/ui/events');
    source.onopen = function () { setStatus('live', 'on'); schedule(); };
    source.onerror = function () { setStatus('reconnecting…', 'off'); };
    source.addEventListener('change', function (e) {
      try { note(JSON.parse(e.data)); } catch (_) { /* not an update */ }
      schedule();
    });
    source.addEventListener('resync', schedule);
    source.addEventListener('logout', function () {
      source.close();
      location.assign('/ui/login');
    });
    // Charts move on with the clock even when nothing changes: a new minute each minute.
    if (document.querySelector('[data-refresh] svg.chart')) setInterval(schedule, 60000);
    // Leaving the page closes the stream at once: a browser allows only a few connections
    // per server, and a stream left to linger would hold one.
    window.addEventListener('pagehide', function () { source.close(); });
  }

  document.addEventListener('change', function (e) {
    var t = e.target;
    if (t.matches('input[data-select-all]')) {
      document.querySelectorAll('input[name=target][form="' + t.getAttribute('data-select-all') + '"]')
        .forEach(function (box) { box.checked = t.checked; });
    }
    if (pending && !paused()) schedule();
  });

  document.addEventListener('submit', function (e) {
    var form = e.target;
    var message = (e.submitter && e.submitter.getAttribute('data-confirm')) || form.getAttribute('data-confirm');
    if (message && !window.confirm(message)) e.preventDefault();
  });
})();
