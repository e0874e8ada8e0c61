"""``KDDataModule`` and ``KDLightningModule``: distilling from a kdpipe cache with PyTorch Lightning (the code
is in :mod:`kdpipe.pipeline.integrations.lightning`; docs/library.md, "PyTorch Lightning")."""

from kdpipe.pipeline.integrations.lightning import EpochDataLoader, KDDataModule, KDLightningModule

__all__ = ["EpochDataLoader", "KDDataModule", "KDLightningModule"]
