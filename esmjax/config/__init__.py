"""Typed, frozen configuration for every esmjax job, and the YAML loader.

Every config is a frozen, keyword-only dataclass. YAML files under ``configs/`` hold only what
differs from the defaults; ``load_config`` builds the dataclasses from them, rejects unknown keys,
coerces leaf types and applies ``--set a.b=c`` overrides. Model sizes are data (``ESM2_PRESETS``),
as in the ESM-2 model zoo (Lin et al. 2023).

One module per idea: ``base`` (the error), ``model`` (ESM-2 and the sharding rules), ``serialize``
(trees to dataclasses and back), ``train`` and ``finetune`` (their configs and loaders); every
public name is importable from ``esmjax.config``.
"""

from esmjax.config.base import (  # noqa: F401
    ConfigError,
)
from esmjax.config.finetune import (  # noqa: F401
    FINETUNE_MODES,
    LORA_TARGETS,
    TASKS,
    FinetuneConfig,
    FinetuneDataConfig,
    LoraConfig,
    load_finetune_config,
    load_finetune_run_config,
)
from esmjax.config.model import (  # noqa: F401
    ACT_BATCH,
    ACT_EMBED,
    ACT_HEADS,
    ACT_LEN,
    ACT_MLP,
    ARCHITECTURE_FIELDS,
    ATTENTION_PATHS,
    DTYPES,
    EMBED,
    ESM2_PRESETS,
    HEAD_DIM,
    HEADS,
    LAYERS,
    LOGICAL_AXES,
    MESH_AXES,
    MLP,
    NORM,
    REMAT_POLICIES,
    RULE_PRESETS,
    VOCAB,
    ESM2Config,
    Rules,
    check_same_architecture,
    esm2_from_shape,
    esm2_preset,
    resolve_rules,
)
from esmjax.config.serialize import (  # noqa: F401
    config_hash,
    from_dict,
    to_dict,
)
from esmjax.config.train import (  # noqa: F401
    CheckpointConfig,
    DataConfig,
    MeshConfig,
    OptimConfig,
    TrainConfig,
    load_config,
    load_run_config,
)
