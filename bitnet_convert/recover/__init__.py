"""Accuracy recovery after conversion, as plug-ins (:mod:`.base`): closed-form compensation (:mod:`.qwt`), block-wise
reconstruction (:mod:`.blockwise`) and the distillation fine-tune (:mod:`.distill`), which share the training
machinery of :mod:`.training`. Importing this package registers them in :data:`.base.METHODS`."""

from bitnet_convert.recover import blockwise, distill, qwt  # noqa: F401  (each module registers its method)
