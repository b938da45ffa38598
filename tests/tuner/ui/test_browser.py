"""The whole `tuner ui` workflow in headless Chromium, against the real server, training and sampling code.

One test, in phases (each leaves a screenshot in the test's tmp folder, checked to be non-blank): upload the
eight example photos and four bad files, edit a caption, read the data check, set the task and a few advanced
fields, train the built-in micro model, stop mid-run (a checkpoint is saved), resume to the end (it continues
from that checkpoint), see the grid, sample base vs tuned, dry-run publish and read the card, restart the
server and find the finished run. `TUNER_UI_SCREENSHOT=docs/ui.png` also writes the README's picture.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PHOTOS = Path(__file__).resolve().parents[3] / "datasets" / "micro-subject"
STEPS = 30
TOKEN = "hf_uiTestToken0123456789"


def _browser(playwright):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("no system Chromium (.ci/run installs it with apt-get install chromium)")
        pytest.skip("no system Chromium: apt-get install chromium")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])


def _shot(page, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 16, f"{name}: the screenshot is blank"
    return path


def _bad_files() -> list[dict]:
    bomb = b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + (30000).to_bytes(4, "big") * 2 + b"\x08\x02\0\0\0" + b"\0" * 4
    return [
        {"name": "notes.png", "mimeType": "image/png", "buffer": b"this is text, not a picture\n"},
        {"name": "empty.png", "mimeType": "image/png", "buffer": b""},
        {"name": "bomb.png", "mimeType": "image/png", "buffer": bomb},
        {"name": "../../x.png", "mimeType": "image/png", "buffer": b"not a png either"},
    ]


def _drop(page, files: list[dict]) -> None:
    """Drag files onto the drop zone: a real `drop` event carrying a DataTransfer of File objects."""
    payload = [{"name": f["name"], "b64": base64.b64encode(f["buffer"]).decode()} for f in files]
    transfer = page.evaluate_handle(
        """(files) => { const dt = new DataTransfer();
             for (const f of files) dt.items.add(new File([Uint8Array.from(atob(f.b64), c => c.charCodeAt(0))],
                                                          f.name, {type: "image/png"}));
             return dt; }""",
        payload,
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})


def _set_field(page, key: str, value: str) -> None:
    field = page.locator(f'[name="{key}"]')
    field.fill(value)
    field.dispatch_event("change")


@pytest.mark.slow  # about 50-140 s: the whole workflow in Chromium
def test_personalize_in_the_browser(tmp_path, serve_app, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training child: one thread is fastest on tiny models
    monkeypatch.delenv("HF_TOKEN", raising=False)
    runs, shots = tmp_path / "runs", tmp_path / "screenshots"
    shots.mkdir()
    photos = sorted(PHOTOS.glob("*.png"))
    assert len(photos) == 8
    served = serve_app(runs)

    with sync_api.sync_playwright() as playwright:
        browser = _browser(playwright)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(served.url)
        page.wait_for_selector("#preset option", state="attached")

        # 1. photos: eight good ones, four bad ones, a caption edited inline, the data check
        captions = [p.with_suffix(".txt") for p in photos]
        page.locator("#file-input").set_input_files([str(p) for p in captions + photos])  # captions first: sorted
        page.wait_for_function("document.querySelectorAll('#upload-messages li.used').length === 16")
        page.wait_for_function("document.querySelectorAll('#photos .thumb').length === 8")
        page.wait_for_function(  # every sidecar caption shows in place under its photo
            "(want) => [...document.querySelectorAll('#photos .thumb textarea')].map(e => e.value).join('|') === want",
            arg="|".join(c.read_text().strip() for c in captions),
        )
        _drop(page, _bad_files())  # dragged onto the drop zone, as a person would
        page.wait_for_function("document.querySelectorAll('#upload-messages li.refused').length === 4")
        refused = page.locator("#upload-messages li.refused").all_inner_texts()
        for name, reason in [("notes.png", "not an image"), ("empty.png", "zero bytes"),
                             ("bomb.png", "decompression bomb"), ("../../x.png", "not an image")]:  # fmt: skip
            assert any(line.startswith(f"{name}: refused — {reason}") for line in refused), refused
        [run] = [p for p in runs.iterdir() if p.is_dir()]
        outside = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(run)]
        assert outside == [] and sorted(p.name for p in (run / "photos").glob("*.png")) == [p.name for p in photos]
        caption = page.locator("#photos .thumb textarea").first
        caption.fill("a photo of a sks heart on a white background, edited")
        caption.dispatch_event("change")
        page.wait_for_function("document.querySelector('#photos .thumb textarea').value.endsWith('edited')")
        page.click("#check-btn")
        page.wait_for_selector("#check-summary")
        assert page.inner_text("#check-summary") == "8 found, 8 used, 0 skipped, 0 refused"
        _shot(page, shots, "1-photos")
        assert (run / "photos" / "00000.txt").read_text().strip().endswith("edited")

        # 2. task: a subject, the micro preset, a few advanced fields from the schema
        page.fill("#trigger", "sks")
        page.fill("#class-word", "heart")
        page.click("#advanced summary")
        _set_field(page, "train.max_train_steps", str(STEPS))
        _set_field(page, "train.train_batch_size", "1")
        page.locator('[name="data.with_prior_preservation"]').uncheck()
        page.locator('[name="dreambooth.train_text_encoder"]').uncheck()
        _set_field(page, "validation.num_inference_steps", "2")
        _set_field(page, "validation.seeds", "[0]")
        _shot(page, shots, "2-task")
        page.click("#advanced summary")  # closed again: a shorter page to screenshot

        # 3. train, stop mid-run, resume to the end
        page.click("#train-btn")
        page.wait_for_function("Number(document.querySelector('#stats').dataset.step) >= 2", timeout=180_000)
        page.click("#stop-btn")
        page.wait_for_function("document.querySelector('#run-status').dataset.status === 'stopped'", timeout=120_000)
        [checkpoint] = sorted((run / "output").glob("checkpoint-*"))
        stopped_at = int(checkpoint.name.split("-")[1])
        assert 2 <= stopped_at < STEPS
        _shot(page, shots, "3-stopped")
        page.click("#resume-btn")
        page.wait_for_function("document.querySelector('#run-status').dataset.status === 'finished'", timeout=240_000)
        log = (run / "train.log").read_text()
        assert "--resume latest" in log and f"resuming from {checkpoint}" in log
        steps = [json.loads(line)["step"] for line in (run / "output/logs/metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1))  # continued from the checkpoint: no step twice, none missing
        stats = page.inner_text("#stats")
        assert stats.startswith(f"step {STEPS}/{STEPS} · loss ") and " · lr " in stats and " it/s" in stats
        page.wait_for_function("[...document.querySelectorAll('#grids img')].some(i => i.naturalWidth > 0)")
        _shot(page, shots, "4-trained")

        # 4. compare base vs tuned through tuner.sampling
        assert "sks heart" in page.input_value("#cmp-prompt")
        page.fill("#cmp-seeds", "0")
        page.fill("#cmp-steps", "2")
        page.click("#cmp-btn")
        page.wait_for_function("[...document.querySelectorAll('#cmp-result img')].some(i => i.naturalWidth > 0)",
                               timeout=120_000)  # fmt: skip
        assert page.inner_text("#cmp-result figcaption") == "base vs tuned"

        # 5. dry-run publish: the card and the files; the token is neither kept nor shown
        page.fill("#pub-repo", "you/micro-sks-heart")
        page.fill("#pub-license", "mit")
        page.fill("#pub-token", TOKEN)
        page.click("#pub-btn")
        page.wait_for_function("document.querySelector('#pub-card').textContent.includes('license: mit')")
        files = page.locator("#pub-files li").all_inner_texts()
        assert "pytorch_lora_weights.safetensors" in files and "README.md" in files
        assert "Use `sks` in your prompts" in page.inner_text("#pub-card")
        assert page.input_value("#pub-token") == "" and TOKEN not in page.content()
        assert not [p for p in run.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
        _shot(page, shots, "5-published")
        if os.environ.get("TUNER_UI_SCREENSHOT"):  # the README's picture: the page without the advanced table
            page.evaluate("document.getElementById('advanced').open = false")
            picture = Image.open(_shot(page, shots, "readme")).convert("RGB")
            picture = picture.resize((900, round(picture.height * 900 / picture.width)), Image.LANCZOS)
            picture.quantize(64).save(os.environ["TUNER_UI_SCREENSHOT"], optimize=True)

        # 6. a restarted server lists the finished run
        served.close()
        again = serve_app(runs)
        page.goto(again.url)
        page.wait_for_function(f"[...document.querySelectorAll('#run-select option')].some("
                               f"o => o.textContent === '{run.name} — finished')")  # fmt: skip
        _shot(page, shots, "6-restarted")
        browser.close()
