"""Evaluation: win rates and bootstrap CIs on hand-made tables, prompt sets, folders, report, CLI."""
import base64
import io
import json
import os
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


@pytest.mark.skipif(_chromium() is None, reason="no chromium: install with `apt-get install -y chromium` to render the report in a headless browser")
def test_report_renders_in_headless_chromium(report_dir, tmp_path):
    _, _, paths = report_dir
    shot = tmp_path / "shot.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
           "file://" + os.path.abspath(paths["report.html"])]
    subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    arr = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert arr.shape[:2] == (1600, 1200)
    non_white = (arr < 240).any(axis=-1).mean()
    assert non_white > 0.02, f"screenshot is blank ({non_white:.4f} non-white)"
    # the embedded images were decoded by the browser: many distinct colours, not just text on white
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
