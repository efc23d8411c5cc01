"""Where a run's records go: ``OUT/metrics.jsonl`` (one JSON object per optimizer step, and one
per validation with ``"split": "eval"``) and TensorBoard when it is installed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def _records(path: Path) -> list[tuple[int, str]]:
    """``(step, line)`` of each record of a metrics file; a last line cut off mid-write (a run
    killed while it appended, a full disk) is dropped with a warning, any other line that is not
    a JSON object with a step is an error naming the file and line."""
    lines = [line for line in path.read_text().splitlines() if line]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                logger.warning("%s: its last line is cut off (a run stopped while writing it); dropped", path)
                break
            raise ValueError(f"{path}:{number}: not a JSON record; fix or remove the line to resume") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: a record must be a JSON object with an integer step")
        records.append((record["step"], line))
    return records


class MetricsLog:
    """Appends records to ``out/metrics.jsonl`` (and TensorBoard's event files in ``out/tb``).

    Args:
        out: the run's folder.
        resumed_step: when resuming, records of later steps (written after the checkpoint,
            before the run stopped) are dropped, so the file holds each step once.
        enabled: only the first process of a run writes.
    """

    def __init__(self, out: Path, resumed_step: int | None, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out / METRICS_FILE
        self.tensorboard = None
        if not enabled:
            return
        if resumed_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [line for step, line in _records(self.path) if step <= resumed_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed: metrics go to %s only", self.path)
        else:
            # The checkpoint's own step was written before it was saved and stays in metrics.jsonl:
            # only the steps after it are dropped.
            purge = None if resumed_step is None else resumed_step + 1
            self.tensorboard = SummaryWriter(str(out / "tb"), purge_step=purge)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            split = record.get("split", "train")
            for name, value in record.items():
                if isinstance(value, (int, float)) and name != "step":
                    self.tensorboard.add_scalar(f"{split}/{name}", value, record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
