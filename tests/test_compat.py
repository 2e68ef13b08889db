"""The contracts of the patches in vac.deploy.compat: these fail when upstream changes under them."""

from __future__ import annotations

import inspect

import torch

from vac.deploy import compat


def test_torchao_loading_patch_finds_what_it_wraps():
    import transformers.integrations.torchao as hf_torchao

    for name, params in (("unflatten_tensor_state_dict", ["tensors_data_dict", "metadata"]),
                         ("is_metadata_torchao", ["metadata"])):
        fn = getattr(hf_torchao, name)
        original = fn if not getattr(fn, "_vac_fast", False) else None
        if original is not None:
            assert list(inspect.signature(original).parameters)[: len(params)] == params, name
    assert compat.fast_int8_loading() is True
    assert getattr(hf_torchao.unflatten_tensor_state_dict, "_vac_fast", False)
    assert compat.fast_int8_loading() is True  # idempotent


def test_direct_forward_relies_on_module_call_and_hook_dicts():
    from vac.models.layers import LowRankLinear

    layer = LowRankLinear(8, 6, 3)
    x = torch.randn(2, 8)
    expected = layer(x)
    assert not compat.has_hooks(layer, layer.down, layer.up)
    compat.bind_direct_forward(layer)
    torch.testing.assert_close(layer(x), expected)
    calls = []
    layer.down.register_forward_hook(lambda *a: calls.append(1))
    assert compat.has_hooks(layer, layer.down, layer.up)
    assert isinstance(torch.nn.Module()._forward_pre_hooks, dict)


def test_written_for_names_the_pinned_versions():
    import torchao
    import transformers

    assert set(compat.WRITTEN_FOR) == {"transformers", "torch", "torchao"}
    # the pinned libraries are the ones these patches were written for
    assert torch.__version__.startswith(compat.WRITTEN_FOR["torch"])
    assert torchao.__version__.startswith(compat.WRITTEN_FOR["torchao"])
    assert int(transformers.__version__.split(".")[0]) == int(compat.WRITTEN_FOR["transformers"].split(".")[0])
