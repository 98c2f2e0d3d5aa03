"""Training loops people already use: Hugging Face Trainer (:mod:`lrtrain.integrations.hf`).

Lightning needs no adapter: ``configure_optimizers`` returns one of lrtrain's optimizers built by
:func:`lrtrain.optim.param_groups` (see the README); its checkpoints, schedulers, gradient
clipping and accumulation work as with torch's AdamW (tests/integrations/test_lightning.py).
"""
