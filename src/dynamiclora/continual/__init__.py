"""Continual learning, measured: task streams, GEM/Avalanche metrics, DynamicLoRA and PEFT baselines."""
