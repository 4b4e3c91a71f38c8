"""``import gr_parallel`` is light: its exports load on first use (PEP 562), so a rank that only needs the process
groups (``initialize``) never imports TorchRec or gr-models; every exported name still resolves, to the object its
module defines (``parallelize`` stays the function whoever imports its submodule first), and ``dir()`` lists
them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

HEAVY = ("torchrec", "fbgemm_gpu", "gr_models")

CHILD = textwrap.dedent(
    f"""
    import importlib, sys
    import gr_parallel

    def heavy():
        return sorted(m for m in {HEAVY!r} if m in sys.modules)

    assert heavy() == [], f"import gr_parallel imported {{heavy()}}"
    ctx = gr_parallel.initialize(backend="gloo")
    assert (ctx.world_size, ctx.tp_size) == (1, 1)
    gr_parallel.destroy()
    assert heavy() == [], f"gr_parallel.initialize imported {{heavy()}}"
    assert set(gr_parallel.__all__) <= set(dir(gr_parallel)), "dir() misses exports"
    assert gr_parallel.load_balance.__name__ == "gr_parallel.load_balance"  # a submodule reads as an attribute
    from gr_parallel.parallelize import ParallelizeConfig  # loads the submodule that shares an export's name
    assert callable(gr_parallel.parallelize) and gr_parallel.parallelize.__module__ == "gr_parallel.parallelize"
    for name in gr_parallel.__all__:
        value = getattr(gr_parallel, name)
        assert value is getattr(importlib.import_module(gr_parallel._EXPORTS[name]), name), name
    assert "torchrec" in sys.modules  # resolving shard_sparse & co. did load it: the test above could fail
    try:
        gr_parallel.no_such_name
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown attribute resolved")
    print("ok")
    """
)


def test_import_and_initialize_do_not_load_torchrec() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr
