"""Package list for setuptools; all other metadata lives in pyproject.toml.

pyproject.toml's ``packages`` is either a ``find`` directive or an explicit list, and we
need both: the auto-discovered ``metaopt`` and ``tasks`` packages (so new subpackages
ship without editing this file), plus the top-level ``checkpoints/`` folder, which holds
the released learned-optimizer artifacts and is installed as the package
``metaopt_checkpoints`` with every file below it as package data. Code locates it with
``metaopt._resources.checkpoints_dir()``, which works for source checkouts, editable
installs and wheels alike.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["metaopt", "metaopt.*", "tasks", "tasks.*"]) +
    ["metaopt_checkpoints"],
    package_dir={"metaopt_checkpoints": "checkpoints"},
    package_data={"metaopt_checkpoints": ["**/*"]},
    exclude_package_data={"metaopt_checkpoints": ["__pycache__/*", "**/__pycache__/*"]},
)
