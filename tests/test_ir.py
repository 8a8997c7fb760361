import json
import subprocess
import sys

import networkx as nx
import torch

from difuse.fusion import record
from difuse.patterns.rms_norm import rms_norm


def _norm_graph(rows=4, cols=8):
    return record(rms_norm, torch.randn(rows, cols), torch.randn(cols), 1e-6)


def test_structural_hash_ignores_names_and_constants_but_not_structure():
    a = _norm_graph()
    b = _norm_graph(5, 8)  # other shapes and tensors, same structure
    assert a.structural_hash() == b.structural_hash()
    c = record(lambda x, w, eps: rms_norm(x, w, eps) + 1, torch.randn(4, 8), torch.randn(8), 1e-6)
    assert c.structural_hash() != a.structural_hash()


def test_structural_hash_is_stable_across_processes():
    code = ("import torch; from difuse.fusion import record; from difuse.patterns.rms_norm import rms_norm;"
            "print(record(rms_norm, torch.randn(4, 8), torch.randn(8), 1e-6).structural_hash())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _norm_graph().structural_hash()


def test_producers_users_and_networkx_view():
    g = _norm_graph()
    dg = g.to_networkx()
    assert isinstance(dg, nx.DiGraph) and nx.is_directed_acyclic_graph(dg)
    assert dg.number_of_nodes() == len(g.nodes)
    for i, node in enumerate(g.nodes):
        for name in node.outputs:
            assert g.producer(name) == i
            assert all(name in g.nodes[u].inputs for u in g.users(name))
    assert g.producer("arg0") is None and g.users("arg0")


def test_exports_and_subgraph():
    g = _norm_graph()
    data = json.loads(g.to_json())
    assert data["hash"] == g.structural_hash() and len(data["nodes"]) == len(g.nodes)
    assert data["scalars"] == {"2": "float"}
    assert g.to_dot().startswith("digraph") and "->" in g.to_dot()
    assert g.to_mermaid().startswith("flowchart") and "-->" in g.to_mermaid()
    part = g.subgraph(range(len(g.nodes) - 1))  # everything but the final weight multiply
    assert len(part.outputs) == 1 and "arg0" in part.inputs
    x, w = torch.randn(4, 8), torch.randn(8)
    torch.testing.assert_close(g.execute(x, w, 1e-6), rms_norm(x, w, 1e-6))
