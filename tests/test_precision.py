"""utils.choose_precision: the one place that turns --amp and --channels-last into a dtype and a
memory format, for train.py, eval.py and detect.py alike."""
import warnings

import pytest
import torch

import utils
from utils import choose_precision, cpu_has_native, describe_precision

AVX2 = {"avx2": True, "avx512_bf16": False, "amx_bf16": False, "avx512_fp16": False, "amx_fp16": False}
AVX512_BF16 = dict(AVX2, avx512_bf16=True)
AMX = dict(AVX2, amx_bf16=True)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_isa_cap(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


def test_auto_on_a_cpu_is_bf16_only_where_the_cpu_has_it():
    assert choose_precision("auto", CPU, capabilities=AVX2) == (None, torch.channels_last)
    assert choose_precision("auto", CPU, capabilities=AVX512_BF16) == (torch.bfloat16, torch.channels_last)
    assert choose_precision("auto", CPU, capabilities=AMX) == (torch.bfloat16, torch.channels_last)


def test_an_onednn_isa_cap_below_bf16_counts_as_no_bf16(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert not cpu_has_native(torch.bfloat16, AVX512_BF16)
    assert choose_precision("auto", CPU, capabilities=AVX512_BF16)[0] is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert choose_precision("auto", CPU, capabilities=AMX)[0] is torch.bfloat16


def test_explicit_choices_are_respected():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_precision("off", CPU, capabilities=AVX512_BF16)[0] is None
        assert choose_precision("bf16", CPU, capabilities=AVX512_BF16)[0] is torch.bfloat16
        assert choose_precision("auto", CPU, channels_last=False, capabilities=AVX512_BF16) == \
            (torch.bfloat16, torch.contiguous_format)
        assert choose_precision("off", CPU, channels_last=True, capabilities=AVX2) == \
            (None, torch.channels_last)


def test_explicit_bf16_without_the_instructions_runs_but_warns():
    with pytest.warns(UserWarning, match="no native bf16"):
        assert choose_precision("bf16", CPU, capabilities=AVX2)[0] is torch.bfloat16
    with pytest.warns(UserWarning, match="no native fp16"):
        assert choose_precision("fp16", CPU, capabilities=AVX512_BF16)[0] is torch.float16


def test_cuda_prefers_bf16_then_fp16(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert choose_precision("auto", cuda) == (torch.bfloat16, torch.channels_last)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert choose_precision("auto", cuda) == (torch.float16, torch.channels_last)
    assert choose_precision("off", cuda, channels_last=False) == (None, torch.contiguous_format)


def test_other_devices_and_bad_choices():
    assert choose_precision("auto", torch.device("mps")) == (None, torch.contiguous_format)
    with pytest.raises(ValueError, match="--amp"):
        choose_precision("int8", CPU)


def test_this_cpus_capabilities_are_read():
    """The real query runs and agrees with torch's own bf16 check."""
    assert cpu_has_native(torch.bfloat16) == (torch.cpu._is_avx512_bf16_supported()
                                              or torch.cpu._is_amx_tile_supported())


def test_description():
    assert describe_precision(None, torch.channels_last) == "fp32, channels_last"
    assert describe_precision(torch.bfloat16, torch.contiguous_format) == "bf16 autocast, NCHW"
    assert describe_precision(torch.float16, torch.channels_last) == "fp16 autocast, channels_last"
    assert set(utils.AMP_DTYPES) == set(utils.AMP_CHOICES) - {"auto"}
