"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017) in JAX/Flax NNX."""

from transformer import allocator

# `python -m transformer.PROGRAM` restarts itself with tcmalloc when it is installed (see
# allocator.py); importing the library does nothing of the kind.
allocator.use_tcmalloc()
