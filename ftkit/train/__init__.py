"""Training: LightningModule, DataModule, losses (:mod:`ftkit.train.losses`) and callbacks."""
