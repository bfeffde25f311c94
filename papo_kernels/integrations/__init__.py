"""Adapters that run ``papo_loss`` inside other training libraries.

Each adapter is a submodule that imports its library only when it is imported
itself: ``import papo_kernels`` never imports any of them.

- ``papo_kernels.integrations.trl``: ``PAPOConfig`` and ``PAPOTrainer`` on TRL's ``GRPOTrainer``
  (needs the ``trl`` extra: ``pip install "papo-kernels[trl]"``).
"""
