// The drawing page: strokes on a canvas -> PNG -> POST /api/predict -> bars and the 28x28 the model saw.
// Plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const API = "/api/predict?include_image=true&top_k=3";
const PAUSE_MS = 50;      // while drawing, a pause this long asks for a prediction (one request in flight at most)
const WAITING_MS = 150;   // "Reading…" shows only for answers slower than this: a fast one never flickers
const EXPORT_SIZE = 280;   // stroke widths are given for a 280 px pad
const SEND_SIZE = 140;     // the drawing is sent as a 140x140 PNG, dark ink on white like paper: plenty for 20 px
                           // digits, and a quarter of the pixels for the server's preprocessing

const $ = (id) => document.getElementById(id);
const canvas = $("canvas"), pad = $("pad"), hint = $("hint");
const ctx = canvas.getContext("2d");
const widthInput = $("width"), widthValue = $("width-value");
const statusEl = $("status"), digitEl = $("digit"), confidenceEl = $("confidence");
const barsEl = $("bars"), seen = $("seen");

// Strokes in coordinates relative to the pad (0..1), so undo and resizing just redraw them.
let strokes = [];
let current = null;
let uploaded = null;     // {bitmap, name} when the pad shows an uploaded image
let timer = null;
let waitingTimer = null;
let sequence = 0;        // bumped by every new input: only the answer to the newest one is shown
let latest = null;       // {make, label}: the newest input not yet sent
let inFlight = false;
let waitingFor = "";     // the label "Reading …" names
let edits = 0;           // bumped by every change to the strokes: which drawing a request is for
let asked = null;        // the input (edits count or File) whose answer is shown or on its way
let predictions = 0;

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

// ---------------------------------------------------------------- drawing

function resizeCanvas() {
  const ratio = window.devicePixelRatio || 1;
  const rect = canvas.getBoundingClientRect();
  canvas.width = Math.max(1, Math.round(rect.width * ratio));
  canvas.height = Math.max(1, Math.round(rect.height * ratio));
  render();
}

function drawStrokes(context, size, ink) {
  context.strokeStyle = ink;
  context.fillStyle = ink;
  context.lineCap = "round";
  context.lineJoin = "round";
  for (const stroke of strokes) {
    const width = stroke.width / EXPORT_SIZE * size;
    const pts = stroke.points;
    if (pts.length === 1) {
      context.beginPath();
      context.arc(pts[0][0] * size, pts[0][1] * size, width / 2, 0, 2 * Math.PI);
      context.fill();
      continue;
    }
    context.lineWidth = width;
    context.beginPath();
    context.moveTo(pts[0][0] * size, pts[0][1] * size);
    for (const [x, y] of pts.slice(1)) context.lineTo(x * size, y * size);
    context.stroke();
  }
}

function drawFitted(context, bitmap, size) {
  const scale = Math.min(size / bitmap.width, size / bitmap.height);
  const w = bitmap.width * scale, h = bitmap.height * scale;
  context.drawImage(bitmap, (size - w) / 2, (size - h) / 2, w, h);
}

function render() {
  const size = canvas.width;
  ctx.fillStyle = css("--pad-bg") || "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (uploaded) drawFitted(ctx, uploaded.bitmap, size);
  drawStrokes(ctx, size, css("--ink") || "#111");
  hint.classList.toggle("hidden", strokes.length > 0 || uploaded !== null);
}

function point(event) {
  const rect = canvas.getBoundingClientRect();
  return [(event.clientX - rect.left) / rect.width, (event.clientY - rect.top) / rect.height];
}

canvas.addEventListener("pointerdown", (event) => {
  if (event.pointerType === "mouse" && event.button !== 0) return;
  event.preventDefault();
  canvas.setPointerCapture(event.pointerId);
  if (uploaded) { uploaded = null; strokes = []; }  // drawing starts a new digit
  current = { width: Number(widthInput.value), points: [point(event)] };
  strokes.push(current);
  edits += 1;
  render();
});

canvas.addEventListener("pointermove", (event) => {
  if (!current) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of (events.length ? events : [event])) current.points.push(point(e));
  edits += 1;
  render();
  schedulePrediction();
});

function endStroke() {
  if (!current) return;
  current = null;
  predictDrawing();
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

function undo() {
  if (uploaded) { clearAll(); return; }
  strokes.pop();
  edits += 1;
  render();
  strokes.length ? predictDrawing() : resetResult();
}

function clearAll() {
  strokes = [];
  uploaded = null;
  render();
  resetResult();
}

$("undo").addEventListener("click", undo);
$("clear").addEventListener("click", clearAll);
widthInput.addEventListener("input", () => { widthValue.textContent = widthInput.value; });

document.addEventListener("keydown", (event) => {
  const typing = event.target instanceof HTMLInputElement && event.target.type !== "range";
  if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z" && !typing) {
    event.preventDefault();
    undo();
  } else if (event.key === "Escape" && !typing) {
    clearAll();
  }
});

// ---------------------------------------------------------------- images from files, drops and the clipboard

async function useFile(file) {
  if (!file) return;
  dropPending();  // the file is the newest input: an answer still on its way is not shown
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name || "that file"} is not an image`);
    return;
  }
  waitingFor = file.name || "pasted image";
  busy(true);
  strokes = [];
  try {
    uploaded = { bitmap: await createImageBitmap(file), name: file.name || "pasted image" };
  } catch (err) {
    uploaded = null;  // the browser cannot show it; the server may still read it (TIFF, …)
  }
  render();
  if (!uploaded) hint.classList.add("hidden");
  request(() => file, file.name || "pasted image", file);
}

$("file").addEventListener("change", (event) => {
  useFile(event.target.files[0]);
  event.target.value = "";  // choosing the same file again still triggers
});

pad.addEventListener("dragover", (event) => { event.preventDefault(); pad.classList.add("dragover"); });
pad.addEventListener("dragleave", () => pad.classList.remove("dragover"));
pad.addEventListener("drop", (event) => {
  event.preventDefault();
  pad.classList.remove("dragover");
  useFile(event.dataTransfer.files[0]);
});

document.addEventListener("paste", (event) => {
  const item = [...(event.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
  if (item) { event.preventDefault(); useFile(item.getAsFile()); }
});

// ---------------------------------------------------------------- prediction
// At most one request is in flight. Input that arrives meanwhile replaces `latest`; when the answer comes back
// it is shown only if nothing newer was asked for, else the newest input is sent at once.

function schedulePrediction() {
  clearTimeout(timer);
  timer = setTimeout(predictDrawing, PAUSE_MS);
}

// The drawing as an 8-bit greyscale PNG, encoded here. The canvas's own PNG is RGBA: four bytes a pixel that the
// server decodes and converts to grey, ~0.2 ms of its ~0.5 ms preprocessing for a 140x140 drawing. Black ink on
// white has R = G = B, so the grey is the red channel: the very levels Pillow's RGBA -> L conversion gave.
// Without CompressionStream (browsers before 2023) the canvas's own PNG is sent.
async function drawingPng() {
  const off = document.createElement("canvas");
  off.width = off.height = SEND_SIZE;
  const c = off.getContext("2d", { willReadFrequently: true });
  c.fillStyle = "#fff";
  c.fillRect(0, 0, SEND_SIZE, SEND_SIZE);
  drawStrokes(c, SEND_SIZE, "#000");
  if (typeof CompressionStream === "undefined") return canvasPng(off);
  const rgba = c.getImageData(0, 0, SEND_SIZE, SEND_SIZE).data;
  const row = SEND_SIZE + 1;  // each row: filter type 0 (none), then its pixels
  const raw = new Uint8Array(SEND_SIZE * row);
  for (let y = 0; y < SEND_SIZE; y++) {
    for (let x = 0; x < SEND_SIZE; x++) raw[y * row + 1 + x] = rgba[4 * (y * SEND_SIZE + x)];
  }
  const deflated = new Response(new Blob([raw]).stream().pipeThrough(new CompressionStream("deflate")));
  const header = new Uint8Array(13);
  new DataView(header.buffer).setUint32(0, SEND_SIZE);
  new DataView(header.buffer).setUint32(4, SEND_SIZE);
  header.set([8, 0, 0, 0, 0], 8);  // 8 bits, greyscale, deflate, standard filters, not interlaced
  return new Blob([PNG_SIGNATURE, pngChunk("IHDR", header), pngChunk("IDAT", new Uint8Array(await deflated.arrayBuffer())),
    pngChunk("IEND", new Uint8Array(0))], { type: "image/png" });
}

const PNG_SIGNATURE = new Uint8Array([137, 80, 78, 71, 13, 10, 26, 10]);
const CRC_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});

// A PNG chunk: length, type, data, and the CRC-32 of type and data.
function pngChunk(type, data) {
  const chunk = new Uint8Array(12 + data.length);
  const view = new DataView(chunk.buffer);
  view.setUint32(0, data.length);
  for (let i = 0; i < 4; i++) chunk[4 + i] = type.charCodeAt(i);
  chunk.set(data, 8);
  let crc = 0xffffffff;
  for (let i = 4; i < 8 + data.length; i++) crc = CRC_TABLE[(crc ^ chunk[i]) & 0xff] ^ (crc >>> 8);
  view.setUint32(8 + data.length, (crc ^ 0xffffffff) >>> 0);
  return chunk;
}

// The canvas's own (RGBA) PNG, encoded now. canvas.toBlob and OffscreenCanvas.convertToBlob wait for an idle
// period, which Chromium gives a busy page only after a 1 s timeout; toDataURL encodes at once (~1 ms for 140x140).
function canvasPng(canvas) {
  const url = canvas.toDataURL("image/png");
  const bytes = Uint8Array.from(atob(url.slice(url.indexOf(",") + 1)), (ch) => ch.charCodeAt(0));
  return new Blob([bytes], { type: "image/png" });
}

function predictDrawing() {
  clearTimeout(timer);
  if (!strokes.length) return;
  request(drawingPng, "your drawing", edits);
}

// data-busy is on <body> from the moment a prediction is asked for until the newest answer is shown;
// data-waiting (the visible "Reading…") only once that has taken WAITING_MS, so a fast answer never flickers.
function busy(on) {
  if (on && !("busy" in document.body.dataset)) {
    document.body.dataset.busy = "true";
    waitingTimer = setTimeout(showWaiting, WAITING_MS);
  } else if (!on) {
    clearTimeout(waitingTimer);
    delete document.body.dataset.busy;
    delete document.body.dataset.waiting;
  }
}

function showWaiting() {
  document.body.dataset.waiting = "true";
  statusEl.classList.remove("error");
  statusEl.textContent = `Reading ${waitingFor}…`;
}

// Forget every input not yet answered: answers still on their way are dropped when they arrive.
function dropPending() {
  sequence += 1;
  latest = null;
  asked = null;
  busy(false);
}

// Ask for a prediction of `make()` (a Blob or a promise of one, built only when it is sent) for the input `key`; newest input wins.
// The pen lifted after a pause asks again for the drawing the pause asked for: that answer is already coming.
function request(make, label, key) {
  if (key === asked) return;
  asked = key;
  sequence += 1;
  latest = { make, label };
  waitingFor = label;
  busy(true);
  if (!inFlight) send();
}

async function send() {
  const mine = sequence, { make, label } = latest;
  latest = null;
  inFlight = true;
  const blob = await make();
  let response, body, failed = false;
  try {
    response = await fetch(API, {
      method: "POST",
      headers: { "Content-Type": blob.type || "application/octet-stream" },
      body: blob,
    });
    body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
  } catch (err) {
    failed = true;
  }
  inFlight = false;
  if (mine !== sequence) {  // something newer was asked for meanwhile: this answer is stale
    if (latest) send();
    return;
  }
  busy(false);
  if (failed) showError("The server cannot be reached.");
  else if (!response.ok) showError(body.detail || `HTTP ${response.status}`);
  else showResult(body, label);
}

function buildBars() {
  barsEl.replaceChildren();
  for (let d = 0; d < 10; d++) {
    const li = document.createElement("li");
    li.dataset.digit = String(d);
    li.innerHTML = `<span class="label">${d}</span><span class="bar"><span class="fill"></span></span><span class="pct">–</span>`;
    li.setAttribute("aria-label", `${d}: no prediction yet`);
    barsEl.append(li);
  }
}

function showResult(result, label) {
  predictions += 1;
  document.body.dataset.predictions = String(predictions);
  digitEl.textContent = String(result.digit);
  // Below the calibrated-confidence threshold the server sets `unsure`: say so and name the two likeliest digits.
  const [first, second] = result.top_k, pc = (t) => `${t.digit} (${(100 * t.probability).toFixed(0)}%)`;
  confidenceEl.textContent = result.unsure && second ? `Not sure: ${pc(first)} or ${pc(second)}?`
    : `${(100 * result.confidence).toFixed(1)}% sure`;
  confidenceEl.classList.toggle("unsure", Boolean(result.unsure));
  statusEl.textContent = `Prediction for ${label}.`;
  result.probabilities.forEach((p, d) => {
    const li = barsEl.children[d];
    const pct = `${(100 * p).toFixed(1)}%`;
    li.querySelector(".fill").style.width = `${Math.max(0, Math.min(100, 100 * p))}%`;
    li.querySelector(".pct").textContent = pct;
    li.classList.toggle("top", d === result.digit);
    li.setAttribute("aria-label", `${d}: ${pct}`);
  });
  if (result.image) drawSeen(result.image);
  // For collect.js (corrections, with `serve --collect`): which digit was shown, and for a drawing or a file.
  document.dispatchEvent(new CustomEvent("mnistrec:prediction",
    { detail: { digit: result.digit, drawing: label === "your drawing" } }));
}

function drawSeen(image) {
  const c = seen.getContext("2d");
  const data = c.createImageData(28, 28);
  image.forEach((row, y) => row.forEach((v, x) => {
    const i = 4 * (28 * y + x), g = Math.round(255 * v);  // ink = 1 is white, as MNIST
    data.data[i] = data.data[i + 1] = data.data[i + 2] = g;
    data.data[i + 3] = 255;
  }));
  c.putImageData(data, 0, 0);
}

function showError(message) {
  statusEl.textContent = message;
  statusEl.classList.add("error");
  digitEl.textContent = "?";
  confidenceEl.textContent = "";
}

function resetResult() {
  dropPending();
  digitEl.textContent = "–";
  confidenceEl.textContent = "";
  statusEl.classList.remove("error");
  statusEl.textContent = "Draw a digit to start.";
  buildBars();
  seen.getContext("2d").clearRect(0, 0, 28, 28);
  document.dispatchEvent(new CustomEvent("mnistrec:reset"));
}

window.mnistrecDrawingPng = drawingPng;  // collect.js sends the same PNG the prediction was made from
buildBars();
new ResizeObserver(resizeCanvas).observe(canvas);
window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", render);
resizeCanvas();
