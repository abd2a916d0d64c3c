"""HPSv3 (Human Preference Score v3, Ma et al., ICCV 2025) on transformers' Qwen2-VL, without the ``hpsv3`` package.

Re-implemented from the authors' code, github.com/MizzenAI/HPSv3 at commit 77e8fa3 (main, 2025-09-08; the code
pins transformers 4.45.2, ``pyproject.toml:34``). File:line sources here and in docs/SCORERS.md, section "HPSv3".

Model (``hpsv3/model/qwen2vl_trainer.py:59-247``, config ``hpsv3/config/HPSv3_7B.yaml``): Qwen2-VL-7B-Instruct,
fully fine-tuned, plus a reward head ``Linear(3584, 1024) ReLU Dropout(0.05) Linear(1024, 16) ReLU Linear(16, 2)``
(``rm_head_type: ranknet`` with ``rm_head_kwargs=None``, ``:98-106``; ``output_dim: 2``) run in fp32 (``:108``,
``:192-193``) on the last hidden state (after the final RMSNorm) at the ``<|Reward|>`` token (``:229-241``). Output
``(mu, log sigma)`` (the uncertainty loss uses ``sigma = exp(out[1])``, ``:706-720``); the score is ``mu``
(``hpsv3/inference.py:168``, README "Extract mu values").

The forward differs from stock Qwen2-VL: it embeds the tokens, splices the merged vision features into the
``<|image_pad|>`` rows and calls the TEXT decoder with ``position_ids=None`` (``qwen2vl_trainer.py:148-189``), so
transformers 4.45.2 gives every token the 1-D position ``arange(L)`` in all three M-RoPE sections
(``modeling_qwen2_vl.py:1204-1205`` of 4.45.2); the 3-D image positions of ``get_rope_index`` are never used.

Prompt (``inference.py:97-137``, ``hpsv3/dataset/data_collator_qwen.py:11-42``): one user turn of the Qwen2-VL chat
template, the image then ``INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN``, with the
generation prompt; ``<|Reward|>`` is an added special token (``hpsv3/train.py:59-65``), batches are right-padded.

Image (``hpsv3/dataset/utils.py:55-176``): ``convert("RGB")`` (alpha dropped), ``smart_resize`` to multiples of 28
with ``min_pixels = max_pixels = 256 * 28 * 28`` (``inference.py:98-110``), PIL bicubic; then Qwen2-VL's image
processor (``/255``, OpenAI mean/std, 14-px patches, temporal copy, 2x2 merge order), whose own resize is then an
identity. 256 merged tokens for a square image.

Weights: ``MizzenAI/HPSv3`` / ``HPSv3.safetensors`` (``inference.py:19-20``): the whole model's state dict in
transformers 4.45 names (``visual.*``, ``model.*``, ``lm_head.weight``, ``rm_head.*``) with the vocabulary cut to
``len(tokenizer)`` after adding ``<|Reward|>`` (``train.py:82-83``). Config, tokenizer and image processor come
from Qwen/Qwen2-VL-7B-Instruct (only its json/txt files are read). ``lm_head`` is not used by the reward and is
not built here.
"""
from __future__ import annotations

import math
import os

import torch
from PIL import Image
from torch import nn

from t2ialign.errors import UserFacingError

from .base import Scorer, features, load_hf, register_scorer, resolve_file
from .preprocess import to_pil, to_rgb

HPSV3_HUB_ID = "MizzenAI/HPSv3"
HPSV3_FILE = "HPSv3.safetensors"
BACKBONE_ID = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
IMAGE_TOKEN = "<|image_pad|>"
IMAGE_PIXELS = 256 * 28 * 28  # min_pixels = max_pixels (inference.py:98-99, 109-110; HPSv3_7B.yaml:17-18)
IMAGE_FACTOR = 28  # hpsv3/dataset/utils.py:26
MAX_RATIO = 200  # hpsv3/dataset/utils.py:29
_HINT = (f"pass --scorer-path hpsv3=DIR with {HPSV3_FILE} and the json/txt files of {BACKBONE_ID} in DIR "
         f"(or backbone=<local copy of {BACKBONE_ID}>)")

# hpsv3/dataset/data_collator_qwen.py:11-32 (trailing spaces included)
INSTRUCTION = (
    '\n'
    'You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a '
    'overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the '
    'worst and 10 being the best. \n'
    '\n'
    '**Visual Quality:**  \n'
    'Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n'
    '- **Reasonableness:** The image should not contain any significant biological or logical errors, such as '
    'abnormal body structures or nonsensical environmental setups.\n'
    '- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to '
    'interpret, with no blurring or indistinct areas.\n'
    '- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual '
    'elements (e.g., hair, clothing, shadows).\n'
    '- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, '
    'composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense '
    'of harmony and balance.\n'
    '- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, '
    'or adult material. If such content is present, the image quality and satisfaction score should be the '
    'lowest possible. \n'
    '\n'
    '**Text Alignment:**  \n'
    'Assess how well the image matches the textual prompt across the following sub-dimensions:\n'
    '- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, '
    'object) align with the textual description. The subject should match the description in terms of number, '
    'appearance, and behavior.\n'
    '- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how '
    'well the image adheres to this style.\n'
    '- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the '
    'image logically fit the scenario described in the prompt. The environment should support and enhance the '
    'subject without contradictions.\n'
    '- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, '
    'accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be '
    'acceptable, but critical attributes should be preserved.\n'
    '- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in '
    'the image. The generated content should not introduce elements that conflict with or distort the original '
    'description.\n'
    'Textual prompt - {text_prompt}\n'
    '\n'
    '\n'
)
# data_collator_qwen.py:38-42
PROMPT_WITH_SPECIAL_TOKEN = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"
# the Qwen2-VL-7B-Instruct chat template for [{"role": "user", "content": [image, text]}], add_generation_prompt=True
CHAT_PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
CHAT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"


def hpsv3_text(prompt: str, n_image_tokens: int) -> str:
    """The chat text of one (image, prompt) pair, the image placeholder expanded as Qwen2VLProcessor does."""
    text = INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN
    return CHAT_PREFIX + IMAGE_TOKEN * n_image_tokens + "<|vision_end|>" + text + CHAT_SUFFIX


# -- image ---------------------------------------------------------------------------------------------
def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = IMAGE_PIXELS,
                 max_pixels: int = IMAGE_PIXELS) -> tuple[int, int]:
    """qwen-vl-utils' ``smart_resize`` as copied in hpsv3/dataset/utils.py:55-81: sides rounded to multiples of
    ``factor``, then scaled (floor / ceil to multiples) into ``[min_pixels, max_pixels]``."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def fetch_image(image: Image.Image, pixels: int = IMAGE_PIXELS) -> Image.Image:
    """``fetch_image`` for a PIL image (utils.py:84-176): RGB, ``smart_resize``, PIL bicubic."""
    image = to_rgb(image)
    height, width = smart_resize(image.height, image.width, min_pixels=pixels, max_pixels=pixels)
    return image.resize((width, height), Image.BICUBIC)


def pil_image_processor_class():
    """Qwen2-VL's numpy/PIL image processor (the class transformers 4.45 used); transformers 5 names it ``...Pil``."""
    import transformers

    return getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor


# -- model ---------------------------------------------------------------------------------------------
class RewardHead(nn.Sequential):
    """``rm_head`` (qwen2vl_trainer.py:98-106): keys ``{0,3,5}.{weight,bias}``; output ``(mu, log sigma)``."""

    def __init__(self, hidden_size: int, output_dim: int = 2):
        super().__init__(nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, output_dim))


class HPSv3Model(nn.Module):
    """A transformers ``Qwen2VLModel`` (vision tower + text decoder) and the fp32 reward head."""

    def __init__(self, backbone, rm_head: RewardHead, reward_token_id: int):
        super().__init__()
        self.backbone, self.rm_head = backbone, rm_head.float()
        self.reward_token_id = int(reward_token_id)
        self.image_token_id = int(backbone.config.image_token_id)

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw) -> torch.Tensor:
        """(B, 2) = ``(mu, log sigma)`` as ``Qwen2VLRewardModelBT.forward`` computes them (``reward_token="special"``)."""
        embeds = self.backbone.get_input_embeddings()(input_ids)
        visual = self.backbone.visual
        image = features(visual(pixel_values.to(visual.dtype), grid_thw=image_grid_thw))
        if int((input_ids == self.image_token_id).sum()) != image.shape[0]:
            raise ValueError(f"{int((input_ids == self.image_token_id).sum())} image tokens for {image.shape[0]} image features")
        mask = (input_ids == self.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(mask, image.to(embeds.dtype))
        # position_ids=None in the official call: 1-D positions 0..L-1 in all three M-RoPE sections
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, batch, -1)
        hidden = self.backbone.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                              position_ids=positions, use_cache=False).last_hidden_state
        at_reward = input_ids == self.reward_token_id
        if not bool((at_reward.sum(-1) == 1).all()):
            raise ValueError(f"each prompt must hold exactly one {REWARD_TOKEN} token (found {at_reward.sum(-1).tolist()})")
        return self.rm_head(hidden[at_reward].float())  # fp32 head, as under autocast(float32) (trainer.py:192-193)


# -- the official checkpoint -------------------------------------------------------------------------------
def split_official_state_dict(state: dict) -> tuple[dict, dict]:
    """Official keys (transformers 4.45 ``Qwen2VLRewardModelBT``) -> (``Qwen2VLModel`` keys, ``RewardHead`` keys):
    ``visual.*`` -> ``visual.*``, ``model.*`` -> ``language_model.*``, ``rm_head.*`` -> head, ``lm_head.weight``
    dropped (the reward never uses it). A ``{"model": state}`` wrapper is unwrapped (inference.py:46-47)."""
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    backbone, head = {}, {}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix == "visual":
            backbone[key] = value
        elif prefix == "model":
            backbone["language_model." + rest] = value
        elif prefix == "rm_head":
            head[rest] = value
        elif key != "lm_head.weight":
            raise KeyError(f"unexpected HPSv3 checkpoint key {key!r} (expected visual.*, model.*, lm_head.weight, rm_head.*)")
    if not head or not backbone:
        raise KeyError("HPSv3 checkpoint lacks rm_head.* or backbone (visual.* / model.*) tensors")
    return backbone, head


def load_state_dict_file(path: str) -> dict:
    from .weights import load_weights_file

    return load_weights_file(path, "HPSv3 checkpoint", mmap=True)


def build_from_official(config, state: dict, reward_token_id: int) -> HPSv3Model:
    """``HPSv3Model`` from a Qwen2-VL config and the official state dict, loaded strictly. The text vocabulary
    is set to the checkpoint's embedding rows; parameters are assigned from the state dict (no random init)."""
    from accelerate import init_empty_weights
    from transformers import Qwen2VLModel

    backbone_sd, head_sd = split_official_state_dict(state)
    config.text_config.vocab_size = int(backbone_sd["language_model.embed_tokens.weight"].shape[0])
    with init_empty_weights(include_buffers=False):  # parameters on meta, rotary buffers computed
        backbone = Qwen2VLModel(config)
    backbone.load_state_dict(backbone_sd, strict=True, assign=True)
    head = RewardHead(config.text_config.hidden_size, output_dim=head_sd["5.weight"].shape[0])
    head.load_state_dict(head_sd, strict=True)
    return HPSv3Model(backbone.eval(), head.eval(), reward_token_id)


# -- scorer ------------------------------------------------------------------------------------------------
def add_reward_token(tokenizer):
    """``<|Reward|>`` as an additional special token (train.py:59-65), if the tokenizer lacks it, and right padding
    (train.py:52-54); the tokenizer is changed in place."""
    if REWARD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    tokenizer.padding_side = "right"
    return tokenizer


class HPSv3Scorer(Scorer):
    """HPSv3 ``mu`` per (image, prompt); ``rewards()`` returns ``(mu, log sigma)``."""

    name = "hpsv3"
    scale = "mu of the HPSv3 reward head (unbounded real number)"

    def __init__(self, model: HPSv3Model, tokenizer, image_processor, device=None, dtype=torch.float32, batch_size=8,
                 tf32=False, image_pixels: int = IMAGE_PIXELS, resize_on: str = "cpu"):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, tf32=tf32)
        if resize_on != "cpu":  # the CLI passes --resize-on to every scorer
            raise UserFacingError("HPSv3 resizes with PIL on the CPU as the official code does; use --resize-on cpu")
        self.tokenizer = add_reward_token(tokenizer)
        self.image_processor, self.image_pixels = image_processor, int(image_pixels)
        check_vocabulary(model, self.tokenizer)
        model.backbone = self._prepare(model.backbone)
        model.rm_head = model.rm_head.to(self.device, torch.float32).eval().requires_grad_(False)
        self.model = model.eval()
        self.info = {"preprocessing": f"RGB, smart_resize to {self.image_pixels} px (multiples of 28), PIL bicubic, "
                                      "Qwen2-VL processor (OpenAI mean/std)",
                     "head": "fp32", "positions": "1-D (position_ids=None as the official forward)",
                     "official_dtype": "bfloat16 backbone, fp32 head"}

    def build_inputs(self, images, prompts) -> dict:
        """input_ids, attention_mask, pixel_values, image_grid_thw of ``prepare_batch`` (inference.py:97-137)."""
        vision = self.image_processor(images=[fetch_image(im, self.image_pixels) for im in images], return_tensors="pt")
        merge = int(self.image_processor.merge_size) ** 2
        texts = [hpsv3_text(p, int(g.prod()) // merge) for p, g in zip(prompts, vision["image_grid_thw"])]
        text = self.tokenizer(texts, padding=True, return_tensors="pt")
        return {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
                "pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}

    @torch.no_grad()
    def rewards(self, images, prompts) -> torch.Tensor:
        """(N, 2) fp32 ``(mu, log sigma)``, the official ``reward()`` output, as one batch."""
        inputs = {k: v.to(self.device) for k, v in self.build_inputs([to_pil(im) for im in images], prompts).items()}
        return self.model(**inputs).float()

    def _score_batch(self, images, prompts):
        return self.rewards(images, prompts)[:, 0]

    @classmethod
    def from_pretrained(cls, path_or_id=None, backbone=None, device=None, dtype=torch.float32, tokenizer=None,
                        image_processor=None, **kwargs):
        """Weights from ``path_or_id`` (default ``MizzenAI/HPSv3``: a ``.safetensors`` / state-dict file, a directory
        holding HPSv3.safetensors, or a hub id); config, tokenizer and image processor from ``backbone``, else from
        that directory when it holds a config.json, else from Qwen/Qwen2-VL-7B-Instruct."""
        from transformers import AutoTokenizer, Qwen2VLConfig

        path = resolve_file(path_or_id or HPSV3_HUB_ID, HPSV3_FILE, "HPSv3 checkpoint", _HINT)
        src = backbone or _local_backbone(path_or_id) or BACKBONE_ID
        what = f"HPSv3 backbone files ({BACKBONE_ID}: config, tokenizer, preprocessor)"
        hint = (f"pass backbone=DIR (only its *.json and *.txt files are read: add --include '*.json' '*.txt' "
                f"to skip the weights)")
        config = load_hf(Qwen2VLConfig, src, what, hint)
        tokenizer = tokenizer or load_hf(AutoTokenizer, src, what, hint)
        image_processor = image_processor or load_hf(pil_image_processor_class(), src, what, hint)
        tokenizer = add_reward_token(tokenizer)
        model = build_from_official(config, load_state_dict_file(path), tokenizer.convert_tokens_to_ids(REWARD_TOKEN))
        scorer = cls(model, tokenizer, image_processor, device=device, dtype=dtype, **kwargs)
        scorer.info.update(weights=path, backbone=src)
        return scorer


def _local_backbone(path_or_id) -> str | None:
    """The local directory of the checkpoint, when it also holds the Qwen2-VL config.json."""
    if not path_or_id or not os.path.exists(path_or_id):
        return None
    folder = path_or_id if os.path.isdir(path_or_id) else os.path.dirname(os.path.abspath(path_or_id))
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def check_vocabulary(model: HPSv3Model, tokenizer) -> None:
    """The official checkpoint's embedding has ``len(tokenizer)`` rows after ``<|Reward|>`` was added (train.py:82-83),
    and ``<|Reward|>`` is its last row; anything else means a tokenizer that does not belong to the weights."""
    rows = model.backbone.get_input_embeddings().weight.shape[0]
    reward_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if len(tokenizer) != rows or reward_id != rows - 1 or reward_id != model.reward_token_id or image_id != model.image_token_id:
        raise UserFacingError(
            f"HPSv3: tokenizer ({len(tokenizer)} tokens, {REWARD_TOKEN}={reward_id}, {IMAGE_TOKEN}={image_id}) does not match "
            f"the checkpoint ({rows} embedding rows, {REWARD_TOKEN} expected at {rows - 1}, image token "
            f"{model.image_token_id}); use the tokenizer of {BACKBONE_ID}")


register_scorer("hpsv3", HPSv3Scorer.from_pretrained, "HPSv3 (Qwen2-VL-7B + reward head), mu of the <|Reward|> token")
