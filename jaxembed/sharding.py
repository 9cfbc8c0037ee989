"""Sharding as data: logical axis names on every param, one rules table onto mesh axes.

XLA's SPMD partitioner is the distributed runtime: we only say how params (and so the activations
computed from them) are laid out on a device mesh, and `jax.jit` inserts the collectives.
Attention shards by heads (the KV projections by kv heads), MLPs column- then row-parallel
(`mlp` on the tensor axis), Qwen3-MoE's experts across the tensor axis (expert parallel).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxembed.config import ModelConfig
from jaxembed.model import Params, param_axes, param_shapes

TENSOR = "tensor"

# Logical axis -> mesh axis (None: replicated).
RULES: dict[str, str | None] = {
    "layers": None,
    "vocab": None,
    "embed": None,
    "head_dim": None,
    "heads": TENSOR,
    "kv_heads": TENSOR,
    "mlp": TENSOR,
    "experts": TENSOR,
    "slots": None,  # KV cache sequence slots
    "cache_len": None,  # KV cache positions
}

# The KV cache's axes (see `kv_cache.KVCache`): stacked [L, S + 1, ...], or one buffer per layer
# [S + 1, ...]. It shards by kv heads, as the projections that fill it do.
CACHE_AXES = {n: ("layers", "slots", "kv_heads", "cache_len", "head_dim") for n in ("k", "v")}


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """Which logical axes go on the tensor axis for one model on one mesh."""

    mesh: Mesh
    rules: dict[str, str | None]
    replicated: tuple[str, ...]  # logical axes replicated because their size does not divide

    def spec(self, axes: Sequence[str]) -> PartitionSpec:
        return PartitionSpec(*(self.rules.get(a) for a in axes))

    def sharding(self, axes: Sequence[str]) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes))


def make_mesh(tensor_parallel: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if tensor_parallel > len(devices):
        raise ValueError(f"tensor parallel {tensor_parallel} needs that many devices; "
                         f"{len(devices)} are visible")
    return Mesh(np.array(devices[:tensor_parallel]), (TENSOR,))


def plan(cfg: ModelConfig, mesh: Mesh) -> ShardingPlan:
    """The rules for this model on this mesh.

    Query heads must divide evenly over the tensor axis, else the error lists the sizes that
    work. KV heads fewer than (or not dividing) the tensor size are replicated, as is usual for
    grouped-query attention; so are experts that do not divide. The choice is in `replicated`.
    """
    tp = mesh.shape[TENSOR]
    rules = dict(RULES)
    replicated = []
    if cfg.num_heads % tp:
        ok = [n for n in range(1, cfg.num_heads + 1) if cfg.num_heads % n == 0]
        raise ValueError(f"{cfg.num_heads} attention heads do not divide over tensor parallel "
                         f"{tp}; use one of {ok}")
    for axis, size in (("kv_heads", cfg.num_kv_heads), ("experts", cfg.num_experts),
                       ("mlp", cfg.intermediate_size or cfg.moe_intermediate_size)):
        if size and size % tp:
            rules[axis] = None
            replicated.append(axis)
    if cfg.num_experts and rules["experts"] == TENSOR:
        # Expert parallel: each device holds whole experts, so their width stays unsharded.
        rules["mlp_in_experts"] = None
    return ShardingPlan(mesh, rules, tuple(replicated))


def _leaf_spec(p: ShardingPlan, axes: tuple[str, ...]) -> PartitionSpec:
    if "experts" in axes and p.rules.get("experts") == TENSOR:
        axes = tuple("mlp_in_experts" if a == "mlp" else a for a in axes)
    return p.spec(axes)


def param_shardings(cfg: ModelConfig, p: ShardingPlan) -> Any:
    """A NamedSharding for every param leaf, in the params tree structure."""
    return jax.tree.map(lambda axes: NamedSharding(p.mesh, _leaf_spec(p, axes)), param_axes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


def shard_params(params: Params, cfg: ModelConfig, p: ShardingPlan) -> Params:
    """Place params on the mesh by the plan (leaves absent from the params are skipped)."""
    shardings = param_shardings(cfg, p)

    def place(path: tuple, leaf: Any) -> Any:
        node = shardings
        for k in path:
            node = node[k.key]
        return jax.device_put(leaf, node)

    expected = param_shapes(cfg)
    assert set(params) <= set(expected), set(params) - set(expected)
    return jax.tree_util.tree_map_with_path(place, params)


def replicated(p: ShardingPlan) -> NamedSharding:
    """Every device holds the whole array: step inputs, pooled vectors, sampled tokens."""
    return NamedSharding(p.mesh, PartitionSpec())


def cache_sharding(p: ShardingPlan, name: str, per_layer: bool = False) -> NamedSharding:
    """The sharding of the cache's keys (name "k") or values ("v")."""
    axes = CACHE_AXES[name]
    return p.sharding(axes[1:] if per_layer else axes)


def placement(mesh: Mesh) -> Callable[[ModelConfig], Callable[[tuple[str, ...], Any], jax.Array]]:
    """For the loader: put each param leaf from host memory straight onto its devices by the
    plan, so the whole model is never on one device (where a large one would not fit).

    `jax.device_put` of a host array to a global sharding works across processes too: each
    process places its own shards of the array it loaded."""

    def for_config(cfg: ModelConfig) -> Callable[[tuple[str, ...], Any], jax.Array]:
        shardings = param_shardings(cfg, plan(cfg, mesh))

        def place(key: tuple[str, ...], array: Any) -> jax.Array:
            node = shardings
            for k in key:
                node = node[k]
            return jax.device_put(array, node)

        return place

    return for_config
