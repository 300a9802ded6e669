// Speak: the API's POST v1/audio/speech. PCM is played with Web Audio as it streams in
// (first audio as soon as the first chunk is here); other formats play when whole.

import { authHeaders, errorOf } from "./api.js";

const PCM_RATE = 24000;  // OpenAI's pcm: 16-bit little-endian mono at 24 kHz
const $ = (id) => document.getElementById(id);

let audioContext = null;
let current = null;  // { abort: AbortController, sources: [] }
let shownUrl = null;  // the last result's blob, as the player and the download link name it

export function setVoices(voices, aliases = {}) {
  const select = $("speak-voice");
  const chosen = select.value;
  select.replaceChildren(...voices.map((voice) => new Option(
    voice.kind === "registered" ? `${voice.name} (cloned)` : voice.name, voice.name)));
  for (const [alias, target] of Object.entries(aliases)) {
    select.append(new Option(`${alias} → ${target}`, alias));
  }
  if ([...select.options].some((option) => option.value === chosen)) select.value = chosen;
}

export function speakOnce(extra) {
  speak(extra).catch(showError);
}

export function setupSpeak() {
  $("speak-form").addEventListener("submit", (event) => {
    event.preventDefault();
    speak().catch(showError);
  });
  $("speak-stop").addEventListener("click", stop);
}

function showError(error) {
  if (error.name === "AbortError") return;
  const result = $("speak-result");
  result.className = "error";
  result.textContent = error.code ? `${error.code}: ${error.message}` : String(error.message);
  $("speak-go").disabled = false;
  $("speak-stop").disabled = true;
}

function stop() {
  if (current) {
    current.abort.abort();
    for (const source of current.sources) source.stop();
  }
}

/** Speak the Speak form's text; `extra` adds request fields (a one-off `clone`). */
export async function speak(extra = {}) {
  stop();
  const format = $("speak-format").value;
  const body = {
    model: "cosyvoiced", input: $("speak-text").value, voice: $("speak-voice").value,
    speed: Number($("speak-speed").value) || 1, response_format: format,
  };
  const instruct = $("speak-instruct").value.trim();
  if (instruct) body.instructions = instruct;
  Object.assign(body, extra);
  current = { abort: new AbortController(), sources: [] };
  const result = $("speak-result");
  result.className = "";
  result.textContent = "Waiting for the first audio…";
  result.removeAttribute("data-samples");
  $("speak-go").disabled = true;
  $("speak-stop").disabled = false;
  $("speak-download").hidden = true;
  $("speak-audio").hidden = true;
  if (format === "pcm" && !audioContext) audioContext = new AudioContext();
  const began = performance.now();
  const response = await fetch("v1/audio/speech", {
    method: "POST", headers: authHeaders({ "Content-Type": "application/json" }),
    body: JSON.stringify(body), signal: current.abort.signal,
  });
  if (!response.ok) throw await errorOf(response);
  const job = response.headers.get("X-Cosyvoiced-Job") || "";
  result.dataset.job = job;
  const play = format === "pcm" ? new PcmPlayer(audioContext, current.sources) : null;
  const parts = [];
  let firstMs = null;
  const reader = response.body.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    if (firstMs === null) {
      firstMs = performance.now() - began;
      result.textContent = `First audio after ${Math.round(firstMs)} ms…`;
    }
    if (play) play.add(value);
    else parts.push(value);
  }
  const wallS = (performance.now() - began) / 1000;
  let seconds;
  let url;
  if (play) {
    play.flush();
    seconds = play.samples / PCM_RATE;
    url = showBlob(wavBlob(play.pcm(), PCM_RATE));
    result.dataset.samples = String(play.samples);
    result.dataset.scheduled = String(play.scheduled);
    result.dataset.rms = play.rms().toFixed(4);
    result.dataset.sampleRate = String(PCM_RATE);
  } else {
    url = showBlob(new Blob(parts, { type: response.headers.get("Content-Type") || "audio/*" }));
    const audio = $("speak-audio");
    audio.src = url;
    audio.hidden = false;
    await audio.play().catch(() => {});
    seconds = await durationOf(audio);
  }
  result.dataset.firstAudioMs = String(Math.round(firstMs ?? 0));
  result.textContent = `Job ${job}: ${seconds.toFixed(2)} s of audio; first audio after ` +
    `${Math.round(firstMs ?? 0)} ms; real-time factor ${(wallS / Math.max(seconds, 1e-6)).toFixed(2)}` +
    " (wall time ÷ audio time).";
  const download = $("speak-download");
  download.href = url;
  download.download = `${job || "speech"}.${format === "pcm" ? "wav" : format}`;
  download.hidden = false;
  $("speak-go").disabled = false;
  $("speak-stop").disabled = true;
}

/** A URL for the newest result's audio; the one before it is let go (a blob's URL holds
 * all of its audio for as long as the page is open). */
function showBlob(blob) {
  if (shownUrl) URL.revokeObjectURL(shownUrl);
  shownUrl = URL.createObjectURL(blob);
  return shownUrl;
}

function durationOf(audio) {
  return new Promise((resolve) => {
    if (Number.isFinite(audio.duration)) resolve(audio.duration);
    else audio.addEventListener("loadedmetadata", () => resolve(audio.duration || 0), { once: true });
  });
}

/** Turns streamed s16le bytes into AudioBuffers played back to back. */
class PcmPlayer {
  constructor(context, sources) {
    this.context = context;
    this.sources = sources;
    this.carry = null;  // an odd byte left from the last piece
    this.next = 0;
    this.samples = 0;
    this.scheduled = 0;  // samples handed to Web Audio
    this.squares = 0;
    this.chunks = [];
  }

  add(bytes) {
    let data = bytes;
    if (this.carry !== null) {
      data = new Uint8Array(bytes.length + 1);
      data[0] = this.carry;
      data.set(bytes, 1);
      this.carry = null;
    }
    if (data.length % 2) {
      this.carry = data[data.length - 1];
      data = data.subarray(0, data.length - 1);
    }
    if (!data.length) return;
    const pcm = new Int16Array(data.slice().buffer);
    this.chunks.push(pcm);
    this.samples += pcm.length;
    const buffer = this.context.createBuffer(1, pcm.length, PCM_RATE);
    const channel = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i += 1) {
      channel[i] = pcm[i] / 32768;
      this.squares += channel[i] * channel[i];
    }
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.context.destination);
    this.next = Math.max(this.next, this.context.currentTime + 0.05);
    source.start(this.next);
    this.scheduled += buffer.length;
    this.next += buffer.duration;
    this.sources.push(source);
  }

  flush() { this.carry = null; }

  rms() { return this.samples ? Math.sqrt(this.squares / this.samples) : 0; }

  pcm() {
    const all = new Int16Array(this.samples);
    let at = 0;
    for (const chunk of this.chunks) { all.set(chunk, at); at += chunk.length; }
    return all;
  }
}

/** A 16-bit mono WAV file of `pcm`. */
export function wavBlob(pcm, rate) {
  const header = new DataView(new ArrayBuffer(44));
  const text = (at, s) => [...s].forEach((c, i) => header.setUint8(at + i, c.charCodeAt(0)));
  text(0, "RIFF"); header.setUint32(4, 36 + pcm.byteLength, true); text(8, "WAVE");
  text(12, "fmt "); header.setUint32(16, 16, true); header.setUint16(20, 1, true);
  header.setUint16(22, 1, true); header.setUint32(24, rate, true);
  header.setUint32(28, rate * 2, true); header.setUint16(32, 2, true);
  header.setUint16(34, 16, true); text(36, "data"); header.setUint32(40, pcm.byteLength, true);
  return new Blob([header, pcm], { type: "audio/wav" });
}
