"""Residual Alignment Model (RAM, arXiv:2505.19700): a frozen proposal model times a small trained aligner.

Modules: ``losses`` (pure training losses), ``decoding`` (pure per-step rules PAR, PAR-KL, SIR, MDS),
``generate`` (batched KV-cached loop), ``api`` (``generate``-shaped wrapper, ``LogitsProcessor``),
``data`` (tasks and splits), ``sample`` / ``train`` / ``evaluate`` (runners), ``commands`` (CLI).
"""
