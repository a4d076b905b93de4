"""One LightningModule per stage: vae, syncnet, teacher, student."""
