"""MPS (Multi-dimensional Preference Score, Kwai-Kolors/MPS, CVPR 2024) on transformers' ``CLIPModel``.

Re-implemented from the authors' code (github.com/Kwai-Kolors/MPS, commit be9027f; file:line sources in
docs/SCORERS.md, section "MPS"). The model is CLIP ViT-H/14 (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)
plus a 4-layer condition-aware cross-attention stack (``MPSCrossModel``). For prompt ``p``, condition
``c`` (default ``OVERALL_CONDITION``) and image ``x``:

1. ``T = text_projection(text_model(p).last_hidden_state)`` (77 token features), ``t = text_projection
   (pooled EOS)``, ``C`` likewise for ``c``; both padded to 77 and run WITHOUT an attention mask.
2. ``rel_i = max_j <T_i, C_j> / max_i' max_j <T_i', C_j>``; text token ``i`` is kept if ``rel_i > 0.3``.
3. ``I = visual_projection(vision_model(x).last_hidden_state)`` (all 257 tokens, before post_layernorm).
4. ``h = MPSCrossModel(I, T, mask)[:, 0]`` (image tokens attend to the kept text tokens).
5. ``score = logit_scale.exp() * cos(h, t)`` (about 100 * cos, like PickScore).

The max in step 2 is taken per sample here; the official code takes it over the whole batch tensor,
which equals per-sample in its evaluation scripts (one image per call) but makes a batched score depend
on the other images. Preprocessing: the PickScore/CLIPProcessor recipe (RGB first, PIL bicubic, floor crop).

Weights: ``MPS_overall_checkpoint.pth`` (Google Drive link in the authors' README) is a pickled full
model (``trainer.models.clip_model.CLIPModel``). ``load_mps_state_dict`` reads only its tensors with
``torch.load(weights_only=True)``: every class the pickle names is mapped to an inert placeholder, so
none of the checkpoint's code runs. State dicts (``.pt``/``.pth``) and safetensors files with the same
keys (optionally under ``mps.`` as in imscore's ``RE-N-Y/mpsv1``) load too.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from t2ialign.errors import ModelNotFoundError

from .base import load_hf, register_scorer, resolve_file
from .clip_based import _CLIPModelScorer, _load_tokenizer

MPS_CLIP_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MPS_FILE = "MPS_overall_checkpoint.pth"
# imscore's re-packaging of the official weights (PyTorchModelHubMixin: model.safetensors, keys mps.*)
MPS_HUB_ID = "RE-N-Y/mpsv1"
MPS_HUB_FILE = "model.safetensors"
OVERALL_CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
                     "instance, texture, quantity, attributes, position, number, location, word, things.")
# the threshold of the authors' evaluation scripts (the published accuracies); their training forward
# (and the README example that calls it) uses 0.01
MASK_THRESHOLD = 0.3
_HINT = (f"download {MPS_FILE} (Google Drive link in github.com/Kwai-Kolors/MPS README) and pass "
         f"--scorer-path mps=/path/{MPS_FILE}; the CLIP config/tokenizer come from clip_id (default {MPS_CLIP_ID})")


# -- the condition-aware cross-attention (trainer/models/cross_modeling.py), same parameter names --
class _LayerNorm(nn.Module):
    """LayerNorm whose bias is a zero buffer (saved in the state dict, never trained)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class _Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args):
        return self.fn(x, *args) + x


class _SwiGLU(nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class _RotaryEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, n, device):
        # positions in the buffer's dtype, as the official code computes them (fp16 in its checkpoint)
        seq = torch.arange(n, device=device, dtype=self.inv_freq.dtype)
        freqs = seq[:, None] * self.inv_freq[None, :]
        return torch.cat((freqs, freqs), dim=-1)


def _rotate(pos, t):
    t1, t2 = t.chunk(2, dim=-1)
    return t * pos.cos() + torch.cat((-t2, t1), dim=-1) * pos.sin()


def _split_heads(x, heads):
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def _merge_heads(x):
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class _CrossAttention(nn.Module):
    """Multi-query cross-attention (one shared key/value head) with a parallel SwiGLU feed-forward."""

    def __init__(self, dim, dim_head, heads, ff_mult):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = _LayerNorm(dim)
        self.context_norm = nn.Identity()  # norm_context=False in the official construction
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim * 2, bias=False), _SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, x, context, mask):
        x = self.norm(x)
        q = _split_heads(self.to_q(x), self.heads) * self.scale
        k, v = self.to_kv(self.context_norm(context)).chunk(2, dim=-1)
        attn = (torch.einsum("bhid,bjd->bhij", q, k) + mask[:, None]).softmax(dim=-1)
        out = _merge_heads(torch.einsum("bhij,bjd->bhid", attn, v))
        return self.to_out(out) + self.ff(x)


class _ParallelBlock(nn.Module):
    """Self-attention (multi-query, rotary on q and k, no mask) in parallel with a SwiGLU feed-forward."""

    def __init__(self, dim, dim_head, heads, ff_mult):
        super().__init__()
        self.norm = _LayerNorm(dim)
        self.fused_dims = (dim_head * heads, dim_head, dim_head, dim * ff_mult * 2)
        self.heads, self.scale = heads, dim_head ** -0.5
        self.rotary_emb = _RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(dim_head * heads, dim, bias=False)
        self.ff_out = nn.Sequential(_SwiGLU(), nn.Linear(dim * ff_mult, dim, bias=False))

    def forward(self, x):
        x = self.norm(x)
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.fused_dims, dim=-1)
        pos = self.rotary_emb(x.shape[1], x.device)
        q = _rotate(pos, _split_heads(q, self.heads)) * self.scale
        attn = torch.einsum("bhid,bjd->bhij", q, _rotate(pos, k)).softmax(dim=-1)
        return self.attn_out(_merge_heads(torch.einsum("bhij,bjd->bhid", attn, v))) + self.ff_out(ff)


class MPSCrossModel(nn.Module):
    """``Cross_model(dim=1024, layer_num=4, heads=16)`` of the official code; keys ``layers.{i}.{0,1}.fn.*``."""

    def __init__(self, dim=1024, layer_num=4, dim_head=64, heads=16, ff_mult=4):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([_Residual(_CrossAttention(dim, dim_head, heads, ff_mult)),
                           _Residual(_ParallelBlock(dim, dim_head, heads, ff_mult))])
            for _ in range(layer_num)
        ])

    def forward(self, query_tokens, context_tokens, mask):
        """``mask``: additive (B, 1 or N_query, N_context), 0 = attend, -inf = masked."""
        for cross_attn, self_attn_ff in self.layers:
            query_tokens = self_attn_ff(cross_attn(query_tokens, context_tokens, mask))
        return query_tokens


# -- the scorer ------------------------------------------------------------------------------------
def condition_mask(text_tokens, condition_tokens, threshold=MASK_THRESHOLD):
    """(B, 1, 77) additive mask over the prompt's tokens: 0 where the token's best similarity to a
    condition token, divided by the sample's largest such similarity, exceeds ``threshold``."""
    sim = torch.einsum("bid,bjd->bij", text_tokens, condition_tokens).amax(dim=-1)  # best condition token per text token
    rel = sim / sim.amax(dim=-1, keepdim=True)
    zero = torch.zeros((), dtype=text_tokens.dtype, device=text_tokens.device)
    return torch.where(rel > threshold, zero, torch.full_like(zero, float("-inf")))[:, None, :]


class MPSScorer(_CLIPModelScorer):
    name = "mps"
    scale = "logit_scale.exp() * cos (~100*cos), condition-aware image feature"

    def __init__(self, model, cross_model: MPSCrossModel, tokenizer, condition: str = OVERALL_CONDITION,
                 mask_threshold: float = MASK_THRESHOLD, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.cross_model = self._prepare(cross_model)
        self.condition = condition
        self.mask_threshold = float(mask_threshold)
        self.info.update(condition=condition, mask_threshold=self.mask_threshold,
                         text="padding='max_length' (77), truncation, no attention mask")

    def token_features(self, prompts):
        """(all-token features (B, 77, D), pooled EOS feature (B, D)), both through text_projection."""
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")["input_ids"].to(self.device)
        # no attention mask, as the official code: padding tokens attend causally and can be kept by the mask
        out = self.model.text_model(input_ids=ids)
        proj = self.model.text_projection
        return proj(out.last_hidden_state), proj(out.pooler_output)

    def image_tokens(self, images):
        """All projected image tokens; the vision tower's last_hidden_state has no post_layernorm."""
        return self.model.visual_projection(self.model.vision_model(pixel_values=self.pixel_values(images)).last_hidden_state)

    def _score_batch(self, images, prompts):
        text_tokens, text_eos = self.token_features(prompts)
        cond_tokens, _ = self.token_features([self.condition])
        mask = condition_mask(text_tokens.float(), cond_tokens.float().expand(len(prompts), -1, -1), self.mask_threshold)
        img = self.cross_model(self.image_tokens(images), text_tokens, mask.to(text_tokens.dtype))[:, 0].float()
        img = img / img.norm(dim=-1, keepdim=True)
        txt = text_eos.float() / text_eos.float().norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1)

    @classmethod
    def from_state_dict(cls, state: dict, config, tokenizer, **kwargs) -> "MPSScorer":
        """Build from an MPS state dict (keys ``model.*`` = CLIPModel, ``cross_model.*``) and a CLIPConfig."""
        from transformers import CLIPModel

        parts = split_mps_state_dict(state)
        with _no_init():
            model = CLIPModel(config)
            cross = MPSCrossModel(dim=config.projection_dim, **_cross_shape(parts["cross_model"]))
        model.load_state_dict(parts["model"], strict=True)
        cross.load_state_dict(parts["cross_model"], strict=True)
        return cls(model, cross, tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, path_or_id=None, clip_id=None, tokenizer=None, device=None, dtype=torch.float32, **kwargs):
        from transformers import AutoTokenizer, CLIPConfig

        path = resolve_mps_checkpoint(path_or_id or MPS_HUB_ID)
        state = load_mps_state_dict(path)  # first: the file the user named is checked before any hub lookup
        clip_id = clip_id or MPS_CLIP_ID
        config = load_hf(CLIPConfig, clip_id, "MPS backbone config", f"pass clip_id=<local copy of {MPS_CLIP_ID}>")
        if tokenizer is None:
            tokenizer = _load_tokenizer(AutoTokenizer, [clip_id], "MPS tokenizer", f"pass clip_id=<local copy of {MPS_CLIP_ID}>")
        scorer = cls.from_state_dict(state, config, tokenizer, device=device, dtype=dtype, **kwargs)
        scorer.info.update(weights=path, clip=clip_id)
        return scorer


@contextlib.contextmanager
def _no_init():
    """Skip random initialisation (about 1B parameters) that the checkpoint overwrites anyway."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        yield


def _cross_shape(cross_state: dict) -> dict:
    """layer_num, heads, dim_head, ff_mult of a cross-model state dict (the official: 4, 16, 64, 4)."""
    layer_num = 1 + max(int(k.split(".")[1]) for k in cross_state)
    dim_head = cross_state["layers.0.1.fn.rotary_emb.inv_freq"].numel() * 2
    inner, dim = cross_state["layers.0.0.fn.to_q.weight"].shape
    ff_mult = cross_state["layers.0.0.fn.ff.2.weight"].shape[1] // dim
    return dict(layer_num=layer_num, heads=inner // dim_head, dim_head=dim_head, ff_mult=ff_mult)


# -- checkpoint files -----------------------------------------------------------------------------
def resolve_mps_checkpoint(path_or_id: str) -> str:
    """A file, a directory holding MPS_overall_checkpoint.pth or model.safetensors, or a hub id."""
    if os.path.isdir(path_or_id):
        for name in (MPS_FILE, MPS_HUB_FILE):
            if os.path.isfile(os.path.join(path_or_id, name)):
                return os.path.join(path_or_id, name)
        raise ModelNotFoundError(f"MPS checkpoint: no {MPS_FILE} or {MPS_HUB_FILE} in directory {path_or_id}; {_HINT}")
    return resolve_file(path_or_id, MPS_HUB_FILE, "MPS checkpoint", _HINT)


class _Placeholder:
    """Stands in for every class a pickled checkpoint names: takes any arguments and state, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots) form
        if isinstance(state, dict):
            self.__dict__.update(state)


def _module_tensors(obj, prefix=""):
    """What ``nn.Module.state_dict()`` would hold, read from a placeholder's pickled ``__dict__``."""
    d = getattr(obj, "__dict__", {})
    skip = d.get("_non_persistent_buffers_set") or set()
    for name, t in (d.get("_parameters") or {}).items():
        if t is not None:
            yield prefix + name, t.detach()
    for name, t in (d.get("_buffers") or {}).items():
        if t is not None and name not in skip:
            yield prefix + name, t
    for name, sub in (d.get("_modules") or {}).items():
        if sub is not None:
            yield from _module_tensors(sub, prefix + name + ".")


# Globals a pickled model never names but code-running pickles do: refused outright, not given a placeholder
# (a placeholder would run nothing, but such a file is not the checkpoint it claims to be)
CODE_MODULES = ("os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pickle", "marshal",
                "ctypes", "code", "pty", "webbrowser", "multiprocessing")
CODE_BUILTINS = ("eval", "exec", "compile", "getattr", "setattr", "delattr", "__import__", "open", "globals", "vars",
                 "breakpoint", "input")


def refuse_code_globals(path: str, names: list) -> None:
    from .weights import WeightsFileError, names_object

    for name in names:
        module, _, attr = name.rpartition(".")
        if module.split(".")[0] in CODE_MODULES or (module == "builtins" and attr in CODE_BUILTINS):
            raise WeightsFileError(f"MPS checkpoint: {path} is not a valid, safe weights file ({names_object(name)}). "
                                   f"Nothing in it was run. Fix: download {MPS_FILE} again (link in "
                                   "github.com/Kwai-Kolors/MPS), or convert a copy you trust to .safetensors")


def load_pickled_module_tensors(path: str) -> dict:
    """The state dict of a pickled whole-module file without importing or running its classes:
    ``torch.load(weights_only=True)`` with each non-allowlisted global mapped to a ``_Placeholder``."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    refuse_code_globals(path, names)
    stand_ins = [(type(n.rsplit(".", 1)[-1], (_Placeholder,), {"qualified_name": n}), n) for n in names]
    with torch.serialization.safe_globals(stand_ins):
        root = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(root, dict):
        return root.get("state_dict", root)
    return dict(_module_tensors(root))


def load_mps_state_dict(path: str) -> dict:
    """Tensors of an MPS checkpoint: the official pickled model, a state dict, or safetensors;
    WeightsFileError (one line, never suggesting an unsafe load) for anything else."""
    from .weights import WeightsFileError, invalid_weights, load_weights_file

    if path.endswith(".safetensors"):
        return load_weights_file(path, "MPS checkpoint")
    try:
        state = load_pickled_module_tensors(path)
    except WeightsFileError:
        raise
    except Exception as exc:  # only the read is inside: every failure here is the file's
        raise invalid_weights(path, "MPS checkpoint", exc) from None
    if not state:
        raise WeightsFileError(f"MPS checkpoint: {path} holds no tensors, so it is not an MPS checkpoint. "
                               f"Fix: download {MPS_FILE} again")
    return state


def split_mps_state_dict(state: dict) -> dict[str, dict]:
    """``{"model": CLIPModel keys, "cross_model": MPSCrossModel keys}``; strips ``module.``/``mps.``
    prefixes and drops ``position_ids`` (persistent buffers in the transformers 4.27 the authors used)."""
    parts = {"model": {}, "cross_model": {}}
    for key, value in state.items():
        for prefix in ("module.", "mps."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        head, _, rest = key.partition(".")
        if head not in parts:
            raise KeyError(f"unexpected MPS checkpoint key {key!r} (expected model.* or cross_model.*)")
        if not rest.endswith("position_ids"):
            parts[head][rest] = value
    if not parts["model"] or not parts["cross_model"]:
        raise KeyError("MPS checkpoint lacks model.* or cross_model.* tensors")
    return parts


def convert_mps_checkpoint(src: str, dst: str) -> None:
    """One-time conversion of the pickled ``.pth`` to safetensors (keys ``model.*``, ``cross_model.*``)."""
    from safetensors.torch import save_file

    parts = split_mps_state_dict(load_mps_state_dict(src))
    flat = {f"{head}.{k}": v.contiguous() for head, sub in parts.items() for k, v in sub.items()}
    save_file(flat, dst)


register_scorer("mps", MPSScorer.from_pretrained, "MPS overall (CLIP ViT-H/14 + condition cross-attention), logit_scale*cos")

if __name__ == "__main__":  # python -m t2ialign.scoring.mps MPS_overall_checkpoint.pth MPS_overall.safetensors
    import sys

    convert_mps_checkpoint(sys.argv[1], sys.argv[2])
