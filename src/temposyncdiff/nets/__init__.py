"""Plain torch ``nn.Module`` networks (no Lightning imports): VAE, denoisers, audio encoder, lip-sync expert."""
