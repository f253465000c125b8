"""bf16 native or emulated: read from the CPU's flags, and one warning for a user who picks bf16
where it would be emulated (several times slower than float32)."""

from __future__ import annotations

import pytest

from minpro_cli import hardware
from minpro_cli.config import load_recipe
from minpro_cli.modeling import load_policy
from minpro_cli.samplers.hf import HFSampler
from minpro_cli.sampling import load_recipe_policy

X86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 fma {extra}\nbogomips\t: 4000\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm {extra}\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [
        (X86.format(extra="avx512f avx512_bf16"), True),  # this AMD EPYC
        (X86.format(extra="amx_bf16 amx_tile amx_int8"), True),  # Sapphire Rapids
        (X86.format(extra="avx512f avx512_vnni"), False),  # AVX-512 without its bf16 extension
        (X86.format(extra=""), False),  # the AVX2 EPYC
        (ARM.format(extra="sve bf16 i8mm"), True),  # Graviton 3
        (ARM.format(extra="sve"), False),
        ("processor\t: 0\nmodel name\t: something\n", None),  # no flags line
        (None, None),  # no /proc/cpuinfo (macOS)
    ],
)
def test_native_bf16_on_a_cpu_follows_its_flags(tmp_path, cpuinfo, native):
    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    assert hardware.native_bf16("cpu", path) is native
    advice = hardware.emulated_bf16_advice("model.dtype", "cpu", path)
    assert (advice is not None) == (native is False)


def test_cpu_name_is_the_first_processors_model_name(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t: avx2\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert hardware.cpu_name(path) == "AMD EPYC"
    assert hardware.cpu_name(tmp_path / "absent") is None


def test_an_emulated_bf16_choice_gets_one_warning_line_naming_the_setting(tmp_path, monkeypatch, capsys):
    emulated, native = tmp_path / "avx2", tmp_path / "amx"
    emulated.write_text(X86.format(extra=""))
    native.write_text(X86.format(extra="amx_bf16"))
    recipe = load_recipe(None, ["model.dtype=bfloat16"])
    policy = load_policy("embedded")
    prompts = [policy.tokenizer.encode("1+1=")]
    for cpuinfo, warned in ((native, False), (emulated, True)):
        monkeypatch.setattr(hardware, "CPUINFO", cpuinfo)
        capsys.readouterr()
        load_recipe_policy(recipe)
        HFSampler(max_new_tokens=2, dtype="bfloat16").generate(policy, prompts, seed=0)
        lines = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
        expected = ["model.dtype=bfloat16", "sampler.options.dtype=bfloat16"] if warned else []
        assert [line.split("warning: ")[1].split(" on a ")[0] for line in lines] == expected
