"""Largest singular value of each block kernel against depth (``params.spectral_norm``,
``capture.instruments.spectral_norm``): which layers stretch the signal and the gradient."""

from __future__ import annotations

from ablations.diagnose import block_kernels
from ablations.report.data import RunData
from ablations.report.figures import figure
from ablations.report.plotting import Plan, Plot, vs_depth


@figure(key="spectral_norm_vs_depth", section="Gradient flow", order=62, needs=("params:spectral_norm",))
def spectral_norm_vs_depth(run: RunData, plan: Plan) -> Plot | None:
    return vs_depth(plan, block_kernels(run.params), "spectral_norm", "σ_max(W)",
                    "Spectral norm of each block kernel by depth",
                    "Largest singular value of each block's kernel read as a matrix (warm-started subspace "
                    "iteration; Miyato et al. 2018), before the step's update. A layer cannot stretch a signal "
                    "or a gradient by more than this factor, so their product over blocks bounds the "
                    "gradient's growth through depth (a norm-preserving layer reads 1).")
