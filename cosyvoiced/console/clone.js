// Clone: register a voice from an uploaded file or a microphone recording, through the
// voices API (POST v1/audio/voices, multipart: name, audio, text, language). A recording
// (MediaRecorder gives WebM/Opus, which the daemon's reader does not take) is decoded here
// and sent as a 16-bit WAV file.

import { authHeaders, errorOf, call } from "./api.js";
import { speakOnce, wavBlob } from "./speak.js";

const $ = (id) => document.getElementById(id);
let recorded = null;  // a Blob (WAV) from the microphone
let recorder = null;

export function setupClone(onVoicesChanged, showSpeak) {
  $("clone-once").addEventListener("click", () => cloneOnce(showSpeak).catch(showError));
  $("clone-form").addEventListener("submit", (event) => {
    event.preventDefault();
    register().then(onVoicesChanged).catch(showError);
  });
  $("clone-record").addEventListener("click", () => toggleRecording().catch(showError));
  $("clone-audio").addEventListener("change", () => {
    recorded = null;
    $("clone-recorded").textContent = "";
  });
}

export function showRegistered(voices, onRemoved) {
  const list = $("clone-voices");
  const registered = voices.filter((voice) => voice.kind === "registered");
  list.replaceChildren(...registered.map((voice) => {
    const item = document.createElement("li");
    item.append(`${voice.name} `);
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "danger";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove the voice ${voice.name}`);
    remove.addEventListener("click", () => call(
      `v1/audio/voices/${encodeURIComponent(voice.name)}`, { method: "DELETE" })
      .then(onRemoved).catch(showError));
    item.append(remove);
    return item;
  }));
  if (!registered.length) {
    const none = document.createElement("li");
    none.className = "hint";
    none.textContent = "None yet.";
    list.append(none);
  }
}

function showError(error) {
  const result = $("clone-result");
  result.className = "error";
  result.textContent = error.code ? `${error.code}: ${error.message}` : String(error.message);
}

/** Speak the Speak form's text once in the chosen audio's voice, registering nothing
 * (the speech API's `clone` field). */
async function cloneOnce(showSpeak) {
  const audio = recorded || $("clone-audio").files[0];
  if (!audio) throw new Error("Choose an audio file or record one first.");
  const bytes = new Uint8Array(await audio.arrayBuffer());
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  const clone = { audio: btoa(binary) };
  const text = $("clone-text").value.trim();
  if (text) clone.text = text;
  showSpeak();
  speakOnce({ clone });
}

async function register() {
  const audio = recorded || $("clone-audio").files[0];
  if (!audio) throw new Error("Choose an audio file or record one first.");
  const form = new FormData();
  form.append("name", $("clone-name").value.trim());
  form.append("text", $("clone-text").value.trim());
  const language = $("clone-language").value.trim();
  if (language) form.append("language", language);
  form.append("audio", audio, audio.name || "recording.wav");
  const result = $("clone-result");
  result.className = "";
  result.textContent = "Registering…";
  const response = await fetch("v1/audio/voices", {
    method: "POST", headers: authHeaders(), body: form,
  });
  if (!response.ok) throw await errorOf(response);
  result.className = "ok";
  result.textContent = `Registered the voice ${form.get("name")}: it is in the Speak list.`;
}

async function toggleRecording() {
  const button = $("clone-record");
  if (recorder) {
    recorder.stop();
    return;
  }
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const pieces = [];
  recorder = new MediaRecorder(stream);
  recorder.addEventListener("dataavailable", (event) => pieces.push(event.data));
  recorder.addEventListener("stop", async () => {
    stream.getTracks().forEach((track) => track.stop());
    recorder = null;
    button.textContent = "Record from the microphone";
    try {
      recorded = await toWav(new Blob(pieces, { type: pieces[0]?.type }));
      $("clone-recorded").textContent = `Recorded ${recorded.seconds.toFixed(1)} s.`;
    } catch (error) {
      showError(error);
    }
  });
  recorder.start();
  button.textContent = "Stop recording";
}

async function toWav(blob) {
  const context = new AudioContext();
  try {
    const decoded = await context.decodeAudioData(await blob.arrayBuffer());
    const channel = decoded.getChannelData(0);
    const pcm = new Int16Array(channel.length);
    for (let i = 0; i < channel.length; i += 1) {
      pcm[i] = Math.max(-32768, Math.min(32767, Math.round(channel[i] * 32767)));
    }
    const wav = wavBlob(pcm, decoded.sampleRate);
    wav.name = "recording.wav";
    wav.seconds = decoded.duration;
    return wav;
  } finally {
    context.close();
  }
}
