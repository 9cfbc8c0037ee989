"""Run the benchmarks from a checkout that was never installed, on a host without network.

An install maps `weights/` to `jaxembed.weights` and `server/` to `jaxembed.server`; a bare
checkout has neither name. `use_checkout()` gives them to the checkout's own folders, and puts
the wheels of `bench/gpu-wheels.txt` (the dependencies a GPU host with JAX, torch and
transformers preinstalled lacks) on the path, unpacked, when they were brought to
`bench/wheels/` (or `$JAXEMBED_WHEELS`). Nothing is installed: the unpacked wheels live in a
folder of the checkout's build area.

    # on a machine with network, from the checkout:
    pip download --only-binary=:all: --no-deps --python-version 3.11 \
        --platform manylinux2014_x86_64 -d bench/wheels -r bench/gpu-wheels.txt
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The subpackages an install maps from folders of the checkout.
MAPPED = {"jaxembed.weights": "weights", "jaxembed.server": "server"}


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds `jaxembed` (with `force`) and its mapped subpackages in the checkout's folders,
    ahead of any other finder; their submodules are then found through the packages' paths."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def find_spec(self, fullname: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(
            fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])


def _installed() -> bool:
    try:
        importlib.metadata.distribution("jaxembed")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def unpack_wheels(wheels: Path, into: Path) -> list[str]:
    """Unpack each wheel of `wheels` into its own folder under `into` (once), put those folders
    on sys.path, and return the wheels' file names."""
    names = []
    for wheel in sorted(wheels.glob("*.whl")):
        target = into / wheel.stem
        if not (target / ".unpacked").exists():
            with zipfile.ZipFile(wheel) as z:
                z.extractall(target)
            (target / ".unpacked").touch()
        if str(target) not in sys.path:
            sys.path.append(str(target))  # after what the host has installed
        names.append(wheel.name)
    return names


def use_checkout(root: Path = ROOT, force: bool = False) -> dict[str, str]:
    """Make `jaxembed` and its mapped subpackages importable from `root`, and the brought wheels
    too; the packages are left alone where jaxembed is installed (unless `force`). Call it before
    anything imports jaxembed. Returns what came from where."""
    used: dict[str, str] = {}
    wheels = Path(os.environ.get("JAXEMBED_WHEELS", root / "bench" / "wheels"))
    if wheels.is_dir():
        for name in unpack_wheels(wheels, root / "build" / "bench-wheels"):
            used[name] = "brought wheel"
    if force or not _installed():
        folders = {name: root / folder for name, folder in MAPPED.items()}
        if force:
            folders["jaxembed"] = root / "jaxembed"
        sys.meta_path.insert(0, _CheckoutFinder(folders))
        used.update({name: str(folder) for name, folder in folders.items()})
    return used
