"""Learned registration: VoxelMorph-diff in JAX (Equinox networks, optax, safetensors checkpoints).

- :class:`VxmDiff`, :func:`vxm_loss`, :class:`LossConfig`, :func:`predict`: the probabilistic
  diffeomorphic network of Dalca et al. 2019 and its variational loss (:mod:`ppreg.learned.vxm`);
- :func:`train`: the training loop (jitted chunks, data parallel over devices, checkpoints, resume;
  :mod:`ppreg.learned.train`); :func:`train_vxm_diff`: the recipe on synthesised pairs;
- :func:`load` / :func:`save`: checkpoints (a folder: ``config.json`` + ``weights.safetensors``);
- :func:`register_vxm`: registration of a pair with a trained (or the shipped) model; also
  ``ppreg.register(..., transform="vxm-diff")`` and ``ppreg register --transform vxm-diff``.
"""

from .checkpoint import Checkpoint, CheckpointError, load, save
from .recipes import train_vxm_diff
from .register import register_vxm, shipped_model_path
from .train import TrainResult, train
from .vxm import LossConfig, VxmDiff, predict
from .vxm import loss as vxm_loss

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "LossConfig",
    "TrainResult",
    "VxmDiff",
    "load",
    "predict",
    "register_vxm",
    "save",
    "shipped_model_path",
    "train",
    "train_vxm_diff",
    "vxm_loss",
]
