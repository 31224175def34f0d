"""Names shared across layers: the one home of every constant more than one module needs.

Imports nothing, so every layer (``core`` included) may import it. Values that belong to a single
module stay in that module; settings a run can change are config fields
(``megatron_sl.training.config``), not constants.
"""

# megatron-core's four linear slots of a transformer layer that can hold SL weights
SL_SLOTS = ("qkv", "proj", "fc1", "fc2")
# how an SL layer computes: "auto" lets the cost model choose per call
SL_PATHS = ("auto", "dense", "factored")
# model variants: "sl" W = s·BA + S; "lowrank" the same layers with density 0 (W = s·BA, the paper's
# Low-Rank baseline); "dense" megatron's full-rank linears
VARIANTS = ("sl", "lowrank", "dense")

# files shipped inside the package (importlib.resources; see ``megatron_sl.resources``)
CONFIG_DIR = "configs"            # training configs (YAML)
DS_TEMPLATE_DIR = "ds_configs"    # DeepSpeed templates, one per distinct ZeRO layout
DEFAULT_CONFIG = "tiny_sl.yaml"   # the demo's config

# default working directories, relative to where a command runs
DEFAULT_DATA_DIR = "data"        # demo corpus (raw/) and prepared data (demo/)
DEFAULT_RUNS_DIR = "runs"        # run directories
