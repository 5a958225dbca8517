"""distill_jax: knowledge distillation for sequential recommenders in JAX/Flax."""

__version__ = "0.1.0"
