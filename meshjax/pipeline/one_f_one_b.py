"""The 1F1B training step of a pipelined plan: every micro-batch's backward pass starts as soon
as its forward has left the last stage, so a stage keeps a bounded number of micro-batches'
inputs instead of GPipe's ``m + p - 1``.

The function is split at its pipelined scan into what runs before it (a decoder's embedding),
the scan, and what runs after it (the head and the loss):

- **before**, once on the whole batch, in its planned layout over the whole mesh: the function runs with
  its scan recording the carry and stacked params it was given (``capture`` mode); ``jax.vjp``
  of that keeps the embedding's residuals for the end of the step;
- **the scan**: one loop of time slots in which every stage (vmapped over the stage dim, as in
  :mod:`.lower`) runs at most one forward and one backward. Stage ``s`` runs the forward of
  micro-batch ``t - s`` and the backward of micro-batch ``t - (2p - 2 - s)`` in slot ``t``;
  the slots are ``p - 1`` warm-up slots (forwards only), ``m`` steady slots (one forward and
  one backward) and ``p - 1`` cool-down slots (backwards only), so every stage computes
  ``m + p - 1`` forwards and backwards, as GPipe does. A stage keeps only its input per
  micro-batch, in a ring of ``min(m, 2p - 1)`` slots, and its backward recomputes the forward
  from that input (``jax.vjp`` of the stage): per-stage recompute. Activations move one stage on
  and cotangents one stage back by one collective-permute each per slot;
- **after**, per micro-batch inside the steady slots, in its planned layout: the last
  stage's output leaves it by an all-reduce over the stage axis (the other stages add zeros),
  the function runs on that micro-batch's rows with its scan handing the output back
  (``replay`` mode), and ``jax.vjp`` of it gives the micro-batch's loss, the head's gradients
  and the cotangent that enters the last stage's backward in the same slot.

With data-parallel replicas (:func:`meshjax.cost.pipeline.replica_axes`) the stages, and the
head unless one of its params is split over a replica axis, are vmapped over the replicas as
well, each replica with its own copy of the weights (as :func:`.lower.replicated_stages` does
for GPipe): every replica accumulates its weight gradients over the slots and they are summed
over the data axes once, after the loop, instead of in every slot.

The step's loss is the mean of the micro-batches' losses, which is the whole batch's loss for a
loss that is a mean over the batch (gradient accumulation makes the same assumption). At the end
the first stage's input cotangents leave it by one all-reduce over the stage axis and run back
through the embedding's ``vjp``.

Why ``2p - 1`` and not ``p``: in one SPMD program every stage computes in every slot, so a
forward hop costs a whole slot (forward and backward) where an asynchronous 1F1B spends one
forward on it; the first stage's input is therefore kept for the ``2p - 2`` slots the
micro-batch takes to reach the last stage and come back. It is bounded by the stage count,
not the micro-batch count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from meshjax import context
from meshjax.cost.pipeline import runs_head_per_replica
from meshjax.errors import ShapeError
from meshjax.graph import LINEAR, IndexForm
from meshjax.named import NamedArray, is_named


def capture_or_replay(ctx, body, carry_leaves, carry_def, x_leaves, x_def, length, *, dim: str, name: str):
    """The pipelined scan of a pinner in ``capture`` or ``replay`` mode (see the module doc)."""
    from meshjax.pipeline.lower import check_carries  # lower imports this module when it runs

    pipe = ctx.pipeline
    c_dims = [(pipe.batch_dim, *(d for d in leaf.dims if d != pipe.batch_dim)) for leaf in carry_leaves]
    if ctx.mode == "capture":
        if ctx.captured is not None:
            raise ShapeError(f"pipelined scan {name!r}: a 1F1B pipeline runs one scan over {dim!r}; the function has two")
        check_carries(pipe, carry_leaves, length, name)
        _no_stacked_values(ctx, body, carry_leaves, carry_def, x_leaves, x_def, dim=dim, name=name)
        ctx.captured = {
            "body": body, "name": name, "dim": dim, "length": length, "scopes": list(ctx.scopes),
            "carry_def": carry_def, "x_def": x_def, "c_dims": c_dims,
            "x_rest": [tuple(d for d in leaf.dims if d != dim) for leaf in x_leaves],
            "carry": [leaf.align_to(d) for leaf, d in zip(carry_leaves, c_dims)],
            "xs": [leaf.align_to((dim, *(d for d in leaf.dims if d != dim))) for leaf in x_leaves],
        }
        outputs = [leaf.align_to(d) for leaf, d in zip(carry_leaves, c_dims)]  # stand-ins
    else:
        outputs = ctx.replay
    final = []
    with context.scope(name):
        for leaf, d, v in zip(carry_leaves, c_dims, outputs):
            result = NamedArray(v, d)
            result = NamedArray(result.align_to(leaf.dims), leaf.dims)
            index = IndexForm(loop=tuple(leaf.sizes.items()), operands=(leaf.dims,), result=leaf.dims)
            final.append(context.emit("scan_carry", [leaf], result, index, name="final_carry", facts=LINEAR))
    return jax.tree_util.tree_unflatten(carry_def, final), None


def _no_stacked_values(ctx, body, carry_leaves, carry_def, x_leaves, x_def, *, dim: str, name: str) -> None:
    """The one-line error of a scan body that returns stacked values (``y``), which a pipeline
    cannot hand back, found by tracing the scan abstractly (nothing is computed)."""
    from meshjax.scan import scan_unpipelined

    carry = jax.tree_util.tree_unflatten(carry_def, carry_leaves)
    xs = jax.tree_util.tree_unflatten(x_def, x_leaves)
    ys = jax.eval_shape(lambda c, x: scan_unpipelined(body, c, x, dim=dim, name=name)[1], carry, xs)
    ctx.forget_names_under("/".join([*ctx.scopes, name]))
    if ys is not None and jax.tree_util.tree_leaves(ys):
        raise ShapeError(f"pipelined scan {name!r}: the body may not return stacked values (y)")


def _rotate_back(x: jax.Array) -> jax.Array:
    """``x[s]`` moves to ``s - 1`` along dim 0 (one collective-permute over a sharded dim)."""
    return jnp.concatenate([x[1:], x[:1]], axis=0)


def _expand(mask: jax.Array, ndim: int) -> jax.Array:
    return mask.reshape(*mask.shape, *([1] * (ndim - mask.ndim)))


def _read_by(fn: Callable, ids: list[int], params: list[Any], outputs: list[Any]) -> list[int]:
    """The ``ids`` whose param ``fn(params, outputs)`` reads. The part after the scan, run in
    replay mode, computes the embedding too, but nothing uses it, and it never reads the stacked
    layers; gradient accumulators for those would be dead weight (a vocabulary-sized one for a
    decoder's token embedding)."""
    from jax._src.interpreters.partial_eval import dce_jaxpr

    closed = jax.make_jaxpr(fn)(params, outputs)
    _, used = dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
    return [i for i, u in zip(ids, used[: len(ids)]) if u]


def one_f_one_b(program) -> Callable:
    """``value_and_grad(params, *args) -> (loss, grads)`` of ``program`` (a
    :class:`~meshjax.pipeline.lower.PipelinedProgram`) run as the 1F1B schedule."""
    from meshjax.pipeline.lower import _in_replica, _off_axes, _rotate, _stage_major, _stage_replica_major, split_microbatches
    from meshjax.scan import scan_unpipelined

    pipe = program.pipeline
    p, m = pipe.stages, pipe.microbatches
    ring = min(m, 2 * p - 1)

    def run(params: Any, *args: Any) -> tuple[jax.Array, Any]:
        param_leaves, param_def = jax.tree_util.tree_flatten(params, is_leaf=is_named)
        info: dict[str, Any] = {}

        def before(params):
            pinner = program.pinner("capture")
            with context.active(pinner):
                program.fn(params, *args)
            if pinner.captured is None:
                raise ShapeError(f"1F1B: the function runs no scan over {pipe.dim!r} to pipeline")
            cap = pinner.captured
            info.update({k: v for k, v in cap.items() if k not in ("carry", "xs")})
            return cap["carry"], cap["xs"]

        (carry, xs), before_vjp = jax.vjp(before, params)
        body, name, dim = info["body"], info["name"], info["dim"]
        c_dims, x_rest, x_def, carry_def = info["c_dims"], info["x_rest"], info["x_def"], info["carry_def"]
        length = info["length"]
        block_name = "/".join([*info["scopes"], name])
        after_ids = list(range(len(param_leaves)))  # narrowed below to the params it reads

        # Stage params (p, L/p, ...), and for every data-parallel replica of a stage its own copy
        # (p, r, L/p, ...) (lower.replicated_stages: its weight gradients accumulate locally and
        # are summed over the replicas once, after the loop). Micro-batches (r, B/(m r), m, ...):
        # micro-batch i = rows i, i+m, ..., split over the replicas.
        stage_pinner = program.pinner()
        stage_pinner.scopes = list(info["scopes"])
        c_micro, r = split_microbatches(stage_pinner, list(carry), name)
        stage_xs = [_stage_major(stage_pinner, v.reshape(p, length // p, *v.shape[1:])) for v in xs]
        stage_xs = [_stage_replica_major(stage_pinner, jnp.broadcast_to(v[:, None], (p, r, *v.shape[1:])))
                    for v in stage_xs]
        micro_shape = lambda v: (v.shape[0] * v.shape[1], *v.shape[3:])  # noqa: E731  one micro-batch's rows

        arg_leaves, arg_def = jax.tree_util.tree_flatten(args, is_leaf=is_named)
        sig = program.graph.signature
        input_names = [n for n, r in zip(sig.names, sig.roles) if r == "input"]
        split_args = []  # (value with its batch dim split as (B/m, m), dims, axis of m) or the leaf
        for leaf, input_name in zip(arg_leaves, input_names):
            if not is_named(leaf) or pipe.batch_dim not in leaf.dims:
                split_args.append(leaf)
                continue
            axis = leaf.dims.index(pipe.batch_dim)
            v = leaf.value
            v = v.reshape(*v.shape[:axis], v.shape[axis] // m, m, *v.shape[axis + 1:])
            spec = tuple(program.specs.get(input_name) or ())
            spec = (*spec, *([None] * (leaf.value.ndim - len(spec))))
            # The batch's own layout on the rows of a micro-batch; the micro-batch index whole.
            split = PartitionSpec(*spec[: axis + 1], None, *spec[axis + 1:])
            v = jax.lax.with_sharding_constraint(v, NamedSharding(program.mesh, split))
            split_args.append((v, leaf.dims, axis + 1))

        def micro_args(i):
            """The function's arguments cut to micro-batch ``i``'s rows."""
            leaves = [
                NamedArray(jax.lax.dynamic_index_in_dim(a[0], i, axis=a[2], keepdims=False), a[1]) if isinstance(a, tuple) else a
                for a in split_args
            ]
            return jax.tree_util.tree_unflatten(arg_def, leaves)

        def after(after_params, out_values, margs, replica: bool = False):
            leaves = list(param_leaves)
            for i, v in zip(after_ids, after_params):
                leaves[i] = NamedArray(v, param_leaves[i].dims)
            pinner = program.pinner("replay")
            pinner.replay = list(out_values)
            # One replica of the head: its layouts less the replica axes (not the stage axis,
            # which the head may use: it runs outside the stages' vmap).
            with context.active(pinner), (_off_axes(pinner, pinner.replicas) if replica else contextlib.nullcontext()):
                result = program.fn(jax.tree_util.tree_unflatten(param_def, leaves), *margs)
            return jax.tree_util.tree_leaves(result, is_leaf=is_named)[0].value

        def replica_args(i):
            """Micro-batch ``i``'s arguments with their rows split over the replicas (a leading
            dim of ``r``), and the vmap axes of their leaves."""
            leaves, axes = [], []
            for a in split_args:
                if not isinstance(a, tuple):
                    leaves.append(a)
                    axes.append(None)
                    continue
                v = jax.lax.dynamic_index_in_dim(a[0], i, axis=a[2], keepdims=False)
                at = a[2] - 1  # the batch dim
                v = v.reshape(*v.shape[:at], r, v.shape[at] // r, *v.shape[at + 1:])
                leaves.append(jnp.moveaxis(v, at, 0))
                axes.append(0)
            return leaves, axes

        def head_per_replica(after_params, out_values, i):
            """The head and loss of micro-batch ``i``, run by every data-parallel replica on its
            rows with its own copy of the head's params (as the stages are): ``(r,)`` losses."""
            leaves, axes = replica_args(i)

            def run_one(ap, ov, values):
                named = [NamedArray(v, a[1]) if isinstance(a, tuple) else v for v, a in zip(values, split_args)]
                return after(ap, ov, jax.tree_util.tree_unflatten(arg_def, named), replica=True)

            return jax.vmap(run_one, in_axes=(0, 0, axes), spmd_axis_name=stage_pinner.replicas)(
                after_params, out_values, leaves)

        after_ids = _read_by(
            lambda ap, ov: after(ap, ov, micro_args(0)), after_ids, [param_leaves[i].value for i in after_ids],
            [jax.ShapeDtypeStruct(micro_shape(v), v.dtype) for v in c_micro],
        )
        # With data-parallel replicas the head runs per replica too, so its weight gradients are
        # summed over them once per step, not once per micro-batch; unless a head param is split
        # over a replica axis (a replica cannot hold its own copy of it).
        param_names = program.graph.signature.names[: len(param_leaves)]
        per_replica = runs_head_per_replica(stage_pinner.replicas, [program.layouts[param_names[i]] for i in after_ids])
        replica_spec = lambda v: NamedSharding(  # noqa: E731
            program.mesh, PartitionSpec(stage_pinner.replicas, *([PartitionSpec.UNCONSTRAINED] * (v.ndim - 1))))
        head_params = [param_leaves[i].value for i in after_ids]
        if per_replica:
            head_params = [jax.lax.with_sharding_constraint(jnp.broadcast_to(v[None], (r, *v.shape)), replica_spec(v[None]))
                           for v in head_params]

        def stage(params_s, state):
            stage_pinner.forget_names_under(block_name)  # every trace names the stage's tensors afresh
            xs_stage = jax.tree_util.tree_unflatten(x_def, [NamedArray(v, (dim, *r)) for v, r in zip(params_s, x_rest)])
            c_in = jax.tree_util.tree_unflatten(carry_def, [NamedArray(v, d) for v, d in zip(state, c_dims)])
            out, ys = scan_unpipelined(body, c_in, xs_stage, dim=dim, name=name)
            if ys is not None and jax.tree_util.tree_leaves(ys):
                raise ShapeError(f"pipelined scan {name!r}: the body may not return stacked values (y)")
            return [leaf.align_to(d) for leaf, d in zip(jax.tree_util.tree_leaves(out, is_leaf=is_named), c_dims)]

        def forward_one(stage_id, params_s, received, fresh):
            with _in_replica(stage_pinner):
                state = [jnp.where(stage_id == 0, f, x) for f, x in zip(fresh, received)]
                return state, stage(params_s, state)

        def backward_one(params_s, state, cotangent):
            with _in_replica(stage_pinner):
                _, vjp = jax.vjp(stage, params_s, state)
                return vjp(cotangent)

        replicas = stage_pinner.replicas or None  # every stage vmapped over its replicas, then the stages
        forward_all = jax.vmap(jax.vmap(forward_one, in_axes=(None, 0, 0, 0), spmd_axis_name=replicas),
                               in_axes=(0, 0, 0, None), spmd_axis_name=pipe.axis)
        backward_all = jax.vmap(jax.vmap(backward_one, in_axes=(0, 0, 0), spmd_axis_name=replicas),
                                in_axes=(0, 0, 0), spmd_axis_name=pipe.axis)
        stage_ids = _stage_major(stage_pinner, jnp.arange(p))
        pin = lambda v: _stage_replica_major(stage_pinner, v)  # noqa: E731  (p, r, ...)

        def slot(loop, t, *, forward: bool, backward: bool, send_forward: bool = True, send_backward: bool = True):
            """Time slot ``t``; a result not sent stays put (the last slot that makes it: no
            later slot reads it)."""
            received, cotangents, kept, grads, d_inputs, after_grads, total = loop
            steady = forward and backward
            d_out = None
            if forward:
                fresh = [jax.lax.dynamic_index_in_dim(v, jnp.clip(t, 0, m - 1), axis=2, keepdims=False) for v in c_micro]
                state, out = forward_all(stage_ids, stage_xs, received, fresh)
                valid = (t - stage_ids >= 0) & (t - stage_ids < m)
                pos = t % ring
                kept = [
                    pin(jax.lax.dynamic_update_index_in_dim(
                        k, jnp.where(_expand(valid, s.ndim), s, jax.lax.dynamic_index_in_dim(k, pos, 2, False)), pos, axis=2))
                    for k, s in zip(kept, state)
                ]
                if steady:  # the last stage's output: the loss of micro-batch t - (p - 1)
                    last = _expand(stage_ids == p - 1, out[0].ndim)
                    leaving = [jnp.sum(jnp.where(last, o, jnp.zeros_like(o)), axis=0) for o in out]
                    if per_replica:  # (r, B/(m r), ...): each replica's rows
                        loss, after_vjp = jax.vjp(lambda ap, ov: head_per_replica(ap, ov, t - (p - 1)), head_params, leaving)
                        d_after, d_out = after_vjp(jnp.full_like(loss, 1.0 / (m * r)))
                    else:
                        leaving = [v.reshape(v.shape[0] * v.shape[1], *v.shape[2:]) for v in leaving]  # its B/m rows
                        loss, after_vjp = jax.vjp(
                            lambda ap, ov: after(ap, ov, micro_args(t - (p - 1))), head_params, leaving)
                        d_after, d_out = after_vjp(jnp.full_like(loss, 1.0 / m))
                    after_grads = [a + g.astype(jnp.float32) for a, g in zip(after_grads, d_after)]
                    total = total + loss.astype(jnp.float32)
                received = [pin(_rotate(pin(o))) if send_forward else pin(o) for o in out]  # stage s -> s + 1
            if backward:
                b = t - (2 * p - 2 - stage_ids)
                valid = (b >= 0) & (b < m)
                hit = jnp.arange(ring)[None, :] == ((b + stage_ids) % ring)[:, None]  # kept in slot b + s
                hit = hit[:, None, :]  # (p, 1, ring): the same slot for every replica
                inputs = [pin(jnp.sum(jnp.where(_expand(hit, k.ndim), k, jnp.zeros_like(k)), axis=2)) for k in kept]
                if d_out is not None:
                    last = stage_ids == p - 1
                    cotangents = [
                        jnp.where(_expand(last, c.ndim), jnp.broadcast_to(d.astype(c.dtype).reshape(c.shape[1:]), c.shape), c)
                        for c, d in zip(cotangents, d_out)
                    ]
                d_params, d_state = backward_all(stage_xs, inputs, [pin(c) for c in cotangents])
                grads = [
                    pin(g + jnp.where(_expand(valid, d.ndim), d, jnp.zeros_like(d)).astype(jnp.float32))
                    for g, d in zip(grads, d_params)
                ]
                d_state = [jnp.where(_expand(valid, d.ndim), d, jnp.zeros_like(d)) for d in d_state]
                first = t - (2 * p - 2)  # the micro-batch whose input cotangent stage 0 made
                at = jnp.clip(first, 0, m - 1)
                d_inputs = [
                    pin(jax.lax.dynamic_update_index_in_dim(
                        buf, jnp.where(first >= 0, d, jax.lax.dynamic_index_in_dim(buf, at, 3, False)), at, axis=3))
                    for buf, d in zip(d_inputs, d_state)
                ]
                cotangents = [pin(_rotate_back(pin(d))) if send_backward else pin(d) for d in d_state]  # stage s -> s - 1
            return (received, cotangents, kept, grads, d_inputs, after_grads, total), None

        def zeros(shape, dtype):
            return pin(jnp.zeros(shape, dtype))

        loop = (
            [zeros((p, *v.shape[:2], *v.shape[3:]), v.dtype) for v in c_micro],
            [zeros((p, *v.shape[:2], *v.shape[3:]), v.dtype) for v in c_micro],
            [zeros((p, v.shape[0], ring, *v.shape[1:2], *v.shape[3:]), v.dtype) for v in c_micro],
            [zeros(v.shape, jnp.float32) for v in stage_xs],
            [zeros((p, *v.shape), v.dtype) for v in c_micro],
            [jnp.zeros(v.shape, jnp.float32) for v in head_params],
            jnp.zeros((r,) if per_replica else (), jnp.float32),  # the loss, per replica
        )
        # Warm-up: forwards only; steady: one forward and one backward; cool-down: backwards
        # only. The last steady slot sends no activation (no forward follows) and the last
        # cool-down slot no cotangent: 2 (m + p - 2) sends in all.
        with context.active(stage_pinner):
            for start, stop, fwd, bwd in ((0, p - 1, True, False), (p - 1, m + p - 2, True, True)):
                if stop > start:
                    step = lambda c, t, f=fwd, b=bwd: slot(c, t, forward=f, backward=b)  # noqa: E731
                    loop, _ = jax.lax.scan(step, loop, jnp.arange(start, stop))
            loop, _ = slot(loop, jnp.asarray(m + p - 2), forward=True, backward=True, send_forward=False)
            if p > 1:
                if p > 2:
                    step = lambda c, t: slot(c, t, forward=False, backward=True)  # noqa: E731
                    loop, _ = jax.lax.scan(step, loop, jnp.arange(m + p - 1, m + 2 * p - 3))
                loop, _ = slot(loop, jnp.asarray(m + 2 * p - 3), forward=False, backward=True, send_backward=False)
        _, _, _, grads, d_inputs, after_grads, total = loop

        first_stage = _expand(stage_ids == 0, d_inputs[0].ndim) if d_inputs else None
        d_carry = [
            jnp.sum(jnp.where(first_stage, d, jnp.zeros_like(d)), axis=0) for d in d_inputs
        ]  # leaves the first stage
        d_carry = [d.reshape(d.shape[0] * d.shape[1] * m, *d.shape[3:]).astype(c.dtype) for d, c in zip(d_carry, carry)]
        # The replicas' weight gradients summed over the data axes: once per step, in the
        # params' dtype (as the plan prices it).
        d_xs = [_stage_major(stage_pinner, g.astype(x.dtype).sum(axis=1)) for g, x in zip(grads, xs)]
        d_xs = [g.reshape(length, *g.shape[2:]) for g in d_xs]
        (before_grads,) = before_vjp((d_carry, d_xs))
        before_leaves = jax.tree_util.tree_leaves(before_grads, is_leaf=is_named)
        out = [leaf.value for leaf in before_leaves]
        for i, g in zip(after_ids, after_grads):
            if per_replica:  # the replicas' head gradients summed over the data axes, once
                g = g.astype(out[i].dtype).sum(axis=0).astype(jnp.float32)
            out[i] = (out[i].astype(jnp.float32) + g).astype(out[i].dtype)
        grads_tree = jax.tree_util.tree_unflatten(
            param_def, [NamedArray(v, leaf.dims) for v, leaf in zip(out, param_leaves)]
        )
        loss_dtype = program.graph.tensors[program.graph.outputs[0]].dtype
        return (jnp.mean(total) / m).astype(loss_dtype), grads_tree

    return run


__all__ = ["capture_or_replay", "one_f_one_b"]
