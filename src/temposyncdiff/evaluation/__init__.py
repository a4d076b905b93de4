"""tsd-eval: the denoising protocol (vs the VAE reconstruction) and the generation protocol (vs the ground truth),
and the report, tables and plots written from their results. Modules: ``clips`` (the held-out utterances),
``models`` (the exports run), ``denoise`` and ``generation`` (the protocols), ``baselines``, ``report``, ``run``
(tsd-eval's entry point).

Utterances: up to ``max_utterances`` of a manifest split, evenly spaced (as the stages' validation picks them).
Reference image: frame ``reference_frame`` of the next utterance (by id) of the same talk in the split, so the model
never sees the frames it must reproduce; an utterance whose talk has no other one in the split uses its own first
frame (recorded per utterance in the report). Models: each ``models`` entry is a denoiser export run at each of its
step counts (``<name>@<steps>``); a missing checkpoint is reported unavailable, as is every metric that cannot be
computed honestly (LPIPS without backbone weights, identity and lip landmarks without dlib, LSE without the lip-sync
expert).
"""
