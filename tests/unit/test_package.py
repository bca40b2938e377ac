"""Package hygiene: importing nsa_dist pulls in no optional heavy dependency; the kernels are
reachable as nsa_dist.kernels in every install mode and shadow no other package."""
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys

import pytest

OPTIONAL = ("deepspeed", "triton", "tensorboard", "sentencepiece", "transformers")


def test_import_loads_no_optional_dependency():
    code = ("import sys, nsa_dist, nsa_dist.ops, nsa_dist.modules, nsa_dist.models, nsa_dist.convert, "
            "nsa_dist.inference, nsa_dist.data; "
            "nsa_dist.NSADecoderLM; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({OPTIONAL!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_lazy_top_level_names():
    import nsa_dist
    assert nsa_dist.NSAAttention.__name__ == "NSAAttention"
    assert nsa_dist.NSADecoderLM.__name__ == "NSADecoderLM"


# --- how nsa_dist reaches the top-level kernels/ folder (nsa_dist/kernels/__init__.py, setup.py)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROBE = ("import json, kernels, nsa_dist.kernels.launch as launch; "
         "from importlib.util import find_spec; "
         "print(json.dumps([getattr(kernels, '__file__', None), launch.__file__, "
         "find_spec('nsa_dist.kernels.api').origin]))")


def _probe(python: str, cwd: str, env_path: str | None = None) -> list:
    """(kernels.__file__, nsa_dist.kernels.launch's file, nsa_dist.kernels.api's file) in a fresh
    interpreter whose first sys.path entry is ``cwd`` (``-c``), with PYTHONPATH=env_path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if env_path:
        env["PYTHONPATH"] = env_path
    out = subprocess.run([python, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _hf_kernels_origin():
    """The file of an installed ``kernels`` package (Hugging Face's), or None."""
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
    spec = importlib.machinery.PathFinder.find_spec("kernels", path)
    return None if spec is None else spec.origin


def test_checkout_root_first_on_sys_path_never_shadows_another_kernels_package():
    """kernels/ has no __init__.py: with the root first on sys.path (python -c / -m from the
    root), `import kernels` is the installed package, or a harmless namespace without one; and
    nsa_dist.kernels is still the checkout's kernels/ (nsa_dist/kernels/__init__.py adds it)."""
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))
    hf, launch, api = _probe(sys.executable, ROOT, ROOT)
    assert hf == _hf_kernels_origin() and (hf is None or not hf.startswith(os.path.join(ROOT, "kernels") + os.sep))
    assert launch == os.path.join(ROOT, "kernels", "launch.py") and api == os.path.join(ROOT, "kernels", "api.py")


def test_nsa_dist_kernels_from_pythonpath_outside_the_root(tmp_path):
    _, launch, api = _probe(sys.executable, str(tmp_path), ROOT)
    assert launch == os.path.join(ROOT, "kernels", "launch.py") and api == os.path.join(ROOT, "kernels", "api.py")


def _copy_project(dest: str) -> str:
    src = os.path.join(dest, "src")
    for name in ("nsa_dist", "kernels"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(src, name),
                        ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), src)
    return src


def _site_dirs_that_build() -> list[str]:
    """This interpreter's site-packages folders, one whose setuptools builds wheels on its own
    (>= 70.1, or with the wheel package) first: pip then builds without an index."""
    dirs = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]

    def builds(d: str) -> bool:
        info = [n for n in os.listdir(d) if n.startswith("setuptools-") and n.endswith(".dist-info")]
        if not info:
            return False
        version = tuple(int(x) for x in info[0][len("setuptools-"):-len(".dist-info")].split(".")[:2])
        return version >= (70, 1) or any(n.startswith("wheel-") for n in os.listdir(d))
    able = [d for d in dirs if builds(d)]
    if not able:
        pytest.skip("no setuptools here that builds a wheel without the network (>= 70.1 or wheel)")
    return able[:1] + [d for d in dirs if d != able[0]]


@pytest.mark.parametrize("mode", ["wheel", "editable"])
def test_nsa_dist_kernels_from_an_installed_project(tmp_path, mode):
    """pip install (a wheel: kernels/ copied into nsa_dist/kernels/, no shim) and pip install -e
    (nsa_dist/kernels/__init__.py points at the source's kernels/) both give nsa_dist.kernels,
    run from outside the project, and leave `import kernels` to the installed package."""
    import venv

    src = _copy_project(str(tmp_path))
    env_dir = os.path.join(str(tmp_path), "venv")
    venv.create(env_dir, with_pip=False)
    python = os.path.join(env_dir, "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "parent_site.pth"), "w") as fh:  # torch, triton, pip, setuptools
        fh.write("\n".join(_site_dirs_that_build()) + "\n")
    args = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    out = subprocess.run(args + (["-e", src] if mode == "editable" else [src]), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = os.path.join(str(tmp_path), "elsewhere")
    os.makedirs(run_dir)
    hf, launch, api = _probe(python, run_dir)
    assert hf == _hf_kernels_origin()
    if mode == "wheel":
        pkg = os.path.join(purelib, "nsa_dist", "kernels")
        assert launch == os.path.join(pkg, "launch.py") and api == os.path.join(pkg, "api.py")
        assert not os.path.exists(os.path.join(pkg, "__init__.py"))  # the shim is for checkouts only
    else:
        assert launch == os.path.join(src, "kernels", "launch.py") and api == os.path.join(src, "kernels", "api.py")
