"""Which precision MiniWorld's stages train in: bfloat16 autocast where the hardware has it, float32 where not."""

import json
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
    # PyTorch's own report answers first; here it has nothing to say, as an older PyTorch
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {}, raising=False)
    path = tmp_path / "cpuinfo"
    if cpu_info is not None:
        path.write_text(cpu_info)
    monkeypatch.setattr(precision, "CPU_INFO", path)
    assert precision.cpu_has_native_bf16() is native
    assert precision.bf16_is_native("cpu") is native


def test_pytorchs_report_answers_first_and_a_failing_one_leaves_the_answer_to_the_flags(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text(X86_AVX2)
    monkeypatch.setattr(precision, "CPU_INFO", path)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True, "avx512_bf16": True}, raising=False)
    assert precision.cpu_has_native_bf16()

    def broken():
        raise RuntimeError("cpuinfo failed to initialise")

    monkeypatch.setattr(torch.cpu, "get_capabilities", broken, raising=False)
    assert precision.torch_cpu_capabilities() == {} and not precision.cpu_has_native_bf16()
    path.write_text(ARM_BF16)
    assert precision.cpu_has_native_bf16()


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
    stages = {name: replace(getattr(resolved, name), mixed_precision="bf16") for name in moved}
    assert replace(resolved, **stages) == recipe

    # float32 stages are not listed, and the fallback can be refused
    partly = replace(recipe, clip=replace(recipe.clip, mixed_precision="no"))
    assert resolve_precision(partly)[1] == ["autoencoder", "unet"]
    kept = replace(recipe, float32_without_native_bf16=False)
    assert resolve_precision(kept) == (kept, [])


def test_bf16_on_a_device_without_it_warns(monkeypatch, caplog):
    monkeypatch.setattr(precision, "bf16_is_native", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="safetext.miniworld.precision"):
        with precision.training_autocast("cpu", "no"):
            assert not torch.is_autocast_enabled("cpu")
        assert caplog.text == ""
        with precision.training_autocast("cpu", "bf16"):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert "many times slower" in caplog.text


def test_a_build_without_native_bf16_trains_in_float32_says_so_and_does_not_reuse_bf16_stages(tmp_path, monkeypatch):
    from dataclasses import asdict

    from safetext.checkpointing import same_settings
    from safetext.miniworld.build import RECORD_NAME, STAGE_RECORD, STAGES_DIR, build

    tiny = BuildConfig.quick()
    monkeypatch.setattr(build_module, "bf16_is_native", lambda device: False)
    record = build(tmp_path / "float32", tiny, keep_stages=True)
    assert record["precision_fallback"] == ["clip", "autoencoder", "unet"]
    written = json.loads((tmp_path / "float32" / RECORD_NAME).read_text())
    assert {written["stages"][name]["config"]["mixed_precision"] for name in ("clip", "autoencoder", "unet")} == {"no"}
    assert written["config"]["float32_without_native_bf16"] is True
    # a stage trained under bf16 elsewhere is not the one this machine would train: it is trained again
    kept = json.loads((tmp_path / f"float32-{STAGES_DIR}" / "autoencoder" / STAGE_RECORD).read_text())
    would_train = replace(resolve_precision(tiny)[0].autoencoder, seed=tiny.seed + 1)
    assert same_settings(kept["config"], would_train)
    trained_under_bf16 = json.loads(json.dumps(asdict(replace(tiny.autoencoder, seed=tiny.seed + 1))))
    assert not same_settings(trained_under_bf16, would_train)
