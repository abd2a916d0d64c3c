"""ImageReward (THUDM) rebuilt on transformers' BLIP classes, without the ``image-reward`` package.

Architecture of ``THUDM/ImageReward`` (``ImageReward.pt`` + ``med_config.json``): BLIP ViT-L/16 at 224
(``BlipVisionModel``: hidden 1024, 24 layers, 16 heads, LayerNorm eps 1e-6) -> BERT-base with
cross-attention to all image tokens (``BlipTextModel`` without pooler, configured from med_config.json)
-> hidden state of the first token -> MLP 768->1024->128->64->16->1 (no activations) ->
``(r - 0.16717362830052426) / 1.0333394966054072``.

Text: ``bert-base-uncased`` tokenizer with BLIP's added ``[DEC]`` (bos) and ``[ENC]`` tokens, padded to
and truncated at 35 tokens; the ids go in as tokenized (``[CLS] ... [SEP]``; ImageReward.score does not
swap in ``[ENC]``). Image: torchvision ``Resize(224, bicubic)`` + ``CenterCrop`` on the PIL image, then
RGB, /255, OpenAI mean/std (``preprocess.clip_preprocess(crop="round", convert_first=False)``).

The official checkpoint is a plain state dict with keys ``blip.visual_encoder.*`` (timm-style ViT),
``blip.text_encoder.*`` (BLIP ``med`` BERT; same names as ``BlipTextModel``), ``mlp.layers.*`` and unused
``blip.vision_proj`` / ``blip.text_proj``; ``convert_official_state_dict`` renames them.
"""
from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from .base import Scorer, register_scorer, resolve_file
from .clip_based import AestheticMLP
from .preprocess import clip_preprocess

IMAGEREWARD_REPO = "THUDM/ImageReward"
IR_MEAN = 0.16717362830052426
IR_STD = 1.0333394966054072

_VIT_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.fc(\d)\.", r"encoder.layers.\1.mlp.fc\2."),
    (r"^norm\.", "post_layernorm."),
]


def _rename(key: str, rules) -> str:
    for pat, rep in rules:
        new, n = re.subn(pat, rep, key)
        if n:
            return new
    raise KeyError(key)


def convert_official_state_dict(state: dict) -> dict[str, dict]:
    """Official ``ImageReward.pt`` keys -> ``{"vision": ..., "text": ..., "mlp": ...}`` state dicts."""
    out = {"vision": {}, "text": {}, "mlp": {}}
    for k, v in state.items():
        if k.startswith("blip.visual_encoder."):
            out["vision"][_rename(k[len("blip.visual_encoder."):], _VIT_RENAMES)] = v
        elif k.startswith("blip.text_encoder."):
            sub = k[len("blip.text_encoder."):]
            if not sub.endswith("position_ids"):
                out["text"][sub] = v
        elif k.startswith("mlp."):
            out["mlp"][k[len("mlp."):]] = v
    return out


def to_official_state_dict(vision: nn.Module, text: nn.Module, mlp: nn.Module) -> dict:
    """Inverse of ``convert_official_state_dict`` (tests write checkpoints in the official format)."""
    inverse = [
        (r"^embeddings\.class_embedding$", "cls_token"),
        (r"^embeddings\.position_embedding$", "pos_embed"),
        (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
        (r"^encoder\.layers\.(\d+)\.layer_norm1\.", r"blocks.\1.norm1."),
        (r"^encoder\.layers\.(\d+)\.layer_norm2\.", r"blocks.\1.norm2."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.qkv\.", r"blocks.\1.attn.qkv."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.projection\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layers\.(\d+)\.mlp\.fc(\d)\.", r"blocks.\1.mlp.fc\2."),
        (r"^post_layernorm\.", "norm."),
    ]
    sd = {f"blip.visual_encoder.{_rename(k, inverse)}": v.clone() for k, v in vision.state_dict().items()}
    sd.update({f"blip.text_encoder.{k}": v.clone() for k, v in text.state_dict().items()})
    sd.update({f"mlp.{k}": v.clone() for k, v in mlp.state_dict().items()})
    return sd


def build_imagereward_modules(med_config: dict, vision_kwargs: dict | None = None):
    """(BlipVisionModel, BlipTextModel) with random weights: ViT-L/16 by default, BERT from med_config."""
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    # initializer_range: BlipVisionConfig defaults to 1e-10, which transformers applies to every Linear/Conv2d and to
    # the position/class embeddings; a randomly initialised tower then outputs ~0 for every image (|h| ~ 1e-5 after
    # the final LayerNorm) and the image cannot reach the text encoder's cross-attention. BLIP's own ViT initialises
    # with trunc_normal(std=0.02). Irrelevant when a checkpoint is loaded (every weight is overwritten).
    vk = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
              patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu", initializer_range=0.02)
    vk.update(vision_kwargs or {})
    vision = BlipVisionModel(BlipVisionConfig(**vk))
    m = med_config
    tcfg = BlipTextConfig(
        vocab_size=m.get("vocab_size", 30524), hidden_size=m.get("hidden_size", 768),
        encoder_hidden_size=vk["hidden_size"],  # BLIP sets encoder_width = vision width
        intermediate_size=m.get("intermediate_size", 3072), num_hidden_layers=m.get("num_hidden_layers", 12),
        num_attention_heads=m.get("num_attention_heads", 12), max_position_embeddings=m.get("max_position_embeddings", 512),
        hidden_act=m.get("hidden_act", "gelu"), layer_norm_eps=m.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=m.get("hidden_dropout_prob", 0.1), attention_probs_dropout_prob=m.get("attention_probs_dropout_prob", 0.1),
        pad_token_id=m.get("pad_token_id", 0), initializer_range=m.get("initializer_range", 0.02),
        bos_token_id=None, eos_token_id=None, sep_token_id=None,
    )
    text = BlipTextModel(tcfg, add_pooling_layer=False)
    return vision, text


def blip_tokenizer(path_or_id: str = "bert-base-uncased"):
    """BLIP's ``init_tokenizer``: BERT uncased + ``[DEC]`` bos token + ``[ENC]`` additional token."""
    from transformers import BertTokenizer

    from t2ialign.hub import local_only

    tok = path_or_id if isinstance(path_or_id, BertTokenizer) else \
        BertTokenizer.from_pretrained(path_or_id, local_files_only=local_only())
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardScorer(Scorer):
    name = "imagereward"
    scale = "standardised reward (SDXL ~ 0.5-0.9)"

    def __init__(self, vision, text, mlp: AestheticMLP, tokenizer, device=None, dtype=torch.float32, batch_size=32,
                 tf32=False, max_length: int = 35):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, tf32=tf32)
        self.vision = self._prepare(vision)
        self.text = self._prepare(text)
        self.mlp = mlp.to(self.device, torch.float32).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_size = int(vision.config.image_size)
        self.info = {"preprocessing": f"PIL bicubic shortest side->{self.image_size}, center crop (round), RGB, /255, OpenAI mean/std",
                     "text_max_length": max_length}

    def _score_batch(self, images, prompts):
        pix = clip_preprocess(images, self.image_size, crop="round", convert_first=False).to(self.device, self.dtype)
        image_embeds = self.vision(pixel_values=pix).last_hidden_state
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        # all-ones, as in ImageReward.score (transformers 5.x's BlipTextAttention does not forward a cross-attention
        # mask to BlipTextSelfAttention, so only an all-ones mask gives the same result there)
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.text(input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device),
                        encoder_hidden_states=image_embeds, encoder_attention_mask=atts)
        h = out.last_hidden_state[:, 0, :].float()
        return ((self.mlp(h) - IR_MEAN) / IR_STD).reshape(-1)

    @classmethod
    def from_checkpoint(cls, ckpt_path: str, med_config_path: str, tokenizer="bert-base-uncased", vision_kwargs=None, **kwargs):
        with open(med_config_path) as fh:
            med = json.load(fh)
        from .weights import load_weights_file

        state = load_weights_file(ckpt_path, "ImageReward checkpoint")
        if isinstance(state, dict) and "state_dict" in state and not any(k.startswith("blip.") for k in state):
            state = state["state_dict"]
        parts = convert_official_state_dict(state)
        if vision_kwargs is None:  # infer the ViT size from the checkpoint
            qkv = parts["vision"]["encoder.layers.0.self_attn.qkv.weight"]
            width = qkv.shape[1]
            depth = 1 + max(int(k.split(".")[2]) for k in parts["vision"] if k.startswith("encoder.layers."))
            patch = parts["vision"]["embeddings.patch_embedding.weight"].shape[-1]
            n_pos = parts["vision"]["embeddings.position_embedding"].shape[1] - 1
            vision_kwargs = dict(hidden_size=width, intermediate_size=parts["vision"]["encoder.layers.0.mlp.fc1.weight"].shape[0],
                                 num_hidden_layers=depth, num_attention_heads=max(1, width // 64), patch_size=patch,
                                 image_size=int(round(n_pos ** 0.5)) * patch)
        vision, text = build_imagereward_modules(med, vision_kwargs)
        vision.load_state_dict(parts["vision"], strict=True)
        text.load_state_dict(parts["text"], strict=True)
        mlp = AestheticMLP(int(parts["mlp"]["layers.0.weight"].shape[1]))
        mlp.load_state_dict(parts["mlp"], strict=True)
        if isinstance(tokenizer, str):
            from .base import load_hf
            from transformers import BertTokenizer

            tok = load_hf(BertTokenizer, tokenizer, "ImageReward tokenizer (bert-base-uncased)",
                          "pass tokenizer=<local bert-base-uncased dir>")
            tokenizer = blip_tokenizer(tok)
        scorer = cls(vision, text, mlp, tokenizer, **kwargs)
        scorer.info["weights"] = ckpt_path
        return scorer

    @classmethod
    def from_pretrained(cls, path_or_id=None, device=None, dtype=torch.float32, tokenizer="bert-base-uncased", **kwargs):
        hint = ("download ImageReward.pt and med_config.json from hf.co/THUDM/ImageReward into one directory and pass "
                "--scorer-path imagereward=DIR")
        src = path_or_id or IMAGEREWARD_REPO
        if os.path.isfile(src):  # the .pt itself; med_config.json next to it
            ckpt, med = src, os.path.join(os.path.dirname(src), "med_config.json")
            med = resolve_file(med, None, "ImageReward med_config.json", hint)
        else:
            ckpt = resolve_file(src, "ImageReward.pt", "ImageReward checkpoint", hint)
            med = resolve_file(src, "med_config.json", "ImageReward med_config.json", hint) if not os.path.isdir(src) \
                else resolve_file(os.path.join(src, "med_config.json"), None, "ImageReward med_config.json", hint)
        return cls.from_checkpoint(ckpt, med, tokenizer=tokenizer, device=device, dtype=dtype, **kwargs)


register_scorer("imagereward", ImageRewardScorer.from_pretrained, "ImageReward v1.0 (BLIP ViT-L + BERT), standardised")
