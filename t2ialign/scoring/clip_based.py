"""Scorers on a transformers ``CLIPModel``: PickScore, CLIP score, LAION aesthetic predictor.

* PickScore (``yuvalkirstain/PickScore_v1``, processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``):
  ``logit_scale.exp() * cos(img, txt)`` (~100 * cos; SDXL ~ 22). Raw cosine (~0.22) is a known mistake.
* CLIP score (``openai/clip-vit-large-patch14``): ``100 * cos`` clamped at 0 per image (torchmetrics
  clamps the corpus MEAN instead: use ``clamp=False`` and ``max(mean, 0)`` to reproduce it); images
  enter as 0-255 (PIL/uint8) and are divided by 255 exactly once.
* Aesthetic (``sac+logos+ava1-l14-linearMSE.pth`` on OpenAI CLIP ViT-L/14): ``MLP(e / ||e||)`` with the
  768->1024->128->64->16->1 linear MLP (no activations), AVA 1-10 scale (SDXL ~ 6).

Text is tokenized with padding and truncation at 77 tokens keeping the EOS token (the pooled output
is taken at EOS). Images follow ``preprocess.clip_preprocess`` (PIL bicubic, exact) unless
``resize_on="device"``.
"""
from __future__ import annotations

import torch
from torch import nn

from t2ialign.hub import local_only, require_cached

from .base import Scorer, features, load_hf, register_scorer, resolve_file
from .preprocess import clip_preprocess, clip_preprocess_device

PICKSCORE_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_ID = "openai/clip-vit-large-patch14"
AESTHETIC_CLIP_ID = "openai/clip-vit-large-patch14"
# the official MLP is distributed on GitHub (christophschuhmann/improved-aesthetic-predictor); the same
# file is mirrored on the hub under this name (used by TRL's DDPO example)
AESTHETIC_MLP_ID = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"


class _CLIPModelScorer(Scorer):
    crop = "floor"  # transformers CLIPProcessor; "round" = torchvision CenterCrop (OpenAI clip.load)
    convert_first = True  # RGB before resize (transformers); False = after crop (OpenAI clip.load)

    def __init__(self, model, tokenizer, device=None, dtype=torch.float32, batch_size=32, tf32=False,
                 resize_on: str = "cpu", max_length: int = 77):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, tf32=tf32)
        if resize_on not in ("cpu", "device"):
            raise ValueError("resize_on must be 'cpu' (exact PIL recipe) or 'device'")
        self.model = self._prepare(model)
        self.tokenizer = tokenizer
        self.resize_on = resize_on
        self.max_length = max_length
        self.image_size = int(getattr(model.config.vision_config, "image_size", 224))
        self.info = {"preprocessing": f"PIL bicubic shortest side->{self.image_size}, center crop ({self.crop}), /255, OpenAI mean/std"
                     if resize_on == "cpu" else f"torch bicubic antialias on {self.device} (approximate), center crop, OpenAI mean/std"}

    def pixel_values(self, images) -> torch.Tensor:
        if self.resize_on == "device":
            x = clip_preprocess_device(images, self.image_size, self.crop, device=self.device)
        else:
            x = clip_preprocess(images, self.image_size, self.crop, self.convert_first)
        return x.to(self.device, self.dtype)

    def image_embeds(self, images) -> torch.Tensor:
        return features(self.model.get_image_features(pixel_values=self.pixel_values(images))).float()

    def text_embeds(self, prompts) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return features(self.model.get_text_features(**tok)).float()

    def cosine(self, images, prompts) -> torch.Tensor:
        img = self.image_embeds(images)
        txt = self.text_embeds(prompts)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(-1)


class PickScoreScorer(_CLIPModelScorer):
    name = "pickscore"
    scale = "logit_scale.exp() * cos (~100*cos); SDXL ~ 22"

    def _score_batch(self, images, prompts):
        return self.model.logit_scale.exp().float() * self.cosine(images, prompts)

    @classmethod
    def from_pretrained(cls, path_or_id=None, processor_id=None, device=None, dtype=torch.float32, **kwargs):
        path_or_id = path_or_id or PICKSCORE_ID
        hint = "pass a local directory of the CLIPModel with --scorer-path pickscore=DIR (from_pretrained format)"
        require_cached(path_or_id, "PickScore weights", hint)  # offline: fail before the transformers import
        from transformers import AutoTokenizer, CLIPModel

        model = load_hf(CLIPModel, path_or_id, "PickScore weights", hint)
        tok = _load_tokenizer(AutoTokenizer, [path_or_id, processor_id or PICKSCORE_PROCESSOR_ID], "PickScore tokenizer", hint)
        scorer = cls(model, tok, device=device, dtype=dtype, **kwargs)
        scorer.info["weights"] = path_or_id
        return scorer


class CLIPScoreScorer(_CLIPModelScorer):
    name = "clip"
    scale = "100 * cos, clamped at 0"

    def __init__(self, model, tokenizer, clamp: bool = True, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.clamp = clamp
        self.info["clamp"] = "per image" if clamp else "none (clamp the mean like torchmetrics)"

    def _score_batch(self, images, prompts):
        s = 100.0 * self.cosine(images, prompts)
        return s.clamp(min=0) if self.clamp else s

    @classmethod
    def from_pretrained(cls, path_or_id=None, device=None, dtype=torch.float32, **kwargs):
        path_or_id = path_or_id or CLIP_ID
        hint = "pass a local CLIPModel directory with --scorer-path clip=DIR"
        require_cached(path_or_id, "CLIP weights", hint)  # offline: fail before the transformers import
        from transformers import AutoTokenizer, CLIPModel

        model = load_hf(CLIPModel, path_or_id, "CLIP weights", hint)
        tok = _load_tokenizer(AutoTokenizer, [path_or_id], "CLIP tokenizer", hint)
        scorer = cls(model, tok, device=device, dtype=dtype, **kwargs)
        scorer.info["weights"] = path_or_id
        return scorer


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor MLP; state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)

    @classmethod
    def from_file(cls, path: str) -> "AestheticMLP":
        from .weights import load_weights_file

        state = load_weights_file(path, "aesthetic MLP")
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        mlp = cls(int(state["layers.0.weight"].shape[1]))
        mlp.load_state_dict(state, strict=True)
        return mlp


class AestheticScorer(_CLIPModelScorer):
    """LAION aesthetic predictor; the prompt is ignored."""

    name = "aesthetic"
    scale = "AVA 1-10 (SDXL ~ 6)"
    crop = "round"  # OpenAI clip.load preprocessing: torchvision Resize/CenterCrop on PIL, then RGB
    convert_first = False

    def __init__(self, model, mlp: AestheticMLP, tokenizer=None, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.mlp = mlp.to(self.device, torch.float32).eval().requires_grad_(False)

    def _score_batch(self, images, prompts):
        e = self.image_embeds(images)
        e = e / e.norm(dim=-1, keepdim=True)
        return self.mlp(e).reshape(-1)

    @classmethod
    def from_pretrained(cls, path_or_id=None, clip_id=None, device=None, dtype=torch.float32, **kwargs):
        hint = ("pass the MLP file with --scorer-path aesthetic=/path/sac+logos+ava1-l14-linearMSE.pth "
                "(from github.com/christophschuhmann/improved-aesthetic-predictor)")
        mlp_path = resolve_file(path_or_id or AESTHETIC_MLP_ID, "sac+logos+ava1-l14-linearMSE.pth", "aesthetic MLP", hint)
        mlp = AestheticMLP.from_file(mlp_path)
        clip_id = clip_id or AESTHETIC_CLIP_ID
        require_cached(clip_id, "aesthetic CLIP ViT-L/14", "pass clip_id=<local CLIPModel dir>")
        from transformers import CLIPModel

        model = load_hf(CLIPModel, clip_id, "aesthetic CLIP ViT-L/14", "pass clip_id=<local CLIPModel dir>")
        scorer = cls(model, mlp, device=device, dtype=dtype, **kwargs)
        scorer.info.update(weights=mlp_path, clip=clip_id)
        return scorer


def _load_tokenizer(cls, candidates, what, hint):
    last = None
    for c in candidates:
        try:
            return cls.from_pretrained(c, local_files_only=local_only())
        except (OSError, ValueError, TypeError) as exc:
            last = exc
    from t2ialign.errors import ModelNotFoundError

    raise ModelNotFoundError(f"{what}: none of {candidates} could be loaded ({type(last).__name__}); {hint}")


register_scorer("pickscore", PickScoreScorer.from_pretrained, "PickScore v1 (CLIP ViT-H/14), logit_scale*cos ~22")
register_scorer("clip", CLIPScoreScorer.from_pretrained, "CLIP score, 100*cos clamped at 0 (ViT-L/14)")
register_scorer("aesthetic", AestheticScorer.from_pretrained, "LAION aesthetic predictor v2 (MLP on CLIP ViT-L/14), 1-10")
