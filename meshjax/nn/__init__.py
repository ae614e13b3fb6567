"""Flax NNX layers on meshjax's named ops, and tracing NNX modules into meshjax graphs.

Params are ``nnx.Param`` with their LOGICAL dim names in the ``out_sharding`` metadata (the key
``nnx.get_partition_spec`` reads and maps through ``nnx.logical_axis_rules``), so a meshjax plan
that is uniform per dim name is also Flax's sharding: ``with nnx.logical_axis_rules(
plan.logical_axis_rules()): nnx.get_partition_spec(nnx.state(model))`` gives every param the
plan's spec. Traced tensor names are the NNX state paths (``blocks/0/attn/w_q``).

Example::

    >>> from flax import nnx
    >>> from meshjax.models import transformer as gpt
    >>> from meshjax.solve import solve
    >>> model = Transformer.gpt(vocab=64, seq=16, embed=32, heads=4, head_dim=8, mlp=64, layers=2,
    ...                         rngs=nnx.Rngs(0))
    >>> tokens, targets = gpt.example_batch(gpt.Config(vocab=64, seq=16, batch=8), 1)
    >>> traced = trace_module(model, tokens, targets, loss_fn=lm_loss)
    >>> plan = solve(traced.graph, {"data": 4, "model": 2}, train=True,
    ...              rules="batch:data;heads:model;mlp:model;vocab:model")
    >>> specs = partition_specs(model, plan)       # Flax's own nnx.get_partition_spec
    >>> all(normalize_spec(specs[name]) == spec for name, spec in plan.param_specs.items())
    True
"""

from meshjax.nn.functional import (
    Functional,
    TracedModule,
    functional,
    named_grads,
    named_params,
    normalize_spec,
    param_name,
    partition_specs,
    plan_rules,
    trace_module,
    update_module,
)
from meshjax.nn.layers import (
    SHARDING_KEY,
    MLP,
    Attention,
    Block,
    Dense,
    Einsum,
    Embed,
    LayerNorm,
    MoE,
    RMSNorm,
    Stack,
    attend,
    dims_of,
    init_param,
    param,
    value_of,
)
from meshjax.nn.transformer import Transformer, lm_loss

__all__ = [
    "SHARDING_KEY", "MLP", "Attention", "Block", "Dense", "Einsum", "Embed", "Functional", "LayerNorm", "MoE",
    "RMSNorm", "Stack", "TracedModule", "Transformer", "attend", "dims_of", "functional", "init_param", "lm_loss",
    "named_grads", "named_params", "normalize_spec", "param", "param_name", "partition_specs", "plan_rules",
    "trace_module", "update_module", "value_of",
]
