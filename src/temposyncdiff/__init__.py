"""TempoSyncDiff: distilled, temporally consistent latent diffusion for audio-driven talking heads."""

__version__ = "0.1.0"
