"""Learned registration: VoxelMorph-diff in JAX (Equinox networks, optax, safetensors checkpoints).

- :class:`VxmDiff`, :func:`vxm_loss`, :class:`LossConfig`, :func:`predict`: the probabilistic
  diffeomorphic network of Dalca et al. 2019 and its variational loss (:mod:`ppreg.learned.vxm`);
- :func:`train`: the training loop (jitted chunks, data parallel over devices, checkpoints, resume;
  :mod:`ppreg.learned.train`); :func:`train_vxm_diff`: the recipe on synthesised pairs;
- :func:`load` / :func:`save`: checkpoints (a folder: ``config.json`` + ``weights.safetensors``);
- :func:`register_vxm`: registration of a pair with a trained (or the shipped) model; also
  ``ppreg.register(..., transform="vxm-diff")`` and ``ppreg register --transform vxm-diff``;
- :class:`FeatCNN` and :mod:`ppreg.learned.suits`: SUITS (Blendowski et al. 2020), the Y-shaped
  feature network, its MIND-SSC replicator pre-training, the differentiable Gauss-Newton step
  (:func:`gn_step`) and the training loss of Algorithm 1 (:func:`suits_loss`); :func:`train_suits`
  (:mod:`ppreg.learned.suits_recipe`: multi-modal pairs synthesised from real brains, both stages) and
  :func:`register_suits` (``ppreg.register(..., transform="suits")``, the shipped 2D model);
- :class:`AlphaCNN` (:mod:`ppreg.learned.alpha_cnn`, :mod:`ppreg.learned.alpha_data`): the network that
  predicts FLASH's regularisation weight alpha from a pair (Wang & Zhang, 004 Sec. 3.2).
"""

from .alpha_cnn import AlphaCNN, fit_alpha_cnn, predict_alpha
from .alpha_data import build_alpha_dataset, split_indices
from .checkpoint import Checkpoint, CheckpointError, load, save
from .featcnn import FeatCNN
from .recipes import train_vxm_diff
from .register import register_vxm, shipped_model_path
from .suits import SuitsConfig, gn_step, mind_replicator_loss, register_features, suits_loss
from .suits_recipe import train_suits
from .suits_register import register_suits
from .train import TrainResult, train
from .vxm import LossConfig, VxmDiff, predict
from .vxm import loss as vxm_loss

__all__ = [
    "AlphaCNN",
    "Checkpoint",
    "CheckpointError",
    "FeatCNN",
    "LossConfig",
    "SuitsConfig",
    "TrainResult",
    "VxmDiff",
    "build_alpha_dataset",
    "fit_alpha_cnn",
    "gn_step",
    "load",
    "mind_replicator_loss",
    "predict",
    "predict_alpha",
    "register_features",
    "register_suits",
    "register_vxm",
    "save",
    "shipped_model_path",
    "split_indices",
    "suits_loss",
    "train",
    "train_suits",
    "train_vxm_diff",
    "vxm_loss",
]
