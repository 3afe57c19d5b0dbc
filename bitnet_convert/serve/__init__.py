"""``bitnet-convert serve``: an OpenAI-compatible HTTP server (:mod:`.api`) over a continuous-batching engine
(:mod:`.engine`)."""
