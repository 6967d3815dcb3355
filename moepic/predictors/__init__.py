"""Expert predictors as pure, registered strategies: none, gate_lookahead, mlp, oracle, noisy_oracle.

The engine asks one, after each layer routes, which experts the next layers will need, and copies
them ahead. Importing this package registers them all.
"""

from moepic.predictors import gate_lookahead, mlp, noisy_oracle, oracle  # noqa: F401  (registration)
from moepic.predictors.base import PREDICTORS, Predictor, PredictorConfig

__all__ = ["PREDICTORS", "Predictor", "PredictorConfig"]
