// The drawing page: strokes on a canvas -> PNG -> POST /api/predict -> bars and the 28x28 the model saw.
// Plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const API = "/api/predict?include_image=true&top_k=3";
const DEBOUNCE_MS = 120;   // while drawing, predict at most this often after the pen pauses
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
let sequence = 0;        // only the newest answer is shown
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
  render();
});

canvas.addEventListener("pointermove", (event) => {
  if (!current) return;
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of (events.length ? events : [event])) current.points.push(point(e));
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
  busy(true);
  if (file.type && !file.type.startsWith("image/")) {
    showError(`${file.name || "that file"} is not an image`);
    busy(false);
    return;
  }
  strokes = [];
  try {
    uploaded = { bitmap: await createImageBitmap(file), name: file.name || "pasted image" };
  } catch (err) {
    uploaded = null;  // the browser cannot show it; the server may still read it (TIFF, …)
  }
  render();
  if (!uploaded) hint.classList.add("hidden");
  predict(file, file.name || "pasted image");
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

function schedulePrediction() {
  clearTimeout(timer);
  timer = setTimeout(predictDrawing, DEBOUNCE_MS);
}

function predictDrawing() {
  clearTimeout(timer);
  if (!strokes.length) return;
  busy(true);
  const off = document.createElement("canvas");
  off.width = off.height = SEND_SIZE;
  const c = off.getContext("2d");
  c.fillStyle = "#fff";
  c.fillRect(0, 0, SEND_SIZE, SEND_SIZE);
  drawStrokes(c, SEND_SIZE, "#000");
  off.toBlob((blob) => predict(blob, "your drawing"), "image/png");
}

// data-busy is on <body> from the moment a prediction is asked for until the newest answer is shown.
function busy(on) {
  if (on) document.body.dataset.busy = "true";
  else delete document.body.dataset.busy;
}

async function predict(blob, label) {
  const mine = ++sequence;
  busy(true);
  statusEl.classList.remove("error");
  statusEl.textContent = `Reading ${label}…`;
  let response, body;
  try {
    response = await fetch(API, {
      method: "POST",
      headers: { "Content-Type": blob.type || "application/octet-stream" },
      body: blob,
    });
    body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
  } catch (err) {
    if (mine === sequence) { showError("The server cannot be reached."); busy(false); }
    return;
  }
  if (mine !== sequence) return;  // a newer drawing is on its way
  busy(false);
  if (!response.ok) { showError(body.detail || `HTTP ${response.status}`); return; }
  showResult(body, label);
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
  confidenceEl.textContent = `${(100 * result.confidence).toFixed(1)}% sure`;
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
  sequence += 1;  // drop answers still on their way
  busy(false);
  digitEl.textContent = "–";
  confidenceEl.textContent = "";
  statusEl.classList.remove("error");
  statusEl.textContent = "Draw a digit to start.";
  buildBars();
  seen.getContext("2d").clearRect(0, 0, 28, 28);
}

buildBars();
new ResizeObserver(resizeCanvas).observe(canvas);
window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", render);
resizeCanvas();
