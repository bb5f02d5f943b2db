"""Triton kernels for the TOFU (tempered focal) loss of arXiv 2605.00195."""

from tofu_kernels.hf import (
    apply_tofu_kernel,
    get_tofu_stats,
    revert_tofu_kernel,
    tofu_loss_func,
    use_tofu_kernel,
)
from tofu_kernels.linear_tofu import FusedLinearTOFULoss, fused_linear_tofu_loss
from tofu_kernels.tofu import TOFULoss, tofu_loss
from tofu_kernels.utils import TOFUParams, TOFUStats

__version__ = "0.1.0"

__all__ = [
    "FusedLinearTOFULoss",
    "TOFULoss",
    "TOFUParams",
    "TOFUStats",
    "apply_tofu_kernel",
    "fused_linear_tofu_loss",
    "get_tofu_stats",
    "revert_tofu_kernel",
    "tofu_loss",
    "tofu_loss_func",
    "use_tofu_kernel",
]
