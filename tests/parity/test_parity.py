"""Every case of the parity fixture folders runs through the production code.

One test item per case file: ``test_parity[supir-<case>]`` / ``test_parity[codeformer-<case>]``,
so ``pytest -k supir`` selects exactly the SUPIR cases and a failure names its case.
"""
import pytest

from .harness import case_params, run_case


@pytest.mark.parametrize("case", case_params("supir") + case_params("codeformer"))
def test_parity(case):
    run_case(case)
