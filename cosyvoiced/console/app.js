// The console's start: the key (asked for when the daemon wants one), the tabs, the voice
// list, and the pushed stream that feeds the board and the log tail.

import { ApiError, call, readEvents, setApiKey } from "./api.js";
import { setupBoard, showBoard } from "./board.js";
import { setupClone, showRegistered } from "./clone.js";
import { addLines, filterByJob, logsHidden, setupLogs } from "./logs.js";
import { setVoices, setupSpeak } from "./speak.js";

const $ = (id) => document.getElementById(id);
const RETRY_MS = [500, 1000, 2000, 5000];
let session = null;
let knownVoices = null;  // the daemon's voice names, as the board last said
let stream = null;  // AbortController of the event stream

function status(text, bad = false) {
  $("status").textContent = text;
  $("status").className = bad ? "error" : "";
}

function selectTab(name) {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    const selected = tab.getAttribute("aria-controls") === name;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(tab.getAttribute("aria-controls")).hidden = !selected;
  }
}

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  tabs.forEach((tab, index) => {
    tab.addEventListener("click", () => selectTab(tab.getAttribute("aria-controls")));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      const next = tabs[(index + step + tabs.length) % tabs.length];
      next.focus();
      selectTab(next.getAttribute("aria-controls"));
    });
  });
  selectTab("speak");
}

function askForKey(message) {
  const form = $("key-form");
  form.hidden = false;
  if (message) $("key-message").textContent = message;
  $("key-input").focus();
  status("An API key is needed.", true);
}

/** A refusal for want of a key brings the key form back. */
function report(error) {
  if (error instanceof ApiError && error.status === 401) askForKey(error.message);
}

async function loadVoices() {
  try {
    const answer = await call("v1/audio/voices");
    const voices = answer.voices || answer.data || [];
    setVoices(voices, answer.aliases || {});
    showRegistered(voices, loadVoices);
  } catch (error) {
    report(error);
  }
}

async function follow() {
  stream?.abort();
  stream = new AbortController();
  const mine = stream;
  for (let attempt = 0; !mine.signal.aborted; attempt += 1) {
    try {
      status("live");
      await readEvents("console/events", {
        board: (board) => {
          status(`live · ${board.engine || "engine loading"}${board.ready ? "" : " (loading)"}` +
            `${board.stopping ? " · stopping" : ""} · ${board.jobs.length} in hand`);
          showBoard(board, session.act);
          const voices = JSON.stringify(board.voices);
          if (knownVoices !== null && voices !== knownVoices) loadVoices();
          knownVoices = voices;
          attempt = 0;
        },
        log: (event) => addLines(event.lines),
      }, mine.signal);
    } catch (error) {
      if (mine.signal.aborted) return;
      if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
        report(error);
        return;
      }
    }
    status("reconnecting…", true);
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS[Math.min(attempt, RETRY_MS.length - 1)]));
  }
}

async function start() {
  try {
    session = await call("console/session");
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      askForKey(error.message);
      return;
    }
    status(`cannot reach the daemon: ${error.message}`, true);
    setTimeout(start, 2000);
    return;
  }
  $("key-form").hidden = true;
  $("key-change").hidden = !session.keys;
  if (!session.logs) logsHidden("The log tail needs an admin key.");
  await loadVoices();
  follow();
}

function setupKey() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey($("key-input").value.trim());
    $("key-input").value = "";
    start();
  });
  $("key-change").addEventListener("click", () => askForKey());
}

setupTabs();
setupKey();
setupSpeak();
setupClone(loadVoices, () => selectTab("speak"));
setupLogs();
setupBoard({
  showLogs: (jobId) => { filterByJob(jobId); selectTab("logs"); $("tab-logs").focus(); },
  report,
});
start();
