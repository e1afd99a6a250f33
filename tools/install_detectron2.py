#!/usr/bin/env python
"""Install detectron2 into the current Python environment without its compiled ops.

Detectron2 is not published on PyPI. Two sources are supported:

* ``DETECTRON2_PATH=/path/to/detectron2`` (a checkout of the official repository): installed
  as it is, with ``pip install --no-build-isolation -e``; it builds its own ops.
* default: the registry's ``pb1-detectron2==0.6`` sdist (the official 0.6 Python code without
  ``csrc``). Its extension cannot be built, so this script installs it with no extension and
  applies the fixes upstream made after 0.6 (each listed in ``PATCHES`` below).

cqdino uses none of detectron2's compiled ops. Idempotent: does nothing when a detectron2 that
imports is already installed (``--force`` reinstalls).
"""

import argparse
import hashlib
import html.parser
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.request

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
INDEX_URL = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")

# Stand-in for the compiled module: importing works, using a compiled op says why it cannot.
STUB_C = '''"""Stand-in for detectron2's compiled ops, which this install does not build."""


# What detectron2.utils.collect_env (run by default_setup) asks of the compiled module.
def get_compiler_version():
    return "none (detectron2 installed without compiled ops)"


def get_cuda_version():
    return "none"


def has_cuda():
    return False


def __getattr__(name):
    raise RuntimeError(
        f"detectron2._C.{name} is unavailable: detectron2 was installed without its compiled "
        "ops (cqdino's tools/install_detectron2.py). Install the official detectron2 with "
        "DETECTRON2_PATH to get them."
    )
'''

# (file, regex, replacement, why): the post-0.6 fixes.
PATCHES = [
    # numpy >= 1.24 removed the aliases np.int/float/bool/str.
    ("**/*.py", r"\bnp\.(int|float|bool|str)\b(?![\w.])", r"\1", "numpy aliases"),
    # Pillow >= 10 removed Image.LINEAR (it was an alias of BILINEAR).
    ("detectron2/data/transforms/transform.py", r"Image\.LINEAR\b", "Image.BILINEAR", "Pillow 10"),
    # setuptools >= 81 ships no pkg_resources; the model zoo only needs a package data path.
    ("detectron2/model_zoo/model_zoo.py", r"import pkg_resources\n", "", "pkg_resources"),
    (
        "detectron2/model_zoo/model_zoo.py",
        r"pkg_resources\.resource_filename\(\s*\"detectron2\.model_zoo\",\s*",
        "os.path.join(os.path.dirname(__file__), ",
        "pkg_resources",
    ),
    # No compiled extension: the sources are not in the sdist.
    ("setup.py", r"ext_modules=get_extensions\(\),", "ext_modules=[],", "no extension"),
    # black==21.4b2 breaks LazyConfig.save with current click; any black works.
    ("setup.py", r"\"black==21\.4b2\",", '"black",', "black pin"),
    # A direct-URL extra is refused by pip for packages from an index.
    ("setup.py", r"\s*\"panopticapi @ [^\"]+\",", "", "direct URL extra"),
    # The sdist keeps the model-zoo configs inside the package; ship them.
    (
        "setup.py",
        r"package_data=\{\"detectron2\.model_zoo\": get_model_zoo_configs\(\)\}",
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]}',
        "model-zoo configs",
    ),
]


def installed_detectron2():
    code = "import detectron2, sys; sys.stdout.write(detectron2.__file__)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def pip(*args):
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href"]


def download_sdist(dest):
    """Fetch the sdist from the package index (pip itself refuses it: a direct-URL extra)."""
    local = os.environ.get("DETECTRON2_SDIST")
    if local:
        return local
    page_url = f"{INDEX_URL}/{SDIST_NAME}/"
    with urllib.request.urlopen(page_url, timeout=60) as r:
        parser = _Links()
        parser.feed(r.read().decode())
    filename = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
    urls = [u for u in parser.links if u.split("#")[0].endswith(filename)]
    if not urls:
        sys.exit(f"install_detectron2: {filename} not listed at {page_url}")
    url = urllib.parse.urljoin(page_url, urls[0].split("#")[0])
    path = os.path.join(dest, filename)
    print(f"downloading {url}", flush=True)
    with urllib.request.urlopen(url, timeout=120) as r, open(path, "wb") as f:
        f.write(r.read())
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"install_detectron2: sha256 of {url} is {digest}, expected {SDIST_SHA256}")
    return path


def patch_tree(root):
    import glob

    for pattern, regex, repl, why in PATCHES:
        files = glob.glob(os.path.join(root, pattern), recursive=True)
        hits = 0
        for fn in files:
            text = open(fn, encoding="utf-8").read()
            new, n = re.subn(regex, repl, text)
            if n:
                hits += n
                with open(fn, "w", encoding="utf-8") as f:
                    f.write(new)
        if hits == 0:
            sys.exit(f"install_detectron2: patch '{why}' matched nothing in {pattern}")
        print(f"patched {why}: {hits} place(s)")
    with open(os.path.join(root, "detectron2", "_C.py"), "w") as f:
        f.write(STUB_C)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="reinstall even if detectron2 imports")
    args = ap.parse_args()

    checkout = os.environ.get("DETECTRON2_PATH")
    where = installed_detectron2()
    if where and not args.force:
        stub = os.path.join(os.path.dirname(where), "_C.py")
        if os.path.isfile(stub):  # our stand-in: keep it current
            with open(stub) as f:
                if f.read() != STUB_C:
                    with open(stub, "w") as g:
                        g.write(STUB_C)
                    print(f"updated the detectron2._C stand-in: {stub}")
        print(f"detectron2 already installed: {where}")
        return
    if checkout:
        if not os.path.isfile(os.path.join(checkout, "setup.py")):
            sys.exit(f"install_detectron2: DETECTRON2_PATH={checkout} has no setup.py")
        pip("install", "--no-build-isolation", "-e", checkout)
        return
    with tempfile.TemporaryDirectory() as tmp:
        sdist = download_sdist(tmp)
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = os.path.join(tmp, f"{SDIST_NAME}-{SDIST_VERSION}")
        patch_tree(src)
        pip("install", "--no-build-isolation", src)
    print(f"detectron2 installed: {installed_detectron2()}")


if __name__ == "__main__":
    main()
