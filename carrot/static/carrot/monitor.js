// The carrot monitor's own script: refresh lists and counts from the JSON API in place, filter the task
// log by level. Everything is built with textContent (never innerHTML), so task data stays text.
(function () {
  'use strict';
  var body = document.body;
  var refreshMs = (parseFloat(body.getAttribute('data-refresh')) || 5) * 1000;
  var csrfMeta = document.querySelector('meta[name="csrf-token"]');
  var csrfToken = csrfMeta ? csrfMeta.getAttribute('content') : '';

  function getJSON(url) {
    return fetch(url, {credentials: 'same-origin', headers: {'Accept': 'application/json'}})
      .then(function (response) {
        if (!response.ok) { throw new Error(url + ': ' + response.status); }
        return response.json();
      });
  }

  // -- formatting, as carrot/templatetags/carrot_monitor.py does it on the server
  function utc(iso) {
    if (!iso) { return ''; }
    var date = new Date(iso);
    return isNaN(date) ? String(iso) : date.toISOString().slice(0, 19).replace('T', ' ');
  }
  function seconds(value) {
    if (value === null || value === undefined || value === '') { return ''; }
    value = Number(value);
    if (value < 10) { return value.toFixed(2) + ' s'; }
    if (value < 60) { return value.toFixed(0) + ' s'; }
    if (value < 3600) { return Math.floor(value / 60) + ' min ' + Math.floor(value % 60) + ' s'; }
    return Math.floor(value / 3600) + ' h ' + Math.floor(value % 3600 / 60) + ' min';
  }
  function clip(text, length) {
    text = String(text);
    return text.length <= length ? text : text.slice(0, length - 1) + '\u2026';
  }
  // Python's json.dumps(value, ensure_ascii=False) separators, so refreshed cells read like the first ones
  function pyJSON(value) {
    if (Array.isArray(value)) { return '[' + value.map(pyJSON).join(', ') + ']'; }
    if (value && typeof value === 'object') {
      return '{' + Object.keys(value).map(function (k) { return JSON.stringify(k) + ': ' + pyJSON(value[k]); })
        .join(', ') + '}';
    }
    return JSON.stringify(value);
  }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (name) { node.setAttribute(name, attrs[name]); });
    if (text !== undefined && text !== null) { node.textContent = text; }
    return node;
  }

  function postForm(action, label, danger) {
    var form = el('form', {method: 'post', action: action});
    form.appendChild(el('input', {type: 'hidden', name: 'csrfmiddlewaretoken', value: csrfToken}));
    var button = el('button', {type: 'submit'}, label);
    if (danger) { button.className = 'danger'; }
    form.appendChild(button);
    return form;
  }

  // -- lists

  var TIME_FIELDS = {queued: 'publish_time', failed: 'failure_time', completed: 'completion_time',
                     waiting: 'publish_time', later: 'run_after'};

  function taskUrl(template, uuid, action) {
    var url = template.replace('UUID', encodeURIComponent(uuid));
    return action ? url.replace('ACTION', action) : url;
  }

  function renderCell(table, tab, column, row, checked) {
    var td = el('td');
    var detailUrl = table.getAttribute('data-detail-url');
    var actionUrl = table.getAttribute('data-action-url');
    switch (column) {
      case 'select':
        td.className = 'select';
        var box = el('input', {type: 'checkbox', name: 'uuid', value: row.uuid, form: 'bulk-form',
                               'aria-label': 'Select'});
        box.checked = checked;
        td.appendChild(box);
        break;
      case 'time': td.className = 'time'; td.textContent = utc(row[TIME_FIELDS[tab]]); break;
      case 'task':
        td.className = 'task';
        td.appendChild(el('a', {href: taskUrl(detailUrl, row.uuid)}, row.task));
        break;
      case 'queue': td.className = 'queue'; td.textContent = row.queue || ''; break;
      case 'status':
        td.appendChild(el('span', {'class': 'status status-' + String(row.status).toLowerCase()}, row.status));
        break;
      case 'args': td.className = 'args'; td.appendChild(el('code', {}, clip(pyJSON(row.args), 80))); break;
      case 'kwargs': td.className = 'args'; td.appendChild(el('code', {}, clip(pyJSON(row.kwargs), 80))); break;
      case 'attempts': td.className = 'num'; td.textContent = row.attempts; break;
      case 'duration': td.className = 'num'; td.textContent = seconds(row.duration); break;
      case 'age': td.className = 'num'; td.textContent = seconds(row.age); break;
      case 'exception': td.className = 'exception'; td.textContent = clip(row.exception || '', 120); break;
      case 'actions':
        td.className = 'actions';
        if (tab === 'failed') {
          td.appendChild(postForm(taskUrl(actionUrl, row.uuid, 'requeue'), 'Requeue'));
        } else if (tab === 'waiting') {
          td.appendChild(postForm(taskUrl(actionUrl, row.uuid, 'send'), 'Send now'));
          td.appendChild(postForm(taskUrl(actionUrl, row.uuid, 'delete'), 'Delete', true));
        } else if (tab === 'later') {
          td.appendChild(postForm(taskUrl(actionUrl, row.uuid, 'run'), 'Run now'));
          td.appendChild(postForm(taskUrl(actionUrl, row.uuid, 'cancel'), 'Cancel', true));
        }
        break;
    }
    return td;
  }

  function updateCounts(counts, limit) {
    // Counts stop past `limit` (the API's count_limit): the tab then says "10,000+".
    Object.keys(counts || {}).forEach(function (name) {
      var count = counts[name];
      document.querySelectorAll('[data-count="' + name + '"]').forEach(function (node) {
        node.textContent = limit && count > limit ? limit.toLocaleString('en') + '+' : count;
      });
    });
  }

  function setupList(table) {
    var tab = table.getAttribute('data-tab');
    var columns = Array.prototype.map.call(table.querySelectorAll('thead th'), function (th) {
      return th.getAttribute('data-col');
    });
    var params = new URLSearchParams({tab: tab, page: table.getAttribute('data-page') || '1',
                                      q: table.getAttribute('data-q') || '',
                                      queue: table.getAttribute('data-queue') || ''});
    var url = table.getAttribute('data-api') + '?' + params.toString();
    var last = null;

    function refresh() {
      if (document.hidden) { return; }
      getJSON(url).then(function (data) {
        updateCounts(data.totals, data.count_limit);
        var shown = document.querySelector('[data-filtered-count]');
        if (shown) { shown.textContent = data.count; }
        // Ages change every second: compare without them, so an unchanged list keeps the reader's
        // text selection and focus.
        var signature = JSON.stringify(data.results.map(function (r) {
          var copy = Object.assign({}, r); delete copy.age; return copy;
        }));
        if (signature === last && tab !== 'waiting') { return; }
        var selection = window.getSelection && window.getSelection();
        if (signature === last && selection && !selection.isCollapsed) { return; }
        last = signature;
        var checked = {};
        table.querySelectorAll('tbody input[name="uuid"]:checked').forEach(function (box) {
          checked[box.value] = true;
        });
        var tbody = el('tbody');
        if (!data.results.length) {
          var empty = el('tr', {'class': 'empty'});
          empty.appendChild(el('td', {colspan: String(columns.length)}, 'Nothing here now.'));
          tbody.appendChild(empty);
        }
        data.results.forEach(function (row) {
          var tr = el('tr', {'data-uuid': row.uuid});
          columns.forEach(function (column) { tr.appendChild(renderCell(table, tab, column, row, !!checked[row.uuid])); });
          tbody.appendChild(tr);
        });
        table.replaceChild(tbody, table.tBodies[0]);
      }).catch(function () { /* keep what is shown; the next turn tries again */ });
    }
    // The first turn only records what the server rendered.
    getJSON(url).then(function (data) {
      last = JSON.stringify(data.results.map(function (r) { var c = Object.assign({}, r); delete c.age; return c; }));
    }).catch(function () {});
    setInterval(refresh, refreshMs);
  }

  // -- the overview strip and the tab counts, on every page

  function setupOverview() {
    var url = body.getAttribute('data-overview-url');
    if (!url) { return; }
    setInterval(function () {
      if (document.hidden) { return; }
      getJSON(url).then(function (data) {
        updateCounts(data.counts, data.count_limit);
        data.queues.forEach(function (item) {
          var card = document.querySelector('.queue-card[data-queue="' + CSS.escape(item.queue) + '"]');
          if (!card) { return; }
          var broker = item.broker;
          var values = {
            ready: broker.state === 'ok' ? broker.ready : broker.state,
            consumers: broker.state === 'ok' ? broker.consumers : '\u2013',
            in_progress: item.in_progress, completed_last_hour: item.completed_last_hour,
            failed_last_hour: item.failed_last_hour
          };
          Object.keys(values).forEach(function (field) {
            var dd = card.querySelector('[data-field="' + field + '"]');
            if (dd) { dd.textContent = values[field]; }
          });
          var failed = card.querySelector('[data-field="failed_last_hour"]');
          if (failed) { failed.className = item.failed_last_hour ? 'bad' : ''; }
        });
      }).catch(function () {});
    }, refreshMs);
  }

  // -- the task detail: log level filter, and a reload when a live task changes state

  function setupDetail(panel) {
    var select = document.getElementById('log-level');
    var levels = {DEBUG: 10, INFO: 20, WARNING: 30, ERROR: 40, CRITICAL: 50};
    function applyLevel() {
      var floor = levels[select.value] || 20;
      var hidden = 0;
      document.querySelectorAll('#task-log li').forEach(function (li) {
        var show = Number(li.getAttribute('data-level')) >= floor;
        li.hidden = !show;
        if (!show) { hidden += 1; }
      });
      var note = document.getElementById('log-hidden-note');
      if (note) { note.textContent = hidden ? hidden + ' line(s) below ' + select.value + ' hidden.' : ''; }
      var url = new URL(window.location.href);
      url.searchParams.set('log_level', select.value);
      window.history.replaceState(null, '', url.pathname + url.search + url.hash);
    }
    if (select) { select.addEventListener('change', applyLevel); applyLevel(); }
    if (panel.getAttribute('data-live') === '1') {
      var status = panel.getAttribute('data-status');
      setInterval(function () {
        if (document.hidden) { return; }
        getJSON(panel.getAttribute('data-api')).then(function (data) {
          if (data.status !== status) { window.location.reload(); }
        }).catch(function () {});
      }, refreshMs);
    }
  }

  // -- pages without a list API renderer (Scheduled, Workers): the server renders the part again and
  // it is swapped in when it changed, unless the reader is selecting text or using a control in it.

  function withoutTokens(html) {
    return html.replace(/name="csrfmiddlewaretoken" value="[^"]*"/g, '');
  }

  function setupPartRefresh(part) {
    var name = part.getAttribute('data-refresh-part');
    setInterval(function () {
      if (document.hidden) { return; }
      var selection = window.getSelection && window.getSelection();
      if (selection && !selection.isCollapsed && part.contains(selection.anchorNode)) { return; }
      if (part.contains(document.activeElement) && document.activeElement !== document.body) { return; }
      fetch(window.location.href, {credentials: 'same-origin'}).then(function (response) {
        if (!response.ok) { throw new Error(String(response.status)); }
        return response.text();
      }).then(function (html) {
        var fresh = new DOMParser().parseFromString(html, 'text/html')
          .querySelector('[data-refresh-part="' + name + '"]');
        if (fresh && withoutTokens(fresh.innerHTML) !== withoutTokens(part.innerHTML)) {
          part.replaceChildren.apply(part, Array.prototype.slice.call(fresh.childNodes).map(function (node) {
            return document.importNode(node, true);
          }));
        }
      }).catch(function () {});
    }, refreshMs);
  }

  document.querySelectorAll('[data-refresh-part]').forEach(setupPartRefresh);
  document.querySelectorAll('table.messages[data-api]').forEach(setupList);
  var detail = document.getElementById('task-detail');
  if (detail) { setupDetail(detail); }
  setupOverview();
}());
