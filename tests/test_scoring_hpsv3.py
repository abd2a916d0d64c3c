"""HPSv3: prompt, preprocessing, the reward formula and the official checkpoint format.

The model is a random-weight transformers Qwen2-VL (the real ``Qwen2VLForConditionalGeneration`` classes, tiny
sizes) with a tiny offline ``Qwen2Tokenizer`` (BPE learned here on the prompt text, Qwen2-VL's special tokens) and
the real ``Qwen2VLImageProcessorPil``. The references are transcribed from github.com/MizzenAI/HPSv3 at 77e8fa3
(``hpsv3/inference.py``, ``hpsv3/model/qwen2vl_trainer.py``, ``hpsv3/dataset/*.py``) and transformers 4.45.2 (the
version the authors pin); they share only weights, tokenizer and image processor with ``t2ialign.scoring.hpsv3``.
"""
import copy
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from t2ialign.errors import ModelNotFoundError, UserFacingError
from t2ialign.scoring import HPSv3Scorer, available_scorers, get_scorer
from t2ialign.scoring import hpsv3 as H
from helpers.images import random_image

# hpsv3/dataset/data_collator_qwen.py:11-32, verbatim (four lines end in spaces)
OFFICIAL_INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""
# sha256 of that string, computed from the authors' file (guards the trailing spaces against editors)
OFFICIAL_INSTRUCTION_SHA256 = "0393599dad45a971903d1d62a3acf9bad3ccccdafa7f40f680523419e1f68b7a"
# data_collator_qwen.py:38-42
OFFICIAL_PROMPT_WITH_SPECIAL_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""
# chat_template.json of Qwen/Qwen2-VL-7B-Instruct
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content "
    "or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# Qwen2-VL's special tokens in vocabulary order (151643...151656 in the real tokenizer)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
            "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
            "<|image_pad|>", "<|video_pad|>"]
PIXELS = 256 * 28 * 28  # inference.py:98-99
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
PROMPTS = ["a photo of a cat", "a red car on a street at night, highly detailed", "an astronaut riding a horse", "dog"]
CASES = [(512, 512, "RGB"), (301, 200, "RGB"), (200, 517, "RGBA"), (320, 240, "L"), (64, 48, "RGB"), (1001, 77, "RGB"),
         (448, 448, "RGB")]


_image = random_image


# ----------------------------------------------------------------------------------------------------
# tiny real-class tokenizer / image processor / model
def tiny_tokenizer():
    """``Qwen2Tokenizer`` (Qwen2's pre-tokenizer regex + byte-level BPE) with merges learned on the HPSv3 text and
    Qwen2-VL's special tokens after the vocabulary, as in the real tokenizer; no ``<|Reward|>`` yet."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=700, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([OFFICIAL_INSTRUCTION, OFFICIAL_PROMPT_WITH_SPECIAL_TOKEN] + PROMPTS, trainer)
    model = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    assert tok.convert_tokens_to_ids(SPECIALS) == list(range(len(model["vocab"]), len(model["vocab"]) + len(SPECIALS)))
    return tok


def tiny_config(tok):
    """Qwen2-VL with small sizes; the config vocabulary is padded past the tokenizer (152064 vs 151657 in 7B)."""
    from transformers import Qwen2VLConfig

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=len(tok) + 37, rms_norm_eps=1e-6, rope_theta=1e6, initializer_range=0.3,
                rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, initializer_range=0.3)
    ids = {k: tok.convert_tokens_to_ids(t) for k, t in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                                                          ("vision_start_token_id", "<|vision_start|>"),
                                                          ("vision_end_token_id", "<|vision_end|>")]}
    return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)


def official_head(hidden_size, seed=7):
    """``rm_head`` of qwen2vl_trainer.py:98-106 (ranknet, rm_head_kwargs=None, output_dim=2)."""
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))
    for p in head.parameters():  # larger than nn.Linear's default, so that mu spreads visibly
        nn.init.normal_(p, std=0.5 / math.sqrt(p.shape[-1]))
    return head.float().eval()


def official_state_dict(qwen, head):
    """The keys of ``Qwen2VLRewardModelBT.state_dict()`` under transformers 4.45.2: ``visual.*``, ``model.*`` (text
    decoder), ``lm_head.weight``, ``rm_head.*``."""
    sd = {}
    for k, v in qwen.state_dict().items():
        if k.startswith("model.visual."):
            sd["visual." + k[len("model.visual."):]] = v.clone()
        elif k.startswith("model.language_model."):
            sd["model." + k[len("model.language_model."):]] = v.clone()
        else:
            assert k == "lm_head.weight", k
            sd[k] = v.clone()
    sd.update({"rm_head." + k: v.clone() for k, v in head.state_dict().items()})
    return sd


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def image_processor():
    from transformers import Qwen2VLImageProcessorPil

    # the values of Qwen/Qwen2-VL-7B-Instruct's preprocessor_config.json
    return Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056, patch_size=14, temporal_patch_size=2, merge_size=2,
                                    image_mean=MEAN.tolist(), image_std=STD.tolist())


@pytest.fixture(scope="module")
def official(tok):
    """(Qwen2VLForConditionalGeneration resized as train.py:82-83 does, head, official state dict, tokenizer + reward)."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    qwen = Qwen2VLForConditionalGeneration(tiny_config(tok)).eval()
    tok_r = copy.deepcopy(tok)
    tok_r.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})  # train.py:59-65
    qwen.resize_token_embeddings(len(tok_r))
    head = official_head(qwen.config.text_config.hidden_size)
    return qwen, head, official_state_dict(qwen, head), tok_r


@pytest.fixture(scope="module")
def scorer(official, tok, image_processor):
    model = H.build_from_official(tiny_config(tok), official[2], reward_token_id=len(tok))  # <|Reward|> comes next
    return HPSv3Scorer(model, copy.deepcopy(tok), image_processor, batch_size=4)


@pytest.fixture(scope="module")
def images():
    return [_image(w, h, m, seed=i) for i, (w, h, m) in enumerate(CASES[:4])]


# ----------------------------------------------------------------------------------------------------
# references
def ref_smart_resize(height, width, factor=28, min_pixels=PIXELS, max_pixels=PIXELS):
    """hpsv3/dataset/utils.py:55-81."""
    assert max(height, width) / min(height, width) <= 200
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar, w_bar = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def ref_fetch_image(ele):
    """utils.py:84-176 for a PIL image: convert('RGB'), smart_resize with the message's min/max pixels, PIL bicubic."""
    image = ele["image"].convert("RGB")
    width, height = image.size
    h, w = ref_smart_resize(height, width, min_pixels=ele["min_pixels"], max_pixels=ele["max_pixels"])
    return image.resize((w, h), Image.BICUBIC)


def ref_pixel_values(image):
    """transformers 4.45.2 ``Qwen2VLImageProcessor._preprocess`` for one RGB PIL image (its own smart_resize with
    min 3136 / max 12845056 keeps these sizes), ``rescale`` (x * 1/255 in float64, then float32), ``normalize``,
    temporal tile to 2 frames, patch flattening ``transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)``."""
    arr = np.array(image)
    h, w = arr.shape[:2]
    assert h % 28 == 0 and w % 28 == 0 and 3136 <= h * w <= 12845056  # the processor's smart_resize is the identity
    x = (arr * (1 / 255)).astype(np.float32)
    x = ((x - MEAN) / STD).transpose(2, 0, 1)[None]
    x = np.tile(x, (2, 1, 1, 1))
    gh, gw = h // 14, w // 14
    x = x.reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return torch.from_numpy(np.ascontiguousarray(x.reshape(gh * gw, 3 * 2 * 14 * 14))), [1, gh, gw]


def ref_batch(tok_r, image_processor, images, prompts):
    """``prepare_batch`` (inference.py:97-137) with a real ``Qwen2VLProcessor`` and the Qwen2-VL chat template."""
    from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok_r, video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=QWEN2_VL_CHAT_TEMPLATE)
    processor.tokenizer.padding_side = "right"  # train.py:52-54
    messages = [[{"role": "user", "content": [
        {"type": "image", "image": im, "min_pixels": PIXELS, "max_pixels": PIXELS},  # inference.py:106-111
        {"type": "text", "text": OFFICIAL_INSTRUCTION.format(text_prompt=p) + OFFICIAL_PROMPT_WITH_SPECIAL_TOKEN}]}]
        for im, p in zip(images, prompts)]
    image_inputs = [ref_fetch_image(m[0]["content"][0]) for m in messages]  # process_vision_info
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=text, images=image_inputs, padding=True, return_tensors="pt")


def ref_rewards(official, batch):
    """``Qwen2VLRewardModelBT.forward`` (qwen2vl_trainer.py:148-247, reward_token='special') on the source model."""
    qwen, head, _, tok_r = official
    visual, text_model = qwen.model.visual, qwen.model.language_model
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = text_model.embed_tokens(ids)
        pixel_values = batch["pixel_values"].type(visual.get_dtype())
        image_embeds = visual(pixel_values, grid_thw=batch["image_grid_thw"]).pooler_output
        image_mask = (ids == qwen.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.device, embeds.dtype))
        hidden = text_model(input_ids=None, position_ids=None, attention_mask=batch["attention_mask"], inputs_embeds=embeds,
                            use_cache=False)[0]
        logits = head(hidden.float())  # [B, L, 2]
    special = ids == tok_r.convert_tokens_to_ids("<|Reward|>")
    return logits[special, ...].view(ids.shape[0], 1, -1).view(ids.shape[0], -1)


# ----------------------------------------------------------------------------------------------------
# prompt text
def test_instruction_is_the_official_text():
    assert hashlib.sha256(OFFICIAL_INSTRUCTION.encode()).hexdigest() == OFFICIAL_INSTRUCTION_SHA256
    assert H.INSTRUCTION == OFFICIAL_INSTRUCTION
    assert H.PROMPT_WITH_SPECIAL_TOKEN == OFFICIAL_PROMPT_WITH_SPECIAL_TOKEN


def test_text_equals_the_chat_template_and_processor(official, image_processor, scorer):
    tok_r = official[3]
    ims, prompts = [_image(512, 512), _image(301, 200, seed=1)], ["a {braced} prompt", PROMPTS[1]]
    batch = ref_batch(tok_r, image_processor, ims, prompts)
    ours = scorer.build_inputs(ims, prompts)
    assert ours["input_ids"].tolist() == batch["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == batch["attention_mask"].tolist()
    # right padding; 256 image tokens for 512x512 (-> 448x448 -> 32x32 patches -> 16x16 merged)
    assert batch["attention_mask"][0, -1] == 0 and batch["attention_mask"][1].all()
    image_id = tok_r.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"][0] == image_id).sum() == 256 and ours["image_grid_thw"].tolist()[0] == [1, 32, 32]
    assert H.hpsv3_text("x", 2).count("<|Reward|>") == 1


# ----------------------------------------------------------------------------------------------------
# preprocessing
@pytest.mark.parametrize("w,h,mode", CASES)
def test_preprocessing_matches_official(w, h, mode, scorer):
    im = _image(w, h, mode, seed=w)
    ele = {"image": im, "min_pixels": PIXELS, "max_pixels": PIXELS}
    ref_im = ref_fetch_image(ele)
    ours_im = H.fetch_image(im)
    assert ours_im.size == ref_im.size and np.array_equal(np.array(ours_im), np.array(ref_im))
    ref_pix, ref_grid = ref_pixel_values(ref_im)
    ours = scorer.build_inputs([im], ["x"])
    assert ours["image_grid_thw"].tolist() == [ref_grid]
    torch.testing.assert_close(ours["pixel_values"], ref_pix, atol=1e-6, rtol=0)


def test_smart_resize_hand_values():
    # 512: rounds to 504 (> 200704) -> beta = 512/448 -> 448; 301x200 rounds to 308x196 (< 200704) -> ceil: 560x392
    assert H.smart_resize(512, 512) == (448, 448)
    assert H.smart_resize(200, 301) == (392, 560)
    assert H.smart_resize(1000, 1000) == (448, 448)
    with pytest.raises(ValueError, match="aspect ratio"):
        H.smart_resize(10, 2010)


def test_rgba_alpha_is_dropped_not_composited(scorer):
    rgb = Image.new("RGB", (448, 448), (10, 200, 30))
    rgba = rgb.copy()
    rgba.putalpha(0)  # fully transparent: compositing onto white would give white
    pixels = [scorer.build_inputs([im], ["x"])["pixel_values"] for im in (rgba, rgb)]
    torch.testing.assert_close(pixels[0], pixels[1])


# ----------------------------------------------------------------------------------------------------
# score formula
def test_scores_equal_the_official_forward(official, image_processor, scorer, images):
    batch = ref_batch(official[3], image_processor, images, PROMPTS)
    ref = ref_rewards(official, batch)
    got = scorer.rewards(images, PROMPTS)
    assert ref.shape == (4, 2)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer.score(images, PROMPTS), ref[:, 0], atol=1e-5, rtol=1e-5)  # mu (inference.py:168)
    # the image and the prompt both reach mu, far above the tolerance
    assert (ref[:, 0].max() - ref[:, 0].min()) > 1e-2
    assert abs(scorer.score(images[:1], PROMPTS[1:2]) - ref[0, 0]).item() > 1e-3
    assert abs(scorer.score(images[1:2], PROMPTS[:1]) - ref[0, 0]).item() > 1e-3


def test_positions_are_1d_not_mrope(official, image_processor, scorer, images):
    """The official forward calls the text decoder with position_ids=None; stock Qwen2-VL (3-D M-RoPE positions
    for the image) would give other numbers."""
    qwen, head, _, tok_r = official
    batch = ref_batch(tok_r, image_processor, images[:2], PROMPTS[:2])
    with torch.no_grad():
        kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                                          "mm_token_type_ids")}
        hidden = qwen.model(**kwargs, use_cache=False).last_hidden_state
        stock = head(hidden[batch["input_ids"] == tok_r.convert_tokens_to_ids("<|Reward|>")].float())[:, 0]
    assert (stock - scorer.score(images[:2], PROMPTS[:2])).abs().max() > 1e-3


def test_batched_equals_one_at_a_time(scorer, images):
    ims = images + [_image(640, 360, seed=9)]
    prompts = PROMPTS + ["a very long prompt about a small green tree on a big mountain under a blue sky at night"]
    torch.testing.assert_close(scorer.score(ims, prompts, batch_size=5), scorer.score(ims, prompts, batch_size=1),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scorer.score(ims, prompts, batch_size=2), scorer.score(ims, prompts, batch_size=1),
                               atol=1e-5, rtol=1e-5)


def test_bf16_backbone_keeps_an_fp32_head(official, tok, image_processor, images):
    model = H.build_from_official(tiny_config(tok), official[2], reward_token_id=len(tok))
    s = HPSv3Scorer(model, copy.deepcopy(tok), image_processor, dtype="bf16")
    assert s.model.rm_head[0].weight.dtype == torch.float32 and s.model.backbone.visual.dtype == torch.bfloat16
    out = s.score(images[:2], PROMPTS[:2])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_reward_token_must_appear_once(scorer, images):
    with pytest.raises(ValueError, match="exactly one"):
        scorer.score(images[:1], ["a prompt that says <|Reward|> itself"])


# ----------------------------------------------------------------------------------------------------
# official checkpoint format, loading, errors
def _write_official_dir(path, official, tok, image_processor):
    from safetensors.torch import save_file

    path.mkdir()
    tiny_config(tok).save_pretrained(path)  # the backbone's config.json (vocabulary not yet cut)
    tok.save_pretrained(path)  # the Qwen2-VL tokenizer files, without <|Reward|>
    image_processor.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in official[2].items()}, str(path / "HPSv3.safetensors"))
    return path


def test_registered_name_loads_the_official_format(tmp_path, official, tok, image_processor, images):
    d = _write_official_dir(tmp_path / "hpsv3", official, tok, image_processor)
    assert "hpsv3" in available_scorers()
    ref = ref_rewards(official, ref_batch(official[3], image_processor, images, PROMPTS))[:, 0]
    for src in (str(d), str(d / "HPSv3.safetensors")):
        loaded = get_scorer("hpsv3", path_or_id=src, batch_size=3, tf32=False, resize_on="cpu")  # as the CLI calls it
        assert isinstance(loaded, HPSv3Scorer) and loaded.describe()["weights"] == str(d / "HPSv3.safetensors")
        assert loaded.describe()["backbone"] == str(d)
        torch.testing.assert_close(loaded.score(images, PROMPTS), ref, atol=1e-5, rtol=1e-5)
    # strict loading: a missing head weight and a foreign key are refused
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in official[2].items() if k != "rm_head.5.bias"}
    save_file(sd, str(d / "HPSv3.safetensors"))
    with pytest.raises(RuntimeError, match="5.bias"):
        get_scorer("hpsv3", path_or_id=str(d))
    sd.update({"rm_head.5.bias": official[2]["rm_head.5.bias"], "score.weight": torch.zeros(1)})
    save_file(sd, str(d / "HPSv3.safetensors"))
    with pytest.raises(KeyError, match="score.weight"):
        get_scorer("hpsv3", path_or_id=str(d))


def test_tokenizer_mismatch_is_refused(official, tok, image_processor):
    model = H.build_from_official(tiny_config(tok), official[2], reward_token_id=len(tok))
    other = copy.deepcopy(tok)
    other.add_tokens(["<|extra|>"])  # one more token: <|Reward|> would not be the checkpoint's last row
    with pytest.raises(UserFacingError, match="does not match the checkpoint"):
        HPSv3Scorer(model, other, image_processor)


def test_missing_weights_error_is_one_line(tmp_path, monkeypatch, official, tok, image_processor):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for src in (None, "MizzenAI/HPSv3"):  # the hub default, offline
        with pytest.raises(ModelNotFoundError) as exc:
            get_scorer("hpsv3", src)
        msg = str(exc.value)
        assert len(msg.splitlines()) == 1 and "hf download MizzenAI/HPSv3 HPSv3.safetensors" in msg
    with pytest.raises(ModelNotFoundError) as exc:  # an empty directory
        get_scorer("hpsv3", str(tmp_path))
    assert len(str(exc.value).splitlines()) == 1 and "HPSv3.safetensors" in str(exc.value)
    # the checkpoint alone: config / tokenizer / processor come from Qwen/Qwen2-VL-7B-Instruct, not cached here
    from safetensors.torch import save_file

    (tmp_path / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in official[2].items()}, str(tmp_path / "ckpt" / "HPSv3.safetensors"))
    with pytest.raises(ModelNotFoundError) as exc:
        get_scorer("hpsv3", str(tmp_path / "ckpt"))
    msg = str(exc.value)
    assert len(msg.splitlines()) == 1 and "hf download Qwen/Qwen2-VL-7B-Instruct" in msg and "backbone=" in msg
