"""pytest: collect the repository root as a plain directory, not as a Python package.

The root ``__init__.py`` is the ComfyUI entry point. pytest would import it as a package named after
the checkout folder, which fails for folder names such as ``ComfyUI-photo-restoration`` and imports
the pack a second time otherwise. The tests import it as ``photo_restoration`` (tests/conftest.py).
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


class _RootIsAPlainDirectory:
    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path, parent):
        if Path(path).resolve() == ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def pytest_configure(config):
    config.pluginmanager.register(_RootIsAPlainDirectory(), "photo-restoration-root-dir")
