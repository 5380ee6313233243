"""Stand-ins for mflux's neural networks, installed at its weight-loading level, so mflux's own code runs in tests.

mflux builds every family through its initializer: WeightLoader reads safetensors, TokenizerLoader reads
tokenizer files, WeightApplier puts the weights into the modules it built from ModelConfig. No weights can be
downloaded here, and the full networks are far too large for a test on a CPU. `installed()` patches only the
loading (bench/random_weights.loaders_patched; nothing in mflux's models or in this project):

- WeightLoader.load / load_single / load_single_local return no weights (the modules keep their lazy initial
  parameters, which are never evaluated);
- TokenizerLoader.load builds a real transformers tokenizer in memory (bench/random_weights.py: one token per
  character, the special tokens the families use) and hands it to mflux's own _create_tokenizer, so mflux's
  LanguageTokenizer, templates, chat templates and padding run for real;
- WeightApplier.apply_and_quantize(_single) turns each network it is handed (text encoders, transformer, VAE)
  into a stand-in: the module keeps its class, attributes and methods, but each public method traces the real
  network lazily (MLX builds the graph and knows every output shape without computing anything), throws that
  graph away and answers a cheap array of the same shape and dtype, derived from the inputs. Then mflux's own
  apply_and_quantize runs (quantization included);
- the few loaders outside those three: PathResolution (Qwen-Image 2.1 and Lens resolve folders themselves),
  Qwen-Image 2.1's check of loaded keys, and Lens's text encoder, which reads its own files.

Everything mflux does around the networks therefore runs for real in generate_image: prompt handling, tokenizer
shapes, latent creation, schedulers, callbacks, image pre- and post-processing, and the shapes each network
would return are the real networks' own.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

from bench import random_weights

_tracing = threading.local()
CALLS: list[str] = []  # "Class.method" of each network call stood in for, in order, so a test can see what ran


def _cheap(value: Any, inputs: list[mx.array]) -> Any:
    """An array shaped like `value` (the real network's lazy output) that depends on the inputs, not the network."""
    if not isinstance(value, mx.array):
        return value
    if not mx.issubdtype(value.dtype, mx.floating):  # masks and ids: pass a like input through, else all ones
        like = next((x for x in inputs if x.shape == value.shape and x.dtype == value.dtype), None)
        return like if like is not None else mx.ones(value.shape, value.dtype)
    out = 0.25 * mx.random.normal(value.shape, key=mx.random.key(sum(value.shape))).astype(value.dtype)
    same = next((x for x in inputs if x.shape == value.shape and mx.issubdtype(x.dtype, mx.floating)), None)
    if same is not None:  # a denoiser or an autoencoder answers close to its input, as the real ones do
        out = out + 0.75 * same.astype(value.dtype)
    return out


def _no_evaluation(*arrays: Any) -> None:
    """mx.eval inside a traced network: the graph is only for its shapes, so nothing is computed."""


def _stand_in(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_tracing, "depth", 0):  # a call inside the real network: trace it as part of the outer call
            return method(self, *args, **kwargs)
        _tracing.depth = 1
        evaluate, evaluate_async = mx.eval, mx.async_eval
        # Some networks evaluate inside their forward (Qwen-Image 2.1 caches its text stream): not here.
        mx.eval = mx.async_eval = _no_evaluation
        try:
            real = method(self, *args, **kwargs)  # lazy: nothing is computed, only shapes are known
        finally:
            _tracing.depth = 0
            mx.eval, mx.async_eval = evaluate, evaluate_async
        CALLS.append(f"{type(self).__mro__[1].__name__}.{method.__name__}")
        inputs = [x for x in (*args, *kwargs.values()) if isinstance(x, mx.array)]
        if isinstance(real, (list, tuple, dict)):
            return tree_map(lambda leaf: _cheap(leaf, inputs), real)
        if isinstance(real, mx.array):
            return _cheap(real, inputs)
        if hasattr(real, "__dict__") and not isinstance(real, nn.Module):  # output dataclasses (embeddings, ...)
            for name, field in vars(real).items():
                if isinstance(field, mx.array):
                    setattr(real, name, _cheap(field, inputs))
        return real

    return traced


_classes: dict[type, type] = {}


def stand_in_class(cls: type) -> type:
    """A subclass of a network class whose public methods and __call__ answer cheap arrays of the real shapes."""
    if cls in _classes or cls in _classes.values():
        return _classes.get(cls, cls)
    methods: dict[str, Any] = {}
    for klass in cls.__mro__:
        if klass in (nn.Module, dict, object):
            break
        for name, value in vars(klass).items():
            if name in methods or not callable(value) or isinstance(value, (staticmethod, classmethod, type)):
                continue
            if name == "__call__" or not name.startswith("_"):
                methods[name] = _stand_in(value)
    _classes[cls] = type(f"StandIn{cls.__name__}", (cls,), methods)
    return _classes[cls]


def _checkpoint_shapes(model: nn.Module) -> None:
    """Give attention projections the shapes their checkpoint has where mflux declares others and relies on the
    loaded weights to replace them (SigLIP in FLUX.1 Redux: 768 declared, 16 heads × 72 = 1152 loaded)."""
    for _, module in model.named_modules():
        dims = getattr(module, "head_dimension", 0) * getattr(module, "num_heads", 0)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear = getattr(module, name, None)
            if dims and isinstance(linear, nn.Linear) and linear.weight.shape != (dims, dims):
                setattr(module, name, nn.Linear(dims, dims))


def _stand_in_all(model: nn.Module) -> None:
    """Make a network a stand-in whose parameters keep their shapes and dtypes but occupy no memory."""
    _checkpoint_shapes(model)
    model.__class__ = stand_in_class(type(model))
    # A broadcast scalar is a view with zero strides: families that mx.eval(model) after loading (Krea 2,
    # ERNIE-Image) then materialise a few bytes per parameter instead of gigabytes of random weights.
    model.update(tree_map(lambda p: mx.broadcast_to(mx.zeros((), p.dtype), p.shape), model.parameters()))
    if getattr(model, "use_packed_projections", False):
        model.use_packed_projections = False  # Qwen-Image 2.1 would concatenate (materialise) the weights to pack them


def _lens_encoder_stood_in(encoder: Any) -> None:
    """Lens's text encoder: its GPT-OSS network a stand-in, and encode() (the call mflux makes) traced."""
    _stand_in_all(encoder.model)
    encoder.__class__ = stand_in_class(type(encoder))


@contextmanager
def installed() -> Iterator[None]:
    """Patch mflux's loaders for the duration (see the module docstring); restores them after."""
    from mflux.models.common.weights.loading.weight_applier import WeightApplier

    apply_many, apply_one = WeightApplier.apply_and_quantize, WeightApplier.apply_and_quantize_single

    def apply_and_quantize(weights: Any, models: dict[str, nn.Module], quantize_arg: Any, weight_definition: Any) -> Any:
        for model in models.values():
            _stand_in_all(model)
        return apply_many(weights=weights, models=models, quantize_arg=quantize_arg, weight_definition=weight_definition)

    def apply_and_quantize_single(weights: Any, model: nn.Module, component: Any, quantize_arg: Any,
                                  quantization_predicate: Any = None) -> Any:
        _stand_in_all(model)
        weights.components.setdefault(component.name, {})
        return apply_one(weights=weights, model=model, component=component, quantize_arg=quantize_arg,
                         quantization_predicate=quantization_predicate)

    with random_weights.loaders_patched(apply_and_quantize, apply_and_quantize_single, _lens_encoder_stood_in), \
            _control_checkpoints_stood_in():
        yield


@contextmanager
def _control_checkpoints_stood_in() -> Iterator[None]:
    """The ControlNet files Krea 2 and Qwen-Image 2.1 read themselves (mx.load, not WeightLoader): none here;
    nor the Z-Image ControlNet's config.json, which mflux fetches from the hub: its documented defaults.

    Qwen-Image 2.1's control branch becomes a stand-in like every network; Krea 2's depth ControlNet is a first
    projection of twice the image channels (what mflux splits into first and control_first) and no low-rank
    pairs, so mflux's own code builds the controlled transformer from it."""
    from mflux.models.krea2.krea2_initializer import Krea2Initializer
    from mflux.models.qwen21.qwen_image21_initializer import QwenImage21Initializer
    from mflux.models.z_image.variants.controlnet.transformer_controlnet import ZImageControlNetConfig

    def krea_checkpoint(transformer: Any, source: str) -> Any:
        out_features = transformer.first.weight.shape[0]
        in_features = 2 * transformer.channels * transformer.patch**2
        return mx.zeros((out_features, in_features)), mx.zeros((out_features,)), {}

    saved = (Krea2Initializer.__dict__["_load_control_checkpoint"],
             QwenImage21Initializer.__dict__["_load_original_controlnet"],
             ZImageControlNetConfig.__dict__["from_pretrained"])
    ZImageControlNetConfig.from_pretrained = staticmethod(  # type: ignore[method-assign]
        lambda repo_id: ZImageControlNetConfig.defaults_union_2_1())
    Krea2Initializer._load_control_checkpoint = staticmethod(krea_checkpoint)  # type: ignore[method-assign]
    QwenImage21Initializer._load_original_controlnet = staticmethod(  # type: ignore[method-assign]
        lambda model, source: _stand_in_all(model.controlnet))
    try:
        yield
    finally:
        (Krea2Initializer._load_control_checkpoint, QwenImage21Initializer._load_original_controlnet,
         ZImageControlNetConfig.from_pretrained) = saved
