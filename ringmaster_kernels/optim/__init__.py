"""Synchronous LMO optimizers in ``torch.optim`` form: Gluon, and Muon/Scion as presets."""
from .gluon import Gluon
from .presets import GluonAdamW, muon_groups, scion_groups

__all__ = ["Gluon", "GluonAdamW", "muon_groups", "scion_groups"]
