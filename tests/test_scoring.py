"""Scorers: preprocessing vs independent implementations, score formulas, official checkpoint formats.

Models are randomly initialised instances of the real classes (transformers CLIPModel, open_clip CLIP,
transformers BLIP) with small configs; the reference computations below are written independently of
t2ialign.scoring (only the models and tokenizers are shared).
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as tF
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

from t2ialign.errors import ModelNotFoundError, UserFacingError
from t2ialign.scoring import (AestheticMLP, AestheticScorer, CLIPScoreScorer, FunctionScorer, HPSScorer, ImageRewardScorer,
                              PickScoreScorer, available_scorers, clip_preprocess, get_scorer, hps_preprocess, parse_scorer_list,
                              to_pil)
from t2ialign.scoring import tiny
from t2ialign.scoring.imagereward import to_official_state_dict

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PROMPTS = ["a photo of a cat", "a red car on a street at night", "an astronaut riding a horse", "a small blue bird", "a tree"]


def _image(w, h, mode="RGB", seed=0, alpha="varied"):
    rs = np.random.RandomState(seed)
    small = rs.randint(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    if mode == "RGBA":
        a = np.full((h, w), 255, np.uint8) if alpha == "opaque" else rs.randint(0, 256, (h, w), dtype=np.uint8)
        im.putalpha(Image.fromarray(a))
    elif mode == "L":
        im = im.convert("L")
    return im


# square, non-square (both orientations; odd crop offsets), RGBA, grayscale
CASES = [(256, 256, "RGB"), (301, 200, "RGB"), (200, 517, "RGB"), (230, 300, "RGBA"), (320, 240, "L"), (224, 224, "RGB")]


@pytest.fixture(scope="module")
def images():
    return [_image(w, h, m, seed=i) for i, (w, h, m) in enumerate(CASES[:5])]


# ----------------------------------------------------------------------------------------------------
# independent reference implementations
def ref_clip_pixels(im, crop="floor", convert_first=True):
    """Written from the recipe: RGB, PIL bicubic shortest side -> 224, center crop 224, /255, mean/std."""
    if convert_first:
        im = im.convert("RGB")
    w, h = im.size
    s = min(w, h)
    nw, nh = (224, int(224 * h / w)) if w == s else (int(224 * w / h), 224)
    im = im.resize((nw, nh), resample=Image.BICUBIC) if (nw, nh) != (w, h) else im
    if crop == "floor":
        left, top = (nw - 224) // 2, (nh - 224) // 2
    else:
        left, top = int(round((nw - 224) / 2.0)), int(round((nh - 224) / 2.0))
    im = im.crop((left, top, left + 224, top + 224)).convert("RGB")
    x = (np.asarray(im, dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def ref_hps_pixels(im):
    """ResizeMaxSize on the tensor with torchvision functional ops (HPSv2 recipe)."""
    t = TF.to_tensor(im.convert("RGB"))
    h, w = t.shape[1:]
    scale = 224 / float(max(h, w))
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        t = TF.resize(t, [nh, nw], interpolation=T.InterpolationMode.BICUBIC, antialias=True)
        pad_h, pad_w = 224 - nh, 224 - nw
        t = TF.pad(t, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(t, MEAN.tolist(), STD.tolist())


def _feat(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def ref_clip_cos(model, tok, images, prompts, crop="floor", convert_first=True):
    pix = torch.stack([ref_clip_pixels(im, crop, convert_first) for im in images])
    t = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        i = _feat(model.get_image_features(pixel_values=pix))
        x = _feat(model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"]))
    return tF.cosine_similarity(i, x, dim=-1), i


# ----------------------------------------------------------------------------------------------------
# preprocessing
@pytest.mark.parametrize("w,h,mode", CASES)
def test_clip_preprocess_matches_independent_recipe(w, h, mode):
    im = _image(w, h, mode)
    ours = clip_preprocess([im])[0]
    assert ours.shape == (3, 224, 224)
    torch.testing.assert_close(ours, ref_clip_pixels(im), atol=1e-6, rtol=0)
    # the torchvision-CenterCrop / convert-after-resize variant (aesthetic, ImageReward)
    torch.testing.assert_close(clip_preprocess([im], crop="round", convert_first=False)[0],
                               ref_clip_pixels(im, "round", False), atol=1e-6, rtol=0)


@pytest.mark.parametrize("w,h,mode", CASES)
def test_clip_preprocess_matches_transformers_pil_processor(w, h, mode):
    """transformers' PIL CLIP processor configured like laion/CLIP-ViT-H-14 (PickScore's processor).
    transformers 5 composites RGBA on white (older versions dropped alpha, as the recipe does): the two
    agree on opaque images, so RGBA is compared with an opaque alpha channel here."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    im = _image(w, h, mode, alpha="opaque")
    proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_convert_rgb=True,
                                 resample=Image.BICUBIC, image_mean=MEAN.tolist(), image_std=STD.tolist())
    theirs = torch.tensor(np.asarray(proc(images=im, return_tensors="np")["pixel_values"]))[0]
    torch.testing.assert_close(clip_preprocess([im])[0], theirs, atol=1e-5, rtol=0)


def test_torchvision_backend_processor_is_close_but_not_the_recipe():
    """transformers 5's default CLIPImageProcessor resizes tensors with torchvision (not PIL): close, not
    identical - the reason the package does its own PIL preprocessing."""
    from transformers import CLIPImageProcessor

    im = _image(301, 200, "RGB")
    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    theirs = proc(images=im, return_tensors="pt")["pixel_values"][0]
    diff = (clip_preprocess([im])[0] - theirs).abs()
    assert diff.max() < 0.05 and diff.mean() < 1e-3


def test_aesthetic_preprocess_matches_torchvision_compose():
    """OpenAI clip.load's transform (used by the aesthetic predictor and ImageReward), run as torchvision."""
    ref = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), lambda im: im.convert("RGB"),
                     T.ToTensor(), T.Normalize(MEAN.tolist(), STD.tolist())])
    for w, h, mode in CASES:
        im = _image(w, h, mode)
        torch.testing.assert_close(clip_preprocess([im], crop="round", convert_first=False)[0], ref(im), atol=1e-6, rtol=0)


@pytest.mark.parametrize("w,h,mode", CASES + [(224, 160, "RGB")])
def test_hps_preprocess_matches_independent_tensor_recipe(w, h, mode):
    im = _image(w, h, mode)
    ours = hps_preprocess([im])[0]
    assert ours.shape == (3, 224, 224)
    if max(w, h) == 224 and w != h:
        # the official code leaves such an image unpadded (and non-square); we pad it
        ref = TF.normalize(TF.pad(TF.to_tensor(im.convert("RGB")), [(224 - w) // 2, (224 - h) // 2, 224 - w - (224 - w) // 2,
                                                                    224 - h - (224 - h) // 2], fill=0), MEAN.tolist(), STD.tolist())
    else:
        ref = ref_hps_pixels(im)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    # padding is 0 BEFORE normalisation
    if w != h and max(w, h) != 224:
        corner = ours[:, 0, 0] if h < w else ours[:, 0, 0]
        torch.testing.assert_close(corner, torch.tensor(-MEAN / STD), atol=1e-6, rtol=0)


def test_hps_preprocess_close_to_open_clip_longest_transform():
    """open_clip's own resize_mode='longest' transform resizes the PIL image (not the tensor): close, not equal."""
    from open_clip.transform import image_transform

    tf = image_transform(224, is_train=False, resize_mode="longest", fill_color=0)
    for w, h, mode in CASES:
        im = _image(w, h, mode, alpha="opaque")
        theirs = tf(im.convert("RGB"))
        diff = (hps_preprocess([im])[0] - theirs).abs()
        assert diff.mean() < 0.01 and diff.max() < 0.1


def test_to_pil_input_ranges():
    im = _image(64, 48)
    u8 = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    assert np.array_equal(np.asarray(to_pil(u8)), np.asarray(im))
    assert np.array_equal(np.asarray(to_pil(u8.float() / 255.0)), np.asarray(im))
    with pytest.raises(ValueError, match="0, 1"):
        to_pil(u8.float())  # 0-255 floats are refused, never silently rescaled


# ----------------------------------------------------------------------------------------------------
# score formulas
@pytest.fixture(scope="module")
def clip_tok():
    return tiny.clip_tokenizer()


def test_clip_tokenizer_matches_open_clip(clip_tok):
    import open_clip

    oc = open_clip.get_tokenizer("ViT-H-14")
    for p in PROMPTS + ["word " * 100]:
        ids = clip_tok([p], padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"][0]
        ref = oc([p])[0]
        n = int((ref != 0).sum())
        assert ids[:n].tolist() == ref[:n].tolist()  # open_clip pads with 0, CLIP with EOS
        assert ids[n - 1].item() == 49407  # truncation keeps EOS


def test_pickscore_formula(images, clip_tok):
    model = tiny.tiny_clip_model(seed=1)
    scorer = PickScoreScorer(model, clip_tok, device="cpu", batch_size=2)
    got = scorer.score(images, PROMPTS)
    cos, _ = ref_clip_cos(model, clip_tok, images, PROMPTS)
    torch.testing.assert_close(got, model.logit_scale.exp().item() * cos, atol=1e-4, rtol=1e-5)
    # the scale: with the real checkpoint's logit_scale (ln 100), PickScore == 100 * cos, not raw cos
    with torch.no_grad():
        model.logit_scale.fill_(math.log(100.0))
    torch.testing.assert_close(PickScoreScorer(model, clip_tok).score(images, PROMPTS), 100 * cos, atol=1e-3, rtol=1e-5)
    # batching does not change scores
    torch.testing.assert_close(scorer.score(images, PROMPTS, batch_size=5), scorer.score(images, PROMPTS, batch_size=1), atol=1e-4, rtol=1e-5)


def test_clip_score_formula_and_input_range(images, clip_tok):
    model = tiny.tiny_clip_model(seed=2, vit="L")
    cos, _ = ref_clip_cos(model, clip_tok, images, PROMPTS)
    got = CLIPScoreScorer(model, clip_tok).score(images, PROMPTS)
    torch.testing.assert_close(got, (100 * cos).clamp(min=0), atol=1e-3, rtol=1e-5)
    assert (got >= 0).all()
    raw = CLIPScoreScorer(model, clip_tok, clamp=False).score(images, PROMPTS)
    torch.testing.assert_close(raw, 100 * cos, atol=1e-3, rtol=1e-5)
    # 0-255 uint8 tensors and [0, 1] floats give the PIL result (divided by 255 exactly once)
    rgb = [im.convert("RGB") for im in images]
    u8 = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in rgb]
    s_pil = CLIPScoreScorer(model, clip_tok, clamp=False).score(rgb, PROMPTS)
    torch.testing.assert_close(CLIPScoreScorer(model, clip_tok, clamp=False).score(u8, PROMPTS), s_pil)
    torch.testing.assert_close(CLIPScoreScorer(model, clip_tok, clamp=False).score([x.float() / 255 for x in u8], PROMPTS), s_pil)


def test_aesthetic_formula(images):
    model = tiny.tiny_clip_model(seed=3, vit="L", projection_dim=24)
    torch.manual_seed(0)
    mlp = AestheticMLP(24)
    got = AestheticScorer(model, mlp).score(images, PROMPTS)
    pix = torch.stack([ref_clip_pixels(im, "round", False) for im in images])
    with torch.no_grad():
        e = _feat(model.get_image_features(pixel_values=pix))
        e = e / e.norm(dim=-1, keepdim=True)
        lin = [m for m in mlp.layers if isinstance(m, torch.nn.Linear)]
        x = e
        for layer in lin:  # no activations; dropout is identity in eval
            x = x @ layer.weight.T + layer.bias
    torch.testing.assert_close(got, x[:, 0], atol=1e-5, rtol=1e-5)


def test_hps_formula(images):
    import open_clip

    model = tiny.tiny_open_clip_model(seed=4)
    tok = open_clip.get_tokenizer("ViT-H-14")
    got = HPSScorer(model, tok, version="v2.1").score(images, PROMPTS)
    with torch.no_grad():
        i = model.encode_image(torch.stack([ref_hps_pixels(im) for im in images]))
        t = model.encode_text(tok(PROMPTS))
    torch.testing.assert_close(got, tF.cosine_similarity(i, t, dim=-1), atol=1e-5, rtol=1e-5)
    assert got.abs().max() <= 1.0 + 1e-6  # a cosine, not x100


def test_imagereward_formula(images):
    vision, text, mlp, _ = tiny.tiny_imagereward_modules(seed=5)
    tok = tiny.bert_tokenizer()
    got = ImageRewardScorer(vision, text, mlp, tok).score(images, PROMPTS)
    pix = torch.stack([ref_clip_pixels(im, "round", False) for im in images])
    t = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert t["input_ids"].shape[1] == 35
    with torch.no_grad():
        emb = vision(pixel_values=pix).last_hidden_state
        h = text(input_ids=t["input_ids"], attention_mask=t["attention_mask"], encoder_hidden_states=emb,
                 encoder_attention_mask=torch.ones(emb.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
        ref = (mlp(h)[:, 0] - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # the image matters (cross-attention is on; random weights make the effect small, not zero)
    assert (got[:1] - ImageRewardScorer(vision, text, mlp, tok).score(images[1:2], PROMPTS[:1])).abs().item() > 0


def test_bf16_close_to_fp32(images, clip_tok):
    model = tiny.tiny_clip_model(seed=6)
    fp32 = PickScoreScorer(model, clip_tok).score(images, PROMPTS)
    bf16 = PickScoreScorer(tiny.tiny_clip_model(seed=6), clip_tok, dtype="bf16").score(images, PROMPTS)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max() < 0.1 * max(1.0, fp32.abs().max().item())


def test_device_resize_is_close_to_exact(images, clip_tok):
    model = tiny.tiny_clip_model(seed=7)
    exact = PickScoreScorer(model, clip_tok).score(images, PROMPTS)
    fast = PickScoreScorer(model, clip_tok, resize_on="device").score(images, PROMPTS)
    assert (exact - fast).abs().max() < 0.02 * max(1.0, exact.abs().max().item())


# ----------------------------------------------------------------------------------------------------
# official checkpoint formats and loading
def test_hps_checkpoint_format_roundtrip(tmp_path, images):
    src = HPSScorer(tiny.tiny_open_clip_model(seed=8))
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": src.model.state_dict()}, path)
    loaded = get_scorer("hpsv21", str(path), model=tiny.tiny_open_clip_model(seed=9))
    assert loaded.name == "hpsv21" and loaded.version == "v2.1"
    torch.testing.assert_close(loaded.score(images, PROMPTS), src.score(images, PROMPTS))
    # also from a directory holding the official file name; v2.0 is a different name
    v20 = get_scorer("hpsv2", str(tmp_path / "HPS_v2.1_compressed.pt"), model=tiny.tiny_open_clip_model(seed=9))
    assert v20.name == "hpsv2"
    # strict loading: a checkpoint missing keys is refused
    sd = src.model.state_dict()
    sd.pop(next(iter(sd)))
    torch.save({"state_dict": sd}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="Missing key"):
        HPSScorer.from_checkpoint(str(tmp_path / "bad.pt"), model=tiny.tiny_open_clip_model())


def test_pickscore_and_clip_from_pretrained_dirs(tmp_path, images, clip_tok):
    model = tiny.tiny_clip_model(seed=10)
    model.save_pretrained(tmp_path / "ps")
    clip_tok.save_pretrained(tmp_path / "ps")
    ref = PickScoreScorer(model, clip_tok).score(images, PROMPTS)
    loaded = get_scorer("pickscore", str(tmp_path / "ps"))
    torch.testing.assert_close(loaded.score(images, PROMPTS), ref)
    assert loaded.describe()["weights"] == str(tmp_path / "ps")
    c = get_scorer("clip", str(tmp_path / "ps"))
    torch.testing.assert_close(c.score(images, PROMPTS), CLIPScoreScorer(model, clip_tok).score(images, PROMPTS))


def test_aesthetic_pth_format(tmp_path, images):
    model = tiny.tiny_clip_model(seed=11, vit="L")
    model.save_pretrained(tmp_path / "clip")
    torch.manual_seed(1)
    mlp = AestheticMLP(model.config.projection_dim)
    torch.save(mlp.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    loaded = get_scorer("aesthetic", str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"), clip_id=str(tmp_path / "clip"))
    torch.testing.assert_close(loaded.score(images, PROMPTS), AestheticScorer(model, mlp).score(images, PROMPTS))
    assert set(torch.load(tmp_path / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)) == {
        f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def test_imagereward_official_format(tmp_path, images):
    vision, text, mlp, med = tiny.tiny_imagereward_modules(seed=12)
    tok = tiny.bert_tokenizer()
    sd = to_official_state_dict(vision, text, mlp)
    assert "blip.visual_encoder.blocks.0.attn.qkv.weight" in sd and "blip.visual_encoder.cls_token" in sd
    assert "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight" in sd and "mlp.layers.7.weight" in sd
    sd["blip.vision_proj.weight"] = torch.zeros(4, 64)  # unused heads present in the real file are ignored
    torch.save(sd, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(dict(med, encoder_width=1024, add_cross_attention=True)))
    loaded = get_scorer("imagereward", str(tmp_path), tokenizer=tok)
    torch.testing.assert_close(loaded.score(images, PROMPTS), ImageRewardScorer(vision, text, mlp, tok).score(images, PROMPTS))


def test_missing_weights_error_is_short_and_actionable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="--scorer-path hpsv21="):
        get_scorer("hpsv21", str(tmp_path / "missing.pt"))
    with pytest.raises(ModelNotFoundError, match="ImageReward"):
        get_scorer("imagereward", str(tmp_path))  # a directory without ImageReward.pt
    with pytest.raises(ModelNotFoundError) as exc:
        get_scorer("pickscore", str(tmp_path / "nothing_here"))
    assert len(str(exc.value).splitlines()) == 1 and "--scorer-path pickscore=" in str(exc.value)


def test_registry():
    assert {"pickscore", "hpsv2", "hpsv21", "clip", "aesthetic", "imagereward"} <= set(available_scorers())
    assert parse_scorer_list("pickscore,HPSv2.1, clip,aesthetic,imagereward") == ["pickscore", "hpsv21", "clip", "aesthetic", "imagereward"]
    with pytest.raises(UserFacingError, match="did you mean 'pickscore'"):
        get_scorer("pickscor")
    f = FunctionScorer("brightness", lambda ims, ps: [np.asarray(im.convert("L")).mean() / 255 for im in ims])
    assert f.score([Image.new("RGB", (8, 8), "white")], ["x"]).item() == pytest.approx(1.0)
