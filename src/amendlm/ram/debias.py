"""The proposal-side half of an ``align train --pairs`` run: the KL regulariser and the val-target selection.

RAM trains its aligner without ever running the proposal; a *debiasing* aligner needs the proposal
twice (:class:`DebiasControl`):

* **the regulariser** (``PairsConfig.kl_weight``): each optimizer step adds
  ``kl_weight * KL(P_M || pair)`` per scored position of a batch of neutral text
  (:func:`amendlm.ram.losses.product_kl_sums`), the proposal frozen, in eval mode, under ``no_grad``;
* **decisions on val targets only** (``PairsConfig.val_every``): before training, every N steps and
  at the last step, the pair ``softmax(b + a)`` (:class:`amendlm.product.ProductLM`, the distribution
  ``amendlm eval --aligner`` scores) is scored on StereoSet's val target terms; the aligner kept
  is the evaluation with the smallest worst per-type ``|SS - 50|`` among those whose overall val LMS
  fell at most ``max_lms_drop`` points from step 0 — BiasUnlearn's ``gap_within_lms`` rule
  (:func:`amendlm.unlearn.evaluation.lms_qualifies`), the earliest on a tie.  Step 0 always
  qualifies, so a run that never improves keeps its initial aligner (with a zero head: the
  proposal itself).

Files in the run directory: ``best/step-N.safetensors`` (the trainable parameters of a kept
evaluation; older ones are removed when a checkpoint records a newer one, so a resumed run always
finds the one its checkpoint names), and ``event: val`` records in ``train_log.jsonl``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
BEST_DIR = "best"
SELECTION = "gap_within_lms"


class DebiasControl:
    """The frozen proposal, the neutral stream and the selection state of one ``--pairs`` run.

    Args:
        config: the run's :class:`amendlm.ram.train.TrainConfig` (``config.pairs`` set).
        model: the aligner being trained (plain or PEFT), for the vocabulary check.
        tokenizer: the aligner's tokenizer (the proposal's must have the same vocabulary).
        dtype: the training's compute dtype (val evaluations use it too).
        out: the run directory.

    Raises:
        ValueError: the proposal's and the aligner's vocabularies differ (names both), or an empty
            neutral set / val split (:mod:`amendlm.ram.preference`).
    """

    def __init__(self, config, model, tokenizer, dtype: torch.dtype, out: Path):
        from amendlm.modeling import load_model, pad_token_id
        from amendlm.ram.cached import shared_vocab_size
        from amendlm.ram.preference import neutral_examples, val_clusters
        from amendlm.unlearn.streams import StreamSampler

        self.pairs, self.tokenizer, self.dtype, self.out = config.pairs, tokenizer, dtype, Path(out)
        self.split_seed = config.pairs.split_seed
        device = next(model.parameters()).device
        proposal, proposal_tokenizer = load_model(config.proposal, device=str(device))
        self.proposal = proposal.eval().requires_grad_(False)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.vocab_size = shared_vocab_size(proposal_tokenizer, tokenizer, config.proposal, "the aligner", proposal, base)
        self.pad_id = pad_token_id(tokenizer)
        self.neutral = neutral_examples(self.pairs, tokenizer) if self.pairs.kl_weight > 0 else []
        self.sampler = StreamSampler(len(self.neutral), config.seed, "neutral") if self.neutral else None
        self.clusters = val_clusters(self.pairs, config.seed) if self.pairs.val_every else []
        self.base_lms: float | None = None
        self.best: dict | None = None  # {"step", "worst_gap", "lms_drop"} of the kept evaluation
        self.trajectory: list[dict] = []

    # ------------------------------------------------------------------ the regulariser
    def regulariser(self, model) -> torch.Tensor | None:
        """``KL(P_M || pair)`` per scored position (nats) on the next neutral batch, with the aligner's graph;
        None when ``kl_weight`` is 0.  Call inside the step's autocast."""
        from amendlm.ram.losses import product_kl_sums
        from amendlm.unlearn.streams import collate_stream

        if self.sampler is None:
            return None
        batch = [self.neutral[i] for i in self.sampler.take(self.pairs.kl_batch_size)]
        device = next(self.proposal.parameters()).device
        inputs = {k: v.to(device) for k, v in collate_stream(batch, self.pad_id).items()}
        loss_mask = inputs.pop("loss_mask")
        with torch.no_grad():
            proposal_logits = self.proposal(**inputs, use_cache=False).logits
        aligner_logits = model(**inputs, use_cache=False).logits
        sums = product_kl_sums(proposal_logits, aligner_logits, loss_mask, self.vocab_size)
        return sums.sum() / loss_mask[:, 1:].sum().clamp(min=1)

    # ------------------------------------------------------------------ val evaluations and selection
    def due(self, step: int, total_steps: int) -> bool:
        """Whether step ``step`` is evaluated on val: 0, every ``val_every``, and the last."""
        every = self.pairs.val_every
        return bool(every) and (step == 0 or step % every == 0 or step == total_steps)

    def validate(self, model, step: int, save: bool = True) -> dict:
        """Score the pair on the val clusters at ``step``, update the kept evaluation, snapshot its weights.

        Returns:
            the log record: ``{"event": "val", "step", "ss": {type: SS}, "lms": {type: LMS}, "worst_gap",
            "lms_drop", "kept", "seconds"}`` (percent; ``worst_gap`` over the bias types, ``lms_drop`` from step 0).
        """
        from amendlm.modeling import dtype_name
        from amendlm.product import ProductLM
        from amendlm.unlearn.evaluation import eval_record, lms_qualifies, stereoset_type_scores

        began = time.perf_counter()
        pair = ProductLM(self.proposal, model, self.vocab_size)
        scores = stereoset_type_scores(pair, self.tokenizer, self.clusters, dtype_name(self.dtype), self.split_seed)
        record = {**eval_record(step, scores), "event": "val"}
        lms = record["lms"]["overall"]
        if self.base_lms is None:
            self.base_lms = lms
        record["lms_drop"] = drop = self.base_lms - lms
        kept = lms_qualifies(drop, SELECTION, self.pairs.max_lms_drop) and (
            self.best is None or record["worst_gap"] < self.best["worst_gap"])
        record["kept"] = kept
        record["seconds"] = time.perf_counter() - began
        if kept:
            self.best = {"step": step, "worst_gap": record["worst_gap"], "lms_drop": drop}
            if save:
                save_trainable(model, self.snapshot(step))
        self.trajectory.append({"step": step, "ss": record["ss"]["overall"], "lms": lms,
                                "worst_gap": record["worst_gap"], "lms_drop": drop})
        logger.info("step %d val SS %.2f LMS %.2f worst gap %.2f%s", step, record["ss"]["overall"], lms,
                    record["worst_gap"], " (kept)" if kept else "")
        return record

    def snapshot(self, step: int) -> Path:
        """``best/step-N.safetensors``."""
        return self.out / BEST_DIR / f"step-{step:06d}.safetensors"

    def prune(self) -> None:
        """Remove every snapshot but the kept one (called when a checkpoint records the kept step)."""
        keep = self.snapshot(self.best["step"]) if self.best else None
        for path in (self.out / BEST_DIR).glob("step-*.safetensors"):
            if path != keep:
                path.unlink(missing_ok=True)

    def restore_best(self, model) -> None:
        """Load the kept evaluation's trainable parameters into ``model`` (no-op without val evaluations).

        Raises:
            FileNotFoundError: the snapshot the state names is missing (names it).
        """
        if self.best is not None:
            load_trainable(model, self.snapshot(self.best["step"]))

    def summary(self) -> dict:
        """The selection as data: rule, bound, step-0 val LMS, the kept evaluation, the trajectory."""
        return {"rule": SELECTION, "max_lms_drop": self.pairs.max_lms_drop, "base_lms": self.base_lms,
                "kept": self.best, "val_clusters": len(self.clusters), "trajectory": self.trajectory}

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        """JSON-able: the neutral sampler's position, step 0's val LMS, the kept evaluation, the trajectory."""
        return {"sampler": self.sampler.state_dict() if self.sampler else None, "base_lms": self.base_lms,
                "best": self.best, "trajectory": self.trajectory}

    def load_state_dict(self, state: dict | None) -> None:
        """Continue from :meth:`state_dict` (``None``: nothing saved, keep the fresh state)."""
        if not state:
            return
        if self.sampler is not None and state.get("sampler"):
            self.sampler.load_state_dict(state["sampler"])
        self.base_lms, self.best = state.get("base_lms"), state.get("best")
        self.trajectory = list(state.get("trajectory") or [])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the parameters that require a gradient (detached CPU copies, contiguous)."""
    return {name: p.detach().to("cpu", copy=True).contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model, path: Path) -> None:
    """Write :func:`trainable_state` of ``model`` to ``path`` (safetensors, via a temporary file and a rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    save_file(trainable_state(model), str(staging))
    staging.replace(path)


def load_trainable(model, path: Path) -> None:
    """Load a :func:`save_trainable` file into ``model`` (its other parameters untouched).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file names parameters ``model`` does not have.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the kept aligner's weights are missing; train again with a new --out")
    result = model.load_state_dict(load_file(str(path)), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: parameters {result.unexpected_keys[:3]} are not in the aligner")
