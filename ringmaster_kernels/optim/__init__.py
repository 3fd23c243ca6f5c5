"""Synchronous LMO optimizers in ``torch.optim`` form: Gluon, and Muon/Scion as presets."""
from .gluon import Gluon
from .presets import GluonAdamW, muon_groups, scion_groups
from . import hetero_policies  # noqa: F401,E402  registers rescaled_asgd, ringleader, malenia in policies.METHODS

__all__ = ["Gluon", "GluonAdamW", "muon_groups", "scion_groups"]
