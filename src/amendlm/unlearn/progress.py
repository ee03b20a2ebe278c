"""What ``amendlm debias`` shows while it trains: a progress bar and one line per evaluation.

:class:`RunProgress` receives the records of ``log.jsonl`` as they are written
(:meth:`amendlm.unlearn.trainer.UnlearnTrainer.train`'s ``on_record``): a step record moves
the bar (step, losses, learning rate, time left); an eval record prints one line
(:func:`eval_line`).  The formatting functions are pure, so they are tested without a terminal.
"""

from __future__ import annotations

_LOSS_PARTS = ("forget", "retain", "kl", "dpo")


def step_text(record: dict) -> str:
    """The bar's text for one step record, e.g. ``loss 3.512 forget 13.86 retain 4.21 kl 0.001 lr 2.0e-04 gender``.

    The losses are the logged (unweighted) parts, nats (NPO: its scaled log-sigmoid value);
    ``lr`` is the step's learning rate; the focus bias type (``swapped`` when its roles are) ends it.
    """
    parts = [f"loss {record['loss']:.3f}"] + [f"{name} {record[name]:.3g}" for name in _LOSS_PARTS if name in record]
    parts.append(f"lr {record['lr']:.1e}")
    if record.get("focus"):
        parts.append(record["focus"] + (" swapped" if record.get("swap") else ""))
    return " ".join(parts)


def eval_line(record: dict) -> str:
    """One line for an eval record: val SS overall and per bias type, LMS and its drop, worst gap, decision.

    Example: ``step 100 val: SS overall 55.20 | gender 60.10 race 52.00 · LMS 80.10 (-0.50 from step 0)
    · worst gap 10.10 -> focus gender``.
    """
    ss = record["ss"]
    types = " ".join(f"{name} {value:.2f}" for name, value in ss.items() if name != "overall")
    text = f"step {record['step']} val: SS overall {ss.get('overall', float('nan')):.2f} | {types}"
    lms = record.get("lms", {}).get("overall")
    if lms is not None:
        drop = record.get("lms_drop")
        text += f" · LMS {lms:.2f}" + (f" ({0.0 - drop:+.2f} from step 0)" if drop is not None else "")
    text += f" · worst gap {record['worst_gap']:.2f}"
    decision = record.get("decision")
    if decision:
        if decision["stop"]:
            text += " -> stop (every bias type within tolerance)"
        elif decision.get("swapped_types") is not None:  # type_focus="all"
            swapped = ", ".join(decision["swapped_types"]) or "none"
            text += f" -> train {', '.join(decision.get('active_types') or ['every type'])} (swapped: {swapped})"
            if decision.get("resting_types"):
                text += f" (resting: {', '.join(decision['resting_types'])})"
        else:
            text += f" -> focus {decision['focus']}" + (" (swapped: anti-stereotype forgotten)" if decision["swap"] else "")
    return text


class RunProgress:
    """A rich progress bar over ``total`` steps fed with log records; use as a context manager.

    Args:
        total: the run's ``max_steps``.
        start: the step a resumed run starts from (so the time estimate counts only new steps).
        console: a ``rich.console.Console`` (default: stderr-aware rich default).
    """

    def __init__(self, total: int, start: int = 0, console=None):
        self.total, self.start, self.console = total, start, console
        self._progress = None
        self._task = None

    def __enter__(self) -> "RunProgress":
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                                  TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[text]}"),
                                  console=self.console)
        self._progress.__enter__()
        self._task = self._progress.add_task("debias", total=self.total, completed=self.start, text="")
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def __call__(self, record: dict) -> None:
        """Show one ``log.jsonl`` record (step: move the bar; eval: print :func:`eval_line`)."""
        if self._progress is None:
            return
        if record.get("event") == "eval":
            self._progress.console.print(eval_line(record))
        elif record.get("event") == "nan":
            self._progress.console.print(f"step {record['step']}: non-finite {record.get('what', 'value')}; stopping")
        elif "loss" in record:
            self._progress.update(self._task, completed=record["step"], text=step_text(record))
