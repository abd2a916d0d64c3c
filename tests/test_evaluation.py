"""Evaluation: win rates and bootstrap CIs on hand-made tables, prompt sets, folders, report, CLI."""
import base64
import html as html_lib
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from PIL import Image

from t2ialign.errors import DataError, UserFacingError
from t2ialign.evaluation import (bootstrap_mean, bootstrap_win_rate, category_breakdown, evaluate, implicit_reward_accuracy,
                                 load_prompt_set, model_means, pairwise_win_rates, preference_accuracy, read_metadata,
                                 tables_from_arrays, win_rate, write_report)
from t2ialign.scoring import FunctionScorer, register_scorer


# ----------------------------------------------------------------------------------------------------
# win rates, computed by hand
def test_win_rate_by_hand():
    # A beats B on 3 of 4 prompts, one tie: (3 + 0.5) / 4
    assert win_rate([5, 4, 3, 2], [1, 1, 1, 2]) == 0.875
    # 2 wins, 1 tie, 1 loss: 2.5 / 4
    assert win_rate([3, 2, 1, 5], [1, 2, 0, 6]) == 0.625
    assert win_rate([1, 1], [2, 2]) == 0.0
    # symmetry: wr(A, B) + wr(B, A) == 1
    rs = np.random.RandomState(0)
    a, b = rs.randint(0, 3, 50), rs.randint(0, 3, 50)
    assert win_rate(a, b) + win_rate(b, a) == pytest.approx(1.0)


def test_bootstrap_ci_properties():
    a = [5, 4, 3, 2]
    b = [1, 1, 1, 2]
    w = bootstrap_win_rate(a, b, n_boot=2000, seed=0)
    assert (w.wins, w.ties, w.losses, w.n) == (3, 1, 0, 4)
    assert w.low <= 0.875 <= w.high
    # outcomes are {1,1,1,0.5}: every resample mean lies in [0.5, 1]; the upper bound is 1
    assert 0.5 <= w.low and w.high == 1.0
    # reproducible with the seed, changes with another seed
    rs = np.random.RandomState(1)
    x, y = rs.normal(size=200), rs.normal(size=200) - 0.2
    w1 = bootstrap_win_rate(x, y, seed=3)
    assert (w1.low, w1.high) == (bootstrap_win_rate(x, y, seed=3).low, bootstrap_win_rate(x, y, seed=3).high)
    assert (w1.low, w1.high) != (bootstrap_win_rate(x, y, seed=4).low, bootstrap_win_rate(x, y, seed=4).high)
    assert w1.low <= w1.win_rate <= w1.high


def test_bootstrap_matches_independent_loop():
    """Percentile bootstrap written as a plain loop with the same seeded generator."""
    rs = np.random.RandomState(2)
    o = rs.randint(0, 3, 37) / 2.0
    iv = bootstrap_mean(o, n_boot=500, ci=0.9, seed=11)
    rng = np.random.default_rng(11)
    means = [o[rng.integers(0, len(o), size=len(o))].mean() for _ in range(500)]
    assert iv.low == pytest.approx(np.quantile(means, 0.05)) and iv.high == pytest.approx(np.quantile(means, 0.95))


def test_ci_narrows_with_n():
    rs = np.random.RandomState(3)
    widths = []
    for n in (40, 400, 4000):
        a = rs.normal(size=n) + 0.3
        b = rs.normal(size=n)
        w = bootstrap_win_rate(a, b, n_boot=1000, seed=0)
        widths.append(w.high - w.low)
        assert w.low <= w.win_rate <= w.high
    assert widths[0] > widths[1] > widths[2]
    assert widths[1] / widths[2] == pytest.approx(np.sqrt(10), rel=0.3)  # ~1/sqrt(N)


def _table(scores, cats=None, seeds=1):
    """{model: [score per prompt]} -> rows with ``seeds`` images per prompt (scores +- offsets averaging out)."""
    out = {}
    for m, vals in scores.items():
        rows = []
        for i, v in enumerate(vals):
            for k in range(seeds):
                off = 0.0 if seeds == 1 else (k - (seeds - 1) / 2) * 0.1
                rows.append({"prompt_index": i, "prompt": f"p{i}", "category": cats[i] if cats else None, "seed": k,
                             "file": f"images/{i:05d}_{k}.png", "scores": {"s": v + off}})
        out[m] = rows
    return out


def test_tables_means_pairs_and_categories():
    tables = _table({"base": [1, 2, 3, 4, 5, 6], "dpo": [2, 2, 4, 5, 1, 7], "sft": [0, 0, 0, 9, 9, 9]},
                    cats=["A", "A", "A", "B", "B", "B"], seeds=3)
    means = model_means(tables, n_boot=200)
    assert means["base"]["s"].estimate == pytest.approx(3.5)  # per-prompt means over 3 images, then mean
    wrs = pairwise_win_rates(tables, baseline="base", n_boot=200)
    got = {(w.model_a, w.model_b): w.win_rate for w in wrs}
    # dpo vs base: >, =, >, >, <, > -> (4 + .5)/6 ; sft vs base: <,<,<,>,>,> -> 3/6
    assert got == {("dpo", "base"): pytest.approx(4.5 / 6), ("sft", "base"): pytest.approx(0.5)}
    cats = category_breakdown(tables, baseline="base", n_boot=200)
    assert set(cats) == {"A", "B"} and cats["A"]["n_prompts"] == 3
    a = {(w.model_a, w.model_b): w.win_rate for w in cats["A"]["win_rates"]}
    assert a[("dpo", "base")] == pytest.approx(2.5 / 3) and a[("sft", "base")] == 0.0
    # prompts missing from one model are left out of that pair
    tables["dpo"] = [r for r in tables["dpo"] if r["prompt_index"] != 0]
    assert {w.model_a: w.n for w in pairwise_win_rates(tables, baseline="base", n_boot=0)}["dpo"] == 5


def test_implicit_reward_accuracy_by_hand():
    # margin = (ref_w - pol_w) - (ref_l - pol_l)
    pol_w = torch.tensor([0.1, 0.5, 0.3, 0.2])
    pol_l = torch.tensor([0.4, 0.2, 0.3, 0.2])
    ref_w = torch.tensor([0.3, 0.3, 0.3, 0.2])
    ref_l = torch.tensor([0.3, 0.3, 0.3, 0.2])
    # margins: (0.2) - (-0.1) > 0 ; (-0.2) - (0.1) < 0 ; 0 - 0 = tie ; tie
    acc = implicit_reward_accuracy(pol_w, pol_l, ref_w, ref_l, n_boot=100)
    assert acc["accuracy"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4) and acc["ties"] == 2
    # (N, K) errors are averaged over the K draws
    acc2 = implicit_reward_accuracy(pol_w[:, None].repeat(1, 3), pol_l[:, None].repeat(1, 3), ref_w[:, None].repeat(1, 3),
                                    ref_l[:, None].repeat(1, 3), n_boot=0)
    assert acc2["accuracy"] == acc["accuracy"]
    assert preference_accuracy([3, 1, 2], [1, 2, 2], n_boot=0)["accuracy"] == pytest.approx(1.5 / 3)


# ----------------------------------------------------------------------------------------------------
# prompt sets
def test_prompt_sets(tmp_path):
    parti = load_prompt_set("parti")
    assert len(parti) == 1632 and parti[0].prompt == "bond" and parti[0].category == "Abstract"
    assert parti[0].meta["challenge"] == "Basic" and len({r.category for r in parti}) == 12
    assert [r.index for r in parti[:3]] == [0, 1, 2]
    assert len(load_prompt_set("partiprompts", limit=10)) == 10
    gen = load_prompt_set("geneval")
    assert len(gen) == 553 and gen[0].prompt == "a photo of a bench" and gen[0].category == "single_object"
    assert gen[0].meta["include"] == [{"class": "bench", "count": 1}]
    txt = tmp_path / "mine.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    assert [r.prompt for r in load_prompt_set(str(txt))] == ["a cat", "a dog"]
    js = tmp_path / "p.jsonl"
    js.write_text('{"prompt": "x", "category": "c"}\n{"prompt": "y"}\n')
    assert [(r.prompt, r.category) for r in load_prompt_set(str(js))] == [("x", "c"), ("y", None)]
    with pytest.raises(UserFacingError, match="neither a file nor a known set"):
        load_prompt_set("nosuchset")


def test_hub_prompt_sets_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="zhwang/HPDv2"):
        load_prompt_set("hpsv2:photo")
    with pytest.raises(DataError, match="yuvalkirstain/pickapic_v2_no_images"):
        load_prompt_set("pickapic:validation_unique")
    with pytest.raises(UserFacingError, match="test_unique"):
        load_prompt_set("pickapic:train")


# ----------------------------------------------------------------------------------------------------
# folders, scoring recipe, report
def _brightness(images, prompts):
    return [float(np.asarray(im.convert("L"), dtype=np.float64).mean() / 255.0) for im in images]


def _redness(images, prompts):
    return [float(np.asarray(im.convert("RGB"), dtype=np.float64)[..., 0].mean() / 255.0) for im in images]


def _make_model_dir(root, name, level, n=6, cats=("Animals", "Vehicles")):
    d = root / name
    (d / "images").mkdir(parents=True)
    rows = []
    rs = np.random.RandomState(level)
    for i in range(n):
        arr = np.clip(rs.normal(level, 30, (48, 64, 3)), 0, 255).astype(np.uint8)
        arr[8:24, 8:40] = [255, 0, 0] if i % 2 else [0, 0, 255]
        f = f"images/{i:05d}_0.png"
        Image.fromarray(arr).save(d / f)
        rows.append({"prompt": f"prompt number {i}", "prompt_index": i, "image_index": 0, "seed": 100 + i, "file": f,
                     "category": cats[i % len(cats)]})
    with open(d / "metadata.jsonl", "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_metadata_validation(tmp_path):
    d = _make_model_dir(tmp_path, "m", 100, n=2)
    assert [r["prompt_index"] for r in read_metadata(str(d))] == [0, 1]
    (d / "metadata.jsonl").write_text('{"prompt": "x", "prompt_index": 0, "file": "images/00000_0.png"}\n')
    with pytest.raises(DataError, match="missing key.*seed"):
        read_metadata(str(d))
    with pytest.raises(DataError, match="no metadata.jsonl"):
        read_metadata(str(tmp_path))


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.imgs, self.ids = [], [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src", ""))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    dirs = {"base": _make_model_dir(root, "base", 90), "bright": _make_model_dir(root, "bright", 160)}
    scorers = [FunctionScorer("brightness", _brightness), FunctionScorer("redness", _redness)]
    paths = evaluate({k: str(v) for k, v in dirs.items()}, scorers, str(root / "report"), baseline="base", n_boot=300)
    return root, dirs, paths


def test_evaluate_end_to_end(report_dir):
    root, dirs, paths = report_dir
    assert set(paths) == {"report.json", "report.html", "winrates.png", "histograms.png", "grid.png"}
    rep = json.loads(open(paths["report.json"]).read())
    assert rep["models"] == ["base", "bright"] and rep["scorers"] == ["brightness", "redness"]
    wr = {(w["model_a"], w["scorer"]): w for w in rep["win_rates"]}
    assert wr[("bright", "brightness")]["win_rate"] == 1.0 and wr[("bright", "brightness")]["n"] == 6
    assert rep["means"]["bright"]["brightness"]["estimate"] > rep["means"]["base"]["brightness"]["estimate"]
    assert set(rep["categories"]) == {"Animals", "Vehicles"}
    assert rep["scorer_info"]["brightness"]["name"] == "brightness"
    # scores.jsonl written next to metadata.jsonl, scores match the function
    rows = [json.loads(l) for l in open(dirs["bright"] / "scores.jsonl")]
    im = Image.open(dirs["bright"] / rows[0]["file"])
    assert rows[0]["scores"]["brightness"] == pytest.approx(_brightness([im], [""])[0])
    assert rows[0]["image_index"] == 0  # extra metadata keys pass through


def test_report_html_is_self_contained_and_images_decode(report_dir):
    _, _, paths = report_dir
    html = open(paths["report.html"], encoding="utf-8").read()
    p = _Collect()
    p.feed(html)
    assert {"means", "winrates", "categories", "grid", "scorers"} <= p.ids
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert len(p.imgs) == 2 + 2 * 6  # win-rate plot, histograms, 6 prompts x 2 models
    for src in p.imgs:
        assert src.startswith("data:image/")
        im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        im.load()
        assert im.size[0] > 10 and np.asarray(im.convert("L")).std() > 1.0


def test_write_report_from_arrays_for_toy_demo(tmp_path):
    rs = np.random.RandomState(0)
    imgs = {}
    for m in ("ref", "aligned"):
        imgs[m] = []
        for i in range(3):
            path = tmp_path / f"{m}_{i}.png"
            Image.fromarray(rs.randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
            imgs[m].append(str(path))
    scores = {"ref": {"reward": rs.normal(size=3)}, "aligned": {"reward": rs.normal(size=3) + 5}}
    tables = tables_from_arrays(scores, prompts=["a", "b", "c"], files=imgs)
    paths = write_report(str(tmp_path / "out"), tables, baseline="ref", n_boot=100, title="toy")
    rep = json.loads(open(paths["report.json"]).read())
    assert rep["win_rates"][0]["win_rate"] == 1.0 and "grid.png" in paths
    # plain arrays are accepted directly (no images -> no grid)
    paths2 = write_report(str(tmp_path / "out2"), scores, n_boot=50)
    assert "grid.png" not in paths2 and os.path.isfile(paths2["report.html"])


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


# counts, once the page has loaded, the <img> elements the browser decoded (naturalWidth > 0) and writes
# them into the DOM, which --dump-dom prints; the report itself has no script: this is appended to a copy
_IMAGE_CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images], ok = imgs.filter(i => i.complete && i.naturalWidth > 0);
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify({total: imgs.length, decoded: ok.length,
    plots: ok.filter(i => i.classList.contains("plot")).map(i => i.id),
    samples: ok.filter(i => i.classList.contains("sample")).map(i => [i.naturalWidth, i.naturalHeight])});
  document.body.appendChild(out);
});
</script>"""


def _run_chromium(tmp_path, *args, timeout=60):
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, check=False, text=True)


@pytest.mark.skipif(_chromium() is None, reason="no chromium: install with `apt-get install -y chromium` to render the report in a headless browser")
def test_report_renders_in_headless_chromium(tmp_path):
    paths = _full_report(tmp_path)
    # 1. every image and plot decodes in a real browser
    checked = tmp_path / "checked.html"
    html = open(paths["report.html"], encoding="utf-8").read()
    checked.write_text(html.replace("</body>", _IMAGE_CHECK + "</body>"), encoding="utf-8")
    dom = _run_chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", "file://" + str(checked)).stdout
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom)
    assert found, f"chromium printed no image check: {dom[-500:]!r}"
    check = json.loads(html_lib.unescape(found.group(1)))
    assert check["total"] == 5 + 2 * 3 and check["decoded"] == check["total"], check
    assert set(check["plots"]) == {"plot-winrates", "plot-histograms", "plot-reward_over_training", "plot-training_metrics",
                                   "plot-rlg_sweep"}
    assert check["samples"] == [[128, 128]] * 6  # the 32 px samples, upscaled
    # 2. the page itself renders: a screenshot with text, plots and the sample grid on it
    shot = tmp_path / "shot.png"
    _run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,3200", "file://" + os.path.abspath(paths["report.html"]))
    assert shot.is_file(), "chromium wrote no screenshot"
    if os.environ.get("T2IALIGN_KEEP_SCREENSHOT"):  # to look at it: T2IALIGN_KEEP_SCREENSHOT=/tmp/report.png
        shutil.copy(shot, os.environ["T2IALIGN_KEEP_SCREENSHOT"])
    arr = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert arr.shape[:2] == (3200, 1200)
    non_white = (arr < 240).any(axis=-1).mean()
    assert non_white > 0.02, f"screenshot is blank ({non_white:.4f} non-white)"
    # the embedded images were decoded and drawn: many distinct colours, not just text on white
    assert len(np.unique(arr.reshape(-1, 3)[::7], axis=0)) > 200


def test_cli_score_and_eval(tmp_path):
    from t2ialign.cli import main

    register_scorer("brightness", lambda path_or_id=None, device=None, dtype=None, **kw: FunctionScorer("brightness", _brightness))
    a, b = _make_model_dir(tmp_path, "a", 80, n=4), _make_model_dir(tmp_path, "b", 150, n=4)
    assert main(["score", str(a), "--scorers", "brightness"]) == 0
    assert json.loads(open(a / "scores.jsonl").readline())["scores"]["brightness"] > 0
    out = tmp_path / "rep"
    assert main(["eval", f"A={a}", f"B={b}", "--scorers", "brightness", "--baseline", "A", "--out", str(out), "--n-boot", "100"]) == 0
    rep = json.loads(open(out / "report.json").read())
    assert rep["win_rates"][0]["model_a"] == "B" and rep["win_rates"][0]["win_rate"] == 1.0
    assert main(["eval", str(a), "--scorers", "brightness", "--baseline", "nobody", "--out", str(out)]) == 2
    assert main(["score", str(tmp_path), "--scorers", "brightness"]) == 2  # no metadata.jsonl: one-line error
    # training runs and an RLG sweep go into the report
    run_a, run_b, sweep = _training_run(tmp_path, "run_a"), _training_run(tmp_path, "run_b", steps=(5, 10)), _sweep_folder(tmp_path)
    assert main(["eval", f"A={a}", f"B={b}", "--scorers", "brightness", "--out", str(out), "--n-boot", "20",
                 "--runs", f"dpo={run_a}", "--runs", str(run_b), "--sweep", str(sweep)]) == 0
    rep = json.loads(open(out / "report.json").read())
    assert {k: v["last_step"] for k, v in rep["training_runs"].items()} == {"dpo": 20, "run_b": 10}
    assert rep["rlg_sweep"]["scorers"] == ["reward"]
    assert 'id="rlg-sweep"' in open(out / "report.html", encoding="utf-8").read()
    # a folder without metrics.jsonl / sweep.json: a one-line error before anything is scored
    assert main(["eval", str(a), "--scorers", "brightness", "--out", str(out), "--runs", str(a)]) == 2
    assert main(["eval", str(a), "--scorers", "brightness", "--out", str(out), "--sweep", str(a)]) == 2


# ----------------------------------------------------------------------------------------------------
# report template: escaping, the sample grid, optional sections
def _toy_tables(tmp_path, captions=("a", "b", "c"), size=32):
    rs = np.random.RandomState(0)
    files = {}
    for m in ("ref", "aligned"):
        files[m] = []
        for i in range(len(captions)):
            path = tmp_path / f"{m}_{i}.png"
            Image.fromarray(rs.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
            files[m].append(str(path))
    scores = {"ref": {"reward": rs.normal(size=len(captions))}, "aligned": {"reward": rs.normal(size=len(captions)) + 5}}
    return tables_from_arrays(scores, prompts=list(captions), files=files)


def test_report_html_escapes_captions_and_names(tmp_path):
    evil = "<script>alert(1)</script>"
    tables = _toy_tables(tmp_path, captions=(evil, "x & y", "plain"))
    tables[evil] = tables.pop("aligned")  # a model name too
    paths = write_report(str(tmp_path / "out"), tables, baseline="ref", n_boot=50, title=f"t {evil}")
    html = open(paths["report.html"], encoding="utf-8").read()
    assert "<script" not in html and "alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "x &amp; y" in html
    p = _Collect()
    p.feed(html)
    assert "script" not in p.tags


def _training_run(root, name, steps=(5, 10, 15, 20)):
    """A training output folder as `t2ialign train` leaves it: metrics.jsonl, one record per log step."""
    run = root / name
    run.mkdir()
    records = [{"step": s, "lr": 1e-3, "loss": 0.7 - 0.01 * s, "implicit_acc": 0.5 + 0.01 * s, "bad_steps": 0} for s in steps]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def _sweep_folder(root, scorer="reward", scales=(0.0, 1.0, 2.0)):
    """An RLG sweep folder in the format of evaluation/sweep.py (only sweep.json; the report reads nothing else)."""
    folder = root / "rlg"
    folder.mkdir()
    results = {}
    for w in scales:
        key = f"{w:g}"
        entry = {"w": w, "dir": f"w{key}", "scores": {scorer: {"mean": 1 + w, "low": 0.5 + w, "high": 1.5 + w, "n": 3}},
                 "win_rate_vs_w0": {}}
        if w:
            entry["win_rate_vs_w0"][scorer] = {"win_rate": 0.6 + 0.1 * w, "low": 0.4, "high": 0.9, "n": 3}
        results[key] = entry
    sweep = {"pretrained": "toy-base", "aligned": "runs/dpo/export", "scales": list(scales), "scorers": [scorer],
             "guidance_scale": 4.0, "num_inference_steps": 20, "seed": 0, "ci": 0.95, "n_boot": 50, "results": results}
    (folder / "sweep.json").write_text(json.dumps(sweep))
    return folder


CURVES = {"aligned": [{"step": 0, "mean_reward": 0.1}, {"step": 10, "mean_reward": 0.3}, {"step": 20, "mean_reward": 0.5}]}


def _full_report(tmp_path, captions=("a red circle", "a blue square", "a green star")):
    """A report with every optional section: categories, reward curves, a training run and an RLG sweep."""
    tables = _toy_tables(tmp_path, captions=captions)
    for rows in tables.values():
        for r in rows:
            r["category"] = ["Animals", "Vehicles"][r["prompt_index"] % 2]
    return write_report(str(tmp_path / "out"), tables, baseline="ref", n_boot=50, title="full",
                        scorer_info={"reward": {"name": "reward", "scale": "units of toy reward, in [0, 1]"}},
                        curves=CURVES, curve_label="mean reward", runs={"aligned": _training_run(tmp_path, "run")},
                        sweep=str(_sweep_folder(tmp_path)))


class _GridRows(HTMLParser):
    """The rows of ``table#grid``: per row, its cells as ``{"tag", "text", "imgs": [(width, height, src)]}``."""

    def __init__(self):
        super().__init__()
        self.rows, self.inside = [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.inside = a.get("id") == "grid"
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("td", "th"):
            self.rows[-1].append({"tag": tag, "text": "", "imgs": []})
        elif self.inside and tag == "img":
            self.rows[-1][-1]["imgs"].append((int(a["width"]), int(a["height"]), a["src"]))

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False

    def handle_data(self, data):
        if self.inside and self.rows and self.rows[-1]:
            self.rows[-1][-1]["text"] += data


def test_report_sections_present_only_with_their_data(tmp_path):
    (tmp_path / "full").mkdir()
    full = _full_report(tmp_path / "full")
    assert {"reward_over_training.png", "training_metrics.png", "rlg_sweep.png", "grid.png"} <= set(full)
    html = open(full["report.html"], encoding="utf-8").read()
    p = _Collect()
    p.feed(html)
    sections = {"means", "winrates", "histograms", "categories", "training", "reward-curves", "training-metrics",
                "rlg-sweep", "grid", "scorers", "plot-winrates", "plot-histograms", "plot-reward_over_training",
                "plot-training_metrics", "plot-rlg_sweep"}
    assert sections <= p.ids
    assert all(src.startswith("data:image/") for src in p.imgs) and "http://" not in html and "https://" not in html
    rep = json.loads(open(full["report.json"]).read())
    assert rep["training_runs"]["aligned"]["last"]["implicit_acc"] == pytest.approx(0.7)
    assert rep["rlg_sweep"]["scales"] == [0.0, 1.0, 2.0] and rep["reward_over_training"] == CURVES
    assert "0.700" in html and "3.000" in html  # the run's last implicit accuracy; the sweep's mean at w = 2

    # only score arrays: no images, categories, curves or sweep -> none of their sections, files or plots
    bare = write_report(str(tmp_path / "bare"), {"a": {"s": [1.0, 2.0]}, "b": {"s": [2.0, 3.0]}}, n_boot=20)
    p = _Collect()
    p.feed(open(bare["report.html"], encoding="utf-8").read())
    assert {"means", "winrates", "histograms"} <= p.ids
    assert not p.ids & {"categories", "training", "reward-curves", "training-metrics", "rlg-sweep", "grid", "scorers"}
    assert not {"reward_over_training.png", "training_metrics.png", "rlg_sweep.png", "grid.png"} & set(bare)
    # one model: no win rates
    single = write_report(str(tmp_path / "single"), {"a": {"s": [1.0, 2.0]}}, n_boot=20)
    p = _Collect()
    p.feed(open(single["report.html"], encoding="utf-8").read())
    assert "means" in p.ids and "winrates" not in p.ids


def test_report_grid_one_row_per_prompt_with_upscaled_pixels(tmp_path):
    captions = ("a red circle", "a blue square", "a green star")
    paths = _full_report(tmp_path, captions)
    p = _GridRows()
    p.feed(open(paths["report.html"], encoding="utf-8").read())
    header, *rows = p.rows
    assert [c["text"].strip() for c in header] == ["prompt", "ref", "aligned"]
    assert len(rows) == 3
    for caption, row in zip(captions, rows):
        # the caption is the first cell of the row holding its own images, one cell per model
        assert row[0]["text"].startswith(caption) and not row[0]["imgs"]
        assert [len(c["imgs"]) for c in row[1:]] == [1, 1]
    # 32 px samples are shown at 128 px, each source pixel a 4x4 block (nearest neighbour, lossless PNG)
    width, height, src = rows[0][1]["imgs"][0]
    assert (width, height) == (128, 128) and src.startswith("data:image/png")
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    original = np.asarray(Image.open(tmp_path / "ref_0.png").convert("RGB"))
    assert shown.shape == (128, 128, 3) and np.array_equal(shown[::4, ::4], original)
    assert np.array_equal(shown, original.repeat(4, axis=0).repeat(4, axis=1))
    # grid.png: a caption column left of the images, one band per prompt (header + 3 rows of 128 px)
    grid = Image.open(paths["grid.png"])
    assert grid.width >= 200 + 2 * 128 and grid.height >= 3 * 128


def test_report_histograms_label_their_axes():
    from t2ialign.evaluation.report_plots import histogram_figure

    tables = tables_from_arrays({"a": {"pickscore": [20.0, 21.0]}, "b": {"pickscore": [21.0, 22.0]}})
    fig = histogram_figure(tables, ["pickscore"], {"pickscore": {"scale": "logit_scale.exp() * cos (~100*cos)"}})
    (ax,) = fig.axes
    assert ax.get_xlabel().startswith("pickscore score") and "100*cos" in ax.get_xlabel()
    assert ax.get_ylabel() == "count (images)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]


def test_report_template_ships_as_package_data():
    import tomllib
    from fnmatch import fnmatch

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as fh:
        project = tomllib.load(fh)
    patterns = project["tool"]["setuptools"]["package-data"]["t2ialign"]
    assert any(fnmatch("evaluation/templates/report.html.j2", pat) for pat in patterns)
    assert any(d.lower().startswith("jinja2") for d in project["project"]["dependencies"])


def test_demo_report_embeds_reward_curves_runs_and_rlg_sweep(tmp_path):
    """The demo's report.html holds its reward over training, its runs' metrics.jsonl and its RLG sweep (no training here:
    the demo's outputs are made by hand in its layout, runs/<objective>/metrics.jsonl and the sweep's summary)."""
    from t2ialign.toy.demo import DemoSettings, _write_outputs

    tables = _toy_tables(tmp_path)
    per_model = {"base" if m == "ref" else "dpo": {r["prompt_index"]: {"prompt": r["prompt"], "file": r["file"],
                                                                       "reward": r["scores"]["reward"]} for r in rows}
                 for m, rows in tables.items()}
    (tmp_path / "runs").mkdir()
    _training_run(tmp_path / "runs", "dpo")
    sweep = json.loads((_sweep_folder(tmp_path, scorer="vividness") / "sweep.json").read_text())
    curves = {"dpo": CURVES["aligned"]}
    summary = _write_outputs(tmp_path, DemoSettings(output_dir=str(tmp_path)), "vividness", [], curves, sweep, per_model, 1.0)
    html = open(summary["report_files"]["report.html"], encoding="utf-8").read()
    p = _Collect()
    p.feed(html)
    assert {"reward-curves", "training-metrics", "rlg-sweep", "grid", "plot-reward_over_training", "plot-training_metrics",
            "plot-rlg_sweep"} <= p.ids
    assert "saturated" in html  # the preference's description, in the scorer table
    assert {"reward_over_training.png", "rlg_sweep.png", "training_metrics.png"} <= set(summary["report_files"])
