# Set-up and common tasks. Every target creates or reuses the local virtual environment in .venv.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
DEMO_DIR ?= runs/demo_mae_vit

.PHONY: demo test lint experiment-fashion clean-demo

$(STAMP): pyproject.toml
	@# timm needs torchvision, which PyPI ships only for CUDA builds of torch: the install peaks at about 8 GB.
	@free_kb=$$(df -Pk $(dir $(abspath $(VENV))) | awk 'NR==2 {print $$4}'); [ "$$free_kb" -ge 9000000 ] || \
		echo "WARNING: $$((free_kb / 1048576)) GB free here; installing PyTorch needs about 8 GB (set VENV=/a/roomier/path)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,tensorboard]'
	@# DeepSpeed builds from source; without it only its tests are skipped, so a failed build is not fatal.
	$(PY) -m pip install -q -e '.[deepspeed]' || echo "WARNING: DeepSpeed did not install; its tests will be skipped"
	touch $(STAMP)

## demo: MAE pretraining of a tiny ViT on the bundled Fashion-MNIST sample, then kNN, linear-probe and fine-tune
## accuracy of the pretrained encoder next to the same runs from random init (CPU, a few minutes)
demo: $(STAMP)
	$(PY) pretrain.py recipes/demo_mae_vit.yaml run.output_dir=$(DEMO_DIR)
	@echo "Run directory: $(DEMO_DIR) (config.yaml, metrics.jsonl, tensorboard/, recon/*.png, checkpoints/)"
	$(PY) tools/experiment_fashion.py demo $(DEMO_DIR) --out $(DEMO_DIR)-downstream

## experiment-fashion: MAE vs random init and TNT vs ViT on the full Fashion-MNIST (8 min on 2 idle CPU cores, 20 on busy ones)
experiment-fashion: $(STAMP)
	@test -d /usr/share/datasets/fashion-mnist || { echo "needs the full Fashion-MNIST: sudo apt-get install dataset-fashion-mnist"; exit 1; }
	$(PY) tools/experiment_fashion.py

## test: the CPU test suite, on two pytest workers (most of its time is spent starting processes, which overlap well)
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 2

lint: $(STAMP)
	$(PY) -m ruff check .

clean-demo:
	rm -rf $(DEMO_DIR) $(DEMO_DIR)-downstream
