"""Integration tests run against every real ComfyUI tree (see ``trees.py``).

A test that takes the ``comfy_tree`` fixture runs once per tree, with the version in its id
(``test_x[comfyui-0.33.0]``); ``newest_comfy_tree`` gives only the newest tree (for the slow tests
CI runs on the current ComfyUI only). Without any tree they skip, saying why.
"""
from __future__ import annotations

import pytest

from .trees import NO_TREE_REASON, Tree, comfy_trees, newest_tree


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/integration/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


def pytest_generate_tests(metafunc):
    if "comfy_tree" in metafunc.fixturenames:
        trees = comfy_trees()
        if trees:
            metafunc.parametrize("comfy_tree", trees, ids=[t.id for t in trees], scope="module", indirect=True)
        else:
            metafunc.parametrize("comfy_tree", [pytest.param(None, marks=pytest.mark.skip(reason=NO_TREE_REASON))],
                                 ids=["no-comfyui"], scope="module", indirect=True)


@pytest.fixture(scope="module")
def comfy_tree(request) -> Tree:
    return request.param


@pytest.fixture(scope="session")
def newest_comfy_tree() -> Tree:
    tree = newest_tree()
    if tree is None:
        pytest.skip(NO_TREE_REASON)
    return tree
