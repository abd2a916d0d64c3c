"""Human Preference Score v2.0 / v2.1 on open_clip ViT-H/14.

Weights: ``xswu/HPSv2`` ``HPS_v2_compressed.pt`` (v2.0) / ``HPS_v2.1_compressed.pt`` (v2.1), each a
``{'state_dict': open_clip state dict}`` loaded with ``torch.load(weights_only=True)`` and a strict
``load_state_dict`` into ``open_clip.create_model('ViT-H-14', pretrained=None)``. Score = ``cos(img, txt)``
(benchmark tables print x100). v2.0 and v2.1 numbers are not comparable: the scorer name carries the
version (``hpsv2`` = v2.0, ``hpsv21`` = v2.1). Preprocessing: ``preprocess.hps_preprocess`` (tensor
resize of the longest side, pad with 0).
"""
from __future__ import annotations

import torch

from .base import Scorer, register_scorer, resolve_file
from .preprocess import hps_preprocess

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


class HPSScorer(Scorer):
    scale = "cos(img, txt) (tables print x100; SDXL ~ 0.27-0.31)"

    def __init__(self, model, tokenizer=None, version: str = "v2.1", device=None, dtype=torch.float32, batch_size=32,
                 tf32=False, antialias: bool = True, resize_on: str = "cpu"):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size, tf32=tf32)
        if version not in HPS_FILES:
            raise ValueError(f"HPS version must be one of {list(HPS_FILES)}")
        self.version = version
        self.name = "hpsv21" if version == "v2.1" else "hpsv2"
        self.model = self._prepare(model)
        if tokenizer is None:
            import open_clip

            tokenizer = open_clip.get_tokenizer("ViT-H-14")
        self.tokenizer = tokenizer
        self.antialias = antialias
        self.resize_on = resize_on
        size = getattr(model.visual, "image_size", 224)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.info = {"version": version,
                     "preprocessing": f"ToTensor, tensor bicubic resize longest side->{self.image_size} (antialias={antialias}), "
                                      "pad 0 to square, OpenAI mean/std"}

    def pixel_values(self, images) -> torch.Tensor:
        dev = self.device if self.resize_on == "device" else "cpu"
        return hps_preprocess(images, self.image_size, self.antialias, device=dev).to(self.device, self.dtype)

    def _score_batch(self, images, prompts):
        img = self.model.encode_image(self.pixel_values(images)).float()
        txt = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(-1)

    @staticmethod
    def read_checkpoint(path: str) -> dict:
        """The open_clip state dict of an official HPS file (``{'state_dict': ...}``, ``module.`` prefixes removed)."""
        from .weights import load_weights_file

        ckpt = load_weights_file(path, "HPS checkpoint")
        state = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
        if all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}
        return state

    @classmethod
    def load_checkpoint(cls, model: torch.nn.Module, path: str) -> torch.nn.Module:
        model.load_state_dict(cls.read_checkpoint(path), strict=True)
        return model

    @classmethod
    def from_checkpoint(cls, path: str, version: str = "v2.1", model_name: str = "ViT-H-14", model=None, tokenizer=None, **kwargs):
        """Build ``model_name`` with open_clip (or use ``model``) and load an official HPS ``.pt``."""
        state = cls.read_checkpoint(path)  # first: a bad file fails before a ViT-H (1B parameters) is built
        if model is None:
            import open_clip

            model = open_clip.create_model(model_name, pretrained=None)
        model.load_state_dict(state, strict=True)
        scorer = cls(model, tokenizer, version=version, **kwargs)
        scorer.info["weights"] = path
        return scorer

    @classmethod
    def from_pretrained(cls, path_or_id=None, version: str = "v2.1", device=None, dtype=torch.float32, **kwargs):
        filename = HPS_FILES[version]
        hint = f"download {filename} from hf.co/{HPS_REPO} and pass --scorer-path {'hpsv21' if version == 'v2.1' else 'hpsv2'}=/path/{filename}"
        path = resolve_file(path_or_id or HPS_REPO, filename, f"HPS {version} checkpoint", hint)
        return cls.from_checkpoint(path, version=version, device=device, dtype=dtype, **kwargs)


def _hps_loader(version):
    def load(path_or_id=None, device=None, dtype=torch.float32, **kwargs):
        return HPSScorer.from_pretrained(path_or_id, version=version, device=device, dtype=dtype, **kwargs)

    return load


register_scorer("hpsv2", _hps_loader("v2.0"), "HPS v2.0 (open_clip ViT-H/14), cos")
register_scorer("hpsv21", _hps_loader("v2.1"), "HPS v2.1 (open_clip ViT-H/14), cos")
