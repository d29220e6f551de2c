"""What a record says about the machine it was computed on."""

import torch

from safetext.provenance import cpu_description, device_description

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
    assert cpu_description(CPUINFO) == {
        "cpu_model": "Intel(R) Xeon(R) Processor",
        "cpu_bf16_features": ["avx512_bf16", "amx_bf16"],
    }
    # AVX2 only: no native bfloat16
    assert cpu_description("model name : x\nflags : fpu avx2 avx512f\n")["cpu_bf16_features"] == []
    # a machine whose cpuinfo lists no flags (many ARM kernels say "Features") says nothing
    assert cpu_description("processor : 0\nFeatures : fp asimd\n")["cpu_bf16_features"] is None


def test_device_records_carry_the_cpu_description():
    info = device_description(torch.device("cpu"))
    assert {key: info[key] for key in ("cpu_model", "cpu_bf16_features")} == cpu_description()
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu_threads"] == torch.get_num_threads()
