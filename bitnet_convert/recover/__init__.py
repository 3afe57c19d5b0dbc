"""Accuracy recovery after conversion: closed-form compensation (:mod:`.qwt`)."""
