"""The engine's parts that are not lifecycle: pure update math (:mod:`.adam`, :mod:`.adafactor`),
the residual rule table (:mod:`.rules`) and the option schema with its checks (:mod:`.options`).
:class:`lrtrain.optim.SubspaceAdamW` (in :mod:`lrtrain.optim.subspace`) keeps set-up, state and
dispatch."""
