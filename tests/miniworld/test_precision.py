"""Which precision MiniWorld's stages train in: bfloat16 autocast where the hardware has it, float32 where not."""

import logging
from dataclasses import replace

import pytest
import torch

from safetext.miniworld import build as build_module
from safetext.miniworld import precision
from safetext.miniworld.build import BuildConfig, resolve_precision

X86_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme de pse tsc msr fma sse4_1 sse4_2 avx avx2
bogomips\t: 4890.85
"""
X86_AVX512_BF16 = X86_AVX2.replace("avx2", "avx2 avx512f avx512_bf16")
ARM_BF16 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid sve bf16 i8mm
CPU implementer\t: 0x41
"""


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo():
    assert "avx2" in precision.cpu_flags(X86_AVX2) and "avx512_bf16" not in precision.cpu_flags(X86_AVX2)
    assert "avx512_bf16" in precision.cpu_flags(X86_AVX512_BF16)
    assert {"bf16", "sve"} <= precision.cpu_flags(ARM_BF16)
    assert precision.cpu_flags("") == set()


@pytest.mark.parametrize(
    "cpu_info, native", [(X86_AVX2, False), (X86_AVX512_BF16, True), (ARM_BF16, True), (None, False)]
)
def test_native_bf16_is_told_by_the_cpu_flags_when_pytorch_does_not_tell(cpu_info, native, tmp_path, monkeypatch):
    # PyTorch's own x86 probes answer first; here they say no, as on an AVX2 or Arm machine
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    path = tmp_path / "cpuinfo"
    if cpu_info is not None:
        path.write_text(cpu_info)
    monkeypatch.setattr(precision, "CPU_INFO", path)
    assert precision.cpu_has_native_bf16() is native
    assert precision.bf16_is_native("cpu") is native


def test_the_recipe_falls_back_to_float32_only_without_native_bf16(monkeypatch, caplog):
    recipe = BuildConfig()
    monkeypatch.setattr(build_module, "bf16_is_native", lambda device: True)
    assert resolve_precision(recipe) == (recipe, [])

    monkeypatch.setattr(build_module, "bf16_is_native", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="safetext.miniworld.build"):
        resolved, moved = resolve_precision(recipe)
    assert moved == ["clip", "autoencoder", "unet"] and "no native bfloat16" in caplog.text
    assert [getattr(resolved, name).mixed_precision for name in moved] == ["no", "no", "no"]
    # everything else is the recipe's
    assert replace(resolved.autoencoder, mixed_precision="bf16") == recipe.autoencoder
    assert resolved.autoencoder.crop_size == 32 and resolved.unet.max_train_steps == recipe.unet.max_train_steps

    # float32 stages are not listed, and the fallback can be refused
    partly = replace(recipe, clip=replace(recipe.clip, mixed_precision="no"))
    assert resolve_precision(partly)[1] == ["autoencoder", "unet"]
    kept = replace(recipe, float32_without_native_bf16=False)
    assert resolve_precision(kept) == (kept, [])


def test_bf16_on_a_device_without_it_warns(monkeypatch, caplog):
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="safetext.miniworld.precision"):
        with precision.training_autocast("cpu", "no"):
            pass
        assert caplog.text == ""
        with precision.training_autocast("cpu", "bf16"):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert "many times slower" in caplog.text
