"""The CUDA fast path of the frozen towers (construct.models.graphs): what holds on the CPU, and,
on a machine with CUDA, that graph replays give the eager bf16 results."""

from __future__ import annotations

import pytest
import torch

from construct.models.conch import ConchModel
from construct.models.graphs import FrozenGraphs, enable_fast_path
from construct.models.segformer import load_mit_teacher

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def tiny_towers(device: str = "cpu") -> tuple[ConchModel, torch.nn.Module]:
    torch.manual_seed(0)
    return ConchModel(preset="tiny", image_size=64).to(device), load_mit_teacher(None, preset="tiny").to(device)


def test_the_fast_path_refuses_a_tower_off_cuda() -> None:
    conch, teacher = tiny_towers()
    for tower in (conch, teacher):
        with pytest.raises(ValueError, match="CUDA device, not cpu"):
            enable_fast_path(tower)
        assert tower.graphs is None
        assert all(p.dtype == torch.float32 for p in tower.parameters())  # nothing was cast


def test_cpu_inputs_never_reach_the_graphs() -> None:
    conch, teacher = tiny_towers()
    images = torch.rand(2, 3, 64, 64)
    expected_grids = conch.block_features(images, blocks=(1, 3))
    expected_stages = teacher(images)
    conch.graphs, teacher.graphs = FrozenGraphs(conch), FrozenGraphs(teacher)
    with torch.no_grad():
        grids = conch.block_features(images, blocks=(1, 3))
    assert all(torch.equal(a, b) for a, b in zip(grids, expected_grids))
    assert all(torch.equal(a, b) for a, b in zip(teacher(images), expected_stages))
    assert len(conch.graphs) == len(teacher.graphs) == 0


def _close(graphed: list[torch.Tensor], eager: list[torch.Tensor]) -> bool:
    return all(torch.allclose(g.float(), e.float(), rtol=2e-2, atol=2e-2) for g, e in zip(graphed, eager))


@cuda
def test_graph_replays_give_the_eager_bf16_results_for_every_input() -> None:
    conch, teacher = tiny_towers("cuda")
    eager_conch, eager_teacher = tiny_towers("cuda")
    enable_fast_path(conch)
    enable_fast_path(teacher)
    assert conch.visual.trunk.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert conch.visual.trunk.pos_embed.dtype == torch.float32  # norms and embeddings stay fp32
    for seed in (1, 2):  # the second input must not see the first one's buffers
        torch.manual_seed(seed)
        images = torch.rand(2, 3, 64, 64, device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            expected_grids = eager_conch.block_features(images, blocks=(1, 3), intensity=1.1)
            expected_stages = eager_teacher(images)
            grids = conch.block_features(images, blocks=(1, 3), intensity=1.1)
            stages = teacher(images)
        assert _close(grids, expected_grids) and _close(stages, expected_stages)
    assert len(conch.graphs) == len(teacher.graphs) == 1
    held = grids[0].clone()
    with torch.no_grad():
        conch.block_features(torch.rand(2, 3, 64, 64, device="cuda"), blocks=(1, 3), intensity=1.1)
    assert torch.equal(grids[0], held)  # outputs are copies, not the graph's static buffers

    conch.cpu().cuda()  # new weight storage: the old graphs would read freed memory
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert _close(conch.block_features(images, blocks=(1, 3), intensity=1.1), expected_grids)
    assert len(conch.graphs) == 1
