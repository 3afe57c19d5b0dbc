"""The native CPU backend: the C++ kernels (``csrc/``), their build and weight layouts (:mod:`.build`), and the
model on them (:mod:`.backend`)."""
