// The live log tail: the daemon's structured lines (JSON), filtered here by level and job.

const $ = (id) => document.getElementById(id);
const LEVELS = ["debug", "info", "warning", "error", "critical"];
const KEPT = 1000;  // lines kept in the page
const lines = [];  // parsed records, oldest first

export function setupLogs() {
  $("log-level").addEventListener("change", render);
  $("log-job").addEventListener("input", render);
}

export function filterByJob(jobId) {
  $("log-job").value = jobId;
  render();
}

export function addLines(rendered) {
  for (const text of rendered) {
    let record;
    try {
      record = JSON.parse(text);
    } catch (_ignored) {
      record = { event: text, level: "info" };
    }
    lines.push(record);
  }
  lines.splice(0, Math.max(0, lines.length - KEPT));
  render();
}

export function logsHidden(reason) {
  $("log-note").textContent = reason;
}

function shown(record, level, job) {
  const rank = LEVELS.indexOf(record.level);
  if (rank >= 0 && rank < LEVELS.indexOf(level)) return false;
  return !job || record.job === job || (typeof record.job === "string" && record.job.startsWith(job));
}

function describe(record) {
  const { timestamp, level, event, ...rest } = record;
  const time = typeof timestamp === "string" ? timestamp.slice(11, 23) : "";
  const detail = Object.entries(rest)
    .filter(([key]) => !["logger", "proc", "pid"].includes(key))
    .map(([key, value]) => `${key}=${typeof value === "string" ? value : JSON.stringify(value)}`)
    .join(" ");
  return `${time} ${level || ""} ${event || ""} ${detail}`;
}

function render() {
  const level = $("log-level").value;
  const job = $("log-job").value.trim();
  const list = $("log-lines");
  const stick = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
  list.replaceChildren(...lines.filter((record) => shown(record, level, job)).map((record) => {
    const item = document.createElement("li");
    item.dataset.level = record.level || "";
    if (record.job) item.dataset.job = String(record.job);
    item.textContent = describe(record);
    return item;
  }));
  if (stick) list.scrollTop = list.scrollHeight;
}
