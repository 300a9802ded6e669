// The board: jobs in hand and ended, workers, cache, cluster and its hosts, as the daemon
// pushes them.
// Rows are kept by id and updated in place, so a button keeps its focus across updates.

import { call } from "./api.js";

const $ = (id) => document.getElementById(id);
// job id -> its last row in hand (voice, segments): for ended rows. Only the ids on the
// board now are kept, or a page open for days would keep every job it was ever shown.
const seen = new Map();
let handlers = { showLogs: () => {}, report: () => {} };

export function setupBoard(given) {
  handlers = given;
  $("reload-config").addEventListener("click", () => act("console/reload", {}, "Reloading the config"));
}

async function act(path, body, doing) {
  const out = $("action-result");
  out.className = "";
  out.textContent = `${doing}…`;
  try {
    await call(path, { method: "POST", json: body });
    out.className = "ok";
    out.textContent = `${doing}: asked.`;
  } catch (error) {
    out.className = "error";
    out.textContent = `${doing}: refused: ${error.code}: ${error.message}`;
    handlers.report(error);
  }
}

function cell(row, index) {
  while (row.cells.length <= index) row.insertCell();
  return row.cells[index];
}

function setText(row, index, text) {
  const target = cell(row, index);
  if (target.textContent !== text) target.textContent = text;
}

function button(label, title, onClick, className = "secondary") {
  const made = document.createElement("button");
  made.type = "button";
  made.className = className;
  made.textContent = label;
  made.setAttribute("aria-label", title);
  made.addEventListener("click", onClick);
  return made;
}

/** Make `tbody` hold one row per item, in order, reusing the rows of the same id. */
function sync(tbody, items, fill) {
  const rows = new Map([...tbody.rows].map((row) => [row.dataset.id, row]));
  items.forEach((item, index) => {
    let row = rows.get(item.id);
    if (!row) {
      row = document.createElement("tr");
      row.dataset.id = item.id;
    }
    rows.delete(item.id);
    fill(row, item);
    if (tbody.rows[index] !== row) tbody.insertBefore(row, tbody.rows[index] || null);
  });
  for (const row of rows.values()) row.remove();
}

function idCell(row, id) {
  const target = cell(row, 0);
  if (!target.firstChild) target.append(document.createElement("code"));
  target.firstChild.textContent = id;
}

function actionsCell(row, index, job, cancellable) {
  const target = cell(row, index);
  if (target.dataset.filled === String(cancellable)) return;
  target.dataset.filled = String(cancellable);
  const logs = button("Logs", `Show the log lines of job ${job.id}`, () => handlers.showLogs(job.id));
  const parts = [logs];
  if (cancellable) {
    parts.unshift(button("Cancel", `Cancel job ${job.id}`, () => act(
      "console/cancel", { job: job.id }, `Cancelling ${job.id}`), "danger"));
  }
  target.replaceChildren(...parts);
}

function jobRow(row, job) {
  seen.set(job.id, job);
  row.dataset.state = job.state;
  idCell(row, job.id);
  setText(row, 1, job.source);
  setText(row, 2, job.voice || "default");
  const progress = cell(row, 3);
  let bar = progress.querySelector("progress");
  if (!bar) {
    bar = document.createElement("progress");
    progress.replaceChildren(bar, document.createElement("span"));
  }
  bar.max = job.segments || 1;
  bar.value = job.segments_done || 0;
  const words = job.state === "queued" ? `queued${job.position !== undefined ? `, #${job.position + 1}` : ""}`
    : `${job.segments_done ?? 0}/${job.segments ?? "?"} segments` + (job.cancelling ? ", cancelling" : "");
  bar.setAttribute("aria-label", `${job.id}: ${words}`);
  progress.lastChild.textContent = ` ${words}`;
  setText(row, 4, job.first_chunk_s ? `${Math.round(job.first_chunk_s * 1000)} ms` : "");
  setText(row, 5, job.served_by || "");
  actionsCell(row, 6, job, !job.cancelling && job.state !== "writing");
}

function endedRow(row, job) {
  const earlier = seen.get(job.id) || {};
  row.dataset.state = job.state;
  idCell(row, job.id);
  setText(row, 1, job.source || "");
  setText(row, 2, earlier.voice || "");
  const outcome = job.state === "failed" ? `failed: ${job.code}: ${job.message}`
    : job.state + (job.cached ? " (from the cache)" : "");
  setText(row, 3, outcome);
  cell(row, 3).className = job.state === "failed" ? "error" : "";
  setText(row, 4, job.served_by || "");
  actionsCell(row, 5, job, false);
}

function mib(bytes) {
  return `${Math.round((bytes || 0) / 1048576)} MiB`;
}

function meterLine(card, label, used, limit) {
  const line = document.createElement("div");
  const name = document.createElement("span");
  name.textContent = `${label} ${mib(used)}${limit ? ` of ${mib(limit)}` : " (no limit)"} `;
  line.append(name);
  if (limit) {
    const meter = document.createElement("meter");
    meter.min = 0;
    meter.max = limit;
    meter.high = limit * 0.8;
    meter.value = Math.min(used || 0, limit);
    meter.setAttribute("aria-label", `${label} against its limit`);
    line.append(meter);
  }
  card.append(line);
}

function workerCard(worker, canAct) {
  const card = document.createElement("article");
  card.className = "card";
  card.dataset.slot = String(worker.slot);
  card.dataset.pid = String(worker.pid);
  card.dataset.state = worker.state;
  const title = document.createElement("h3");
  title.textContent = `Worker ${worker.slot}${worker.role === "spare" ? " (spare)" : ""} · ${worker.device}`;
  const facts = document.createElement("p");
  facts.textContent = `${worker.state}, pid ${worker.pid}, generation ${worker.generation}, ` +
    `${worker.segments_served} segments served` +
    (worker.max_streams > 1 ? `, ${worker.streams}/${worker.max_streams} streams` : "") +
    (worker.jobs && worker.jobs.length ? `, ${worker.jobs.length > 1 ? "jobs" : "job"} ${worker.jobs.join(", ")}` : "");
  card.append(title, facts);
  meterLine(card, "RSS", worker.rss_bytes, worker.rss_limit);
  if (worker.gpu_peak_bytes !== null && worker.gpu_peak_bytes !== undefined) {
    meterLine(card, "GPU", worker.gpu_peak_bytes, worker.gpu_memory_limit);
  }
  const recycled = document.createElement("p");
  recycled.className = "hint";
  recycled.textContent = worker.last_recycle
    ? `Last recycle: ${worker.last_recycle.reason}, ${new Date(worker.last_recycle.at * 1000).toLocaleTimeString()}`
    : "Not recycled yet.";
  card.append(recycled);
  if (worker.role !== "spare") {
    const recycle = button("Recycle", `Recycle worker ${worker.slot}`, () => act(
      "console/recycle", { slot: worker.slot }, `Recycling worker ${worker.slot}`));
    recycle.dataset.slot = String(worker.slot);
    recycle.disabled = !canAct;
    card.append(recycle);
  }
  return card;
}

function figures(list, data, empty) {
  const target = $(list);
  if (!data) {
    const none = document.createElement("dd");
    none.textContent = empty;
    target.replaceChildren(none);
    return;
  }
  target.replaceChildren(...Object.entries(data).flatMap(([key, value]) => {
    const term = document.createElement("dt");
    term.textContent = key.replaceAll("_", " ");
    const detail = document.createElement("dd");
    detail.textContent = typeof value === "object" && value !== null ? JSON.stringify(value) : String(value);
    return [term, detail];
  }));
}

function hostState(host) {
  if (host.me) return `${host.state} (this host)`;
  if (host.state === "stopped") return `stopped, ${host.seen_s_ago} s ago`;
  if (!host.alive) return `lost: not seen for ${host.seen_s_ago} s`;
  return `${host.state}, seen ${host.seen_s_ago} s ago`;
}

function hostRow(row, host) {
  row.dataset.alive = String(host.alive);
  row.dataset.me = String(host.me);
  if (!row.cells.length) {  // the host's name heads its row
    const name = document.createElement("th");
    name.scope = "row";
    row.append(name);
  }
  if (row.cells[0].textContent !== host.name) row.cells[0].textContent = host.name;
  setText(row, 1, hostState(host));
  cell(row, 1).className = host.alive || host.state === "stopped" ? "" : "error";
  setText(row, 2, host.engine ?? "");
  setText(row, 3, host.workers === undefined ? "" : `${host.workers} (${host.idle} free)`);
  setText(row, 4, String(host.queued ?? ""));
  setText(row, 5, String(host.running ?? ""));
  setText(row, 6, String(host.for_others ?? ""));
}

function showHosts(hosts) {
  $("hosts").hidden = !hosts;
  sync($("hosts-table").tBodies[0], (hosts || []).map((host) => ({ ...host, id: host.name })), hostRow);
}

function forgetAllBut(shown) {
  const ids = new Set(shown.map((job) => job.id));
  for (const id of seen.keys()) if (!ids.has(id)) seen.delete(id);
}

let lastWorkers = "";

export function showBoard(board, canAct) {
  sync($("jobs-table").tBodies[0], board.jobs, jobRow);
  $("jobs-empty").hidden = board.jobs.length > 0;
  sync($("ended-table").tBodies[0], board.ended, endedRow);
  forgetAllBut([...board.jobs, ...board.ended]);
  const workers = JSON.stringify([board.workers, canAct]);
  if (workers !== lastWorkers) {  // cards are rebuilt only when something in them changed
    const focused = document.activeElement?.dataset?.slot;
    lastWorkers = workers;
    $("worker-list").replaceChildren(...board.workers.map((worker) => workerCard(worker, canAct)));
    if (focused !== undefined) {
      document.querySelector(`#worker-list button[data-slot="${focused}"]`)?.focus();
    }
  }
  figures("cache-figures", board.cache, "off");
  figures("cluster-figures", board.cluster, "no cluster: this host serves alone");
  showHosts(board.hosts);
  $("reload-config").disabled = !canAct;
}
