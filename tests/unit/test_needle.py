"""Needle in a haystack: NSA's selection finds the one block that matches the query."""
import pytest

from nsa_dist import NSAConfig
from nsa_dist.inference.needle import needle_block, run_needle

PAPER = NSAConfig()  # l=32, d=16, l'=64, n=16, w=512
DEPTHS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def _check(S):
    results = [run_needle(S, depth, PAPER, head_dim=64, seed=i) for i, depth in enumerate(DEPTHS)]
    blocks = [r.block for r in results]
    assert blocks[0] == 0 and blocks[-1] == S // 64 - 1 and len(set(blocks)) == len(DEPTHS)
    for r in results:
        assert r.picked_reference and r.picked_decode, r
        assert r.rank == 1 or r.block == 0, r  # block 0 is forced (infinite priority)


def test_needle_16k():
    _check(16384)


@pytest.mark.long
def test_needle_64k():
    _check(65536)


def test_without_a_needle_the_block_is_not_found():
    # Control: the same haystack with no needle; a mid-sequence block is then neither
    # forced nor, at this seed, important enough to be among the n selected.
    missed = [run_needle(16384, d, PAPER, seed=i, strength=0.0) for i, d in enumerate((0.3, 0.5, 0.7))]
    assert not any(r.picked_reference or r.picked_decode for r in missed)
    assert all(r.rank > PAPER.num_selected for r in missed)


def test_bad_depth():
    with pytest.raises(ValueError, match="depth"):
        needle_block(16384, 1.5, PAPER)
    with pytest.raises(ValueError, match="shorter than one selection block"):
        needle_block(32, 0.5, PAPER)


def test_needle_cli(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "tools" / "needle.py"
    spec = importlib.util.spec_from_file_location("_tool_needle", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--seq-len", "4096", "--depths", "0.2,0.8"]) == 0
    assert "2/2 depths found" in capsys.readouterr().out
    assert tool.main(["--seq-len", "4096", "--depths", "0.5", "--strength", "0"]) == 1


def test_needle_through_generate_finds_it_and_the_control_does_not():
    from nsa_dist.inference.needle import QUERY, run_generate_needle

    for depth in (0.2, 0.6):
        r = run_generate_needle(2048, depth, PAPER, backend="reference")
        assert r.ok and r.tokens == [QUERY] * 4, r
    control = run_generate_needle(2048, 0.6, PAPER, with_needle=False, backend="reference")
    assert not control.ok and QUERY not in control.tokens


def test_needle_cli_generate(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "tools" / "needle.py"
    spec = importlib.util.spec_from_file_location("_tool_needle_gen", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--generate", "--seq-len", "1536", "--depths", "0.4", "--new-tokens", "2"]) == 0
    assert "1/1 depths found" in capsys.readouterr().out
    assert tool.main(["--generate", "--seq-len", "1536", "--depths", "0.4", "--strength", "0"]) == 1
