"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017) in JAX/Flax NNX."""

from transformer import allocator, supervisor

# `python -m transformer.PROGRAM` restarts itself with tcmalloc when it is installed (see
# allocator.py), a multi-process train runs as the child of a supervisor that turns JAX's
# aborts into one line, and a signal while a program starts is one line too (supervisor.py);
# importing the library does nothing of the kind.
allocator.use_tcmalloc()
supervisor.supervise()
supervisor.exit_on_signals()
