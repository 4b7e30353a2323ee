"""Test-suite settings shared by tests/ and the nbval run of notebooks/."""
import os

# Notebooks follow the smoke-test convention: `smoke = None` in the parameters cell (papermill -p smoke True/False
# overrides it), and the next cell sets `smoke = "CI" in os.environ` when it is still None. Under the test suite they
# thus take their short path, whether or not the CI runner set CI. Kernels started by nbval inherit this environment.
os.environ.setdefault("CI", "true")
