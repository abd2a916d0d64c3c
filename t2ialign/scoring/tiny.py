"""Random-weight scorers of the real architectures, offline (tests, toy world, benchmarks).

``tiny_scorer("pickscore")`` etc. build the same classes as the real scorers with small configs and
random weights; ``size="full"`` builds the real-size architecture (ViT-H/14 for PickScore/HPS, ViT-L/14
for CLIP/aesthetic, BLIP ViT-L for ImageReward) for speed benchmarks. Tokenizers are built from files
that ship inside open_clip (the CLIP BPE) or from a small word list (BERT), so nothing is downloaded.
"""
from __future__ import annotations

import gzip
import json
import os
import tempfile
from functools import lru_cache

import torch



def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@lru_cache(maxsize=1)
def clip_tokenizer_files() -> str:
    """A directory with vocab.json + merges.txt of the OpenAI CLIP BPE (49408 tokens), from open_clip's copy."""
    import open_clip

    bpe = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    d = tempfile.mkdtemp(prefix="t2ialign_clip_tok_")
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as fh:
        json.dump({t: i for i, t in enumerate(vocab)}, fh)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return d


def clip_tokenizer():
    """transformers ``CLIPTokenizer`` with the real CLIP vocabulary (offline)."""
    from transformers import CLIPTokenizer

    d = clip_tokenizer_files()
    return CLIPTokenizer(vocab=os.path.join(d, "vocab.json"), merges=os.path.join(d, "merges.txt"))


_BERT_WORDS = ("a an the of and in on with photo picture painting drawing image cat dog red blue green yellow "
               "big small tree house car person man woman astronaut horse riding street city night day sky "
               "water mountain flower bird apple banana table chair , . ! ? - ' \"").split()


def bert_tokenizer(words=_BERT_WORDS):
    """A small uncased ``BertTokenizer`` (real class and special tokens, tiny vocabulary) + BLIP tokens."""
    from transformers import BertTokenizer

    from .imagereward import blip_tokenizer

    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += list(dict.fromkeys(list("abcdefghijklmnopqrstuvwxyz0123456789") + list(words)))
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    d = tempfile.mkdtemp(prefix="t2ialign_bert_tok_")
    path = os.path.join(d, "vocab.txt")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(vocab) + "\n")
    return blip_tokenizer(BertTokenizer(vocab=path, do_lower_case=True))


def tiny_clip_model(size: str = "tiny", seed: int = 0, projection_dim: int | None = None, vit: str = "H"):
    """A transformers ``CLIPModel`` with random weights (``size="full"``: ViT-H/14 or ViT-L/14)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    if size == "full":
        if vit == "H":  # laion/CLIP-ViT-H-14 / PickScore_v1
            text = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu")
            vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
                          image_size=224, hidden_act="gelu")
            proj = 1024
        else:  # openai/clip-vit-large-patch14
            text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
            vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
                          image_size=224, hidden_act="quick_gelu")
            proj = 768
    else:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=32, image_size=224)
        proj = projection_dim or 16
    text.update(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)
    return CLIPModel(cfg).eval()


def tiny_open_clip_model(size: str = "tiny", seed: int = 0):
    """An open_clip ``CLIP`` with random weights (``size="full"``: ``ViT-H-14`` as used by HPS)."""
    import open_clip

    torch.manual_seed(seed)
    if size == "full":
        return open_clip.create_model("ViT-H-14", pretrained=None).eval()
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=32, image_size=224)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)
    return CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def tiny_imagereward_modules(size: str = "tiny", seed: int = 0):
    """(vision, text, mlp, med_config dict) with random weights."""
    from .clip_based import AestheticMLP
    from .imagereward import build_imagereward_modules

    torch.manual_seed(seed)
    if size == "full":
        med = {"vocab_size": 30524, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
        vision, text = build_imagereward_modules(med)
        mlp = AestheticMLP(768)
    else:
        tok = bert_tokenizer()
        med = {"vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
               "max_position_embeddings": 64}
        vision, text = build_imagereward_modules(med, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                           num_attention_heads=1, patch_size=32, image_size=224))
        mlp = AestheticMLP(32)
    return vision.eval(), text.eval(), mlp.eval(), med


def tiny_mps_modules(size: str = "tiny", seed: int = 0):
    """(CLIPModel, MPSCrossModel) with random weights; ``size="full"``: ViT-H/14 + the official 4-layer cross model."""
    from .mps import MPSCrossModel

    model = tiny_clip_model(size, seed, vit="H")
    torch.manual_seed(seed + 1)
    if size == "full":
        cross = MPSCrossModel(dim=1024, layer_num=4, dim_head=64, heads=16, ff_mult=4)
    else:
        cross = MPSCrossModel(dim=model.config.projection_dim, layer_num=2, dim_head=8, heads=2, ff_mult=4)
    return model, cross.eval()


def tiny_scorer(name: str, size: str = "tiny", device=None, dtype=torch.float32, seed: int = 0, **kwargs):
    """A random-weight scorer of the real class and architecture for ``name``."""
    from .clip_based import AestheticMLP, AestheticScorer, CLIPScoreScorer, PickScoreScorer
    from .hps import HPSScorer
    from .imagereward import ImageRewardScorer

    name = name.lower()
    if name in ("vqascore", "vqascorexl"):
        from .vqascore import VQAScoreScorer

        model = tiny_vqascore_model(size if size == "tiny" else name[len("vqascore"):] or "xxl", seed)
        return VQAScoreScorer(model, t5_tokenizer(), device=device, dtype=dtype, name=name, **kwargs)
    if name == "pickscore":
        return PickScoreScorer(tiny_clip_model(size, seed, vit="H"), clip_tokenizer(), device=device, dtype=dtype, **kwargs)
    if name == "clip":
        return CLIPScoreScorer(tiny_clip_model(size, seed, vit="L"), clip_tokenizer(), device=device, dtype=dtype, **kwargs)
    if name == "aesthetic":
        model = tiny_clip_model(size, seed, vit="L")
        return AestheticScorer(model, AestheticMLP(model.config.projection_dim), device=device, dtype=dtype, **kwargs)
    if name in ("hpsv2", "hpsv21"):
        import open_clip

        return HPSScorer(tiny_open_clip_model(size, seed), open_clip.get_tokenizer("ViT-H-14"),
                         version="v2.1" if name == "hpsv21" else "v2.0", device=device, dtype=dtype, **kwargs)
    if name == "imagereward":
        vision, text, mlp, _ = tiny_imagereward_modules(size, seed)
        return ImageRewardScorer(vision, text, mlp, bert_tokenizer(), device=device, dtype=dtype, **kwargs)
    if name == "mps":
        from .mps import MPSScorer

        model, cross = tiny_mps_modules(size, seed)
        return MPSScorer(model, cross, clip_tokenizer(), device=device, dtype=dtype, **kwargs)
    raise ValueError(f"no tiny builder for scorer {name!r}")


# -- VQAScore (CLIP-FlanT5) ----------------------------------------------------------------------------
_T5_WORDS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
             "detailed, and polite answers to the user's questions. USER: ASSISTANT: Does this figure show Please "
             "answer yes or no. Yes No " + " ".join(_BERT_WORDS)).split()


def t5_tokenizer(words=_T5_WORDS):
    """A transformers ``T5Tokenizer`` (unigram, metaspace, ``</s>`` appended) with a small vocabulary.

    Ids 0/1/2 are ``<pad>``/``</s>``/``<unk>`` as in T5; every word of the VQAScore prompt is one piece
    (``"Yes"`` -> ``[▁Yes, </s>]``, as the FlanT5 vocabulary tokenizes it) and single characters make any
    other text tokenizable without ``<unk>``.
    """
    import string

    from transformers import T5Tokenizer

    pieces = {"▁" + w: -5.0 for w in words}
    for c in string.ascii_letters + string.digits + string.punctuation:
        pieces.setdefault("▁" + c, -10.0)
        pieces.setdefault(c, -10.0)
    pieces.setdefault("▁", -12.0)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + list(pieces.items())
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=2048)


def _flan_t5_config(size: str, vocab_size: int):
    from transformers import T5Config

    dims = {"xxl": dict(d_model=4096, d_ff=10240, num_heads=64, num_layers=24),  # google/flan-t5-xxl
            "xl": dict(d_model=2048, d_ff=5120, num_heads=32, num_layers=24),  # google/flan-t5-xl
            "tiny": dict(d_model=32, d_ff=64, num_heads=4, num_layers=2)}[size]
    return T5Config(vocab_size=vocab_size, d_kv=64 if size != "tiny" else 8, num_decoder_layers=dims["num_layers"],
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                    pad_token_id=0, eos_token_id=1, **dims)


def tiny_vqascore_model(size: str = "tiny", seed: int = 0, vocab_size: int | None = None):
    """A random-weight ``CLIPFlanT5``. ``size="tiny"``: 3-layer CLIP vision at 336 px with 56-px patches (36
    image tokens) and a 2-layer T5 whose vocabulary is padded past the tokenizer's (like FlanT5's 32128 rows
    for 32100 tokens); ``"xxl"`` / ``"xl"``: the real architectures (ViT-L/14-336 + FlanT5)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, T5ForConditionalGeneration

    from .vqascore import _VIT_L_336, CLIPFlanT5, build_projector

    torch.manual_seed(seed)
    if size == "tiny":
        n = len(t5_tokenizer())
        vocab_size = vocab_size or (n // 64 + 1) * 64
        vision_cfg = dict(_VIT_L_336, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
                          patch_size=56)
    else:
        vocab_size = vocab_size or 32128
        vision_cfg = dict(_VIT_L_336)
    vision = CLIPVisionModel(CLIPVisionConfig(**vision_cfg))
    t5 = T5ForConditionalGeneration(_flan_t5_config(size, vocab_size))
    projector = build_projector("mlp2x_gelu", vision.config.hidden_size, t5.config.d_model)
    return CLIPFlanT5(vision, projector, t5).eval()
