"""VQAScore with CLIP-FlanT5 (Lin et al., ECCV 2024), rebuilt on transformers without the ``t2v_metrics`` package.

Sources: github.com/linzhiqiu/t2v_metrics at commit 10d549b (the last one with CLIP-FlanT5; v3.1 moved it to the
"legacy v3.0 release"), paths below relative to ``t2v_metrics/models/vqascore_models/``; docs/SCORERS.md has the
full list with line numbers.

Model (``clip_t5/model/language_model/clip_t5.py``): CLIP ViT-L/14 at 336 px (``openai/clip-vit-large-patch14-336``)
-> hidden states of the second-to-last layer, CLS dropped (576 tokens) -> ``mlp2x_gelu`` projector
``Linear(1024, d) GELU Linear(d, d)`` -> spliced into the FlanT5 encoder input in place of the ``<image>`` token
-> FlanT5 encoder-decoder (XXL: d = 4096, XL: d = 2048).

Prompt (``clip_t5_model.py``): question ``Does this figure show "{prompt}"? Please answer yes or no.`` in the
``t5_chat`` format ``SYSTEM_MSG + " USER: <image>\\n" + question + " ASSISTANT: "``; the text before and after
``<image>`` is tokenized separately and each chunk ends with ``</s>``. Answer ``Yes`` -> labels ``[▁Yes, </s>]``.

Score: ``exp(-mean cross-entropy of the labels)`` from the decoder logits over the tokenizer's vocabulary
(32100 entries; the checkpoint's 32128-row head is cut by ``resize_token_embeddings(len(tokenizer))``). With the
default answer that is ``sqrt(P(▁Yes | image, question) * P(</s> | image, question, ▁Yes))``: the paper writes
P("Yes"), the code also scores the end-of-sequence token.

Image: RGB, pad to a square with the CLIP mean colour ``(122, 116, 104)`` (``expand2square``), then the CLIP
processor of the vision tower (PIL bicubic shortest side -> 336, center crop 336, OpenAI mean/std).

Checkpoint keys (``CLIPT5ForConditionalGeneration.state_dict()``): T5 keys as in ``T5ForConditionalGeneration``
(``shared.*``, ``encoder.*``, ``decoder.*``, ``lm_head.*``), plus ``embed_tokens.weight`` (an alias of the shared
embedding), ``vision_tower.vision_tower.vision_model.*`` (the wrapped ``CLIPVisionModel``, transformers 4 names)
and ``mm_projector.{0,2}.*``. ``convert_official_state_dict`` / ``to_official_state_dict`` map them.
"""
from __future__ import annotations

import json
import math
import os
import re

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from t2ialign.errors import ModelNotFoundError

from .base import Scorer, load_hf, register_scorer, resolve_file
from .preprocess import OPENAI_CLIP_MEAN, clip_preprocess, to_rgb

VQASCORE_REPOS = {"xxl": "zhiqiulin/clip-flant5-xxl", "xl": "zhiqiulin/clip-flant5-xl"}
TOKENIZER_REPOS = {"xxl": "google/flan-t5-xxl", "xl": "google/flan-t5-xl"}
VISION_TOWER_ID = "openai/clip-vit-large-patch14-336"

QUESTION_TEMPLATE = 'Does this figure show "{}"? Please answer yes or no.'
ANSWER_TEMPLATE = "Yes"
SYSTEM_MSG = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
CONTEXT_LEN = 2048

# defaults of ModelArguments (clip_t5.py), used when config.json lacks the mm_* keys
MM_DEFAULTS = {"mm_vision_tower": VISION_TOWER_ID, "mm_vision_select_layer": -2, "mm_projector_type": "mlp2x_gelu",
               "mm_vision_select_feature": "patch", "mm_hidden_size": 1024}

# openai/clip-vit-large-patch14-336; head count is not recoverable from the weights' shapes
_VIT_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  patch_size=14, image_size=336, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)


# -- prompt and answer -------------------------------------------------------------------------------
def t5_chat_prompt(question: str) -> str:
    """The ``t5_chat`` conversation format of the stage-2 models (``format_question``)."""
    return SYSTEM_MSG + " USER: " + IMAGE_TOKEN + "\n" + question + " ASSISTANT: "


def tokenize_with_image(text: str, tokenizer) -> list[int]:
    """``t5_tokenizer_image_token``: each chunk around ``<image>`` tokenized on its own (each ends with
    ``</s>``), chunks joined by ``IMAGE_TOKEN_INDEX``."""
    chunks = [tokenizer(chunk).input_ids for chunk in text.split(IMAGE_TOKEN)]
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX] + list(chunk)
    return ids


# -- image -------------------------------------------------------------------------------------------
def pad_fill_colour(mean=OPENAI_CLIP_MEAN) -> tuple[int, ...]:
    """``tuple(int(x * 255) for x in image_processor.image_mean)``: (122, 116, 104) for the OpenAI mean."""
    return tuple(int(x * 255) for x in mean)


def expand_to_square(image: Image.Image, fill) -> Image.Image:
    """``expand2square``: paste on a square canvas of ``fill``, centred with a floored offset."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def vqascore_preprocess(images, size: int = 336, pad: bool = True) -> torch.Tensor:
    """(N, 3, size, size): RGB, pad to square with the mean colour (``pad``), CLIP recipe at ``size``."""
    rgb = [to_rgb(im) for im in images]
    if pad:
        rgb = [expand_to_square(im, pad_fill_colour()) for im in rgb]
    return clip_preprocess(rgb, size, crop="floor", convert_first=True)


# -- model -------------------------------------------------------------------------------------------
def build_projector(projector_type: str, in_dim: int, out_dim: int) -> nn.Module:
    """``build_vision_projector``: ``linear`` or ``mlp{N}x_gelu`` (Linear, then N-1 x (GELU, Linear))."""
    if projector_type == "linear":
        return nn.Linear(in_dim, out_dim)
    match = re.match(r"^mlp(\d+)x_gelu$", projector_type)
    if not match:
        raise ValueError(f"unknown projector type {projector_type!r}")
    layers = [nn.Linear(in_dim, out_dim)]
    for _ in range(1, int(match.group(1))):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class CLIPFlanT5(nn.Module):
    """CLIP vision tower + projector + FlanT5 (``CLIPT5ForConditionalGeneration`` on transformers classes)."""

    def __init__(self, vision, projector: nn.Module, t5, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        if select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"select_feature must be 'patch' or 'cls_patch', got {select_feature!r}")
        self.vision, self.projector, self.t5 = vision, projector, t5
        self.select_layer, self.select_feature = int(select_layer), select_feature

    @property
    def image_size(self) -> int:
        return int(self.vision.config.image_size)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, n_patches, d_model): the selected layer's hidden states (CLS dropped for ``patch``), projected."""
        hidden = self.vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states[self.select_layer]
        if self.select_feature == "patch":
            hidden = hidden[:, 1:]
        return self.projector(hidden.to(self.projector_dtype))

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    def splice_images(self, input_ids, attention_mask, image_features):
        """``prepare_inputs_labels_for_multimodal``: each ``IMAGE_TOKEN_INDEX`` is replaced by the image's
        feature rows. Padding sits after the image, so the mask keeps its values shifted by the image length."""
        embed = self.t5.get_input_embeddings()
        rows = []
        for ids, feats in zip(input_ids, image_features):
            where = torch.where(ids == IMAGE_TOKEN_INDEX)[0]
            if where.numel() != 1:
                raise ValueError(f"expected one {IMAGE_TOKEN} token per prompt, found {where.numel()}")
            i = int(where[0])
            rows.append(torch.cat([embed(ids[:i]), feats.to(embed.weight.dtype), embed(ids[i + 1:])], dim=0))
        embeds = torch.stack(rows)
        extra = embeds.shape[1] - input_ids.shape[1]
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], extra), attention_mask], dim=1)
        return embeds, mask

    def forward(self, input_ids, attention_mask, labels, pixel_values) -> torch.Tensor:
        """Decoder logits (B, answer_len, vocab) with teacher forcing on ``labels`` (T5 shifts them right)."""
        embeds, mask = self.splice_images(input_ids, attention_mask, self.encode_images(pixel_values))
        out = self.t5(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                      decoder_attention_mask=labels.ne(IGNORE_INDEX), use_cache=False, return_dict=True)
        return out.logits

    # -- official checkpoint format ---------------------------------------------------------------
    def official_state_dict(self) -> dict:
        return to_official_state_dict(self)


def answer_likelihood(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """``exp(-CrossEntropyLoss(reduction='mean')(logits[k], labels[k]))`` per row, in fp32, over the first
    ``vocab_size`` logits (= the official ``resize_token_embeddings(len(tokenizer))`` of the LM head)."""
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    logp = F.log_softmax(logits.float(), dim=-1)
    keep = labels.ne(IGNORE_INDEX)
    token_logp = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    return (token_logp.sum(-1) / keep.sum(-1).clamp(min=1)).exp()


# -- checkpoint keys ---------------------------------------------------------------------------------
_VISION_PREFIX = "vision_tower.vision_tower."
_PROJECTOR_PREFIX = "mm_projector."
_T5_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def convert_official_state_dict(state: dict) -> dict[str, dict]:
    """Official keys -> ``{"vision": ..., "projector": ..., "t5": ...}``. Vision keys keep their
    ``vision_model.`` prefix (transformers 4 names; ``_vision_keys_for`` adapts them); the ``embed_tokens``
    alias and position-id buffers are dropped; the shared embedding is filled in under all three T5 names."""
    parts = {"vision": {}, "projector": {}, "t5": {}}
    alias = None
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith(_VISION_PREFIX):
            parts["vision"][key[len(_VISION_PREFIX):]] = value
        elif key.startswith(_PROJECTOR_PREFIX):
            parts["projector"][key[len(_PROJECTOR_PREFIX):]] = value
        elif key == "embed_tokens.weight":
            alias = value
        else:
            parts["t5"][key] = value
    shared = next((parts["t5"][k] for k in _T5_EMBED_KEYS if k in parts["t5"]), alias)
    if shared is not None:
        for k in _T5_EMBED_KEYS:
            parts["t5"].setdefault(k, shared)
    return parts


def to_official_state_dict(model: CLIPFlanT5) -> dict:
    """Inverse of ``convert_official_state_dict`` (tests write checkpoints in the official format)."""
    sd = {}
    for k, v in model.vision.state_dict().items():
        name = k if k.startswith("vision_model.") else "vision_model." + k
        sd[_VISION_PREFIX + name] = v.clone()
    sd.update({_PROJECTOR_PREFIX + k: v.clone() for k, v in model.projector.state_dict().items()})
    t5 = {k: v.clone() for k, v in model.t5.state_dict().items()}
    sd.update(t5)
    sd["embed_tokens.weight"] = t5["shared.weight"]
    return sd


def _vision_keys_for(vision: nn.Module, state: dict) -> dict:
    """Match the ``vision_model.`` prefix to the installed transformers (4.x keeps it, 5.x dropped it)."""
    wants_prefix = any(k.startswith("vision_model.") for k in vision.state_dict())
    out = {}
    for k, v in state.items():
        bare = k[len("vision_model."):] if k.startswith("vision_model.") else k
        out["vision_model." + bare if wants_prefix else bare] = v
    return out


def vision_config_from_weights(state: dict, **overrides):
    """A ``CLIPVisionConfig`` for the checkpoint's vision weights: ViT-L/14-336 values, sizes read from shapes."""
    from transformers import CLIPVisionConfig

    bare = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in state.items()}
    patch = bare["embeddings.patch_embedding.weight"]
    n_pos = bare["embeddings.position_embedding.weight"].shape[0]
    cfg = dict(_VIT_L_336)
    cfg.update(hidden_size=patch.shape[0], patch_size=patch.shape[-1],
               image_size=int(round(math.sqrt(n_pos - 1))) * patch.shape[-1],
               intermediate_size=bare["encoder.layers.0.mlp.fc1.weight"].shape[0],
               num_hidden_layers=1 + max(int(k.split(".")[2]) for k in bare if k.startswith("encoder.layers.")),
               num_attention_heads=max(1, patch.shape[0] // 64))
    cfg.update(overrides)
    return CLIPVisionConfig(**cfg)


def t5_config_from_dict(config: dict):
    from transformers import T5Config

    keep = {k: v for k, v in config.items() if not k.startswith(("mm_", "architectures", "model_type", "auto_map"))}
    return T5Config(**keep)


def build_from_official(config: dict, state: dict, vision=None, vision_config=None) -> CLIPFlanT5:
    """A ``CLIPFlanT5`` from the official ``config.json`` dict and state dict. ``vision``: a ``CLIPVisionModel``
    to use when the checkpoint holds no vision weights (the official code loads ``mm_vision_tower`` then)."""
    from transformers import CLIPVisionModel, T5ForConditionalGeneration

    mm = {k: config.get(k, v) for k, v in MM_DEFAULTS.items()}
    parts = convert_official_state_dict(state)
    if parts["vision"]:
        cfg = vision_config or vision_config_from_weights(parts["vision"])
        vision = CLIPVisionModel(cfg)
        vision.load_state_dict(_vision_keys_for(vision, parts["vision"]), strict=True)
    elif vision is None:
        raise ModelNotFoundError("VQAScore checkpoint has no vision_tower.* weights; pass vision_tower=<CLIP dir>")
    t5_cfg = t5_config_from_dict(config)
    with torch.device("meta"):  # 11B parameters: no random init, the state dict is assigned
        t5 = T5ForConditionalGeneration(t5_cfg)
    t5.load_state_dict(parts["t5"], strict=True, assign=True)
    if any(t.is_meta for t in list(t5.parameters()) + list(t5.buffers())):
        raise RuntimeError("T5 tensors left uninitialised after loading the checkpoint")
    projector = build_projector(mm["mm_projector_type"], int(vision.config.hidden_size), int(t5_cfg.d_model))
    projector.load_state_dict(parts["projector"], strict=True)
    return CLIPFlanT5(vision.eval(), projector.eval(), t5.eval(), mm["mm_vision_select_layer"],
                      mm["mm_vision_select_feature"])


# -- weight files ------------------------------------------------------------------------------------
_WEIGHT_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors", "pytorch_model.bin")


def _load_tensor_file(path: str) -> dict:
    from .weights import load_weights_file

    return load_weights_file(path, "VQAScore weights", mmap=True)


def _sibling(src: str, found: str, name: str, hint: str) -> str:
    """A shard named in an index: next to the index locally, else from the same hub repo."""
    if os.path.exists(src):
        return os.path.join(os.path.dirname(found), name)
    return resolve_file(f"{src.strip('/')}/{name}", None, "VQAScore weight shard", hint)


def load_official_files(src: str, hint: str) -> tuple[dict, dict]:
    """(config dict, state dict) of a CLIP-FlanT5 directory or hub repo (sharded or single-file, .bin or
    .safetensors)."""
    if os.path.isfile(src):  # a file inside the directory (config.json, an index, a shard)
        src = os.path.dirname(src) or "."
    with open(resolve_file(src, "config.json", "VQAScore config.json", hint)) as fh:
        config = json.load(fh)
    for name in _WEIGHT_FILES:
        try:
            found = resolve_file(src, name, "VQAScore weights", hint)
        except ModelNotFoundError:
            continue
        if not name.endswith(".index.json"):
            return config, _load_tensor_file(found)
        with open(found) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(_load_tensor_file(_sibling(src, found, shard, hint)))
        return config, state
    raise ModelNotFoundError(f"VQAScore weights: none of {', '.join(_WEIGHT_FILES)} found at {src}; {hint}")


# -- scorer ------------------------------------------------------------------------------------------
class VQAScoreScorer(Scorer):
    """``P(answer | image, question)`` of CLIP-FlanT5; one float in (0, 1) per (image, prompt)."""

    name = "vqascore"
    scale = "P('Yes' | image, question) in (0, 1), geometric mean over [Yes, </s>]"

    def __init__(self, model: CLIPFlanT5, tokenizer, device=None, dtype=torch.float32, batch_size=16, tf32=False,
                 question_template: str = QUESTION_TEMPLATE, answer_template: str = ANSWER_TEMPLATE,
                 pad_to_square: bool = True, max_length: int = CONTEXT_LEN, name: str = "vqascore"):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, tf32=tf32)
        self.model = self._prepare(model)
        self.tokenizer = tokenizer
        self.name = name
        self.question_template, self.answer_template = question_template, answer_template
        self.pad_to_square, self.max_length = pad_to_square, int(max_length)
        self.vocab_size = len(tokenizer)
        self.info = {"question": question_template, "answer": answer_template,
                     "preprocessing": (f"RGB, {'pad to square with (122,116,104), ' if pad_to_square else ''}"
                                       f"PIL bicubic shortest side->{model.image_size}, center crop, OpenAI mean/std"),
                     "vocab": self.vocab_size, "official_dtype": "bfloat16 (weights + CUDA autocast)"}

    def build_inputs(self, prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels) as ``CLIPT5Model.forward`` pads and truncates them."""
        questions = [t5_chat_prompt(self.question_template.format(p)) for p in prompts]
        answers = [self.answer_template.format(p) for p in prompts]
        ids = [torch.tensor(tokenize_with_image(q, self.tokenizer)) for q in questions]
        labels = [torch.tensor(tokenize_with_image(a, self.tokenizer)) for a in answers]
        pad = self.tokenizer.pad_token_id
        ids = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad)[:, : self.max_length]
        labels = nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=IGNORE_INDEX)[:, : self.max_length]
        return ids, ids.ne(pad).long(), labels

    def pixel_values(self, images) -> torch.Tensor:
        return vqascore_preprocess(images, self.model.image_size, self.pad_to_square).to(self.device, self.dtype)

    def _score_batch(self, images, prompts):
        ids, mask, labels = (t.to(self.device) for t in self.build_inputs(prompts))
        with self._autocast():
            logits = self.model(ids, mask, labels, self.pixel_values(images))
        return answer_likelihood(logits, labels, self.vocab_size)

    def _autocast(self):
        # the official forward runs bf16 weights under torch.autocast('cuda', bfloat16) (fp32 softmax/loss)
        enabled = self.device.type == "cuda" and self.dtype == torch.bfloat16
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=enabled)

    @classmethod
    def from_pretrained(cls, path_or_id=None, size: str = "xxl", device=None, dtype=torch.float32, tokenizer=None,
                        vision_tower=None, **kwargs):
        """Weights from ``path_or_id`` (default ``zhiqiulin/clip-flant5-{size}``), tokenizer from that directory
        or ``google/flan-t5-{size}``, vision tower from the checkpoint or ``vision_tower`` / ``mm_vision_tower``."""
        from transformers import AutoTokenizer, CLIPVisionModel

        if size not in VQASCORE_REPOS:
            raise ValueError(f"size must be one of {list(VQASCORE_REPOS)}")
        scorer_name = "vqascore" if size == "xxl" else f"vqascore{size}"
        src = path_or_id or VQASCORE_REPOS[size]
        hint = (f"download hf.co/{VQASCORE_REPOS[size]} (config.json + weight files) and pass "
                f"--scorer-path {scorer_name}=DIR")
        config, state = load_official_files(src, hint)
        vision = None
        if not any(k.startswith(_VISION_PREFIX) for k in state):
            tower = vision_tower or config.get("mm_vision_tower", VISION_TOWER_ID)
            vision = load_hf(CLIPVisionModel, tower, "VQAScore vision tower", "pass vision_tower=<local CLIP dir>")
        model = build_from_official(config, state, vision=vision)
        if tokenizer is None or isinstance(tokenizer, str):
            tokenizer = _load_t5_tokenizer(AutoTokenizer, [tokenizer] if tokenizer else [src, TOKENIZER_REPOS[size]], hint)
        scorer = cls(model, tokenizer, device=device, dtype=dtype, name=scorer_name, **kwargs)
        scorer.info["weights"] = src
        return scorer


def _load_t5_tokenizer(cls, candidates, hint):
    from .clip_based import _load_tokenizer

    return _load_tokenizer(cls, candidates, "VQAScore tokenizer (FlanT5)", hint)


def _loader(size):
    def load(path_or_id=None, device=None, dtype=torch.float32, **kwargs):
        return VQAScoreScorer.from_pretrained(path_or_id, size=size, device=device, dtype=dtype, **kwargs)

    return load


register_scorer("vqascore", _loader("xxl"), "VQAScore (CLIP-FlanT5-XXL), P(Yes | image, question)")
register_scorer("vqascorexl", _loader("xl"), "VQAScore (CLIP-FlanT5-XL), P(Yes | image, question)")
