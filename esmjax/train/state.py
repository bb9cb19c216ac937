"""The sharded train state, created inside one jitted init so no host ever holds the full
parameters.

``TrainState`` holds the step, the model's variables as a nested dict (the same pure dict
``esmjax.io.checkpoint`` saves as ``params``, rotary buffers included) and the optax state.
Shardings come from the parameters' logical axes and the mesh rules; each optimizer-state leaf takes
the sharding of the parameter whose path it ends with (Adam's ``mu``/``nu``), scalars are
replicated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from esmjax.config import ESM2Config
from esmjax.models.esm2 import ESM2, abstract_model
from esmjax.parallel import sharding as shd


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    variables: dict[str, Any]  # the model's pure dict
    opt_state: Any


def _path_keys(path: tuple) -> tuple[str, ...]:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def state_shardings(
    cfg: ESM2Config,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: shd.Rules,
    *,
    allow_replicated: bool = False,
) -> TrainState:
    """Shardings of every leaf of the train state (a ``TrainState`` of NamedShardings).

    Raises ``ShardingError`` when the rules leave too much replicated on ``mesh`` (see
    ``sharding.check_replication``) unless ``allow_replicated``.
    """
    _, abstract = abstract_model(cfg)
    var_shardings = nnx.State(
        shd.tree_shardings(abstract, mesh, rules, allow_replicated=allow_replicated)
    ).to_pure_dict()
    return shardings_for(var_shardings, abstract.to_pure_dict(), tx, mesh)


def shardings_for(
    var_shardings: dict[str, Any],
    abstract_vars: dict[str, Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> TrainState:
    """The ``TrainState`` shardings of any variables pure dict (ESM-2 or a fine-tuning model's
    trainable part): optimizer-state leaves follow the parameter whose path they end with."""
    by_path = {
        _path_keys(p): s
        for p, s in jax.tree_util.tree_leaves_with_path(
            var_shardings, is_leaf=lambda x: isinstance(x, NamedSharding)
        )
    }
    abstract_opt = jax.eval_shape(tx.init, abstract_vars)
    replicated = NamedSharding(mesh, P())
    abstract_by_path = {
        _path_keys(p): v for p, v in jax.tree_util.tree_leaves_with_path(abstract_vars)
    }

    def for_opt_leaf(path: tuple, leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        keys = _path_keys(path)
        for start in range(len(keys)):
            suffix = keys[start:]
            if suffix in by_path and abstract_by_path[suffix].shape == leaf.shape:
                return by_path[suffix]
        return replicated

    opt_shardings = jax.tree_util.tree_map_with_path(for_opt_leaf, abstract_opt)
    return TrainState(step=replicated, variables=var_shardings, opt_state=opt_shardings)


def create_state(
    cfg: ESM2Config,
    tx: optax.GradientTransformation,
    shardings: TrainState,
    seed: int,
    variables: dict[str, Any] | None = None,
) -> TrainState:
    """Initialises the model and optimizer directly into their shardings (one compiled init).

    ``variables``: start from these weights instead (continued pretraining); the optimizer state
    and the step start fresh either way."""

    def fresh(variables: dict[str, Any]) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32), variables=variables, opt_state=tx.init(variables)
        )

    if variables is not None:
        return jax.jit(fresh, out_shardings=shardings)(variables)
    return jax.jit(
        lambda: fresh(nnx.state(ESM2(cfg, rngs=nnx.Rngs(seed))).to_pure_dict()),
        out_shardings=shardings,
    )()


def abstract_state(
    cfg: ESM2Config, tx: optax.GradientTransformation, shardings: TrainState
) -> TrainState:
    """ShapeDtypeStructs with shardings: the Orbax restore target."""
    return abstract_state_of(abstract_model(cfg)[1].to_pure_dict(), tx, shardings)


def abstract_state_of(
    variables: Any, tx: optax.GradientTransformation, shardings: TrainState
) -> TrainState:
    """The train state of abstract ``variables`` (what ``tx`` updates), with ``shardings``."""
    shapes = TrainState(
        step=jax.ShapeDtypeStruct((), jnp.int32),
        variables=variables,
        opt_state=jax.eval_shape(tx.init, variables),
    )
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )


def model_graphdef(cfg: ESM2Config) -> nnx.GraphDef:
    return abstract_model(cfg)[0]
