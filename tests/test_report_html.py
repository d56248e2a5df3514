"""`prmkern report`: the HTML page parsed back (tables and embedded PNGs decoded with PIL), its numbers against values
worked out by hand for a small set of rows (ProcessBench F1, per-position expected calibration error), and a real
headless browser's screenshot where one is installed (chromium-headless-shell from Debian; skipped otherwise)."""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from prmkern.cli.entry import main

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402 - matplotlib's own dependency

LABELS = [-1, -1, 1, 2]
STEPS = [[0.95, 0.95], [0.35, 0.9], [0.8, 0.2, 0.7], [0.3, 0.6, 0.9, 0.5]]
PREDICTIONS = {2: [-1, 0, 1, 0], 4: [-1, -1, 1, 0], 8: [-1, -1, 1, 2]}
# F1 = 2 acc_err acc_ok / (acc_err + acc_ok): K=2 1/2 and 1/2; K=4 1/2 and 1; K=8 1 and 1
F1 = {2: 0.5, 4: 2 * 0.5 / 1.5, 8: 1.0}
# step 1: (0.95, ok) (0.35, ok) (0.8, ok) (0.3, ok): bins 9, 3, 8, 3 -> (0.05 + 2 x 0.675 + 0.2) / 4
# step 2: (0.95, ok) (0.9, ok) (0.2, wrong) (0.6, ok): (2 x 0.075 + 0.2 + 0.4) / 4; steps 3-4: (0.9, wrong)
ECE = {"step 1": (4, 0.4), "step 2": (4, 0.1875), "steps 3-4": (1, 0.9)}


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: dict[str, bytes] = {}
        self.tables: dict[str, list[list[str]]] = {}
        self._table = self._figure = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        elif tag == "figure":
            self._figure = a["id"]
        elif tag == "img":
            assert a["src"].startswith("data:image/png;base64,") and a.get("alt")
            self.images[self._figure] = base64.b64decode(a["src"].split(",", 1)[1])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None


def write_runs(tmp_path, ks=(2, 4, 8)):
    (tmp_path / "input.jsonl").write_text("".join(json.dumps({"problem": "p", "steps": ["s"] * len(s), "label": lab})
                                                  + "\n" for s, lab in zip(STEPS, LABELS)))
    runs, summaries = [], []
    for k in ks:
        rows = [{"index": i, "id": f"r{i}", "step_scores": s, "prediction": PREDICTIONS[k][i], "error": None}
                for i, s in enumerate(STEPS)]
        (tmp_path / f"k{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
        (tmp_path / f"k{k}.json").write_text(json.dumps({"engine": {"generated_tokens": 1000 * k},
                                                         "verifier": {"num_chains": k, "budget_tokens": None}}))
        runs.append(str(tmp_path / f"k{k}.jsonl"))
        summaries.append(str(tmp_path / f"k{k}.json"))
    return runs, summaries


def parse(path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def test_report_numbers_and_figures(tmp_path):
    runs, summaries = write_runs(tmp_path)
    out = tmp_path / "report.html"
    assert main(["report", *runs, "--summaries", *summaries, "--labels", str(tmp_path / "input.jsonl"),
                 "-o", str(out)]) == 0
    page = parse(out)
    header, *rows = page.tables["runs"]
    assert header[0] == "run" and [r[0] for r in rows] == ["k2.jsonl", "k4.jsonl", "k8.jsonl"]
    for k, row in zip((2, 4, 8), rows):
        cells = dict(zip(header, row))
        assert cells["K"] == str(k) and cells["generated tokens"] == str(1000 * k) and cells["labelled"] == "4"
        assert float(cells["mean F1"]) == pytest.approx(F1[k], abs=5e-5)
    _, *cal = page.tables["calibration"]
    assert {r[0]: (int(r[1]), float(r[2])) for r in cal} == {k: (n, pytest.approx(e, abs=5e-5))
                                                             for k, (n, e) in ECE.items()}
    assert sorted(page.images) == ["calibration", "heatmap-0", "heatmap-1", "heatmap-2", "sweep"]
    for name, png in page.images.items():
        img = Image.open(io.BytesIO(png))
        img.load()  # decodes the whole image
        assert img.format == "PNG" and 300 <= img.width <= 2000 and 200 <= img.height <= 2500, (name, img.size)
    # the heatmap's cells are coloured by score: solution r0 (0.95, 0.95) is drawn green somewhere
    rgb = Image.open(io.BytesIO(page.images["heatmap-0"])).convert("RGB")
    greens = sum(1 for r, g, b in rgb.getdata() if g > 150 and r < 100 and b < 100)
    assert greens > 100


def test_report_one_run_without_labels_or_summary(tmp_path):
    runs, _ = write_runs(tmp_path, ks=(2,))
    out = tmp_path / "one.html"
    assert main(["report", runs[0], "-o", str(out)]) == 0
    page = parse(out)
    assert sorted(page.images) == ["heatmap-0"]  # no labels: no calibration; one run: no sweep
    assert "No labels" in out.read_text()
    assert page.tables["runs"][1][4:] == ["n/a", "n/a", "n/a", "n/a"]  # K, budget, tokens, F1


def test_report_bad_input(tmp_path, capsys):
    runs, summaries = write_runs(tmp_path, ks=(2, 4))
    with pytest.raises(SystemExit) as e:
        main(["report", *runs, "--summaries", summaries[0], "-o", str(tmp_path / "x.html")])
    assert e.value.code == 2 and "--summaries gives 1 files for 2 runs" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"no_index": 1}\n')
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path / "bad.jsonl"), "-o", str(tmp_path / "x.html")])
    assert "not a verify output row" in capsys.readouterr().err


BROWSER = next((b for b in ("chromium-headless-shell", "chromium", "chromium-browser") if shutil.which(b)), None)


@pytest.mark.skipif(BROWSER is None, reason="no headless browser installed (apt-get install chromium-headless-shell)")
def test_report_in_a_headless_browser(tmp_path):
    """The page rendered by a real browser: the screenshot is mostly not blank and shows the heatmap's green."""
    runs, summaries = write_runs(tmp_path)
    out = tmp_path / "report.html"
    assert main(["report", *runs, "--summaries", *summaries, "--labels", str(tmp_path / "input.jsonl"),
                 "-o", str(out)]) == 0
    shot = tmp_path / "screenshot.png"
    subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1600", out.as_uri()], capture_output=True, timeout=120, check=True)
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 1600)
    pixels = list(img.getdata())
    assert sum(1 for p in pixels if p != (255, 255, 255)) > 0.05 * len(pixels)
    assert sum(1 for r, g, b in pixels if g > 150 and r < 100 and b < 100) > 100
