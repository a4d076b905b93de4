"""Inference: user inputs (reference face, speech, visemes), generation pipeline, video writing and export."""
