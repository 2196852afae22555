# Two commands for a fresh machine:
#   make demo   install into .venv and run the main job
#   make test   install into .venv and run ruff, mypy and the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mlcweb-installed
PLUGINS := $(wildcard examples/*/pyproject.toml)

# command:Debian package, for what the webgpu build (emcc), the web bundle (npm) and the browser test
# (chromium) need; installed with apt-get when the command is missing.
SYSTEM_TOOLS := emcc:emscripten chromium:chromium node:nodejs npm:npm
WEB_MODULES := web/node_modules/.package-lock.json

.PHONY: demo test install system-deps lavapipe lint typecheck pytest clean

install: system-deps lavapipe $(STAMP) $(WEB_MODULES)

system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y $$missing; \
	fi

# Mesa's CPU Vulkan driver (lavapipe) with shader-f16, which Dawn needs Mesa 25 for: the float16 WebGPU
# kernel tests run on it (tests/passes/webgpu/test_matrix_gemm.py). Debian 12 ships Mesa 22, so it comes
# from bookworm-backports there; elsewhere the distribution's own mesa-vulkan-drivers is used as it is.
LAVAPIPE := /usr/share/vulkan/icd.d/lvp_icd.json
lavapipe:
	@version=$$(dpkg-query -W -f='$${Version}' mesa-vulkan-drivers 2>/dev/null); \
	if [ -f $(LAVAPIPE) ] && dpkg --compare-versions "$$version" ge 25; then exit 0; fi; \
	SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	if grep -qs '^12' /etc/debian_version; then \
	  echo "installing Mesa 25's lavapipe from bookworm-backports (float16 WebGPU tests)"; \
	  echo "deb http://deb.debian.org/debian bookworm-backports main" | $$SUDO tee /etc/apt/sources.list.d/mlcweb-bookworm-backports.list >/dev/null; \
	  ($$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -t bookworm-backports mesa-vulkan-drivers) \
	    || echo "warning: Mesa 25's lavapipe could not be installed; the float16 WebGPU kernel tests will be skipped"; \
	elif command -v apt-get >/dev/null; then \
	  ($$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y mesa-vulkan-drivers) \
	    || echo "warning: lavapipe could not be installed; the float16 WebGPU kernel tests will be skipped"; \
	fi

# TVM's JS runtime and the tokenizer, pinned by web/package-lock.json.
$(WEB_MODULES): web/package.json web/package-lock.json
	cd web && npm ci --no-audit --no-fund
	touch $@

$(STAMP): pyproject.toml $(PLUGINS) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch first, pinned, so nothing pulls a CUDA build from the registry.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	# The CLIP BPE vocabulary ships inside open-clip-torch; its torchvision requirement would pull a
	# CUDA torch, so it is installed without dependencies (only the vocabulary file is used).
	$(PY) -m pip install --no-deps open-clip-torch==3.3.0
	# plugins bring what only they import (torch, diffusers, transformers)
	$(foreach p,$(PLUGINS),$(PY) -m pip install -e $(dir $(p)) &&) true
	touch $(STAMP)

PROMPT ?= a lighthouse on a cliff at dusk, oil painting

demo: install
	$(PY) examples/stable_diffusion/build.py --target llvm --out dist/llvm
	$(PY) examples/stable_diffusion/deploy.py --artifacts dist/llvm --prompt "$(PROMPT)" --output dist/demo.png
	$(PY) examples/stable_diffusion/build.py --target webgpu --dtype float16 --out dist/web
	@echo "image: dist/demo.png; artifacts: dist/llvm (manifest.json lists every file)"
	@echo "web bundle: dist/web; open it in a WebGPU browser with:  $(VENV)/bin/mlcweb serve dist/web"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(VENV)/bin/pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) dist build .pytest_cache .mypy_cache .ruff_cache
