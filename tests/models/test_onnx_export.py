"""models/onnx_export.py: an exporter failure becomes one ExportError naming the operator it could not
translate, and the operator is found in the exporter's messages."""

from __future__ import annotations

import pytest
import torch

from genforge.common.errors import GenforgeError
from genforge.models.onnx_export import ExportError, require, run_exporter, unsupported_operator


class Eigenvalues(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x).real  # aten.linalg_eig: no ONNX translation


def test_unsupported_operator_is_named(tmp_path):
    with pytest.raises(ExportError) as err:
        run_exporter(Eigenvalues().eval(), (torch.randn(3, 3),), tmp_path / "m.onnx", ["x"], ["y"], None, 18,
                     what="Eigenvalues")
    message = err.value.message
    assert "operator aten.linalg_eig" in message and "Eigenvalues" in message and "\n" not in message
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("text, op", [
    ("No ONNX function found for <OpOverload(op='transformers.grouped_mm_fallback', overload='default')>.",
     "transformers.grouped_mm_fallback"),
    ("Error when translating node %zeta : call_function[target=torch.ops.prims.zeta.default](args", "prims.zeta"),
    ("Exporting the operator 'aten::unique_consecutive' to ONNX opset version 18 is not supported",
     "aten::unique_consecutive"),
    ("Could not guard on data-dependent expression Eq(u0, 1)", None),
])
def test_operator_found_in_exporter_messages(text, op):
    assert unsupported_operator(text) == op


def test_a_missing_extra_is_one_clear_error():
    require("onnx", "onnxscript", "onnxruntime")  # installed with the onnx extra
    with pytest.raises(GenforgeError, match=r"genforge_no_such_module not installed; .*genforge\[onnx\]"):
        require("onnx", "genforge_no_such_module")
