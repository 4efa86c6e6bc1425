"""loradock.trainer: a YAML config and a dataset in, a new registry version out.

    from loradock.trainer import train
    version = train("train_medical.yaml", ["learning_rate=2e-4"])
    print(version.ref)  # medical@4
"""

from .config import TrainConfig, config_help, load_config
from .errors import CheckpointError, ConfigError, DatasetError, TrainerError


def __getattr__(name: str):
    # `train` pulls in torch; importing it lazily keeps `loradock --help` and config checks fast.
    if name == "train":
        from .training import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "TrainConfig",
    "TrainerError",
    "config_help",
    "load_config",
    "train",
]
