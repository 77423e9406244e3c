"""benchmarks/bench_layers_vs_openvino.py: OpenVINO's profiled nodes are matched to our layers by module name."""

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_layers_vs_openvino import report  # noqa: E402


def test_convolutions_match_openvino_nodes_by_module_name_and_list_the_worst_first():
    nodes = {
        "__module.input_blocks.1.0.in_layers.2/aten::_convolution/Convolution": (
            "Convolution",
            "brgconv",
            3.0,
        ),
        "__module.input_blocks.1.0.in_layers.20/aten::_convolution/Convolution": (
            "Convolution",
            "brgconv",
            9.0,
        ),
        "__module.out.2/aten::_convolution/Convolution": ("Convolution", "brgconv_1x1", 1.0),
        "__module.out.2/aten::add/Add": ("Add", "jit", 5.0),  # not a Convolution node: not the layer's
        "__module.middle_block.1.proj_in/aten::linear/MatMul": ("FullyConnected", "brgemm", 4.0),
    }
    results = {
        "steps": {"ours": 30.0, "OpenVINO": 20.0},
        "nodes": nodes,
        "operators": collections.Counter({"mkldnn::_linear_pointwise": 12.0, "aten::add": 2.0}),
        "convs": {
            "input_blocks.1.0.in_layers.2": ("Winograd F(2x2)", 640, 640, 3, 1, (16, 16), 2.0),
            "out.2": ("oneDNN convolution", 320, 4, 3, 1, (32, 32), 4.0),
            "input_blocks.4.0.skip_connection": ("oneDNN convolution", 320, 640, 1, 1, (16, 16), 0.5),
        },
    }
    text = report(results, top=2)
    assert "ours 30 ms, OpenVINO 20 ms (1.50x)" in text
    assert "| Convolution / brgconv | 12.0 |" in text  # node kinds summed: 3 + 9
    assert "Convolutions: ours 6 ms, OpenVINO 4 ms (2 of 3 layers found in its profile)" in text
    rows = [line for line in text.splitlines() if line.startswith("| out.2") or line.startswith("| input_")]
    assert rows[0].startswith(
        "| out.2 | oneDNN convolution | 320 -> 4, 3x3, 1, 32x32 | 4.00 | 1.00 (brgconv_1x1)"
    )
    assert (
        rows[1].startswith("| input_blocks.1.0.in_layers.2 | Winograd F(2x2) |")
        and "| 2.00 | 3.00" in rows[1]
    )
    assert len(rows) == 2  # --top 2
