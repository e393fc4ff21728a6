"""Page latency: from the pen leaving the pad (and from each pause while drawing) to the bars showing the answer.

Starts a real ``mnistrec serve`` on 127.0.0.1 and drives Debian's Chromium with Playwright: it draws
digits with the mouse (many small moves per stroke, like a hand) and, for every stroke, records in
the page (``performance.now()``, one clock):

- ``up``: the ``pointerup`` (a capturing listener on ``window``, before the page's own handler);
- ``request``: when the ``POST /api/predict`` left (Resource Timing ``startTime``) and its ``responseEnd``;
- ``dom``: when the page set ``data-predictions`` on ``<body>`` with nothing pending (a
  MutationObserver; the bars are updated in the same task), and ``frame``: the next animation frame.

It also pauses mid-stroke (mouse held down) and measures from the last ``pointermove`` to the answer:
that figure includes the page's deliberate pause detection (``PAUSE_MS`` in app.js).

Headless, and headful under ``xvfb-run`` where it exists. The reference in the same run is the
bare HTTP round trip of the same kind of request (a 140x140 PNG) from Python, sequential on one
connection: ``ratio_p50`` says what the page adds on top of the server.

    python benchmarks/bench_page_latency.py [--checkpoint mnist_model.pth] [--strokes 36] [--pauses 12]

Without a checkpoint it trains the seed model for one epoch on 6,000 images first.
Writes ``benchmarks/results/page_latency.json``.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from machine import machine_info  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]

# Recorded in the page, before app.js runs. `answerAfter(t)` resolves with the time of the answer shown after page
# time t with nothing pending (also when it came before the call); unless told to wait, with null at once when
# nothing is pending and no request left after t; with -1 after 20 s without an answer.
INIT_SCRIPT = """
(() => {
  const log = window.__latency = {ups: [], moves: 0, lastMove: 0, answers: [], frames: []};
  let waiters = [];
  window.addEventListener("pointerup", () => log.ups.push(performance.now()), true);
  window.addEventListener("pointermove", () => { log.moves += 1; log.lastMove = performance.now(); }, true);
  const settled = () => !("busy" in document.body.dataset);
  document.addEventListener("DOMContentLoaded", () => {
    new MutationObserver(() => {
      const now = performance.now();
      if (!settled()) return;
      log.answers.push(now);
      requestAnimationFrame(() => log.frames.push([now, performance.now()]));
      const ready = waiters.filter((w) => now > w.after);
      waiters = waiters.filter((w) => now <= w.after);
      ready.forEach((w) => w.resolve(now));
    }).observe(document.body, {attributes: true, attributeFilter: ["data-predictions"]});
  });
  window.__answerAfter = ([after, wait]) => new Promise((resolve) => {
    const asked = performance.getEntriesByType("resource").some((e) => e.name.includes("/api/predict") && e.startTime >= after);
    const answered = log.answers.filter((t) => t > after).at(-1);  // already there before this call
    if (settled() && answered !== undefined) resolve(answered);
    else if (!wait && settled() && !asked) resolve(null);
    else waiters.push({after, resolve});
    // No answer (an error shown instead, or a stuck page): say so rather than wait forever.
    setTimeout(() => resolve(-1), 20000);
  });
  window.__requestsAfter = (after) => performance.getEntriesByType("resource")
    .filter((e) => e.name.includes("/api/predict") && e.startTime >= after)
    .map((e) => ({start: e.startTime, requestStart: e.requestStart, responseStart: e.responseStart, end: e.responseEnd}));
})();
"""

# The PNG the page sends for the drawing on the pad (app.js's drawingPng), base64: the reference's request bodies.
PNG_SENT = """async () => {
  const bytes = new Uint8Array(await (await drawingPng()).arrayBuffer());
  return btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join(""));
}"""

# The answers' next animation frames, read once the frame after this one has run.
FRAMES = """() => new Promise((r) => {
  requestAnimationFrame(() => setTimeout(() => r(window.__latency.frames)));
  setTimeout(() => r(window.__latency.frames), 2000);  // a page that draws no frames (hidden window)
})"""

# Digits as strokes, in fractions of the pad: several strokes per digit, so pen-ups come mid-digit too.
DIGITS = {
    "7": [[(0.25, 0.2), (0.75, 0.2), (0.45, 0.85)]],
    "1": [[(0.5, 0.15), (0.5, 0.85)]],
    "4": [[(0.6, 0.15), (0.25, 0.6), (0.75, 0.6)], [(0.6, 0.3), (0.6, 0.85)]],
    "0": [[(0.5 + 0.22 * np.sin(a), 0.5 - 0.32 * np.cos(a)) for a in np.linspace(0, 2 * np.pi, 16)]],
    "5": [[(0.7, 0.18), (0.32, 0.18), (0.3, 0.48)],
          [(0.3, 0.48), (0.55, 0.42), (0.7, 0.55), (0.68, 0.75), (0.45, 0.85), (0.28, 0.78)]],
    "+": [[(0.5, 0.2), (0.5, 0.8)], [(0.2, 0.5), (0.8, 0.5)]],
}


def moves(page, box: dict, stroke: list[tuple[float, float]]) -> None:
    """Mouse moves along a stroke: 8 small steps per segment, like a hand."""
    for (x0, y0), (x1, y1) in itertools.pairwise(stroke):
        for t in np.linspace(0.125, 1.0, 8):
            page.mouse.move(box["x"] + (x0 + t * (x1 - x0)) * box["width"], box["y"] + (y0 + t * (y1 - y0)) * box["height"])


def stroke_record(page, up: float, answer: float | None) -> dict:
    """One pen-up's timings, in ms after the pointerup."""
    requests = page.evaluate("t => window.__requestsAfter(t)", up)
    if answer is None:  # a pause just before the pen left had already been answered: nothing to wait for
        return {"answered_before_up": True, "requests_after_up": len(requests)}
    if answer == -1:
        return {"no_answer": page.locator("#status").text_content(), "answered_before_up": False,
                "requests_after_up": len(requests), "up_to_dom_ms": None}
    frames = dict(map(tuple, page.evaluate(FRAMES)))
    record = {"answered_before_up": False, "requests_after_up": len(requests),
              "up_to_request_ms": round(requests[0]["start"] - up, 2) if requests else None,
              "up_to_dom_ms": round(answer - up, 2),
              "up_to_frame_ms": round(frames[answer] - up, 2) if answer in frames else None}
    if requests:
        last = requests[-1]
        record["fetch_ms"] = round(last["end"] - last["start"], 2)
        record["response_to_dom_ms"] = round(answer - last["end"], 2)
    return record


def round_trips(http: httpx.Client, png: bytes, repeats: int) -> list[float]:
    """The bare round trip of a PNG the page sent, sequential on one keep-alive connection from Python, in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        http.post("/api/predict?include_image=true&top_k=3", content=png,
                  headers={"content-type": "image/png"}).raise_for_status()
        times.append(round((time.perf_counter() - start) * 1000, 2))
    return times


def draw_stroke(page, box: dict, stroke: list[tuple[float, float]], pause: bool) -> tuple[float, float | None]:
    """One stroke with the mouse, optionally held still at its first corner until the answer shows.

    Returns (pointerup time, answer time or None), and with ``pause`` the pause's latency as a third value.
    """
    page.mouse.move(box["x"] + stroke[0][0] * box["width"], box["y"] + stroke[0][1] * box["height"])
    page.mouse.down()
    held = None
    if pause:
        moves(page, box, stroke[:2])
        last_move = page.evaluate("() => window.__latency.lastMove")
        answer = page.evaluate("a => window.__answerAfter(a)", [last_move, True])
        held = None if answer == -1 else round(answer - last_move, 2)
        moves(page, box, stroke[1:])
    else:
        moves(page, box, stroke)
    page.mouse.up()  # resolves once the page has handled the pointerup
    up = page.evaluate("() => window.__latency.ups.at(-1)")
    return up, page.evaluate("a => window.__answerAfter(a)", [up, False]), held


def measure(url: str, headless: bool, strokes: int, pauses: int) -> dict:
    """Draw `strokes` pen-ups and `pauses` mid-stroke pauses in one page; timings in ms."""
    from playwright.sync_api import sync_playwright

    ups, holds, reference = [], [], []
    with sync_playwright() as p, httpx.Client(base_url=url, timeout=30) as http:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=headless, args=ARGS)
        page = browser.new_page(viewport={"width": 900, "height": 820})
        page.add_init_script(INIT_SCRIPT)
        page.goto(url + "/")
        box = page.locator("#canvas").bounding_box()
        version = browser.version
        digits = list(DIGITS.values())
        k = 0
        while len(ups) < strokes or len(holds) < pauses:
            for s, stroke in enumerate(digits[k % len(digits)]):
                pause = len(holds) < pauses and s == 0 and len(stroke) > 2
                up, answer, held = draw_stroke(page, box, stroke, pause)
                if pause:
                    holds.append(held)
                if len(ups) < strokes:
                    ups.append(stroke_record(page, up, answer))
            # The reference, interleaved so that it sees the same load on this shared machine as the strokes.
            reference += round_trips(http, base64.b64decode(page.evaluate(PNG_SENT)), 3)
            page.keyboard.press("Escape")  # clear for the next digit
            k += 1
        browser.close()
    return {"browser": f"Chromium {version}", "headless": headless, "strokes": ups, "pauses_move_to_dom_ms": holds,
            "reference_ms": reference}


def stats(values: list[float | None]) -> dict:
    """Count, median, p95, mean and max in ms (None values left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return {}
    q = np.percentile(values, [50, 95])
    return {"n": len(values), "p50_ms": round(float(q[0]), 1), "p95_ms": round(float(q[1]), 1),
            "mean_ms": round(statistics.fmean(values), 1), "max_ms": round(max(values), 1)}


def summarise(raw: dict) -> dict:
    """Percentiles of one mode's pen-ups (those still waiting for an answer at pen-up), pauses and reference."""
    strokes = [s for s in raw["strokes"] if not s["answered_before_up"]]
    up_to_dom, pause, reference = (stats([s["up_to_dom_ms"] for s in strokes]), stats(raw["pauses_move_to_dom_ms"]),
                                   stats(raw["reference_ms"]))
    return {
        "browser": raw["browser"], "headless": raw["headless"],
        "pen_up_to_dom": up_to_dom,
        "pen_up_to_next_frame": stats([s.get("up_to_frame_ms") for s in strokes]),
        "pen_up_to_request": stats([s.get("up_to_request_ms") for s in strokes]),
        "request_round_trip": stats([s.get("fetch_ms") for s in strokes]),
        "response_to_dom": stats([s.get("response_to_dom_ms") for s in strokes]),
        "answered_before_pen_up": len(raw["strokes"]) - len(strokes),
        "no_answer_within_20s": sum("no_answer" in s for s in strokes) + raw["pauses_move_to_dom_ms"].count(None),
        "pause_to_dom": pause,
        "reference_http_round_trip": {
            "what": "POST /api/predict of the page's own PNG from Python, sequential on one connection, 3 after each "
                    "digit (interleaved with the strokes: the same load)", **reference},
        "ratio_p50": round(up_to_dom["p50_ms"] / reference["p50_ms"], 2) if up_to_dom and reference else None,
        "targets": {"pen_up_p50_at_most_100ms": up_to_dom.get("p50_ms", 1e9) <= 100,
                    "pen_up_p95_at_most_200ms": up_to_dom.get("p95_ms", 1e9) <= 200,
                    "pause_p50_at_most_100ms": pause.get("p50_ms", 1e9) <= 100,
                    "pause_p95_at_most_200ms": pause.get("p95_ms", 1e9) <= 200},
        "strokes": raw["strokes"],
        "pauses_move_to_dom_ms": raw["pauses_move_to_dom_ms"],
        "reference_ms": raw["reference_ms"],
    }


def headful(url: str, strokes: int, pauses: int, tmp: Path) -> dict | str:
    """The same measurement in a headful Chromium under xvfb-run (a child process), or why not."""
    if not shutil.which("xvfb-run"):
        return "skipped: no xvfb-run (apt-get install xvfb)"
    out = tmp / "headful.json"
    command = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24", sys.executable, __file__, "--child", url,
               "--strokes", str(strokes), "--pauses", str(pauses), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        return f"failed: {done.stderr.strip()[-500:]}"
    return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint to serve (default: mnist_model.pth if present, else a 1-epoch seed model)")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR"), help="MNIST, only to train that seed model")
    parser.add_argument("--strokes", type=int, default=36, help="pen-ups per mode (default: 36)")
    parser.add_argument("--pauses", type=int, default=12, help="mid-stroke pauses per mode (default: 12)")
    parser.add_argument("--modes", default="headless,headful", help="comma-separated: headless, headful")
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)  # headful run under xvfb-run
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "page_latency.json"))
    args = parser.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(measure(args.child, False, args.strokes, args.pauses)))
        return 0
    from serving import quick_checkpoint, running_server, server_backend

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(args.checkpoint or REPO / "mnist_model.pth")
        note = None
        if not checkpoint.is_file():
            if args.checkpoint:
                sys.exit(f"bench_page_latency: {checkpoint}: no such checkpoint")
            print("no mnist_model.pth: training the seed model for one epoch …", file=sys.stderr)
            checkpoint = quick_checkpoint(Path(tmp) / "run", args.data_dir)
            note = "seed MLP trained by the benchmark, 1 epoch on 6,000 images"
        info = machine_info()
        modes = {}
        with running_server(checkpoint, Path(tmp) / "serve.log") as (url, _):
            for mode in [m for m in args.modes.split(",") if m]:
                raw = (measure(url, True, args.strokes, args.pauses) if mode == "headless"
                       else headful(url, args.strokes, args.pauses, Path(tmp)))
                modes[mode] = summarise(raw) if isinstance(raw, dict) else raw
                print(mode, json.dumps({k: v for k, v in modes[mode].items() if not isinstance(v, list)}
                                       if isinstance(raw, dict) else raw, indent=1), file=sys.stderr)

    report = {
        "benchmark": "page_latency",
        "command": "python benchmarks/bench_page_latency.py " + " ".join(sys.argv[1:]),
        "machine": {**info, "load_average_after": [round(v, 2) for v in os.getloadavg()],
                    "note": "shared machine: 2 cores used by several engineers at once; browser and server share them"},
        "setup": {"server": "mnistrec serve --workers 1 (uvicorn), 127.0.0.1", "checkpoint": str(checkpoint),
                  "backend": server_backend(checkpoint),
                  "checkpoint_note": note, "chromium_args": ARGS, "viewport": "900x820",
                  "strokes_per_mode": args.strokes, "pauses_per_mode": args.pauses,
                  "what": "ms from the pointerup (or the last pointermove before a pause) to the page showing the "
                          "answer; pen-ups whose answer was already shown (a pause just before) are counted apart"},
        "modes": modes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
