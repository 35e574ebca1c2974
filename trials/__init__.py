"""The science of bdlab: what one trial runs.

Pure PyTorch. Nothing in this package imports Ray, MLflow or Optuna; the platform (`bdlab`) drives it.
"""

__version__ = "0.1.0"
