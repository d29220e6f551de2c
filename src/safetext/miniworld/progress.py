"""Progress lines of MiniWorld's training stages, logged at every tenth of a stage so that a long build run without a
terminal (a batch job, a remote machine) shows how far it got and how fast it goes."""

import logging
import time

logger = logging.getLogger(__name__)


def log_progress(stage: str, step: int, max_steps: int, losses: list[float], loop_start: float) -> None:
    """Logs one line after each tenth of `max_steps`.

    Args:
        stage: the stage's name.
        step: index of the step just taken (from 0).
        max_steps: the stage's number of steps.
        losses: the losses so far; the line gives the mean over the last tenth.
        loop_start: `time.time()` when the loop began.
    """
    tenth = max(max_steps // 10, 1)
    if (step + 1) % tenth and step + 1 != max_steps:
        return
    recent = losses[-tenth:]
    seconds = time.time() - loop_start
    logger.info(
        "%s: step %d/%d, loss %.4f (mean of the last %d), %.3f s per step",
        stage,
        step + 1,
        max_steps,
        sum(recent) / len(recent),
        len(recent),
        seconds / (step + 1),
    )
