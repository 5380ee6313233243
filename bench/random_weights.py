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
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
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
BLOCK_SUFFIXES = ("layers", "blocks", "refiner")  # transformer_blocks, single_stream_layers, noise_refiner, ...
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


def _shared(blocks: list[Any]) -> list[Any]:
    """Each position given the first block with its structure (the classes of all its modules, in order)."""
    first: dict[tuple[str, ...], Any] = {}
    kept = []
    for block in blocks:
        structure = tuple(type(module).__name__ for _, module in block.named_modules())
        kept.append(first.setdefault(structure, block))
    return kept


def cut(model: Any, depth: int, share: bool = False) -> None:
    """Keep the first `depth` blocks of every block list of a network (layers, blocks, refiners), at its top level
    and in its encoder or language model; never called on a VAE, whose lists are its resolution stages.

    share=True keeps every position, each one the first block of its structure (a dense layer stays dense, an
    MoE one MoE): the weights of one block per structure and the compute of all of them, for text encoders
    whose callers read particular layers."""
    import mlx.nn as nn

    for part in (model, *(getattr(model, name, None) for name in ("encoder", "text_model", "language_model", "model"))):
        if not isinstance(part, nn.Module):
            continue
        for attr, blocks in list(part.items()):
            if isinstance(blocks, list) and len(blocks) > depth and attr.endswith(BLOCK_SUFFIXES) and \
                    all(isinstance(block, nn.Module) for block in blocks):
                setattr(part, attr, _shared(blocks) if share else blocks[:depth])
    if share:
        return
    taps = getattr(model, "get_prompt_embeds", None)
    if taps is not None and "hidden_state_layers" in inspect.signature(taps).parameters:
        # FLUX.2's Qwen3 taps hidden states (9, 18, 27): read the last kept layer instead
        original = model.get_prompt_embeds

        def get_prompt_embeds(*args: Any, hidden_state_layers: Any = (9, 18, 27), **kwargs: Any) -> Any:
            return original(*args, hidden_state_layers=tuple(depth for _ in hidden_state_layers), **kwargs)

        model.get_prompt_embeds = get_prompt_embeds


# GPT-OSS 20B's published config.json, which Lens's text encoder reads from its checkpoint folder.
GPT_OSS_20B = {"num_hidden_layers": 24, "num_local_experts": 32, "num_experts_per_tok": 4, "vocab_size": 201088,
               "rms_norm_eps": 1e-05, "hidden_size": 2880, "intermediate_size": 2880, "head_dim": 64,
               "num_attention_heads": 64, "num_key_value_heads": 8, "sliding_window": 128, "rope_theta": 150000,
               "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                "truncate": False, "original_max_position_embeddings": 4096},
               "layer_types": ["sliding_attention", "full_attention"] * 12}


def lens_encoder_init(prepare: Callable[[Any], None]) -> Callable[[Any, str], None]:
    """An __init__ for Lens's text encoder, which reads its own files (not through WeightLoader): the model from
    GPT-OSS 20B's config, no weights, the in-memory tokenizer; `prepare(encoder)` then readies its network."""

    def init(self: Any, model_path: str) -> None:
        import mlx.nn as nn
        from mflux.models.common_models.gpt_oss.gpt_oss import Model, ModelArgs

        self.model = Model(ModelArgs.from_dict(GPT_OSS_20B))
        self.model.lm_head = nn.Identity()  # as the real loader does: features never reach the head
        self.tokenizer = tokenizer(None).backend_tokenizer
        prepare(self)

    return init


@contextmanager
def loaders_patched(apply_many: Callable[..., Any], apply_one: Callable[..., Any] | None,
                    lens_prepare: Callable[[Any], None], depth: int | None = None) -> Iterator[None]:
    """mflux's loaders patched for weights that are not there: no tensors, in-memory tokenizers, no folders to
    resolve (Qwen-Image 2.1, Lens), no loaded keys to validate; networks go through apply_many / apply_one."""
    from mflux.models.common.resolution.path_resolution import PathResolution
    from mflux.models.common.tokenizer.tokenizer_loader import TokenizerLoader
    from mflux.models.common.weights.loading.weight_applier import WeightApplier
    from mflux.models.common.weights.loading.weight_loader import WeightLoader
    from mflux.models.lens.model.text_encoder.lens_gpt_oss_encoder import LensGptOssEncoder
    from mflux.models.qwen21.qwen21_initializer import Qwen21Initializer

    load = no_tensors(block_counts(depth))
    replacements: dict[tuple[type, str], Any] = {
        (WeightLoader, "load"): staticmethod(load),
        (WeightLoader, "load_single"): staticmethod(load),
        (WeightLoader, "load_single_local"): staticmethod(load),
        (TokenizerLoader, "load"): staticmethod(
            lambda definition, model_path: TokenizerLoader._create_tokenizer(raw_tokenizer=tokenizer(definition),
                                                                             definition=definition)),
        (WeightApplier, "apply_and_quantize"): staticmethod(apply_many),
        (PathResolution, "resolve"): staticmethod(lambda *args, **kwargs: Path(tempfile.mkdtemp(prefix="mflux-"))),
        # Qwen-Image 2.1 checks each loaded component's keys against its module: there are none to check.
        (Qwen21Initializer, "_validate_weights"): staticmethod(lambda *args, **kwargs: None),
        (LensGptOssEncoder, "__init__"): lens_encoder_init(lens_prepare),
    }
    if apply_one is not None:
        replacements[(WeightApplier, "apply_and_quantize_single")] = staticmethod(apply_one)
    saved = {where: where[0].__dict__[where[1]] for where in replacements}
    for (cls, name), value in replacements.items():
        setattr(cls, name, value)
    try:
        yield
    finally:
        for (cls, name), value in saved.items():
            setattr(cls, name, value)


_installed: list[Any] = []


def install(depth: int | None = None, text_tokens: int | None = None, share_text_encoders: bool = False) -> None:
    """Patch mflux's loaders for random weights, cutting every network to `depth` blocks and every tokenizer's
    padded length to `text_tokens` when given (FLUX.1 pads T5 to 256 tokens, which dominates a CPU step).
    share_text_encoders keeps text encoders' depth on shared weights (see cut) for families that read a layer."""
    import mlx.core as mx
    from mflux.models.common.tokenizer.tokenizer_loader import TokenizerLoader
    from mflux.models.common.weights.loading.weight_applier import WeightApplier

    dtype = getattr(mx, DTYPE or ("float32" if mx.default_device() == mx.cpu else "bfloat16"))
    original = WeightApplier.apply_and_quantize

    def materialise(model: Any, name: str = "") -> None:
        if depth and name != "vae":
            # Denoisers lose their depth (they run every step); text encoders, whose callers read particular
            # layers, keep every position on shared weights (they run once per prompt).
            cut(model, depth, share=share_text_encoders and "transformer" not in name)
        model.set_dtype(dtype)
        mx.eval(model.parameters())

    def apply_and_quantize(weights: Any, models: dict[str, Any], quantize_arg: Any, weight_definition: Any) -> Any:
        for name, model in models.items():
            materialise(model, name)
        log.info("random weights (%s%s) in %s", dtype, f", depth {depth}" if depth else "", ", ".join(models))
        return original(weights=weights, models=models, quantize_arg=quantize_arg, weight_definition=weight_definition)

    original_one = WeightApplier.apply_and_quantize_single

    def apply_and_quantize_single(weights: Any, model: Any, component: Any, quantize_arg: Any,
                                  quantization_predicate: Any = None) -> Any:
        materialise(model, component.name)
        return original_one(weights=weights, model=model, component=component, quantize_arg=quantize_arg,
                            quantization_predicate=quantization_predicate)

    patched = loaders_patched(apply_and_quantize, apply_and_quantize_single,
                              lambda encoder: materialise(encoder.model, "text_encoder"), depth)
    patched.__enter__()
    _installed.append(patched)  # held for the life of the process: collecting it would run its restore
    if text_tokens:
        load_all = TokenizerLoader.load_all

        def shorter(definitions: Any, model_path: str, max_length_overrides: Any = None) -> Any:
            loaded = load_all(definitions, model_path, max_length_overrides)
            for each in loaded.values():
                each.max_length = min(each.max_length, text_tokens)
            return loaded

        TokenizerLoader.load_all = staticmethod(shorter)
