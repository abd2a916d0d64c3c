"""MPS scorer: preprocessing, the condition-aware score and the official checkpoint format.

The reference below is transcribed independently from the authors' code (Kwai-Kolors/MPS:
eval_overall_mps_on_hpdv2.py:33-78 for the score, trainer/models/cross_modeling.py for the cross
model, which it reads from a state dict by the official key names). Models are random-weight
transformers CLIPModels of a small config; nothing is downloaded.
"""
import copy
import math
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as tF
from PIL import Image

from t2ialign.errors import ModelNotFoundError
from t2ialign.scoring import MPSScorer, available_scorers, get_scorer, tiny
from t2ialign.scoring.mps import OVERALL_CONDITION, condition_mask, convert_mps_checkpoint, load_mps_state_dict

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PROMPTS = ["a photo of a cat", "a red car on a street at night", "an astronaut riding a horse", "a small blue bird", "a tree"]
CASES = [(256, 256, "RGB"), (301, 200, "RGB"), (200, 517, "RGB"), (230, 300, "RGBA"), (320, 240, "L"), (224, 224, "RGB")]
HEADS = 2  # the tiny cross model's (the official one has 16)


def _image(w, h, mode="RGB", seed=0):
    rs = np.random.RandomState(seed)
    im = Image.fromarray(rs.randint(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    if mode == "RGBA":
        im.putalpha(Image.fromarray(rs.randint(0, 256, (h, w), dtype=np.uint8)))  # varied alpha: dropped by convert("RGB")
    return im.convert("L") if mode == "L" else im


@pytest.fixture(scope="module")
def images():
    return [_image(w, h, m, seed=i) for i, (w, h, m) in enumerate(CASES[:5])]


@pytest.fixture(scope="module")
def tok():
    return tiny.clip_tokenizer()


@pytest.fixture(scope="module")
def modules():
    return tiny.tiny_mps_modules(seed=3)


# ----------------------------------------------------------------------------------------------------
# the official recipe, transcribed
def ref_pixels(im):
    """``image.convert("RGB")`` then CLIPImageProcessor (laion ViT-H/14 config: shortest edge 224, PIL
    bicubic, center crop 224 at (h - 224) // 2, /255, OpenAI mean/std) as transformers 4.27 computes it."""
    im = im.convert("RGB")
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(224 * long / short)
    nw, nh = (224, new_long) if w <= h else (new_long, 224)
    im = im.resize((nw, nh), Image.BICUBIC) if (nw, nh) != (w, h) else im
    left, top = (nw - 224) // 2, (nh - 224) // 2
    x = (np.asarray(im.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def _swiglu(x):
    x, gate = x.chunk(2, dim=-1)
    return tF.silu(gate) * x


def _rotary(t, inv_freq):
    freqs = torch.einsum("i , j -> i j", torch.arange(t.shape[-2], dtype=inv_freq.dtype), inv_freq)
    pos = torch.cat((freqs, freqs), dim=-1)
    x1, x2 = t[..., : t.shape[-1] // 2], t[..., t.shape[-1] // 2 :]  # rearrange '... (j d) -> ... j d', j=2
    return t * pos.cos() + torch.cat((-x2, x1), dim=-1) * pos.sin()


def _heads(t, h):
    b, n, _ = t.shape
    return t.reshape(b, n, h, -1).permute(0, 2, 1, 3)  # 'b n (h d) -> b h n d'


def _unheads(t):
    b, h, n, d = t.shape
    return t.permute(0, 2, 1, 3).reshape(b, n, h * d)


def ref_cross_attention(sd, p, x, context, mask):
    x = tF.layer_norm(x, x.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"])
    dim_head = sd[p + "to_kv.weight"].shape[0] // 2
    q = _heads(x @ sd[p + "to_q.weight"].T, HEADS) * dim_head ** -0.5
    k, v = (context @ sd[p + "to_kv.weight"].T).chunk(2, dim=-1)
    sim = torch.einsum("b h i d, b j d -> b h i j", q, k) + mask.unsqueeze(1).repeat(1, HEADS, 1, 1)
    attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
    out = _unheads(torch.einsum("b h i j, b j d -> b h i d", attn, v)) @ sd[p + "to_out.weight"].T
    return out + _swiglu(x @ sd[p + "ff.0.weight"].T) @ sd[p + "ff.2.weight"].T


def ref_parallel_block(sd, p, x):
    x = tF.layer_norm(x, x.shape[-1:], sd[p + "norm.weight"], sd[p + "norm.bias"])
    inv_freq = sd[p + "rotary_emb.inv_freq"]
    dim_head = 2 * inv_freq.numel()
    attn_inner = sd[p + "attn_out.weight"].shape[1]
    fused = sd[p + "fused_attn_ff_proj.weight"]
    ff_inner = fused.shape[0] - attn_inner - 2 * dim_head  # self.fused_dims = (attn_inner, dim_head, dim_head, ff_inner * 2)
    q, k, v, ff = torch.split(x @ fused.T, (attn_inner, dim_head, dim_head, ff_inner), dim=-1)
    q = _rotary(_heads(q, HEADS), inv_freq) * dim_head ** -0.5
    sim = torch.einsum("b h i d, b j d -> b h i j", q, _rotary(k, inv_freq))
    attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
    out = _unheads(torch.einsum("b h i j, b j d -> b h i d", attn, v)) @ sd[p + "attn_out.weight"].T
    return out + _swiglu(ff) @ sd[p + "ff_out.1.weight"].T


def ref_cross_model(sd, query, context, mask):
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd)
    for i in range(n_layers):
        query = ref_cross_attention(sd, f"layers.{i}.0.fn.", query, context, mask) + query  # Residual
        query = ref_parallel_block(sd, f"layers.{i}.1.fn.", query) + query
    return query


@torch.no_grad()
def ref_mps_score(model, cross_sd, tok, image, prompt, condition=OVERALL_CONDITION, threshold=0.3):
    """One image at a time, as the official infer_one_sample."""
    def tokenize(caption):
        return tok(caption, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids

    def get_text_features(ids):
        out = model.text_model(input_ids=ids)
        return model.text_projection(out[0]), model.text_projection(out[1])

    text_f, text_features = get_text_features(tokenize(prompt))
    image_f = model.visual_projection(model.vision_model(pixel_values=ref_pixels(image)[None])[0])
    condition_f, _ = get_text_features(tokenize(condition).repeat(text_f.shape[0], 1))
    sim_text_condition = torch.einsum("b i d, b j d -> b j i", text_f, condition_f)
    sim_text_condition = torch.max(sim_text_condition, dim=1, keepdim=True)[0]
    sim_text_condition = sim_text_condition / sim_text_condition.max()
    mask = torch.where(sim_text_condition > threshold, 0, float("-inf")).repeat(1, image_f.shape[1], 1)
    image_features = ref_cross_model(cross_sd, image_f, text_f, mask)[:, 0, :]
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return (model.logit_scale.exp() * text_features @ image_features.T)[0, 0]


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("w,h,mode", CASES)
def test_preprocessing_matches_official_recipe(w, h, mode, modules, tok):
    scorer = MPSScorer(*modules, tok)
    im = _image(w, h, mode)
    torch.testing.assert_close(scorer.pixel_values([im])[0], ref_pixels(im), atol=1e-6, rtol=0)


def test_preprocessing_matches_transformers_processor_after_rgb(modules, tok):
    """The official order: convert("RGB") first, then the processor (so RGBA alpha is dropped, never composited)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=Image.BICUBIC,
                                 image_mean=MEAN.tolist(), image_std=STD.tolist())
    scorer = MPSScorer(*modules, tok)
    for w, h, mode in CASES:
        im = _image(w, h, mode)
        theirs = torch.tensor(np.asarray(proc(images=im.convert("RGB"), return_tensors="np")["pixel_values"]))[0]
        torch.testing.assert_close(scorer.pixel_values([im])[0], theirs, atol=1e-5, rtol=0)


def test_tokenization_pads_to_77_and_condition_fits(tok):
    ids = tok(["a tree", "word " * 100, OVERALL_CONDITION], padding="max_length", truncation=True, max_length=77,
              return_tensors="pt")["input_ids"]
    assert ids.shape == (3, 77)
    assert ids[0, :2].tolist() == [49406, tok.convert_tokens_to_ids("a</w>")] and (ids[0, 3:] == 49407).all()  # EOS pads
    assert ids[1, -1].item() == 49407  # truncation keeps EOS
    n_condition = int((ids[2] != 49407).sum()) + 1
    assert n_condition < 77  # the condition is never truncated
    assert OVERALL_CONDITION.count(",") == 21 and OVERALL_CONDITION.endswith("word, things.")


def test_condition_mask_hand_derived():
    text = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])  # 3 prompt tokens
    cond = torch.tensor([[[2.0, 0.0], [0.0, 0.5]]])  # 2 condition tokens
    # best dot product per prompt token: 2, 0.5, 0 -> divided by the max 2: 1, 0.25, 0
    inf = float("-inf")
    assert condition_mask(text, cond, 0.3).tolist() == [[[0.0, inf, inf]]]
    assert condition_mask(text, cond, 0.2).tolist() == [[[0.0, 0.0, inf]]]
    # per sample: a second sample with 10x larger features gets the same mask
    both = condition_mask(torch.cat([text, 10 * text]), torch.cat([cond, cond]), 0.2)
    assert both[0].tolist() == both[1].tolist()


@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_score_matches_official_math(images, modules, tok, threshold):
    model, cross = modules
    scorer = MPSScorer(model, cross, tok, mask_threshold=threshold, batch_size=2)
    got = scorer.score(images, PROMPTS)
    ref = torch.stack([ref_mps_score(model, cross.state_dict(), tok, im, p, threshold=threshold) for im, p in zip(images, PROMPTS)])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-5)
    # per-sample normalisation: batching does not change a score
    one_by_one = scorer.score(images, PROMPTS, batch_size=1)
    torch.testing.assert_close(scorer.score(images, PROMPTS, batch_size=5), one_by_one, atol=1e-5, rtol=1e-5)
    # random weights give similar token features (relative similarity >= 0.46 here): 0.3 keeps every
    # token, 0.9 drops about half, which changes the score
    with torch.no_grad():
        t, _ = scorer.token_features(PROMPTS)
        c, _ = scorer.token_features([OVERALL_CONDITION])
        kept = (condition_mask(t, c.expand(len(PROMPTS), -1, -1), threshold) == 0).sum(-1)
    assert (kept >= 1).all()
    if threshold == 0.9:
        assert (kept < 60).all()
        keep_all = MPSScorer(model, cross, tok, mask_threshold=-math.inf).score(images, PROMPTS)
        assert (keep_all - got).abs().max() > 1e-3


def test_zero_cross_model_leaves_the_cls_token_before_post_layernorm(images, modules, tok):
    """All cross weights 0: both residual blocks are identities, so the image feature is
    visual_projection(last_hidden_state[:, 0]) WITHOUT post_layernorm; with logit_scale = ln 100, 100 * cos."""
    model, cross = copy.deepcopy(modules[0]), copy.deepcopy(modules[1])
    with torch.no_grad():
        for p in cross.parameters():
            p.zero_()
        model.logit_scale.fill_(math.log(100.0))
    got = MPSScorer(model, cross, tok).score(images, PROMPTS)
    with torch.no_grad():
        pix = torch.stack([ref_pixels(im) for im in images])
        img = model.visual_projection(model.vision_model(pixel_values=pix).last_hidden_state[:, 0])
        ids = tok(PROMPTS, max_length=77, padding="max_length", truncation=True, return_tensors="pt").input_ids
        txt = model.text_projection(model.text_model(input_ids=ids).pooler_output)
        pooled_img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
    torch.testing.assert_close(got, 100 * tF.cosine_similarity(img, txt, dim=-1), atol=1e-3, rtol=1e-5)
    assert (got - 100 * tF.cosine_similarity(pooled_img, txt, dim=-1)).abs().max() > 1e-3  # not PickScore's feature


# ----------------------------------------------------------------------------------------------------
# the official checkpoint: a pickled trainer.models.clip_model.CLIPModel (fp16, transformers 4.27)
_OFFICIAL_CROSS_NAMES = {"MPSCrossModel": "Cross_model", "_Residual": "Residual", "_CrossAttention": "CrossAttention",
                         "_ParallelBlock": "ParallelTransformerBlock", "_LayerNorm": "LayerNorm",
                         "_RotaryEmbedding": "RotaryEmbedding", "_SwiGLU": "SwiGLU"}


class _RefusesToLoad:
    def __setstate__(self, state):
        raise RuntimeError("the checkpoint's own class was executed")


def save_official_checkpoint(path, model, cross, monkeypatch):
    """``torch.save`` of the authors' module tree: classes named and placed as in their repo."""
    names = ["trainer", "trainer.models", "trainer.models.clip_model", "trainer.models.cross_modeling"]
    mods = {n: types.ModuleType(n) for n in names}
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)
    made = {}

    def official(module, name, base):
        if (module, name) not in made:
            made[module, name] = type(name, (_RefusesToLoad, base), {"__module__": module})
            setattr(mods[module], name, made[module, name])
        return made[module, name]

    model, cross = copy.deepcopy(model), copy.deepcopy(cross)
    model.__class__ = official("trainer.models.clip_model", "XCLIPModel", type(model))
    for emb in (model.text_model.embeddings, model.vision_model.embeddings):
        emb._non_persistent_buffers_set.discard("position_ids")  # persistent in transformers 4.27
    for m in cross.modules():
        if type(m).__name__ in _OFFICIAL_CROSS_NAMES:
            m.__class__ = official("trainer.models.cross_modeling", _OFFICIAL_CROSS_NAMES[type(m).__name__], type(m))
    root = official("trainer.models.clip_model", "CLIPModel", torch.nn.Module)()
    root.model, root.cross_model = model, cross
    torch.save(root.half(), path)


def _clip_dir(tmp_path, model, tok):
    d = tmp_path / "clip"
    model.config.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_official_checkpoint_roundtrip(tmp_path, images, modules, tok, monkeypatch):
    model, cross = modules
    path = tmp_path / "MPS_overall_checkpoint.pth"
    save_official_checkpoint(path, model, cross, monkeypatch)
    # it is a pickled model: a plain weights-only load refuses it, a full unpickle would run its classes
    assert "trainer.models.clip_model.CLIPModel" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    with pytest.raises(RuntimeError, match="executed"):
        torch.load(path, weights_only=False)
    state = load_mps_state_dict(str(path))  # none of the checkpoint's classes run
    assert state["model.text_model.embeddings.position_ids"].dtype == torch.int64
    assert state["cross_model.layers.0.0.fn.to_q.weight"].dtype == torch.float16
    assert "cross_model.layers.1.1.fn.rotary_emb.inv_freq" in state and "cross_model.layers.0.0.fn.norm.bias" in state

    clip_dir = _clip_dir(tmp_path, model, tok)
    ref = MPSScorer(copy.deepcopy(model).half().float(), copy.deepcopy(cross).half().float(), tok).score(images, PROMPTS)
    loaded = get_scorer("mps", str(path), clip_id=clip_dir)
    torch.testing.assert_close(loaded.score(images, PROMPTS), ref, atol=1e-5, rtol=1e-5)
    assert loaded.describe()["weights"] == str(path) and loaded.describe()["condition"] == OVERALL_CONDITION
    # a directory holding the official file name; the one-time safetensors conversion; imscore's mps.* keys
    # (the tokenizer was loaded from clip_dir above; passing it skips a slow reload)
    from safetensors.torch import save_file

    convert_mps_checkpoint(str(path), str(tmp_path / "mps.safetensors"))
    save_file({f"mps.{k}": v.contiguous() for k, v in state.items() if not k.endswith("position_ids")}, tmp_path / "model.safetensors")
    for source in (tmp_path, tmp_path / "mps.safetensors", tmp_path / "model.safetensors"):
        again = get_scorer("mps", str(source), clip_id=clip_dir, tokenizer=tok)
        torch.testing.assert_close(again.score(images, PROMPTS), ref, atol=1e-5, rtol=1e-5)


def test_missing_weights_error_is_short_and_actionable(tmp_path, modules, tok):
    for target in (tmp_path / "missing.pth", tmp_path):
        with pytest.raises(ModelNotFoundError) as exc:
            get_scorer("mps", str(target))
        assert len(str(exc.value).splitlines()) == 1 and "--scorer-path mps=" in str(exc.value)
    with pytest.raises(ModelNotFoundError, match="RE-N-Y/mpsv1"):
        get_scorer("mps")  # the default hub file, offline in the tests
    torch.save({"model.logit_scale": torch.zeros(())}, tmp_path / "MPS_overall_checkpoint.pth")
    with pytest.raises(ModelNotFoundError, match="MPS backbone config"):
        get_scorer("mps", str(tmp_path), clip_id=str(tmp_path / "no_clip_here"))


def test_registry_and_tiny_builder(images):
    assert "mps" in available_scorers()
    s = tiny.tiny_scorer("mps")
    assert isinstance(s, MPSScorer) and s.describe()["mask_threshold"] == 0.3
    assert torch.isfinite(s.score(images[:2], PROMPTS[:2])).all()
