"""The engine's parts that are not lifecycle: pure update math (:mod:`.adam`, :mod:`.adafactor`), the
residual rule table (:mod:`.rules`), refreshes with the per-matrix plan (:mod:`.refresh`), FRUGAL's
block selection (:mod:`.blocks`) and the option schema with its checks and its table of refused
combinations (:mod:`.options`). :class:`lrtrain.optim.SubspaceAdamW` (in :mod:`lrtrain.optim.subspace`)
keeps set-up, state and dispatch."""
