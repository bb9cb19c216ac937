"""Typed, frozen configuration for every esmjax job, and the YAML loader.

Every config is a frozen, keyword-only dataclass. YAML files under ``configs/`` hold only what
differs from the defaults; ``load_config`` builds the dataclasses from them, rejects unknown keys,
coerces leaf types and applies ``--set a.b=c`` overrides. Model sizes are data (``ESM2_PRESETS``),
as in the ESM-2 model zoo (Lin et al. 2023).

One module per idea: ``base`` (the error, the key a check names), ``model`` (ESM-2 and its presets),
``mesh`` (the mesh axes, the logical axis names, the sharding rules and ``MeshConfig``),
``serialize`` (trees to dataclasses and back), ``train`` and ``finetune`` (their configs and
loaders). The names other packages use are importable from ``esmjax.config``; the logical axis
names, which only the model code uses, from ``esmjax.config.mesh``.
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
from esmjax.config.mesh import (  # noqa: F401
    MESH_AXES,
    RULE_PRESETS,
    MeshConfig,
    Rules,
    resolve_rules,
)
from esmjax.config.model import (  # noqa: F401
    ARCHITECTURE_FIELDS,
    ATTENTION_PATHS,
    DTYPES,
    ESM2_PRESETS,
    EXPORT_FORMATS,
    REMAT_POLICIES,
    ESM2Config,
    check_same_architecture,
    esm2_from_shape,
    esm2_preset,
)
from esmjax.config.serialize import (  # noqa: F401
    config_hash,
    from_dict,
    to_dict,
)
from esmjax.config.train import (  # noqa: F401
    CheckpointConfig,
    DataConfig,
    OptimConfig,
    TrainConfig,
    load_config,
    load_run_config,
)
