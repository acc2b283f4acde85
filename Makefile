# Two commands on a fresh machine (see README): `make demo` runs the pipeline, `make test` runs the tests.
# Both install everything first: Debian's ffmpeg and chromium (apt-get; chromium renders the report in the tests),
# a virtualenv, the package with its dev and train extras.
VENV ?= .venv
# Installed before the extras so that `torch>=2.4` is already satisfied: on the dev/CI machines this is the CPU
# wheel on disk; elsewhere pick your build, e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu".
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The reference lane's venv: PyPI's CUDA torch (runs on the CPU, imports torchvision), open_clip, timm, sam2,
# insightface. ~5.5 GB; built once, rebuilt when pyproject.toml changes.
REF_VENV ?= .venv-reference
REF_TORCH ?= "torch==2.14.*" torchvision
REF_PY := $(REF_VENV)/bin/python
# The PaddleOCR lane's venv: the project with paddlepaddle (PyPI's CPU build) and paddleocr 3, kept apart from the
# reference venv because paddlepaddle's OpenMP runtime and paddlex's GUI OpenCV clash with torch's and the project's
# headless one (the headless build is installed over paddlex's opencv-contrib-python). ~3 GB.
PADDLE_VENV ?= .venv-paddle
PADDLE_PY := $(PADDLE_VENV)/bin/python

.PHONY: setup setup-reference setup-paddle demo test test-reference test-fast lint bench clean
# the venvs install the project editable from the same tree: one at a time
.NOTPARALLEL:

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@# python3-venv: Debian's python3 makes no venv without it (a Python >= 3.11 is needed)
	@command -v ffmpeg >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 && python3 -c "import ensurepip" || \
		{ $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
		--no-install-recommends ffmpeg chromium python3-venv; }
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,train]"
	@touch $@

setup-reference: $(REF_VENV)/.installed

$(REF_VENV)/.installed: pyproject.toml $(VENV)/.installed
	@# insightface and sam2 compile C/C++ extensions: a compiler and Python's headers
	@command -v g++ >/dev/null 2>&1 && python3 -c "import os, sysconfig; \
		raise SystemExit(not os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" || \
		{ $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
		--no-install-recommends build-essential python3-dev; }
	python3 -m venv $(REF_VENV)
	$(REF_PY) -m pip install -q --upgrade pip
	$(REF_PY) -m pip install -q $(REF_TORCH)
	$(REF_PY) -m pip install -q -e ".[dev,reference-lane]"
	SAM2_BUILD_CUDA=0 $(REF_PY) -m pip install -q --no-build-isolation "sam2>=1.0"
	@touch $@

setup-paddle: $(PADDLE_VENV)/.installed

# after $(VENV): libpaddle.so loads the system's libgomp.so.1, which paddlepaddle does not ship (Debian's ffmpeg
# brings it)
$(PADDLE_VENV)/.installed: pyproject.toml $(VENV)/.installed
	python3 -m venv $(PADDLE_VENV)
	$(PADDLE_PY) -m pip install -q --upgrade pip
	$(PADDLE_PY) -m pip install -q -e ".[dev,paddle-lane]"
	@# paddlex checks that opencv-contrib-python is installed (metadata), so it stays; the headless build is
	@# installed over it so that the cv2 module is the headless one
	$(PADDLE_PY) -m pip install -q --force-reinstall --no-deps "opencv-python-headless==$$($(PADDLE_PY) -c \
		'import importlib.metadata as m; print(m.version("opencv-python-headless"))')"
	@touch $@

demo: setup
	$(VENV)/bin/curation samples samples
	$(VENV)/bin/curation run configs/local.yaml --input samples --out runs/demo

test: setup setup-reference setup-paddle
	$(VENV)/bin/ruff check .
	$(PY) -m pytest
	CURATION_REFERENCE_LANE=paddle $(PADDLE_PY) -m pytest -m reference tests/test_paddle_lane.py
	CURATION_REFERENCE_LANE=torch $(REF_PY) -m pytest -m reference tests/test_reference_lane.py

test-reference: setup-reference setup-paddle
	CURATION_REFERENCE_LANE=paddle $(PADDLE_PY) -m pytest -m reference tests/test_paddle_lane.py
	CURATION_REFERENCE_LANE=torch $(REF_PY) -m pytest -m reference tests/test_reference_lane.py

test-fast: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -m "not slow"

bench: setup
	$(PY) bench/scenecut.py
	$(PY) bench/filters.py
	$(PY) bench/throughput.py
	$(PY) bench/attention.py

clean:
	rm -rf runs samples bench/out $(REF_VENV) $(PADDLE_VENV)
