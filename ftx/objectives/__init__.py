"""One LightningModule per objective (``objective.name``)."""
