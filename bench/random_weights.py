"""mflux's real networks with random weights: no download, real architecture and real compute, only noise pixels.

`install(depth=…)` patches mflux's shared loaders (nothing in its models, nothing in this project):
- WeightLoader.load / load_single / load_single_local return no tensors (FLUX.1 is told its block counts);
- TokenizerLoader.load hands mflux's own _create_tokenizer a real transformers tokenizer built in memory
  (`tokenizer()` below), so mflux's templates, chat templates and padding run as they do with real files;
- WeightApplier.apply_and_quantize materialises every network it is handed with random parameters of DTYPE
  (first cutting each block list to `depth` blocks when depth is set), then runs mflux's own code, which
  quantizes as usual.

Cutting depth exists for MLX's CPU backend, which multiplies matrices at about 5 GFLOP/s (numpy: ~150-250 in
the same process): one block of each kind keeps every kind of layer and every shape between the networks, at a
compute cost CI can pay. With a GPU, run full depth (depth=None) for real timings and memory.
"""

from __future__ import annotations

import glob
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mflux_worker")

# The characters the in-memory tokenizer knows; any other is its unknown token.
CHARACTERS = tuple(chr(code) for code in range(33, 127))
# Special tokens mflux's families put in templates or look up by name (Qwen chat and vision markers, T5, CLIP).
SPECIAL = ("<pad>", "<unk>", "</s>", "<s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
           "<|vision_end|>", "<|image_pad|>", "<|startoftext|>", "<think>", "</think>")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# What the real tokenizers add around the text: T5 a closing </s>, CLIP its start and end markers.
AROUND = {"T5Tokenizer": "$A </s>", "CLIPTokenizer": "<|startoftext|> $A <|endoftext|>"}
BLOCK_LISTS = ("layers", "transformer_blocks", "single_transformer_blocks", "t5_blocks", "blocks", "noise_refiner",
               "context_refiner")
DTYPE = os.environ.get("MFLUX_RANDOM_DTYPE", "")  # default: bfloat16 on a GPU, float32 on the CPU backend


# Debian's OpenBLAS (apt-get install libopenblas0-pthread): MLX's Linux CPU wheel bundles the reference BLAS,
# whose sgemm ran at 5 GFLOP/s here; preloaded, this one answers the same cblas calls at ~260 GFLOP/s.
OPENBLAS = "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3"


def fast_blas_preload() -> dict[str, str]:
    """Environment that makes MLX's CPU backend multiply with OpenBLAS where Debian's is installed, else nothing."""
    found = sorted(glob.glob(OPENBLAS))
    return {"LD_PRELOAD": found[0]} if found else {}


def tokenizer(definition: Any) -> Any:
    """A real transformers tokenizer built in memory: one token per character, the families' special tokens."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate((*SPECIAL, *CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # One token per character: at least as many tokens as a real BPE tokenizer makes of the same text, so code
    # that drops a template's leading tokens (Qwen-Image drops 34) still finds the prompt after them.
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\S"), behavior="isolated")
    raw = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                                  bos_token="<s>", additional_special_tokens=list(SPECIAL[4:]))
    raw.chat_template = getattr(definition, "chat_template", None) or CHAT_TEMPLATE
    template = AROUND.get(getattr(definition, "tokenizer_class", ""))
    if template is not None:  # set after transformers put its own post-processor there
        raw.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(token, vocab[token]) for token in ("</s>", "<|startoftext|>",
                                                                                 "<|endoftext|>")])
    return raw


def block_counts(depth: int | None) -> type:
    """A LoadedWeights with no tensors that reports FLUX.1's block counts (19 + 38, or `depth` of each)."""
    from mflux.models.common.weights.loading.loaded_weights import LoadedWeights

    double, single = (depth, depth) if depth else (19, 38)

    class NoTensors(LoadedWeights):
        def num_transformer_blocks(self, component_name: str = "transformer") -> int:
            return double

        def num_single_transformer_blocks(self, component_name: str = "transformer") -> int:
            return single

    return NoTensors


def no_tensors(weights_class: type) -> Callable[..., Any]:
    """A stand-in for WeightLoader.load and load_single(_local): every component named, none holding a tensor."""
    from mflux.models.common.weights.loading.loaded_weights import MetaData

    def load(*args: Any, **kwargs: Any) -> Any:
        # load(weight_definition, …) names a whole definition; load_single(_local)(component, …) one component.
        given = kwargs.get("weight_definition") or kwargs.get("component") or (args[0] if args else None)
        definition = given if hasattr(given, "get_components") else None
        names = [c.name for c in given.get_components()] if definition is not None else \
            [given.name] if given is not None else []
        components: dict[str, dict[str, Any]] = {name: {} for name in names}
        if getattr(definition, "__name__", "") == "Flux3KleinWeightDefinition":
            # FLUX 3 klein tells its distilled checkpoint from Base by this module's presence.
            components["transformer"]["target_timestep_embedder"] = {}
        return weights_class(components=components, meta_data=MetaData())

    return load


def cut(model: Any, depth: int) -> None:
    """Keep the first `depth` blocks of every block list of a network (and of its encoder)."""
    for part in (model, getattr(model, "encoder", None), getattr(model, "text_model", None)):
        for attr in BLOCK_LISTS:
            blocks = getattr(part, attr, None)
            if isinstance(blocks, list) and len(blocks) > depth:
                setattr(part, attr, blocks[:depth])
    taps = getattr(model, "get_prompt_embeds", None)
    if taps is not None and "hidden_state_layers" in inspect.signature(taps).parameters:
        # FLUX.2's Qwen3 taps hidden states (9, 18, 27): read the last kept layer instead
        original = model.get_prompt_embeds

        def get_prompt_embeds(*args: Any, hidden_state_layers: Any = (9, 18, 27), **kwargs: Any) -> Any:
            return original(*args, hidden_state_layers=tuple(depth for _ in hidden_state_layers), **kwargs)

        model.get_prompt_embeds = get_prompt_embeds


def install(depth: int | None = None, text_tokens: int | None = None) -> None:
    """Patch mflux's loaders for random weights, cutting every network to `depth` blocks and every tokenizer's
    padded length to `text_tokens` when given (FLUX.1 pads T5 to 256 tokens, which dominates a CPU step)."""
    import mlx.core as mx
    from mflux.models.common.tokenizer.tokenizer_loader import TokenizerLoader
    from mflux.models.common.weights.loading.weight_applier import WeightApplier
    from mflux.models.common.weights.loading.weight_loader import WeightLoader

    dtype = getattr(mx, DTYPE or ("float32" if mx.default_device() == mx.cpu else "bfloat16"))
    load = no_tensors(block_counts(depth))
    original = WeightApplier.apply_and_quantize

    def apply_and_quantize(weights: Any, models: dict[str, Any], quantize_arg: Any, weight_definition: Any) -> Any:
        for model in models.values():
            if depth:
                cut(model, depth)
            model.set_dtype(dtype)
            mx.eval(model.parameters())
        log.info("random weights (%s%s) in %s", dtype, f", depth {depth}" if depth else "", ", ".join(models))
        return original(weights=weights, models=models, quantize_arg=quantize_arg, weight_definition=weight_definition)

    WeightLoader.load = staticmethod(load)
    WeightLoader.load_single = staticmethod(load)
    WeightLoader.load_single_local = staticmethod(load)
    TokenizerLoader.load = staticmethod(
        lambda definition, model_path: TokenizerLoader._create_tokenizer(raw_tokenizer=tokenizer(definition),
                                                                         definition=definition))
    WeightApplier.apply_and_quantize = staticmethod(apply_and_quantize)
    if text_tokens:
        load_all = TokenizerLoader.load_all

        def shorter(definitions: Any, model_path: str, max_length_overrides: Any = None) -> Any:
            loaded = load_all(definitions, model_path, max_length_overrides)
            for each in loaded.values():
                each.max_length = min(each.max_length, text_tokens)
            return loaded

        TokenizerLoader.load_all = staticmethod(shorter)
