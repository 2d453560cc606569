"""Model segments: the per-layer store, segment servers, the wire protocol, the client and the gateway."""

import os

# Exactness (a split chain's logits equal the whole model's, bit for bit) needs MKL to take the same
# code path for every matrix product whatever the buffers' alignment: without it, MKL's results on some
# x86-64 CPUs (seen on AMD EPYC, with and without AVX-512) differ by ~1e-6 between a split and the whole
# model. Conditional numerical reproducibility on the AVX2 path, which every x86-64 CPU of the project's
# machines has, fixes that; MKL reads the variable at its first call, so setting it here (before any
# segment computes) covers every process mecsplit starts. A value set by the user wins.
os.environ.setdefault("MKL_CBWR", "AVX2")
