"""Test-suite settings shared by tests/ and the nbval run of notebooks/."""
import os

# Notebooks follow the smoke-test convention (`smoke = "CI" in os.environ`): under the test suite they take their
# short path, whether or not the CI runner set CI. Kernels started by nbval inherit this environment.
os.environ.setdefault("CI", "true")
