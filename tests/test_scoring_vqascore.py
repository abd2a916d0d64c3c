"""VQAScore (CLIP-FlanT5): preprocessing, prompt/answer tokens, the score formula, the official checkpoint format.

The model is a random-weight ``CLIPFlanT5`` of the real classes (transformers ``CLIPVisionModel`` +
``T5ForConditionalGeneration``) with small configs and a small offline T5 tokenizer. The references below are
transcribed from t2v_metrics@10d549b (``clip_t5_model.py``, ``mm_utils.py``, ``clip_t5/model/...``) and share only
the model and tokenizer with ``t2ialign.scoring.vqascore``.
"""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as tF
from PIL import Image

from t2ialign.errors import ModelNotFoundError
from t2ialign.scoring import VQAScoreScorer, available_scorers, get_scorer, tiny
from t2ialign.scoring.vqascore import pad_fill_colour, to_official_state_dict, vqascore_preprocess
from helpers.images import random_image

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]
PROMPTS = ["a photo of a cat", "a red car on a street at night", "an astronaut riding a horse"]
SYSTEM_CHUNK = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                "detailed, and polite answers to the user's questions. USER: ")
# clip_t5_model.py:9 and the t5_chat format (clip_t5_model.py:16), text after the <image> token
QUESTION_CHUNK = '\nDoes this figure show "{}"? Please answer yes or no. ASSISTANT: '


_image = random_image


CASES = [(336, 336, "RGB"), (301, 200, "RGB"), (200, 517, "RGB"), (230, 300, "RGBA"), (320, 240, "L"), (512, 512, "RGB")]


@pytest.fixture(scope="module")
def tok():
    return tiny.t5_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny.tiny_vqascore_model(seed=3)


@pytest.fixture(scope="module")
def images():
    return [_image(w, h, m, seed=i) for i, (w, h, m) in enumerate(CASES[1:4])]


# ----------------------------------------------------------------------------------------------------
# references
def ref_pixels(im):
    """clip_t5_model.py:214-217: image_loader's convert('RGB'), expand2square with int(mean * 255), then the
    CLIPImageProcessor of openai/clip-vit-large-patch14-336 (PIL bicubic shortest edge 336, crop 336)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    im = im.convert("RGB")
    w, h = im.size
    if w != h:
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), (122, 116, 104))
        canvas.paste(im, ((side - w) // 2, (side - h) // 2))
        im = canvas
    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, resample=Image.BICUBIC,
                                 do_convert_rgb=True, image_mean=MEAN, image_std=STD)
    return torch.tensor(np.asarray(proc(images=im, return_tensors="np")["pixel_values"]))[0]


def ref_input_ids(prompt, tok):
    return tok(SYSTEM_CHUNK).input_ids + [-200] + tok(QUESTION_CHUNK.format(prompt)).input_ids


def ref_image_features(model, pix):
    """Second-to-last CLIP layer (a copy without the last layer), CLS dropped, mlp2x_gelu by hand."""
    vision = copy.deepcopy(model.vision)
    del vision.encoder.layers[-1]
    h = vision(pixel_values=pix).last_hidden_state[:, 1:]
    p0, p2 = model.projector[0], model.projector[2]
    return tF.gelu(h @ p0.weight.T + p0.bias) @ p2.weight.T + p2.bias


def ref_official_loss_score(model, tok, im, prompt):
    """exp(-loss) of the official forward (clip_t5_model.py:276-284) for one pair, on a copy of T5 resized to
    len(tokenizer) (mm_utils.py:224)."""
    t5 = copy.deepcopy(model.t5)
    t5.resize_token_embeddings(len(tok))
    ids = torch.tensor(ref_input_ids(prompt, tok))
    i = int((ids == -200).nonzero()[0])
    feats = ref_image_features(model, ref_pixels(im)[None])[0]
    emb = t5.get_input_embeddings()
    embeds = torch.cat([emb(ids[:i]), feats, emb(ids[i + 1:])])[None]
    labels = torch.tensor([tok("Yes").input_ids])
    out = t5(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), labels=labels)
    return math.exp(-out.loss.item())


# ----------------------------------------------------------------------------------------------------
# preprocessing
@pytest.mark.parametrize("w,h,mode", CASES)
def test_preprocess_matches_official_recipe(w, h, mode):
    im = _image(w, h, mode)
    ours = vqascore_preprocess([im])[0]
    assert ours.shape == (3, 336, 336)
    torch.testing.assert_close(ours, ref_pixels(im), atol=1e-5, rtol=0)


def test_pad_colour_is_the_clip_mean_in_uint8():
    assert pad_fill_colour() == (122, 116, 104)  # int(0.48145466*255), int(0.4578275*255), int(0.40821073*255)
    # a uniform 301x200 image: rows 0-49 of the 301x301 canvas are padding, the image starts at row 50
    x = vqascore_preprocess([Image.new("RGB", (301, 200), (10, 200, 30))])[0]
    norm = lambda rgb: (torch.tensor(rgb) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)  # noqa: E731
    torch.testing.assert_close(x[:, 0, 0], norm((122, 116, 104)), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, 168, 168], norm((10, 200, 30)), atol=1e-5, rtol=0)
    # without padding the image fills the crop
    torch.testing.assert_close(vqascore_preprocess([Image.new("RGB", (301, 200), (10, 200, 30))], pad=False)[0][:, 0, 0],
                               norm((10, 200, 30)), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# prompt and answer
def test_prompt_and_answer_tokens(model, tok):
    scorer = VQAScoreScorer(model, tok)
    ids, mask, labels = scorer.build_inputs(PROMPTS[:2])
    refs = [ref_input_ids(p, tok) for p in PROMPTS[:2]]
    for row, m, ref in zip(ids, mask, refs):
        assert row[: len(ref)].tolist() == ref
        assert (row[len(ref):] == tok.pad_token_id).all() and m.tolist() == [1] * len(ref) + [0] * (len(row) - len(ref))
    # both chunks end with </s>; the answer is [▁Yes, </s>]
    assert refs[0][refs[0].index(-200) - 1] == tok.eos_token_id and refs[0][-1] == tok.eos_token_id
    assert labels.tolist() == [[tok.convert_tokens_to_ids("▁Yes"), tok.eos_token_id]] * 2
    assert tok.convert_ids_to_tokens(tok("Yes").input_ids) == ["▁Yes", "</s>"]


# ----------------------------------------------------------------------------------------------------
# score formula
def test_score_is_exp_of_minus_the_official_loss(model, tok, images):
    got = VQAScoreScorer(model, tok, batch_size=3).score(images, PROMPTS)  # one batch, prompts of different lengths
    ref = torch.tensor([ref_official_loss_score(model, tok, im, p) for im, p in zip(images, PROMPTS)])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)
    assert ((got > 0) & (got < 1)).all()


def test_score_is_geometric_mean_of_yes_and_eos(model, tok, images):
    """Hand-derived: decoder inputs [pad, ▁Yes] (T5's shift-right, decoder_start_token_id 0); the mean CE over
    the labels [▁Yes, </s>] gives sqrt(P(▁Yes) * P(</s> | ▁Yes)), softmax over the tokenizer's vocabulary."""
    yes, eos = tok.convert_tokens_to_ids("▁Yes"), tok.eos_token_id
    scorer = VQAScoreScorer(model, tok)
    im, prompt = images[0], PROMPTS[0]
    ids = torch.tensor(ref_input_ids(prompt, tok))
    i = int((ids == -200).nonzero()[0])
    emb = model.t5.get_input_embeddings()
    with torch.no_grad():
        embeds = torch.cat([emb(ids[:i]), ref_image_features(model, ref_pixels(im)[None])[0], emb(ids[i + 1:])])[None]
        logits = model.t5(inputs_embeds=embeds, decoder_input_ids=torch.tensor([[0, yes]])).logits[0]
    probs = logits[:, : len(tok)].softmax(-1)
    expected = math.sqrt(probs[0, yes].item() * probs[1, eos].item())
    got = scorer.score([im], [prompt]).item()
    assert got == pytest.approx(expected, rel=1e-4)
    # the head's padding rows (vocab_size > len(tokenizer), as FlanT5's 32128 vs 32100) are not in the softmax
    assert model.t5.config.vocab_size > len(tok)
    full = logits.softmax(-1)
    assert got != pytest.approx(math.sqrt(full[0, yes].item() * full[1, eos].item()), rel=1e-3)


def test_batching_image_and_precision(model, tok, images):
    scorer = VQAScoreScorer(model, tok)
    batched = scorer.score(images, PROMPTS, batch_size=3)
    torch.testing.assert_close(batched, scorer.score(images, PROMPTS, batch_size=1), rtol=1e-4, atol=0)
    # the image reaches the encoder (well above the tolerances used here)
    assert (scorer.score(images[1:2], PROMPTS[:1]).log() - batched[:1].log()).abs().item() > 1e-2
    # bf16 (CPU: no autocast) runs and returns fp32; on random weights log-scores agree within 5%
    bf16 = VQAScoreScorer(tiny.tiny_vqascore_model(seed=3), tok, dtype="bf16").score(images, PROMPTS)
    assert bf16.dtype == torch.float32
    assert ((bf16.log() - batched.log()).abs() < 0.05 * batched.log().abs()).all()


# ----------------------------------------------------------------------------------------------------
# official checkpoint format, loading, errors
def _official_config(model):
    cfg = model.t5.config.to_dict()
    cfg.update(model_type="clip_t5", architectures=["CLIPT5ForConditionalGeneration"], mm_vision_tower="openai/clip-vit-large-patch14-336",
               mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
               mm_hidden_size=model.vision.config.hidden_size, use_mm_proj=True, image_aspect_ratio="pad")
    return cfg


def _write_sharded(state, directory):
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, directory / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_official_checkpoint_roundtrip(tmp_path, model, tok, images):
    sd = to_official_state_dict(model)
    for key in ("vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
                "vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight", "mm_projector.0.weight",
                "mm_projector.2.bias", "embed_tokens.weight", "shared.weight", "lm_head.weight",
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "decoder.final_layer_norm.weight"):
        assert key in sd, key
    ref = VQAScoreScorer(model, tok).score(images, PROMPTS)
    full = tmp_path / "clip-flant5"
    full.mkdir()
    _write_sharded(sd, full)
    (full / "config.json").write_text(json.dumps(_official_config(model)))
    loaded = get_scorer("vqascore", str(full), tokenizer=tok)
    assert loaded.name == "vqascore" and loaded.describe()["weights"] == str(full)
    torch.testing.assert_close(loaded.score(images, PROMPTS), ref)
    # without vision_tower.* keys the CLIP tower comes from mm_vision_tower / vision_tower= (clip_t5.py:53)
    model.vision.save_pretrained(tmp_path / "clip336")
    novision = tmp_path / "novision"
    novision.mkdir()
    torch.save({k: v for k, v in sd.items() if not k.startswith("vision_tower.")}, novision / "pytorch_model.bin")
    (novision / "config.json").write_text(json.dumps(_official_config(model)))
    tok.save_pretrained(novision)  # tokenizer found next to the weights
    loaded = get_scorer("vqascore", str(novision), vision_tower=str(tmp_path / "clip336"))
    torch.testing.assert_close(loaded.score(images, PROMPTS), ref)
    # strict loading: a missing T5 weight is refused
    torch.save({k: v for k, v in sd.items() if k != "lm_head.weight"}, novision / "pytorch_model.bin")
    with pytest.raises(RuntimeError, match="lm_head"):
        get_scorer("vqascore", str(novision), vision_tower=str(tmp_path / "clip336"))


def test_missing_weights_error_is_short_and_actionable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for src in (str(tmp_path / "missing"), str(tmp_path), None):  # no path, an empty directory, the hub id offline
        with pytest.raises(ModelNotFoundError) as exc:
            get_scorer("vqascore", src)
        assert len(str(exc.value).splitlines()) == 1 and "--scorer-path vqascore=" in str(exc.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="pytorch_model.bin"):
        get_scorer("vqascorexl", str(tmp_path))


def test_registry_and_tiny_builder():
    assert {"vqascore", "vqascorexl"} <= set(available_scorers())
    scorer = tiny.tiny_scorer("vqascore", seed=1)
    assert isinstance(scorer, VQAScoreScorer) and scorer.name == "vqascore"
    assert scorer.model.select_layer == -2 and scorer.model.select_feature == "patch"
