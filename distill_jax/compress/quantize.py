"""int8 students with qwix: post-training quantization and quantization-aware fine-tuning.

Weights of every matrix product are stored as int8 with one float32 scale per
output channel (absmax calibration): the attention and MLP kernels, and the
tied item table, whose scale is per item row, so that the embedding lookup
and the catalogue scores read the same int8 rows (``models.layers.embedding_lookup``
gathers rows and their scales). Activations stay float32 unless
the ``int8_act`` variant, which also quantizes the inputs of those products
with dynamic scales. Those scales span more than one row in some of the
products, so a user's scores under ``int8_act`` move slightly with the other
rows of the batch (and with the window's padding): the variant is measured
(on full windows, as served), but it is not one to serve.

The per-channel scales and the output bias are rounded to bfloat16 numbers
(held as float32): a relative change below 2^-8 of each, and the artefact
stores them in half the bytes.

Quantization-aware fine-tuning trains the float weights through qwix's
quantized-training provider: the forward pass sees the int8-rounded weights,
the gradient passes straight through, and the result is then quantized with
the same post-training step.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix

from distill_jax.models.base import SequenceRecommender

# The model methods whose matrix products are quantized: the encoder and the
# catalogue scores.
METHODS = ("__call__", "logits")


def rules(activations: bool, training: bool = False) -> list[qwix.QuantizationRule]:
    """One rule for every module: int8 weights (and int8 activations if asked)."""
    act = jnp.int8 if activations else None
    if training:
        return [qwix.QtRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=act)]
    return [qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=act)]


def _encode_and_score(module: SequenceRecommender, items: jax.Array) -> jax.Array:
    # Runs both quantized methods, so that init creates every quantized weight.
    return module.logits(module(items, train=False)[:, -1])


def ptq(model: SequenceRecommender, params: Any, activations: bool = False) -> tuple[Any, Any]:
    """Post-training int8 quantization of a trained model.

    Args:
      model: the float model.
      params: its unboxed float parameters (from a trained stage, or after
        quantization-aware fine-tuning).
      activations: also quantize the inputs of every matrix product.

    Returns:
      (the quantized module, its parameters: int8 values and float32 scales
      for the quantized weights, the rest unchanged). Use it like the float
      model: ``qmodel.apply({'params': qparams}, items, train=False)``.
    """
    qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules(activations)), methods=METHODS)
    dummy = jnp.ones((1, model.max_len), jnp.int32)
    abstract = jax.eval_shape(
        lambda: qmodel.init({"params": jax.random.key(0)}, dummy, method=_encode_and_score)
    )["params"]
    qparams = qwix.quantize_params(jax.tree.map(jnp.asarray, jax.device_get(params)), abstract)
    return qmodel, jax.tree_util.tree_map_with_path(_compact, nn.unbox(qparams))


def _compact(path, leaf):
    # The per-channel scales and the output bias are the int8 student's
    # largest float arrays (one number per item each): rounded to bfloat16
    # numbers (8 significant bits), the artefact stores them in 2 bytes
    # (export.py) and serves exactly what is evaluated here.
    last = path[-1]
    is_scale = isinstance(last, jax.tree_util.GetAttrKey) and last.name == "scale"
    is_bias = len(path) == 1 and getattr(last, "key", None) == "output_bias"
    if is_scale or is_bias:
        return leaf.astype(jnp.bfloat16).astype(jnp.float32)
    return leaf


def qat_model(model: SequenceRecommender, activations: bool = False) -> SequenceRecommender:
    """The model whose forward pass sees int8-rounded weights; float params, same tree."""
    qat = qwix.quantize_model(model, qwix.QtProvider(rules(activations, True)), methods=METHODS)
    # Its catalogue scores are quantized too: a loss must call its `logits`
    # (config.loss.form='auto' keeps to the forms that do). The class is
    # qwix's copy, made for this model alone.
    type(qat).plain_logits = False
    return qat


def param_bytes(params: Any) -> int:
    """Bytes of a (possibly quantized) parameter tree: int8 values, scales and the rest."""
    return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params)))
