"""A GPT whose FFN is a mixture of experts (GShard / Switch formulation), over named dims.

Dims: the GPT's (``batch``, ``seq``, ``key_seq``, ``embed``, ``heads``, ``head_dim``, ``mlp``,
``vocab``, ``layers``) plus ``experts`` and ``capacity`` (slots per expert per group).

Routing groups are the rows of the batch: each sequence routes its ``seq`` tokens on its own,
so ``capacity = ceil(top_k * capacity_factor * seq / experts)`` and ``batch`` stays a free,
splittable dim everywhere. Per MoE layer::

    router logits   einsum  batch seq embed, embed experts -> batch seq experts
    probs           softmax over experts
    combine         route(probs): "batch seq experts capacity", the gate of each token in the
                    slot it got (0 where it was not routed, or dropped for lack of capacity)
    dispatch        combine > 0
    expert_in       einsum  batch seq embed, batch seq experts capacity -> batch experts capacity embed
    hidden          einsum  batch experts capacity embed, experts embed mlp -> batch experts capacity mlp
    expert_out      einsum  batch experts capacity mlp, experts mlp embed -> batch experts capacity embed
    out             einsum  batch experts capacity embed, batch seq experts capacity -> batch seq embed

``route`` (top-k choice, then capacity positions by a cumulative sum over ``seq``, first
choices ahead of second choices as in GShard) is not an einsum: it is computed with
``jax.numpy`` and recorded as one op, ``moe_route``, whose :class:`~meshjax.graph.IndexForm`
keeps ``seq``, ``experts`` and ``capacity`` whole (only the group dims may be split). Top-k
gates are renormalised to sum to one when ``top_k > 1``.

The Switch load-balancing loss of each layer is ``experts * sum_e f_e * P_e`` (``f_e``: the
fraction of tokens whose top choice is ``e``; ``P_e``: the mean router probability of ``e``);
the model's loss is the mean cross-entropy plus ``aux_weight`` times the sum over layers.

Params (pytree path = tensor name)::

    token_embed, pos_embed, ln_f/{scale,bias}, unembed      as the GPT
    block_0/ln_1, block_0/attn/*, block_0/ln_2              as the GPT
    block_0/moe/router                                      embed experts
    block_0/moe/w_in                                        experts embed mlp
    block_0/moe/w_out                                       experts mlp embed

``loss`` and ``forward`` use the default routing settings (``top_k=2``, capacity factor 1.25,
aux weight 0.01; every preset uses them); :func:`make_loss` builds the loss of any config.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

import meshjax as mj
from meshjax.context import compute, emit
from meshjax.graph import LINEAR, OpFacts
from meshjax.graph import IndexForm
from meshjax.models import transformer
from meshjax.models.common import DecoderConfig, Normal, abstract_tokens, loss_with_form, param_functions
from meshjax.models.transformer import block_keys
from meshjax.named import NamedArray

TOP_K = 2
CAPACITY_FACTOR = 1.25
AUX_WEIGHT = 0.01


@dataclass(frozen=True)
class Config(DecoderConfig):
    """Sizes of the MoE GPT and its routing settings."""

    mlp: int = 64
    experts: int = 4
    top_k: int = TOP_K
    capacity_factor: float = CAPACITY_FACTOR
    aux_weight: float = AUX_WEIGHT


PRESETS: dict[str, Config] = {
    "moe-tiny": Config(),
    # GPT-3 1.3B-sized layers with a 64-expert FFN in every block (abstract use only).
    "moe-64e": Config(
        vocab=50304, seq=2048, embed=2048, heads=16, head_dim=128, mlp=8192, layers=24, batch=512, experts=64
    ),
}


def capacity(config: Config) -> int:
    """Slots per expert per routing group (one sequence)."""
    return expert_capacity(config.seq, config.experts, config.top_k, config.capacity_factor)


def expert_capacity(tokens: int, experts: int, top_k: int = TOP_K, capacity_factor: float = CAPACITY_FACTOR) -> int:
    """``ceil(top_k * capacity_factor * tokens / experts)``, at least 1."""
    return max(1, math.ceil(top_k * capacity_factor * tokens / experts))


def sizes(config: Config) -> dict[str, int]:
    """Dim name -> size."""
    s = transformer.sizes(config)
    s.update(experts=config.experts, capacity=capacity(config))
    return s


# --- declarations ----------------------------------------------------------------------------


def block_decls(config: Config, *, stacked: bool = False) -> dict[str, Any]:
    """One block's params: the GPT block's, its MLP replaced by the experts and a router."""
    lead = "layers " if stacked else ""
    dt = config.dtype
    tree = transformer.block_decls(config, stacked=stacked)
    del tree["mlp"]
    tree["moe"] = {
        "router": mj.param(lead + "embed experts", Normal(0.02), dt),
        "w_in": mj.param(lead + "experts embed mlp", Normal(0.02), dt),
        "w_out": mj.param(lead + "experts mlp embed", Normal(0.02 / math.sqrt(2 * config.layers)), dt),
    }
    return tree


def decls(config: Config) -> dict[str, Any]:
    """The GPT decoder's declarations with this module's blocks."""
    return transformer.decls(config, block_decls)


init, abstract_params, param_count = param_functions(decls, sizes)


def route_values(probs: jax.Array, top_k: int, capacity: int, *, normalize: bool = True) -> jax.Array:
    """The combine tensor ``[..., seq, experts, capacity]`` of router ``probs`` ``[..., seq, experts]``.

    Each token picks its ``top_k`` experts; within a group (the leading dims) the tokens that
    chose an expert take its slots in order, all first choices before any second choice; a
    choice finding the expert full is dropped. Entry ``[s, e, c]`` is the gate of token ``s``
    in slot ``c`` of expert ``e``, 0 elsewhere. Differentiable in the gates.
    """
    experts = probs.shape[-1]
    remaining = probs
    masks, gates = [], []
    for _ in range(top_k):
        choice = jax.nn.one_hot(jnp.argmax(remaining, axis=-1), experts, dtype=probs.dtype)
        masks.append(choice)
        gates.append(jnp.sum(probs * choice, axis=-1))
        remaining = jnp.where(choice > 0, -jnp.inf, remaining)
    if normalize and top_k > 1:
        total = functools.reduce(jnp.add, gates)
        gates = [g / jnp.maximum(total, jnp.finfo(probs.dtype).tiny) for g in gates]
    used = jnp.zeros((*probs.shape[:-2], experts), probs.dtype)  # slots taken per expert so far
    combine = jnp.zeros((*probs.shape, capacity), probs.dtype)
    for choice, gate in zip(masks, gates):
        position = jnp.cumsum(choice, axis=-2) - 1.0 + used[..., None, :]
        used = used + jnp.sum(choice, axis=-2)
        kept = choice * (position < capacity)
        slot = jnp.sum(position * kept, axis=-1).astype(jnp.int32)
        combine = combine + gate[..., None, None] * kept[..., None] * jax.nn.one_hot(slot, capacity, dtype=probs.dtype)[..., None, :]
    return combine


def route(
    probs: NamedArray,
    top_k: int,
    capacity: int,
    *,
    tokens: str = "seq",
    experts: str = "experts",
    slots: str = "capacity",
    normalize: bool = True,
    name: str | None = "combine",
) -> NamedArray:
    """:func:`route_values` as a recorded named op (kind ``moe_route``).

    ``probs`` has the ``tokens`` and ``experts`` dims and any group dims; the result adds
    ``slots``. Its IndexForm keeps ``tokens``, ``experts`` and ``slots`` whole: the cumulative
    slot count runs over every token of a group and the top-k over every expert.
    """
    group = tuple(d for d in probs.dims if d not in (tokens, experts))
    order = (*group, tokens, experts)
    (probs,), value = compute(
        "moe_route", name, [probs],
        lambda ops: route_values(ops[0].align_to(order), top_k, capacity, normalize=normalize),
    )
    out_dims = (*order, slots)
    loop = (*((d, probs.size(d)) for d in order), (slots, capacity))
    index = IndexForm(
        loop=loop,
        operands=(probs.dims,),
        result=out_dims,
        whole=(tokens, experts, slots),
        flops=float(4 * top_k * math.prod(s for _, s in loop)),
    )
    attrs = {"top_k": top_k, "capacity": capacity, "normalize": normalize}
    return emit("moe_route", [probs], NamedArray(value, out_dims), index, attrs, name, facts=OpFacts.reading(1))


def load_balancing_loss(probs: NamedArray, *, experts: str = "experts") -> NamedArray:
    """Switch Transformer's auxiliary loss ``E * sum_e f_e * P_e`` of router ``probs`` (a scalar)."""
    over = tuple(d for d in probs.dims if d != experts)
    mean_prob = mj.mean(probs, over, name="mean_prob")
    top = mj.greater_equal(probs, mj.max(probs, experts, name="top_prob"), name="is_top")
    fraction = mj.mean(mj.cast(top, probs.dtype, name="top_choice"), over, name="top_fraction")
    balance = mj.einsum(f"{experts}, {experts} -> ", fraction, mean_prob, name="balance")
    return mj.elementwise("multiply", balance, float(probs.size(experts)), name="aux_loss")


def moe_ffn(
    p: dict[str, NamedArray], x: NamedArray, *, top_k: int = TOP_K, capacity_factor: float = CAPACITY_FACTOR
) -> tuple[NamedArray, NamedArray]:
    """The mixture-of-experts FFN, "batch seq embed" -> ("batch seq embed", aux loss scalar)."""
    n_experts = p["router"].size("experts")
    cap = expert_capacity(x.size("seq"), n_experts, top_k, capacity_factor)
    logits = mj.einsum("batch seq embed, embed experts -> batch seq experts", x, p["router"], name="router_logits")
    probs = mj.softmax(logits, "experts", name="router_probs")
    combine = route(probs, top_k, cap, name="combine")
    # Through a bool, so the graph knows what JAX does: no gradient flows into the routing here.
    dispatch = mj.cast(mj.elementwise(jnp.greater, combine, 0.0, name="routed", facts=LINEAR), combine.dtype, name="dispatch")
    expert_in = mj.einsum(
        "batch seq embed, batch seq experts capacity -> batch experts capacity embed", x, dispatch, name="expert_in"
    )
    h = mj.einsum(
        "batch experts capacity embed, experts embed mlp -> batch experts capacity mlp", expert_in, p["w_in"], name="hidden"
    )
    h = mj.gelu(h, name="act")
    expert_out = mj.einsum(
        "batch experts capacity mlp, experts mlp embed -> batch experts capacity embed", h, p["w_out"], name="expert_out"
    )
    out = mj.einsum(
        "batch experts capacity embed, batch seq experts capacity -> batch seq embed", expert_out, combine, name="out"
    )
    return out, load_balancing_loss(probs)


# --- the model -------------------------------------------------------------------------------


def block(
    p: dict[str, Any], x: NamedArray, *, top_k: int = TOP_K, capacity_factor: float = CAPACITY_FACTOR, eps: float = 1e-5,
    form: str = "flash",
):
    """One pre-norm block: ``x + attn(ln(x))``, then ``x + moe(ln(x))``; returns ``(x, aux)``."""
    with mj.scope("attn"):
        h = mj.layer_norm(x, "embed", p["ln_1"]["scale"], p["ln_1"]["bias"], eps=eps, name="ln")
        x = mj.elementwise("add", x, transformer.attention(p["attn"], h, form=form), name="residual")
    with mj.scope("moe"):
        h = mj.layer_norm(x, "embed", p["ln_2"]["scale"], p["ln_2"]["bias"], eps=eps, name="ln")
        h, aux = moe_ffn(p["moe"], h, top_k=top_k, capacity_factor=capacity_factor)
        x = mj.elementwise("add", x, h, name="residual")
    return x, aux


def forward(
    params: dict[str, Any], tokens: NamedArray, *, top_k: int = TOP_K, capacity_factor: float = CAPACITY_FACTOR,
    form: str = "flash",
) -> tuple[NamedArray, NamedArray]:
    """``(logits "batch seq vocab", aux)``: aux is the load-balancing loss summed over layers."""
    with mj.scope("embed"):
        x = mj.embed(tokens, params["token_embed"], name="tokens")
        x = mj.elementwise("add", x, params["pos_embed"], name="out")
    kw = dict(top_k=top_k, capacity_factor=capacity_factor, form=form)
    if "blocks" in params:

        def body(h, p):
            return block(p, h, **kw)

        x, auxes = mj.scan(body, x, params["blocks"], dim="layers", name="blocks")
        aux = mj.sum(auxes, "layers", name="aux_total")
    else:
        aux = None
        for key in block_keys(params):
            x, layer_aux = mj.repeated(key, lambda p, h: block(p, h, **kw), params[key], x)
            aux = layer_aux if aux is None else mj.elementwise("add", aux, layer_aux, name="aux_total")
    with mj.scope("head"):
        x = mj.layer_norm(x, "embed", params["ln_f"]["scale"], params["ln_f"]["bias"], name="ln")
        logits = mj.einsum("batch seq embed, embed vocab -> batch seq vocab", x, params["unembed"], name="logits")
    return logits, aux


def loss(
    params: dict[str, Any],
    tokens: NamedArray,
    targets: NamedArray,
    *,
    top_k: int = TOP_K,
    capacity_factor: float = CAPACITY_FACTOR,
    aux_weight: float = AUX_WEIGHT,
    form: str = "flash",
) -> NamedArray:
    """Mean next-token cross-entropy plus ``aux_weight`` times the load-balancing loss."""
    logits, aux = forward(params, tokens, top_k=top_k, capacity_factor=capacity_factor, form=form)
    with mj.scope("head"):
        xent = mj.cross_entropy(logits, targets, name="xent")
        lm = mj.mean(xent, "batch seq", name="lm_loss")
        weighted = mj.elementwise("multiply", aux, aux_weight, name="aux_weighted")
    return mj.elementwise("add", lm, weighted, name="loss")


def make_loss(config: Config):
    """``loss(params, tokens, targets)`` with ``config``'s routing settings and attention form."""
    return loss_with_form(
        loss, transformer.check_form(config.attention),
        top_k=config.top_k, capacity_factor=config.capacity_factor, aux_weight=config.aux_weight,
    )


def example_batch(config: Config, key: jax.Array | int) -> tuple[NamedArray, NamedArray]:
    """``(tokens, targets)``, int32 "batch seq"."""
    return transformer.example_batch(config, key)


abstract_batch = abstract_tokens  # example_batch as jax.ShapeDtypeStruct values


__all__ = [
    "Config", "PRESETS", "TOP_K", "CAPACITY_FACTOR", "AUX_WEIGHT", "capacity", "expert_capacity", "sizes",
    "decls", "block_decls", "init", "abstract_params", "param_count", "route_values", "route",
    "load_balancing_loss", "moe_ffn", "block", "forward", "loss", "make_loss", "example_batch", "abstract_batch",
]
