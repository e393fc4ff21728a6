// Corrections, only when the server runs with `mnistrec serve --collect DIR`: under a prediction of a drawing,
// "Wrong? It was a [0] … [9]" sends that drawing (the PNG the prediction was made from) with the right digit.
// The server picks the file name; nothing collected is ever served back.
"use strict";

(async () => {
  const box = document.getElementById("correct"), digits = document.getElementById("correct-digits");
  const status = document.getElementById("correct-status");
  let shown = null;  // the digit the model said for the drawing on the pad, or null
  let response;
  try {
    response = await fetch("/api/corrections");
  } catch (err) {
    return;
  }
  if (!response.ok) return;  // collecting is off: the route does not exist

  for (let d = 0; d < 10; d++) {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = String(d);
    button.dataset.digit = String(d);
    button.setAttribute("aria-label", `It was a ${d}`);
    button.addEventListener("click", () => send(d));
    digits.append(button);
  }

  async function send(digit) {
    const blob = await window.mnistrecDrawingPng();
    const image = await new Promise((resolve) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.readAsDataURL(blob);
    });
    status.classList.remove("error");
    status.textContent = "Saving…";
    let answer, body;
    try {
      answer = await fetch("/api/corrections", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ image, digit }),
      });
      body = await answer.json().catch(() => ({}));
    } catch (err) {
      answer = null;
    }
    if (answer && answer.ok) {
      status.textContent = `Saved as a ${digit} (${body.count} saved). \`mnistrec finetune --images DIR\` learns from them.`;
      document.body.dataset.corrections = String(body.count);
    } else {
      status.classList.add("error");
      status.textContent = answer ? (body.detail || `HTTP ${answer.status}`) : "The server cannot be reached.";
    }
  }

  document.addEventListener("mnistrec:prediction", (event) => {
    shown = event.detail.drawing ? event.detail.digit : null;
    box.hidden = shown === null;
    status.textContent = "";
    for (const button of digits.children) button.disabled = Number(button.dataset.digit) === shown;
  });
  document.addEventListener("mnistrec:reset", () => {
    shown = null;
    box.hidden = true;
  });
})();
