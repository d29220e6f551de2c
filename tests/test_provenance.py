"""What a record says about the machine it was computed on."""

import torch

from safetext.provenance import cpu_bf16_features, cpu_model, device_description

# the layout of Linux's /proc/cpuinfo: one block of "key : value" lines per processor, a blank line between
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile amx_bf16

processor\t: 1
model name\t: another processor's name
flags\t\t: fpu
"""


def test_the_cpu_is_read_off_its_first_processor_block():
    assert cpu_model(CPUINFO) == "Intel(R) Xeon(R) Processor"
    assert cpu_bf16_features(CPUINFO) == ["avx512_bf16", "amx_bf16"]
    # AVX2 only: no native bfloat16
    assert cpu_bf16_features("model name : x\nflags : fpu avx2 avx512f\n") == []
    # a machine whose cpuinfo lists no flags (many ARM kernels say "Features") says nothing
    assert cpu_bf16_features("processor : 0\nFeatures : fp asimd\n") is None


def test_device_records_carry_the_cpu_description():
    info = device_description(torch.device("cpu"))
    assert info["cpu_model"] == cpu_model() and info["cpu_bf16_features"] == cpu_bf16_features()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu_threads"] == torch.get_num_threads()
