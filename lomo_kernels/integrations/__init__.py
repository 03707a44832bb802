"""Integrations with training frameworks; each module imports its framework only when imported itself:

* ``lomo_kernels.integrations.transformers``: the Hugging Face ``Trainer`` (``LomoTrainer``).
* ``lomo_kernels.integrations.deepspeed``: DeepSpeed ZeRO stage 3.
"""
