"""dehbws: joint architecture and hyperparameter search with DEHB and weight sharing."""

__version__ = "0.1.0"
