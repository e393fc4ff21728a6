"""Hostile image files: formats outside the allowlist, decompression bombs, memory caps (real files, real processes)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO, cli_env, run_cli
from PIL import Image

from mnistrec.errors import ImageError
from mnistrec.imagefile import ACCEPTED_FORMATS, open_image
from mnistrec.preprocess import preprocess

ACCEPTED_WORDS = "PNG, JPEG, BMP, GIF, WebP or TIFF"

# A real Encapsulated PostScript file: Pillow's EPS decoder renders it by running Ghostscript (`gs`).
EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 64 64
%%EndComments
newpath 20 10 moveto 20 54 lineto 8 setlinewidth stroke
showpage
%%EOF
"""


def digit_bar(size: int = 64) -> Image.Image:
    """A dark vertical bar on white paper: a '1' any decoder can carry."""
    page = np.full((size, size), 255, np.uint8)
    page[size // 8 : -size // 8, size // 2 - size // 16 : size // 2 + size // 16] = 0
    return Image.fromarray(page)


def encoded(fmt: str, image: Image.Image | None = None) -> bytes:
    buffer = io.BytesIO()
    (image or digit_bar()).convert("RGB" if fmt in ("JPEG", "PCX", "SGI", "TGA", "PPM", "ICO", "IM") else "L").save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def gs_shim(tmp_path) -> tuple[dict[str, str], Path]:
    """A fake `gs` first on PATH that records every call: proof of whether Ghostscript would have run."""
    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-was-called"
    bin_dir.mkdir()
    shim = bin_dir / "gs"
    shim.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    return cli_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"), marker


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_every_accepted_format_decodes(fmt):
    image = open_image(encoded(fmt))
    assert image.size == (64, 64)
    assert float(preprocess(image).max()) > 0.9


@pytest.mark.parametrize("fmt", ["PCX", "SGI", "TGA", "PPM", "ICO", "IM"])
def test_other_pillow_formats_are_refused(fmt):
    data = encoded(fmt)
    assert Image.open(io.BytesIO(data)).format  # Pillow itself would read it...
    with pytest.raises(ImageError, match=f"not an image in an accepted format \\({ACCEPTED_WORDS}\\)"):
        open_image(data)  # ...we do not


def test_eps_is_refused_by_the_cli_and_ghostscript_never_runs(tmp_path, gs_shim, mlp_checkpoint):
    env, marker = gs_shim
    eps = tmp_path / "digit.eps"
    eps.write_bytes(EPS)
    # The shim works: Pillow without an allowlist does run `gs` on this file.
    control = subprocess.run([sys.executable, "-c", f"from PIL import Image; Image.open({str(eps)!r}).load()"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert control.returncode != 0 and marker.exists(), control.stderr[-500:]
    marker.unlink()

    result = run_cli("predict", mlp_checkpoint, eps, PATH=env["PATH"])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "digit.eps" in lines[0] and ACCEPTED_WORDS in lines[0]
    assert not marker.exists(), "Ghostscript was run"


@pytest.mark.slow
def test_eps_upload_gets_a_4xx_naming_the_formats_and_ghostscript_never_runs(tmp_path, gs_shim, mlp_checkpoint):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from soak_serve import running_server

    env, marker = gs_shim
    with running_server(mlp_checkpoint, tmp_path / "serve.log", env=env, start_timeout=120) as (url, _):
        response = httpx.post(url + "/api/predict", files={"file": ("digit.eps", EPS, "application/postscript")}, timeout=60)
        assert 400 <= response.status_code < 500, response.text
        assert ACCEPTED_WORDS in response.json()["detail"]
        ok = httpx.post(url + "/api/predict", files={"file": ("digit.png", encoded("PNG"), "image/png")}, timeout=60)
        assert ok.status_code == 200 and ok.json()["digit"] in range(10)
    assert not marker.exists(), "Ghostscript was run"


def dotted_page() -> np.ndarray:
    """Squared paper: a 1000×300 white page with a 2-px dot every 6 px (8,350 separate marks)."""
    page = np.full((300, 1000), 255, np.uint8)
    for y in range(2, 300, 6):
        for x in range(2, 1000, 6):
            page[y : y + 2, x : x + 2] = 0
    return page


def test_multi_dotted_page_is_refused_quickly_by_the_real_cli(tmp_path, mlp_checkpoint):
    import time

    dots, digit = tmp_path / "dots.png", tmp_path / "digit.png"
    Image.fromarray(dotted_page()).save(dots)
    digit_bar().save(digit)
    # The same CLI on a one-digit picture: process start-up (importing torch) is not what is measured.
    started = time.perf_counter()
    control = run_cli("predict", mlp_checkpoint, digit, "--multi")
    control_seconds = time.perf_counter() - started
    assert control.returncode == 0, control.stderr
    started = time.perf_counter()
    result = run_cli("predict", mlp_checkpoint, dots, "--multi", timeout=120)
    seconds = time.perf_counter() - started
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"mnistrec: error: {dots}: too many separate marks to read as a number (8350 found, at most 300)"]
    # Target 2 s (0.2 s measured in process); the bound is generous for a loaded machine. Quadratic merging took > 120 s.
    assert seconds - control_seconds < 10, (seconds, control_seconds)


def test_multi_caps_in_process():
    import time

    from mnistrec.preprocess import split_digits
    from mnistrec.segment import MAX_DIGITS, MAX_MARKS

    started = time.perf_counter()
    with pytest.raises(ImageError, match="too many separate marks to read as a number"):
        split_digits(dotted_page())
    assert time.perf_counter() - started < 10
    # Just under the cap of marks: 20 × 14 dots of 4 px, spaced well apart, still answer (a reading or the digit cap).
    page = np.full((300, 1000), 255, np.uint8)
    for y in range(10, 290, 20):
        for x in range(10, 990, 50):
            page[y : y + 4, x : x + 4] = 0
    assert 14 * 20 <= MAX_MARKS
    started = time.perf_counter()
    try:
        assert 1 <= len(split_digits(page)) <= MAX_DIGITS
    except ImageError as exc:
        assert "too many separate marks" in str(exc)
    assert time.perf_counter() - started < 10
    # One long thin stroke would be cut into hundreds of "touching digits".
    line = np.full((40, 1200), 255, np.uint8)
    line[18:21, 10:1190] = 0
    with pytest.raises(ImageError, match="too many separate marks"):
        split_digits(line)
