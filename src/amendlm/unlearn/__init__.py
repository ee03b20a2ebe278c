"""BiasUnlearn and unlearning baselines (DESIGN.md §4).

* :mod:`amendlm.unlearn.losses` — pure losses over log-probs (NPO, CE, KL, GA, GradDiff, DPO);
* :mod:`amendlm.unlearn.data` — forget / retain / KL sets from StereoSet train targets;
* :mod:`amendlm.unlearn.schedule` — dynamic dataset swapping and the stop rule;
* :mod:`amendlm.unlearn.methods` — the method registry;
* :mod:`amendlm.unlearn.config` and :mod:`amendlm.unlearn.trainer` — ``UnlearnConfig`` and ``train``;
* :mod:`amendlm.unlearn.recipes` — named presets of the config (``biasunlearn``, formerly ``default``; ``official``; ``pairwise``);
* :mod:`amendlm.unlearn.state` — the resumable run state, the result and the learning rate;
* :mod:`amendlm.unlearn.progress` — the progress bar and evaluation lines of ``amendlm debias``;
* :mod:`amendlm.unlearn.models`, :mod:`amendlm.unlearn.streams`, :mod:`amendlm.unlearn.evaluation`,
  :mod:`amendlm.unlearn.resume`, :mod:`amendlm.unlearn.artifacts` — what the trainer drives: LoRA and the
  reference pass, example streams, val scores, resume checks, the files of a run.
"""
