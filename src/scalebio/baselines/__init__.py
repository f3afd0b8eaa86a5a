"""Baselines the ScaleBiO paper compares against, each as plain functions over a model, tokenised examples and
data, scaled down for small models (each module's docstring says what was kept and what was scaled down):

* ``rho_loss`` (Mindermann et al. 2022): select the top N of the pool by reducible holdout loss.
* ``less`` (Xia et al. 2024): select the top N by Adam-preconditioned gradient similarity to the validation set.
* ``doremi`` (Xie et al. 2023): source weights from Group DRO on a proxy model's excess loss over a reference.

Outputs are what the rest of the pipeline takes: a selection (indices into a ``Pool``; ``write_selection``
writes the records as ``scalebio.resample`` does, so ``scalebio finetune`` takes the file unchanged) or source
weights (``source_weights_record`` → ``scalebio.weights.write_weights``), each with provenance naming the method.
"""

from .common import Pool, per_example_losses, source_weights_record, tokenize_pool, top_n, train_steps, write_selection
from .doremi import DoremiResult, doremi_weight_update, run_doremi, train_reference_model
from .less import (LessSelection, RandomProjector, add_lora, gradient_features, less_scores, select_less,
                   warmup)
from .rho_loss import (RhoLossSelection, irreducible_losses, rho_loss_scores, select_rho_loss,
                       train_irreducible_loss_model, train_with_rho_loss)

__all__ = [
    "Pool", "per_example_losses", "source_weights_record", "tokenize_pool", "top_n", "train_steps", "write_selection",
    "DoremiResult", "doremi_weight_update", "run_doremi", "train_reference_model",
    "LessSelection", "RandomProjector", "add_lora", "gradient_features", "less_scores", "select_less", "warmup",
    "RhoLossSelection", "irreducible_losses", "rho_loss_scores", "select_rho_loss", "train_irreducible_loss_model",
    "train_with_rho_loss",
]
