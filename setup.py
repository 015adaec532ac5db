"""Package discovery for the three source roots (the rest lives in pyproject.toml).

`lmforge` is spread over three folders so that operator/ and trainer/ hold their
own code while no import package is named `operator` (it would shadow the
standard library): lmforge/ (API, CLI), operator/lmforge/operator and
trainer/lmforge/trainer.
"""

from setuptools import find_packages, setup

ROOTS = {"operator": "lmforge.operator", "trainer": "lmforge.trainer"}

packages = [p for p in find_packages(".", include=["lmforge", "lmforge.*"])]
package_dir = {"lmforge": "lmforge"}
for root, name in ROOTS.items():
    base = f"{root}/{name.replace('.', '/')}"
    package_dir[name] = base
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(base)]

setup(packages=packages, package_dir=package_dir)
