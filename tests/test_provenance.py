"""What a record says about the machine it was computed on."""

import platform
from pathlib import Path

import pytest
import torch

from safetext.provenance import BF16_FEATURES, cpu_bf16_features, cpu_model, device_description


def test_the_cpu_is_described_by_its_model_and_its_bfloat16_features():
    info = device_description(torch.device("cpu"))
    assert info["cpu_model"] == cpu_model() and info["cpu_bf16_features"] == cpu_bf16_features()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu_threads"] == torch.get_num_threads()


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's /proc/cpuinfo")
def test_the_bfloat16_features_are_the_ones_the_kernel_lists():
    text = Path("/proc/cpuinfo").read_text()
    flags = next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split()
    assert cpu_bf16_features() == [name for name in BF16_FEATURES if name in flags]
    model = next((line for line in text.splitlines() if line.startswith("model name")), None)
    assert cpu_model() == (model.split(":", 1)[1].strip() if model else platform.processor() or None)
