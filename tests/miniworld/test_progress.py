import logging
import time

from safetext.miniworld.progress import log_progress


def test_a_line_after_each_tenth_and_at_the_end(caplog):
    losses = []
    with caplog.at_level(logging.INFO, logger="safetext.miniworld.progress"):
        for step in range(25):
            losses.append(float(step))
            log_progress("unet", step, 25, losses, time.time())
    lines = [record.getMessage() for record in caplog.records]
    # a tenth of 25 steps is 2: steps 2, 4, ..., 24, and the last one, 25
    assert [line.split(",")[0] for line in lines] == [f"unet: step {n}/25" for n in [*range(2, 25, 2), 25]]
    # the mean of the last tenth's losses (steps 24 and 25 hold 23.0 and 24.0)
    assert "loss 23.5000 (mean of the last 2)" in lines[-1]
